"""The GPU path, run on the CPU: everything of it that PyTorch can run here. Autocast (bf16, and fp16 with its
gradient scalers), torch.compile, channels-last memory order, the fused op with each mechanism, the symmetric loss
and the batched augmentation (--gpu-aug), in moco.py and dim.py, on one process and under torchrun (gloo), then
eval_linear.py on what they wrote. What cannot run on a CPU is left to tests/gpu_check.sh: NCCL, SyncBatchNorm
across processes, the CUDA kernels, CUDA graphs of torch.compile and cuDNN's algorithms."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import dim
import eval_linear
import moco
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCO = ["--batch-size", "16", "--moco-k", "64", "--workers", "0", "--knn-every", "0", "--device", "cpu",
        "--log-every", "1", "--epochs", "2", "--max-steps", "2", "--fused", "off"]
UNPINNED = MOCO[:-2]  # without --fused off
DIM = ["--batch-size", "16", "--mi-units", "32", "--local-samples", "8", "--workers", "0", "--knn-every", "0",
       "--device", "cpu", "--log-every", "1", "--epochs", "1", "--max-steps", "2"]


def losses(out):
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def resumed_equals_straight(main, argv, tmp_path):
    """2 steps straight == 1 step, stop, resume to 2: every tensor of the checkpoints equal."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    in_process(main, *argv, "--out", a, check=True)
    in_process(main, *argv, "--max-steps", "1", "--out", b, check=True)
    r = in_process(main, *argv, "--out", b, "--resume", "auto", check=True)
    assert "resumed from" in r.stdout
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=False) for d in (a, b))
    for part in ("model", "prior"):
        for k, v in (ca.get(part) or {}).items():
            assert torch.equal(v, cb[part][k]), (part, k)
    for part in ("scaler", "prior_scaler"):
        assert ca.get(part) == cb.get(part), part
    return a


# ----------------------------------------------------------------------------------------------------
# The hand-written layer on the autocast path: split batch norm
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_batch_norm_under_autocast_takes_float32_statistics(dtype):
    """Under autocast the convolution hands split BN a half-precision batch: its statistics are taken in float32, its
    running buffers stay float32 and its output is in the input's type, as BatchNorm2d's. The reference is
    independent: one nn.BatchNorm2d per group in float32 on the same (rounded) input. The output is that float32
    result rounded once: |y - ref| <= eps/2 |ref| + 2e-6 (measured 2026-12-07 over 50 seeds x 1 and 4 groups: at
    most 5.7e-7 (bf16) and 8.2e-7 (fp16) beyond the rounding, float32 arithmetic in another order). The input's mean
    (8) is large against its spread (0.5), so statistics taken in the half type are far outside that bound
    (measured: 9e-2 bf16, 1e-2 fp16 beyond it)."""
    torch.manual_seed(0)
    half = (torch.randn(16, 8, 5, 5) * 0.5 + 8).to(dtype)
    eps = torch.finfo(dtype).eps
    for splits in (1, 4):
        net = moco.SplitBatchNorm(8, num_splits=splits)
        with torch.no_grad():
            net.weight.uniform_(0.5, 1.5)
            net.bias.uniform_(-1, 1)
        refs = [nn.BatchNorm2d(8) for _ in range(splits)]
        with torch.no_grad():
            for bn in refs:
                bn.weight.copy_(net.weight)
                bn.bias.copy_(net.bias)
        with torch.autocast("cpu", dtype=dtype):
            y = net(half)
        ref = torch.cat([bn(g) for bn, g in zip(refs, half.float().chunk(splits))]).detach()
        assert y.dtype == dtype and net.running_mean.dtype == net.running_var.dtype == torch.float32
        assert torch.allclose(y.float(), ref, rtol=eps / 2, atol=2e-6), \
            ((y.float() - ref).abs() - ref.abs() * eps / 2).max()
        for name in ("running_mean", "running_var"):  # the groups' mean, each with BatchNorm2d's momentum
            mean = torch.stack([getattr(bn, name) for bn in refs]).mean(0)
            assert torch.allclose(getattr(net, name), mean, rtol=1e-6, atol=1e-6), name


def test_encoder_with_split_batch_norm_trains_under_autocast():
    """The crash an --amp user met first: basic32 with 8 batch-norm groups, forward and backward under autocast."""
    net = moco.build_encoder("basic32", "cifar", bn_splits=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(16, 3, 32, 32))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and net.fc.weight.grad is not None


