"""Deep InfoMax and MoCo side by side on Fashion-MNIST, and the two papers' ablations: one command each.

The comparison (--experiment compare), all with DIM's 32x32 encoder (basic32) and the same pretraining time per
run: DIM(L) with the JSD and with the infoNCE estimator, DIM(G) (Hjelm et al. 2019, arXiv 1808.06670v5, Eq. 8),
and MoCo v2 (Chen et al. 2020, arXiv 2003.04297v1) with the queue and the augmentation chosen for 28x28 greyscale
images (see METHODS). The baselines run in the same job: logistic regression on the raw pixels, the same encoder
at random init, and the same encoder trained with labels. Every run is moco.py or dim.py itself (called
in-process with the flags printed in the log), on the 60,000 training images; the probes are eval_linear.py's,
on frozen features of the 10,000 test images: linear probe (standardised features, SGD), the DIM paper's MLP
probe, and kNN (k=200).

The pretraining budget is time, not steps: each method's step time is measured first, and every seed of a
method then runs the same number of steps. A snapshot at half the budget and the encoder at random init (time 0)
give the curve of the plot. Headline (docs/experiments.md, "The comparison study": a 2-core CPU, 3 seeds, 124-129 s of
pretraining per run): linear probe on the conv tap, test top-1 %, MoCo v2 89.58 ± 0.17, random init 87.77 ± 0.15;
DIM(L) JSD 88.76 ± 0.18, DIM(L) infoNCE 88.80 ± 0.09, DIM(G) 86.99 ± 0.62 (a later call, the command below).

The ablations, the same recipes with one thing changed, 3 seeds, a budget of --epochs (MoCo) or --dim-epochs
(DIM) x 60,000 images per run:
- MoCo's (He et al. 2020, arXiv 1911.05722v3, Sec. 3.2-4.1, Fig. 3, Appendix A.9; ABLATIONS): mechanisms
  (end-to-end, memory bank and MoCo against K), momentum (m from 0 to 0.9999 at K 4096) and shuffle-bn (on/off,
  kNN over training and the pretext top-1); docs/experiments.md, "MoCo's mechanisms and ablations".
- DIM's (Hjelm et al. 2019, Sec. 3.1, 4.3, Tables 1 and 3; DIM_ABLATIONS): dim-estimators (JSD, infoNCE, DV
  against the batch, which sets the number of negatives) and dim-prior (prior matching, DIM(G) against DIM(L));
  docs/experiments.md, "DIM's claims".
Under an image budget a bigger batch takes fewer steps. --per-run steps gives every run of mechanisms and
dim-estimators the same number of optimisation steps instead (--run-steps; by default the count the reference
batch, 256 or 64, gets from the image budget), so that end-to-end's K (its batch) and DIM's negatives (the other
images of the batch) change only the batch. A run whose count is the image budget's keeps its name and its
results; every other run is named NAME-sSTEPS.

Commands (DIR: the four Fashion-MNIST IDX files, train-images-idx3-ubyte.gz ..., or a folder for torchvision's
FashionMNIST, which --download fills)
    python study.py --data DIR                            # the comparison: 66 min on a 2-core CPU, 3 seeds
    python study.py --data DIR --methods dimL-jsd,dimL-nce,dimG --out runs/study-dim   # DIM's rows alone, 31 min
    python study.py --data DIR --methods moco,supervised --steps moco=172,supervised=281  # the documented counts
    python study.py --data DIR --budget 600 --device cuda          # longer runs on a GPU
    python study.py --data DIR --budget 20 --seeds 1 --out /tmp/s  # a smoke run of the whole pipeline
    python study.py --data DIR --experiment mechanisms             # or momentum, shuffle-bn
    python study.py --data DIR --experiment mechanisms --per-run steps --run-steps 116   # 116 steps per run
    python study.py --data DIR --experiment dim-estimators         # or dim-prior
    python study.py --data DIR --experiment dim-estimators --per-run steps               # 234 steps per run
Results, in --out (runs/study, runs/moco-ablations, runs/dim-ablations): every probe's row in results.jsonl (a
second call resumes from it and runs only what is missing), the tables and plots in results.md / results.png
(compare), results-EXPERIMENT.md / .png (an ablation) and results-EXPERIMENT-steps.md / .png (--per-run steps).
"""
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import dim
import eval_linear
import gpu_aug
import moco
from moco import UserError, arg

SCRIPTS = {"moco": moco, "dim": dim}


@dataclass
class Args:
    data: str = arg("", "the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...), or a folder for "
                        "torchvision's FashionMNIST (with --download)")
    download: bool = arg(False, "let torchvision download FashionMNIST into --data")
    out: str = arg("", "output folder: runs, results.jsonl, results.md, results.png (default runs/study; "
                       "runs/moco-ablations for the three MoCo experiments, which share their runs; "
                       "runs/dim-ablations for DIM's two)")
    seeds: int = arg(3, "seeds per method")
    methods: str = arg("dimL-jsd,dimL-nce,dimG,moco,supervised", "compare: the methods to run, comma-separated: "
                                                                  "dimL-jsd, dimL-nce, dimG, moco, supervised")
    budget: float = arg(120.0, "pretraining seconds per run (each method, each seed); steps are calibrated")
    probe_epochs: int = arg(10, "linear-probe epochs (eval_linear.py default 100; lr x0.1 at 60% and 80%)")
    mlp_epochs: int = arg(5, "MLP-probe epochs on the headline layer (eval_linear.py default 100)")
    knn_conv: str = arg("auto", "kNN on DIM's 4096-d conv features too: auto = on a GPU (~50 s per encoder on 2 "
                                "CPU cores)", ("auto", "on", "off"))
    device: str = arg("auto", "auto = cuda if a GPU is visible", ("auto", "cpu", "cuda"))
    threads: int = arg(0, "torch threads (0 = torch's default)")
    experiment: str = arg("compare", "compare: DIM and MoCo side by side with the baselines; mechanisms (end-to-end, "
                                     "memory bank and MoCo against K), momentum, shuffle-bn: MoCo's ablations; "
                                     "dim-estimators (JSD, infoNCE, DV against the batch), dim-prior: DIM's",
                          ("compare", "mechanisms", "momentum", "shuffle-bn", "dim-estimators", "dim-prior"))
    steps: str = arg("", "compare: the step counts of an earlier study, e.g. moco=172,dimL-jsd=555 (printed and in "
                         "results.md), instead of calibrating them: reruns exactly that study")
    ks: str = arg("256,1024,4096,16384", "mechanisms: the dictionary sizes K (end-to-end: the batch, up to 4096)")
    dim_epochs: float = arg(0.25, "dim-estimators, dim-prior: pretraining epochs per run (a budget of images)")
    epochs: float = arg(2.0, "mechanisms, momentum, shuffle-bn: pretraining epochs per run (a budget of images, so "
                             "no calibration); the memory bank needs 2: its positives are written at a visit")
    per_run: str = arg("images", "mechanisms, dim-estimators: what every run gets the same of: images (--epochs, "
                                 "--dim-epochs; a bigger batch takes fewer steps) or steps (--run-steps; a bigger "
                                 "batch sees more images; a run with as many steps under --epochs / --dim-epochs is "
                                 "that run, results reused); results-EXPERIMENT-steps.md", ("images", "steps"))
    run_steps: int = arg(0, "--per-run steps: optimisation steps per run; 0 = the steps the reference batch (256 for "
                            "mechanisms, 64 for dim-estimators) gets from --epochs / --dim-epochs")


