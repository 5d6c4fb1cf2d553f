"""The faults of a long run, at the settings users run with: the small preset's 2 loader workers, a checkpoint every
step, torchrun with 2 processes where ranks are involved. Each test injects one fault into a real run and asserts
the exit status, the one line, the checkpoint's step and that it is finite, and that nothing under OUT that existed
before was lost or changed. The runs are real processes (a hang shows as a timeout), except where a test says why.
Faults that need a mount of their own (a full /dev/shm, a folder that turns read-only, a full disk) run in a user
and mount namespace (`unshare -Urm`)."""
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dim
import moco
from conftest import in_process
from test_study import small_idx_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# the small preset's loader workers (2); 120 images in batches of 16: 7 steps an epoch
MOCO = ["--arch", "basic32", "--batch-size", "16", "--moco-k", "32", "--bn-splits", "2", "--knn-every", "0",
        "--device", "cpu", "--fused", "off", "--log-every", "1", "--workers", "2"]
DIM = ["--batch-size", "16", "--mi-units", "32", "--local-samples", "8", "--knn-every", "0", "--device", "cpu",
       "--log-every", "1", "--workers", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
slow = pytest.mark.slow


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def spawn(cmd, env=None, ctrl_c=False):
    """A command as a process of its own session, so that a hung one can be killed whole. ctrl_c: SIGINT as a
    terminal delivers it (a shell running the suite in the background passes SIGINT on ignored)."""
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env or ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if ctrl_c else None)


def start(*argv, env=None, ctrl_c=False):
    """python ARGV: a script, or -m torch.distributed.run."""
    return spawn([sys.executable, *argv], env, ctrl_c)


def finish(p, timeout=120):
    """-> CompletedProcess; a process that has not ended in `timeout` seconds (a hang) is killed and fails the test."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in descendants(p.pid):  # torchrun's workers live in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"no exit in {timeout} s (a hang)\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run(*argv, timeout=120, **kw):
    return finish(start(*argv, **kw), timeout)


def one_line(r, code, *words):
    """The process exited with `code` and wrote exactly one line to stderr, which holds every one of `words`."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder):
    """{file name: sha256} of a folder, to tell that nothing in it was lost or changed."""
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


def unchanged(before, folder):
    """Every file of the snapshot `before` is still in `folder`, byte for byte (OUT/status tells the last run's end)."""
    now = snapshot(folder)
    return all(now.get(f) == h for f, h in before.items() if f != "status")


def finite(x):
    """Every floating-point tensor in x (nested dicts, lists and tuples) is finite."""
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return all(finite(v) for v in items)


def kept(out, step=None):
    """OUT/ckpt.pt: whole, every tensor finite, at `step` if given -> its step."""
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert finite(ck), "a non-finite tensor was written"
    assert step is None or ck["step"] == step, (ck["step"], step)
    return ck["step"]


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path) if '"loss"' in line] if os.path.exists(path) else []


def wait_for_step(p, out, step, timeout=300):
    deadline = time.time() + timeout
    while not any(s >= step for s in steps_logged(out)):
        assert p.poll() is None and time.time() < deadline, f"the run ended or hung before step {step}"
        time.sleep(0.02)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:  # ended meanwhile
        return []


def descendants(pid):
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    return [pid] + [d for c in children(pid) for d in descendants(c)]


