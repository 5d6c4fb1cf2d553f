"""Benchmark: training throughput of moco.py's and dim.py's steps against the official-style step, side by side,
on synthetic data already on the device; then the data path (BatchAugment against the CPU loader).

    python tests/bench_train.py               # the GPU configurations (needs CUDA)
    python tests/bench_train.py --quick       # small sizes on the CPU, a couple of minutes
    python tests/bench_train.py --tiny        # every row at toy sizes on the CPU (the test suite's run), seconds
    python tests/bench_train.py --compile     # ours also with torch.compile on the encoders
    python tests/bench_train.py --whole-run   # `python moco.py` end to end against a plain loop of its recipe

Official (re-created from facebookresearch/moco moco/builder.py, main_moco.py and the CIFAR notebook, not
copied): fp32, eager, NCHW-contiguous, PyTorch's default TF32 settings (cuDNN on, matmul off; --strict-fp32
turns both off); a Python loop of out-of-place momentum updates; the notebook's one-device shuffle (randperm
on the host, argsort to undo it); logits = cat(einsum('nc,nc->n'), einsum('nc,ck->nk') against
queue.clone().detach()) / T and cross_entropy against zeros; enqueue with assert K % B == 0 and
ptr = int(queue_ptr) (a host sync); loss.item() and top-1/top-5 accuracy every step, as main_moco.py logs.
Ours: moco.MoCo(..., fused=moco_ext if importable).training_loss + enqueue as train() runs it: channels_last and
bf16 autocast on CUDA, statistics accumulated on the device. Both use the same encoder (moco.build_encoder
with the preset's bn_splits), so the ratio measures the step, not the architecture.
DIM: dim.py's own model (dimL: local JSD, prior matching) fp32 eager against dim.py's --amp (and --compile);
rdevon/DIM itself is not re-created, so this row is "official-style execution", not "official code".
Images/s counts training images per second (a MoCo pair is one image, as the official 168 img/s per V100).
Floor: the model's matmul/conv FLOPs (torch.utils.flop_counter's formulas, forward + backward, and for DIM the
double backward of the prior's gradient penalty) at the chip's dense bf16 rate (--peak-tflops; 989 for H100/H200 SXM).
"""
import argparse
import datetime
import math
import os
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import gpu_aug  # noqa: E402
import moco  # noqa: E402


class OfficialMoCo(nn.Module):
    """The official builder's training-time behaviour on one device, for timing (see the module docstring)."""

    def __init__(self, base_encoder, dim, K, m, T, mlp):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        if mlp:
            d = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), self.encoder_k.fc)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)  # Eq. (2), one new tensor per parameter

    @torch.no_grad()
    def enqueue(self, keys):
        B, ptr = keys.shape[0], int(self.queue_ptr)  # int(): a host sync every step
        assert self.K % B == 0
        self.queue[:, ptr:ptr + B] = keys.T
        self.queue_ptr[0] = (ptr + B) % self.K

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (N, C)
        with torch.no_grad():
            self.momentum_update()
            idx = torch.randperm(im_k.shape[0]).to(im_k.device)  # the notebook: drawn on the host
            k = F.normalize(self.encoder_k(im_k[idx]), dim=1)[torch.argsort(idx)]  # (N, C)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # (N, 1+K)
        self.enqueue(k)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, images, device, warmup, steps):
    """-> images per second over `steps` calls of step(), after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return images * steps / (time.perf_counter() - t)


def count_flops(step):
    """FLOPs of the matmuls and convolutions that step() runs, forward, backward and double backward, by
    torch.utils.flop_counter's per-operator formulas. Not FlopCounterMode itself: its per-module tracker hooks
    the backward and raises under autograd.grad(create_graph=True), which dim.py's gradient penalty runs. Where
    FlopCounterMode works, the two counts are equal (tests/test_bench.py checks both that and the penalty's
    FLOPs against a hand count)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Count() as c:
        step()
    return c.total


