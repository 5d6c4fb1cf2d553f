"""The docs cannot rot. In README.md, docs/*.md and csrc/README.md: every relative link and image exists (and its
#anchor is a heading of the page it points to); every command in their shell blocks (`python SCRIPT.py ...`,
`torchrun ... SCRIPT.py ...`, `python -m torch.distributed.run ...`, `bash SCRIPT.sh`) names a script of the
repository and, for the six user-facing scripts, parses with that script's own argument parser and passes the checks
its run makes before any work (moco.py's and dim.py's check_args on torchrun's number of processes, eval_linear.py's
check_flags; nothing runs); the
README's quick start holds the two set-up commands, and they are the ones .ci/run runs; and no page cites an issue
number or a file outside the repository. Parsing only: well under a second after the imports."""
import argparse
import contextlib
import glob
import io
import os
import re
import shlex

import pytest
import torch
import torch.distributed.run as torchrun

import convert
import dim
import eval_linear
import moco
import plot
import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
         os.path.join("csrc", "README.md")]
SHELL = {"", "bash", "sh", "shell", "console"}  # fenced blocks read as commands; label output ```text
SEPARATORS = set("();<>|&")  # a token made of these ends a command: && || ; | & ( ) and redirections
WRAPPERS = {"env", "srun", "time", "nohup", "exec", "sudo"}  # words that run the command after them


class Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once a script's main() has parsed its arguments."""


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def blocks(text):
    """-> [(language, first line number, [lines])] of the fenced code blocks, and the text outside them (code
    blocks blanked, line numbers kept)."""
    found, prose, fence, lang, start, body = [], [], None, "", 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, start, body = m.group(1), m.group(2).lower(), n + 1, []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            found.append((lang, start, body))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"a code block opened on line {start - 1} is never closed"
    return found, prose


def slug(heading):
    """GitHub's anchor of a heading: markup and punctuation dropped (hyphens and underscores kept), lower case,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(page):
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for line in blocks(read(page))[1]:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page):
    """-> [(line number, target)] of the Markdown links and images (and HTML src/href) outside code."""
    out = []
    for n, line in enumerate(blocks(read(page))[1], 1):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        out += [(n, t) for t in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
        out += [(n, t) for t in re.findall(r"\b(?:src|href)=\"([^\"]+)\"", line)]
    return out


def commands(lines, first=1):
    """Shell lines -> [(line number, tokens)] of the simple commands in them: continuations (a trailing \\) joined,
    comments dropped, split at &&, ||, ;, |, & and parentheses."""
    out, pending, start = [], "", first
    for n, line in enumerate(lines, first):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # a quotation that goes on over the next line
            pending += line + "\n"
            continue
        pending, command = "", []
        for tok in tokens + [";"]:
            if tok and set(tok) <= SEPARATORS:
                if command:
                    out.append((start, command))
                command = []
            else:
                command.append(tok)
    return out


def program(tokens):
    """A command's tokens from its program on: environment assignments and wrappers (env -u X, srun, ...) dropped;
    `python -m pip` is `pip`. None where the command runs nothing of ours or pip's."""
    i = 0
    while i < len(tokens) and re.match(r"[A-Za-z_]\w*=", tokens[i]):
        i += 1
    if i < len(tokens) and tokens[i] in WRAPPERS:
        rest = [j for j in range(i, len(tokens)) if tokens[j] in ("python", "python3", "torchrun", "pip", "bash")]
        if not rest:
            return None
        i = rest[0]
    tokens = tokens[i:]
    if not tokens:
        return None
    if tokens[0] == "python3":
        tokens = ["python", *tokens[1:]]
    if tokens[:3] == ["python", "-m", "pip"]:
        return ["pip", *tokens[3:]]
    return tokens


