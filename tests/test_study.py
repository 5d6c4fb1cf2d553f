"""study.py end to end on a small IDX folder cut from the built-in data (the real study needs the full data set)."""
import functools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import moco
from bench_e2e import write_idx  # tests/ is on sys.path (pytest's rootdir-less import of the test folder)
from conftest import in_process, whole

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_idx_folder(tmp_path):
    x = moco.read_idx(os.path.join(ROOT, "data", "t10k-images-idx3-ubyte.gz"))
    y = moco.read_idx(os.path.join(ROOT, "data", "t10k-labels-idx1-ubyte.gz"))
    data = tmp_path / "fmnist"
    data.mkdir()
    for split, sl in (("train", slice(0, 1200)), ("t10k", slice(8000, 8400))):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", x[sl])
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", y[sl])
    return data


def run_study(argv, process=False):
    """study.py argv -> its stdout; in this process unless process (the command line itself)."""
    if not process:
        import study
        return in_process(study.main, *argv, check=True).stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "study.py"), *map(str, argv)], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_study_runs_end_to_end(tmp_path):
    data, out = small_idx_folder(tmp_path), tmp_path / "out"
    argv = ["--data", data, "--out", out, "--budget", 2, "--seeds", 2, "--methods", "dimL-jsd,moco,supervised",
            "--probe-epochs", 3, "--mlp-epochs", 1, "--device", "cpu", "--knn-conv", "on"]
    log = run_study(argv, process=True)
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    got = {(r["method"], r["layer"], r["probe"], r["frac"]) for r in rows}
    for method, layers in (("dimL-jsd", ("conv", "fc", "y")), ("moco", ("conv", "backbone")),
                           ("supervised", ("conv", "backbone")), ("random", ("conv", "fc", "y"))):
        for layer in layers:
            assert (method, layer, "linear", 1.0) in got and (method, layer, "knn", 1.0) in got, (method, layer)
    assert ("dimL-jsd", "conv", "mlp", 1.0) in got and ("moco", "backbone", "mlp", 1.0) in got
    assert ("moco", "conv", "curve", 0.5) in got and ("dimL-jsd", "conv", "curve", 0.5) in got
    assert ("pixels", "pixels", "linear", 1.0) in got and ("pixels", "pixels", "curve", 1.0) in got
    assert len({r["seed"] for r in rows}) == 2
    assert all(whole(r["top1"], 400) for r in rows if r["probe"] != "curve"), rows  # % of the 400 test images
    # learning, judged against the same encoder at random initialisation (not against chance): the conv-layer
    # kNN top-1 of the trained encoders (DIM, MoCo, supervised; both seeds) beats the random encoder's
    # (measured 2026-12-01: 67.17 vs 64.38 on the 400 test images; linear probes at this budget do not separate)
    knn_conv = lambda methods: [r["top1"] for r in rows if r["method"] in methods and r["layer"] == "conv"
                                and r["probe"] == "knn"]
    trained, rnd = knn_conv({"dimL-jsd", "moco", "supervised"}), knn_conv({"random"})
    assert len(trained) == 6 and len(rnd) == 2
    assert sum(trained) / 6 > sum(rnd) / 2, (trained, rnd)
    assert (out / "results.png").exists() or "no matplotlib" in log  # matplotlib is optional
    table = (out / "results.md").read_text()
    for label in ("DIM(L) JSD", "MoCo v2", "supervised", "random init", "raw pixels"):
        assert f"| {label} |" in table
    assert " ± " in table and "total run time" in table
    # the runs are the scripts themselves: their checkpoints and logs are there, with the budget's step count
    ck = [n for n in os.listdir(out / "moco" / "seed0") if n.startswith("ckpt_")]
    assert len(ck) == 2 and (out / "moco" / "seed0" / "metrics.jsonl").exists()
    # a second call finds every result and only rewrites the table
    again = run_study(argv)
    assert "$ python" not in again and "s per step" not in again, again[-2000:]
    assert len([json.loads(l) for l in open(out / "results.jsonl")]) == len(rows)


