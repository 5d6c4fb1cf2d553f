"""moco_ext: fused MoCo queue InfoNCE (He et al. 2020, arXiv 1911.05722v3, Eq. 1).

    logits = moco_ext.infonce_logits(q, k, queue, T)       # [N, 1+K], label 0
    loss, n_beat = moco_ext.infonce_loss(q, k, queue, T)    # [N] each, no logits in memory
    moco_ext.enqueue_(queue, ptr, keys)                     # queue[:, (ptr+i) % K] = keys[i]

q, k: [N, C]; queue: [C, K] (MoCo's buffer); ptr: int64 [1] on the queue's device.
n_beat[i] = number of negatives whose logit is strictly above the positive's, so
acc@1 = (n_beat == 0), acc@5 = (n_beat < 5). See csrc/README.md.

Loading: the compiled moco_ext._C (pip install --no-build-isolation -e .), else, with
MOCO_EXT_JIT=1, a ninja build of csrc/ on import (CUDA kernels included when a GPU is
visible and a toolkit is found, or with FORCE_CUDA=1).
"""
import os

import torch

from ._build import pip_cuda_includes


def _jit_build():
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    sources = [os.path.join(csrc, f) for f in ("infonce.cpp", "infonce_cpu.cpp")]
    cflags = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"]
    cuda_flags = ["-O3", "-lineinfo"]
    with_cuda = (cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
                 and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"))
    if with_cuda:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # torch fails with no GPU and no list
        sources.append(os.path.join(csrc, "infonce_cuda.cu"))
        inc = [f for d in pip_cuda_includes(cpp_extension.CUDA_HOME) for f in ("-isystem", d)]
        cflags += ["-DWITH_CUDA"] + inc
        cuda_flags += ["-DWITH_CUDA"] + inc
    cpp_extension.load(
        name="moco_ext_jit" + ("_cuda" if with_cuda else ""), sources=sources,
        is_python_module=False, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
        verbose=os.environ.get("MOCO_EXT_VERBOSE") == "1")


try:
    from . import _C  # noqa: F401  (loading runs the TORCH_LIBRARY registrations)
except ImportError as _err:
    if os.environ.get("MOCO_EXT_JIT") != "1":
        raise ImportError(
            "moco_ext: compiled library moco_ext._C not found; build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
            "or set MOCO_EXT_JIT=1 to compile it on import") from _err
    _jit_build()

from .ops import HAS_CUDA, enqueue_, infonce_logits, infonce_loss  # noqa: E402

__all__ = ["infonce_logits", "infonce_loss", "enqueue_", "HAS_CUDA"]
