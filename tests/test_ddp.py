"""Two processes with torchrun (gloo, CPU): the multi-GPU code paths of moco.py without GPUs."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval_linear
import moco
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "ddp_moco.py")


def torchrun(args, port, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", DRIVER]
    r = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


TRAIN = ["--max-steps", "6", "--batch-size", "32", "--moco-k", "100", "--bn-splits", "2", "--workers", "0",
         "--knn-every", "1", "--log-every", "1", "--epochs", "3", "--device", "cpu", "--fused", "off"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, image_folder):
    """An uninterrupted 2-rank run: 6 steps over 2 epochs (108 training images, global batch 32)."""
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    log = torchrun(["train", out, "--data", image_folder] + TRAIN, port=29541)
    return out, log


@pytest.mark.slow
def test_two_ranks_stay_identical(ddp_run):
    """Both ranks end with the same weights, queue and pointer; the keys of both ranks were enqueued
    (pointer = 6 x global batch mod K). The queue is excluded from DDP's buffer broadcast, so equality shows
    that every rank built the same queue from the gathered keys."""
    out, log = ddp_run
    assert "done: 6 steps" in log
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for k in r0:  # BN running statistics are rank-local until DDP broadcasts rank 0's at the next forward
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(r0[k], r1[k]), k
    assert r0["queue_ptr"].item() == (6 * 32) % 100
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["step"] == 6 and torch.equal(ck["model"]["queue"], r0["queue"])


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted(ddp_run, tmp_path, image_folder):
    """kill -9 of the whole torchrun job once a checkpoint of step >= 2 exists, then --resume auto: the final
    checkpoint equals the uninterrupted run's, and no ckpt.pt was ever unreadable."""
    import signal
    import time
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544", DRIVER,
           "train", out, "--data", image_folder, "--save-every", "1"] + TRAIN
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    path, deadline = os.path.join(out, "ckpt.pt"), time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(path) and moco.load_checkpoint(path, "moco")["step"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = moco.load_checkpoint(path, "moco")["step"]  # readable after the kill
    assert 2 <= killed_at <= 6
    torchrun(["train", out, "--data", image_folder, "--resume", "auto"] + TRAIN, port=29545)
    a = torch.load(os.path.join(ddp_run[0], "ckpt.pt"), weights_only=False)
    b = torch.load(path, weights_only=False)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), (k, killed_at)


