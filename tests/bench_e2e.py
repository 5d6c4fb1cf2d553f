"""End to end: how long would moco.py --preset cifar take for 200 epochs of a CIFAR-sized data set?

Runs moco.py as a user would (data path, kNN monitor after every epoch, checkpoints) on 50,000 training images and
10,000 test images made by tiling the shipped Fashion-MNIST test split (28x28 greyscale, read as IDX files and
resized to 32 px like MNIST; the encoder sees 3x32x32 batches exactly as on CIFAR-10, so the step costs the
same), for --epochs epochs of the 200-epoch schedule (--max-steps), then prints the time per epoch after the first
(which holds start-up, warm-up and compilation) and the 200-epoch estimate: first epoch + 199 x later epochs.
Nothing is downloaded. A script, not a test:
    python tests/bench_e2e.py [--epochs 3] [--flags "--amp --compile"]            # on a GPU
    python tests/bench_e2e.py --images 2048 --epochs 2 --flags "--arch basic32 --batch-size 128"  # CPU smoke run
    python tests/bench_e2e.py --images 128 --test-images 128 --epochs 2 \
        --flags "--device cpu --arch basic32 --batch-size 32 --moco-k 64 --workers 0"     # toy run (the test suite's)
"""
import argparse
import gzip
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import moco  # noqa: E402


def write_idx(path, a):
    """uint8 array -> gzipped IDX: 0, 0, type 0x08, the number of dims, one big-endian uint32 per dim, the data."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def make_data(folder, n_train, n_test):
    """IDX files as moco.py --dataset fashionmnist --data FOLDER reads them: the shipped 10,000 images tiled."""
    x = moco.read_idx(os.path.join(ROOT, "data", "t10k-images-idx3-ubyte.gz"))  # (10000, 28, 28) uint8
    y = moco.read_idx(os.path.join(ROOT, "data", "t10k-labels-idx1-ubyte.gz"))  # (10000,)
    tile = lambda a, n: np.resize(a, (n, *a.shape[1:]))  # repeats a along dim 0 up to n rows
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), tile(x, n))
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), tile(y, n))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs to run (of the 200-epoch schedule); at least 2")
    p.add_argument("--images", type=int, default=50000, help="training images")
    p.add_argument("--test-images", type=int, default=10000, help="test images (the kNN monitor's queries)")
    p.add_argument("--flags", default="--amp", help="more moco.py flags, as one string")
    p.add_argument("--target-min", type=float, default=15.0, help="the target for 200 epochs, minutes")
    opts = p.parse_args()
    if opts.epochs < 2:
        sys.exit("--epochs must be at least 2 (the first epoch holds start-up and compilation)")
    with tempfile.TemporaryDirectory() as tmp:
        make_data(tmp, opts.images, opts.test_images)
        out = os.path.join(tmp, "run")
        argv = [sys.executable, os.path.join(ROOT, "moco.py"), "--dataset", "fashionmnist", "--data", tmp,
                "--preset", "cifar", "--out", out, *shlex.split(opts.flags)]
        batch = moco.parse_args(argv[2:])[0].batch_size  # preset cifar: 512, unless --flags sets it
        steps = opts.images // batch  # drop_last, as the official loader
        cmd = argv + ["--max-steps", str(opts.epochs * steps), "--log-every", str(steps)]
        print("$ " + " ".join(shlex.quote(a) for a in cmd[1:]), flush=True)
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if run.returncode:
            sys.exit(f"moco.py failed:\n{run.stderr[-3000:]}")
        print(run.stdout[-3000:], end="")
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        ends = [r["time_s"] for r in rows if "loss" in r and r["step"] % steps == 0]
        later = (ends[-1] - ends[0]) / (len(ends) - 1)  # s per epoch after the first, kNN monitor included
        first = wall - (ends[-1] - ends[0])  # start-up + first epoch (+ the last kNN, checkpoint and exit)
        est = first + 199 * later
        print(f"{opts.images} images, batch {batch}, {steps} steps per epoch: wall {wall:.1f} s for {opts.epochs} "
              f"epochs; epochs 2-{opts.epochs}: {later:.2f} s each ({opts.images / later:.0f} img/s, kNN included); "
              f"start-up + epoch 1: {first:.1f} s")
        print(f"200 epochs estimated: {est / 60:.1f} min ({'meets' if est <= 60 * opts.target_min else 'misses'} "
              f"the {opts.target_min:g} min target)")


if __name__ == "__main__":
    main()