def set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def official_precision(strict):
    """PyTorch's defaults, which the official code gets today: cuDNN convolutions in TF32, matmuls in fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not strict


def bench_moco(cfg, device, opts):
    """-> (official img/s, ours img/s, FLOPs per image) for one MoCo configuration."""
    base = partial(moco.build_encoder, cfg["arch"], cfg["stem"], cfg["bn_splits"])
    B, S, cuda = cfg["batch"], cfg["size"], device.type == "cuda"
    gen = torch.Generator(device).manual_seed(0)
    im_q = torch.randn(B, 3, S, S, device=device, generator=gen)  # (B, 3, S, S)
    im_k = torch.randn(B, 3, S, S, device=device, generator=gen)  # (B, 3, S, S)

    torch.manual_seed(0)
    ref = OfficialMoCo(base, 128, cfg["K"], cfg["m"], cfg["T"], cfg["mlp"]).to(device)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)

    def official_step():
        logits, labels = ref(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        top5 = logits.topk(5, dim=1).indices  # main_moco.py's accuracy(output, target, topk=(1, 5))
        acc1, acc5 = (top5[:, :1] == 0).float().sum() * 100 / B, (top5 == 0).float().sum() * 100 / B
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item(), acc1, acc5  # losses.update(loss.item(), ...): a host sync every step

    official_precision(opts.strict_fp32)
    flops = count_flops(official_step) / B

    torch.manual_seed(0)
    fused = moco.load_fused("auto", device)
    model = moco.MoCo(base, 128, cfg["K"], cfg["m"], cfg["T"], cfg["mlp"], fused=fused)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    our_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=0.9,
                              weight_decay=1e-4)
    if opts.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    amp = torch.bfloat16 if cuda else None
    xq, xk = im_q.contiguous(memory_format=fmt), im_k.contiguous(memory_format=fmt)
    sums = torch.zeros(3, device=device)

    def our_step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, acc1, acc5, keys = model.training_loss(xq, xk)
        our_opt.zero_grad(set_to_none=True)
        loss.backward()
        our_opt.step()
        model.update_dictionary(keys)
        sums.add_(torch.stack([loss.detach(), acc1, acc5]))

    official, ours = side_by_side(official_step, our_step, B, device, cfg["warmup"], cfg["steps"], opts)
    del ref, opt, model, our_opt
    if cuda:
        torch.cuda.empty_cache()
    return official, ours, flops


def side_by_side(official_step, our_step, images, device, warmup, steps, opts):
    """Alternate the two, `rounds` times each, best rate of each: a busy or warming machine biases neither."""
    official = ours = 0.0
    for r in range(opts.rounds):
        official_precision(opts.strict_fp32)
        official = max(official, timed(official_step, images, device, warmup if r == 0 else 1, steps))
        set_tf32(device.type == "cuda")  # as train() with --amp
        extra = 5 if opts.compile and r == 0 else 0  # compilation and recompilation happen in warm-up
        ours = max(ours, timed(our_step, images, device, (warmup if r == 0 else 1) + extra, steps))
    return official, ours


def dim_args(*flags):
    import dim
    return dim.resolve(dim.parse_args(["--preset", "dimL", *flags])[0])


def dim_step(args, x, amp=False, compile_=False):
    """One optimisation step of dim.py (as in dim.train): the prior discriminator's (with its gradient penalty,
    --prior-gp), then the encoder's; bf16 autocast with amp."""
    import dim
    device = x.device
    torch.manual_seed(0)
    encoder = dim.build_encoder(args.arch, args.image_size, args.y_dim)
    model = dim.DIM(encoder, args.image_size, args.y_dim, args.beta > 0, args.alpha > 0, args.critic,
                    args.mi_units).to(device)
    prior = dim.prior_discriminator(args.y_dim).to(device)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2))
    opt, opt_p = torch.optim.Adam(model.parameters(), **adam), torch.optim.Adam(prior.parameters(), **adam)
    if compile_:
        model.encoder.compile()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mi, y = model(x, args.estimator, args.local_samples)
            d_loss, _ = dim.prior_d_loss(prior, y, args.prior_gp)
            opt_p.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_p.step()
            loss = args.beta * mi["local"] + args.gamma * dim.prior_encoder_loss(prior, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_dim(batch, device, opts, warmup, steps):
    """dim.py's step (as in dim.train, preset dimL) fp32 eager vs --amp (bf16 on CUDA) [+ --compile]."""
    args = dim_args()
    cuda = device.type == "cuda"
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)  # (B, 3, 32, 32)
    official_precision(opts.strict_fp32)
    base_step = dim_step(args, x)
    flops = count_flops(base_step) / batch
    return (*side_by_side(base_step, dim_step(args, x, cuda, opts.compile), batch, device, warmup, steps, opts),
            flops)


