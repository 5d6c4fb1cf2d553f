"""Python side of the moco_ext operators: fake (meta) kernels, autograd, and the API.

The C++ schemas live in csrc/infonce.cpp. Equations (row i, v_0 = k_i, v_j = queue[:, j-1]):
  logits_ij = q_i.v_j / T
  loss_i    = logsumexp_j(logits_ij) - logits_i0
  d loss_i / d q_i = (sum_j p_ij v_j - k_i) / T,   d loss_i / d k_i = (p_i0 - 1) q_i / T
"""
import math
import re

import torch
from torch.autograd.function import once_differentiable

_ops = torch.ops.moco_ext

# Whether the CUDA kernels were compiled into the loaded library.
HAS_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("moco_ext::infonce_loss", "CUDA")
if not hasattr(_ops, "cuda_archs"):
    raise ImportError("moco_ext: the compiled library predates moco_ext.cuda_archs; rebuild it "
                      "(pip install --no-build-isolation -e .)")
# The CUDA code objects compiled in, e.g. "sm_80,sm_86,sm_89,sm_90,compute_90"; "" without CUDA kernels.
CUDA_ARCHS = _ops.cuda_archs()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- fake kernels: shapes and dtypes only (torch.compile, opcheck) ---
@torch.library.register_fake("moco_ext::infonce_logits")
def _logits_fake(q, k, queue, T):
    torch._check(q.dim() == 2 and k.shape == q.shape and queue.dim() == 2)
    torch._check(queue.shape[0] == q.shape[1])
    return q.new_empty((q.shape[0], 1 + queue.shape[1]))


@torch.library.register_fake("moco_ext::infonce_loss")
def _loss_fake(q, k, queue, T):
    torch._check(q.dim() == 2 and k.shape == q.shape and queue.dim() == 2)
    torch._check(queue.shape[0] == q.shape[1])
    n, c = q.shape
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((n,), dtype=acc), q.new_empty((n,), dtype=torch.long),
            q.new_empty((n, c), dtype=acc), q.new_empty((n, c), dtype=acc))


@torch.library.register_fake("moco_ext::enqueue")
def _enqueue_fake(queue, ptr, keys):
    return None


# --- autograd: logits (the queue is saved; an in-place enqueue before backward raises) ---
def _logits_setup(ctx, inputs, output):
    q, k, queue, T = inputs
    ctx.save_for_backward(q, k, queue)
    ctx.T = T


def _logits_backward(ctx, grad):
    q, k, queue = ctx.saved_tensors
    g_pos, g_neg = grad[:, :1], grad[:, 1:]                       # (N, 1), (N, K)
    grad_q = grad_k = grad_queue = None
    if ctx.needs_input_grad[0]:
        grad_q = (g_pos * k + g_neg @ queue.t()) / ctx.T         # (N, C)
    if ctx.needs_input_grad[1]:
        grad_k = g_pos * q / ctx.T                               # (N, C)
    if ctx.needs_input_grad[2]:
        grad_queue = q.t() @ g_neg / ctx.T                       # (C, K)
    return grad_q, grad_k, grad_queue, None


torch.library.register_autograd("moco_ext::infonce_logits", _logits_backward,
                                setup_context=_logits_setup)


# --- autograd: loss. The forward already computed the per-row gradients, so the
# backward is a scaling and never reads the queue again. ---
def _loss_setup(ctx, inputs, output):
    q, k, queue, T = inputs
    _, n_beat, dq_rows, dk_rows = output
    ctx.mark_non_differentiable(n_beat, dq_rows, dk_rows)
    ctx.save_for_backward(dq_rows, dk_rows)
    ctx.dtypes = (q.dtype, k.dtype)


@once_differentiable  # dq_rows is a constant here: a second derivative would be silently 0
def _loss_backward(ctx, grad_loss, _g_nbeat, _g_dq, _g_dk):
    dq_rows, dk_rows = ctx.saved_tensors
    g = grad_loss.to(dq_rows.dtype)[:, None]                      # (N, 1)
    grad_q = (g * dq_rows).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_k = (g * dk_rows).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    if ctx.needs_input_grad[2]:
        raise RuntimeError("moco_ext.infonce_loss: no gradient for the queue (a buffer); "
                           "detach it or use infonce_logits")
    return grad_q, grad_k, None, None