def parse_in_main(main, argv):
    """Run main(argv) only as far as its ArgumentParser.parse_args (convert.py and plot.py build their parser in
    main): the parse happens, then Parsed stops the script before it does anything."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))
    argparse.ArgumentParser.parse_args = parse_only
    try:
        main(argv)
    except Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("main() returned without parsing its arguments")


def training_checks(script):
    """The script's parser, then the checks its run makes before any work (check_args: the values, the number of
    processes and the device): a GPU unless --device cpu, as the documented multi-process commands assume."""
    def check(argv, world):
        args = script.resolve(script.parse_args(argv)[0])
        script.check_args(args, world, torch.device("cpu" if args.device == "cpu" else "cuda"))
    return check


PARSERS = {"moco.py": training_checks(moco), "dim.py": training_checks(dim),
           "eval_linear.py": lambda argv, world: eval_linear.check_flags(eval_linear.parse_args(argv), world),
           "study.py": lambda argv, world: study.parse_args(argv),
           "convert.py": lambda argv, world: parse_in_main(convert.main, argv),
           "plot.py": lambda argv, world: parse_in_main(plot.main, argv)}


def processes(ns):
    """The number of processes a torchrun command starts: --nproc_per_node x --nnodes (their largest values)."""
    nproc = int(ns.nproc_per_node) if str(ns.nproc_per_node).isdigit() else 8
    return nproc * int(str(ns.nnodes).split(":")[-1])


def check_script(script, argv, world=1):
    """'' if `script argv` on `world` processes is a command of this repository that parses and passes the script's
    own checks of its values, else why not."""
    if script in PARSERS:
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                PARSERS[script](argv, world)
        except SystemExit as e:  # --help exits 0; argparse's own errors exit 2 with the message on stderr
            return "" if e.code in (0, None) else err.getvalue().strip().splitlines()[-1:] or [f"exit {e.code}"]
        except Exception as e:  # the scripts' one-line UserError
            return f"{type(e).__name__}: {e}"
        return ""
    if not os.path.isfile(os.path.join(ROOT, script)):
        return f"no such file in the repository: {script}"
    return ""


def check_command(tokens):
    """'' if a command parses (or is not one of ours to parse), else why not."""
    tokens = program(tokens)
    if tokens is None or tokens[0] == "pip":
        return ""
    if tokens[0] == "bash" and len(tokens) > 1 and tokens[1].endswith(".sh"):
        return check_script(tokens[1], [])
    launch = None
    if tokens[0] == "torchrun":
        launch = tokens[1:]
    elif tokens[0] == "python":
        args = [t for t in tokens[1:]]
        if args[:2] == ["-m", "torch.distributed.run"]:
            launch = args[2:]
        elif not args or args[0] in ("-m", "-c"):  # python -m pytest, -m venv, -c "...": not a script
            return ""
        else:
            while args and args[0].startswith("-"):  # interpreter options such as -u
                args = args[1:]
            return check_script(args[0], args[1:]) if args else ""
    else:
        return ""
    err = io.StringIO()
    try:  # torchrun's own parser splits its flags from the script's, and checks its flags
        with contextlib.redirect_stderr(err):
            ns = torchrun.parse_args(launch)
    except SystemExit:
        return "torchrun: " + " ".join(err.getvalue().strip().splitlines()[-1:])
    if ns.module or ns.no_python:
        return ""
    return check_script(ns.training_script, ns.training_script_args, processes(ns))


# ----------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------
def test_pages_are_found():
    assert "docs/moco.md" in [p.replace(os.sep, "/") for p in PAGES] and len(PAGES) >= 5, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_links_and_images_exist(page):
    bad = []
    for n, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path:
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
            if not full.startswith(ROOT + os.sep) or not os.path.exists(full):
                bad.append(f"{page}:{n}: {target}: no such file in the repository")
                continue
            linked = os.path.relpath(full, ROOT)
        else:
            linked = page
        if anchor and linked.endswith(".md") and anchor not in anchors(linked):
            bad.append(f"{page}:{n}: {target}: no heading #{anchor} in {linked}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_commands_parse(page):
    bad = []
    for lang, first, lines in blocks(read(page))[0]:
        if lang not in SHELL:
            continue
        for n, tokens in commands(lines, first):
            why = check_command(tokens)
            if why:
                bad.append(f"{page}:{n}: {shlex.join(tokens)}\n    {why}")
    assert not bad, ("commands that do not parse (an output block? label it ```text):\n" + "\n".join(bad))


def test_the_commands_are_checked():
    """The checker itself: a bad flag, a bad value and a missing script fail; what is not ours is left alone."""
    assert check_command(["python", "moco.py", "--preset", "v2"]) == ""
    assert check_command(["torchrun", "--nproc_per_node=8", "moco.py", "--data", "~/imagenet"]) == ""
    assert check_command(["python", "convert.py", "a.pt", "b.pth"]) == ""
    assert check_command(["python", "plot.py", "runs/moco", "--out", "c.png"]) == ""
    assert check_command(["PET_X=1", "srun", "python", "dim.py", "--preset", "dimL"]) == ""
    assert check_command(["python", "moco.py", "--no-such-flag"])
    assert check_command(["python", "moco.py", "--moco-k", "1e3"])
    assert check_command(["python", "dim.py", "--estimator", "mine"])
    assert check_command(["python", "study.py", "--experiment", "mechanisms"])  # --data is required
    assert "--moco-k 64 is smaller than" in check_command(["python", "moco.py", "--moco-k", "64"])  # batch 256
    assert "not divisible by the 3 processes" in check_command(["torchrun", "--nproc_per_node=3", "moco.py"])
    assert "not divisible by the 6 processes" in check_command(["torchrun", "--nnodes=2", "--nproc_per_node=3",
                                                                 "moco.py"])
    assert "--bn sync needs GPUs" in check_command(["torchrun", "--nproc_per_node=2", "moco.py", "--bn", "sync",
                                                    "--device", "cpu"])
    assert check_command(["torchrun", "--nproc_per_node=2", "moco.py", "--bn", "sync"]) == ""  # on GPUs
    assert "--lr 0.0 must be > 0" in check_command(["python", "dim.py", "--lr", "0"])
    assert "--epochs 0 must be >= 1" in check_command(["python", "eval_linear.py", "--pretrained", "a.pt", "--epochs",
                                                       "0"])
    assert check_command(["python", "convert.py", "only-one-argument"])
    assert check_command(["python", "plot.py"])
    assert check_command(["torchrun", "--no-such-torchrun-flag", "moco.py"])
    assert check_command(["python", "tests/no_such_bench.py"])
    assert check_command(["python", "-m", "pytest", "-q", "tests"]) == ""
    assert check_command(["pip", "install", "-r", "requirements.txt"]) == ""
    assert [t for _, t in commands(["A=1 python moco.py --lr 0.1 \\", "  --wd 0 && python -m pytest  # x"])] == [
        ["A=1", "python", "moco.py", "--lr", "0.1", "--wd", "0"], ["python", "-m", "pytest"]]


def quick_start():
    """The lines of the first code block under the README's "Quick start" heading, comments dropped."""
    text = read("README.md")
    at = re.search(r"^#+\s*Quick start\s*$", text, re.M | re.I)
    assert at, "README.md has no Quick start heading"
    lang, first, lines = blocks(text[at.end():])[0][0]
    return [(n, t) for n, t in commands(lines, first)], [l for l in lines if l.split("#")[0].strip()]


