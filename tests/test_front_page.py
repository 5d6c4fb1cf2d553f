"""The README as a researcher reads it before the first GPU hour: its status sentence agrees with the docs (no GPU
measurement while it says none exists, and the other way round); every checkpoint an evaluation or export line reads
was written by an earlier line; every ordering its prose states holds in the tables it summarises; it links the
papers, the official code and where the official checkpoints come from."""
import os
import re
import shlex

import pytest
import torch.distributed.run as torchrun

import dim
import moco
from test_docs import PAGES, blocks, commands, program, read

NONE_ON_GPU = "Nothing has run on a GPU yet"
GPU = r"(?:NVIDIA |Tesla )?(?:[AHV]100|H200|GH200|B200|A10G?|A40|A6000|L4|L40S?|T4|RTX ?\d{4}|MI[23]\d0X?)s?"
MEASURED_ON_GPU = re.compile(rf"\b(?:[Mm]easured|[Tt]imed|[Rr]an)\b(?:(?!\. ).){{0,200}}?\bon "
                             rf"(?:an? |one |the |\d+ ?x? ?)?{GPU}\b")


def paragraphs(page):
    """The prose of a page (code blocks blanked), as paragraphs joined into one line each."""
    return [" ".join(p.split()) for p in "\n".join(blocks(read(page))[1]).split("\n\n") if p.strip()]


def gpu_measurements():
    """-> [(page, sentence)] of the docs that record a measurement on a GPU ('measured ... on an H100')."""
    return [(page, m.group(0)) for page in PAGES for p in paragraphs(page) for m in MEASURED_ON_GPU.finditer(p)]


@pytest.mark.parametrize("sentence, found", [
    ("Measured 2027-01-05 on one H100 (torch 2.14.1): 1.2 s per step.", True),
    ("bench_e2e.py measured 3 epochs on 8 A100s: 41 s each.", True),
    ("The kernels ran on an NVIDIA H200 in 0.8 ms.", True),
    ("Measured 2026-12-07 on the 2-core machine (no GPU), torch 2.14.1.", False),
    ("the floor is the step's FLOPs at an H100's dense bf16 peak (989 TFLOP/s)", False),
    ("the official v2 run took 53 h for 200 epochs on 8 V100s", False),
    ("sized to fit a few minutes each on an H100 or H200", False)])
def test_gpu_measurement_detector(sentence, found):
    assert bool(MEASURED_ON_GPU.search(sentence)) == found


def test_status_sentence_agrees_with_the_docs():
    """The README says what has run where. While it says nothing has run on a GPU, no page records a measurement on
    one; once a page does, the sentence must change (and a README that claims GPU runs needs one recorded). Its
    paragraph links what the GPU check checks."""
    status = next(p for p in paragraphs("README.md") if p.startswith("**What has run where.**"))
    found = gpu_measurements()
    if NONE_ON_GPU in status:
        assert not found, f"the README says '{NONE_ON_GPU}', but the docs record GPU measurements: {found}"
    else:
        assert found, "the README's status says something has run on a GPU, and no page records a measurement on one"
    assert "(docs/testing.md#the-gpu-check)" in status and "CPU" in status


def default_out(script, argv):
    """--out of a moco.py or dim.py command line, its parser's default where not given."""
    return (moco if script == "moco.py" else dim).parse_args(argv)[0].out


