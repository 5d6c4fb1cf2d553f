"""Data conventions end to end: unlabeled images (STL-10), the kNN monitor shared by all ranks, image folders
with ImageFolder's conventions (Tiny ImageNet's layout)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import dim
import eval_linear
import moco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = [moco.read_idx(os.path.join(ROOT, "data", f"t10k-{k}-ubyte.gz")) for k in ("images-idx3", "labels-idx1")]


def run(main, argv, capsys):
    """main(argv) in this process -> (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def fashion_rgb(idx, size):
    """Built-in Fashion-MNIST images idx as uint8 RGB (len, size, size, 3), resized, so that classes differ."""
    return np.stack([np.asarray(Image.fromarray(FASHION[0][i]).resize((size, size)).convert("RGB")) for i in idx])


# ----------------------------------------------------------------------------------------------------
# STL-10: 'train+unlabeled' has label -1 on its 100,000 unlabeled images
# ----------------------------------------------------------------------------------------------------
class FakeSTL10:
    """torchvision.datasets.STL10's fields: .data uint8 [N, 3, 96, 96], .labels int (-1 = unlabeled); 'train'
    holds LABELLED images of 4 classes, 'train+unlabeled' adds UNLABELED ones, 'test' holds TEST images."""
    LABELLED, UNLABELED, TEST = 24, 40, 16

    def __init__(self, root, split="train", folds=None, transform=None, target_transform=None, download=False):
        n_lab = {"train": self.LABELLED, "train+unlabeled": self.LABELLED, "unlabeled": 0, "test": self.TEST}[split]
        n_unl = self.UNLABELED if split in ("train+unlabeled", "unlabeled") else 0
        lo = 0 if split != "test" else 1000
        idx = np.flatnonzero(FASHION[1] < 4)[lo:lo + n_lab + n_unl]  # built-in images of classes 0-3
        self.data = fashion_rgb(idx, 96).transpose(0, 3, 1, 2).copy()  # (N, 3, 96, 96)
        self.labels = np.concatenate([FASHION[1][idx[:n_lab]], -np.ones(n_unl)]).astype(np.int64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):  # as torchvision: a PIL image and an int
        return Image.fromarray(np.transpose(self.data[i], (1, 2, 0))), int(self.labels[i])


@pytest.fixture
def stl10(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10)
    root = tmp_path / "stl10"
    root.mkdir()
    return root


MOCO = ["--arch", "basic32", "--image-size", 32, "--batch-size", 16, "--moco-k", 32, "--bn-splits", 1,
        "--epochs", 1, "--workers", 0, "--knn-every", 1, "--log-every", 2, "--device", "cpu", "--fused", "off"]
DIM = ["--arch", "basic32", "--image-size", 32, "--batch-size", 16, "--mi-units", 32, "--epochs", 1, "--workers", 0,
       "--knn-every", 1, "--log-every", 2, "--device", "cpu"]
PROBE = ["--epochs", 2, "--workers", 0, "--device", "cpu"]


@pytest.mark.parametrize("script", ["moco", "dim"])
def test_stl10_pretrains_on_every_image_and_probes_labelled_ones(script, stl10, tmp_path, capsys):
    """--dataset stl10: pretraining draws from all 64 images of 'train+unlabeled', the kNN monitor after the epoch
    and eval_linear's probe and kNN use the 24 labelled ones (label -1 used to crash the monitor)."""
    out = tmp_path / "run"
    main, flags = (moco.main, MOCO) if script == "moco" else (dim.main, DIM + ["--gpu-aug", "on"])
    code, log, err = run(main, flags + ["--dataset", "stl10", "--data", stl10, "--out", out], capsys)
    assert code == 0, err
    assert "data: 64 images pretrain (24 labelled: the kNN bank)" in log, log
    lines = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert lines[-1]["step"] == 4 and lines[-1]["knn_s"] > 0, lines[-1]
    hits = lines[-1]["knn_top1"] * FakeSTL10.TEST / 100  # the test set's labelled images only: a whole number of them
    assert abs(hits - round(hits)) < 1e-3, lines[-1]  # float32 means: not exact
    layer = ["--layer", "fc"] if script == "dim" else []
    code, log, err = run(eval_linear.main, PROBE + layer + ["--pretrained", out / "ckpt.pt", "--out", out / "e.json"],
                         capsys)
    assert code == 0, err
    res = json.load(open(out / "e.json"))
    assert res["n_train"] == FakeSTL10.LABELLED and res["n_test"] == FakeSTL10.TEST, res
    assert "24 train / 16 test images" in log


def test_no_labelled_image_is_one_line_where_it_matters(stl10, tmp_path, capsys, monkeypatch):
    """No labelled image in the bank: the kNN monitor stops before training in one line; with --knn-every 0 the
    run trains; eval_linear stops in one line (a probe needs labels)."""
    monkeypatch.setattr(FakeSTL10, "LABELLED", 0)
    out = tmp_path / "run"
    code, log, err = run(moco.main, MOCO + ["--dataset", "stl10", "--data", stl10, "--out", out], capsys)
    assert code == 2 and "no labelled images" in err and "--knn-every 0" in err and err.count("\n") == 1, err
    assert not (out / "ckpt.pt").exists()
    code, log, err = run(moco.main, MOCO + ["--dataset", "stl10", "--data", stl10, "--out", out, "--knn-every", 0],
                         capsys)
    assert code == 0 and "done: 2 steps" in log, err
    code, log, err = run(eval_linear.main, PROBE + ["--pretrained", out / "ckpt.pt", "--out", out / "e.json"], capsys)
    assert code == 2 and "no labelled images" in err and err.count("\n") == 1, err


def test_labelled_keeps_order_and_subsets_compose():
    data = moco.ArrayData(np.zeros((6, 4, 4), np.uint8), [3, -1, 0, -1, -1, 2])
    lab = moco.labelled(data, "bank", "")
    assert len(lab) == 3 and moco.targets(lab) == [3, 0, 2] and [lab[i][1] for i in range(3)] == [3, 0, 2]
    assert moco.labelled(lab, "bank", "") is lab  # nothing to drop: the same object
    with pytest.raises(moco.UserError, match="the bank has no labelled images"):
        moco.labelled(moco.ArrayData(np.zeros((2, 4, 4), np.uint8), [-1, -1]), "the bank", "")


# ----------------------------------------------------------------------------------------------------
# The kNN monitor under torchrun: every rank encodes its share
# ----------------------------------------------------------------------------------------------------
def torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "tests", "ddp_moco.py")]
    r = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def train_val_folder(tmp_path_factory):
    """ROOT/train/<class>/*.png (3 x 36) and ROOT/val/<class>/*.png (3 x 30) from the built-in images."""
    root = tmp_path_factory.mktemp("trainval")
    for split, lo, n in (("train", 0, 36), ("val", 36, 30)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(FASHION[1] == c)[lo:lo + n]):
                Image.fromarray(FASHION[0][i]).save(d / f"{j:03d}.png")
    return root


