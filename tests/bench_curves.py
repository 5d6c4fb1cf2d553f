"""Do the speed options keep the results? Loss curves of moco.py and dim.py with --gpu-aug on and off, side by side.

The batched device path draws its augmentations from its own generator, so its curve cannot equal the CPU
loader's step for step; it should differ from it by no more than two seeds of the same path differ from each
other. For each script this runs: CPU loader seed 0, CPU loader seed 1, device path seed 0, all for --steps
steps on the built-in data, and prints the loss averaged over windows of --window steps, then the mean absolute
difference between curves: (device, seed 0) vs (loader, seed 0) next to (loader, seed 1) vs (loader, seed 0).
A script, not a test (minutes on a CPU):  python tests/bench_curves.py [--steps 300] [--device cpu]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"moco.py": ["--batch-size", "64", "--moco-k", "1024", "--bn-splits", "4", "--workers", "2"],
        "dim.py": ["--batch-size", "64", "--workers", "2"]}


def curve(script, gpu_aug, seed, steps, device, out):
    argv = [sys.executable, os.path.join(ROOT, script), "--out", out, "--max-steps", str(steps), "--epochs", "100",
            "--seed", str(seed), "--gpu-aug", gpu_aug, "--knn-every", "0", "--log-every", "1", "--device", device,
            *RUNS[script]]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(f"{script} failed:\n{p.stderr[-2000:]}")
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--device", default="cpu")
    opts = p.parse_args()
    w = opts.window
    with tempfile.TemporaryDirectory() as tmp:
        for script in RUNS:
            runs = {(aug, seed): curve(script, aug, seed, opts.steps, opts.device,
                                       os.path.join(tmp, f"{script}-{aug}-{seed}"))
                    for aug, seed in (("off", 0), ("off", 1), ("on", 0))}
            mean = {k: [sum(v[i:i + w]) / len(v[i:i + w]) for i in range(0, len(v), w)] for k, v in runs.items()}
            print(f"# {script} {' '.join(RUNS[script])}, built-in data, {opts.steps} steps, {opts.device}: "
                  f"loss averaged over steps")
            print(f"{'steps':>10s} {'loader s0':>10s} {'loader s1':>10s} {'device s0':>10s}")
            for i in range(len(mean[("off", 0)])):
                print(f"{f'{i * w + 1}-{min((i + 1) * w, opts.steps)}':>10s} " +
                      " ".join(f"{mean[k][i]:10.4f}" for k in (("off", 0), ("off", 1), ("on", 0))))
            diff = lambda a, b: sum(abs(x - y) for x, y in zip(mean[a], mean[b])) / len(mean[a])
            print(f"mean |difference| of the window means: device vs loader (seed 0) "
                  f"{diff(('on', 0), ('off', 0)):.4f}, loader seed 1 vs seed 0 {diff(('off', 1), ('off', 0)):.4f}\n",
                  flush=True)


if __name__ == "__main__":
    main()
