"""Benchmark: the host syncs and copies kept out of the training step, each old form against the new
one side by side (best of 3, one thread). On a CPU a sync costs nothing; the copies and the skipped shuffle do.

    python tests/bench_hotpath.py
    python tests/bench_hotpath.py --quick    # a 4096-column queue, fewer calls: checks that it runs (seconds)
"""
import argparse
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import moco  # noqa: E402


def t(f, n=20):
    """Milliseconds per call, best of 3 rounds of n after one warm-up call."""
    f()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t0) / n)
    return min(best) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 4096-column queue and fewer calls")
    opts = p.parse_args()
    n, K = (2, 4096) if opts.quick else (20, 65536)
    torch.set_num_threads(1)
    q = F.normalize(torch.randn(8, 128), dim=1)  # (8, 128)
    k = q.clone()
    queue = F.normalize(torch.randn(128, K), dim=0)  # (128, K)
    a = t(lambda: moco.infonce_loss(q, k, queue.clone().detach(), 0.2), n)
    b = t(lambda: moco.infonce_loss(q, k, queue, 0.2), n)
    print(f"InfoNCE at K={K}, batch 8: with the per-step queue clone {a:.2f} ms, without {b:.2f} ms")
    s = torch.randn(64, 64, 64)  # (N, N, L) critic scores
    eye = torch.eye(64, dtype=torch.bool)
    old = lambda: (s[eye], s[~eye].reshape(64, -1))
    new = lambda: (s.diagonal(dim1=0, dim2=1).T, s.flatten(0, 1)[1:].view(63, 65, 64)[:, :64].reshape(64, -1))
    print(f"mi_loss split, N=64 L=64: boolean mask {t(old, 10 * n):.3f} ms, views {t(new, 10 * n):.3f} ms")
    x = torch.randn(256, 3, 32, 32)
    one = moco.MoCo(functools.partial(moco.build_encoder, "basic32", "cifar", 1), K=4096)
    eight = moco.MoCo(functools.partial(moco.build_encoder, "basic32", "cifar", 8), K=4096)
    print(f"_batch_shuffle, batch 256 at 32 px: one BN group {t(lambda: one._batch_shuffle(x), n):.3f} ms (skipped), "
          f"8 groups {t(lambda: eight._batch_shuffle(x), n):.3f} ms")


if __name__ == "__main__":
    main()
