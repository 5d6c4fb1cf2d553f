"""The curves of moco.py and dim.py runs against steps, in one PNG: loss, pretext accuracy, lr, kNN top-1.

    python plot.py runs/moco                                  # -> curves.png
    python plot.py runs/moco-v1 runs/moco-v2 --out v1-v2.png  # several runs overlaid, the legend their folders

RUN is an output folder (--out of moco.py or dim.py) or its metrics.jsonl, one JSON object per logged line
(class Run in moco.py and dim.py): training lines {step, epoch, loss, acc1, acc5 (moco.py) or local, global,
prior, d_loss, d_acc (dim.py), lr, img_s, data_wait, time_s} and kNN lines {step, epoch, knn_top1, knn_s}.
Panels: loss (moco.py's InfoNCE; dim.py's total of Eq. 8); pretext accuracy in %: moco.py's acc1 (the positive
key beats every negative), and dim.py's d_acc drawn dashed, the prior discriminator's accuracy, only where the
prior is on (gamma > 0; dim.py has no other accuracy, and logs 0 without the prior); lr; kNN top-1 in % (the
monitor's, at the steps it ran). Each step once: a step logged again (a resumed run repeats the steps after its
last checkpoint; a reused --out appends a second run) keeps its last line, and plot.py says how many it dropped.
Lines that are not JSON objects with a step (a line cut short by a kill) are skipped, also with a note.

Needs the standard library and matplotlib only (the Agg backend; no display). Errors: one line, exit 2.
"""
import argparse
import json
import os
import sys

PANELS = (("loss", "loss"), ("acc", "pretext accuracy (%)"), ("lr", "lr"), ("knn_top1", "kNN top-1 (%)"))


class UserError(Exception):
    """An error the user can fix; main() prints it as one line."""


def read_metrics(run):
    """RUN (a folder or its metrics.jsonl) -> (its metrics.jsonl path, training lines, kNN lines, notes): the lines
    sorted by step, one per step and kind (the last one logged), and what was dropped, in words."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.exists(run):
        raise UserError(f"{run}: no such folder or file")
    if not os.path.isfile(path):
        raise UserError(f"{run} has no metrics.jsonl (is it the --out folder of moco.py or dim.py?)")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise UserError(f"{path} is empty: the run has logged no step yet")
    train, knn, n, bad = {}, {}, 0, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except ValueError:
            m = None
        if not isinstance(m, dict) or not isinstance(m.get("step"), (int, float)):
            bad += 1
            continue
        n += 1
        (knn if "knn_top1" in m else train)[m["step"]] = m  # a later line of the same step replaces the earlier
    if not train and not knn:
        raise UserError(f"{path} has no metric lines (JSON objects with a step)")
    notes = []
    if n > len(train) + len(knn):
        notes.append(f"{n - len(train) - len(knn)} repeated steps (a resumed run, or two runs in one folder): "
                     "kept the last line of each")
    if bad:
        notes.append(f"skipped {bad} lines that are not JSON objects with a step")
    return path, [train[s] for s in sorted(train)], [knn[s] for s in sorted(knn)], notes


def series(lines, key):
    """-> (steps, values) of the lines that have `key` with a number."""
    pts = [(m["step"], m[key]) for m in lines if isinstance(m.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot(runs, out):
    """runs: [(label, training lines, kNN lines)] -> the figure, saved to `out`."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    axes = dict(zip((k for k, _ in PANELS), axes.flat))
    for i, (label, train, knn) in enumerate(runs):
        style = dict(color=f"C{i}", label=label)  # one colour per run in every panel
        curves = [("loss", series(train, "loss"), style), ("acc", series(train, "acc1"), style),
                  ("lr", series(train, "lr"), style), ("knn_top1", series(knn, "knn_top1"), dict(style, marker="o"))]
        if any(m.get("d_loss") for m in train):  # dim.py with the prior on; without it d_acc is a constant 0
            curves.append(("acc", series(train, "d_acc"), dict(style, ls="--", label=f"{label} (prior D)")))
        for key, (steps, values), kw in curves:
            if steps:  # a run that does not log this key has no line (and no legend entry) here
                axes[key].plot(steps, values, **({"marker": "o", **kw} if len(steps) == 1 else kw))  # one point: a dot
    for key, title in PANELS:
        ax = axes[key]
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for key in ("lr", "knn_top1"):
        axes[key].set_xlabel("step")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as e:  # no such folder, an extension matplotlib cannot write
        raise UserError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        plt.close(fig)
    return fig


def labels(paths):
    """The run folders' names, or their paths where two names are the same."""
    names = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    return names if len(set(names)) == len(names) else [os.path.dirname(p) or "." for p in paths]


def main(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(message)
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="an output folder of moco.py or dim.py, or its metrics.jsonl")
    p.add_argument("--out", default="curves.png", help="the image to write (default curves.png; PNG unless the "
                                                       "extension names another format matplotlib writes)")
    try:
        args = p.parse_args(argv)
        folder = os.path.dirname(args.out)
        if folder and not os.path.isdir(folder):  # before the reading and drawing
            raise UserError(f"cannot write {args.out}: no such folder {folder}")
        read = [read_metrics(r) for r in args.runs]
        for path, _, _, notes in read:
            for note in notes:
                print(f"note: {path}: {note}")
        plot([(name, train, knn) for name, (_, train, knn, _) in zip(labels([r[0] for r in read]), read)], args.out)
        print(f"wrote {args.out}: {len(read)} run{'s' if len(read) > 1 else ''}, "
              f"{sum(len(t) for _, t, _, _ in read)} training and {sum(len(k) for _, _, k, _ in read)} kNN points")
    except UserError as e:
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