# Each method: (script, flags on top of the script's presets, layers probed, the layer of the MLP probe). The
# curve of the plot uses the conv tap (the 256x4x4 map, 4096-d) of every encoder, the layer they all share.
# Choices for this data and budget (docs/experiments.md, "The comparison study", says why): DIM with Adam lr 5e-4 (paper 1e-4)
# and a 256-unit local critic (paper 2048); MoCo v2 with the CIFAR notebook's recipe (K 4096, m 0.99, no blur),
# the v2 MLP head and T 0.2, SGD lr 0.03 (notebook 0.06), crops of at least 80% of the image (paper 8-20%) and
# split BN in 4 groups of 64 (notebook: 8 groups of 64 at batch 512).
COMMON = ["--dataset", "fashionmnist", "--knn-every", "0", "--gpu-aug", "on", "--log-every", "20"]
DIM_FLAGS = ["--mi-units", "256", "--lr", "5e-4"]
METHODS = {
    "dimL-jsd": ("dim", ["--preset", "dimL", "--estimator", "jsd", *DIM_FLAGS], ("conv", "fc", "y"), "conv"),
    "dimL-nce": ("dim", ["--preset", "dimL", "--estimator", "nce", *DIM_FLAGS], ("conv", "fc", "y"), "conv"),
    "dimG": ("dim", ["--preset", "dimG", *DIM_FLAGS], ("conv", "fc", "y"), "conv"),
    "moco": ("moco", ["--preset", "small", "--mlp", "--moco-t", "0.2", "--lr", "0.03", "--crop-min", "0.8",
                      "--bn-splits", "4"], ("conv", "backbone"), "backbone"),
    "supervised": ("supervised", [], ("conv", "backbone"), "backbone"),
}
LABELS = {"dimL-jsd": "DIM(L) JSD", "dimL-nce": "DIM(L) infoNCE", "dimG": "DIM(G) JSD", "moco": "MoCo v2",
          "supervised": "supervised", "random": "random init", "pixels": "raw pixels"}
SNAPSHOTS = (0.5, 1.0)  # fractions of the budget evaluated for the curve; time 0 = random init
ABLATIONS = ("mechanisms", "momentum", "shuffle-bn")  # MoCo's experiments, run_ablations()
DIM_ABLATIONS = ("dim-estimators", "dim-prior")  # DIM's, run_dim_ablations()
STEP_BUDGET = {"mechanisms": 256, "dim-estimators": 64}  # --per-run steps: each one's reference batch (the presets')


def parse_args(argv=None):
    """moco.py's parser (one line per error) with this file's Args, then the checks of their values. args.given:
    the flags given (name -> value), from which the results print the command that reruns the call."""
    args, given = moco.parse_args(argv, Args, {})
    if not args.data:
        raise UserError("give --data FOLDER: the four Fashion-MNIST IDX files, or a folder for torchvision's "
                        "FashionMNIST with --download")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise UserError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.seeds < 1 or args.budget <= 0 or args.epochs <= 0 or args.dim_epochs <= 0:
        raise UserError("--seeds must be >= 1, --budget, --epochs and --dim-epochs > 0")
    if args.per_run == "steps" and args.experiment not in STEP_BUDGET:
        raise UserError(f"--per-run steps: for --experiment {' or '.join(STEP_BUDGET)}; " + (
            "compare's budget is time (--budget, --steps)" if args.experiment == "compare" else
            f"the runs of {args.experiment} share one batch size, so its image budget is a step budget"))
    if args.run_steps < 0 or args.run_steps and args.per_run != "steps":
        raise UserError(f"--run-steps {args.run_steps}: give N >= 1 steps per run with --per-run steps "
                        "(0 = automatic)")
    given_steps(args)
    ks(args)
    args.out = args.out or {"compare": "runs/study", **dict.fromkeys(DIM_ABLATIONS, "runs/dim-ablations")}.get(
        args.experiment, "runs/moco-ablations")
    args.given = given
    return args


def command(args, **flags):
    """-> `python study.py ...` with the flags given to this call (args.given), `flags` replacing or adding some: the
    command that reruns the call when pasted."""
    words = []
    for name, value in {**args.given, **flags}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:  # a float as typed where it can be: 30.0 -> 30
            words += [flag, str(value).removesuffix(".0") if isinstance(value, float) else str(value)]
    return shlex.join(["python", "study.py", *words])


def given_steps(args):
    """--steps moco=172,dimL-jsd=555 -> {method: steps}."""
    out = {}
    for item in filter(None, args.steps.split(",")):
        name, _, n = item.partition("=")
        if name not in METHODS or not n.isdigit() or int(n) < 1:
            raise UserError(f"--steps {item!r}: expected METHOD=STEPS with METHOD in {', '.join(METHODS)}")
        out[name] = int(n)
    return out


# ----------------------------------------------------------------------------------------------------
# Data: the images as eval_linear.py shows them to the encoder (resize 28 -> 32 by PIL, normalise)
# ----------------------------------------------------------------------------------------------------
def fashion_mnist(args):
    """-> moco.py's data arguments of --data: the four IDX files in it, or torchvision's FashionMNIST (--download)."""
    return moco.Args(data=args.data, dataset="fashionmnist", download=args.download)


def eval_views(args):
    """-> {split: (images [N, 1, 32, 32] float, normalised; labels [N]; raw pixels [N, 784] in [0, 1])}."""
    train, test, stats = moco.load_data(fashion_mnist(args))
    tf = moco.test_transform(32, stats)
    out = {}
    for name, ds in (("train", train), ("test", test)):
        x = torch.stack([tf(ds[i][0])[:1] for i in range(len(ds))])  # (N, 1, 32, 32): the 3 channels are equal
        pixels = torch.tensor(ds.data.reshape(len(ds), -1), dtype=torch.float32) / 255  # (N, 784)
        out[name] = (x, torch.tensor(ds.targets), pixels)
    return out


# ----------------------------------------------------------------------------------------------------
# Pretraining: moco.py and dim.py in-process, snapshots by resuming; supervised training for the upper bound
# ----------------------------------------------------------------------------------------------------
def script_argv(method, args, seed, out, steps, total, n_train):
    """The flags of one run of the comparison: `steps` of a run whose schedule is laid out for `total` steps."""
    per_epoch = n_train // (256 if METHODS[method][0] == "moco" else 64)  # the presets' batch sizes
    return run_argv(METHODS[method][1], args, out, seed, steps, total, per_epoch)


def run_argv(flags, args, out, seed, steps, total, per_epoch):
    """The flags of one run: `steps` of a run of `total` steps, resumed from OUT if it has a checkpoint."""
    return COMMON + flags + ["--data", args.data, "--out", out, "--seed", str(seed), "--device", args.device,
                             "--max-steps", str(steps), "--epochs", str(math.ceil(total / per_epoch)), "--resume",
                             "auto"] + (["--download"] if args.download else [])


