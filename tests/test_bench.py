"""The benchmark and check scripts are code too: each runs here at a toy size as a subprocess from the repository
root, exactly as the README and tests/gpu_check.sh call them, and must print the lines it promises. The three
stages of tests/gpu_check.sh run as dry runs (GPU_CHECK_DRY=1: CUDA steps skipped, CPU parts at toy sizes) and as
plans of the GPU run (GPU_CHECK_PLAN=1: every command checked, none run, the limits within each stage's deadline),
so that only a GPU can make them fail; stage 1's dry run is check_kernels.py's CPU run and bench_infonce.py --quick,
stage 3's a toy run of bench_e2e.py; the stage's failures without a GPU it requires, at a failed build, and the stale
build lock it removes. Also here: bench_train.py --tiny, and its FLOP count of dim.py's step with the gradient
penalty against a hand count."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import load_by_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
slow = pytest.mark.slow


def env(**extra):
    """The user's environment, plus a just-in-time build of moco_ext where it is not pip-built (a fresh clone)."""
    return {**os.environ, "MOCO_EXT_JIT": "1", "PYTHONUNBUFFERED": "1", **extra}


def check(p, *patterns):
    """Exit status 0, no traceback, and every pattern (a regular expression, per line) in the output."""
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Traceback" not in out, f"exit {p.returncode}:\n{out[-4000:]}"
    for pat in patterns:
        assert re.search(pat, out, re.M), f"{pat!r} not in the output:\n{out[-4000:]}"
    return out