@pytest.mark.slow
def test_two_ranks_match_one_process_with_split_bn(tmp_path, monkeypatch):
    """Shuffle-BN on 2 ranks of 8 images == one process on the 16 images with --bn-splits 2, given the same
    permutation: split BN's group s is the contiguous slice 8s..8s+7, the images rank s holds and, after the
    shuffle, the keys rank s encodes. Both sides with one thread; measured 2026-12-06: logits 3.0e-6 apart (T = 0.2
    scales the products' rounding by 5), the queue 5.1e-7."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests"))
    import ddp_moco
    out = str(tmp_path / "logits")
    torchrun(["logits", out], port=29542)
    ref = torch.load(os.path.join(out, "logits.pt"))
    xq, xk, perm = ddp_moco.batch_and_perm()
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: perm.clone())
    model = ddp_moco.small_moco(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits, _ = model(xq, xk)  # (16, 1+K)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(logits, ref["logits"], rtol=0, atol=1e-5), (logits - ref["logits"]).abs().max()
    assert torch.allclose(model.queue, ref["queue"], rtol=0, atol=2e-6) and \
        model.queue_ptr.item() == ref["ptr"].item() == 16


@pytest.mark.slow
def test_eval_linear_two_ranks_match_one(tmp_path, capsys):
    """eval_linear.py under torchrun (feature extraction sharded, then gathered in order) gives the accuracy
    of one process."""
    import json
    out = str(tmp_path / "m")
    moco.main(["--out", out, "--max-steps", "2", "--batch-size", "32", "--moco-k", "64", "--bn-splits", "1",
               "--workers", "0", "--knn-every", "0"])
    ck = os.path.join(out, "ckpt.pt")
    common = ["--pretrained", ck, "--epochs", "3", "--workers", "0", "--device", "cpu"]
    in_process(eval_linear.main, *common, "--out", tmp_path / "one.json", check=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543",
                        "eval_linear.py"] + common + ["--out", str(tmp_path / "two.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert one["n_train"] == two["n_train"] == 8000 and one["n_test"] == two["n_test"] == 2000
    assert abs(one["top1"] - two["top1"]) <= 0.1 and abs(one["knn_top1"] - two["knn_top1"]) <= 0.1, (one, two)


@pytest.mark.slow
def test_dim_two_ranks_stay_identical(tmp_path, image_folder):
    """dim.py (local + global + prior) under torchrun: both ranks end with the same encoder, critics and
    prior discriminator (whose gradients are averaged by hand, outside DDP); rank 0 saves."""
    out = str(tmp_path / "dim")
    log = torchrun(["dim", out, "--data", image_folder, "--preset", "dimLG", "--max-steps", "3", "--batch-size", "32",
                    "--epochs", "1", "--workers", "0", "--knn-every", "0", "--log-every", "1", "--device", "cpu"],
                   port=29546)
    assert "done: 3 steps" in log
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for k in r0:
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(r0[k], r1[k]), k
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["algo"] == "dim" and ck["step"] == 3
    assert any(k.startswith("prior.") for k in r0)
    for part in ("model", "prior"):
        for k, v in ck[part].items():
            if "running_" not in k and "num_batches" not in k:
                assert torch.equal(v, r0[f"{part}.{k}"]), k


@pytest.mark.slow
@pytest.mark.parametrize("mechanism, port", [("moco", 29547), ("end-to-end", 29551), ("memory-bank", 29552)])
def test_one_process_and_two_train_the_same_model(mechanism, port, tmp_path, image_folder):
    """The same flags on 1 process and on 2 (--bn-splits 2 = 2 batch-norm groups of the global batch 32: one per
    rank, or both on one process), every side with one thread, take the same step from the same state: the first
    step from the seeded initialisation, then one step of each resumed from the 2-rank checkpoint (the 1-process
    run takes rank 0's random state, which draws the shuffle permutation and the bank's negatives for all ranks).
    Every weight agrees to 1e-5 after each step (measured 2026-12-06, largest gap over the weights after the first
    / the resumed step: moco 2.7e-7 / 3.2e-7, end-to-end 7.2e-7 / 1.2e-7, memory bank 3.6e-7 / 1.2e-7). This holds only if
    split BN groups the queries as torchrun slices them (contiguously) and the keys' shuffled groups likewise, every
    rank starts from rank 0's queue and draws what one process draws at every step: with the queue not broadcast
    from rank 0 the first step is 2.3e-3 apart, with each rank drawing its own shuffle permutation 0.38;
    end-to-end without the other rank's share of the key gradient (GatherWithGrad) 4.6e-2 after 3 steps, the
    memory bank with each rank drawing its own negatives 0.12 after 3 steps."""
    flags = ["--data", image_folder, "--batch-size", "32", "--moco-k", "100", "--bn-splits", "2", "--workers", "0",
             "--knn-every", "0", "--epochs", "3", "--device", "cpu", "--fused", "off", "--mechanism", mechanism,
             "--resume", "auto"]
    one, two = tmp_path / "one", tmp_path / "two"
    args = moco.parse_args(flags)[0]
    torch.manual_seed(0)  # what setup_device seeds before the model is built
    init = moco.build_model(args, 120, 1, None).state_dict()  # every image trains: no kNN monitor, nothing held out
    for steps in (1, 2):
        argv = flags + ["--max-steps", str(steps)]
        if steps == 2:  # the 1-process run goes on from the 2-rank checkpoint of step 1
            shutil.copy(two / "ckpt.pt", one / "ckpt.pt")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
        try:
            in_process(moco.main, "--out", one, *argv, check=True)
        finally:
            torch.set_num_threads(threads)
        torchrun(["train", str(two)] + argv, port=port if steps == 1 else free_port())
        a, b = (torch.load(d / "ckpt.pt", weights_only=False) for d in (one, two))
        assert a["step"] == b["step"] == steps
        r0, r1 = (torch.load(two / f"rank{r}.pt") for r in (0, 1))
        for k in ("queue", "bank"):
            if k in r0:
                assert torch.equal(r0[k], r1[k]), k  # identical on every rank, without DDP's broadcast
        for k, v in a["model"].items():
            if "running_" in k or "num_batches" in k:  # rank 0's statistics (DDP broadcasts them), not the mean
                continue
            gap = (v.float() - b["model"][k].float()).abs().max().item()
            assert gap <= 1e-5, (steps, k, gap)
            if steps == 1 and k.startswith("encoder_q.") and k.endswith("weight"):
                assert not torch.equal(v, init[k]), k  # the weights did move from the seeded initialisation
        if steps == 1 and mechanism != "end-to-end":  # `init` is the run's: what step 1 did not write is its own
            name = "queue" if mechanism == "moco" else "bank"
            same = (a["model"][name] == init[name]).all(0)  # (columns,)
            assert same.sum().item() == same.numel() - 32, name  # 32 keys enqueued / 32 images' entries updated


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dim_killed_and_resumed_equals_uninterrupted_on_two_ranks(tmp_path, image_folder):
    """dim.py on 2 ranks (local + global + prior, a random subset of locations): 3 steps, stop, resume to 6 ==
    6 straight. Each rank draws its own prior samples and location subsets, so each rank's random state must
    be saved and restored, not rank 0's on every rank."""
    flags = ["--data", image_folder, "--preset", "dimLG", "--batch-size", "32", "--epochs", "2", "--workers", "0",
             "--knn-every", "0", "--local-samples", "16", "--mi-units", "64", "--device", "cpu"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    torchrun(["dim", a, "--max-steps", "5"] + flags, port=29548)
    torchrun(["dim", b, "--max-steps", "2"] + flags, port=29549)
    log = torchrun(["dim", b, "--max-steps", "5", "--resume", "auto"] + flags, port=29550)
    assert "resumed" in log
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"] == 5 and len(cb["rng"]) == 2
    for part in ("model", "prior"):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), (part, k)