def moco_knn_one_process(ckpt_path, data):
    """The kNN monitor's number for a moco.py checkpoint's encoder_q, in this (single) process."""
    ck = moco.load_checkpoint(ckpt_path, "moco")
    a = moco.Args(**ck["args"])
    enc = moco.build_encoder(a.arch, a.stem, a.bn_splits, num_classes=a.moco_dim)
    enc.load_state_dict({k[len("encoder_q."):]: v for k, v in ck["model"].items() if k.startswith("encoder_q.")})
    train, test, stats = moco.load_data(moco.Args(data=str(data)))
    tf = moco.test_transform(a.image_size, stats)
    return moco.knn_accuracy(enc.eval(), moco.labelled(train, "bank", ""), moco.labelled(test, "test", ""), tf, 0,
                             torch.device("cpu"))


@pytest.mark.slow
def test_knn_monitor_is_shared_by_two_ranks(train_val_folder, tmp_path):
    """2 ranks (gloo): each encodes its contiguous half of the bank (108) and of the test set (90); the logged kNN
    top-1 (after the last epoch, i.e. on the checkpoint's weights, with rank 0's BN statistics) equals one
    process's on the checkpoint; the monitor's seconds are in the log line and in metrics.jsonl."""
    out = tmp_path / "ddp"
    log = torchrun(["train", out, "--data", train_val_folder, "--max-steps", 3, "--epochs", 1, "--batch-size", 32,
                    "--moco-k", 64, "--bn-splits", 2, "--workers", 0, "--knn-every", 1, "--log-every", 1,
                    "--image-size", 32, "--device", "cpu"], port=29561)
    assert "done: 3 steps" in log
    counts = [json.load(open(out / f"extract_rank{r}.json")) for r in (0, 1)]
    assert counts == [[54, 45], [54, 45]], counts
    knn = [json.loads(s) for s in open(out / "metrics.jsonl") if "knn_top1" in s]
    assert len(knn) == 1 and knn[0]["step"] == 3 and knn[0]["knn_s"] > 0, knn
    assert f"epoch 1 kNN top-1 (head) {knn[0]['knn_top1']:.2f} (" in log
    assert knn[0]["knn_top1"] == moco_knn_one_process(out / "ckpt.pt", train_val_folder)


