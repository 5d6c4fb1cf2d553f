"""Runs lose nothing: stop signals (preemption), torchrun restarts, several machines, failed writes, a reused output
folder and what a resumed run may change. The signals are real: sent from outside by PID to a script running in its
own process (or to torchrun and its workers), then --resume auto, then every tensor compared with torch.equal against
an uninterrupted run. Every side runs with one thread (as torchrun's workers), so that the arithmetic is the same."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import dim
import moco
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MOCO = ["--batch-size", "16", "--moco-k", "64", "--bn-splits", "2", "--workers", "0", "--knn-every", "0",
        "--device", "cpu", "--log-every", "1", "--epochs", "3", "--fused", "off"]  # 7 steps per epoch, 120 images
DIM = ["--preset", "dimLG", "--batch-size", "16", "--mi-units", "32", "--local-samples", "8", "--workers", "0",
       "--knn-every", "0", "--device", "cpu", "--log-every", "1", "--epochs", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def one_thread(main, *argv, check=True):
    """main(argv) in this process with one thread, as the scripts' own processes below run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return in_process(main, *argv, check=check)
    finally:
        torch.set_num_threads(threads)


def tensors(path):
    """Every tensor of a checkpoint, by name: the model, the optimiser's state, the scaler, the random states."""
    ck = moco.load_checkpoint(path)
    out = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
    for key in ("model", "prior", "optimizer", "prior_optimizer", "rng"):
        walk(key, ck.get(key))
    return ck["step"], out


def assert_same_run(a, b):
    (sa, ta), (sb, tb) = tensors(a), tensors(b)
    assert sa == sb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def logged_steps(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip() and '"loss"' in line]


def signal_at(proc, out, step, target=None, sig=signal.SIGTERM):
    """Wait until the run in `out` has logged `step`, then send `sig` to target() (default: the process)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(s >= step for s in logged_steps(out)):
            os.kill(target() if target else proc.pid, sig)
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or hung before step {step}: {proc.poll()}")


def children(pid):
    """The PIDs of a process's children (torchrun's workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


# ----------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("script, flags, sig", [(moco, MOCO, signal.SIGTERM), (dim, DIM, signal.SIGUSR1)],
                         ids=["moco-TERM", "dim-USR1"])
