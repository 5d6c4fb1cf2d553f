"""Build settings shared by setup.py (loaded by path, before the package is built) and the JIT build
(moco_ext/__init__.py): one set of compiler flags, one CUDA architecture list."""
import os
import re
import sys

# With no GPU visible and no TORCH_CUDA_ARCH_LIST: binaries for A100 (8.0), RTX 30xx/A10/A40 (8.6),
# RTX 40xx/L4/L40 (8.9) and H100/H200 (9.0), plus 9.0 PTX, which the driver compiles at the first launch
# on newer GPUs (Blackwell). nvcc 13 has nothing below 7.5.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# The oldest compute capability the kernels compile for: csrc/infonce_cuda.cu instantiates bf16 and TF32
# wmma fragments, which nvcc accepts from sm_80 (Ampere) on. Older entries are dropped (cuda_arch_list).
MIN_CUDA_ARCH = (8, 0)

CXX_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"]  # Py_LIMITED_API: set by torch
NVCC_FLAGS = ["-O3", "-lineinfo"]
_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")
_warned = set()


def warn(msg):
    """One line on stderr, once per process (setup.py asks for the list more than once)."""
    if msg not in _warned:
        _warned.add(msg)
        print(f"moco_ext: warning: {msg}", file=sys.stderr, flush=True)


def requested_arch_list():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs, +PTX on the newest (as torch does); else DEFAULT."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    import torch
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX" if caps else DEFAULT_CUDA_ARCHS


def _entries(arch_list):
    """"8.0;9.0+PTX" -> (entry, its _ENTRY match) for each entry; ValueError naming one that is not an arch."""
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(f"moco_ext: TORCH_CUDA_ARCH_LIST entry {entry!r} is not like 8.6, 9.0a or 9.0+PTX")
        yield entry, m


def supported_arch_list(arch_list):
    """-> (the entries the kernels compile for, joined by ';', "" if none; the entries dropped). An entry
    below MIN_CUDA_ARCH ("7.5", "7.0+PTX") would make nvcc fail on the whole build, CPU kernels included."""
    kept, dropped = [], []
    for entry, m in _entries(arch_list):
        (kept if (int(m.group(1)), int(m.group(2))) >= MIN_CUDA_ARCH else dropped).append(entry)
    return ";".join(kept), dropped


def cuda_arch_list():
    """The architectures to build for: requested_arch_list() without the entries the kernels cannot compile
    for (one warning names them); "" if none is left: then the build has the CPU kernels only (with_cuda)."""
    requested = requested_arch_list()
    kept, dropped = supported_arch_list(requested)
    if dropped:
        need = ".".join(map(str, MIN_CUDA_ARCH))
        warn(f"CUDA architectures {', '.join(dropped)} of {requested!r} dropped: the kernels need compute "
             f"capability {need} or newer (bf16/TF32 tensor cores)"
             + ("" if kept else "; none is left, so only the CPU kernels are built"))
    return kept


def with_cuda(toolkit_found):
    """Whether the build compiles the CUDA kernels: a toolkit, a CUDA build of torch, and an architecture
    the kernels support (else the CPU kernels only, with cuda_arch_list's warning)."""
    import torch
    return bool(toolkit_found and torch.version.cuda is not None and cuda_arch_list())


def cuda_codes(arch_list):
    """"8.0;9.0+PTX" -> ["sm_80", "sm_90", "compute_90"]: the code objects nvcc puts in the library."""
    codes = []
    for entry, m in _entries(arch_list):
        arch = m.group(1) + m.group(2) + m.group(3)
        codes += [f"sm_{arch}"] + ([f"compute_{arch}"] if m.group(4) else [])
    if not codes:
        raise ValueError(f"moco_ext: empty CUDA architecture list {arch_list!r}")
    return codes


def compile_flags(with_cuda, cuda_home=None, arch_list=None):
    """{"cxx": [...], "nvcc": [...]} for both builds. With CUDA: WITH_CUDA, the -gencode flags (torch adds
    none of its own then) and MOCO_EXT_CUDA_ARCHS, the code objects, which the library reports
    (torch.ops.moco_ext.cuda_archs(), read by moco_ext.unusable_reason). An arch_list given here is
    filtered like the environment's (supported_arch_list), without the warning."""
    if not with_cuda:
        return {"cxx": list(CXX_FLAGS), "nvcc": []}
    codes = cuda_codes(supported_arch_list(arch_list)[0] if arch_list else cuda_arch_list())
    gencode = [f"-gencode=arch=compute_{c[3:]},code={c}" for c in codes if c.startswith("sm_")]
    gencode += [f"-gencode=arch={c},code={c}" for c in codes if c.startswith("compute_")]
    inc = [f for d in pip_cuda_includes(cuda_home) for f in ("-isystem", d)]
    archs = "-DMOCO_EXT_CUDA_ARCHS=" + ",".join(codes)  # for infonce.cpp only: nvcc splits -D values at commas
    return {"cxx": CXX_FLAGS + ["-DWITH_CUDA", archs] + inc,
            "nvcc": NVCC_FLAGS + gencode + ["-DWITH_CUDA"] + inc}


def pip_cuda_includes(cuda_home):
    """A slim toolkit (nvcc + cudart only) lacks headers that torch's CUDA headers include
    (cusparse.h, cublas_v2.h, ...). Take them from the nvidia-* wheels torch installed,
    searched after the toolkit's own directory (-isystem)."""
    if cuda_home is None or os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec else []
    return [os.path.join(r, d, "include") for r in roots for d in sorted(os.listdir(r))
            if os.path.exists(os.path.join(r, d, "include", "cusparse.h"))]