def test_readme_commands_chain():
    """Every checkpoint an evaluation, export or plot line of the README reads is written by an earlier line (its
    --out, or the script's default), or is an official checkpoint it links; the pasted Python loads a file an
    export line wrote."""
    text = read("README.md")
    written, reads = set(), []
    for lang, start, lines in blocks(text)[0]:
        if lang == "python":
            reads += [(start, "r50.pth" if "r50.pth" in line else None, "python") for line in lines if "torch.load(" in line]
            for line in lines:
                for path in re.findall(r"torch\.load\(\"([^\"]+)\"\)", line):
                    assert path in written, f"README.md:{start}: the Python loads {path}, which no line above writes"
            continue
        for n, tokens in commands(lines, start):
            tokens = program(tokens)
            if not tokens or tokens[0] not in ("python", "torchrun"):
                continue
            if tokens[0] == "torchrun":
                ns = torchrun.parse_args(tokens[1:])
                script, argv = ns.training_script, ns.training_script_args
            elif tokens[1:2] == ["-m"]:
                continue
            else:
                script, argv = tokens[1], tokens[2:]
            if script in ("moco.py", "dim.py"):
                written.add(os.path.normpath(default_out(script, argv)))
            elif script == "eval_linear.py":
                ckpt = argv[argv.index("--pretrained") + 1]
                reads.append((n, ckpt, script))
                assert os.path.normpath(os.path.dirname(ckpt)) in written, \
                    f"README.md:{n}: eval_linear.py reads {ckpt}, which no line above writes (written: {written})"
            elif script == "convert.py":
                ckpt, out = [a for a in argv if not a.startswith("-")][:2]
                reads.append((n, ckpt, script))
                assert os.path.normpath(os.path.dirname(ckpt)) in written, f"README.md:{n}: convert.py reads {ckpt}"
                written.add(out)
            elif script == "plot.py":
                runs = [a for a in argv[:argv.index("--out")] if not a.startswith("-")] if "--out" in argv else argv
                for run in runs:
                    reads.append((n, run, script))
                    assert os.path.normpath(run) in written, f"README.md:{n}: plot.py reads {run}, not written above"
    assert len([r for r in reads if r[2] == "eval_linear.py"]) >= 4 and any(r[2] == "convert.py" for r in reads)


def test_chain_check_can_fail(monkeypatch):
    """The same check on a README whose ImageNet lines have no --out: the evaluation of runs/v2/ckpt.pt is refused."""
    import test_front_page as me
    text = read("README.md").replace(" --out runs/v2", "")
    assert text != read("README.md")
    monkeypatch.setattr(me, "read", lambda page: text)
    with pytest.raises(AssertionError, match="runs/v2/ckpt.pt"):
        me.test_readme_commands_chain()


def cells(text, heading=None):
    """{first cell (carried down over empty ones), second cell: [cells after them]} of the Markdown table lines of
    `text` (under `heading` alone if given, up to the next heading)."""
    if heading:
        text = text[text.index(heading):]
        text = text[:text.find("\n#", 1) if "\n#" in text[1:] else None]
    rows, first = {}, ""
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        c = [x.strip().strip("*") for x in line.strip().strip("|").split("|")]
        first = c[0] or first
        rows[(first, c[1])] = c[2:]
    return rows


def ms(cell):
    """'88.93 ± 0.15' -> (88.93, 0.15)."""
    m = re.fullmatch(r"(\d+\.\d+) ± (\d+\.\d+)", cell.strip("* "))
    assert m, cell
    return float(m.group(1)), float(m.group(2))


def dim_layers(cell):
    """'88.49 ± 0.23 / 86.81 ± 0.03 / 80.65 ± 0.06' -> [(mean, std)] of conv, fc, Y."""
    return [ms(c) for c in cell.split(" / ")]