def namespace():
    """The prefix of a command in a user and mount namespace of its own, where it may mount a small tmpfs."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("this fault needs a mount of its own: unshare -Urm (user namespaces) is not available here")
    return ["unshare", "-Urm", "bash", "-c"]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, image_folder):
    """image_folder with one zero-byte image: class1/zero.jpg."""
    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(image_folder, root)
    open(root / "class1" / "zero.jpg", "wb").close()
    return str(root)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, image_folder):
    """A finished 2-step run (checkpoint at step 2, --save-every 1): copy it to use it."""
    out = tmp_path_factory.mktemp("two") / "run"
    r = run("moco.py", "--data", image_folder, "--out", out, "--max-steps", 2, "--save-every", 1, *MOCO)
    assert r.returncode == 0, r.stderr
    return str(out)


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------
# 1. No hang: any error ends the process in seconds, with one line
# ----------------------------------------------------------------------------------------------------
@slow
@pytest.mark.parametrize("script", ["moco.py", "dim.py", "eval_linear.py"])
def test_a_bad_image_with_loader_workers_ends_the_run_in_one_line(script, bad_folder, moco_ckpt, tmp_path):
    """A zero-byte image met by a loader worker: one line naming the file and the ways on, exit 2, in seconds
    (loader workers ignore the stop signals; left alive, they held the exit for ever)."""
    out = tmp_path / "run"
    if script == "eval_linear.py":
        argv = ["--pretrained", moco_ckpt, "--data", bad_folder, "--workers", 2, "--epochs", 1, "--out", tmp_path / "e.json"]
    else:
        argv = ["--data", bad_folder, "--out", out, "--epochs", 3, *(MOCO if script == "moco.py" else DIM)]
    t0 = time.time()
    r = run(script, *argv, timeout=120)
    one_line(r, 2, "zero.jpg", "--bad-images replace", "--check-images")
    assert time.time() - t0 < 60
    if script != "eval_linear.py":
        assert open(out / "status").read().startswith("failed: cannot read image")
        assert not os.path.exists(out / "run.lock")


@slow
def test_a_killed_loader_worker_ends_the_run(tmp_path, image_folder):
    """A loader worker killed (as the kernel's out-of-memory killer does): one line that says so, exit 1, in seconds;
    the checkpoint of every step is whole and finite."""
    out = tmp_path / "run"
    p = start("moco.py", "--data", image_folder, "--out", out, "--epochs", 50, "--save-every", 1, *MOCO)
    wait_for_step(p, out, 2)
    while not children(p.pid):  # between two epochs the loader has no workers
        time.sleep(0.01)
    os.kill(children(p.pid)[0], signal.SIGKILL)
    r = finish(p, timeout=60)
    one_line(r, 1, "DataLoader worker", "fewer --workers", "ckpt.pt (step")
    assert kept(out) >= 1


@slow
def test_a_full_dev_shm_says_what_to_do(tmp_path, image_folder):
    """/dev/shm too small for a batch (Docker's default is 64 MB; here a 64 kB tmpfs): one line naming /dev/shm,
    --workers 0 and --shm-size, exit 1, in seconds."""
    ns = namespace()
    cmd = (f"mount -t tmpfs -o size=64k tmpfs /dev/shm && exec {sys.executable} moco.py --data {image_folder} "
           f"--out {tmp_path / 'run'} --epochs 3 " + " ".join(MOCO))
    r = finish(spawn(ns + [cmd]), timeout=120)
    one_line(r, 1, "/dev/shm", "--workers 0", "--shm-size")


@slow
def test_an_output_folder_that_turns_read_only(tmp_path, image_folder):
    """OUT remounted read-only after step 3 (a full or failed disk): one line naming the file and the cause, exit 2,
    no temporary file, the last checkpoint whole and finite."""
    ns, out = namespace(), tmp_path / "run"
    os.makedirs(out)
    cmd = (f"{sys.executable} moco.py --data {image_folder} --out {out} --epochs 50 --save-every 1 {' '.join(MOCO)} & "
           f"pid=$!; until grep -qs '\"step\": 3,' {out}/metrics.jsonl; do sleep 0.02; done; "
           f"mount --bind {out} {out} && mount -o remount,bind,ro {out}; wait $pid")
    r = finish(spawn(ns + [cmd]), timeout=180)
    one_line(r, 2, "cannot write", "Read-only file system")
    assert kept(out) >= 2 and not [f for f in os.listdir(out) if ".tmp." in f]


@slow
def test_a_lost_peer_ends_the_other_machine_too(tmp_path, image_folder):
    """Two torchrun agents as two machines; machine 1 dies (SIGKILL to its agent, worker and loaders): machine 0 ends
    in seconds, with one line from its worker, not after a collective's timeout. (Static rendezvous: machine 0 holds
    torchrun's store, whose loss would end its agent anyway.)"""
    out, port = tmp_path / "run", 29571
    nodes = [start("-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={r}", "--nproc_per_node=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "moco.py",
                   "--data", image_folder, "--out", out, "--epochs", 50, *MOCO) for r in (0, 1)]
    wait_for_step(nodes[0], out, 2)
    t0 = time.time()
    for pid in descendants(nodes[1].pid):
        os.kill(pid, signal.SIGKILL)
    r = finish(nodes[0], timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 60, (r.returncode, time.time() - t0)
    assert "error: another process of this run ended" in r.stderr, r.stderr[-3000:]
    finish(nodes[1])


# ----------------------------------------------------------------------------------------------------
# 2. Bad images have a way through
# ----------------------------------------------------------------------------------------------------
@slow
def test_check_images_lists_the_bad_ones(tmp_path, image_folder):
    """--check-images decodes every image (a truncated JPEG too) and lists the bad ones: exit 2; none: exit 0."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    from PIL import Image
    Image.new("RGB", (400, 300), (90, 120, 200)).save(data / "class2" / "whole.jpg", quality=90)
    jpeg = open(data / "class2" / "whole.jpg", "rb").read()
    r = run("moco.py", "--data", data, "--check-images")
    assert r.returncode == 0 and "checked 121 images" in r.stdout and "0 unreadable" in r.stdout, r.stdout + r.stderr
    open(data / "class2" / "cut.jpg", "wb").write(jpeg[: len(jpeg) // 2])
    open(data / "class0" / "zero.png", "wb").close()
    r = run("dim.py", "--data", data, "--check-images")
    bad = [line for line in r.stdout.splitlines() if line.startswith("unreadable: ")]
    assert [b.split()[1] for b in bad] == [str(data / "class0" / "zero.png"), str(data / "class2" / "cut.jpg")]
    assert "truncated" in bad[1] and "images/s" in r.stdout
    one_line(r, 2, "2 of 123 images cannot be read", "--bad-images replace")


@slow
def test_replaced_bad_images_keep_the_data_and_resume_exactly(tmp_path, bad_folder):
    """--bad-images replace: the next image stands in, the bad file is listed once in OUT/bad_images.txt and counted
    in the metrics; stopped by a signal and resumed, the run ends with the tensors of an uninterrupted one."""
    argv = ["--data", bad_folder, "--max-steps", 10, "--bad-images", "replace", *MOCO]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run("moco.py", *argv, "--out", straight).returncode == 0
    assert open(straight / "bad_images.txt").read() == os.path.join(bad_folder, "class1", "zero.jpg") + "\n"
    assert json.loads(open(straight / "metrics.jsonl").readlines()[-1])["bad_images"] == 1
    p = start("moco.py", *argv, "--out", stopped)
    wait_for_step(p, stopped, 3)
    p.send_signal(signal.SIGTERM)
    assert finish(p).returncode == moco.PREEMPTED
    assert run("moco.py", *argv, "--out", stopped, "--resume", "auto").returncode == 0
    a, b = moco.load_checkpoint(str(straight / "ckpt.pt")), moco.load_checkpoint(str(stopped / "ckpt.pt"))
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert open(stopped / "bad_images.txt").read().count("zero.jpg") == 1


# ----------------------------------------------------------------------------------------------------
# 3. Divergence leaves a checkpoint to continue from
# ----------------------------------------------------------------------------------------------------
@slow
def test_a_diverging_run_leaves_the_checkpoint_before_it(tmp_path, two_steps):
    """The weights blow up at step 3 (lr 1e30) while the loss of step 3 is still finite; step 4's is not: the
    checkpoint of step 3 is dropped, ckpt.pt holds step 2 again (the message says so), and training goes on from it
    with a sane lr."""
    out = copy_run(two_steps, tmp_path)
    r = run("moco.py", "--out", out, "--resume", "auto", "--lr", "1e30", "--save-every", 1, "--max-steps", 10)
    line = one_line(r, 2, "at step 4", f"{out}/ckpt.pt holds step 2", "--resume auto")
    assert "nan" in line or "inf" in line
    kept(out, 2)
    assert sorted(os.listdir(out)) == ["args.json", "ckpt.pt", "metrics.jsonl", "status"]
    r = run("moco.py", "--out", out, "--resume", "auto", "--lr", "0.06", "--max-steps", 5)
    assert r.returncode == 0 and "done: 5 steps" in r.stdout, r.stderr
    kept(out, 5)


def test_nothing_non_finite_is_written_and_the_message_is_true(tmp_path, image_folder, monkeypatch):
    """Every write of a run that diverges (--save-every, epoch ends) holds finite tensors, and the checkpoint the
    message names is the one on disk. In this process (--workers 0: the writes are watched through a wrapper of
    save_checkpoint, which a loader process does not need)."""
    written, save = [], moco.save_checkpoint

    def watched(state, path, *prev):
        written.append((state["step"], finite(state)))
        save(state, path, *prev)
    monkeypatch.setattr(moco, "save_checkpoint", watched)
    out = tmp_path / "run"
    argv = ["--data", image_folder, "--out", out, "--lr", "1e4", "--epochs", 20, *MOCO[:-2], "--workers", 0]
    r = in_process(moco.main, *argv)
    assert r.returncode == 2 and ("loss is" in r.stderr or "not finite" in r.stderr), r.stderr
    assert written and all(finite for _, finite in written), written
    step = int(r.stderr.split("holds step ")[1].split(",")[0]) if "holds step" in r.stderr else None
    if step is None:  # diverged before any checkpoint was followed by a finite step
        assert "no checkpoint of this run is kept" in r.stderr and not os.path.exists(out / "ckpt.pt")
    else:
        kept(out, step)


# ----------------------------------------------------------------------------------------------------
# 4. A checkpoint's folder belongs to its run
# ----------------------------------------------------------------------------------------------------
@slow
def test_resume_path_continues_in_its_own_folder_and_a_fork_leaves_it_alone(tmp_path, two_steps):
    """--resume PATH without --out goes on in PATH's folder (from any working directory); with another --out it
    starts a new folder and leaves PATH's untouched."""
    src = copy_run(two_steps, tmp_path, "src")
    before = snapshot(src)
    r = run(os.path.join(ROOT, "moco.py"), "--out", tmp_path / "fork", "--resume", f"{src}/ckpt.pt", "--max-steps", 4)
    assert r.returncode == 0 and snapshot(src) == before, r.stderr
    assert steps_logged(tmp_path / "fork") == [3, 4] and kept(tmp_path / "fork") == 4
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "moco.py"), "--resume", f"{src}/ckpt.pt",
                        "--max-steps", "4"], cwd=empty, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and os.listdir(empty) == [], p.stderr
    assert steps_logged(src) == [1, 2, 3, 4] and kept(src) == 4
    assert json.load(open(f"{src}/args.json"))["max_steps"] == 4


@slow
def test_one_run_per_folder(tmp_path, image_folder, two_steps):
    """A second run on a folder in use stops in one line naming the first's PID; the first goes on unharmed. A
    dead run's lock (SIGKILL) does not block."""
    out = copy_run(two_steps, tmp_path)
    first = start("moco.py", "--out", out, "--resume", "auto", "--max-steps", 1000)
    wait_for_step(first, out, 3)
    r = run("moco.py", "--out", out, "--resume", "auto", "--max-steps", 1000, "--lr", "0.01")
    one_line(r, 2, "in use by another run", f"PID {first.pid}")
    first.send_signal(signal.SIGTERM)
    assert finish(first).returncode == moco.PREEMPTED
    step = kept(out)
    assert steps_logged(out) == list(range(1, step + 1))  # each step once, all of the first run's
    killed = start("moco.py", "--out", out, "--resume", "auto", "--max-steps", 1000)
    wait_for_step(killed, out, step + 1)
    os.killpg(killed.pid, signal.SIGKILL)
    finish(killed)
    assert os.path.exists(os.path.join(out, "run.lock"))
    r = run("moco.py", "--out", out, "--resume", "auto", "--max-steps", step + 3)
    assert r.returncode == 0 and not os.path.exists(os.path.join(out, "run.lock")), r.stderr


@slow
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, image_folder, two_steps):
    """--overwrite that fails before its first checkpoint (bad --data, a divergence at once) leaves the old run as
    it was; one that gets there replaces it whole."""
    out = copy_run(two_steps, tmp_path)
    before = snapshot(out)
    r = run("moco.py", "--out", out, "--overwrite", "--data", tmp_path / "nothing", *MOCO)
    one_line(r, 2, "no such folder")
    assert unchanged(before, out)
    r = run("moco.py", "--out", out, "--overwrite", "--data", image_folder, "--lr", "1e30", "--save-every", 1,
            "--max-steps", 10, *MOCO)
    assert r.returncode == 2 and "no checkpoint of this run is kept" in r.stderr, r.stderr
    assert unchanged(before, out)
    r = run("moco.py", "--out", out, "--overwrite", "--data", image_folder, "--max-steps", 3, "--seed", 5, *MOCO)
    assert r.returncode == 0, r.stderr
    assert json.load(open(os.path.join(out, "args.json")))["seed"] == 5 and steps_logged(out) == [1, 2, 3]
    assert kept(out) == 3 and sorted(os.listdir(out)) == ["args.json", "ckpt.pt", "metrics.jsonl", "status"]


