"""moco_ext: fused MoCo queue InfoNCE (He et al. 2020, arXiv 1911.05722v3, Eq. 1).

    logits = moco_ext.infonce_logits(q, k, queue, T)       # [N, 1+K], label 0
    loss, n_beat = moco_ext.infonce_loss(q, k, queue, T)    # [N] each, no logits in memory
    moco_ext.enqueue_(queue, ptr, keys)                     # queue[:, (ptr+i) % K] = keys[i]

q, k: [N, C]; queue: [C, K] (MoCo's buffer); ptr: int64 [1] on the queue's device.
n_beat[i] = number of negatives whose logit is strictly above the positive's, so
acc@1 = (n_beat == 0), acc@5 = (n_beat < 5). See csrc/README.md.

Loading: the compiled moco_ext._C (pip install --no-build-isolation -e .), else, with
MOCO_EXT_JIT=1, a ninja build of csrc/ on import (CUDA kernels included when a GPU is
visible and a toolkit is found, or with FORCE_CUDA=1, for the architectures of moco_ext/_build.py).
MOCO_EXT_EXPECT_BUILT=1 (CI after its pip install) makes a missing or broken moco_ext._C an
ImportError even with MOCO_EXT_JIT=1: no silent rebuild. moco_ext.unusable_reason(device) says
whether the kernels can run on a device (None) or why not (a one-line reason).
"""
import os

import torch

from . import _build


def _jit_build():
    """csrc/ compiled with ninja into torch's extension cache (TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions) with setup.py's flags; later imports reuse it until a source or flag changes."""
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    sources = [os.path.join(csrc, f) for f in ("infonce.cpp", "infonce_cpu.cpp")]
    wanted = torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
    with_cuda = wanted and _build.with_cuda(cpp_extension.CUDA_HOME is not None)  # no usable arch: CPU only
    if with_cuda:
        sources.append(os.path.join(csrc, "infonce_cuda.cu"))
    flags = _build.compile_flags(with_cuda, cpp_extension.CUDA_HOME)
    cpp_extension.load(
        name="moco_ext_jit" + ("_cuda" if with_cuda else ""), sources=sources,
        is_python_module=False, extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
        verbose=os.environ.get("MOCO_EXT_VERBOSE") == "1")


try:
    from . import _C  # noqa: F401  (loading runs the TORCH_LIBRARY registrations)
except ImportError as _err:
    if os.environ.get("MOCO_EXT_EXPECT_BUILT") == "1":
        raise ImportError(
            f"moco_ext: MOCO_EXT_EXPECT_BUILT=1 but the compiled library moco_ext._C does not import ({_err}); "
            "rebuild it with `pip install --no-build-isolation -e .` (no just-in-time build in this mode)") from _err
    if os.environ.get("MOCO_EXT_JIT") != "1":
        raise ImportError(
            "moco_ext: compiled library moco_ext._C not found; build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
            "or set MOCO_EXT_JIT=1 to compile it on import") from _err
    _jit_build()

from .ops import CUDA_ARCHS, HAS_CUDA, enqueue_, infonce_logits, infonce_loss, unusable_reason  # noqa: E402

__all__ = ["infonce_logits", "infonce_loss", "enqueue_", "unusable_reason", "HAS_CUDA", "CUDA_ARCHS"]
