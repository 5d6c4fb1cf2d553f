"""eval_linear.py's protocols and defaults: --protocol main_lincls (main_lincls.py's linear probe: crop views of
every image each epoch, the last partial batch kept, raw features, lr 30, best and last top-1), the per-epoch test
top-1 of our cached-feature probe, the lr schedules that follow --epochs, and a --help that states every default.
A tiny moco.py checkpoint on the 3-class image folder of conftest.py (108 training / 12 test images, 32 px)."""
import json
import re

import pytest
import torch
import torchvision.transforms as T

import eval_linear
import moco
from conftest import in_process

QUICK = ["--workers", "0", "--device", "cpu"]


@pytest.fixture
def ckpt(moco_ckpt):
    return moco_ckpt


@pytest.fixture(scope="module")
def train_val(image_folder, tmp_path_factory):
    """conftest's image folder as ROOT/train (108 images) and ROOT/val (12: every 10th image of each class's sorted
    list), the split that --protocol main_lincls needs."""
    import os
    import shutil
    root = tmp_path_factory.mktemp("train_val")
    for c in sorted(os.listdir(image_folder)):
        for j, name in enumerate(sorted(os.listdir(os.path.join(image_folder, c)))):
            os.makedirs(root / ("val" if j % 10 == 9 else "train") / c, exist_ok=True)
            shutil.copy(os.path.join(image_folder, c, name), root / ("val" if j % 10 == 9 else "train") / c / name)
    return str(root)


def parse(*flags):
    return eval_linear.parse_args(["--pretrained", "ckpt.pt", *map(str, flags)])


# ----------------------------------------------------------------------------------------------------
# --protocol main_lincls
# ----------------------------------------------------------------------------------------------------
def test_main_lincls_trains_on_crops_of_every_image_and_reports_best_and_last(ckpt, train_val, tmp_path, monkeypatch,
                                                                              capsys):
    """At 32 px: a RandomResizedCrop(32) + flip view of each of the 108 training images every epoch (counted where
    the crop is drawn), all of them in the one partial batch of the default 256, raw features, lr 30; the test top-1
    after every epoch in the JSON, the last as top1 and the best beside it, both in the printed line."""
    crops, views = [], []
    draw = T.RandomResizedCrop.get_params
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a: crops.append(1) or draw(*a)))
    batches = eval_linear.train_batches
    monkeypatch.setattr(eval_linear, "train_batches", lambda a, e, ds, tf, *r: views.append(tf) or batches(a, e, ds,
                                                                                                            tf, *r))
    out = tmp_path / "official.json"
    eval_linear.main(["--pretrained", ckpt, "--data", train_val, "--out", str(out), "--protocol", "main_lincls",
                      "--epochs", "3", *QUICK])
    r, printed = json.load(open(out)), capsys.readouterr().out
    kinds = [type(t) for t in views[0].transforms]
    assert kinds[:2] == [T.RandomResizedCrop, T.RandomHorizontalFlip] and views[0].transforms[0].size == (32, 32)
    assert len(crops) == 3 * 108 and [e["images"] for e in r["per_epoch"]] == [108] * 3
    assert (r["protocol"], r["aug"], r["standardize"], r["lr"], r["batch_size"]) == ("main_lincls", "crop", False,
                                                                                     30.0, 256)
    top1s = [e["top1"] for e in r["per_epoch"]]
    assert r["top1"] == top1s[-1] and r["top1_best"] == max(top1s) == top1s[r["top1_best_epoch"] - 1]
    assert f"top-1 {r['top1']:.2f} (last epoch; best {r['top1_best']:.2f} at epoch" in printed
    assert "chosen on the test set" in printed and "sanity check passed" in printed