def test_prose_orderings_hold_in_the_tables():
    """Each ordering the README's 'What reproduces' paragraph states, read off the tables it summarises (the
    README's, and docs/experiments.md's for the equal-step runs)."""
    readme, exp = read("README.md"), read("docs/experiments.md")
    prose = " ".join(next(p for p in paragraphs("README.md") if p.startswith("What reproduces at this budget")).split())
    t = cells(readme, "## Results at a glance")
    k256 = next(v for (a, b), v in t.items() if "K = 256" in a and "MoCo" in b)
    e2e256 = next(v for (a, b), v in t.items() if "K = 256" in a and b == "end-to-end")
    (mo, so), (me, se) = ms(k256[0]), ms(e2e256[0])
    assert "MoCo and end-to-end equal at K 256 (within a standard deviation)" in prose and abs(mo - me) <= max(so, se)
    steps = cells(exp, "### The three mechanisms at 468 steps per run")
    e2e1024 = ms(steps[("end-to-end, 468 steps at every K", "linear")][1])
    moco1024 = ms(steps[("MoCo (m 0.99)", "linear")][1])
    gap = e2e1024[0] - moco1024[0]
    assert "within 0.3 points at K 1024 with equal steps (end-to-end ahead by about two standard deviations)" in prose
    assert 0 < gap <= 0.3 and 1.5 <= gap / max(e2e1024[1], moco1024[1]) <= 2.5, (e2e1024, moco1024)
    mech = cells(exp, "### MoCo: the three mechanisms against K")
    bank, mocok = [ms(c) for c in mech[("memory bank", "linear")]], [ms(c) for c in mech[("MoCo (m 0.99)", "linear")]]
    assert "the memory bank below MoCo at every K" in prose and all(b[0] < m[0] for b, m in zip(bank, mocok))
    assert "no mechanism gains from a larger K" in prose
    assert max(m for m, _ in mocok) - min(m for m, _ in mocok) <= max(s for _, s in mocok)  # MoCo: level across K
    m99 = next(v for (a, b), v in t.items() if b == "m = 0.99")
    m999 = next(v for (a, b), v in t.items() if b == "m = 0.999")
    assert "m = 0.99 beats 0.999 by the linear probe" in prose and ms(m99[0])[0] > ms(m999[0])[0]
    dl = dim_layers(next(v for (a, b), v in t.items() if b == "DIM(L) JSD")[0])
    dg = dim_layers(next(v for (a, b), v in t.items() if b == "DIM(G)")[0])
    assert "DIM(L) far above DIM(G) on fc and Y" in prose
    for (ml, sl), (mg, sg) in zip(dl[1:], dg[1:]):  # fc, Y: by more than 3 standard deviations
        assert ml - mg > 3 * max(sl, sg), (dl, dg)
    est = cells(exp, "### DIM's estimators at 234 steps per run")
    y = {(e, b): ms(v[3])[0] for (e, b), v in est.items() if e in ("JSD", "infoNCE") and "(" in b}  # Y column
    batches = sorted({b for _, b in y}, key=lambda b: int(b.split()[0]))
    assert "infoNCE gaining from more negatives" in prose and y[("infoNCE", batches[-1])] > y[("infoNCE", batches[0])]
    assert "JSD ahead of it when they are few" in prose and y[("JSD", batches[0])] > y[("infoNCE", batches[0])]
    assert "is at or above it at every batch" in prose and all(y[("JSD", b)] >= y[("infoNCE", b)] for b in batches)
    gain = {e: y[(e, batches[-1])] - y[(e, batches[0])] for e in ("JSD", "infoNCE")}
    assert "JSD gains from a larger batch as much as infoNCE" in prose and gain["JSD"] >= gain["infoNCE"], gain
    eq = {b: v[0] for (a, b), v in t.items() if a.startswith("Equal time")}
    mo, dg = ms(eq["MoCo v2, backbone (fc)"]), ms(eq["DIM(G), fc"])
    jsd, nce = dim_layers(eq["DIM(L) JSD / infoNCE, fc"])
    assert "MoCo v2 is ahead of DIM(L) on fc by about one point" in prose
    assert all(0.7 <= mo[0] - d[0] <= 1.3 and mo[0] - d[0] > 3 * max(mo[1], d[1]) for d in (jsd, nce)), (mo, jsd, nce)
    rand_fc = dim_layers(next(v for (a, b), v in t.items() if b == "random init, conv / fc / Y")[0])[1]
    assert "DIM(G) is below the random encoder" in prose and dg[0] + 3 * max(dg[1], rand_fc[1]) < rand_fc[0]


LINKS = ["https://arxiv.org/abs/1911.05722", "https://arxiv.org/abs/2003.04297", "https://arxiv.org/abs/1808.06670",
         "https://github.com/facebookresearch/moco", "https://github.com/rdevon/DIM",
         "https://colab.research.google.com/github/facebookresearch/moco/blob/colab-notebook/colab/moco_cifar10_demo.ipynb",
         "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar"]


@pytest.mark.parametrize("page", ["README.md", "docs/evaluation.md"])
def test_links_to_papers_code_and_checkpoints(page):
    """The three papers on arXiv, the official repositories, the notebook and where the official checkpoints are
    downloaded: linked from the front page; docs/evaluation.md says where the checkpoint it uses comes from."""
    found = set(re.findall(r"\]\((https?://[^)\s]+)\)", read(page)))
    want = LINKS if page == "README.md" else LINKS[-1:]
    assert set(want) <= found, sorted(set(want) - found)


def test_no_cpu_claim_for_the_gpu_presets():
    """The README does not offer the ResNet-50 presets as something to run on the CPU."""
    for _, start, lines in blocks(read("README.md"))[0]:
        for line in lines:
            if "--preset v1" in line or "--preset v2" in line:
                assert "CPU" not in line and "cpu" not in shlex.split(line.split("#")[0]), line