def damaged(ck, case):
    if case.startswith("no "):
        del ck[case[3:]]
    elif case == "weight shape":
        ck["model"]["encoder_q.features.0.weight"] = torch.zeros(32, 3, 4, 4)
    elif case == "momentum shape":
        ck["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)
    return ck


@pytest.mark.parametrize("case, words", [
    ("no model", ["lacks 'model'"]), ("no optimizer", ["lacks 'optimizer'"]),
    ("no step", ["lacks 'step'", "--overwrite"]), ("no rng", ["lacks 'rng'"]), ("no args", ["lacks 'args'"]),
    ("weight shape", ["(model): encoder_q.features.0.weight is [32, 3, 4, 4] there, [64, 3, 4, 4] here"]),
    ("momentum shape", ["(optimizer): momentum_buffer of parameter 0 is [3] there"]),
    ("truncated", ["truncated or not a checkpoint", "start over with --overwrite", "--resume another checkpoint"])])
def test_a_checkpoint_is_checked_whole_before_it_is_used(case, words, tmp_path, two_steps):
    """A damaged checkpoint never starts a run from nothing in disguise: one line naming what is wrong, exit 2,
    and nothing in OUT changed. In this process: the check comes before any loader starts."""
    out = copy_run(two_steps, tmp_path)
    path = os.path.join(out, "ckpt.pt")
    if case == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        torch.save(damaged(torch.load(path, weights_only=True), case), path)
    before = snapshot(out)
    r = in_process(moco.main, "--out", out, "--resume", "auto", "--max-steps", 4)
    one_line(r, 2, *words)
    assert unchanged(before, out) and snapshot(out).keys() == before.keys()
    if case == "weight shape":
        import eval_linear
        r = in_process(eval_linear.main, "--pretrained", path, "--epochs", 1, "--out", tmp_path / "e.json")
        one_line(r, 2, "does not match --arch basic32: features.0.weight is [32, 3, 4, 4] there")
    if case == "truncated":  # the way on it names
        r = in_process(moco.main, "--out", out, "--resume", "auto", "--overwrite", "--max-steps", 2)
        assert r.returncode == 0 and kept(out) == 2, r.stderr


# ----------------------------------------------------------------------------------------------------
# 5. No code from files
# ----------------------------------------------------------------------------------------------------
class Payload:
    """A pickle that runs code when loaded: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path, marker, base=None):
    state = dict(base or {"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}, "arch": "resnet50"})
    state["payload"] = Payload(marker)
    torch.save(state, path)


@slow
@pytest.mark.parametrize("script", ["moco.py", "dim.py", "eval_linear.py", "eval_linear.py --resume", "convert.py",
                                    "study.py"])
def test_no_file_a_script_reads_runs_code(script, tmp_path, two_steps):
    """A .pth.tar whose pickle would write a file: refused in one line that says why, and the file is not written."""
    marker, out = tmp_path / "pwned", tmp_path / "run"
    os.makedirs(out)
    evil = out / "ckpt.pt"
    base = torch.load(os.path.join(two_steps, "ckpt.pt"), weights_only=True) if script == "eval_linear.py --resume" \
        else None
    crafted(evil, marker)
    argv = {"moco.py": ["moco.py", "--out", out, "--resume", "auto", *MOCO],
            "dim.py": ["dim.py", "--out", out, "--resume", evil, *DIM],
            "eval_linear.py": ["eval_linear.py", "--pretrained", evil, "--out", tmp_path / "e.json"],
            "convert.py": ["convert.py", evil, tmp_path / "r50.pth"]}.get(script)
    if script == "eval_linear.py --resume":  # the probe's own checkpoint, beside its result
        pretrained = os.path.join(two_steps, "ckpt.pt")
        crafted(tmp_path / "e.pt", marker, base)
        argv = ["eval_linear.py", "--pretrained", pretrained, "--out", tmp_path / "e.json", "--resume", "auto",
                "--epochs", 1, "--workers", 2]
    if script == "study.py":  # a run folder of the study, which its first run resumes
        data = small_idx_folder(tmp_path)
        for m in ("0", "0.9", "0.99", "0.999", "0.9999"):
            os.makedirs(out / f"moco-K4096-m{m}" / "seed0")
            crafted(out / f"moco-K4096-m{m}" / "seed0" / "ckpt.pt", marker)
        argv = ["study.py", "--experiment", "momentum", "--data", data, "--out", out, "--seeds", 1, "--epochs", 1,
                "--probe-epochs", 1, "--device", "cpu"]
    r = run(*argv, timeout=300)
    one_line(r, 2, "not loaded, as loading it could run code", "posix.system")
    assert not os.path.exists(marker)


def test_official_checkpoints_load_with_weights_only(tmp_path):
    """main_moco.py's checkpoint layout (epoch, arch, state_dict, optimizer) loads as tensors, numbers and strings."""
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": {"module.encoder_q." + k: v for k, v in
                                                                  net.state_dict().items()},
                "optimizer": opt.state_dict()}, path)
    ck = moco.load_checkpoint(str(path))
    assert ck["arch"] == "resnet50" and torch.equal(ck["state_dict"]["module.encoder_q.weight"], net.weight)


