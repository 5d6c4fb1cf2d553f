"""eval_linear.py's semi-supervised protocols: --finetune (the whole encoder trains with the head, the sanity check
inverted) and the class-balanced labelled subset (--label-fraction / --labels-per-class). A tiny moco.py checkpoint
on the 3-class image folder of conftest.py (108 training / 12 test images), probes of 1 epoch."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import eval_linear
import moco
from conftest import whole

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--epochs", "1", "--workers", "0", "--device", "cpu", "--batch-size", "16"]


@pytest.fixture
def ckpt(moco_ckpt):
    return moco_ckpt


def evaluate(ckpt, out, *flags, spy=None):
    """eval_linear.main on the checkpoint -> the result JSON; `spy` (a list) receives the encoder it trained."""
    argv = ["--pretrained", ckpt, "--out", str(out), *QUICK, *map(str, flags)]
    if spy is None:
        eval_linear.main(argv)
    else:
        load = eval_linear.load_encoder

        def keep(args):
            enc, info = load(args)
            spy.append(enc)
            return enc, info
        eval_linear.load_encoder = keep
        try:
            eval_linear.main(argv)
        finally:
            eval_linear.load_encoder = load
    return json.load(open(out))


def fresh_encoder(ckpt):
    return eval_linear.load_encoder(eval_linear.parse_args(["--pretrained", ckpt]))[0]


# ----------------------------------------------------------------------------------------------------
# The labelled subset
# ----------------------------------------------------------------------------------------------------
def test_label_subset_is_class_balanced_and_drawn_by_seed():
    """Per class round(F * n_c), at least 1, or min(N, n_c), counted by hand on unbalanced classes; the same seed
    draws the same subset, another seed another one."""
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 26
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1)).tolist()
    labels = [labels[i] for i in order]  # classes interleaved, as in a real split
    for flags, want in [(dict(label_fraction=0.3), {0: 3, 1: 1, 2: 1, 3: 8}),
                        (dict(labels_per_class=5), {0: 5, 1: 3, 2: 1, 3: 5}),
                        (dict(label_fraction=1.0), {0: 10, 1: 3, 2: 1, 3: 26})]:
        a = eval_linear.Args(seed=0, **flags)
        idx = eval_linear.label_subset(labels, a)
        assert len(set(idx)) == len(idx) and idx == sorted(idx)
        assert Counter(labels[i] for i in idx) == want, flags
        assert eval_linear.label_subset(labels, a) == idx
    a0, a1 = (eval_linear.Args(seed=s, label_fraction=0.3) for s in (0, 1))
    assert eval_linear.label_subset(labels, a0) != eval_linear.label_subset(labels, a1)


def test_label_idx_recorded_and_used(ckpt, tmp_path, image_folder):
    """The JSON's label_idx: 9 of each class's 36 training images (round(0.25 * 36)), the images the probe trained
    on (n_train), the same for the same --seed and different for another."""
    train, _, _ = moco.load_data(moco.Args(data=image_folder, dataset="folder"))
    r0 = evaluate(ckpt, tmp_path / "s0.json", "--label-fraction", 0.25, "--seed", 0)
    again = evaluate(ckpt, tmp_path / "s0b.json", "--label-fraction", 0.25, "--seed", 0)
    r1 = evaluate(ckpt, tmp_path / "s1.json", "--label-fraction", 0.25, "--seed", 1)
    assert Counter(moco.targets(train)[i] for i in r0["label_idx"]) == {0: 9, 1: 9, 2: 9}
    assert r0["n_train"] == len(r0["label_idx"]) == 27 and r0["label_fraction"] == 0.25
    assert again["label_idx"] == r0["label_idx"] and r1["label_idx"] != r0["label_idx"]
    full = evaluate(ckpt, tmp_path / "full.json")
    assert full["label_idx"] is None and full["n_train"] == 108


def test_label_subset_skips_unlabelled_images():
    """Unlabelled images (label -1, STL-10's) are never drawn; the positions are those of the split as loaded."""
    labels = [-1, 0, -1, 1, 0, -1, 1, 0, 1, -1]
    assert eval_linear.label_subset(labels, eval_linear.Args(labels_per_class=10)) == [1, 3, 4, 6, 7, 8]
    assert eval_linear.label_subset(labels, eval_linear.Args(label_fraction=0.01)) in (
        [a, b] for a in (1, 4, 7) for b in (3, 6, 8))


# ----------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------
def test_finetune_changes_the_backbone_and_the_probe_does_not(ckpt, tmp_path):
    """The encoder eval_linear trained, compared with a fresh copy of the checkpoint's: every tensor the same
    after the frozen probe; weights and BN statistics moved after --finetune, whose lrs the JSON records."""
    frozen, tuned = [], []
    r = evaluate(ckpt, tmp_path / "frozen.json", spy=frozen)
    assert r["finetune"] is False and r["backbone_lr"] is None
    ref = fresh_encoder(ckpt).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in frozen[0].state_dict().items())
    r = evaluate(ckpt, tmp_path / "tuned.json", "--finetune", "--labels-per-class", 20, spy=tuned)
    assert r["finetune"] is True and r["lr"] == 0.1 and r["backbone_lr"] == pytest.approx(0.05 * 0.1)
    assert r["n_train"] == 60 and whole(r["top1"], r["n_test"])
    state = tuned[0].state_dict()
    moved = {k for k, v in state.items() if not torch.equal(v, ref[k])}
    weights = {k for k, _ in tuned[0].named_parameters()}
    assert moved & weights and any("running_mean" in k for k in moved)