# ----------------------------------------------------------------------------------------------------
# moco.py and dim.py with each option
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [
    ["--amp", "--bn-splits", "2", "--fused", "on", "--channels-last", "on", "--gpu-aug", "off"],
    ["--amp", "--amp-dtype", "float16", "--fused", "off", "--bn-splits", "1"],
    ["--amp", "--symmetric", "--fused", "on", "--bn-splits", "2", "--gpu-aug", "on"],
    ["--amp", "--mechanism", "end-to-end", "--bn-splits", "2", "--channels-last", "on"],
    ["--amp", "--mechanism", "memory-bank", "--fused", "on", "--gpu-aug", "on"],
    ["--amp", "--amp-dtype", "float16", "--mechanism", "memory-bank", "--fused", "off", "--channels-last", "on"],
], ids=["moco-bf16-fused-splitbn-cl", "moco-fp16-scaler", "moco-symmetric-fused-gpuaug", "end-to-end-bf16-cl",
        "memory-bank-bf16-fused-gpuaug", "memory-bank-fp16-cl"])
def test_moco_options_train_and_resume_exactly(flags, tmp_path, inside):
    """Each option is applied inside the step (the convolutions' output dtype under autocast, their inputs' and
    weights' memory order, the calls of the extension's op against the eager functions), trains with finite losses,
    and a run stopped after 1 step and resumed equals 2 straight steps, the gradient scaler's state included."""
    given = dict(zip(flags, flags[1:]))
    ext = moco.load_fused("on", torch.device("cpu")) if given.get("--fused") == "on" else None  # built if need be
    if ext is not None:
        inside.count(ext, "infonce_loss", "fused loss")
        inside.count(ext, "enqueue_", "fused enqueue")
    inside.count(moco, "infonce_loss", "eager loss")
    inside.count(moco, "enqueue", "eager enqueue")
    out = resumed_equals_straight(moco.main, MOCO + flags, tmp_path)  # 2 + 1 + 1 = 4 steps
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out))
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["scaler"].get("scale") is not None if "float16" in flags else not ck["scaler"]
    assert inside.dtypes() == {torch.float16 if "float16" in flags else torch.bfloat16}, inside.dtypes()
    assert inside.layouts() == {"channels_last" if "--channels-last" in flags else "contiguous"}, inside.layouts()
    mechanism = given.get("--mechanism", "moco")
    losses_per_step = 0 if mechanism == "end-to-end" else 2 if "--symmetric" in flags else 1
    enqueues = 4 * (mechanism == "moco")
    if ext is not None:
        assert inside.calls == {"fused loss": 4 * losses_per_step, "fused enqueue": enqueues, "eager loss": 0,
                                "eager enqueue": 0}, inside.calls
    else:
        assert inside.calls == {"eager loss": 4 * losses_per_step, "eager enqueue": enqueues}, inside.calls


@pytest.mark.parametrize("preset, flags", [
    ("dimL", ["--amp", "--channels-last", "on"]),
    ("dimG", ["--amp", "--amp-dtype", "float16", "--gpu-aug", "on"]),
    ("dimLG", ["--amp", "--amp-dtype", "float16", "--channels-last", "on", "--global-critic", "dot"]),
])
def test_dim_options_train_and_resume_exactly(preset, flags, tmp_path, inside):
    """dim.py under autocast (the prior's step outside it with its own scaler), channels-last and --gpu-aug, each
    seen inside the step: the convolutions' output dtype, their inputs' and weights' memory order."""
    out = resumed_equals_straight(dim.main, DIM + ["--preset", preset, *flags], tmp_path)
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out))
    assert inside.dtypes() == {torch.float16 if "float16" in flags else torch.bfloat16}, inside.dtypes()
    assert inside.layouts() == {"channels_last" if "--channels-last" in flags else "contiguous"}, inside.layouts()
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    fp16 = "float16" in flags
    assert bool(ck["scaler"]) == fp16 and bool(ck["prior_scaler"]) == fp16