# ----------------------------------------------------------------------------------------------------
# 6. A stop is a stop
# ----------------------------------------------------------------------------------------------------
@slow
def test_a_stop_under_torchrun_with_restarts_ends_the_job(tmp_path, image_folder):
    """SIGTERM to one worker of `torchrun --max-restarts 2`: every rank stops at the same step with the checkpoint
    written, no restart (each step logged once, no second start), torchrun exits 0 and OUT/status says stopped."""
    out = tmp_path / "run"
    p = start("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2", "moco.py",
              "--data", image_folder, "--out", out, "--epochs", 50, "--save-every", 1, "--resume", "auto", *MOCO)
    wait_for_step(p, out, 3)
    os.kill(children(p.pid)[1], signal.SIGTERM)
    r = finish(p, timeout=180)
    assert r.returncode == 0 and r.stdout.count("config:") == 1, r.stdout[-3000:] + r.stderr[-3000:]
    step = kept(out)
    assert steps_logged(out) == list(range(1, step + 1))
    assert open(out / "status").read().startswith(f"stopped by a signal to another rank after step {step}")


def slurm_recipe(name):
    """The bash block of docs/distributed.md that starts with `#!/bin/bash` and holds `name`."""
    text = open(os.path.join(ROOT, "docs", "distributed.md")).read()
    blocks = [b.split("```")[0] for b in text.split("```bash\n")[1:]]
    found = [b for b in blocks if b.startswith("#!/bin/bash") and name in b]
    assert len(found) == 1, name
    return found[0]