def run_script(script, argv, name):
    """script.train(argv) in this process (script: moco or dim), printed as a command -> its checkpoint's
    (seconds, steps). A UserError names the run; a script's loss turning non-finite raises Diverged."""
    print(f"$ python {script.__name__}.py {' '.join(argv)}", flush=True)
    try:
        script.train(argv)
    except script.UserError as e:
        raise (Diverged if "loss is" in str(e) or "not finite" in str(e) else UserError)(f"{name}: {e}")
    ckpt = moco.load_checkpoint(os.path.join(argv[argv.index("--out") + 1], "ckpt.pt"))
    return ckpt["time_s"], ckpt["step"]


class Diverged(UserError):
    """A run whose loss turned non-finite: counted, not evaluated."""


def supervised(args, seed, out, steps, device):
    """The upper bound: the same basic32 encoder + a linear classifier trained with the labels (cross-entropy),
    SGD lr 0.1 (momentum 0.9, weight decay 5e-4, cosine over the steps), batch 256, random resized crops
    (scale 0.5-1) and flips drawn by gpu_aug.py's BatchAugment. -> (seconds, steps); saves OUT/encoder.pt."""
    torch.manual_seed(seed)
    train_set, _, stats = moco.load_data(fashion_mnist(args))
    images = gpu_aug.device_images(train_set, device)  # uint8 (N, 3, 28, 28)
    labels = torch.tensor(train_set.targets, device=device)  # (N,)
    augment = gpu_aug.BatchAugment(32, (0.5, 1.0), (0, 0, 0, 0), 0.0, 0.0, 0.0, (), moco.MEAN_STD[stats])
    net = moco.build_encoder("basic32", num_classes=10).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator(device).manual_seed(seed)
    order = torch.cat([torch.randperm(len(images), generator=g, device=device)
                       for _ in range(math.ceil(steps * 256 / len(images)))])
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        i = order[step * 256:(step + 1) * 256]
        loss = F.cross_entropy(net(augment(images[i], g)), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 20 == 0 or step + 1 == steps:
            print(f"supervised seed {seed} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    torch.save({"model": net.state_dict(), "time_s": seconds, "step": steps}, os.path.join(out, "encoder.pt"))
    return seconds, steps


def calibrate(method, args, work, device, n_train):
    """Seconds per training step of `method`, timed over steps 5-12 of a throwaway run."""
    out = os.path.join(work, f"calibrate-{method}")
    shutil.rmtree(out, ignore_errors=True)
    if method == "supervised":
        return supervised(args, 0, out, 12, device)[0] / 12
    run_script(SCRIPTS[METHODS[method][0]], script_argv(method, args, 0, out, 12, 12, n_train) + ["--log-every", "4"],
               method)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"time_s"' in l]
    return (lines[-1]["time_s"] - lines[0]["time_s"]) / (lines[-1]["step"] - lines[0]["step"])


# ----------------------------------------------------------------------------------------------------
# Evaluation: frozen features -> linear probe, MLP probe, kNN (eval_linear.py's code)
# ----------------------------------------------------------------------------------------------------
def basic32_taps(net):
    """moco.py's Basic32 (fc = Identity) -> images -> {conv: the 256x4x4 map, backbone: the 1024-d FC layer}."""
    conv, fc = net.eval().features[:11], net.features[11:]  # [3 conv blocks, pool, flatten], [Linear, BN, ReLU]

    def taps(x):
        c = conv(x)  # (N, 4096)
        return {"conv": c, "backbone": fc(c)}  # (N, 4096), (N, 1024)
    return taps


def load_encoder(path, layer):
    """The frozen encoder of a moco.py or dim.py checkpoint, as eval_linear.py loads it."""
    return eval_linear.load_encoder(eval_linear.Args(pretrained=path, layer=layer))[0]


def encoder_of(method, path, seed, layers):
    """-> images -> {layer: features (N, D)} for a checkpoint (path None = the random-init encoder)."""
    if method == "supervised":
        net = moco.build_encoder("basic32", num_classes=10)
        net.load_state_dict(moco.load_checkpoint(path)["model"])
        net.fc = nn.Identity()
        return basic32_taps(net)
    if METHODS.get(method, ("dim",))[0] == "moco":  # encoder_q without its head
        return basic32_taps(load_encoder(path, "backbone"))
    if path is None:  # eval_linear.py --random-init
        torch.manual_seed(seed)
        enc = dim.build_encoder("basic32", 32)
    else:
        enc = load_encoder(path, "y").encoder
    enc.eval()
    return lambda x: {k: v for k, v in enc(x, "y").items() if k in layers}


def extract(encode, views, device):
    """-> {layer: (train features, test features)} through the frozen encoder: moco.py's extract() on batches of
    1000 of the views."""
    out = {}
    for split in ("train", "test"):
        x, y = views[split][:2]
        feats = moco.extract(lambda b: encode(b.expand(-1, 3, -1, -1)), zip(x.split(1000), y.split(1000)), device)[0]
        for k, f in feats.items():
            out.setdefault(k, []).append(f)
    return out


def probe(kind, train_f, test_f, views, seed, args):
    """-> top-1 % on the test images of a probe trained on the training images' features."""
    train_y, test_y = views["train"][1].to(train_f.device), views["test"][1].to(train_f.device)
    if kind == "knn":
        return moco.knn_top1(train_f, train_y, test_f, test_y)  # the kNN of moco.py's monitor and eval_linear.py
    e = args.probe_epochs if kind == "linear" else args.mlp_epochs
    # linear: eval_linear's standardised SGD protocol, shortened; mlp: the DIM paper's probe at batch 256 and
    # lr 4e-4 (eval_linear: batch 64, lr 1e-4), so that 10 epochs fit the CPU budget
    pa = eval_linear.Args(probe=kind, epochs=e, batch_size=256, lr=0.1 if kind == "linear" else 4e-4,
                          milestones=f"{round(0.6 * e)},{round(0.8 * e)}" if kind == "linear" else f"{round(0.5 * e)}",
                          seed=seed)
    head = eval_linear.fit_probe(pa, train_f, train_y, 10, say=lambda *a, **k: None)
    with torch.no_grad():
        return eval_linear.topk_acc(head(test_f), test_y)[0]


def ndm(y_train, y_test, seed, epochs=20, batch=256, lr=1e-3):
    """The neural dependency measure (Hjelm et al. 2019, Sec. 4.1, Table 3): a DV estimate (Eq. 2) of
    KL(P(Y) || prod_k P(Y_k)), the total correlation of Y's dimensions, by a critic trained to tell Y (N, D) from
    Y with each dimension shuffled across the batch; 0 for independent dimensions, what prior matching lowers.
    The critic (D -> 1000 -> 200 -> 1, ReLU, the prior discriminator's shape; the paper does not give NDM's) is
    trained on the training images' Y, standardised (KL is invariant to it), and evaluated on the test images'.
    It is trained with the logistic loss, whose optimum T = log p/q makes Eq. (2) exact: trained on the DV bound
    itself, the held-out estimate grows without limit with the epochs (Y of a random basic32 on the built-in data:
    18, 174, 8635 nats after 1, 5, 20 epochs; with the logistic loss 8.6, 15.0, 18.3)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = y_train.mean(0), y_train.std(0) + 1e-6
    tr, te = ((y - mean) / std for y in (y_train.float(), y_test.float()))  # (N, D) each
    critic = nn.Sequential(nn.Linear(tr.shape[1], 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(),
                           nn.Linear(200, 1))
    opt = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.999))

    def scores(y):  # T on Y and on Y with each dimension shuffled across the batch
        shuffled = y.gather(0, torch.argsort(torch.rand(y.shape, generator=g), dim=0))  # (N, D), per column
        return critic(y).squeeze(1), critic(shuffled).squeeze(1)  # (N,), (N,)

    for _ in range(epochs):
        for i in torch.randperm(len(tr), generator=g).split(batch):
            if len(i) < 2:
                continue
            t_joint, t_marg = scores(tr[i])
            loss = F.softplus(-t_joint).mean() + F.softplus(t_marg).mean()  # logistic: T -> log p / q
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # Eq. (2) on held-out Y: E_joint[T] - log E_marginals[e^T]
        t_joint, t_marg = scores(te)
        return (t_joint.mean() - (torch.logsumexp(t_marg, 0) - math.log(len(te)))).item()


# ----------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------
SUBSET = 10000  # the curve's probe: trained on the first 10,000 training images' features (cheap, for snapshots)


def evaluate(method, path, seed, views, args, device, full, layers=None):
    """-> {(layer, probe): top-1}. Always the curve's probe (linear, trained on SUBSET training images) on the
    conv tap; with full, also every layer's linear probe and kNN, and the MLP probe on the method's MLP layer."""
    layers = layers or METHODS[method][2]
    mlp_layer = METHODS[method][3] if method in METHODS else "conv"
    sub = {"train": tuple(t[:SUBSET] for t in views["train"]), "test": views["test"]}
    feats = extract(encoder_of(method, path, seed, layers), views if full else sub, device)
    res = {("conv", "curve"): probe("linear", feats["conv"][0][:SUBSET], feats["conv"][1], sub, seed, args)}
    if full:
        for layer, (tr, te) in feats.items():
            res[(layer, "linear")] = probe("linear", tr, te, views, seed, args)
            if tr.shape[1] <= 1024 or args.knn_conv == "on" or args.knn_conv == "auto" and device.type == "cuda":
                res[(layer, "knn")] = probe("knn", tr, te, views, seed, args)
            if layer == mlp_layer and args.mlp_epochs:
                res[(layer, "mlp")] = probe("mlp", tr, te, views, seed, args)
    return res


def record(path, **row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("result: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)


def setup(args):
    """Checks --data, makes --out, sets the threads -> the device every experiment runs on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.data) and not args.download:
        raise UserError(f"--data {args.data}: no such folder (give the four Fashion-MNIST IDX files' folder, or add "
                        "--download)")
    os.makedirs(args.out, exist_ok=True)
    return torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                        else "cpu")