def test_signal_saves_and_the_resumed_run_equals_a_straight_one(script, flags, sig, tmp_path, image_folder, rng):
    """SIGTERM / SIGUSR1 at a random step: the run finishes that step, writes its checkpoint, says so in one line
    and exits 75; --resume auto then ends with exactly the tensors of an uninterrupted run."""
    name = script.__name__ + ".py"
    argv = [name, "--data", image_folder, "--max-steps", "10"] + flags
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    one_thread(script.main, *argv[1:], "--out", straight)
    at = rng.randint(2, 6)
    print(f"the signal after step {at}")
    p = subprocess.Popen([sys.executable] + argv + ["--out", stopped], cwd=ROOT, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal_at(p, stopped, at, sig=sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == moco.PREEMPTED, (at, out[-2000:], err[-2000:])
    line = [l for l in out.splitlines() if l.startswith("stopped by")]
    assert len(line) == 1 and signal.Signals(sig).name in line[0] and "--resume auto" in line[0], out
    step = moco.load_checkpoint(os.path.join(stopped, "ckpt.pt"))["step"]
    assert at <= step < 10 and logged_steps(stopped) == list(range(1, step + 1)), (at, step)
    one_thread(script.main, *argv[1:], "--out", stopped, "--resume", "auto")
    assert logged_steps(stopped) == list(range(1, 11))  # each step once
    assert_same_run(os.path.join(straight, "ckpt.pt"), os.path.join(stopped, "ckpt.pt"))


def test_signal_during_the_knn_monitor_and_during_a_checkpoint_write(tmp_path, image_folder, monkeypatch):
    """A signal during a checkpoint write lets the write finish and stops after the next step; one during the kNN
    monitor (which runs after the epoch's checkpoint) leaves at once. Both resume to the uninterrupted run. Every
    run with the monitor on, so every run holds out the same images (108 train: 6 steps per epoch)."""
    argv = ["--data", image_folder, "--max-steps", "8", *MOCO, "--knn-every", "1"]
    one_thread(moco.main, *argv, "--out", tmp_path / "straight")
    save, kills = moco.save_checkpoint, {"n": 0}

    def save_signalled(state, path, *prev):  # the signal arrives in the middle of the first write
        if kills["n"] == 0:
            kills["n"] += 1
            os.kill(os.getpid(), signal.SIGTERM)
        save(state, path, *prev)
    monkeypatch.setattr(moco, "save_checkpoint", save_signalled)
    r = one_thread(moco.main, *argv, "--save-every", "2", "--out", tmp_path / "a", check=False)
    assert r.returncode == moco.PREEMPTED and "stopped by SIGTERM after step 3" in r.stdout, r.stdout + r.stderr
    assert moco.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"] == 3  # the stop's own checkpoint
    monkeypatch.setattr(moco, "save_checkpoint", save)

    def knn_signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        raise AssertionError("the signal did not stop the kNN monitor")
    monkeypatch.setattr(moco, "knn_accuracy", knn_signalled)
    r = one_thread(moco.main, *argv, "--out", tmp_path / "b", check=False)
    assert r.returncode == moco.PREEMPTED and "during the kNN monitor after step 6" in r.stderr, r.stdout + r.stderr
    assert moco.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 6  # the epoch's, written before the pass
    monkeypatch.undo()
    for run in ("a", "b"):
        one_thread(moco.main, *argv, "--out", tmp_path / run, "--resume", "auto")
        assert_same_run(tmp_path / "straight" / "ckpt.pt", tmp_path / run / "ckpt.pt")


# ----------------------------------------------------------------------------------------------------
# torchrun: stop signals on 2 processes, a restarted worker, two "machines"
# ----------------------------------------------------------------------------------------------------
def torchrun(launch, flags, out, **popen):
    return subprocess.Popen(TORCHRUN + launch + ["moco.py", *flags, "--out", out], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)


def finish(p, ok=(0,)):
    out, err = p.communicate(timeout=600)
    assert p.returncode in ok, out[-3000:] + err[-3000:]
    return out


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory, image_folder):
    """An uninterrupted 2-process run (gloo) of 10 steps: the reference of the torchrun tests."""
    out = str(tmp_path_factory.mktemp("two") / "straight")
    finish(torchrun(["--standalone", "--nproc_per_node=2"], ["--data", image_folder, "--max-steps", "10", *MOCO], out))
    return os.path.join(out, "ckpt.pt")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "one worker"])
def test_signal_under_torchrun(target, straight_two, tmp_path, image_folder, rng):
    """SIGTERM to torchrun (which passes it to its workers) or to one worker alone: every rank stops at the same
    step, rank 0 writes the checkpoint, all exit (0: torchrun would restart workers that exit otherwise) and
    OUT/status says stopped; --resume auto then ends with the uninterrupted run's tensors."""
    out, flags = str(tmp_path / "run"), ["--data", image_folder, "--max-steps", "10", *MOCO]
    p = torchrun(["--standalone", "--nproc_per_node=2"], flags, out)
    at = rng.randint(2, 6)
    print(f"the signal after step {at}")
    signal_at(p, out, at, None if target == "torchrun" else lambda: rng.choice(children(p.pid)))
    # torchrun signalled ends with its own status; with only a worker signalled it sees its workers exit 0
    log = finish(p, ok=(1, -signal.SIGTERM, 128 + signal.SIGTERM) if target == "torchrun" else (0,))
    assert log.count("stopped by") == 1, log[-3000:]
    step = moco.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert at <= step < 10, (at, step)
    status = open(os.path.join(out, "status")).read()  # rank 0's words: the signal, or "a signal to another rank"
    assert status.startswith("stopped by ") and f"after step {step}:" in status, status
    finish(torchrun(["--standalone", "--nproc_per_node=2"], flags + ["--resume", "auto"], out))
    assert logged_steps(out) == list(range(1, 11))
    assert_same_run(straight_two, os.path.join(out, "ckpt.pt"))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker(straight_two, tmp_path, image_folder, rng):
    """docs/distributed.md's restart command: one worker killed with SIGKILL after a checkpoint; torchrun restarts both, they
    resume from the checkpoint and the job ends with the uninterrupted run's tensors."""
    out = str(tmp_path / "run")
    flags = ["--data", image_folder, "--max-steps", "10", "--save-every", "2", "--resume", "auto", *MOCO]
    p = torchrun(["--standalone", "--nproc_per_node=2", "--max-restarts=1"], flags, out)
    deadline = time.time() + 300
    while not (os.path.exists(os.path.join(out, "ckpt.pt")) and moco.load_checkpoint(
            os.path.join(out, "ckpt.pt"))["step"] >= 2):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.01)
    os.kill(rng.choice(children(p.pid)), signal.SIGKILL)
    log = finish(p)
    assert "resumed from" in log and "done: 10 steps" in log, log[-3000:]
    assert_same_run(straight_two, os.path.join(out, "ckpt.pt"))