@slow
@pytest.mark.parametrize("recipe", ["torchrun", "srun python"])
def test_the_documented_slurm_recipes_requeue_a_stopped_run_and_not_a_finished_one(recipe, tmp_path, image_folder):
    """docs/distributed.md's SLURM scripts, as written, with sbatch's environment, `scontrol` and `srun` faked and the
    run made small: SIGUSR1 (the time limit's warning: to the batch shell for torchrun, `B:`; to the job step's
    process for one process) stops the run and requeues the job; the requeued job finishes it and does not requeue."""
    script, out = slurm_recipe(recipe), tmp_path / "run"
    small = script.replace("--nproc_per_node=8", "--nproc_per_node=2").replace("--data ~/imagenet --preset v2", "")
    small = small.replace("--dataset cifar10 --data ~/cifar --preset cifar --amp", "").replace(
        "--resume auto", f"--resume auto --data {image_folder} --max-steps 12 --save-every 1 " + " ".join(MOCO))
    small = small.replace("runs/v2", str(out)).replace("runs/cifar", str(out))
    assert small.count(str(image_folder)) == 1 and "~" not in small
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in [("scontrol", f'echo "$@" >> {tmp_path / "scontrol.log"}'), ("srun", 'exec "$@"'),
                       ("python", f'exec {sys.executable} "$@"'),
                       ("torchrun", f'exec {sys.executable} -m torch.distributed.run "$@"')]:
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(small)
    env = {**ENV, "PATH": f"{bin_}:{ENV['PATH']}", "SLURM_JOB_ID": "4242"}
    job = spawn(["bash", tmp_path / "job.sh"], env)
    wait_for_step(job, out, 3)
    os.kill(job.pid if recipe == "torchrun" else children(job.pid)[0], signal.SIGUSR1)
    r = finish(job, timeout=180)
    log = tmp_path / "scontrol.log"
    assert log.exists() and log.read_text() == "requeue 4242\n", r.stdout[-2000:] + r.stderr[-2000:]
    step = kept(out)
    assert 3 <= step < 12 and open(out / "status").read().startswith("stopped by SIGUSR1")
    job = spawn(["bash", tmp_path / "job.sh"], env)
    r = finish(job, timeout=180)
    assert log.read_text() == "requeue 4242\n", r.stdout[-2000:] + r.stderr[-2000:]  # no second requeue
    assert kept(out) == 12 and open(out / "status").read().startswith("finished")
    assert steps_logged(out) == list(range(1, 13))


