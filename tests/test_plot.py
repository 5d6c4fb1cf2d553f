"""Tests for plot.py: reading metrics.jsonl (each step once, the last line kept), the PNG, the one-line errors."""
import json
import os
import subprocess
import sys

import pytest

import plot
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def moco_line(step, loss, lr=0.06):
    """A training line as moco.py's Run.fit logs it."""
    return {"step": step, "epoch": step / 10, "loss": loss, "acc1": 100 - 10 * loss, "acc5": 100.0, "lr": lr,
            "img_s": 500.0, "data_wait": 0.1, "time_s": step * 0.5}


def dim_line(step, loss, d_acc=None):
    """dim.py's: the prior off logs d_loss = d_acc = 0."""
    return {"step": step, "epoch": step / 10, "loss": loss, "local": loss, "global": 0.0, "prior": 0.5,
            "d_loss": 1.3 if d_acc is not None else 0.0, "d_acc": d_acc or 0.0, "lr": 1e-4, "img_s": 300.0,
            "data_wait": 0.2, "time_s": step * 0.7}


def knn_line(step, top1):
    return {"step": step, "epoch": step / 10, "knn_top1": top1, "knn_s": 1.5}


def write_run(folder, lines, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in lines) + tail)
    return str(folder)


def resumed_run(folder):
    """Steps 1-6 and kNN at 6, killed; resumed from the checkpoint at step 4: steps 5-8 again, kNN at 6 and 8; the
    last line cut short by a kill."""
    first = [moco_line(s, 5.0 - 0.1 * s) for s in range(1, 7)] + [knn_line(6, 40.0)]
    again = [moco_line(s, 1.0 - 0.1 * s) for s in range(5, 9)] + [knn_line(6, 45.0), knn_line(8, 50.0)]
    again.insert(2, again.pop())  # the kNN lines between the training lines, as they are logged
    return write_run(folder, first + again, tail='{"step": 9, "epoch": 0.9, "lo')


def test_read_metrics_keeps_the_last_line_of_each_step(tmp_path):
    path, train, knn, notes = plot.read_metrics(resumed_run(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in train] == list(range(1, 9))  # sorted, each step once
    assert [m["loss"] for m in train] == pytest.approx([4.9, 4.8, 4.7, 4.6, 0.5, 0.4, 0.3, 0.2])  # 5-8: the resumed
    assert [(m["step"], m["knn_top1"]) for m in knn] == [(6, 45.0), (8, 50.0)]  # step 6: training and kNN lines
    assert notes == ["3 repeated steps (a resumed run, or two runs in one folder): kept the last line of each",
                     "skipped 1 lines that are not JSON objects with a step"]
    assert plot.read_metrics(path)[1:] == (train, knn, notes)  # RUN given as its metrics.jsonl


def test_plot_overlays_runs(tmp_path):
    moco_run = resumed_run(tmp_path / "moco-run")
    dim_run = write_run(tmp_path / "dim-run", [dim_line(s, -s / 10, d_acc=60.0 + s) for s in range(2, 12, 2)]
                        + [knn_line(10, 55.0)])
    no_prior = write_run(tmp_path / "dim-no-prior", [dim_line(s, -s / 10) for s in (1, 2)])
    runs = [(name, *plot.read_metrics(r)[1:3]) for name, r in
            (("moco-run", moco_run), ("dim-run", dim_run), ("dim-no-prior", no_prior))]
    fig = plot.plot(runs, str(tmp_path / "c.png"))
    loss, acc, lr, knn = fig.axes
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["moco-run", "dim-run", "dim-no-prior"]
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["moco-run", "dim-run (prior D)"]
    assert list(acc.lines[1].get_xdata()) == [2, 4, 6, 8, 10] and list(acc.lines[1].get_ydata()) == [62, 64, 66, 68, 70]
    assert list(knn.lines[0].get_xdata()) == [6, 8] and list(knn.lines[1].get_ydata()) == [55.0]
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG

    p = in_process(plot.main, moco_run, dim_run, "--out", tmp_path / "two.png", check=True)
    assert p.stdout.splitlines()[-1] == f"wrote {tmp_path / 'two.png'}: 2 runs, 13 training and 3 kNN points"
    assert "kept the last line of each" in p.stdout
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "two.png")  # a PNG matplotlib reads back
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500


def test_command_line(tmp_path):
    run = resumed_run(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), os.path.join(run, "metrics.jsonl")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("wrote curves.png: 1 run, 8 training and 2 kNN points\n"), r.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("case", ["no-folder", "no-metrics", "empty", "no-lines", "unwritable", "no-run"])
def test_user_errors(tmp_path, case):
    run, words = tmp_path / "run", {"no-folder": "no such folder", "no-metrics": "has no metrics.jsonl",
                                    "empty": "is empty", "no-lines": "no metric lines", "unwritable": "cannot write",
                                    "no-run": "required"}[case]
    if case == "no-metrics":
        run.mkdir()
    elif case == "empty":
        write_run(run, [], tail="\n")
    elif case == "no-lines":
        write_run(run, [], tail='[1, 2]\n{"loss": 1.0}\nnot json\n')
    elif case == "unwritable":
        write_run(run, [moco_line(1, 1.0)])
    out = tmp_path / ("no_such_folder/c.png" if case == "unwritable" else "c.png")
    p = in_process(plot.main, *([] if case == "no-run" else [run]), "--out", out)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert words in p.stderr, p.stderr
    assert not out.exists()


def test_one_logged_point_is_drawn(tmp_path):
    """A run that has logged one training line and one kNN line: each panel shows its point as a marker (a line of
    one point draws nothing)."""
    run = write_run(tmp_path / "one", [moco_line(1, 5.0), knn_line(1, 40.0)])
    fig = plot.plot([("one", *plot.read_metrics(run)[1:3])], str(tmp_path / "c.png"))
    for ax in fig.axes:
        assert len(ax.lines) == 1 and ax.lines[0].get_marker() not in (None, "None", "", " "), ax.get_title()
