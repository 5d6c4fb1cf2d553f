"""Do the speed options keep the results? Loss curves and kNN accuracy of moco.py and dim.py, each speed option
against a reference run with all of them off, over several seeds.

A run with an option on cannot equal the reference step for step (the device path draws its augmentations from
its own generator; the fused kernel and bf16 round differently, and training amplifies any rounding), so each
option is compared with the reference as two samples of seeds: per window of --window steps, the difference of
the seed-mean losses and its standard error sqrt(s_ref^2/n + s_opt^2/n) from the seed-to-seed spread. An option
that keeps the curve has differences of the size of their standard errors (|z| of 1.0 on average with 3 seeds,
0.92 with 4: a t statistic with 2n - 2 degrees of freedom);
a real change shows as windows with |z| well above 2. The windows come from the same runs, so they are not
independent tests: z of one sign in every window hints at a small offset without proving one. The kNN
monitor's top-1 after each epoch is printed beside as mean ± std over the seeds.

Runs, each for --epochs epochs on the built-in data (125 steps of 64 per epoch), seeds 0 .. --seeds - 1:
  moco.py: reference (CPU loader, --fused off), +fused (the moco_ext kernel), +gpu-aug (the batched device
           path, fused on); on CUDA also +amp (bf16 autocast) and +compile.
  dim.py:  reference (CPU loader), +gpu-aug; on CUDA also +amp and +compile.
A script, not a test (45 min on the 2-core development CPU with the defaults):
  python tests/bench_curves.py [--epochs 3] [--seeds 3] [--scripts moco.py dim.py] [--device cpu]
  python tests/bench_curves.py --scripts dim.py --seeds 2 --max-steps 2 --window 1 --workers 0 --knn-every 0 \
      --batch-size 16                                                                 # toy run (the test suite's)
Before and after a change of the code: --keep DIR keeps every run's metrics.jsonl (DIR/<script>-<variant>-<seed>/);
run it on the old tree, then on the new one with --against DIR: each run is compared with the old tree's run of
the same script, variant and seed, loss by loss and kNN by kNN (equal to the bit, or the largest difference).
  python tests/bench_curves.py --keep /tmp/before            # on the old tree
  python tests/bench_curves.py --against /tmp/before         # on the new tree
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = {"moco.py": ["--batch-size", "64", "--moco-k", "1024", "--bn-splits", "4", "--workers", "2"],
          "dim.py": ["--batch-size", "64", "--workers", "2"]}


def variants(script, device):
    """(name, flags) in order; the first is the reference, each later one adds an option to the one before."""
    off = ["--gpu-aug", "off", "--no-amp", "--no-compile"]
    out = [("reference", off + (["--fused", "off"] if script == "moco.py" else []))]
    if script == "moco.py":
        out.append(("+fused", off + ["--fused", "on"]))
    out.append(("+gpu-aug", ["--gpu-aug", "on", "--no-amp", "--no-compile"]))
    if device.startswith("cuda"):
        out.append(("+amp", ["--gpu-aug", "on", "--amp", "--no-compile"]))
        out.append(("+compile", ["--gpu-aug", "on", "--amp", "--compile"]))
    return out


def overrides(opts):
    """The flags given to every run after COMMON's and the variant's (later flags win)."""
    return ((["--max-steps", str(opts.max_steps)] if opts.max_steps else [])
            + (["--workers", str(opts.workers)] if opts.workers >= 0 else [])
            + (["--batch-size", str(opts.batch_size)] if opts.batch_size else []))


def run(script, flags, seed, opts, out):
    """Trains once; returns (losses per step, kNN top-1 after each epoch, seconds)."""
    argv = [sys.executable, os.path.join(ROOT, script), "--out", out, "--epochs", str(opts.epochs), "--seed", str(seed),
            "--knn-every", str(opts.knn_every), "--log-every", "1", "--device", opts.device, *COMMON[script], *flags,
            *overrides(opts)]
    shutil.rmtree(out, ignore_errors=True)  # a kept folder of an earlier call: metrics.jsonl is appended to
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"{script} {' '.join(flags)} --seed {seed} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return ([r["loss"] for r in rows if "loss" in r], [r["knn_top1"] for r in rows if "knn_top1" in r],
            time.perf_counter() - t)


def against(old, new):
    """One run against its twin from another tree: 'equal' (every logged loss and kNN top-1 equal to the bit), or
    the largest differences."""
    if not os.path.exists(os.path.join(old, "metrics.jsonl")):
        return "no twin"
    a, b = ([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (old, new))
    la, lb = ([r["loss"] for r in x if "loss" in r] for x in (a, b))
    ka, kb = ([r["knn_top1"] for r in x if "knn_top1" in r] for x in (a, b))
    if la == lb and ka == kb:
        return f"equal ({len(la)} losses, {len(ka)} kNN)"
    if len(la) != len(lb) or len(ka) != len(kb):
        return f"different lengths ({len(la)}/{len(lb)} losses, {len(ka)}/{len(kb)} kNN)"
    return (f"max |loss difference| {max(abs(x - y) for x, y in zip(la, lb)):.3g}, max |kNN difference| "
            f"{max((abs(x - y) for x, y in zip(ka, kb)), default=0):.3g}")


def windows(losses, w):
    return [statistics.fmean(losses[i:i + w]) for i in range(0, len(losses), w)]


def mean_sd(xs):
    return statistics.fmean(xs), statistics.stdev(xs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-steps", type=int, default=0, help="stop each run after this many steps (0: --epochs)")
    p.add_argument("--workers", type=int, default=-1, help="data loader processes per run (default: COMMON's 2)")
    p.add_argument("--knn-every", type=int, default=1, help="kNN monitor every N epochs (0: off)")
    p.add_argument("--batch-size", type=int, default=0, help="batch size of every run (default: COMMON's 64)")
    p.add_argument("--scripts", nargs="+", default=list(COMMON), choices=list(COMMON))
    p.add_argument("--keep", help="keep the runs' folders here (default: a temporary folder)")
    p.add_argument("--against", help="a --keep folder of another tree: compare every run with its twin there")
    opts = p.parse_args()
    if opts.seeds < 2:
        sys.exit("--seeds must be at least 2 (the standard errors come from the seed-to-seed spread)")
    w, seeds = opts.window, range(opts.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = opts.keep or tmp
        for script in opts.scripts:
            res, secs = {}, {}
            for name, flags in variants(script, opts.device):
                runs = [run(script, flags, s, opts, os.path.join(tmp, f"{script}-{name}-{s}"))
                        for s in seeds]
                res[name] = ([windows(r[0], w) for r in runs], [r[1] for r in runs])
                steps = len(runs[0][0])
                secs[name] = statistics.fmean(r[2] for r in runs)
            names = list(res)
            print(f"# {script} {' '.join(COMMON[script] + overrides(opts))}, built-in data, {opts.epochs} epoch(s) = "
                  f"{steps} steps, {opts.device}, seeds 0-{opts.seeds - 1}")
            for name, flags in variants(script, opts.device):
                print(f"#   {name}: {' '.join(flags)} ({secs[name]:.0f} s per run)")
            print(f"loss averaged over {w}-step windows: mean over seeds (seed std)")
            print(f"{'steps':>9s} " + " ".join(f"{n:>17s}" for n in names))
            n_win = len(res["reference"][0][0])
            for i in range(n_win):
                cells = [mean_sd([c[i] for c in res[n][0]]) for n in names]
                label = f"{i * w + 1}-{min((i + 1) * w, steps)}"
                print(f"{label:>9s} " + " ".join(f"{m:9.4f} ({s:.4f})" for m, s in cells))
            print("vs reference, per window: difference of the seed means / its standard error (z)")
            for n in names[1:]:
                zs, ds = [], []
                for i in range(n_win):
                    (ma, sa), (mb, sb) = (mean_sd([c[i] for c in res[k][0]]) for k in ("reference", n))
                    ds.append(mb - ma)
                    zs.append(ds[-1] / max(math.sqrt((sa ** 2 + sb ** 2) / opts.seeds), 1e-12))
                print(f"  {n:>9s}: mean |difference| {statistics.fmean(abs(d) for d in ds):.4f}, mean |z| "
                      f"{statistics.fmean(abs(z) for z in zs):.2f}, max |z| {max(abs(z) for z in zs):.2f}; z "
                      + " ".join(f"{z:+.1f}" for z in zs))
            print("kNN top-1 after each epoch: mean ± std over seeds")
            for n in names:
                per_epoch = list(zip(*res[n][1]))
                print(f"  {n:>9s}: " + ", ".join("{:.2f} ± {:.2f}".format(*mean_sd(e)) for e in per_epoch))
            if opts.against:
                print(f"against {opts.against}, run by run:")
                for n in names:
                    print(f"  {n:>9s}: " + "; ".join(against(os.path.join(opts.against, f"{script}-{n}-{s}"),
                                                             os.path.join(tmp, f"{script}-{n}-{s}")) for s in seeds))
            print(flush=True)


if __name__ == "__main__":
    main()