@pytest.mark.slow
def test_moco_ablations_run_share_and_resume(tmp_path):
    """The three MoCo experiments on 1,200 images (K 256 and 512, one epoch per run): every run is moco.py with
    its mechanism, K, m or shuffle-BN; the shuffle-BN runs get kNN snapshots over training and the pretext curve;
    runs with the same settings are shared between experiments; a second call only rewrites the tables."""
    data, out = small_idx_folder(tmp_path), tmp_path / "abl"
    common = ["--data", data, "--out", out, "--seeds", 1, "--ks", "256,512", "--epochs", 1, "--probe-epochs", 1,
              "--device", "cpu"]
    logs = {e: run_study(["--experiment", e] + common) for e in ("shuffle-bn", "momentum", "mechanisms")}
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    runs = {r["run"] for r in rows}
    assert runs == {"moco-K4096-m0.99", "moco-K4096-m0.99-noshuffle", "moco-K4096-m0", "moco-K4096-m0.9",
                    "moco-K4096-m0.999", "moco-K4096-m0.9999", "end-to-end-K256", "end-to-end-K512",
                    "memory-bank-K256", "memory-bank-K512", "moco-K256-m0.99", "moco-K512-m0.99"}
    assert "moco-K4096-m0.99/seed0" not in logs["momentum"]  # run once, by shuffle-bn, and reused
    snaps = {r["frac"] for r in rows if r["run"] == "moco-K4096-m0.99-noshuffle"}
    assert snaps == {0.25, 0.5, 0.75, 1.0}
    assert {r["frac"] for r in rows if r["run"] == "memory-bank-K512"} == {1.0}
    assert all(whole(r["top1"], 400) and r["probe"] in ("knn", "linear") for r in rows)  # % of the 400 test images
    e2e = [r for r in rows if r["run"] == "end-to-end-K512" and r["frac"] == 1.0]
    assert e2e[0]["steps"] == 1200 // 512 and len(e2e[0]["pretext_curve"]) >= 1  # batch 512: 2 steps an epoch
    args = json.load(open(out / "end-to-end-K512" / "seed0" / "args.json"))
    assert args["mechanism"] == "end-to-end" and args["batch_size"] == 512 and args["lr"] == 0.06
    args = json.load(open(out / "moco-K4096-m0.99-noshuffle" / "seed0" / "args.json"))
    assert args["shuffle_bn"] == "off" and args["moco_m"] == 0.99 and args["moco_k"] == 4096
    table = (out / "results-mechanisms.md").read_text()
    assert "| memory-bank | knn |" in table and "| moco | paper (IN-1M linear) | 54.7 | - |" in table
    assert "| paper (IN-1M linear, K 4096) | fails |" in (out / "results-momentum.md").read_text()
    assert "| off |" in (out / "results-shuffle-bn.md").read_text()
    again = run_study(["--experiment", "mechanisms"] + common)
    assert "$ python" not in again and len([json.loads(l) for l in open(out / "results.jsonl")]) == len(rows)


def test_steps_flag_is_checked():
    import study
    args = study.parse_args(["--data", "DIR", "--steps", "moco=172,dimL-jsd=555"])
    assert study.given_steps(args) == {"moco": 172, "dimL-jsd": 555}
    for bad in ("moco=0", "mocco=10", "moco"):
        with pytest.raises(study.UserError, match="--steps"):
            study.parse_args(["--data", "DIR", "--steps", bad])


