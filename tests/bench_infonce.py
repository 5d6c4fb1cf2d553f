"""Benchmark: fused moco_ext InfoNCE loss and enqueue vs moco.py's own pure-PyTorch (eager) path.

    python tests/bench_infonce.py                 # CPU (256, 128, 16384); GPU sizes if one is visible
    python tests/bench_infonce.py --device cpu    # CPU only (--threads 1: one core)
    python tests/bench_infonce.py --device cpu --quick   # toy sizes, 3 repeats: checks that it runs (seconds)

Loss: forward + backward of the mean loss over the batch, q requiring grad. eager = moco.py's infonce_loss, as
MoCo.training_loss calls it (einsum pos, einsum neg against the live queue, cat, /T, cross-entropy; no clone of the
queue, and n_beat counted); fused = moco_ext.infonce_loss. Enqueue: moco.py's enqueue (index_copy_ at
(ptr + arange(N)) % K, the pointer on the device) vs moco_ext.enqueue_. Times are medians; eager and fused take
turns, call by call. "extra peak" is the memory one step needs beyond its inputs: on CUDA from the caching
allocator, on CPU the rise in peak RSS of a fresh subprocess. GPU rows also print the roofline floor: the bytes over
this GPU's memory bandwidth (by its name: H200 4.3 TB/s, H100 SXM 3.0 TB/s, copies measured on this workplace's
machines; another GPU: a device-to-device copy measured now) or the FLOPs over its dense rate (H100/H200 SXM: FP32
67, TF32 494, BF16 989 TFLOP/s), whichever is larger; the queue is rotated over several copies so that it is not
served from L2 (fused reads the copy half a rotation away from the one eager just read). Each row also says what
moco.py --fused auto chooses at its shapes (moco.time_infonce: the loss and the enqueue of N keys, timed as a run
times them at start-up). On a GPU the run ends with one table of fused against eager for fp32 (TF32 off: the
kernel's FFMA path), TF32 and bf16 at N = 256 and 4096 with K = 65536 (v1/v2), and N = 256 and 512 with K = 4096
(the small and cifar presets), C = 128. moco.py computes the InfoNCE in float32 (also under --amp, with TF32 on a
GPU): its rows are fp32 and TF32; bf16 is the kernel's own.
Targets: CPU fused >= 1.5x eager at (256, 128, 16384); H200 >= 5x at N=256, K=65536 and within 3x of the floor.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python tests/bench_infonce.py` from the repository root finds moco_ext
    sys.path.insert(0, ROOT)
import moco  # noqa: E402
import moco_ext  # noqa: E402

T = 0.07  # MoCo's temperature
# name fragment -> (memory bandwidth B/s: device-to-device copies measured on this workplace's machines,
# dense FLOP/s by mode: the vendor's datasheet for the SXM parts)
GPUS = {"H200": (4.3e12, {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12}),
        "H100 80GB HBM3": (3.0e12, {"fp32": 67e12, "tf32": 494e12, "bf16": 989e12})}


def gpu_roofline():
    """(bandwidth B/s, {mode: FLOP/s} or None, where the numbers come from) for the current GPU."""
    name = torch.cuda.get_device_name()
    for key, (bw, peak) in GPUS.items():
        if key in name:
            return bw, peak, f"{name}: {bw / 1e12:.1f} TB/s (table)"
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    (t,) = timeit([lambda i: y.copy_(x)], "cuda", 10)
    bw = 2 * x.numel() * 4 / t  # bytes read + written
    del x, y
    return bw, None, f"{name}: {bw / 1e12:.2f} TB/s (copy measured now; no FLOP rates known)"


def make_inputs(N, C, K, device, dtype, copies=1):
    """Unit-norm q, k and queue columns, built without queue-sized temporaries."""
    q = F.normalize(torch.randn(N, C, device=device), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(N, C, device=device), dim=1).to(dtype)
    queues = []
    for _ in range(copies):
        v = torch.randn(C, K, device=device, dtype=dtype)
        queues.append(v.div_(v.float().norm(dim=0).to(dtype)))
    return q, k, queues


def eager_step(q, k, queue):
    loss = moco.infonce_loss(q, k, queue.detach(), T)[0].mean()  # as MoCo.training_loss, fused=None
    loss.backward()
    return loss.detach()


def fused_step(q, k, queue):
    loss = moco_ext.infonce_loss(q, k, queue, T)[0].mean()
    loss.backward()
    return loss.detach()


def auto_choice(N, C, K, device, mode):
    """What moco.py --fused auto takes at these shapes: moco.time_infonce with the enqueue of N keys."""
    if mode == "bf16":
        return "-"  # moco.py computes the InfoNCE in float32
    eager, fused = moco.time_infonce(moco_ext, N, C, K, T, N, torch.device(device))
    return "fused" if fused < eager else "eager"


def timeit(fns, device, repeat, warmup=3):
    """Median seconds of each fn(i) over `repeat` rounds (i rotates inputs). The functions
    take turns within each round, so a change in machine load hits them alike."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    times = [[] for _ in fns]
    for i in range(repeat):
        for fn, ts in zip(fns, times):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(i)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(i)
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def cpu_extra_peak_mb(variant, N, C, K):
    """Peak-RSS rise of one loss step in a fresh process (glibc mmaps large blocks: RSS is exact)."""
    code = (f"import torch, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            "import bench_infonce as b;"
            f"q, k, (v,) = b.make_inputs({N}, {C}, {K}, 'cpu', torch.float32);"
            f"r0 = b.peak_rss_mb(); b.{variant}_step(q, k, v); print(b.peak_rss_mb() - r0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_loss(N, C, K, device, mode, repeat, roof=None):
    """One row: fused against eager, forward + backward -> a dict of the numbers (also printed)."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"  # fp32: both sides without TF32
    copies = 1 if device == "cpu" else max(2, int(200e6 // (C * K * dtype.itemsize)) + 1)
    q, k, queues = make_inputs(N, C, K, device, dtype, copies)
    err = (eager_step(q, k, queues[0]) - fused_step(q, k, queues[0])).abs().item()
    res = {}
    steps = {"eager": eager_step, "fused": fused_step}
    res["eager"], res["fused"] = timeit(
        [lambda i: eager_step(q, k, queues[i % copies]),
         lambda i: fused_step(q, k, queues[(i + copies // 2) % copies])], device, repeat)
    for name, step in steps.items():
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(q, k, queues[0])
            torch.cuda.synchronize()
            res[name + "_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            res[name + "_mb"] = cpu_extra_peak_mb(name, N, C, K)
    line = (f"loss fwd+bwd {mode:4s} N={N:<5d} C={C} K={K:<6d} eager {res['eager'] * 1e3:8.3f} ms"
            f" | fused {res['fused'] * 1e3:8.3f} ms | speedup {res['eager'] / res['fused']:5.2f}x"
            f" | extra peak MB eager {res['eager_mb']:7.1f}, fused {res['fused_mb']:6.1f}"
            f" | |dloss| {err:.1e}")
    res.update(N=N, C=C, K=K, mode=mode, err=err, floor=None, auto=auto_choice(N, C, K, device, mode))
    line += f" | --fused auto: {res['auto']}"
    if roof is not None:
        bw, peak, _ = roof
        bytes_ = (C * K + 4 * N * C) * dtype.itemsize + 2 * N * C * 4
        res["floor"] = max(bytes_ / bw, 4 * N * K * C / peak[mode] if peak else 0.0)
        line += f" | floor {res['floor'] * 1e6:6.1f} us, fused/floor {res['fused'] / res['floor']:5.1f}x"
    print(line, flush=True)
    return res


def print_table(rows, where):
    """The rows of bench_loss as one table: which path is faster, per size and precision."""
    print(f"\nfused vs eager, InfoNCE loss forward + backward, median ms ({where}):")
    print(f"{'N':>5s} {'C':>4s} {'K':>6s} {'mode':>4s} {'eager ms':>9s} {'fused ms':>9s} {'eager/fused':>11s} "
          f"{'floor us':>9s} {'fused/floor':>11s}  faster  --fused auto")
    for r in rows:
        floor = (f"{r['floor'] * 1e6:9.1f} {r['fused'] / r['floor']:10.1f}x" if r["floor"]
                 else f"{'-':>9s} {'-':>11s}")
        print(f"{r['N']:5d} {r['C']:4d} {r['K']:6d} {r['mode']:>4s} {r['eager'] * 1e3:9.3f} {r['fused'] * 1e3:9.3f} "
              f"{r['eager'] / r['fused']:10.2f}x {floor}  {'fused' if r['fused'] < r['eager'] else 'eager':6s}  "
              f"{r['auto']}", flush=True)


def bench_enqueue(N, C, K, device, repeat):
    _, keys, (queue,) = make_inputs(N, C, K, device, torch.float32)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    t_e, t_f = timeit([lambda i: moco.enqueue(queue, ptr, keys),
                       lambda i: moco_ext.enqueue_(queue, ptr, keys)], device, repeat)
    print(f"enqueue_     fp32 N={N:<5d} C={C} K={K:<6d} eager {t_e * 1e3:8.3f} ms"
          f" | fused {t_f * 1e3:8.3f} ms | speedup {t_e / t_f:5.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="toy sizes and 3 repeats: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.repeat = min(args.repeat, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if args.device != "cpu" and torch.cuda.is_available() else [])
    if args.device == "cuda":
        devices = ["cuda"]
    print(f"moco_ext benchmark: torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"GPU {torch.cuda.get_device_name() if 'cuda' in devices else 'none'}, T={T}")
    # (N, K): v1/v2's K 65536 at their batch 256 and a large one; the small and cifar presets' K 4096 at 256 and 512
    C, cpu, gpu = (32, (64, 2048), [(64, 4096), (128, 1024)]) if args.quick else \
        (128, (256, 16384), [(256, 65536), (4096, 65536), (256, 4096), (512, 4096)])
    for device in devices:
        if device == "cpu":
            rows = [bench_loss(cpu[0], C, cpu[1], "cpu", "fp32", args.repeat)]
            bench_enqueue(cpu[0], C, cpu[1], "cpu", args.repeat)
            print_table(rows, f"CPU, {torch.get_num_threads()} threads")
        else:
            roof = gpu_roofline()
            rows = []
            for N, K in gpu:
                for mode in ("fp32", "tf32", "bf16"):
                    rows.append(bench_loss(N, C, K, "cuda", mode, args.repeat, roof))
                bench_enqueue(N, C, K, "cuda", args.repeat)
            torch.backends.cuda.matmul.allow_tf32 = False
            print_table(rows, f"{roof[2]}; fp32 = TF32 off, eager cuBLAS fp32 against the kernel's FFMA path")


if __name__ == "__main__":
    main()
