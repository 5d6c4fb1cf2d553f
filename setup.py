"""Build moco_ext: the fused MoCo InfoNCE / queue operators (csrc/).

  pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

The CPU kernels are always built. The CUDA kernels are built whenever a CUDA toolkit is
found (CUDA_HOME / CUDA_PATH, else the toolkit of `nvcc` on PATH), even with no GPU
visible; FORCE_CUDA=1 makes a missing toolkit an error, USE_CUDA=0 skips CUDA.
Architectures: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else "8.0;8.6;8.9;9.0+PTX"
(moco_ext/_build.py, which also holds the compiler flags shared with the JIT build); entries below 8.0
(the kernels need bf16/TF32 tensor cores) are dropped with a warning, and with none left only the CPU
kernels are built.
"""
import os
import shutil

from setuptools import setup


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:  # <root>/bin/nvcc, possibly behind a symlink
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def _load_build_helper():
    """moco_ext/_build.py by path: importing the package would try to load the library not yet built."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moco_ext", "_build.py")
    spec = importlib.util.spec_from_file_location("moco_ext_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build_helper()


cuda_home = None if os.environ.get("USE_CUDA") == "0" else find_cuda_home()
if os.environ.get("FORCE_CUDA") == "1" and cuda_home is None:
    raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if os.environ.get("FORCE_CUDA") == "1" and torch.version.cuda is None:
    raise RuntimeError("FORCE_CUDA=1 but this torch has no CUDA support")
with_cuda = build.with_cuda(cuda_home is not None)  # False, with a warning, if no architecture is left

sources = ["csrc/infonce.cpp", "csrc/infonce_cpu.cpp"]
flags = build.compile_flags(with_cuda, cuda_home)
if with_cuda:
    ext = CUDAExtension("moco_ext._C", sources + ["csrc/infonce_cuda.cu"], py_limited_api=True,
                        extra_compile_args=flags)
else:
    ext = CppExtension("moco_ext._C", sources, py_limited_api=True, extra_compile_args={"cxx": flags["cxx"]})
print(f"moco_ext: building CPU{f' + CUDA ({cuda_home}, arch {build.cuda_arch_list()})' if with_cuda else ' only'}")

setup(
    name="moco_ext",
    version="0.1.0",
    description="Fused MoCo queue InfoNCE loss and in-place queue enqueue (PyTorch custom ops)",
    packages=["moco_ext"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
)