def test_main_lincls_sampler_keeps_every_image_and_pads_as_distributed_sampler():
    """One process: every image once per epoch, the last batch partial (10 images, batch 4: 4, 4, 2), a new order
    each epoch. Three processes (global batch 6): torch's DistributedSampler, whose padding repeats 2 images so that
    each process gets 4 images in equal batches (2, 2)."""
    data = moco.ArrayData(torch.zeros(10, 2, 2, dtype=torch.uint8).numpy(), range(10))
    one = eval_linear.EveryImageSampler(10, seed=0, rank=0, world=1, batch=4)
    sizes, seen = [], []
    for epoch in (0, 1):
        one.epoch = epoch
        loader = moco.loader(moco.Seeded(data, T.ToTensor()), 4, 0, one)
        ys = [y for _, y in loader]
        sizes.append([len(y) for y in ys])
        seen.append(torch.cat(ys).tolist())
    assert sizes == [[4, 4, 2]] * 2 and sorted(seen[0]) == sorted(seen[1]) == list(range(10)) and seen[0] != seen[1]
    shares = []
    for rank in range(3):
        s = eval_linear.EveryImageSampler(10, seed=0, rank=rank, world=3, batch=2)
        ref = torch.utils.data.DistributedSampler(range(10), num_replicas=3, rank=rank, shuffle=True, seed=0)
        assert [i for i, _ in s] == list(ref)
        shares.append([len(y) for _, y in moco.loader(moco.Seeded(data, T.ToTensor()), 2, 0, s)])
    assert shares == [[2, 2]] * 3
    assert set(i for rank in range(3) for i, _ in eval_linear.EveryImageSampler(10, 0, rank, 3, 2)) == set(range(10))


@pytest.mark.parametrize("flags", [["--probe", "mlp"], ["--finetune"], ["--aug", "none"], ["--standardize"],
                                   ["--label-fraction", "0.5"], ["--labels-per-class", "2"]])
def test_main_lincls_stops_on_what_main_lincls_does_not_do(flags, tmp_path):
    p = in_process(eval_linear.main, "--pretrained", tmp_path / "none.pt", "--protocol", "main_lincls", *flags)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"{flags[0]}" in p.stderr, p.stderr
    assert "is not main_lincls.py's" in p.stderr


# ----------------------------------------------------------------------------------------------------
# Defaults and schedules
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, want", [
    # flags -> epochs, batch, head lr, milestones, standardize, aug, backbone lr
    ([], (100, 256, 0.1, "60,80", True, "auto", None)),
    (["--no-standardize"], (100, 256, 30.0, "60,80", False, "auto", None)),
    (["--probe", "mlp"], (100, 64, 1e-4, "50,100", True, "auto", None)),
    (["--probe", "mlp", "--epochs", 10], (10, 64, 1e-4, "5,10", True, "auto", None)),
    (["--epochs", 10], (10, 256, 0.1, "6,8", True, "auto", None)),
    (["--finetune"], (100, 256, 0.1, "60,80", True, "auto", 0.005)),
    (["--finetune", "--no-standardize"], (100, 256, 0.1, "60,80", False, "auto", 0.005)),
    (["--finetune", "--epochs", 10], (10, 256, 0.1, "6,8", True, "auto", 0.005)),
    (["--finetune", "--probe", "mlp"], (100, 64, 1e-4, "50,100", True, "auto", 5e-6)),
    (["--finetune", "--lr", 0.2, "--backbone-lr", 0.01], (100, 256, 0.2, "60,80", True, "auto", 0.01)),
    (["--finetune", "--lr", 0.2], (100, 256, 0.2, "60,80", True, "auto", 0.01)),
    (["--epochs", 10, "--milestones", "3"], (10, 256, 0.1, "3", True, "auto", None)),
    (["--protocol", "main_lincls"], (100, 256, 30.0, "60,80", False, "crop", None)),
    (["--protocol", "main_lincls", "--epochs", 10, "--no-standardize", "--aug", "crop"],
     (10, 256, 30.0, "6,8", False, "crop", None)),
])
def test_defaults(flags, want):
    """The defaults table: fine-tuning has its own lrs (never derived from lr 30), the milestones follow --epochs
    (60%/80%; mlp 50%/100%, rdevon/DIM's MultiStepLR [50, 100]) unless given."""
    a = parse(*flags)
    got = (a.epochs, a.batch_size, a.lr, a.milestones, a.standardize, a.aug, a.backbone_lr)
    assert got[:2] + got[3:6] == want[:2] + want[3:6]
    assert got[2] == pytest.approx(want[2]) and (got[6] is None) == (want[6] is None)
    assert want[6] is None or got[6] == pytest.approx(want[6])