@pytest.mark.slow
def test_two_machines_train_the_model_of_one(straight_two, tmp_path, image_folder):
    """The README's several-machines command: two torchrun agents as two nodes (c10d rendezvous on 127.0.0.1, one
    process each) train the same model as 2 processes of one node."""
    out, port = str(tmp_path / "run"), 29561
    flags = ["--data", image_folder, "--max-steps", "10", *MOCO]
    nodes = [torchrun(["--nnodes=2", f"--node-rank={r}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-machines"], flags, out) for r in (0, 1)]
    logs = [finish(p) for p in nodes]
    assert sum("done: 10 steps" in log for log in logs) == 1  # rank 0 logs, whichever node holds it
    assert_same_run(straight_two, os.path.join(out, "ckpt.pt"))


# ----------------------------------------------------------------------------------------------------
# Failed writes
# ----------------------------------------------------------------------------------------------------
def valid_jsonl(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.slow
def test_checkpoint_write_over_the_file_size_limit(tmp_path, image_folder):
    """`ulimit -f` below the checkpoint's size: the run stops in one line naming the path and the cause; the
    previous checkpoint stays loadable, no temporary file is left, metrics.jsonl holds whole lines only."""
    out = tmp_path / "run"
    argv = ["moco.py", "--data", image_folder, "--out", str(out)] + MOCO
    subprocess.run([sys.executable] + argv + ["--max-steps", "2"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    size = os.path.getsize(out / "ckpt.pt")

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    r = subprocess.run([sys.executable] + argv + ["--max-steps", "4", "--resume", "auto"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot write checkpoint {out / 'ckpt.pt'}: File too large; the previous one is intact" in r.stderr
    assert moco.load_checkpoint(str(out / "ckpt.pt"), "moco")["step"] == 2
    assert sorted(os.listdir(out)) == ["args.json", "ckpt.pt", "metrics.jsonl", "status"]
    assert open(out / "status").read().startswith(f"failed: cannot write checkpoint {out / 'ckpt.pt'}: File too large")
    assert [m["step"] for m in valid_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_metrics_line_is_whole_or_absent(tmp_path, monkeypatch):
    """A line that cannot be written whole (the disk fills up half-way) is cut off again, and the run stops."""
    path = tmp_path / "metrics.jsonl"
    moco.append_line(str(path), '{"step": 1}')

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            self.f.write(b[:5])
            self.f.flush()
            raise OSError(28, "No space left on device")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: HalfFile(real_open(*a, **k)))
    with pytest.raises(moco.UserError, match="No space left on device"):
        moco.append_line(str(path), '{"step": 2, "loss": 1.0}')
    monkeypatch.undo()
    assert valid_jsonl(path) == [{"step": 1}]


# ----------------------------------------------------------------------------------------------------
# The output folder and what a resumed run may change
# ----------------------------------------------------------------------------------------------------
def test_a_fresh_run_never_overwrites_another(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--out", out, *MOCO]
    in_process(moco.main, *argv, "--max-steps", "2", "--lr", "0.06", check=True)
    before = (out / "ckpt.pt").read_bytes()
    r = in_process(moco.main, *argv, "--max-steps", "3", "--lr", "0.01")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "already holds a run" in r.stderr and "--resume auto" in r.stderr and "--overwrite" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before and logged_steps(out) == [1, 2]
    assert json.load(open(out / "args.json"))["lr"] == 0.06
    in_process(moco.main, *argv, "--max-steps", "3", "--lr", "0.01", "--overwrite", check=True)
    assert logged_steps(out) == [1, 2, 3] and json.load(open(out / "args.json"))["lr"] == 0.01


def test_resumed_metrics_hold_each_step_once(tmp_path, image_folder):
    """Lines logged after the checkpoint by a run that died (here: steps 4 and 5, and a torn last line) are
    dropped on resume, and the resumed run logs them again."""
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--out", out, *MOCO]
    in_process(moco.main, *argv, "--max-steps", "3", check=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 9.0}\n{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    in_process(moco.main, *argv, "--max-steps", "6", "--resume", "auto", check=True)
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert all(m.get("loss") != 9.0 for m in valid_jsonl(out / "metrics.jsonl"))


@pytest.mark.parametrize("script, flags, change, message", [
    (moco, MOCO, ["--moco-k", "32"], "--moco-k 32 (it has 64)"),
    (moco, MOCO, ["--batch-size", "8", "--bn-splits", "2"], "--batch-size 8 (it has 16)"),
    (moco, MOCO, ["--mechanism", "end-to-end"], "--mechanism end-to-end (it has moco)"),
    (moco, MOCO, ["--preset", "v2"], "--preset v2: "),
    (dim, DIM, ["--mi-units", "16"], "--mi-units 16 (it has 32)"),
    (dim, DIM, ["--alpha", "0"], "--alpha 0.0 (it has 0.5)"),
])
def test_resume_refuses_what_would_break_the_run(script, flags, change, message, tmp_path, image_folder):
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--out", out, *flags]
    in_process(script.main, *argv, "--max-steps", "1", check=True)
    before = (out / "args.json").read_text()
    r = in_process(script.main, *argv, "--max-steps", "2", "--resume", "auto", *change)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and str(out / "ckpt.pt") in r.stderr, r.stderr
    assert (out / "args.json").read_text() == before  # nothing written


def test_resume_lists_what_it_changes_and_says_when_nothing_is_left(tmp_path, image_folder):
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--out", out, *MOCO]
    in_process(moco.main, *argv, "--max-steps", "2", check=True)
    r = in_process(moco.main, *argv, "--max-steps", "3", "--resume", "auto", "--lr", "0.01", check=True)
    assert "note: resumed with --lr 0.06 -> 0.01" in r.stdout and "note: resumed with --max-steps 2 -> 3" in r.stdout
    assert json.load(open(out / "args.json"))["lr"] == 0.01
    r = in_process(moco.main, *argv, "--max-steps", "2", "--resume", "auto", check=True)
    assert "nothing to do" in r.stdout and "at step 3" in r.stdout and "done:" not in r.stdout
    assert logged_steps(out) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------
# eval_linear.py's long modes: the probe on crop views, fine-tuning
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("pre") / "moco"
    in_process(moco.main, "--data", image_folder, "--out", out, "--max-steps", "2", *MOCO, check=True)
    return str(out / "ckpt.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--aug", "crop", "--probe", "mlp"], ["--finetune", "--aug", "none"]],
                         ids=["crop-probe", "finetune"])
def test_eval_linear_stops_and_resumes_exactly(mode, pretrained, tmp_path, rng):
    """SIGTERM during the probe's training (at a random epoch, mid-epoch): the current step ends, OUT's .pt is
    written, exit 75; --resume auto ends with the tensors and the numbers of an uninterrupted run."""
    import eval_linear
    argv = ["--pretrained", pretrained, "--epochs", "6", "--batch-size", "16", "--workers", "0", "--device", "cpu",
            *mode]
    one_thread(eval_linear.main, *argv, "--out", tmp_path / "straight.json")
    at = rng.randint(1, 3)
    print(f"the signal in probe epoch {at}")
    p = subprocess.Popen([sys.executable, "eval_linear.py", *argv, "--out", str(tmp_path / "stopped.json")],
                         cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith(f"probe epoch {at}/"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == moco.PREEMPTED and "stopped by SIGTERM at epoch" in err, out[-2000:] + err[-2000:]
    assert moco.load_checkpoint(str(tmp_path / "stopped.pt"), "eval_linear")["epoch"] < 6
    one_thread(eval_linear.main, *argv, "--out", tmp_path / "stopped.json", "--resume", "auto")
    a, b = (moco.load_checkpoint(str(tmp_path / f"{n}.pt"), "eval_linear") for n in ("straight", "stopped"))
    for part in ("head", "backbone"):
        for k, v in (a.get(part) or {}).items():
            assert torch.equal(v, b[part][k]), (part, k)
    ja, jb = (json.load(open(tmp_path / f"{n}.json")) for n in ("straight", "stopped"))
    assert (ja["top1"], ja["per_epoch"]) == (jb["top1"], jb["per_epoch"])