@pytest.mark.slow
def test_fused_auto_rank_0_decides_and_the_others_follow(tmp_path, image_folder):
    """--fused auto on 2 ranks whose timings disagree (tests/ddp_moco.py: on rank 0 the fused op times faster, on
    rank 1 the eager path): rank 0 alone measures, both ranks call the fused op, and the checkpoint holds --fused on."""
    import json
    moco.load_fused("on", torch.device("cpu"))  # built (just in time where it is not installed) before the workers
    out = str(tmp_path / "run")
    flags = ["--data", image_folder, "--max-steps", "1", "--batch-size", "32", "--moco-k", "64", "--bn-splits", "2",
             "--workers", "0", "--knn-every", "0", "--device", "cpu", "--fused", "auto"]
    log = torchrun(["fused", out, *flags], port=free_port(), MOCO_EXT_JIT="1")
    assert log.count("fused InfoNCE: 1000.000 ms against eager 2000.000 ms") == 1 and "--fused on" in log, log
    ranks = [json.load(open(os.path.join(out, f"fused_rank{r}.json"))) for r in (0, 1)]
    assert ranks == [{"measured": 1, "fused loss": 1, "holds the op": True},
                     {"measured": 0, "fused loss": 1, "holds the op": True}], ranks
    assert moco.load_checkpoint(os.path.join(out, "ckpt.pt"))["args"]["fused"] == "on"