def test_eval_linear_on_an_autocast_checkpoint(tmp_path, inside):
    """eval_linear.py (the probe, and fine-tuning) reads what an --amp --channels-last run wrote (both options seen
    applied inside its steps)."""
    out = tmp_path / "run"
    in_process(moco.main, *MOCO, "--amp", "--bn-splits", "2", "--channels-last", "on", "--out", out, check=True)
    assert inside.dtypes() == {torch.bfloat16} and inside.layouts() == {"channels_last"}, inside.convs[:3]
    for extra in ([], ["--finetune", "--labels-per-class", "8", "--batch-size", "32"]):
        r = in_process(eval_linear.main, "--pretrained", out / "ckpt.pt", "--epochs", "1", "--workers", "0",
                       "--device", "cpu", "--out", tmp_path / "e.json", *extra, check=True)
        assert "sanity check passed" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [
    (moco, MOCO + ["--amp", "--bn-splits", "2", "--compile", "--fused", "on"]),
    (dim, DIM + ["--preset", "dimLG", "--amp", "--compile"]),
], ids=["moco", "dim"])
def test_compile_trains(script, flags, tmp_path, monkeypatch):
    """--compile (inductor on the CPU) with autocast: the encoders are compiled modules, and compiled graphs ran
    (dynamo's count); they train 2 steps with finite losses."""
    from torch._dynamo.utils import counters
    built, train = [], script.train
    monkeypatch.setattr(script, "train", lambda argv: built.append(train(argv)))
    torch._dynamo.reset()
    counters.clear()
    r = in_process(script.main, *flags, "--out", tmp_path / "run", check=True)
    assert "done: 2 steps" in r.stdout and all(math.isfinite(v) for v in losses(tmp_path / "run"))
    model = built[0][0] if script is dim else built[0]
    encoders = [model.encoder] if script is dim else [model.encoder_q, model.encoder_k]
    assert all(e._compiled_call_impl is not None for e in encoders)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [
    ("moco", MOCO + ["--amp", "--bn-splits", "2", "--fused", "on", "--channels-last", "on", "--symmetric"]),
    ("dim", DIM + ["--preset", "dimLG", "--amp", "--amp-dtype", "float16", "--channels-last", "on"]),
], ids=["moco", "dim"])
def test_options_under_torchrun(script, flags, tmp_path):
    """The same options on 2 processes (gloo): autocast, channels-last, the fused op, the symmetric loss, each seen
    inside every rank's steps (tests/ddp_moco.py observe: the convolutions' dtype and memory order, the op's calls)."""
    import json
    out = tmp_path / "run"
    moco.load_fused("on", torch.device("cpu"))  # built (just in time where it is not installed) before the workers
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/ddp_moco.py", "observe", str(out), script, *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MOCO_EXT_JIT": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "done: 2 steps" in r.stdout and all(math.isfinite(v) for v in losses(out))
    for rank in (0, 1):
        seen = json.load(open(out / f"observed_rank{rank}.json"))
        assert seen["dtypes"] == ["torch.bfloat16" if script == "moco" else "torch.float16"], seen
        assert seen["layouts"] == ["channels_last"], seen
        assert seen["fused loss"] == (2 * 2 if script == "moco" else 0), seen  # 2 steps, symmetric: 2 a step


# ----------------------------------------------------------------------------------------------------
# What the GPU path chooses
# ----------------------------------------------------------------------------------------------------
def test_amp_on_the_cpu_is_honoured_with_a_note(tmp_path):
    r = in_process(moco.main, *MOCO, "--amp", "--out", tmp_path / "a", check=True)
    assert "note: --amp on the CPU: bfloat16 autocast" in r.stdout
    r = in_process(moco.main, *MOCO, "--out", tmp_path / "b", check=True)
    assert "note: --amp" not in r.stdout


def fused_line(out):
    """The JSON line of --fused auto's measurement in a run's metrics.jsonl."""
    import json
    return [m for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "fused_ms" in m]


