"""--tensorboard: the values of metrics.jsonl as TensorBoard scalars in OUT/tb, read back with TensorBoard's own
reader (tensorboard is in requirements.txt, so this runs wherever the README's set-up ran); a resumed run's curves
go on without repeated steps; without the package the flag is one line."""
import json
import os
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dim
import moco
from conftest import in_process

TINY = ["--batch-size", "16", "--workers", "0", "--device", "cpu", "--log-every", "1", "--tensorboard"]


def events(out):
    """{tag: [(step, value)]} of OUT/tb as TensorBoard shows it (its reader, orphaned steps purged)."""
    acc = EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logged(out):
    """{key: [(step, value)]} of OUT/metrics.jsonl's numbers (what TensorBoard gets; not --fused auto's word)."""
    got = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        m = json.loads(line)
        for k, v in m.items():
            if k != "step" and isinstance(v, (int, float)):
                got.setdefault(k, []).append((m["step"], v))
    return got


def assert_same(out):
    ev, js = events(out), logged(out)
    assert set(ev) == set(js) and {"loss", "lr", "img_s", "time_s"} <= set(ev), (sorted(ev), sorted(js))
    for tag, pts in js.items():
        assert [s for s, _ in ev[tag]] == [s for s, _ in pts], tag  # each step once, in order
        assert [v for _, v in ev[tag]] == pytest.approx([v for _, v in pts], rel=1e-6, abs=1e-30), tag  # float32
    return ev


def test_moco_resumed_curves_continue_without_repeats(image_folder, tmp_path):
    """A run to step 2, resumed to step 4; then its step-4 checkpoint replaced by the step-2 one (a run killed after
    logging steps 3-4, before their checkpoint) and resumed with another --lr to step 5: TensorBoard shows steps
    1-5 once each, 3-5 the last run's (lr 0.01), exactly the lines metrics.jsonl keeps."""
    out = tmp_path / "run"
    flags = ["--data", image_folder, "--out", out, "--moco-k", "32", "--bn-splits", "1", "--knn-every", "1", *TINY]
    in_process(moco.main, *flags, "--max-steps", "2", check=True)
    shutil.copy(out / "ckpt.pt", tmp_path / "step2.pt")
    in_process(moco.main, *flags, "--max-steps", "4", "--resume", "auto", check=True)
    assert [s for s, _ in events(out)["loss"]] == [1, 2, 3, 4]
    shutil.copy(tmp_path / "step2.pt", out / "ckpt.pt")
    in_process(moco.main, *flags, "--max-steps", "5", "--resume", "auto", "--lr", "0.01", check=True)
    ev = assert_same(out)
    assert [s for s, _ in ev["loss"]] == [1, 2, 3, 4, 5] and [s for s, _ in ev["knn_top1"]] == [2, 5]
    assert [v for _, v in ev["lr"]] == pytest.approx([0.06, 0.06, 0.01, 0.01, 0.01])


def test_dim_writes_the_same_values(tmp_path):
    out = tmp_path / "dim"
    in_process(dim.main, "--out", out, "--mi-units", "32", "--max-steps", "3", "--knn-every", "0", *TINY, check=True)
    ev = assert_same(out)
    assert {"local", "prior", "d_acc"} <= set(ev) and [s for s, _ in ev["loss"]] == [1, 2, 3]


def test_fresh_run_with_overwrite_starts_clean(image_folder, tmp_path):
    """--overwrite in a folder that holds another run's events: TensorBoard shows only the new run's."""
    out = tmp_path / "run"
    flags = ["--data", image_folder, "--out", out, "--moco-k", "32", "--bn-splits", "1", "--knn-every", "0", *TINY]
    in_process(moco.main, *flags, "--max-steps", "3", check=True)
    in_process(moco.main, *flags, "--max-steps", "2", "--overwrite", "--lr", "0.02", check=True)
    ev = assert_same(out)
    assert ev["lr"] == [(1, pytest.approx(0.02)), (2, pytest.approx(0.02))]


def test_without_the_package_the_flag_is_one_line(image_folder, tmp_path, monkeypatch):
    """The package is imported only with --tensorboard; without it the run stops before any work, in one line."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    p = in_process(moco.main, "--data", image_folder, "--out", tmp_path / "o", "--max-steps", "1", *TINY)
    assert p.returncode == 2 and p.stderr == "error: --tensorboard needs the tensorboard package: pip install " \
                                             "tensorboard\n", p.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")
    p = in_process(moco.main, "--data", image_folder, "--out", tmp_path / "p", "--max-steps", "1", "--moco-k", "32",
                   "--bn-splits", "1", "--knn-every", "0", *TINY[:-1])
    assert p.returncode == 0, p.stderr  # without the flag nothing asks for it