@slow
def test_a_second_signal_does_not_change_the_exit_status(tmp_path, image_folder):
    """SIGTERM, then SIGTERM again from 0.3 s later every 20 ms until the end (a scheduler that escalates): exit 75,
    one "stopped" line, no temporary file, the checkpoint whole and finite."""
    out = tmp_path / "run"
    p = start("moco.py", "--data", image_folder, "--out", out, "--epochs", 50, "--save-every", 1, *MOCO)
    wait_for_step(p, out, 3)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    while p.poll() is None:  # and again, until it has ended
        p.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    r = finish(p)
    assert r.returncode == moco.PREEMPTED and r.stdout.count("stopped by SIGTERM") == 1, r.stdout[-2000:] + r.stderr
    assert kept(out) >= 3 and not [f for f in os.listdir(out) if ".tmp." in f]


@slow
def test_a_signal_before_the_first_step_ends_the_run(tmp_path, image_folder):
    """SIGTERM as soon as OUT/status says running (before any data is read): exit 75 and one line."""
    out = tmp_path / "run"
    p = start("moco.py", "--data", image_folder, "--out", out, "--epochs", 50, *MOCO)
    deadline = time.time() + 120
    while not os.path.exists(out / "status"):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    r = finish(p)
    one_line(r, moco.PREEMPTED, "stopped by a signal before the first step")
    assert not os.path.exists(out / "ckpt.pt") and open(out / "status").read().startswith("stopped")