def test_fused_auto_measures_and_the_chosen_path_runs(tmp_path, inside):
    """--fused auto on the CPU kernels, timed for real: one log line with both times (and its JSON line), the faster
    path taken and called in the steps, the choice in the checkpoint; the measurement draws from a generator of its
    own, so the run equals the run pinned to the same choice, to the bit."""
    ext = moco.load_fused("on", torch.device("cpu"))
    inside.count(ext, "infonce_loss", "fused loss")
    inside.count(moco, "infonce_loss", "eager loss")
    argv = [*MOCO, "--fused", "auto", "--max-steps", "2"]
    r = in_process(moco.main, *argv, "--out", tmp_path / "auto", check=True)
    (line,) = fused_line(tmp_path / "auto")
    choice = "on" if line["fused_ms"] < line["eager_ms"] else "off"
    assert line["fused"] == choice and line["step"] == 0, line
    said = [s for s in r.stdout.splitlines() if s.startswith("fused InfoNCE: ")]
    assert len(said) == 1 and "ms per step" in said[0] and "N 16, C 128, K 64" in said[0] and \
        said[0].endswith(f"--fused {choice}, kept on resume"), said
    measured = 10 + 3  # time_infonce's warm-up and timed calls of each path
    steps = {"fused loss": 2, "eager loss": 0} if choice == "on" else {"fused loss": 0, "eager loss": 2}
    assert inside.calls == {k: v + measured for k, v in steps.items()}, inside.calls
    assert moco.load_checkpoint(str(tmp_path / "auto" / "ckpt.pt"))["args"]["fused"] == choice
    in_process(moco.main, *MOCO, "--fused", choice, "--max-steps", "2", "--out", tmp_path / "pinned", check=True)
    a, b = (moco.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("auto", "pinned"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.parametrize("faster", ["on", "off"])
def test_fused_auto_takes_the_faster_and_a_resumed_run_keeps_it(faster, tmp_path, inside, monkeypatch):
    """time_infonce made to say which path is faster: auto takes it; the run resumed without --fused keeps it
    silently (no measurement, no note) whatever a new measurement would say, and equals the run pinned to it from
    the start, to the bit; --fused auto given again measures again."""
    ext = moco.load_fused("on", torch.device("cpu"))
    inside.count(ext, "infonce_loss", "fused loss")
    inside.count(moco, "infonce_loss", "eager loss")
    measured = []
    monkeypatch.setattr(moco, "time_infonce", lambda *a, **k: measured.append(a) or ((2.0, 1.0) if faster == "on"
                                                                                     else (1.0, 2.0)))
    run = [*MOCO, "--max-steps", "1", "--fused", "auto", "--out", tmp_path / "run"]
    r = in_process(moco.main, *run, check=True)
    assert "fused InfoNCE: 1000.000 ms against eager 2000.000 ms" in r.stdout if faster == "on" else \
        "fused InfoNCE: 2000.000 ms against eager 1000.000 ms" in r.stdout, r.stdout
    assert [a[1:6] for a in measured] == [(16, 128, 64, 0.1, 16)]  # N, C, K, T, keys enqueued per step
    assert fused_line(tmp_path / "run")[0]["fused"] == faster
    monkeypatch.setattr(moco, "time_infonce", lambda *a, **k: measured.append(a) or ((1.0, 2.0) if faster == "on"
                                                                                     else (2.0, 1.0)))
    r = in_process(moco.main, *UNPINNED, "--max-steps", "2", "--resume", "auto", "--out", tmp_path / "run",
                   check=True)
    assert len(measured) == 1 and "fused InfoNCE" not in r.stdout and "--fused" not in r.stdout, r.stdout
    assert inside.calls == ({"fused loss": 2, "eager loss": 0} if faster == "on" else
                            {"fused loss": 0, "eager loss": 2}), inside.calls
    in_process(moco.main, *MOCO, "--max-steps", "2", "--fused", faster, "--out", tmp_path / "pinned", check=True)
    a, b = (moco.load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("run", "pinned"))
    assert a["args"]["fused"] == faster and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    r = in_process(moco.main, *UNPINNED, "--max-steps", "3", "--resume", "auto", "--fused", "auto", "--out",
                   tmp_path / "run", check=True)
    other = "off" if faster == "on" else "on"
    assert len(measured) == 2 and f"note: resumed with --fused {faster} -> auto" in r.stdout and \
        f"--fused {other}, kept on resume" in r.stdout, r.stdout


def test_fused_auto_without_the_extension_is_off(tmp_path, monkeypatch):
    """Where moco_ext cannot run, auto takes the eager path with one note, measures nothing, and stores off."""
    monkeypatch.setattr(moco, "load_fused", lambda mode, device, log=print: log("note: fused InfoNCE not available "
                                                                                  "(test)") if mode != "off" else None)
    monkeypatch.setattr(moco, "time_infonce", lambda *a: pytest.fail("measured without the extension"))
    r = in_process(moco.main, *MOCO, "--fused", "auto", "--out", tmp_path / "run", check=True)
    assert "note: fused InfoNCE not available" in r.stdout and "fused InfoNCE:" not in r.stdout
    assert moco.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["args"]["fused"] == "off"


def test_load_fused_leaves_the_environment_as_it_was(monkeypatch):
    monkeypatch.delenv("MOCO_EXT_JIT", raising=False)
    monkeypatch.setitem(sys.modules, "moco_ext", type("moco_ext", (), {"unusable_reason": staticmethod(lambda d: None)}))
    moco.load_fused("on", torch.device("cpu"))
    assert "MOCO_EXT_JIT" not in os.environ


def test_bn_sync_is_reachable_and_checked(tmp_path):
    """--bn sync: SyncBatchNorm over the global batch, --bn-splits ignored (and said so); on the CPU under torchrun it
    cannot run (SyncBatchNorm needs GPUs there): one line. On one process it is batch norm over the whole batch."""
    r = in_process(moco.main, *MOCO, "--bn", "sync", "--bn-splits", "8", "--out", tmp_path / "a", check=True)
    assert "--bn-splits 8 is ignored" in r.stdout and "done: 2 steps" in r.stdout
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    args = moco.Args(**ck["args"])
    model = moco.build_model(args, 8000, 1, None)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert not any(isinstance(m, moco.SplitBatchNorm) for m in model.modules())
    with pytest.raises(moco.UserError, match="--bn sync needs GPUs"):
        moco.check_args(args, 2, torch.device("cpu"))
    import dataclasses
    moco.check_args(dataclasses.replace(args, bn_splits=3), 2, torch.device("cuda", 0))  # ignored: any value