def add_time(args, name, t_start):
    """-> the wall time of an experiment, summed over the calls that resumed it (kept in OUT/NAME)."""
    clock = os.path.join(args.out, name)
    total = (float(open(clock).read()) if os.path.exists(clock) else 0.0) + time.perf_counter() - t_start
    with open(clock, "w") as f:
        f.write(f"{total:.1f}\n")
    return total


def write_text(args, name, lines):
    """Writes OUT/NAME (a Markdown table) -> its text."""
    text = "\n".join(lines)
    with open(os.path.join(args.out, name), "w") as f:
        f.write(text + "\n")
    return text


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (a note) where matplotlib is missing: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: no matplotlib, no plot (pip install matplotlib)")
        return None


def run_study(args):
    device = setup(args)
    log = os.path.join(args.out, "results.jsonl")
    done = {(r["method"], r["seed"], r["frac"]) for r in map(json.loads, open(log))} if os.path.exists(log) else set()
    t_start = time.perf_counter()
    views = eval_views(args)
    seeds, n_train = range(args.seeds), len(views["train"][1])
    for seed in seeds:
        baselines(args, seed, views, device, log, done)
    for method in args.methods.split(","):
        fracs = (1.0,) if method == "supervised" else SNAPSHOTS
        todo = [(seed, frac) for seed in seeds for frac in fracs if (method, seed, frac) not in done]
        if todo:
            steps = plan_steps(method, args, device, n_train)
        for seed, frac in todo:
            snapshot(method, seed, frac, steps, args, views, device, log, n_train)
    rows = [json.loads(l) for l in open(log)]
    total = add_time(args, "seconds.txt", t_start)
    table = report(rows, args, total)
    print(table)
    plot(rows, os.path.join(args.out, "results.png"))
    return rows


def baselines(args, seed, views, device, log, done):
    """The raw pixels (784-d) and the encoder at random init (time 0 of the curves), for one seed."""
    if ("pixels", seed, 1.0) not in done:
        tr, te = views["train"][2].to(device), views["test"][2].to(device)  # (60000, 784), (10000, 784)
        for kind, n in (("linear", len(tr)), ("curve", SUBSET)):
            sub = {"train": tuple(t[:n] for t in views["train"]), "test": views["test"]}
            record(log, method="pixels", seed=seed, frac=1.0, time_s=0.0, steps=0, layer="pixels", probe=kind,
                   top1=probe("linear", tr[:n], te, sub, seed, args))
    if ("random", seed, 1.0) not in done:
        for (layer, kind), top1 in evaluate("dim", None, seed, views, args, device, True, ("conv", "fc", "y")).items():
            record(log, method="random", seed=seed, frac=1.0, time_s=0.0, steps=0, layer=layer, probe=kind, top1=top1)


def plan_steps(method, args, device, n_train):
    """-> the step count of every seed of `method`: OUT/METHOD/steps.json of an earlier call, --steps, or the
    budget over the calibrated seconds per step."""
    work, plan = os.path.join(args.out, method), os.path.join(args.out, method, "steps.json")
    if os.path.exists(plan):  # a resumed study keeps the step count its first seeds ran
        sec, steps = json.load(open(plan))
        if given_steps(args).get(method, steps) != steps:
            raise UserError(f"--steps {method}={given_steps(args)[method]}: {plan} holds {steps} steps from an "
                            "earlier call; use another --out")
    elif method in given_steps(args):  # --steps: another study's count, no calibration
        sec, steps = None, given_steps(args)[method]
    else:
        sec = calibrate(method, args, work, device, n_train)
        steps = max(8, int(args.budget / sec))
    os.makedirs(work, exist_ok=True)
    with open(plan, "w") as f:
        json.dump([sec, steps], f)
    print(f"{method}: " + (f"{sec:.3f} s per step (measured) -> {steps} steps for --budget {args.budget:g} s" if sec
                           else f"given {steps} steps"), flush=True)
    return steps


def snapshot(method, seed, frac, steps, args, views, device, log, n_train):
    """Trains seed `seed` of `method` to `frac` of its steps (resuming the seed's run) and records the probes."""
    out = os.path.join(args.out, method, f"seed{seed}")
    if method == "supervised":
        time_s, n = supervised(args, seed, out, steps, device)
        path = os.path.join(out, "encoder.pt")
    else:
        argv = script_argv(method, args, seed, out, max(1, round(frac * steps)), steps, n_train)
        time_s, n = run_script(SCRIPTS[METHODS[method][0]], argv, method)
        path = os.path.join(out, f"ckpt_{n}.pt")
        shutil.copyfile(os.path.join(out, "ckpt.pt"), path)
    for (layer, kind), top1 in evaluate(method, path, seed, views, args, device, frac == 1.0).items():
        record(log, method=method, seed=seed, frac=frac, time_s=time_s, steps=n, layer=layer, probe=kind, top1=top1)