@pytest.mark.parametrize("script", ["moco", "dim"])
def test_a_signal_in_start_up_code_that_catches_errors_still_ends_the_run(tmp_path, image_folder, monkeypatch,
                                                                           script):
    """A stop signal that lands inside start-up code with an `except Exception` (here moco.py's extension probe, which
    turns any error into "not available"; dim.py: loading the data, wrapped in one) is not taken for that code's
    error: the start-up goes no further, the run ends before its first step, exit 75, one line, no checkpoint. In
    this process: the signal is sent from inside that code."""
    mod, went_on = {"moco": moco, "dim": dim}[script], []
    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)  # the handler runs before this returns
        raise AssertionError("the signal did not stop the run")
    if script == "moco":  # --fused auto imports moco_ext and asks it whether it can run here; the model comes next
        fake = type(sys)("moco_ext")
        fake.unusable_reason = signalled
        monkeypatch.setitem(sys.modules, "moco_ext", fake)
        real = moco.build_model
        monkeypatch.setattr(moco, "build_model", lambda *a, **k: (went_on.append(1), real(*a, **k))[1])
        flags = [*MOCO, "--fused", "auto"]
    else:  # any start-up code: the data set's loading
        real = dim.load_data
        monkeypatch.setattr(dim, "load_data", lambda *a, **k: (guarded(signalled), went_on.append(1), real(*a, **k))[2])
        flags = DIM
    r = in_process(mod.main, "--data", image_folder, "--out", tmp_path / "run", "--max-steps", 3, *flags)
    assert r.returncode == mod.PREEMPTED and "stopped by a signal before the first step" in r.stderr, r.stderr
    assert not went_on and not os.path.exists(tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize("resume", [False, True])
def test_a_signal_while_the_first_batch_is_awaited_runs_no_step(tmp_path, image_folder, monkeypatch, resume):
    """One process: a stop signal that arrives while the loader prepares the first batch (its workers starting: the
    longest wait of a start-up) ends the run before any step, exit 75, one line; a resumed run's checkpoint stays as
    it was. In this process: the signal is sent from inside the loader's first next()."""
    out, argv = tmp_path / "run", ["--data", image_folder, "--out", tmp_path / "run", *MOCO]  # 2 loader workers
    if resume:
        in_process(moco.main, *argv, "--max-steps", 2, check=True)
        before = snapshot(out)
    real = moco.Run.batches

    def batches(self, epoch):
        it = real(self, epoch)
        os.kill(os.getpid(), signal.SIGUSR1)
        yield next(it)
        raise AssertionError("a step ran after the signal")
    monkeypatch.setattr(moco.Run, "batches", batches)
    r = in_process(moco.main, *argv, "--max-steps", 4, *(["--resume", "auto"] if resume else []))
    assert r.returncode == moco.PREEMPTED and "stopped by a signal before the first step" in r.stderr, r.stderr
    if resume:
        after = snapshot(out)
        assert {f: after[f] for f in before if f not in ("status", "metrics.jsonl", "args.json")} == \
            {f: before[f] for f in before if f not in ("status", "metrics.jsonl", "args.json")}
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    else:
        assert not os.path.exists(out / "ckpt.pt")


def guarded(f):
    """f() inside `except Exception`, as start-up code that reports any error and goes on."""
    try:
        f()
    except Exception:
        pass


def test_a_final_knn_pass_cut_by_a_stop_runs_on_resume(tmp_path, image_folder, monkeypatch):
    """A stop during the final kNN pass exits 75 with the last checkpoint kept; --resume auto then computes that
    pass and finishes; once more, there is nothing to do. In this process (--workers 0): the kNN pass is made to
    receive the signal through a wrapper."""
    argv = ["--data", image_folder, "--out", tmp_path / "run", "--max-steps", 3, *MOCO[:-2], "--workers", 0]
    argv[argv.index("--knn-every") + 1] = "1"
    real = moco.knn_accuracy

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGUSR1)
        raise AssertionError("the signal did not stop the kNN monitor")
    monkeypatch.setattr(moco, "knn_accuracy", signalled)
    r = in_process(moco.main, *argv)
    assert r.returncode == moco.PREEMPTED and "during the kNN monitor after step 3" in r.stderr, r.stderr
    kept(tmp_path / "run", 3)
    monkeypatch.setattr(moco, "knn_accuracy", real)
    r = in_process(moco.main, *argv, "--resume", "auto")
    assert r.returncode == 0 and "step 3 kNN top-1" in r.stdout and "done: 3 steps" in r.stdout, r.stdout + r.stderr
    r = in_process(moco.main, *argv, "--resume", "auto")
    assert r.returncode == 0 and "nothing to do" in r.stdout and "kNN top-1" not in r.stdout.split("nothing")[0]


@slow
def test_ranks_that_see_different_checkpoints_stop_together(tmp_path, two_steps, image_folder):
    """Under torchrun each machine reads --out itself: when rank 1's folder (another working directory here) holds no
    checkpoint while rank 0's does, both stop at once with one line, instead of resuming from different steps."""
    for d in ("r0", "r1"):
        os.makedirs(tmp_path / d)
    shutil.copytree(two_steps, tmp_path / "r0" / "run")
    wrapper = tmp_path / "by_rank.py"  # each rank works in its own folder
    wrapper.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nos.chdir({str(tmp_path)!r} + '/r' + "
                       "os.environ['RANK'])\nimport moco\nmoco.main(sys.argv[1:])\n")
    r = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper, "--out", "run",
            "--resume", "auto", "--max-steps", 4, "--data", image_folder, *MOCO, timeout=120)
    assert r.returncode != 0 and r.stderr.count("the processes see different checkpoints") == 2, r.stderr[-3000:]
    assert "[2, None]" in r.stderr and kept(tmp_path / "r0" / "run") == 2


# ----------------------------------------------------------------------------------------------------
# 7. Every write can fail cleanly
# ----------------------------------------------------------------------------------------------------
@slow
def test_ctrl_c_during_a_checkpoint_write(tmp_path, image_folder):
    """SIGINT while a checkpoint is written: exit 130, "interrupted", no temporary file; ckpt.pt is the previous
    checkpoint or none, never half of one."""
    out = tmp_path / "run"
    p = start("moco.py", "--data", image_folder, "--out", out, "--epochs", 50, "--save-every", 1,
              *MOCO[:MOCO.index("--moco-k")], "--moco-k", 65536, *MOCO[MOCO.index("--moco-k") + 2:], ctrl_c=True)
    wait_for_step(p, out, 2)
    deadline = time.time() + 120
    while not [f for f in os.listdir(out) if f.startswith("ckpt.pt.tmp.")]:
        assert p.poll() is None and time.time() < deadline
    p.send_signal(signal.SIGINT)
    r = finish(p)
    one_line(r, 130, "interrupted;")
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    if os.path.exists(out / "ckpt.pt"):
        kept(out)


