"""moco_ext's kernels against a float64 reference at MoCo's production shapes (a check, not a test: it prints one
line per case and exits 1 if any fails).

    python tests/check_kernels.py                       # CUDA if the kernels can run, else the CPU kernels
    python tests/check_kernels.py --device cuda         # the GPU: fails unless moco_ext.unusable_reason is None
    python tests/check_kernels.py --device cpu          # the CPU kernels at reduced sizes (the test suite's run)
    python tests/check_kernels.py --device cuda --sanitize   # few launches at small odd shapes, for
                                                              # compute-sanitizer (tests/gpu_check.sh 1)

CUDA: N = 256 and 4096 (MoCo v1/v2's batch, and a large one), C = 128, K = 65536, T = 0.07 (v1) and 0.2 (v2),
inputs fp32 (TF32 off: the kernel's FFMA path), fp32 with TF32 allowed, and bf16 (--amp). CPU: N = 64 and 257,
K = 4099, fp32 and fp64. Each case draws fresh unit-norm q, k and queue columns, runs moco_ext.infonce_loss with
a weighted backward, and compares loss, n_beat and the gradients dq, dk with the official InfoNCE (cat(q.k,
q @ queue) / T, cross-entropy with label 0) in float64, autograd for the gradients, computed from the same rounded
inputs: ||out - ref|| / ||ref|| under tests/test_ext.py's tolerances, n_beat exact except for negatives within a
rounding distance of the positive. On CUDA the memory the outputs will take is filled with NaN first, so an
element the kernels never write shows. enqueue_: N = 4096 keys (CPU 257) into K = 65536 (CPU 4099) starting
half a batch before the end of the ring (the write wraps), three calls, fp32 and bf16, equal to index_copy_
exactly, ptr included; and C = 0 (ptr still advances).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import moco_ext  # noqa: E402

# Relative error allowed at T >= 0.07, and the rounding distance within which a negative may count either way in
# n_beat (divided by T), per precision: tests/test_ext.py's TOL and EPS.
TOL = {"fp64": 1e-10, "fp32": 2e-5, "tf32": 2e-2, "bf16": 2e-2, "fp16": 1e-2}
EPS = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 2e-3, "bf16": 1e-4, "fp16": 1e-4}
DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
         "fp16": torch.float16}


def inputs(N, C, K, device, dtype, gen):
    """Unit-norm q, k and queue columns (as in MoCo), drawn in float64 on the device and rounded to dtype."""
    def unit(*shape, dim):
        return F.normalize(torch.randn(*shape, generator=gen, device=device, dtype=torch.float64), dim=dim).to(dtype)
    return unit(N, C, dim=1), unit(N, C, dim=1), unit(C, K, dim=0)


def rel(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(nbytes, device):
    """Fill nbytes of the caching allocator's memory with NaN and free it: outputs allocated next land there."""
    if device.type == "cuda":
        torch.full((nbytes // 4 + 1024,), float("nan"), device=device)


def check_loss(N, C, K, T, prec, device, gen, ref_device):
    """-> (passed, line) for one case."""
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    q, k, queue = inputs(N, C, K, device, DTYPE[prec], gen)
    w = torch.rand(N, generator=gen, device=device, dtype=torch.float64)  # (N,) weights of the backward
    q.requires_grad_()
    k.requires_grad_()
    poison(4 * N * (4 * C + 4) * 4, device)
    loss, n_beat = moco_ext.infonce_loss(q, k, queue, T)  # (N,), (N,)
    gq, gk = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), (q, k))
    torch.backends.cuda.matmul.allow_tf32 = False
    q64, k64 = (t.detach().to(ref_device, torch.float64).requires_grad_() for t in (q, k))
    v64 = queue.to(ref_device, torch.float64)
    logits = torch.cat([(q64 * k64).sum(1, keepdim=True), q64 @ v64], 1) / T  # (N, 1+K)
    ref = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=ref_device), reduction="none")  # (N,)
    rq, rk = torch.autograd.grad((ref * w.to(ref_device)).sum(), (q64, k64))
    d = (logits[:, 1:] - logits[:, :1]).detach()  # (N, K): negative minus positive
    eps = EPS[prec] / T
    lo, hi = (d > eps).sum(1), (d > -eps).sum(1)  # (N,) n_beat's bounds
    del logits, d
    nb = n_beat.to(ref_device)
    beat_ok = bool(((lo <= nb) & (nb <= hi)).all())
    finite = all(bool(torch.isfinite(t).all()) for t in (loss, gq, gk))
    errs = rel(loss.detach(), ref.detach()), rel(gq, rq), rel(gk, rk)
    tol = TOL[prec] * max(1.0, 0.07 / T)
    ok = finite and beat_ok and max(errs) < tol and gq.dtype == q.dtype and loss.shape == (N,)
    line = (f"loss  {prec:4s} N={N:<5d} C={C} K={K:<6d} T={T:<4g} rel err: loss {errs[0]:.1e} dq {errs[1]:.1e} "
            f"dk {errs[2]:.1e} (tol {tol:.0e}) | n_beat {'ok' if beat_ok else 'WRONG'} | "
            f"{'finite' if finite else 'NON-FINITE'} | {'PASS' if ok else 'FAIL'}")
    return ok, line


