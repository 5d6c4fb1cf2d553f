"""How moco_ext is built and loaded, without building it: the CUDA architecture list (moco_ext/_build.py, read
by setup.py and the just-in-time build) and MOCO_EXT_EXPECT_BUILT (CI: the pip-built library or an error)."""
import importlib
import re
import sys

import pytest
import torch
from conftest import load_by_path


@pytest.fixture
def build():
    """moco_ext/_build.py loaded by path, as setup.py loads it (no library needed; not left in sys.modules)."""
    return load_by_path("moco_ext/_build.py")


@pytest.mark.parametrize("requested,kept,dropped", [
    ("7.5;8.0;8.6", "8.0;8.6", ["7.5"]),                         # a common CUDA image's list
    ("6.1 7.0+PTX;9.0a", "9.0a", ["6.1", "7.0+PTX"]),
    ("7.5", "", ["7.5"]),
    ("8.0;8.6;8.9;9.0+PTX", "8.0;8.6;8.9;9.0+PTX", []),          # the default: unchanged
    ("8.7;10.0f;12.0+PTX", "8.7;10.0f;12.0+PTX", []),
])
def test_supported_arch_list(build, requested, kept, dropped):
    assert build.supported_arch_list(requested) == (kept, dropped)


def test_arch_list_warns_once_and_may_leave_cpu_only(build, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0;8.6")
    assert build.cuda_arch_list() == "8.0;8.6" and build.cuda_arch_list() == "8.0;8.6"
    assert build.with_cuda(True) and not build.with_cuda(False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "7.5" in err and "8.0" in err, err  # one line, however often asked
    flags = build.compile_flags(True, None)
    assert [f for f in flags["nvcc"] if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_86,code=sm_86"]
    given = build.compile_flags(True, None, "7.5;9.0")  # an explicit list is filtered like the environment's
    assert given["nvcc"].count("-gencode=arch=compute_90,code=sm_90") == 1
    assert not [f for f in given["nvcc"] + given["cxx"] if re.search(r"(sm|compute)_75", f)], given
    assert "-DMOCO_EXT_CUDA_ARCHS=sm_90" in given["cxx"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;7.5+PTX")
    assert build.cuda_arch_list() == "" and not build.with_cuda(True)  # CPU kernels only, never a failure
    assert "only the CPU kernels are built" in capsys.readouterr().err


def test_visible_pre_ampere_gpu_builds_cpu_only(build, monkeypatch, capsys):
    """No TORCH_CUDA_ARCH_LIST: the visible GPUs decide; a V100 (7.0) beside an A100 leaves 8.0 only."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 0))
    assert build.cuda_arch_list() == "" and not build.with_cuda(True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(7, 0), (8, 0)][i])
    assert build.cuda_arch_list() == "8.0+PTX" and build.with_cuda(True)
    assert "7.0" in capsys.readouterr().err


@pytest.fixture
def fresh_import():
    """moco_ext imported anew inside the test; its sys.modules entries are put back afterwards."""
    def ours(name):
        return name == "moco_ext" or name.startswith("moco_ext.")
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    try:
        yield lambda: importlib.import_module("moco_ext")
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_expect_built_never_rebuilds(fresh_import, monkeypatch):
    """MOCO_EXT_EXPECT_BUILT=1 (CI after its pip install): a moco_ext._C that does not import is an ImportError
    that names the cause, even with MOCO_EXT_JIT=1, and no just-in-time build starts."""
    from torch.utils import cpp_extension
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.setenv("MOCO_EXT_EXPECT_BUILT", "1")
    monkeypatch.setenv("MOCO_EXT_JIT", "1")
    sys.modules["moco_ext._C"] = None  # `from . import _C` raises ImportError, as for a missing or broken library
    with pytest.raises(ImportError, match="MOCO_EXT_EXPECT_BUILT=1 but the compiled library moco_ext._C"):
        fresh_import()
    assert calls == []