def script(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def gpu_check(stage, tmp_path, timeout=600, mode="GPU_CHECK_DRY", **extra):
    """`bash tests/gpu_check.sh STAGE` as a dry run (or a plan) -> (CompletedProcess, {file name: text} of $OUT)."""
    out = tmp_path / "out"
    p = subprocess.run(["bash", "tests/gpu_check.sh", str(stage)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env(**{**({mode: "1"} if mode else {}), "OUT": str(out),
                                                   "PYTHON": sys.executable, "GPU_CHECK_TMP": str(tmp_path / "runs"),
                                                   **extra}))
    files = sorted(os.listdir(out))
    assert all(os.path.isfile(out / f) and re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert len(files) <= 6, files  # the device tool brings back 8 files per call
    return p, {f: (out / f).read_text() for f in files}


def test_gpu_check_usage():
    p = subprocess.run(["bash", "tests/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage: OUT=DIR bash tests/gpu_check.sh 1|2|3" in p.stderr


STAGES = {1: ("kernels", ["build", "kernels", "infonce", "cuda_tests", "memcheck", "racecheck"]),
          2: ("scripts", ["build", "flags", "fused", "moco_amp", "eval_linear", "torchrun", "dim_amp"]),
          3: ("benchmarks", ["build", "moco_amp_compile", "torchrun_bn_sync", "gpu_aug_tests", "memory",
                            "e2e_amp"])}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_check_plan(tmp_path, stage):
    """GPU_CHECK_PLAN=1: the commands of the GPU run, in order, each valid bash (bash -n), none run; the steps'
    limits add up to at most the stage's 300 s (no step is cut by the deadline); the closing verdict line. Stage
    2's and 3's moco.py, dim.py and eval_linear.py flags at the GPU sizes parse with the scripts' own parsers."""
    import dim
    import eval_linear
    import moco
    name, steps = STAGES[stage]
    p, files = gpu_check(stage, tmp_path, timeout=60, mode="GPU_CHECK_PLAN")
    check(p, rf"gpu_check stage {stage}: 0 step\(s\) failed", rf"^{name}: PASS$")
    planned = re.findall(r"^\[(\w+)\] planned \(limit (\d+) s\)$", files[f"s{stage}_summary.txt"], re.M)
    assert [s for s, _ in planned] == steps
    assert sum(int(t) for _, t in planned) <= 300 and "deadline in 300 s" in p.stdout, planned
    if stage in (2, 3):
        lines = (tmp_path / "runs" / f"s{stage}" / "argv.txt").read_text().splitlines()
        assert len(lines) == (5 if stage == 2 else 2) and not any("--device cpu" in line for line in lines)
        for line in lines:
            name, flags = line.split("\t")
            parse = {"moco.py": moco.parse_args, "dim.py": dim.parse_args, "eval_linear.py": eval_linear.parse_args}
            parse[name](flags.split())


def test_gpu_check_stage1_dry_run(tmp_path):
    """Stage 1 without a GPU: moco_ext loads, check_kernels.py passes on the CPU kernels, bench_infonce.py --quick
    prints its rows and table with what --fused auto takes, the CUDA steps skip."""
    p, files = gpu_check(1, tmp_path)
    check(p, r"^\[cuda_tests\] skipped: no CUDA GPU$", r"^\[memcheck\] skipped: no CUDA GPU$",
          r"^\[racecheck\] skipped: no CUDA GPU$", r"gpu_check stage 1: 0 step\(s\) failed", r"^kernels: PASS$")
    assert set(files) == {"s1_build.txt", "s1_kernels.txt", "s1_infonce.txt", "s1_tests.txt", "s1_sanitizer.txt",
                          "s1_summary.txt"}
    assert re.search(r"moco_ext loaded in \d+ s: HAS_CUDA (True|False)", files["s1_build.txt"])
    kernels = files["s1_kernels.txt"]
    assert len(re.findall(r"^loss  fp(32|64) .* \| PASS$", kernels, re.M)) == 8, kernels
    assert len(re.findall(r"^enqueue_ .* \| PASS$", kernels, re.M)) == 3, kernels
    assert "check_kernels: 11 cases on cpu, 0 failed" in kernels
    assert re.search(r"^\[kernels\] rc=0 in \d+ s: PASS$", files["s1_summary.txt"], re.M)
    infonce = files["s1_infonce.txt"]
    assert re.search(r"^loss fwd\+bwd fp32 N=64 .* speedup +\d+\.\d\dx .* \|dloss\| .* --fused auto: (fused|eager)$",
                     infonce, re.M), infonce
    assert re.search(r"^enqueue_ .* speedup +\d+\.\d\dx$", infonce, re.M), infonce
    assert re.search(r"^ +64 +32 +2048 fp32 +[\d.]+ +[\d.]+ +[\d.]+x +- +- +(fused|eager) +(fused|eager)$", infonce,
                     re.M), infonce


def test_gpu_check_without_the_gpu_it_requires(tmp_path):
    """GPU_CHECK_REQUIRE_GPU=1 (the documented GPU-machine commands) and no GPU: the stage fails at once (no step
    runs) and shows the probe's own error; a python without torch likewise."""
    p, files = gpu_check(2, tmp_path, timeout=120, mode=None, GPU_CHECK_REQUIRE_GPU="1", CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 1 and re.search(r"^probe \| torch .*: RuntimeError: ", p.stdout, re.M), p.stdout
    assert "FAIL at once: no CUDA GPU visible" in p.stdout and p.stdout.rstrip().endswith("scripts: FAIL")
    assert list(files) == ["s2_summary.txt"] and "[" not in files["s2_summary.txt"]  # no step ran or skipped
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    p, _ = gpu_check(1, tmp_path, timeout=60, mode=None, GPU_CHECK_REQUIRE_GPU="1", PYTHON=str(fake))
    assert p.returncode == 1 and "probe | ModuleNotFoundError: No module named 'torch'" in p.stdout, p.stdout


def test_gpu_check_stops_at_a_failed_build(tmp_path):
    """A build that fails (here: a python without torch) stops the stage: every later step is skipped, not run."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    p, files = gpu_check(1, tmp_path, timeout=60, mode=None, PYTHON=str(fake))
    summary = files["s1_summary.txt"]
    assert p.returncode == 1 and re.search(r"^\[build\] rc=1 in \d+ s: FAIL$", summary, re.M), summary
    assert "[kernels] skipped: the build failed" in summary and "[infonce] skipped: the build failed" in summary
    assert summary.rstrip().endswith("kernels: FAIL")


@slow
def test_gpu_check_removes_a_stale_build_lock(tmp_path):
    """A build killed by a timeout leaves torch's lock file, on which the next build waits forever where torch's lock
    is a file whose existence blocks (torch 2.14 here holds an advisory lock on it instead, and keeps the file): in
    the check's own extension folder (GPU_CHECK_EXT_DIR; on a GPU, by default) it is removed before the build."""
    lock = tmp_path / "ext" / "moco_ext_jit" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("stale")
    p, files = gpu_check(1, tmp_path, GPU_CHECK_EXT_DIR=str(tmp_path / "ext"))
    check(p, r"^kernels: PASS$")
    build = files["s1_build.txt"]
    assert f"removed a stale build lock: {lock}" in build and build.index(str(lock)) < build.index("moco_ext loaded")
    assert not lock.exists() or lock.read_text() == ""  # gone, or torch's own (empty) lock file since


@slow
def test_gpu_check_stage2_dry_run(tmp_path):
    """Stage 2 without a GPU: the --fused on/off comparison runs (3 CPU steps), the CUDA steps skip."""
    p, files = gpu_check(2, tmp_path)
    check(p, r"gpu_check stage 2: 0 step\(s\) failed", r"^scripts: PASS$",
          *(rf"^\[{s}\] skipped: no CUDA GPU$" for s in ("moco_amp", "eval_linear", "torchrun", "dim_amp")))
    assert re.search(r"^frozen weights \(--lr 1e-30\): steps 1-3 within 1\.0e-05: yes", files["s2_fused.txt"], re.M)


@slow
def test_gpu_check_stage3_dry_run(tmp_path):
    """Stage 3 without a GPU: bench_e2e.py at a toy size, the CUDA steps skip."""
    p, files = gpu_check(3, tmp_path)
    check(p, r"gpu_check stage 3: 0 step\(s\) failed", r"^benchmarks: PASS$",
          *(rf"^\[{s}\] skipped: no CUDA GPU$" for s in ("moco_amp_compile", "torchrun_bn_sync", "gpu_aug_tests")))
    assert re.search(r"^200 epochs estimated: [\d.]+ min", files["s3_e2e.txt"], re.M), files["s3_e2e.txt"]
    for text in files.values():
        assert "Traceback" not in text


@slow
def test_bench_train_tiny():
    """tests/bench_train.py --tiny: every row at toy sizes (not in the GPU check's budget; run by hand on a GPU)."""
    train = check(script("tests/bench_train.py", "--tiny", timeout=600))
    for row in ("moco basic32 32px b16 K256", r"dim basic32 32px b4 \(dimL, vs fp32 eager\)"):
        assert re.search(rf"^{row} +[\d.]+ +[\d.]+ +[\d.]+x +[\d.]+$", train, re.M), train  # img/s, ratio, GFLOP
    assert re.search(r"^data path, 32px pairs/s .*: [\d.]+x$", train, re.M), train
    assert re.search(r"^data path, dim\.py .*: [\d.]+x$", train, re.M), train


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "tests"))
                                        if re.fullmatch(r"(bench_.*|check_kernels)\.py", f)))
def test_script_finds_the_repository(name):
    """`python tests/X.py` puts tests/ first on sys.path, not the repository root: a script that imports moco_ext,
    moco, dim or gpu_aug must add the root before, or it only runs where moco_ext is pip-installed (an editable
    install finds it from anywhere, so the dry runs above would not notice in CI)."""
    src = open(os.path.join(ROOT, "tests", name)).read()
    imports = [m.start() for m in re.finditer(r"^(import|from) (moco_ext|moco|dim|gpu_aug|eval_linear)\b", src, re.M)]
    if imports:
        root = src.find("sys.path.insert(0, ROOT)")
        assert 0 <= root < min(imports), f"{name} imports the repository's modules before putting ROOT on sys.path"


def test_bench_hotpath():
    check(script("tests/bench_hotpath.py", "--quick"), r"^InfoNCE at K=4096, batch 8: with the per-step queue clone "
          r"[\d.]+ ms, without [\d.]+ ms$", r"^mi_loss split, .* views [\d.]+ ms$", r"^_batch_shuffle, .* ms$")


@slow
def test_bench_curves(tmp_path):
    """Two dim.py variants x 2 seeds x 2 steps, kept, then compared with the kept folder (--against)."""
    out = check(script("tests/bench_curves.py", "--scripts", "dim.py", "--seeds", "2", "--max-steps", "2",
                       "--window", "1", "--workers", "0", "--knn-every", "0", "--batch-size", "16",
                       "--keep", str(tmp_path), "--against", str(tmp_path)),
                r"^# dim\.py .* --batch-size 16, built-in data, 3 epoch\(s\) = 2 steps, cpu, seeds 0-1$",
                r"^ +1-1 +[\d.]+ \([\d.]+\) +[\d.]+ \([\d.]+\)$",
                r"^ +\+gpu-aug: mean \|difference\| [\d.]+, mean \|z\| [\d.]+", r"^ +reference: equal \(2 losses")
    assert out.count("equal (2 losses, 0 kNN)") == 4


def load_bench_train():
    """tests/bench_train.py as a module, by path (not left in sys.modules)."""
    return load_by_path("tests/bench_train.py")


def test_dim_flops_with_gradient_penalty():
    """bench_train.count_flops runs dim.py's step with the prior's gradient penalty (autograd.grad with
    create_graph, where FlopCounterMode raises) and counts it right:
    1. the prior discriminator D (Linear layers of in x out weights, P = sum in*out) by hand, per input (real
       and fake, N rows each). Without the penalty: forward 2NP, weight gradients 2NP, input gradients of every
       layer but the first (the inputs need none) 2N(P - P_first): 4N(3P - P_first) for the two. With it:
       forward 2NP; the penalty's input gradients of every layer 2NP; the backward of the forward graph, weights
       and inputs, 4NP; the backward of the gradient graph (each g_in = g_out W: dW and d g_out, 4N in*out,
       except the last layer, whose g_out is a constant: dW only) 4N(P - P_last) + 2N P_last: 4N(6P - P_last)
       for the two.
    2. the whole step: FlopCounterMode's count without the penalty, plus the difference of 1."""
    import dim
    from torch.utils.flop_counter import FlopCounterMode
    bt = load_bench_train()
    torch.manual_seed(0)
    d = dim.prior_discriminator(64)
    layers = [(m.in_features, m.out_features) for m in d.modules() if isinstance(m, nn.Linear)]
    P, first, last = sum(i * o for i, o in layers), layers[0][0] * layers[0][1], layers[-1][0] * layers[-1][1]
    N = 8
    y = torch.randn(N, 64)

    def prior_step(gp):
        return lambda: dim.prior_d_loss(d, y, gp)[0].backward()
    assert bt.count_flops(prior_step(0.0)) == 4 * N * (3 * P - first)
    assert bt.count_flops(prior_step(1.0)) == 4 * N * (6 * P - last)

    args, args_nogp = bt.dim_args(), bt.dim_args("--prior-gp", "0")
    assert args.prior_gp > 0 and args_nogp.prior_gp == 0
    x = torch.randn(4, 3, args.image_size, args.image_size)  # (4, 3, 32, 32)
    step = bt.dim_step(args_nogp, x)  # built outside the counters: building the model runs a forward pass
    with FlopCounterMode(display=False) as fc:
        step()
    assert bt.count_flops(bt.dim_step(args_nogp, x)) == fc.get_total_flops()
    assert bt.count_flops(bt.dim_step(args, x)) == fc.get_total_flops() + 4 * len(x) * (3 * P - last + first)


def test_bench_memory_tiny():
    """tests/bench_memory.py --tiny: a row per preset with every column, as the README's table is made."""
    out = check(script("tests/bench_memory.py", "--tiny"))
    for name in ("v1", "v2", "cifar", "dimL"):
        assert re.search(rf"^{name} +\d+ +\d+ +(\d+\.\d +){{8}}\d+\.\d\dGi +\d+\.\d\dGi +\d+\.\d +\d+\.\d (s|min)$", out,
                         re.M), out
        assert re.search(rf"^{name} +\d+ steps per epoch, floor at 989 dense bf16 TFLOP/s", out, re.M), out


def test_saved_tensor_count_against_a_hand_count():
    """bench_memory's activation count on Linear(10, 20) - ReLU - Linear(20, 5) at batch N against a hand count.
    float32: the first Linear saves its input (N x 10) for its weight's gradient (not its weight: the input needs no
    gradient), ReLU its output (N x 20), which the second Linear saves again (the same storage, counted once) with its
    weight (a parameter, not counted). bf16 autocast: the casts are new tensors, 2 bytes each: the input (N x 10),
    the ReLU's output (N x 20) and the second weight (5 x 20)."""
    bm = load_by_path("tests/bench_memory.py")
    torch.manual_seed(0)
    net, N = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)), 7
    x = torch.randn(N, 10)
    params, cpu = list(net.parameters()), torch.device("cpu")
    assert bm.activations(lambda: net(x), params, cpu, None) == 4 * (N * 10 + N * 20)
    assert bm.activations(lambda: net(x), params, cpu, torch.bfloat16) == 2 * (N * 10 + N * 20 + 100)


def test_bench_memory_extrapolation_is_exact():
    """cifar's batch of 512 is measured at 64 and 128 and extrapolated linearly: exact, since every saved tensor and
    FLOP of MoCo's step is proportional to the batch or constant. Here: batch 12 measured directly against batch 4
    and 8 extrapolated (ResNet-18 with the CIFAR stem, 32 px, 2 batch-norm groups)."""
    bm = load_by_path("tests/bench_memory.py")
    direct = bm.measure("cifar", torch.device("cpu"), True, 989.0, 12, batch=12)
    line = bm.measure("cifar", torch.device("cpu"), True, 989.0, 8, batch=12)
    assert direct["sizes"] == [12] and line["sizes"] == [4, 8]
    for k in ("act_fp32", "act_bf16", "flops"):
        assert line[k] == direct[k], (k, line[k], direct[k])
    assert line["parts"] == direct["parts"]