def bench_data(device, batch, workers, n_batches):
    """Pairs of 32 px views per second (preset cifar augmentation): the CPU loader vs BatchAugment."""
    args, _ = moco.parse_args(["--preset", "cifar"])
    rng = np.random.default_rng(0)
    data = moco.ArrayData(rng.integers(0, 256, (batch * (n_batches + 2), 32, 32, 3), dtype=np.uint8),
                          np.zeros(batch * (n_batches + 2)))
    train_tf, _ = moco.transforms(args, "cifar10")
    sampler = moco.EpochSampler(len(data), batch, 0)
    it = iter(moco.loader(moco.Seeded(data, train_tf), batch, workers, sampler, device))
    next(it)  # workers started, first batch made
    t = time.perf_counter()
    for _ in range(n_batches):
        (q, k), _ = next(it)
        q, k = q.to(device, non_blocking=True), k.to(device, non_blocking=True)
    sync(device)
    cpu = batch * n_batches / (time.perf_counter() - t)
    del it
    images = gpu_aug.device_images(data, device)
    aug = moco.batch_prepare(gpu_aug, args, "cifar10", device)[0]
    g = torch.Generator(device)
    idx = torch.randperm(len(data), device=device).view(-1, batch)  # (n_batches + 2, B)

    def step(s=[0]):
        g.manual_seed(s[0])
        x = images[idx[s[0] % len(idx)]]  # (B, 3, 32, 32) uint8
        s[0] += 1
        return aug(x, g), aug(x, g)
    return cpu, timed(step, batch, device, 2, n_batches)


def bench_dim_data(device, batch, workers, n_batches):
    """Images per second for dim.py at 32 px (28 px greyscale resized, as Fashion-MNIST): CPU loader vs BatchPrepare."""
    import dim
    rng = np.random.default_rng(0)
    data = dim.ArrayData(rng.integers(0, 256, (batch * (n_batches + 2), 28, 28), dtype=np.uint8),
                         np.zeros(batch * (n_batches + 2)))
    args = dim.resolve(dim.parse_args([])[0])
    train_tf, _ = dim.transforms(args, "fashionmnist")
    it = iter(dim.loader(dim.Seeded(data, train_tf), batch, workers, dim.EpochSampler(len(data), batch, 0), device))
    next(it)
    t = time.perf_counter()
    for _ in range(n_batches):
        x = next(it)[0].to(device, non_blocking=True)
    sync(device)
    cpu = batch * n_batches / (time.perf_counter() - t)
    del it
    images = gpu_aug.device_images(data, device)
    prepare = gpu_aug.BatchPrepare(32, args.aug, dim.MEAN_STD["fashionmnist"])
    idx = torch.randperm(len(data), device=device).view(-1, batch)  # (n_batches + 2, B)

    def step(s=[0]):
        s[0] += 1
        return prepare(images[idx[s[0] % len(idx)]], None)  # (B, 3, 32, 32)
    return cpu, timed(step, batch, device, 2, n_batches)


