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


def sections(path):
    """-> [(line number, title)] of the section headers `# N. Title` / `# Appendix X. Title` of a script."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return [(i + 1, m.group(1)) for i, line in enumerate(lines)
            if (m := re.match(r"# (\d\. .*|Appendix [A-Z]\. .*)$", line))]


def test_the_algorithm_comes_first_and_is_short():
    """The style guide's reading order (the project's style guide): arguments, then the algorithm core from
    before line ~300 and under ~200 lines, encoders and training, then the appendices; the shared blocks all lie
    in the appendices."""
    for script in ("moco.py", "dim.py"):
        path = os.path.join(ROOT, script)
        found = sections(path)
        titles = [t.split(".")[0] for _, t in found]
        assert titles[:2] == ["1", "2"] and titles[-4:] == ["Appendix A", "Appendix B", "Appendix C", "Appendix D"]
        (core_at, core), (after, _) = found[1], found[2]
        assert "algorithm core" in core and core_at < 300 and after - core_at < 200, (script, core_at, after)
        first_appendix = found[-4][0]
        text = open(path, encoding="utf-8").read().splitlines()
        shared = [i + 1 for i, line in enumerate(text) if line.startswith("# --- shared: ") and "main" not in line]
        assert shared and min(shared) > first_appendix, (script, shared, first_appendix)