def check_enqueue(N, C, K, dtype, device, gen):
    """Three enqueues from half a batch before the end of the ring, against index_copy_: bitwise equal."""
    queue = torch.randn(C, K, generator=gen, device=device, dtype=torch.float64).to(dtype)  # (C, K)
    start = (K - N // 2) % K if K else 0
    ptr = torch.tensor([start], device=device)
    ref_q, ref_p = queue.clone(), start
    for _ in range(3):
        keys = torch.randn(N, C, generator=gen, device=device, dtype=torch.float64).to(dtype)  # (N, C)
        moco_ext.enqueue_(queue, ptr, keys)
        idx = (ref_p + torch.arange(N, device=device)) % K  # (N,)
        ref_q.index_copy_(1, idx, keys.t())
        ref_p = (ref_p + N) % K
    ok = torch.equal(queue, ref_q) and int(ptr) == ref_p
    return ok, (f"enqueue_ {str(dtype)[6:]:8s} N={N:<5d} C={C} K={K:<6d} from ptr {start} (wraps), 3 calls: "
                f"{'queue and ptr exact' if ok else 'MISMATCH'} | {'PASS' if ok else 'FAIL'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sanitize", action="store_true", help="CUDA: few launches at small odd shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if moco_ext.unusable_reason("cuda") is None else "cpu"
    device = torch.device(args.device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        reason = moco_ext.unusable_reason(device)  # the real check: library, code objects, a trial launch
        print(f"GPU {torch.cuda.get_device_name(device)} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}),"
              f" torch {torch.__version__}, moco_ext CUDA code objects {moco_ext.CUDA_ARCHS or 'none'}: "
              f"unusable_reason = {reason!r}", flush=True)
        if reason is not None:
            print("check_kernels: FAIL: the CUDA kernels cannot run on this GPU")
            return 1
    else:
        print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    gen = torch.Generator(device).manual_seed(args.seed)
    if args.sanitize:
        loss_cases = [(67, 40, 300, 0.07, prec) for prec in ("fp32", "tf32", "bf16", "fp16")]
        enq_cases = [(37, 24, 50, torch.float32), (5, 0, 9, torch.float32)]
        ref_device = torch.device("cpu")  # keeps the launches under the sanitizer to ours and a few of torch's
    elif device.type == "cuda":
        loss_cases = [(N, 128, 65536, T, prec) for N in (256, 4096) for T in (0.07, 0.2)
                      for prec in ("fp32", "tf32", "bf16")]
        enq_cases = [(4096, 128, 65536, torch.float32), (4096, 128, 65536, torch.bfloat16), (7, 0, 9, torch.float32)]
        ref_device = device
    else:
        loss_cases = [(N, 128, 4099, T, prec) for N in (64, 257) for T in (0.07, 0.2) for prec in ("fp32", "fp64")]
        enq_cases = [(257, 128, 4099, torch.float32), (257, 128, 4099, torch.float64), (7, 0, 9, torch.float32)]
        ref_device = device
    failed = 0
    for N, C, K, T, prec in loss_cases:
        ok, line = check_loss(N, C, K, T, prec, device, gen, ref_device)
        failed += not ok
        print(line, flush=True)
    for N, C, K, dtype in enq_cases:
        ok, line = check_enqueue(N, C, K, dtype, device, gen)
        failed += not ok
        print(line, flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = len(loss_cases) + len(enq_cases)
    print(f"check_kernels: {n} cases on {device.type}, {failed} failed, {time.perf_counter() - t0:.1f} s: "
          f"{'PASS' if not failed else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
