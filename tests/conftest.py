import contextlib
import io
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow, which `python -m pytest "
                                                             "-q tests` leaves out (`-m slow`: only those)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a process-level, fault, torchrun or experiment test (10-70 s each on 2 "
                                       "cores); left out unless --runslow or a -m expression is given")


def pytest_collection_modifyitems(config, items):
    """The README's command leaves the slow tests out (the pytest convention: --runslow runs them too); a -m
    expression (`-m slow`, `-m "not slow"`) chooses for itself."""
    if config.getoption("--runslow") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.stash[SLOW_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter, config):
    n = config.stash.get(SLOW_LEFT_OUT, 0)
    if n:
        terminalreporter.write_line(f"{n} slow tests left out (process-level, fault, torchrun and experiment tests): "
                                    "run them with `python -m pytest -q -m slow tests`, everything with --runslow")


SLOW_LEFT_OUT = pytest.StashKey[int]()
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng(request):
    """A random.Random for a test's random choices (the step a signal arrives at, the worker it goes to), seeded
    from TEST_SEED if set, else from the clock. The seed is printed (pytest shows it beside a failure), so that
    `TEST_SEED=N python -m pytest ...` repeats the failing draw."""
    seed = int(os.environ.get("TEST_SEED") or time.time_ns() % 2**32)
    print(f"{request.node.name}: random choices from seed {seed} (TEST_SEED={seed} repeats them)")
    return random.Random(seed)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A small PATH/<class>/*.png folder made from the built-in Fashion-MNIST images (3 classes x 40)."""
    import moco
    root = tmp_path_factory.mktemp("folder")
    x = moco.read_idx(os.path.join(ROOT, "data", "t10k-images-idx3-ubyte.gz"))
    y = moco.read_idx(os.path.join(ROOT, "data", "t10k-labels-idx1-ubyte.gz"))
    from PIL import Image
    for c in range(3):
        d = root / f"class{c}"
        d.mkdir()
        for j, i in enumerate(np.flatnonzero(y == c)[:40]):
            Image.fromarray(x[i]).save(d / f"{j:03d}.png")
    return str(root)


@pytest.fixture(scope="session")
def moco_ckpt(tmp_path_factory, image_folder):
    """A 1-step moco.py checkpoint (basic32, batch 32, K 64) on image_folder: the evaluation tests' encoder."""
    import moco
    out = str(tmp_path_factory.mktemp("moco"))
    moco.main(["--data", image_folder, "--dataset", "folder", "--out", out, "--max-steps", "1", "--batch-size", "32",
               "--moco-k", "64", "--bn-splits", "1", "--workers", "0", "--knn-every", "0"])
    return os.path.join(out, "ckpt.pt")


def load_by_path(relpath):
    """A repository file (e.g. "tests/bench_train.py") loaded as a module by its path, not left in sys.modules."""
    import importlib.util
    name = relpath.replace("/", "_").removesuffix(".py") + "_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def whole(percent, n):
    """Whether `percent` is a whole number of the n test images (a top-1 on the right test set, not just finite)."""
    return abs(percent * n / 100 - round(percent * n / 100)) < 1e-3  # float32 means: not exact


def in_process(main, *argv, check=False):
    """A script's main(argv) in this process -> a CompletedProcess-like (returncode, stdout, stderr); check: a
    non-zero exit raises with its output. The same run as `python SCRIPT argv` without a new interpreter, whose
    start-up (import torch and torchvision) costs ~4 s on the 2-core machine. Every script still runs as a real
    process in some test (moco.py, dim.py, eval_linear.py, study.py, convert.py: `__main__`, exit status)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    if check and code != 0:
        raise AssertionError(f"{argv} exited {code}:\n{out.getvalue()[-2000:]}\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def layout(t):
    """A 4-D tensor's memory order: "channels_last", "contiguous", "either" (one channel or one pixel: both at
    once) or "other"."""
    cl, plain = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return "either" if cl and plain else "channels_last" if cl else "contiguous" if plain else "other"


class Inside:
    """What a run did inside its training steps, seen from there (never read from its log): for every call of an
    nn.Conv2d in training mode (not dim.py's shape probe, not the kNN monitor) its output's dtype and its input's
    and weight's memory order (a global forward hook), and the calls of the functions given to count()."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.convs, self.calls = monkeypatch, [], {}

    def hook(self, mod, inputs, output):
        if isinstance(mod, torch.nn.Conv2d) and mod.training:
            self.convs.append((output.dtype, layout(inputs[0]), layout(mod.weight)))

    def count(self, owner, name, label=None):
        """Count the calls of owner.NAME (a module's function, looked up at each call) under `label`."""
        label, fn = label or name, getattr(owner, name)
        self.calls[label] = 0

        def counted(*a, **k):
            self.calls[label] += 1
            return fn(*a, **k)
        self.monkeypatch.setattr(owner, name, counted)

    def dtypes(self):
        return {d for d, _, _ in self.convs}

    def layouts(self):
        """The memory orders of the convolutions' inputs and weights, leaving out those that are both."""
        return {f for _, x, w in self.convs for f in (x, w)} - {"either"}


@pytest.fixture
def inside(monkeypatch):
    seen = Inside(monkeypatch)
    handle = torch.nn.modules.module.register_module_forward_hook(seen.hook)
    yield seen
    handle.remove()