def mean_std(v):
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0


def cell(v, digits=2):
    """A table cell: mean ± std of the values; one value alone (no std of one seed); nothing for none."""
    if len(v) < 2:
        return "".join(f"{x:.{digits}f}" for x in v)
    return "%.*f ± %.*f" % (digits, mean_std(v)[0], digits, mean_std(v)[1])


def margin(mine, rand):
    """The linear probe's gain over the random-init encoder, in units of the larger std where both have a std."""
    (m1, s1), (m0, s0) = mean_std(mine), mean_std(rand)
    if min(len(mine), len(rand)) < 2 or max(s1, s0) == 0:
        return f"{m1 - m0:+.2f}"
    return f"{m1 - m0:+.2f} ({(m1 - m0) / max(s1, s0):+.1f} std)"


def report(rows, args, seconds):
    """The Markdown table: one row per (method, layer); mean ± std over seeds of each probe's top-1, and the
    linear probe's margin over the random-init encoder's same layer (moco.py's backbone = dim.py's fc tap)."""
    final = [r for r in rows if r["frac"] == 1.0]
    order = ["pixels", "random"] + [m for m in METHODS if m in {r["method"] for r in final}]

    def top1(method, layer, kind):
        return [r["top1"] for r in final if (r["method"], r["layer"], r["probe"]) == (method, layer, kind)]
    seeds = len({r["seed"] for r in final})
    took = sorted({f"{r['time_s']:.0f}" for r in final if r["method"] in METHODS}, key=float)  # measured
    lines = [f"Fashion-MNIST test top-1 % ({f'mean ± std over {seeds} seeds' if seeds > 1 else 'one seed'})"
             + (f", pretraining {'-'.join(dict.fromkeys([took[0], took[-1]]))} s per run (measured)" if took else "")
             + "; probes trained on the frozen features of all 60,000 training images (curve probe: the first "
             f"{SUBSET:,})", "",
             "| method | layer | linear | MLP | kNN | curve probe | linear vs random init | pretraining s | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in order:
        for layer in dict.fromkeys(r["layer"] for r in final if r["method"] == method):
            cells = [cell(top1(method, layer, kind)) for kind in ("linear", "mlp", "knn", "curve")]
            mine, rand = top1(method, layer, "linear"), top1("random", {"backbone": "fc"}.get(layer, layer), "linear")
            gain = margin(mine, rand) if method not in ("pixels", "random") and mine and rand else ""
            own = [r for r in final if (r["method"], r["layer"], r["probe"]) == (method, layer, "linear")]
            lines.append(f"| {LABELS[method]} | {layer} | " + " | ".join(cells) + f" | {gain} | "
                         f"{sum(r['time_s'] for r in own) / len(own):.0f} | {own[0]['steps']} |")
    steps = {}
    for r in final:
        if r["method"] in METHODS:
            steps.setdefault(r["method"], r["steps"])
    counts = ",".join(f"{m}={n}" for m, n in steps.items())
    lines += ["", f"total run time {moco.fmt_time(seconds)}; `{command(args)}`", "",
              f"rerun these step counts exactly: `{command(args, steps=counts)}`"]
    return write_text(args, "results.md", lines)


def plot(rows, path):
    """Accuracy of the curve probe against pretraining seconds, mean ± std over seeds (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = [r for r in rows if r["probe"] == "curve"]
    start = mean_std([r["top1"] for r in curve if r["method"] == "random" and r["layer"] == "conv"])[0]
    for method in [m for m in METHODS if m != "supervised" and any(r["method"] == m for r in curve)]:
        pts = [(0.0, [start])]
        for frac in SNAPSHOTS:
            got = [r for r in curve if r["method"] == method and r["frac"] == frac]
            if got:
                pts.append((sum(r["time_s"] for r in got) / len(got), [r["top1"] for r in got]))
        xs, ms = [p[0] for p in pts], [mean_std(p[1]) for p in pts]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=LABELS[method])
    for method, style in (("supervised", "--"), ("pixels", ":")):  # baselines as horizontal lines
        v = [r["top1"] for r in curve if r["method"] == method]
        if v:
            ax.axhline(mean_std(v)[0], ls=style, c="grey", label=LABELS[method] + (" (same budget)" if
                                                                                   method == "supervised" else ""))
    ax.set_xlabel("pretraining time per run (s)")
    ax.set_ylabel(f"test top-1 % (linear probe on the conv tap,\ntrained on {SUBSET} images)")
    ax.set_title("Fashion-MNIST, DIM's basic32 encoder; time 0 = random init")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

# ----------------------------------------------------------------------------------------------------
# MoCo's ablations (He et al. 2020, arXiv 1911.05722v3): the three mechanisms against K (Sec. 4.1, Fig. 3), the
# momentum (Sec. 4.1, the m table) and shuffle-BN (Sec. 3.3, Appendix A.9, Fig. A.1)
# ----------------------------------------------------------------------------------------------------
# Every run is moco.py with the comparison study's MoCo v2 recipe (METHODS["moco"]: K 4096, m 0.99, T 0.2, MLP
# head, lr 0.03 at batch 256, split BN in 4 groups) and one thing changed. The budget is images, not time: each
# run sees --epochs x 60,000 images, as the paper trains every mechanism for the same 200 epochs; end-to-end's K
# is its batch, so its large K take fewer, larger steps, with the lr scaled linearly (0.03 B / 256, Sec. 4.1)
# and the same 4 batch-norm groups (the paper's 8 GPUs at any batch). Its K stops at 4096: at 16,384 two epochs
# are 6 steps (the paper's end-to-end stops at 1024, the memory of its 8 GPUs). --per-run steps gives every run
# the same steps instead (planned_runs), so that end-to-end's K changes its batch and nothing else.
MOMENTA = (0.0, 0.9, 0.99, 0.999, 0.9999)
PAPER = {  # IN-1M linear top-1 %, ResNet-50, 200 epochs: He et al. 2020 (arXiv 1911.05722v3), Fig. 3 and Sec. 4.1
    "mechanisms": {"end-to-end": {256: 54.9, 1024: 57.3}, "memory-bank": {256: 50.0, 1024: 54.1, 4096: 56.5,
                                                                          16384: 57.8},
                   "moco": {256: 54.7, 1024: 57.5, 4096: 59.0, 16384: 60.4}},
    "momentum": {0.0: "fails", 0.9: 55.2, 0.99: 57.8, 0.999: 59.0, 0.9999: 58.9},
}
SNAPSHOT_FRACS = (0.25, 0.5, 0.75, 1.0)  # the shuffle-BN runs: kNN over training (Fig. A.1)


def ablation_run(mechanism="moco", K=4096, m=0.99, shuffle="on"):
    """-> (run name, moco.py flags, global batch). Equal settings give equal names: the experiments share runs."""
    name = f"{mechanism}-K{K}" + (f"-m{m:g}" if mechanism == "moco" else "") + ("" if shuffle == "on" else "-noshuffle")
    batch = K if mechanism == "end-to-end" else 256
    flags = list(METHODS["moco"][1])
    flags[flags.index("--lr") + 1] = f"{0.03 * batch / 256:g}"  # 0.03 at batch 256, scaled linearly
    flags += ["--mechanism", mechanism, "--moco-k", str(K), "--moco-m", str(m), "--shuffle-bn", shuffle,
              "--batch-size", str(batch)]
    return name, flags, batch


def ks(args):
    try:
        return [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise UserError(f"--ks {args.ks!r}: expected sizes separated by commas, e.g. 256,1024")


def ablation_runs(args, experiment):
    """-> [(column value, run name, flags, batch)] of one of MoCo's experiments."""
    if experiment == "mechanisms":
        return [((mech, K), *ablation_run(mech, K)) for mech in ("end-to-end", "memory-bank", "moco")
                for K in ks(args) if not (mech == "end-to-end" and K > 4096)]
    if experiment == "momentum":
        return [(m, *ablation_run(m=m)) for m in MOMENTA]
    return [(sh, *ablation_run(shuffle=sh)) for sh in ("on", "off")]


# --- the budget of an ablation's run: images (--epochs, --dim-epochs) or steps (--per-run steps) ---
class Planned(NamedTuple):
    """One run of an ablation with its budget: `steps` optimisation steps of `batch` images."""
    col: object  # its place in the table: (mechanism, K), m, shuffle-BN, (estimator, batch) or (model, prior)
    name: str  # its folder in --out and its rows' "run" in results.jsonl
    flags: list  # moco.py's or dim.py's flags on top of COMMON
    batch: int
    steps: int


def image_steps(epochs, n_train, batch):
    """The steps of a budget of `epochs` x n_train images at `batch` (an epoch: n_train // batch full batches)."""
    return max(1, round(epochs * (n_train // batch)))


def epochs_of(experiment, args):
    return args.dim_epochs if experiment in DIM_ABLATIONS else args.epochs


def budget_steps(args, n_train):
    """--per-run steps: --run-steps, or (0) the steps the experiment's reference batch gets from its image budget."""
    return args.run_steps or image_steps(epochs_of(args.experiment, args), n_train, STEP_BUDGET[args.experiment])


def planned_runs(args, n_train, experiment=None):
    """-> [Planned] of one experiment (default: args.experiment). The image budget gives every run --epochs (DIM:
    --dim-epochs) x n_train images; --per-run steps gives every run budget_steps(), and a run whose count is not
    its image budget's is named NAME-sSTEPS: it never resumes a checkpoint of another schedule (moco.py's cosine
    runs over --epochs), while the others are the image budget's runs, results included."""
    experiment = experiment or args.experiment
    runs = dim_runs(experiment) if experiment in DIM_ABLATIONS else ablation_runs(args, experiment)
    planned = []
    for col, name, flags, batch in runs:
        steps = image_steps(epochs_of(experiment, args), n_train, batch)
        if args.per_run == "steps" and experiment == args.experiment and budget_steps(args, n_train) != steps:
            name, steps = f"{name}-s{budget_steps(args, n_train)}", budget_steps(args, n_train)
        planned.append(Planned(col, name, flags, batch, steps))
    return planned


def planned_argv(run, args, seed, n_train, frac=1.0):
    """-> (the run folder of seed `seed`, the flags that train it to `frac` of its steps, resuming the folder)."""
    out = os.path.join(args.out, run.name, f"seed{seed}")
    return out, run_argv(run.flags, args, out, seed, max(1, round(frac * run.steps)), run.steps, n_train // run.batch)


def stem(args, kind="results"):
    """-> KIND-EXPERIMENT, -steps added under --per-run steps: the names of an experiment's table, plot and clock."""
    return f"{kind}-{args.experiment}" + ("-steps" if args.per_run == "steps" else "")


def budget(args, n_train):
    """-> the captions' budget per run: 'E epochs' (of images) or 'N steps' (--per-run steps)."""
    if args.per_run == "steps":
        return f"{budget_steps(args, n_train)} steps"
    return f"{epochs_of(args.experiment, args):g} epochs"


def images_seen(args, n_train, run=None):
    """--per-run steps: the runs' tables' column of the images a run sees, steps x batch, and in epochs of the
    n_train images (run None: its header); the image budget: no column."""
    if args.per_run != "steps":
        return ""
    if run is None:
        return " images seen (epochs) |"
    return f" {run.steps * run.batch:,} ({run.steps * run.batch / n_train:.2f}) |"


def rule(head):
    """The Markdown rule under a table's header row."""
    return "|" + "---|" * (head.count("|") - 1)


# --- MoCo's ablations: running and reporting ---
def pretext_curve(out):
    """-> [(step, pretext top-1 %)] from a run's metrics.jsonl (the logged means over the last --log-every steps)."""
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["acc1"]) for r in rows if "acc1" in r]


def evaluate_backbone(path, views, seed, args, device):
    """-> {probe: top-1} of the kNN (k=200, t=0.1) and the linear probe on the frozen 1024-d backbone."""
    enc = basic32_taps(load_encoder(path, "backbone"))
    feats = extract(lambda x: {"backbone": enc(x)["backbone"]}, views, device)["backbone"]
    return {kind: probe(kind, *feats, views, seed, args) for kind in ("knn", "linear")}


def run_ablations(args):
    device = setup(args)
    log = os.path.join(args.out, "results.jsonl")
    rows = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    done = {(r["run"], r["seed"], r["frac"]) for r in rows}
    t_start, views = time.perf_counter(), eval_views(args)
    n_train = len(views["train"][1])
    snapshot_runs = {run.name for run in planned_runs(args, n_train, "shuffle-bn")}
    for run in planned_runs(args, n_train):
        fracs = SNAPSHOT_FRACS if run.name in snapshot_runs else (1.0,)
        todo = [(seed, frac) for seed in range(args.seeds) for frac in fracs if (run.name, seed, frac) not in done]
        for seed, frac in todo:
            rows += ablation_snapshot(run, seed, frac, args, views, device, log)
    total_s = add_time(args, stem(args, "seconds") + ".txt", t_start)
    text = ablation_report(rows, args, total_s, n_train)
    print(text)
    ablation_plot(rows, args, n_train)
    return rows


def ablation_snapshot(run, seed, frac, args, views, device, log):
    """Trains seed `seed` of a planned run to `frac` of its steps (resuming its run) -> the recorded rows."""
    out, argv = planned_argv(run, args, seed, len(views["train"][1]), frac)
    time_s, steps = run_script(moco, argv, run.name)
    curve, rows = pretext_curve(out), []
    for kind, top1 in evaluate_backbone(os.path.join(out, "ckpt.pt"), views, seed, args, device).items():
        row = dict(run=run.name, seed=seed, frac=frac, steps=steps, time_s=time_s, layer="backbone", probe=kind,
                   top1=top1, pretext_top1=curve[-1][1])
        if frac == 1.0:
            row["pretext_curve"] = curve
        rows.append(row)
        record(log, **row)
    return rows


def ablation_cells(rows, name, kind, frac=1.0, key="top1"):
    return [r[key] for r in rows if (r["run"], r["probe"], r["frac"]) == (name, kind, frac)]


def ablation_report(rows, args, seconds, n_train):
    """results-EXPERIMENT.md (-steps.md under --per-run steps): the experiment's table beside the paper's numbers."""
    runs, KS = planned_runs(args, n_train), ks(args)
    lines = [f"Fashion-MNIST test top-1 % of the frozen 1024-d backbone (mean ± std over the seeds run), "
             f"{budget(args, n_train)} of pretraining per run; kNN (k=200) / linear probe ({args.probe_epochs} "
             "epochs)", ""]
    if args.experiment == "mechanisms":
        lines += ["| mechanism | probe | " + " | ".join(f"K={K}" for K in KS) + " |",
                  "|---|---|" + "---|" * len(KS)]
        for mech in ("end-to-end", "memory-bank", "moco"):
            for kind in ("knn", "linear"):
                got = {run.col[1]: cell(ablation_cells(rows, run.name, kind)) for run in runs if run.col[0] == mech}
                lines.append(f"| {mech} | {kind} | " + " | ".join(got.get(K, "-") for K in KS) + " |")
            paper = PAPER["mechanisms"][mech]
            lines.append(f"| {mech} | paper (IN-1M linear) | " + " | ".join(str(paper.get(K, "-")) for K in KS) + " |")
    elif args.experiment == "momentum":
        lines += ["| probe | " + " | ".join(f"m={m:g}" for m in MOMENTA) + " |", "|---|" + "---|" * len(MOMENTA)]
        for kind in ("knn", "linear"):
            lines.append(f"| {kind} | " + " | ".join(cell(ablation_cells(rows, run.name, kind)) for run in runs) + " |")
        lines.append("| final pretext top-1 | " + " | ".join(
            cell(ablation_cells(rows, run.name, "knn", key="pretext_top1")) for run in runs) + " |")
        lines.append("| paper (IN-1M linear, K 4096) | " + " | ".join(str(PAPER["momentum"][m]) for m in MOMENTA)
                     + " |")
    else:
        lines += ["| shuffle-BN | " + " | ".join(f"kNN at {f:g}" for f in SNAPSHOT_FRACS) + " | linear | "
                  "pretext top-1 at " + " | pretext top-1 at ".join(f"{f:g}" for f in SNAPSHOT_FRACS) + " |",
                  "|---|" + "---|" * (2 * len(SNAPSHOT_FRACS) + 1)]
        for run in runs:
            lines.append(f"| {run.col} | " + " | ".join(cell(ablation_cells(rows, run.name, "knn", f))
                                                       for f in SNAPSHOT_FRACS)
                         + f" | {cell(ablation_cells(rows, run.name, 'linear'))} | " + " | ".join(
                             cell(ablation_cells(rows, run.name, "knn", f, "pretext_top1")) for f in SNAPSHOT_FRACS)
                         + " |")
    head = "| run | steps |" + images_seen(args, n_train) + " pretraining s per run (mean) | seeds |"
    lines += ["", head, rule(head)]
    for run in runs:
        own = [r for r in rows if r["run"] == run.name and r["frac"] == 1.0 and r["probe"] == "knn"]
        if own:
            lines.append(f"| {run.name} | {own[0]['steps']} |" + images_seen(args, n_train, run)
                         + f" {sum(r['time_s'] for r in own) / len(own):.0f} | {len(own)} |")
    lines += ["", f"run time of this experiment's calls {moco.fmt_time(seconds)}; `{command(args)}`"]
    return write_text(args, stem(args) + ".md", lines)


def errorbars(ax, pts, **kw):
    """pts [(x, values over the seeds)] -> the mean ± std of each x as one line of points."""
    stats = [mean_std(v) for _, v in pts]
    ax.errorbar([x for x, _ in pts], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, **kw)


def ablation_plot(rows, args, n_train):
    """results-EXPERIMENT.png (-steps.png under --per-run steps; needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return
    runs = planned_runs(args, n_train)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if args.experiment in ("mechanisms", "momentum"):
        groups = {}  # line -> [(x, run name)]; momentum: x = the position of m (0 and 0.9999 on one axis)
        for i, run in enumerate(runs):
            mech, x = run.col if args.experiment == "mechanisms" else ("moco (K 4096)", i)
            groups.setdefault(mech, []).append((x, run.name))
        for ax, kind in zip(axes, ("knn", "linear")):
            for mech, pts in groups.items():
                pts = [(x, v) for x, name in pts if (v := ablation_cells(rows, name, kind))]
                if pts:
                    errorbars(ax, pts, label=mech)
            if args.experiment == "mechanisms":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("K (negatives; end-to-end: the batch)")
            else:
                ax.set_xticks(range(len(MOMENTA)), [f"{m:g}" for m in MOMENTA])
                ax.set_xlabel("momentum m")
            ax.set_ylabel(f"test top-1 % ({kind}, backbone)")
    else:
        for run in runs:
            pts = [(mean_std(ablation_cells(rows, run.name, "knn", f, "steps"))[0], v)
                   for f in SNAPSHOT_FRACS if (v := ablation_cells(rows, run.name, "knn", f))]
            if pts:
                errorbars(axes[0], pts, label=f"shuffle-BN {run.col}")
            curves = [r["pretext_curve"] for r in rows if r["run"] == run.name and r.get("pretext_curve")
                      and r["probe"] == "knn"]
            if curves:  # the mean over the seeds of the logged pretext top-1
                axes[1].plot([s for s, _ in curves[0]], [sum(c[i][1] for c in curves) / len(curves)
                                                          for i in range(len(curves[0]))],
                             label=f"shuffle-BN {run.col}")
        axes[0].set_ylabel("test top-1 % (kNN, backbone)")
        axes[1].set_ylabel("pretext top-1 % (the (K+1)-way task)")
        for ax in axes:
            ax.set_xlabel("step")
    save_plot(fig, axes, args, f"MoCo {args.experiment} on Fashion-MNIST (basic32, {budget(args, n_train)} per run)")


def save_plot(fig, axes, args, title):
    """Grid and legend on each axis, the title, and OUT/results-EXPERIMENT(-steps).png."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(args.out, stem(args) + ".png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------------
# DIM's claims (Hjelm et al. 2019, arXiv 1808.06670v5): the estimators against the number of negatives (Sec. 3.1,
# 4.3: infoNCE needs many, JSD does not, DV is unstable), prior matching (Eq. 7, Table 3: NDM) and DIM(G) vs
# DIM(L) (Table 1), at one budget per run: images, or steps (--per-run steps, dim-estimators)
# ----------------------------------------------------------------------------------------------------
# Every run is dim.py with the comparison study's DIM recipe (DIM_FLAGS: Adam lr 5e-4, a 256-unit local critic),
# --dim-epochs x 60,000 images per run. DIM's negatives are the other images of the batch (each image's Y against
# every location of the other N - 1 images), so the batch sets their number: (N - 1) x 64 locations per positive.
# Under the image budget a bigger batch also takes fewer steps; --per-run steps separates the two.
DIM_BATCHES = (16, 32, 64, 128)
PAPER_DIM = {  # CIFAR-10 top-1 % conv / fc / Y, 1000 epochs (Table 1); NDM (Table 3)
    "dimL-jsd": "73.25 / 73.62 / 66.96, NDM 0.18", "dimL-nce": "75.21 / 75.57 / 69.13",
    "dimG": "52.2 / 52.84 / 43.17, NDM 0.35"}
DIM_LAYERS = ("conv", "fc", "y")


def dim_run(kind="dimL", estimator="jsd", batch=64, gamma=None, gp=None):
    """-> (run name, dim.py flags, batch). gamma / gp None: the preset's prior weight and dim.py's default penalty."""
    name = (f"dimL-{estimator}-B{batch}" if kind == "dimL" else f"dimG-B{batch}") + \
        ("" if gamma is None else f"-g{gamma:g}") + ("" if gp is None else f"-gp{gp:g}")
    flags = ["--preset", kind, "--estimator", estimator, *DIM_FLAGS, "--batch-size", str(batch)]
    flags += [] if gamma is None else ["--gamma", str(gamma)]
    flags += [] if gp is None else ["--prior-gp", str(gp)]
    return name, flags, batch


def dim_runs(experiment):
    """-> [(column value, run name, flags, batch)] of one of DIM's experiments."""
    if experiment == "dim-estimators":
        return [((est, b), *dim_run("dimL", est, b)) for est in ("jsd", "nce", "dv") for b in DIM_BATCHES]
    return [(("DIM(L)", "gamma 0"), *dim_run("dimL", gamma=0)), (("DIM(L)", "gamma 0.1"), *dim_run("dimL")),
            (("DIM(L)", "gamma 0.1, no penalty"), *dim_run("dimL", gp=0)),
            (("DIM(G)", "gamma 0"), *dim_run("dimG", gamma=0)), (("DIM(G)", "gamma 0.1"), *dim_run("dimG", gamma=0.1)),
            (("DIM(G)", "gamma 1"), *dim_run("dimG")),
            (("DIM(G)", "gamma 1, no penalty"), *dim_run("dimG", gp=0))]


def evaluate_dim(path, views, seed, args, device):
    """-> {(layer, probe): value}: the linear probe on conv, fc and Y, and the NDM of Y."""
    enc = load_encoder(path, "y").encoder.eval()
    feats = extract(lambda x: {k: v for k, v in enc(x, "y").items() if k in DIM_LAYERS}, views, device)
    res = {(layer, "linear"): probe("linear", *feats[layer], views, seed, args) for layer in DIM_LAYERS}
    res[("y", "ndm")] = ndm(*(f.cpu() for f in feats["y"]), seed)
    return res


def run_dim_ablations(args):
    device = setup(args)
    log = os.path.join(args.out, "results.jsonl")
    done = {(r["run"], r["seed"]) for r in map(json.loads, open(log))} if os.path.exists(log) else set()
    t_start, views = time.perf_counter(), eval_views(args)
    n_train = len(views["train"][1])
    for run in planned_runs(args, n_train):
        for seed in [seed for seed in range(args.seeds) if (run.name, seed) not in done]:
            dim_snapshot(run, seed, args, views, device, log)
    rows = [json.loads(l) for l in open(log)]  # with the diverged runs' lines
    total_s = add_time(args, stem(args, "seconds") + ".txt", t_start)
    text = dim_report(rows, args, total_s, n_train)
    print(text)
    dim_plot(rows, args, n_train)
    return rows


def dim_snapshot(run, seed, args, views, device, log):
    """Trains seed `seed` of a planned run for its steps and records the probes and the NDM; a run whose loss
    turns non-finite is recorded as diverged and not evaluated."""
    out, argv = planned_argv(run, args, seed, len(views["train"][1]))
    try:
        time_s, done = run_script(dim, argv, run.name)
    except Diverged as e:
        print(f"seed {seed} of {e}", flush=True)
        record(log, run=run.name, seed=seed, steps=run.steps, layer="", probe="diverged", top1=None, time_s=0.0)
        return
    last = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l][-1]
    for (layer, kind), value in evaluate_dim(os.path.join(out, "ckpt.pt"), views, seed, args, device).items():
        record(log, run=run.name, seed=seed, steps=done, time_s=time_s, layer=layer, probe=kind, top1=value,
               final_local=last["local"], final_global=last["global"], final_d_acc=last["d_acc"])


def dim_cells(rows, name, layer, kind):
    return [r["top1"] for r in rows if (r["run"], r["layer"], r["probe"]) == (name, layer, kind)]


def dim_report(rows, args, seconds, n_train):
    """results-EXPERIMENT.md (-steps.md under --per-run steps): linear probe on conv / fc / Y and NDM, mean ± std
    over seeds; diverged seeds counted."""
    estimators = args.experiment == "dim-estimators"
    head = ("| run | " + ("estimator | batch (negatives per positive)" if estimators else "model | prior")
            + " | conv | fc | Y | NDM (Y) | diverged | steps |" + images_seen(args, n_train) + " s per run |")
    lines = [f"Fashion-MNIST test top-1 % of the linear probe ({args.probe_epochs} epochs) on frozen conv / fc / Y "
             f"features, and the NDM of Y (mean ± std over the seeds run); {budget(args, n_train)} of "
             "pretraining per run", "", head, rule(head)]
    for run in planned_runs(args, n_train):
        what = f"{run.col[0]} | {run.batch} ({(run.batch - 1) * 64})" if estimators else f"{run.col[0]} | {run.col[1]}"
        own = [r for r in rows if r["run"] == run.name and r["probe"] == "linear" and r["layer"] == "conv"]
        bad = sum(r["probe"] == "diverged" for r in rows if r["run"] == run.name)
        cells = [cell(dim_cells(rows, run.name, layer, "linear")) for layer in DIM_LAYERS]
        lines.append(f"| {run.name} | {what} | " + " | ".join(cells)
                     + f" | {cell(dim_cells(rows, run.name, 'y', 'ndm'), 3)} | {bad} | "
                     f"{own[0]['steps'] if own else ''} |" + images_seen(args, n_train, run)
                     + f" {sum(r['time_s'] for r in own) / len(own) if own else 0:.0f} |")
    lines += ["", "The paper (CIFAR-10, 1000 epochs, Table 1 conv / fc / Y, Table 3 NDM): "
              + "; ".join(f"{k}: {v}" for k, v in PAPER_DIM.items()), "",
              f"run time of this experiment's calls {moco.fmt_time(seconds)}; `{command(args)}`"]
    return write_text(args, stem(args) + ".md", lines)


def dim_plot(rows, args, n_train):
    """results-dim-estimators.png (-steps.png under --per-run steps): conv and Y accuracy against the batch (the
    negatives) per estimator (needs matplotlib)."""
    if args.experiment != "dim-estimators":
        return
    plt = pyplot()
    if plt is None:
        return
    runs = planned_runs(args, n_train)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, layer in zip(axes, ("conv", "y")):
        for est in ("jsd", "nce", "dv"):
            pts = [(run.batch, v) for run in runs if run.col[0] == est
                   and (v := dim_cells(rows, run.name, layer, "linear"))]
            if pts:
                errorbars(ax, pts, label=est)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (negatives per positive: (batch - 1) x 64 locations)")
        ax.set_ylabel(f"test top-1 % (linear, {layer})")
    save_plot(fig, axes, args, f"DIM(L) estimators on Fashion-MNIST (basic32, {budget(args, n_train)} per run)")


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.experiment == "compare":
            run_study(args)
        else:
            (run_dim_ablations if args.experiment in DIM_ABLATIONS else run_ablations)(args)
    except UserError as e:
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
