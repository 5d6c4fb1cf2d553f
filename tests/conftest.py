import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run of a script (8-45 s each here); "
                                       "`pytest -m 'not slow'` is the quick subset")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


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