def test_leftover_temporary_files_are_removed_at_the_next_start(tmp_path, two_steps):
    """Temporary files of a killed writer (and an --overwrite run's unfinished *.new) go at the next start; the
    run's own files and other files in OUT stay."""
    out = copy_run(two_steps, tmp_path)
    for name in ("ckpt.pt.tmp.123", "metrics.jsonl.tmp.9", "args.json.new", "status.tmp.77", "notes.txt",
                 "eval_backbone_linear.json.tmp.5"):
        open(os.path.join(out, name), "w").close()
    r = in_process(moco.main, "--out", out, "--resume", "auto", "--max-steps", 3)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["args.json", "ckpt.pt", "eval_backbone_linear.json.tmp.5", "metrics.jsonl",
                                       "notes.txt", "status"]


def test_the_evaluation_result_is_written_by_a_rename(tmp_path, moco_ckpt, monkeypatch):
    """eval_linear.py's result JSON goes to a temporary file that is renamed over OUT: a failed write never leaves
    half a result, nor an older one emptied. In this process, the renames watched (--workers 0: nothing to do with
    loader processes)."""
    renamed, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b))), real(a, b)))
    out = tmp_path / "e.json"
    out.write_text("older")
    import eval_linear
    r = in_process(eval_linear.main, "--pretrained", moco_ckpt, "--epochs", 1, "--out", out, "--workers", 0)
    assert r.returncode == 0 and json.load(open(out))["epochs"] == 1, r.stderr
    assert (f"{out}.tmp.{os.getpid()}", str(out)) in renamed, renamed


def test_a_rename_is_followed_by_an_fsync_of_its_folder(tmp_path, monkeypatch):
    """replace_file fsyncs the new file, renames it, then fsyncs the folder, so that the rename survives a power
    cut."""
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    moco.replace_file(str(tmp_path / "a.json"), lambda f: f.write(b"{}"))
    assert synced[-1] == str(tmp_path) and synced[0].startswith(str(tmp_path / "a.json.tmp."))


@slow
@pytest.mark.parametrize("limit", ["file size", "full disk"])
@pytest.mark.parametrize("script", ["eval_linear.py", "convert.py"])
def test_outputs_are_written_whole_or_not_at_all(script, limit, tmp_path, moco_ckpt):
    """eval_linear.py's result and convert.py's state dict under a file-size limit (EFBIG) and on a full disk
    (ENOSPC, a 64 kB tmpfs): one line naming the file and the cause, exit 2, no temporary file, an older output
    untouched."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    name = "e.json" if script == "eval_linear.py" else "r.pth"
    (out_dir / name).write_text("older")
    # --workers 0 under the file-size limit: it binds a loader's shared-memory files too (test_a_full_dev_shm_...)
    workers = 0 if limit == "file size" else 2
    argv = ([script, "--pretrained", moco_ckpt, "--epochs", 1, "--out", out_dir / name, "--workers", workers]
            if script == "eval_linear.py" else [script, moco_ckpt, out_dir / name])
    if limit == "file size":
        def cap():
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))
        p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, text=True, preexec_fn=cap,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        cause = "File too large"
    else:
        cmd = f"mount -t tmpfs -o size=64k tmpfs {out_dir} && exec {sys.executable} " + " ".join(map(str, argv))
        if script == "eval_linear.py":  # the result is small: a disk already full but for 4 kB
            cmd = cmd.replace("&& exec", f"&& echo older > {out_dir / name} && head -c 61440 /dev/zero > "
                                         f"{out_dir}/filler && exec")
        p = spawn(namespace() + [cmd])
        cause = "No space left on device"
    r = finish(p, timeout=180)
    # eval_linear.py writes the probe's checkpoint (e.pt) before its result: the first write that fails is named
    one_line(r, 2, f"{out_dir / name}" if script == "convert.py" else f"{out_dir / 'e.pt'}", cause)
    if limit == "file size":
        assert (out_dir / name).read_text() == "older" and sorted(os.listdir(out_dir)) == [name]


# ----------------------------------------------------------------------------------------------------
# 8. The remaining bad inputs get one line
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["data", "class"])
def test_unreadable_folders_are_one_line(where, tmp_path, image_folder, monkeypatch):
    """A --data folder or a class folder without read permission (os.scandir and os.walk refusing, as they do for a
    user without the permission; the suite may run as root, which ignores permissions): one line naming it."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    refused = str(data if where == "data" else data / "class1")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    r = in_process(moco.main, "--data", data, "--out", tmp_path / "run", *MOCO)
    one_line(r, 2, f"cannot read {refused} (Permission denied)")


@pytest.mark.parametrize("flag", ["--lr", "--moco-t", "--wd"])
def test_float_flags_beyond_float32_are_one_line(flag, tmp_path):
    r = in_process(moco.main, flag, "1e39", "--out", tmp_path / "run")
    one_line(r, 2, f"{flag} 1e+39 does not fit a float32")


def test_a_one_class_data_set_says_its_accuracy_means_nothing(tmp_path, image_folder):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(image_folder, "class0"), data / "only")
    r = in_process(moco.main, "--data", data, "--out", tmp_path / "run", "--max-steps", 1, *MOCO, "--knn-every", 1)
    assert r.returncode == 0 and "the kNN bank has one class" in r.stdout, r.stdout + r.stderr