@pytest.mark.slow
def test_dim_knn_monitor_on_two_ranks(train_val_folder, tmp_path):
    out = tmp_path / "dim"
    log = torchrun(["dim", out, "--data", train_val_folder, "--max-steps", 3, "--epochs", 1, "--batch-size", 32,
                    "--mi-units", 32, "--workers", 0, "--knn-every", 1, "--log-every", 1, "--device", "cpu"],
                   port=29562)
    assert "done: 3 steps" in log and "kNN top-1 (fc)" in log
    assert [json.load(open(out / f"extract_rank{r}.json")) for r in (0, 1)] == [[54, 45], [54, 45]]


def test_extract_all_shares_and_gathers_in_order(monkeypatch):
    """extract_all on 'rank r of 3' encodes images r*M//3 .. (r+1)*M//3 - 1 (M = 7: 2, 2, 3 images)."""
    data = moco.ArrayData(np.arange(7, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2), list(range(7)))
    tf = lambda img: torch.tensor(np.asarray(img), dtype=torch.float32)[:1, :1, 0]  # (1, 1): the pixel value
    seen = []
    for r in range(3):
        monkeypatch.setattr(moco, "world_info", lambda: (r, 3))
        monkeypatch.setattr(moco.dist, "all_gather", lambda out, t: seen.append(t.clone()))
        moco.extract_all(lambda x: x, data, tf, 0, torch.device("cpu"))
    labels = [t.tolist() for t in seen if t.dim() == 1]
    assert labels == [[0, 1, -1], [2, 3, -1], [4, 5, 6]], labels  # padded to the largest share


# ----------------------------------------------------------------------------------------------------
# Image folders: torchvision ImageFolder's conventions
# ----------------------------------------------------------------------------------------------------
WNIDS = ["n01443537", "n01629819", "n01641577"]