# ----------------------------------------------------------------------------------------------------
# The whole default run against a plain loop of the same recipe (--whole-run)
# ----------------------------------------------------------------------------------------------------
def plain_loop(epochs, workers):
    """`python moco.py`'s recipe (preset small: basic32 with 8 BN groups, batch 256, K 4096, m 0.99, T 0.1, SGD lr
    0.06 cosine, the CIFAR notebook's augmentation, kNN after every epoch) written as a plain loop in the style of
    lightly's MoCo example: torchvision transforms in a DataLoader, a deep-copied key encoder, the notebook's
    shuffle, cat-and-cross-entropy logits, a kNN pass with plain DataLoaders. -> the last kNN top-1."""
    import copy
    import torchvision.transforms as T
    a = moco.Args(**moco.PRESETS["small"])
    train_set, test_set, stats = moco.load_data(a)
    norm = T.Normalize(*moco.MEAN_STD[stats])
    aug = T.Compose([T.RandomResizedCrop(32, scale=(a.crop_min, 1.0)), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                     T.ToTensor(), norm])
    plain = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), norm])

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, ds, tf, pair):
            self.ds, self.tf, self.pair = ds, tf, pair

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            img, y = self.ds[i]
            return ((self.tf(img), self.tf(img)) if self.pair else self.tf(img)), y

    dl = torch.utils.data.DataLoader(Pairs(train_set, aug, True), batch_size=a.batch_size, shuffle=True,
                                     num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    q_enc = moco.build_encoder(a.arch, a.stem, a.bn_splits, num_classes=a.moco_dim)
    k_enc = copy.deepcopy(q_enc).requires_grad_(False)
    queue = F.normalize(torch.randn(a.moco_dim, a.moco_k), dim=0)
    ptr = 0
    opt = torch.optim.SGD(q_enc.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.wd)
    knn = None
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # as moco.py --epochs E
        q_enc.train()
        k_enc.train()
        for (x_q, x_k), _ in dl:
            q = F.normalize(q_enc(x_q), dim=1)  # (B, C)
            with torch.no_grad():
                for pq, pk in zip(q_enc.parameters(), k_enc.parameters()):
                    pk.mul_(a.moco_m).add_(pq.detach(), alpha=1 - a.moco_m)
                perm = torch.randperm(len(x_k))
                k = F.normalize(k_enc(x_k[perm]), dim=1)[torch.argsort(perm)]  # (B, C)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.clone().detach()], 1) / a.moco_t
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            queue[:, ptr:ptr + len(k)] = k.T
            ptr = (ptr + len(k)) % a.moco_k
        q_enc.eval()
        feats = []
        with torch.no_grad():
            for ds in (train_set, test_set):
                f, y = [], []
                for x, t in torch.utils.data.DataLoader(Pairs(ds, plain, False), batch_size=512, num_workers=workers):
                    f.append(F.normalize(q_enc(x), dim=1))
                    y.append(t)
                feats.append((torch.cat(f), torch.cat(y)))
        knn = moco.knn_top1(*feats[0], *feats[1])
        print(f"plain loop: epoch {epoch + 1} kNN top-1 {knn:.2f}", flush=True)
    return knn


def whole_run(opts):
    """Wall-clock of whole processes, taken in turn: the plain loop, `python moco.py` as the README types it,
    and `python moco.py --gpu-aug off` (the CPU loader). Prints each one's best time and the ratios."""
    import subprocess
    import tempfile
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads if opts.threads > 0 else os.cpu_count()))
    cmds = {"plain loop": [sys.executable, os.path.abspath(__file__), "--plain-loop", "--epochs", str(opts.epochs)],
            "python moco.py": [sys.executable, os.path.join(ROOT, "moco.py"), "--epochs", str(opts.epochs)],
            "moco.py --gpu-aug off": [sys.executable, os.path.join(ROOT, "moco.py"), "--epochs", str(opts.epochs),
                                      "--gpu-aug", "off"]}
    times = {k: [] for k in cmds}
    for _ in range(opts.rounds):
        for name, cmd in cmds.items():
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                p = subprocess.run(cmd + ([] if name == "plain loop" else ["--out", out]), capture_output=True,
                                   text=True, env=env, cwd=ROOT)
                times[name].append(time.perf_counter() - t0)
            if p.returncode:
                raise SystemExit(f"{name} failed:\n{p.stderr[-2000:]}")
            last = [line for line in p.stdout.splitlines() if "kNN top-1" in line][-1]
            print(f"{name:24s} {times[name][-1]:7.1f} s   {last.strip()}", flush=True)
    base = min(times["plain loop"])
    for name, t in times.items():
        print(f"whole run, {opts.epochs} epochs: {name:24s} best {min(t):7.1f} s  "
              f"plain loop / this {base / min(t):.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes on the CPU")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, one round: checks that every row runs")
    p.add_argument("--compile", action="store_true", help="torch.compile our encoders")
    p.add_argument("--strict-fp32", action="store_true", help="official-style baseline without TF32")
    p.add_argument("--threads", type=int, default=-1,
                   help="CPU threads (default: 1 with --quick, since on a shared CPU more threads time the neighbours; "
                        "0 = torch's default)")
    p.add_argument("--rounds", type=int, default=2, help="alternate official and ours this many times, keep the best")
    p.add_argument("--workers", type=int, default=-1, help="CPU loader workers (default 2 quick, 8 GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 TFLOP/s of the chip (0 = guess)")
    p.add_argument("--whole-run", action="store_true",
                   help="time the whole default `python moco.py` against a plain loop of the same recipe")
    p.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # one run of the baseline
    p.add_argument("--epochs", type=int, default=5, help="epochs of --whole-run (the preset's 5)")
    opts = p.parse_args()
    if opts.plain_loop:
        plain_loop(opts.epochs, opts.workers if opts.workers >= 0 else 2)
        return
    if opts.whole_run:
        whole_run(opts)
        return
    if opts.tiny:
        opts.quick, opts.rounds = True, 1
    cuda = torch.cuda.is_available() and not opts.quick
    if not cuda and not opts.quick:
        print("no CUDA GPU visible: running --quick")
        opts.quick = True
    threads = opts.threads if opts.threads >= 0 else (1 if opts.quick else 0)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if cuda else "cpu")
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = opts.peak_tflops or (989.0 if cuda and any(s in hw for s in ("H100", "H200")) else 0.0)
    print(f"# bench_train {datetime.date.today()} | {hw} | torch {torch.__version__} | "
          f"fused InfoNCE: {'moco_ext' if moco.load_fused('auto', device) else 'off'} | compile: {opts.compile}")
    if opts.tiny:
        cfgs = [dict(name="moco basic32 32px b16 K256", arch="basic32", stem="cifar", size=32, batch=16, K=256,
                     m=0.99, T=0.1, mlp=False, bn_splits=2, warmup=1, steps=1)]
        dims, dim_steps = [4], (1, 1)
    elif opts.quick:
        cfgs = [dict(name="moco basic32 32px b64 K4096", arch="basic32", stem="cifar", size=32, batch=64, K=4096,
                     m=0.99, T=0.1, mlp=False, bn_splits=8, warmup=2, steps=5),
                dict(name="moco resnet18-cifar 32px b32 K4096", arch="resnet18", stem="cifar", size=32, batch=32,
                     K=4096, m=0.99, T=0.1, mlp=False, bn_splits=8, warmup=1, steps=2)]
        dims, dim_steps = [64], (1, 2)
    else:
        cfgs = [dict(name="moco v2 resnet50 224px b256 K65536", arch="resnet50", stem="imagenet", size=224, batch=256,
                     K=65536, m=0.999, T=0.2, mlp=True, bn_splits=8, warmup=5, steps=20),
                dict(name="moco cifar resnet18 32px b512 K4096", arch="resnet18", stem="cifar", size=32, batch=512,
                     K=4096, m=0.99, T=0.1, mlp=False, bn_splits=8, warmup=5, steps=30)]
        dims, dim_steps = [64, 256], (5, 50)
    head = f"{'config':40s} {'official img/s':>14s} {'ours img/s':>11s} {'ratio':>7s} {'GFLOP/img':>10s}"
    print(head + (f" {'floor img/s':>11s} {'ours/floor':>10s}" if peak else ""))

    def row(name, official, ours, flops):
        line = f"{name:40s} {official:14.1f} {ours:11.1f} {ours / official:6.2f}x {flops / 1e9:10.2f}"
        if peak:
            floor = peak * 1e12 / flops
            line += f" {floor:11.0f} {100 * ours / floor:9.0f}%"
        print(line, flush=True)

    for cfg in cfgs:
        row(cfg["name"], *bench_moco(cfg, device, opts))
    try:
        import dim
        missing = [n for n in ("build_encoder", "DIM", "prior_discriminator", "prior_d_loss", "prior_encoder_loss",
                               "parse_args", "resolve") if not hasattr(dim, n)]
    except Exception as e:  # dim.py is edited elsewhere: a broken import only skips its rows
        missing = [f"import failed: {type(e).__name__}: {e}"]
    if missing:
        print(f"note: DIM skipped, dim.py does not expose {', '.join(missing)}")
    else:
        for b in dims:
            row(f"dim basic32 32px b{b} (dimL, vs fp32 eager)", *bench_dim(b, device, opts, *dim_steps))
    workers = opts.workers if opts.workers >= 0 else (0 if opts.tiny else 2 if opts.quick else 8)
    batch, n = (16, 2) if opts.tiny else (128, 8) if opts.quick else (512, 30)
    cpu, ours = bench_data(device, batch, workers, n)
    print(f"data path, 32px pairs/s (cifar aug, batch {batch}): CPU loader ({workers} workers) {cpu:.0f}, "
          f"BatchAugment on {device.type} {ours:.0f}: {ours / cpu:.2f}x")
    cpu, ours = bench_dim_data(device, 4 * batch, workers, n)
    print(f"data path, dim.py 28->32px images/s (batch {4 * batch}): CPU loader ({workers} workers) {cpu:.0f}, "
          f"BatchPrepare on {device.type} {ours:.0f}: {ours / cpu:.2f}x")


if __name__ == "__main__":
    main()