torch.library.register_autograd("moco_ext::infonce_loss", _loss_backward,
                                setup_context=_loss_setup)


# --- public API ---
def infonce_logits(q, k, queue, T):
    """logits = cat([q.k (row-wise), q @ queue], 1) / T, shape (N, 1+K); label 0."""
    return _ops.infonce_logits(q, k, queue, float(T))


def infonce_loss(q, k, queue, T):
    """Per-row InfoNCE loss (N,) and n_beat (N,) int64, without materialising logits."""
    loss, n_beat, _, _ = _ops.infonce_loss(q, k, queue, float(T))
    return loss, n_beat


def enqueue_(queue, ptr, keys):
    """In place: queue[:, (ptr + i) % K] = keys[i]; ptr = (ptr + N) % K. No host sync."""
    _ops.enqueue(queue, ptr, keys.detach())


# --- can the kernels run on this device? (moco.py's --fused auto falls back to PyTorch if not) ---
def unusable_reason(device):
    """None if moco_ext's kernels can run on `device` (torch.device or str), else a one-line reason.
    CPU: None. CUDA: the library must have CUDA kernels, one of its code objects must fit the GPU's
    compute capability (_runs_on), and a tiny infonce_loss + enqueue_ on the GPU must give the right answer."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"moco_ext has no kernels for {device.type} devices"
    if not HAS_CUDA:
        return "moco_ext was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "moco_ext: no CUDA GPU is visible"
    cap = torch.cuda.get_device_capability(device)
    codes = CUDA_ARCHS.split(",")
    if not any(_runs_on(c, cap) for c in codes):
        sass = ", ".join(c for c in codes if c.startswith("sm_"))
        ptx = ", ".join(re.sub(r"compute_(\d+)(\d)", r"\1.\2", c) for c in codes if c.startswith("compute_"))
        return (f"moco_ext has CUDA kernels for {sass}{f' (+PTX {ptx})' if ptx else ''} but this GPU "
                f"({torch.cuda.get_device_name(device)}) is sm_{cap[0]}{cap[1]}")
    try:
        _trial_launch(device)
    except Exception as e:  # e.g. "no kernel image is available", a PTX newer than the driver
        return f"moco_ext's CUDA kernels failed a trial run on sm_{cap[0]}{cap[1]}: {str(e).splitlines()[0]}"
    return None


def _runs_on(code, cap):
    """Whether code object `code` (sm_XY binary, compute_XY PTX) runs on compute capability
    cap = (major, minor). A binary runs on its major version at an equal or higher minor, sm_XYa
    only on X.Y; PTX (compiled by the driver) on X.Y and every later GPU, compute_XYa only on X.Y."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", code)
    if m is None:
        return False
    kind, arch, suffix = m.group(1), (int(m.group(2)), int(m.group(3))), m.group(4)
    if suffix == "a":
        return cap == arch
    if kind == "sm" or suffix == "f":
        return cap[0] == arch[0] and cap[1] >= arch[1]
    return cap >= arch


def _trial_launch(device):
    """One row, C = 16, K = 4, all ones: every logit is 16, so loss = log(5); then enqueue_ one key."""
    q = torch.ones(1, 16, device=device)                 # (N, C)
    queue = torch.ones(16, 4, device=device)             # (C, K)
    loss, n_beat = infonce_loss(q, q, queue, 1.0)
    enqueue_(queue, torch.zeros(1, dtype=torch.long, device=device), 2 * q)
    torch.cuda.synchronize(device)
    if abs(loss.item() - math.log(5)) > 1e-4 or n_beat.item() != 0 or queue[:, 0].ne(2).any().item():
        raise RuntimeError(f"wrong result (loss {loss.item():.6f}, expected {math.log(5):.6f})")