@pytest.mark.slow
def test_given_steps_skip_the_calibration(tmp_path):
    """--steps METHOD=N runs exactly N steps without calibrating, and results.md prints the counts to pass back."""
    data, out = small_idx_folder(tmp_path), tmp_path / "cmp"
    log = run_study(["--data", data, "--out", out, "--seeds", 1, "--methods", "moco", "--steps", "moco=5",
                     "--probe-epochs", 1, "--mlp-epochs", 0, "--device", "cpu"])
    assert "moco: given 5 steps" in log and "calibrate" not in log
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    assert {r["steps"] for r in rows if r["method"] == "moco" and r["frac"] == 1.0} == {5}
    assert (f"`python study.py --data {data} --out {out} --seeds 1 --methods moco --steps moco=5 --probe-epochs 1 "
            "--mlp-epochs 0 --device cpu`") in (out / "results.md").read_text()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "study.py"), "--data", str(data), "--out", str(out),
                        "--methods", "moco", "--steps", "moco=6", "--device", "cpu"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 2 and "holds 5 steps" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_ndm_measures_dependence_between_dimensions():
    """NDM (DV estimate of the total correlation): about 0 for independent dimensions, and for two Gaussian
    dimensions with correlation 0.9 close to the true -0.5 log(1 - 0.81) = 0.83 nats (a lower bound, trained)."""
    import study
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24000, 2, generator=g)
    indep_tr, indep_te = x[:20000], x[20000:]
    rho = 0.9
    corr = torch.stack([x[:, 0], rho * x[:, 0] + (1 - rho ** 2) ** 0.5 * x[:, 1]], 1)
    assert abs(study.ndm(indep_tr, indep_te, seed=0, epochs=5)) < 0.05
    got = study.ndm(corr[:20000], corr[20000:], seed=0, epochs=5)
    assert 0.6 < got < 1.0, got


