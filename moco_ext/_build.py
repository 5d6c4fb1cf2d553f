"""Build helper shared by setup.py (loaded by path, before the package is built) and the JIT build."""
import os


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