@pytest.mark.parametrize("probe, lrs", [("linear", [0.1] * 6 + [0.01] * 2 + [0.001] * 2),
                                        ("mlp", [1e-4] * 5 + [1e-5] * 5)])
def test_ten_epochs_decay_the_lr(probe, lrs, monkeypatch):
    """--epochs 10 without --milestones: the lr the optimiser used in each epoch, read after it."""
    opts, used = [], []
    make = eval_linear.make_opt
    monkeypatch.setattr(eval_linear, "make_opt", lambda *a: opts.append(make(*a)) or opts[-1])
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    eval_linear.fit_probe(parse("--probe", probe, "--epochs", 10), f, y, 3, say=lambda *a, **k: None,
                          on_epoch=lambda rec, head: used.append(opts[0].param_groups[0]["lr"]))
    assert used == pytest.approx(lrs)


def test_cached_probe_records_every_epoch(ckpt, tmp_path):
    """Our default protocol at 32 px (cached features) also has the per-epoch test top-1, the best and the last."""
    out = tmp_path / "ours.json"
    eval_linear.main(["--pretrained", ckpt, "--out", str(out), "--epochs", "3", "--batch-size", "16", *QUICK])
    r = json.load(open(out))
    assert r["protocol"] == "ours" and r["aug"] == "none" and r["standardize"] and r["milestones"] == "2,2"
    assert [e["epoch"] for e in r["per_epoch"]] == [1, 2, 3] and [e["images"] for e in r["per_epoch"]] == [108] * 3
    assert r["top1"] == r["per_epoch"][-1]["top1"] and r["top1_best"] == max(e["top1"] for e in r["per_epoch"])


# ----------------------------------------------------------------------------------------------------
# What the user reads
# ----------------------------------------------------------------------------------------------------
def help_entries():
    """--help -> {flag: its help text on one line}."""
    text = in_process(eval_linear.main, "--help").stdout.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", text)[1:]
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries if not e.startswith("-h")}


def test_help_states_every_effective_default():
    """Every flag's help states its default exactly once, a None never, and no help text points at the source."""
    entries = help_entries()
    assert len(entries) == len(eval_linear.Args.__dataclass_fields__)
    for flag, text in entries.items():
        assert len(re.findall(r"\([^()]*\bdefault\b", text)) == 1, text
        assert "default None" not in text and "PROBE_DEFAULTS" not in text and "docstring" not in text, text
    assert "30 on raw ones" in entries["--lr"] and "0.005 linear" in entries["--backbone-lr"]
    assert "rdevon/DIM's 50,100" in entries["--milestones"]


def test_docstring_and_help_describe_the_code_as_it_is():
    """main_lincls.py is named as the source of its own protocol only; the MLP schedule is cited as the official
    one; no issue numbers or history."""
    doc = " ".join(eval_linear.__doc__.split())
    assert "--no-standardize is main_lincls.py exactly" not in doc and "the paper gives none" not in doc
    assert "classification_eval.py" in doc and "MultiStepLR(milestones=[50, 100], gamma=0.1)" in doc
    assert "--protocol main_lincls" in doc and "chosen on the test set" in doc
    words = doc + " ".join(help_entries().values())
    assert not re.search(r"#\d|\bissue\b|used to|no longer|previously|before 20\d\d", words)
    assert "main_lincls.py" not in help_entries()["--standardize"].split("(default")[0]


def test_no_checkpoint_given_is_one_line():
    p = in_process(eval_linear.main)
    assert p.returncode == 2 and p.stderr.startswith("error: give --pretrained CHECKPOINT") and \
        p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize("name", ["moco", "dim", "eval_linear", "study", "convert", "plot"])
def test_help_description_is_a_whole_sentence(name):
    """--help's description (the docstring's first line) is a whole sentence, not one cut at the line's end."""
    import importlib
    p = in_process(importlib.import_module(name).main, "--help")
    description = " ".join(p.stdout.split("\n\n")[1].split())  # argparse wraps it at the terminal's width
    assert p.returncode == 0 and description.endswith(".") and description.count(". ") == 0, description