@pytest.fixture
def tiny_imagenet(tmp_path):
    """Tiny ImageNet's layout: train/<wnid>/images/*.JPEG + <wnid>_boxes.txt, val/images/*.JPEG +
    val_annotations.txt, test/images/*.JPEG, wnids.txt; and a hidden folder, which is not a class."""
    root = tmp_path / "tiny-imagenet-200"
    y = FASHION[1]
    for c, w in enumerate(WNIDS):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j, img in enumerate(fashion_rgb(np.flatnonzero(y == c)[:12], 64)):
            Image.fromarray(img).save(d / f"{w}_{j}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{j}.JPEG\t0\t0\t63\t63\n" for j in range(12)))
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    ann = []
    for j, i in enumerate(np.flatnonzero(y < 3)[100:109]):
        Image.fromarray(fashion_rgb([i], 64)[0]).save(root / "val" / "images" / f"val_{j}.JPEG")
        ann.append(f"val_{j}.JPEG\t{WNIDS[y[i]]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(ann))
    Image.fromarray(fashion_rgb([0], 64)[0]).save(root / "test" / "images" / "test_0.JPEG")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return root


def test_tiny_imagenet_layout_trains(tiny_imagenet, tmp_path, capsys):
    """Classes = train's wnid folders, images found recursively; val/images with val_annotations.txt is the test
    split, labelled by train's class names; every training image pretrains."""
    train, test, stats = moco.load_data(moco.Args(data=str(tiny_imagenet)))
    assert "note" not in capsys.readouterr().out
    assert isinstance(train, torchvision.datasets.DatasetFolder) and len(train) == 36
    assert train.class_to_idx == {w: c for c, w in enumerate(WNIDS)}
    assert all(p.endswith(".JPEG") and f"/train/{WNIDS[c]}/images/" in p for p, c in train.samples)
    y = FASHION[1][np.flatnonzero(FASHION[1] < 3)[100:109]]  # the annotations' classes, val_0 ... val_8
    assert [os.path.basename(p) for p, _ in test.samples] == [f"val_{j}.JPEG" for j in range(9)]
    assert moco.targets(test) == y.tolist() and np.asarray(test[0][0]).shape == (64, 64, 3)
    code, log, err = run(moco.main, MOCO + ["--data", tiny_imagenet, "--out", tmp_path / "run"], capsys)
    assert code == 0 and "done: 2 steps" in log and "data: 36 images pretrain, " in log, err


def imagenet_flat_val(tiny_imagenet):
    """Kaggle's ImageNet layout from the Tiny ImageNet folder: ILSVRC/Data/CLS-LOC/{train,val}, val/ a flat folder
    of JPEGs, LOC_val_solution.csv three folders above CLS-LOC (ImageId,PredictionString: the wnid first, boxes)."""
    import shutil
    top = tiny_imagenet.parent / "imagenet"
    cls_loc = top / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(tiny_imagenet / "train", cls_loc / "train")
    (cls_loc / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for line in (tiny_imagenet / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        image_id = "ILSVRC2012_val_" + name.removeprefix("val_").removesuffix(".JPEG").zfill(8)
        shutil.copy(tiny_imagenet / "val" / "images" / name, cls_loc / "val" / f"{image_id}.JPEG")
        rows.append(f"{image_id},{wnid} 1 2 60 61 {wnid} 3 4 50 51")
    (top / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return cls_loc


def test_imagenet_flat_val_with_loc_val_solution(tiny_imagenet, capsys):
    """ImageNet's val as most downloads have it (flat JPEGs, labels in LOC_val_solution.csv) is the test split."""
    train, test, _ = moco.load_data(moco.Args(data=str(imagenet_flat_val(tiny_imagenet))))
    ref = moco.load_data(moco.Args(data=str(tiny_imagenet)))[1]
    assert len(train) == 36 and len(test) == 9 and moco.targets(test) == moco.targets(ref)
    assert [os.path.basename(p) for p, _ in test.samples] == [f"ILSVRC2012_val_{j:08d}.JPEG" for j in range(9)]
    assert np.array_equal(np.asarray(test[4][0]), np.asarray(ref[4][0])) and "note" not in capsys.readouterr().out


def flat_folder(image_folder, tmp_path):
    """conftest's image folder (3 classes x 40) as ROOT/train, with an unusable val/ (a flat folder, no labels)."""
    import shutil
    root = tmp_path / "flat"
    shutil.copytree(image_folder, root / "train")
    (root / "val").mkdir()
    shutil.copy(root / "train" / "class0" / "000.png", root / "val" / "a.png")
    return root


@pytest.mark.parametrize("knn, holdout, logged", [
    ("0", "10", "data: 120 images pretrain, "),
    ("1", "10", "data: 108 images pretrain, 12 held out as the kNN monitor's test set (every 10th), "),
    ("1", "4", "data: 90 images pretrain, 30 held out as the kNN monitor's test set (every 4th), "),
    ("1", "0", None)])
def test_every_image_pretrains_unless_the_monitor_needs_a_test_split(knn, holdout, logged, image_folder, tmp_path,
                                                                    capsys):
    """A folder without a usable val split: images are held out only while the kNN monitor runs, as many as
    --holdout-every says, and the log says how many pretrain; the unusable val gets a note. The monitor with nothing
    held out has no test set: one line."""
    code, log, err = run(moco.main, ["--data", flat_folder(image_folder, tmp_path), "--out", tmp_path / "o",
                                     "--batch-size", "16", "--moco-k", "32", "--bn-splits", "1", "--workers", "0",
                                     "--max-steps", "1", "--device", "cpu", "--knn-every", knn,
                                     "--holdout-every", holdout], capsys)
    if logged is None:
        assert code == 2 and err.count("\n") == 1 and "kNN" in err, err
        return
    assert code == 0 and logged in log and "a.png" not in log, err
    assert "note: " in log and "val: no class folders" in log and ("held out" in log) == (knn == "1")
    assert json.load(open(tmp_path / "o" / "args.json"))["holdout_every"] == int(holdout)


def test_unusable_val_stops_main_lincls(image_folder, moco_ckpt, tmp_path, capsys):
    """eval_linear.py --protocol main_lincls never tests on held-out training images: a val split it cannot read
    stops it in one line; --protocol ours holds out every 10th image instead, with notes."""
    data = flat_folder(image_folder, tmp_path)
    code, _, err = run(eval_linear.main, ["--pretrained", moco_ckpt, "--data", data, "--protocol", "main_lincls",
                                          "--epochs", "1", "--workers", "0", "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: --protocol main_lincls: no usable test split: ") and \
        "val: no class folders" in err and err.count("\n") == 1, err
    train, test, _ = eval_linear.datasets(eval_linear.parse_args(["--pretrained", moco_ckpt, "--data", str(data)]),
                                          {"data": "", "dataset": "folder"})[:3]
    assert (len(train), len(test)) == (108, 12)


def test_val_folder_labelled_by_train_class_names(tiny_imagenet, capsys):
    """A val folder with class folders is labelled by train's class names: a val missing a class must not shift
    the labels of the others (val/<wnid1> is class 1, not 0)."""
    import shutil
    shutil.rmtree(tiny_imagenet / "val")
    for c in (1, 2):
        d = tiny_imagenet / "val" / WNIDS[c]
        d.mkdir(parents=True)
        Image.fromarray(fashion_rgb([c], 64)[0]).save(d / "a.JPEG")
    train, test, _ = moco.load_data(moco.Args(data=str(tiny_imagenet)))
    assert len(train) == 36 and moco.targets(test) == [1, 2] and "note" not in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no_classes", "has no class folders"),
    ("empty_class", "has no images"),
    ("bad_image", "bad.JPEG"),
])
def test_folder_errors_are_one_line(case, message, tiny_imagenet, tmp_path, capsys):
    if case == "no_classes":
        data = tmp_path / "flat"
        data.mkdir()
        Image.fromarray(fashion_rgb([0], 64)[0]).save(data / "a.JPEG")
    elif case == "empty_class":
        data = tiny_imagenet
        (data / "train" / "n99999999" / "images").mkdir(parents=True)  # a class whose folders hold no image
        (data / "train" / "n99999999" / "n99999999_boxes.txt").write_text("")
    else:
        data = tiny_imagenet
        (data / "train" / WNIDS[0] / "images" / "bad.JPEG").write_bytes(b"not an image")
    for main, flags in ((moco.main, MOCO), (dim.main, DIM)):
        code, _, err = run(main, flags + ["--data", data, "--out", tmp_path / "o"], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