@pytest.mark.slow
def test_dim_ablations_run_share_and_count_divergence(tmp_path, monkeypatch):
    """dim-prior then dim-estimators on 1,200 images: every run is dim.py with its estimator, batch, gamma or
    penalty; the probes on conv / fc / Y and the NDM of Y are recorded; the shared run (DIM(L) JSD, batch 64, the
    defaults) runs once; a run whose loss turns non-finite is counted as diverged, not evaluated."""
    import study
    data, out = small_idx_folder(tmp_path), tmp_path / "dabl"
    common = ["--data", str(data), "--out", str(out), "--seeds", "1", "--probe-epochs", "1", "--dim-epochs", "0.5",
              "--device", "cpu"]
    study.main(["--experiment", "dim-prior"] + common)
    real, calls = study.dim.train, []

    def train(argv):  # the DV runs at batch 16 "diverge"
        calls.append(argv[argv.index("--out") + 1])
        if "dimL-dv-B16" in calls[-1]:
            raise study.dim.UserError("loss is nan at step 3: stopped; the last good checkpoint is intact")
        return real(argv)
    monkeypatch.setattr(study.dim, "train", train)
    study.main(["--experiment", "dim-estimators"] + common)
    assert not any("dimL-jsd-B64" + os.sep in c for c in calls)  # run by dim-prior, reused
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    got = {(r["run"], r["layer"], r["probe"]) for r in rows}
    for run in ("dimL-jsd-B64-g0", "dimG-B64-g0.1", "dimG-B64", "dimG-B64-gp0", "dimL-nce-B128", "dimL-dv-B32"):
        assert {(run, l, "linear") for l in ("conv", "fc", "y")} | {(run, "y", "ndm")} <= got, run
    assert ("dimL-dv-B16", "", "diverged") in got
    args = json.load(open(out / "dimG-B64-gp0" / "seed0" / "args.json"))
    assert (args["alpha"], args["beta"], args["gamma"], args["prior_gp"]) == (1.0, 0.0, 1.0, 0.0)
    assert (args["global_critic"], args["global_layer"]) == ("mlp", "conv")
    args = json.load(open(out / "dimL-nce-B32" / "seed0" / "args.json"))
    assert args["estimator"] == "nce" and args["batch_size"] == 32 and args["prior_gp"] == 1.0
    steps = {r["run"]: r["steps"] for r in rows if r["probe"] == "linear"}
    assert steps["dimL-jsd-B16"] == round(0.5 * (1200 // 16)) and steps["dimL-jsd-B128"] == round(0.5 * (1200 // 128))
    table = (out / "results-dim-estimators.md").read_text()
    assert "| dimL-dv-B16 | dv | 16 (960) |" in table and "| 1 |" in table  # one diverged seed
    assert "| DIM(G) | gamma 1, no penalty |" in (out / "results-dim-prior.md").read_text()


@pytest.mark.parametrize("script", ["moco.py", "dim.py", "eval_linear.py", "convert.py", "study.py"])
def test_help_prints(script):
    """--help works for every script (argparse formats a '%' in a help text); in this process, as each script's
    command line runs as a real process elsewhere in the tests."""
    import importlib
    p = in_process(importlib.import_module(script[:-3]).main, "--help")
    assert p.returncode == 0 and "usage:" in p.stdout and "--help" in p.stdout, p.stderr[-2000:]


# ---- the step budget (--per-run steps): planning, unit tests ----
def plan(*argv, n_train=60000):
    """-> {run name: (steps, the flags of its seed 0 as a dict of flag -> value)} of study.py argv."""
    import study
    args = study.parse_args(["--data", "DIR", "--out", "OUT", *argv])
    out = {}
    for run in study.planned_runs(args, n_train):
        argv = study.planned_argv(run, args, 0, n_train)[1]
        out[run.name] = run.steps, {f: argv[argv.index(f) + 1] for f in ("--max-steps", "--epochs", "--batch-size",
                                                                         "--lr")}
    return out


def test_step_budget_plans_mechanisms():
    """--per-run steps: every run the same steps, lr 0.03 B / 256; a run whose count is its image budget's keeps its
    name and its flags exactly (its results are reused), every other one is NAME-sSTEPS; the image budget itself
    plans what it always has (468 steps of 256, 116 of 1024, 28 of 4096 at 2 epochs of 60,000 images)."""
    images = plan("--experiment", "mechanisms")
    assert images["end-to-end-K1024"] == (116, {"--max-steps": "116", "--epochs": "2", "--batch-size": "1024",
                                                "--lr": "0.12"})
    assert images["end-to-end-K4096"][0] == 28 and images["moco-K16384-m0.99"][0] == 468
    assert "end-to-end-K16384" not in images and len(images) == 11
    steps = plan("--experiment", "mechanisms", "--per-run", "steps", "--run-steps", "116")
    assert set(steps) == {"end-to-end-K256-s116", "end-to-end-K1024", "end-to-end-K4096-s116"} | {
        f"{m}-K{K}{s}-s116" for m, s in (("memory-bank", ""), ("moco", "-m0.99")) for K in (256, 1024, 4096, 16384)}
    assert steps["end-to-end-K1024"] == images["end-to-end-K1024"]  # shared: same name, same flags
    assert steps["end-to-end-K4096-s116"] == (116, {"--max-steps": "116", "--epochs": "9", "--batch-size": "4096",
                                                    "--lr": "0.48"})  # 14 steps an epoch
    assert steps["moco-K16384-m0.99-s116"] == (116, {"--max-steps": "116", "--epochs": "1", "--batch-size": "256",
                                                     "--lr": "0.03"})
    import study  # the shared run's whole command line, under either budget, is the image budget's
    out = os.path.join("OUT", "end-to-end-K1024", "seed0")
    e2e = ["--dataset", "fashionmnist", "--knn-every", "0", "--gpu-aug", "on", "--log-every", "20", "--preset", "small",
           "--mlp", "--moco-t", "0.2", "--lr", "0.12", "--crop-min", "0.8", "--bn-splits", "4", "--mechanism",
           "end-to-end", "--moco-k", "1024", "--moco-m", "0.99", "--shuffle-bn", "on", "--batch-size", "1024",
           "--data", "DIR", "--out", out, "--seed", "0", "--device", "auto", "--max-steps", "116", "--epochs", "2",
           "--resume", "auto"]
    for argv in ([], ["--per-run", "steps", "--run-steps", "116"]):
        args = study.parse_args(["--data", "DIR", "--out", "OUT", "--experiment", "mechanisms", *argv])
        run = [r for r in study.planned_runs(args, 60000) if r.name == "end-to-end-K1024"]
        assert study.planned_argv(run[0], args, 0, 60000) == (out, e2e)
    auto = plan("--experiment", "mechanisms", "--per-run", "steps", "--epochs", "2")  # batch 256's 468 steps
    assert {n: v for n, v in auto.items() if not n.endswith("-s468")} == {
        n: v for n, v in images.items() if not n.startswith("end-to-end-K") or n == "end-to-end-K256"}
    assert auto["end-to-end-K4096-s468"] == (468, {"--max-steps": "468", "--epochs": "34", "--batch-size": "4096",
                                                   "--lr": "0.48"})


def test_step_budget_plans_dim_estimators():
    """DIM: batch 64's 234 steps at --dim-epochs 0.25 by default, lr 5e-4 at every batch; B64 keeps its runs."""
    images = plan("--experiment", "dim-estimators")
    assert {n: s for n, (s, _) in images.items() if n.startswith("dimL-nce")} == {
        "dimL-nce-B16": 938, "dimL-nce-B32": 469, "dimL-nce-B64": 234, "dimL-nce-B128": 117}
    steps = plan("--experiment", "dim-estimators", "--per-run", "steps")
    assert len(steps) == 12 and all(s == 234 for s, _ in steps.values())
    for est in ("jsd", "nce", "dv"):
        assert steps[f"dimL-{est}-B64"] == images[f"dimL-{est}-B64"]
        assert steps[f"dimL-{est}-B16-s234"][1] == {"--max-steps": "234", "--epochs": "1", "--batch-size": "16",
                                                    "--lr": "5e-4"}
    assert plan("--experiment", "dim-estimators", "--per-run", "steps", "--run-steps", "938")["dimL-jsd-B16"] == \
        images["dimL-jsd-B16"]
    assert set(plan("--experiment", "dim-prior")) == {"dimL-jsd-B64-g0", "dimL-jsd-B64", "dimL-jsd-B64-gp0",
                                                      "dimG-B64-g0", "dimG-B64-g0.1", "dimG-B64", "dimG-B64-gp0"}


def test_step_budget_flags_are_checked():
    import study
    for argv, match in ((["--per-run", "steps"], "--per-run steps: for --experiment mechanisms or dim-estimators"),
                        (["--per-run", "steps", "--experiment", "momentum"], "share one batch size"),
                        (["--per-run", "steps", "--experiment", "dim-prior"], "share one batch size"),
                        (["--per-run", "steps", "--experiment", "mechanisms", "--run-steps", "-1"], "N >= 1"),
                        (["--experiment", "mechanisms", "--run-steps", "116"], "with --per-run steps"),
                        (["--per-run", "batches"], "invalid choice")):
        p = in_process(study.main, "--data", "DIR", *argv)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and match in p.stderr, (argv, p.stderr)
    args = study.parse_args(["--data", "DIR", "--experiment", "dim-estimators", "--per-run", "steps"])
    assert study.stem(args) == "results-dim-estimators-steps" and study.budget(args, 60000) == "234 steps"


def fake_rows(path, runs, probes, **row):
    """Rows of finished runs in a results.jsonl: what the step budget must find and reuse, not rerun."""
    with open(path, "a") as f:
        for run in runs:
            for layer, probe in probes:
                f.write(json.dumps(dict(run=run, seed=0, frac=1.0, steps=2, time_s=1.0, layer=layer, probe=probe,
                                        top1=50.0, **row)) + "\n")


@pytest.mark.slow
def test_mechanisms_step_budget_end_to_end(tmp_path):
    """--per-run steps on 1,200 images, K 128 and 256, 2 steps per run: at --epochs 0.5 the runs of batch 256 get 2
    steps from the image budget too, so their (here made-up) results are reused and only end-to-end at K 128 (4
    steps under the image budget) runs, as end-to-end-K128-s2; results-mechanisms-steps.md lists the images seen,
    and the image budget's table is left as it was."""
    data, out = small_idx_folder(tmp_path), tmp_path / "abl"
    out.mkdir()
    shared = ["end-to-end-K256", "memory-bank-K128", "memory-bank-K256", "moco-K128-m0.99", "moco-K256-m0.99"]
    fake_rows(out / "results.jsonl", shared, (("backbone", "knn"), ("backbone", "linear")), pretext_top1=1.0)
    (out / "results-mechanisms.md").write_text("the image budget's table\n")
    argv = ["--data", data, "--out", out, "--experiment", "mechanisms", "--per-run", "steps", "--run-steps", 2,
            "--seeds", 1, "--ks", "128,256", "--epochs", 0.5, "--probe-epochs", 1, "--device", "cpu"]
    log = run_study(argv)
    assert log.count("$ python moco.py") == 1 and "end-to-end-K128-s2" + os.sep + "seed0" in log
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    assert {(r["probe"], r["steps"]) for r in rows if r["run"] == "end-to-end-K128-s2"} == {("knn", 2), ("linear", 2)}
    args = json.load(open(out / "end-to-end-K128-s2" / "seed0" / "args.json"))
    assert (args["batch_size"], args["max_steps"], args["epochs"], args["lr"]) == (128, 2, 1, 0.015)
    table = (out / "results-mechanisms-steps.md").read_text()
    assert "2 steps of pretraining per run" in table and "| run | steps | images seen (epochs) |" in table
    assert "| end-to-end-K128-s2 | 2 | 256 (0.21) |" in table and "| moco-K256-m0.99 | 2 | 512 (0.43) |" in table
    assert f"`python study.py --data {data} --out {out} --experiment mechanisms --per-run steps" in table
    assert (out / "results-mechanisms-steps.png").exists() or "no matplotlib" in log
    assert (out / "results-mechanisms.md").read_text() == "the image budget's table\n"
    assert not (out / "results-mechanisms.png").exists()


@pytest.mark.slow
def test_dim_estimators_step_budget_end_to_end(tmp_path, monkeypatch):
    """--per-run steps for dim-estimators on 1,200 images, batches 16 and 64, 2 steps per run, resumed: batch 64's
    runs are the image budget's at --dim-epochs 0.1 and JSD's and infoNCE's dimL-EST-B16-s2 are done (made-up
    results of earlier calls), so only dimL-dv-B16-s2 runs (NDM's critic trained 1 epoch, not 20)."""
    import study
    monkeypatch.setattr(study, "DIM_BATCHES", (16, 64))
    monkeypatch.setattr(study, "ndm", functools.partial(study.ndm, epochs=1))
    data, out = small_idx_folder(tmp_path), tmp_path / "dabl"
    out.mkdir()
    fake_rows(out / "results.jsonl", [f"dimL-{e}-B64" for e in ("jsd", "nce", "dv")] + ["dimL-jsd-B16-s2",
                                                                                         "dimL-nce-B16-s2"],
              [(layer, "linear") for layer in study.DIM_LAYERS] + [("y", "ndm")])
    log = run_study(["--data", data, "--out", out, "--experiment", "dim-estimators", "--per-run", "steps",
                     "--run-steps", 2, "--seeds", 1, "--dim-epochs", 0.1, "--probe-epochs", 1, "--device", "cpu"])
    assert log.count("$ python dim.py") == 1 and "dimL-dv-B16-s2" + os.sep + "seed0" in log
    rows = [json.loads(l) for l in open(out / "results.jsonl")]
    assert {(r["layer"], r["probe"], r["steps"]) for r in rows if r["run"] == "dimL-dv-B16-s2"} == {
        ("conv", "linear", 2), ("fc", "linear", 2), ("y", "linear", 2), ("y", "ndm", 2)}
    args = json.load(open(out / "dimL-dv-B16-s2" / "seed0" / "args.json"))
    assert (args["estimator"], args["batch_size"], args["max_steps"], args["lr"]) == ("dv", 16, 2, 5e-4)
    table = (out / "results-dim-estimators-steps.md").read_text()
    assert "2 steps of pretraining per run" in table and "| steps | images seen (epochs) | s per run |" in table
    assert "| dimL-dv-B16-s2 | dv | 16 (960) |" in table and "| 0 | 2 | 32 (0.03) |" in table
    assert "| dimL-nce-B64 | nce | 64 (4032) | 50.00 | 50.00 | 50.00 | 50.000 | 0 | 2 | 128 (0.11) | 1 |" in table
    assert (out / "results-dim-estimators-steps.png").exists() or "no matplotlib" in log
    assert not (out / "results-dim-estimators.md").exists()


# ---- a fresh clone, and tables that print what was measured ----
def test_data_is_required_and_download_reaches_the_loaders(tmp_path, monkeypatch):
    """No default data folder: without --data one line says what to give; --download reaches eval_views' load,
    the scripts' runs and the folder check; no text of study.py points at a folder outside the repository."""
    import study
    p = in_process(study.main, "--experiment", "mechanisms")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: give --data FOLDER: the four Fashion-MNIST IDX files, or a folder for torchvision's FashionMNIST "
        "with --download"]
    args = study.parse_args(["--data", str(tmp_path / "fm"), "--out", str(tmp_path / "o"), "--download"])
    study.setup(args)  # the folder is torchvision's to make
    seen = []

    def load_data(a):
        seen.append((a.data, a.dataset, a.download))
        raise study.UserError("stop")
    monkeypatch.setattr(study.moco, "load_data", load_data)
    with pytest.raises(study.UserError, match="stop"):
        study.eval_views(args)
    assert seen == [(str(tmp_path / "fm"), "fashionmnist", True)]
    assert study.run_argv([], args, "o", 0, 1, 1, 1)[-1] == "--download"
    assert "--download" not in study.run_argv([], study.parse_args(["--data", "DIR"]), "o", 0, 1, 1, 1)
    with pytest.raises(study.UserError, match="no such folder"):
        study.setup(study.parse_args(["--data", str(tmp_path / "fm2"), "--out", str(tmp_path / "o")]))
    assert "../shared" not in open(os.path.join(ROOT, "study.py")).read()


def compare_rows(seeds, time_s=8.0):
    """Rows of the compare study: the baselines and MoCo, `seeds` seeds."""
    rows = []
    for seed in range(seeds):
        for method, layer, probe, top1 in (("pixels", "pixels", "linear", 84.0), ("random", "fc", "linear", 86.0),
                                           ("random", "conv", "linear", 87.0), ("moco", "backbone", "linear", 88.0),
                                           ("moco", "conv", "linear", 89.0), ("moco", "backbone", "knn", 82.0)):
            rows.append(dict(method=method, seed=seed, frac=1.0, time_s=time_s if method == "moco" else 0.0,
                             steps=5 if method == "moco" else 0, layer=layer, probe=probe, top1=top1 + seed))
    return rows


def test_tables_print_one_seed_without_std(tmp_path):
    """One seed: every table prints the value alone, no std and no margin in units of a std of zero."""
    import study
    args = study.parse_args(["--data", "DIR", "--out", str(tmp_path), "--seeds", "1", "--ks", "256"])
    text = study.report(compare_rows(1), args, 60.0)
    assert "| MoCo v2 | backbone | 88.00 |  | 82.00 |  | +2.00 | 8 | 5 |" in text and "one seed" in text
    assert "| MoCo v2 | backbone | 88.50 ± 0.71 |" in study.report(compare_rows(2), args, 60.0)  # 2 seeds: a std
    args.experiment = "mechanisms"
    rows = [dict(run=r, seed=0, frac=1.0, steps=468, time_s=9.0, layer="backbone", probe=p, top1=80.0)
            for r in ("moco-K256-m0.99", "end-to-end-K256") for p in ("knn", "linear")]
    assert "| moco | knn | 80.00 |" in study.ablation_report(rows, args, 60.0, 60000)
    args.experiment = "dim-estimators"
    rows = [dict(run="dimL-nce-B16", seed=0, frac=1.0, steps=938, time_s=9.0, layer=layer, probe=p, top1=80.0)
            for layer, p in (("conv", "linear"), ("fc", "linear"), ("y", "linear"), ("y", "ndm"))]
    text = study.dim_report(rows, args, 60.0, 60000)
    assert "| dimL-nce-B16 | nce | 16 (960) | 80.00 | 80.00 | 80.00 | 80.000 | 0 | 938 | 9 |" in text
    for text in (study.report(compare_rows(1), args, 1.0), text, (tmp_path / "results-mechanisms.md").read_text()):
        assert "±" not in text.split("\n", 1)[1] and "std)" not in text


def test_compare_header_times_are_measured(tmp_path):
    """The header of results.md gives the pretraining seconds the runs took, not --budget."""
    import study
    args = study.parse_args(["--data", "DIR", "--out", str(tmp_path), "--budget", "120"])
    text = study.report(compare_rows(2, time_s=8.4), args, 60.0)
    assert "pretraining 8 s per run (measured)" in text.splitlines()[0] and "120" not in text.splitlines()[0]


def test_printed_commands_rerun_the_call(tmp_path, monkeypatch):
    """results-*.md's command and the rerun hint hold every flag given (--data, --methods, --seeds, ...), not
    sys.argv, and parse back into the same arguments (the hint with the measured --steps counts)."""
    import study
    monkeypatch.setattr(sys, "argv", ["pytest", "-k", "x"])
    given = ["--data", str(tmp_path / "my data"), "--out", str(tmp_path), "--methods", "moco", "--seeds", "2",
             "--budget", "30", "--threads", "1"]
    args = study.parse_args(given)
    lines = study.report(compare_rows(2), args, 60.0).splitlines()
    command, rerun = lines[-3].split("`")[1], lines[-1].split("`")[1]
    assert shlex.split(command) == ["python", "study.py", *given]
    assert shlex.split(rerun) == ["python", "study.py", *given, "--steps", "moco=5"]
    again = study.parse_args(shlex.split(rerun)[2:])
    assert vars(again) == {**vars(args), "steps": "moco=5", "given": again.given}
    for experiment, writer in (("mechanisms", study.ablation_report), ("dim-estimators", study.dim_report)):
        argv = ["--data", "DIR", "--out", str(tmp_path), "--experiment", experiment, "--per-run", "steps",
                "--seeds", "1", "--download"]
        last = writer([], study.parse_args(argv), 60.0, 60000).splitlines()[-1]
        assert shlex.split(last.split("`")[1]) == ["python", "study.py", *argv]


def test_user_facing_text_is_current():
    """The docstring's commands parse (each names its --data); no text points at a folder outside the repository,
    or at an issue; every --help line is of the code as it is."""
    import study
    commands = [l.split("#")[0].split()[2:] for l in study.__doc__.splitlines() if l.strip().startswith("python ")]
    assert len(commands) >= 8
    for argv in commands:
        assert argv[:2] == ["--data", "DIR"], argv
        study.parse_args(argv)
    help_text = in_process(study.main, "--help").stdout
    for text in (study.__doc__, help_text):
        assert "../shared" not in text and not re.search(r"#\d|issue", text, re.I)
    assert "--per-run {images,steps}" in help_text and "--run-steps" in help_text