def ci_commands():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        return [c for c in (program(t) for _, t in commands(f.read().splitlines())) if c]


def test_quick_start_is_what_ci_runs():
    cmds, lines = quick_start()
    assert len(lines) == 2, f"the README's quick start holds {len(lines)} command lines, not the two set-up commands"
    readme = [program(t) for _, t in cmds]
    ci = ci_commands()
    for cmd in readme:
        if cmd[0] == "python" and cmd[1].endswith(".py"):  # a training command: CI may run it with more flags
            ok = any(c[:len(cmd)] == cmd for c in ci)
        else:
            ok = cmd in ci
        assert ok, f"the README's quick start runs `{shlex.join(cmd)}`, which .ci/run does not"
    rest = ["python", "-m", "pytest", "-q", "-m", "slow", "tests"]  # the tests the README's command leaves out
    assert ci[-2:] == [readme[-1], rest], (f"the README's test command `{shlex.join(readme[-1])}` then "
                                           f"`{shlex.join(rest)}` are not .ci/run's last commands: {ci[-2:]}")
    assert ["pip", "install", "-r", "requirements.txt"] in readme and ["python", "moco.py"] in readme


def no_refs(text):
    """The text without what may carry a '#number': URLs, link targets, other repositories' issues (owner/repo#12)."""
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"[\w.-]+/[\w.-]+#\d+", "", text)


@pytest.mark.parametrize("page", PAGES)
def test_no_issue_numbers_or_outside_paths(page):
    text = read(page)
    bad = [f"{page}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
           for pattern in (r"(?<![\w&])#\d+\b", r"\bissues?\s*#?\s*\d+", r"\bthe issue\b", r"\.\./shared\b")
           for m in re.finditer(pattern, no_refs(text) if "#" in pattern else text, re.I)]
    assert not bad, "user-facing text cites an issue or a path outside the repository:\n" + "\n".join(bad)