def test_finetune_lrs_are_not_the_raw_probes(ckpt, tmp_path):
    """--finetune --no-standardize: the head at 0.1 and the backbone at 0.005 (0.05 x 0.1), not lr 30 and 1.5; its
    schedule follows --epochs (10 epochs: x0.1 at 6 and 8); top-1 only after the last epoch (no per-epoch one)."""
    a = eval_linear.parse_args(["--pretrained", ckpt, "--finetune", "--no-standardize", "--epochs", "10"])
    assert a.lr == 0.1 and a.backbone_lr == pytest.approx(0.005) and a.milestones == "6,8"
    r = evaluate(ckpt, tmp_path / "raw.json", "--finetune", "--no-standardize", "--labels-per-class", 20)
    assert r["lr"] == 0.1 and r["backbone_lr"] == pytest.approx(0.005) and not r["standardize"]
    assert r["top1_best"] is None and r["top1_best_epoch"] is None and whole(r["top1"], r["n_test"])
    assert [e["images"] for e in r["per_epoch"]] == [48] and "top1" not in r["per_epoch"][0]  # 3 full batches of 16


def test_inverted_sanity_check_raises_when_the_backbone_does_not_change(ckpt, tmp_path):
    """--backbone-lr 0: BN statistics still move (train mode), but no weight does, and the check says so."""
    with pytest.raises(RuntimeError, match="no backbone weight changed"):
        evaluate(ckpt, tmp_path / "zero.json", "--finetune", "--backbone-lr", 0)
    assert not os.path.exists(tmp_path / "zero.json")


def test_finetune_mlp_with_crops(ckpt, tmp_path):
    """The MLP probe fine-tunes too, on RandomResizedCrop views (--aug crop)."""
    r = evaluate(ckpt, tmp_path / "mlp.json", "--finetune", "--probe", "mlp", "--aug", "crop")
    assert r["aug"] == "crop" and r["backbone_lr"] == pytest.approx(0.05 * 1e-4)


@pytest.mark.parametrize("flags, msg", [
    (["--label-fraction", "0"], "--label-fraction 0.0 must be in (0, 1]"),
    (["--label-fraction", "-0.5"], "must be in (0, 1]"),
    (["--label-fraction", "1.01"], "must be in (0, 1]"),
    (["--labels-per-class", "0"], "--labels-per-class 0 must be >= 1"),
    (["--label-fraction", "0.5", "--labels-per-class", "2"], "not both"),
    (["--backbone-lr", "0.01"], "--backbone-lr is for --finetune"),
    (["--finetune", "--backbone-lr", "-1"], "must be >= 0"),
    (["--finetune", "--labels-per-class", "2"], "fewer than one --batch-size 16"),  # drop_last: no step at all
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--milestones", "6;8"], "expected epochs separated by commas"),
])
def test_nonsense_values_stop_in_one_line(ckpt, tmp_path, capsys, flags, msg):
    with pytest.raises(SystemExit) as e:
        evaluate(ckpt, tmp_path / "bad.json", *flags)
    out = capsys.readouterr()
    assert e.value.code == 2 and msg in out.err and len(out.err.strip().splitlines()) == 1
    assert "features:" not in out.out  # before any feature extraction


RANKS = """import os, sys, torch
sys.path.insert(0, {root!r})
import eval_linear
load, seen = eval_linear.load_encoder, []
eval_linear.load_encoder = lambda a: (lambda r: seen.append(r[0]) or r)(load(a))
eval_linear.main(sys.argv[1:])
torch.save(seen[0].state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


@pytest.mark.slow
def test_finetune_under_torchrun(ckpt, tmp_path):
    """Two ranks, each fine-tuning on its share of every batch: backbone + head in DDP, so that both end with the
    same encoder (weights by averaged gradients, BN statistics broadcast from rank 0), which moved; one JSON."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS.format(root=ROOT, out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
                        str(script), "--pretrained", ckpt, "--out", str(tmp_path / "two.json"), *QUICK,
                        "--finetune", "--labels-per-class", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    assert two["finetune"] and two["n_train"] == 60 and "sanity check passed" in r.stdout
    s0, s1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    ref = fresh_encoder(ckpt).state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0) and any(not torch.equal(s0[k], ref[k]) for k in s0)
