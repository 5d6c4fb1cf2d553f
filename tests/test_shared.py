"""The blocks marked "# --- shared: NAME ---" are byte-identical in moco.py and dim.py: the plumbing (utilities,
data, kNN monitor, main, and the run loop) is one piece of code in two self-contained files."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_blocks(path):
    text = open(path, encoding="utf-8").read()
    return dict(re.findall(r"(?ms)^# --- shared: ([\w ]+) ---\n(.*?)^# --- end shared: \1 ---$", text))


def test_shared_blocks_identical():
    moco, d = shared_blocks(os.path.join(ROOT, "moco.py")), shared_blocks(os.path.join(ROOT, "dim.py"))
    assert {"utilities", "data", "knn", "main", "run"} <= set(d) and set(moco) == set(d)
    for name in d:
        assert d[name] == moco[name], f"shared block {name!r} differs between moco.py and dim.py"


def test_shared_block_check_can_fail(tmp_path):
    """The pattern finds a block and sees a one-character change."""
    text = "# --- shared: x ---\na = 1\n# --- end shared: x ---\n"
    (tmp_path / "a.py").write_text(text)
    (tmp_path / "b.py").write_text(text.replace("1", "2"))
    a, b = shared_blocks(tmp_path / "a.py"), shared_blocks(tmp_path / "b.py")
    assert a == {"x": "a = 1\n"} and a != b
