"""Deep InfoMax (DIM) in one file, local, global and prior-matching objectives: CPU, one GPU, or torchrun.

Paper: Hjelm, Fedorov, Lavoie-Marchildon, Grewal, Bachman, Trischler, Bengio, "Learning deep representations
by mutual information estimation and maximization", ICLR 2019, arXiv 1808.06670v5. Equation numbers below are
the paper's; the encoders follow the official code (rdevon/DIM configs/convnets.py). Every deviation is marked
NOTE(deviation) and listed in docs/dim.md.

Results: README.md and docs/experiments.md (measured numbers with date, hardware, command and seeds); how to run
it: docs/dim.md, docs/distributed.md.

Reading order: 1 arguments and presets, 2 the algorithm core (the MI estimators, critics, DIM's objective and
prior matching: copy this section alone into your code), 3 encoders, 4 the training loop; the appendices hold the
plumbing shared with moco.py (data, kNN monitor, checkpoints, signals).

Commands
    python dim.py                                       # built-in data (Fashion-MNIST test split), CPU-sized:
                                                        # the 'small' preset = DIM(L), JSD, 1 epoch
    python dim.py --dataset cifar10 --data ~/cifar --preset dimL --estimator nce --amp   # paper Table 1 row
    python dim.py --dataset stl10 --data ~/stl --preset dimL --arch alex64              # 64x64 crops + flips
    python dim.py --preset dimG                         # the paper's DIM(G): [last conv layer, Y] -> MLP
    python dim.py --preset dimG --global-critic dot --global-layer local   # the official code's GlobalDIM
    python dim.py --resume auto                         # continue the run in --out
    torchrun --nproc_per_node=4 dim.py --dataset cifar10 --data ~/cifar --batch-size 256   # 64 per GPU
    python eval_linear.py --pretrained runs/dim/ckpt.pt --layer conv --probe mlp         # paper's probe

Deliberately left out: the occlusion and coordinate-prediction variants (Table 4), MS-SSIM and MINE evaluation,
the SVM probe, the folded "CPC-style" encoders. NDM (Table 3) is study.py's ndm().
"""
import contextlib
import dataclasses
import gzip
import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image


# ----------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------
def arg(default, help, choices=None):
    """A flag: its default, its --help text and, for a choice, the values the parser accepts."""
    return field(default=default, metadata={"help": help, "choices": choices})


DATASETS = ("folder", "cifar10", "cifar100", "stl10", "fashionmnist", "mnist")


@dataclass
class Args:
    # shared with moco.py
    data: str = arg("", "image folder or torchvision root; empty = built-in Fashion-MNIST (data/)")
    dataset: str = arg("folder", "an image folder, or a torchvision data set stored at --data", DATASETS)
    download: bool = arg(False, "let torchvision download --dataset into --data")
    out: str = arg("runs/dim", "output folder: args.json, metrics.jsonl, ckpt.pt")
    epochs: int = arg(1000, "training epochs")                                  # paper: 1000
    batch_size: int = arg(64, "batch size")                                     # paper: 64
    lr: float = arg(1e-4, "Adam learning rate (encoder, critics and prior discriminator)")  # paper: 1e-4
    workers: int = arg(4, "data loader processes (at most the CPUs the process may use)")
    device: str = arg("auto", "auto = cuda if a GPU is visible", ("auto", "cpu", "cuda"))
    seed: int = arg(0, "random seed")
    resume: str = arg("", "checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    max_steps: int = arg(0, "stop after this many optimisation steps (0 = no limit)")
    save_every: int = arg(0, "also save a checkpoint every N steps (0 = end of epoch and end of run only)")
    log_every: int = arg(10, "log every N steps")
    tensorboard: bool = arg(False, "also write every value of metrics.jsonl to TensorBoard event files in OUT/tb, for "
                                   "watching and comparing runs live (needs pip install tensorboard)")
    amp: bool = arg(False, "mixed precision: bf16 autocast (fp16 + a gradient scaler on GPUs without bf16) and TF32 "
                           "on CUDA; on a CPU bf16 autocast, fast only on CPUs with bf16 units")
    amp_dtype: str = arg("auto", "the autocast type of --amp; auto = bfloat16 where the device has it",
                         ("auto", "bfloat16", "float16"))
    compile: bool = arg(False, "torch.compile the encoder")
    channels_last: str = arg("auto", "images and weights in channels-last memory order; auto = on a GPU",
                             ("auto", "on", "off"))
    knn_every: int = arg(1, "kNN monitor (on the fc features) every N epochs (0 = off)")
    holdout_every: int = arg(10, "an image folder without a usable val split: every Nth image is held out of "
                                 "training as the kNN monitor's test set, only while the monitor runs (0 = none)")
    save_on_signal: str = arg("TERM,USR1", "signals that stop the run after the current step with a checkpoint (exit "
                                           "status 75), e.g. from a scheduler; empty = none")
    overwrite: bool = arg(False, "start a fresh run in an --out that holds another run's checkpoint (it is replaced)")
    bad_images: str = arg("stop", "an image that cannot be read: stop (one line naming it and the ways on) or "
                                  "replace (the next readable image of its split stands in, each bad file listed once "
                                  "in OUT/bad_images.txt: the data keep their size and order, a resumed run stays "
                                  "exact)", ("stop", "replace"))
    check_images: bool = arg(False, "decode every image of --data in parallel, list the unreadable ones and exit "
                                    "(status 0: none, 2: some)")
    preset: str = arg("small", "a recipe the other flags override: dimL, dimG, dimLG (the paper's DIM(L), DIM(G), "
                               "DIM(L+G), Eq. 8), small (ours: DIM(L) for one epoch on a CPU)",
                      ("small", "dimL", "dimG", "dimLG"))
    # DIM                                                                       # paper Eq. (8)
    arch: str = arg("basic32", "basic32 (32x32) | alex64 (64x64) | a torchvision ResNet name (resnet18, ...)")
    y_dim: int = arg(64, "size of the global feature Y")                        # paper: 64
    alpha: float = arg(0.0, "weight of the global MI objective")
    beta: float = arg(1.0, "weight of the local MI objective (mean over locations)")
    gamma: float = arg(0.1, "weight of the prior-matching objective (0 = no discriminator)")
    estimator: str = arg("jsd", "jsd (Eq. 4), nce (Eq. 5) or dv (Eq. 2)", ("jsd", "nce", "dv"))
    critic: str = arg("dot", "local critic: encode-and-dot-product or concat-and-convolve", ("dot", "concat"))
    mi_units: int = arg(2048, "width of the encode-and-dot-product critics")    # official: 2048
    global_critic: str = arg("mlp", "global critic: mlp (paper: [layer, Y] -> 512-512-1) or dot (official GlobalDIM: "
                                    "a copy of the encoder's upper layers and a linear map of Y, dot product)",
                             ("mlp", "dot"))
    global_layer: str = arg("conv", "what the global critic reads with Y: conv (paper: the last conv layer, 256x4x4 "
                                    "for basic32) or local (the local map C; official GlobalDIM)", ("conv", "local"))
    local_samples: int = arg(0, "use this many random locations of the local map per image and step (0 = all)")
    prior_gp: float = arg(1.0, "gradient penalty on the prior discriminator, the mean over real and fake of "
                               "E|grad D|^2 (official code: 1.0)")
    # optimisation and augmentation
    beta1: float = arg(0.5, "Adam beta1 (official code: 0.5)")
    beta2: float = arg(0.999, "Adam beta2")
    wd: float = arg(0.0, "weight decay")
    aug: str = arg("auto", "crop = random crop + horizontal flip; auto = crop when image-size >= 64",
                   ("auto", "none", "crop"))
    image_size: int = arg(0, "input size (0 = the encoder's: 32 for basic32 and ResNets, 64 for alex64)")
    gpu_aug: str = arg("auto", "in-memory data (built-in, CIFAR, MNIST, STL-10) as uint8 on the device, prepared "
                               "there in batches (gpu_aug.py); auto = on a GPU, and on the CPU for images of at "
                               "most 64 px", ("auto", "on", "off"))


PAPER = dict(epochs=1000, batch_size=64, lr=1e-4, beta1=0.5, estimator="jsd", critic="dot")
PRESETS = {
    # Hjelm et al. 2019, Sec. 4.2 and Eq. (8): DIM(L), DIM(G) and DIM(L+G)
    "dimL": dict(PAPER, alpha=0.0, beta=1.0, gamma=0.1),
    "dimG": dict(PAPER, alpha=1.0, beta=0.0, gamma=1.0),
    "dimLG": dict(PAPER, alpha=0.5, beta=0.1, gamma=0.1),  # NOTE(deviation): gamma ours (the paper: alpha, beta)
    # NOTE(deviation): ours, for the built-in data on a CPU: DIM(L) for 1 epoch (125 steps), a 256-unit critic
    # (official: 2048)
    "small": dict(PAPER, alpha=0.0, beta=1.0, gamma=0.1, epochs=1, mi_units=256, workers=2),
}


# ----------------------------------------------------------------------------------------------------
# 2. The algorithm core: MI estimators, critics, prior matching (Hjelm et al. 2019, arXiv 1808.06670v5)
# ----------------------------------------------------------------------------------------------------
# Every estimator takes the critic's scores split into positives pos (N, L), T(C^(l)(x_i), E(x_i)) for each
# image i and location l, and negatives neg (N, K), T(C(x_j), E(x_i)) for j != i: the K = (N-1)L scores of
# image i's Y against every location of the other images. It returns the loss to minimise: minus the bound.
def jsd_loss(pos, neg):
    """Eq. (4): I_JSD >= E_P[-sp(-T(x, E(x)))] - E_PxP~[sp(T(x', E(x)))], sp = softplus. 2 log 2 at T = 0.
    The official code adds log 2 to each term (its loss is ours - 2 log 2, 0 at T = 0): same gradients."""
    return F.softplus(-pos).mean() + F.softplus(neg).mean()


def nce_loss(pos, neg):
    """Eq. (5): I_NCE >= E_P[T(x, E(x)) - log sum_x' e^T(x', E(x))], the sum over the positive and the K
    negatives; I(X; Y) >= log(K + 1) - loss. log(K + 1) at T = 0. NOTE(deviation): the image's own other
    locations are left out of the sum (the official code keeps them, with their score set to the constant -10)."""
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (N, 1)
    return -(pos - torch.logaddexp(pos, neg_lse)).mean()


def dv_loss(pos, neg):
    """Eq. (2): I_DV >= E_J[T] - log E_M[e^T] over all positives and all negatives. 0 at T = 0.
    (The official donsker_varadhan_loss mis-broadcasts its mask; this is the paper's formula.)"""
    return -(pos.mean() - (torch.logsumexp(neg.flatten(), 0) - math.log(neg.numel())))


ESTIMATORS = {"jsd": jsd_loss, "nce": nce_loss, "dv": dv_loss}


def mi_loss(scores, estimator):
    """scores (N, N, L): T(C^(l)(x_j), E(x_i)) at [i, j, l]; the diagonal i == j holds the positives."""
    n, _, L = scores.shape
    pos = scores.diagonal(dim1=0, dim2=1).T  # (N, L)
    # the off-diagonal pairs without a boolean mask (no host sync): in row-major order, after the first
    # entry every (N+1)-th one is on the diagonal, so N-1 rows of N+1 end each with a diagonal entry
    neg = scores.flatten(0, 1)[1:].view(n - 1, n + 1, L)[:, :n]  # (N-1, N, L)
    neg = neg.reshape(n, (n - 1) * L)  # (N, (N-1)L): self-pairs removed, not shifted
    return ESTIMATORS[estimator](pos, neg)


def local_global_loss(l, g, estimator):
    """Local DIM, Eq. (6) with the encode-and-dot-product critic T = g_i . l_{j,loc}: l (N, D, L) encoded
    local features, g (N, D) encoded global features -> minus the bound, averaged over the L locations."""
    return mi_loss(torch.einsum("id,jdl->ijl", g, l), estimator)  # (N, N, L) -> scalar


class Embed1x1(nn.Module):
    """One side of the encode-and-dot-product critic (rdevon/DIM MI1x1ConvNet): a 1x1-conv MLP n -> U -> U
    plus a linear shortcut that starts near the identity, summed and layer-normalised over the U channels.
    The 1x1 convolutions are written as Linear layers on (N, L, C) features (faster on the CPU)."""

    def __init__(self, n_in, units):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_in, units, bias=False), nn.BatchNorm1d(units), nn.ReLU(),
                                 nn.Linear(units, units))
        self.shortcut = nn.Linear(n_in, units, bias=False)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            self.shortcut.weight[torch.eye(units, n_in, dtype=torch.bool)] = 1.0
        self.norm = nn.LayerNorm(units)

    def forward(self, x):  # x (N, L, n_in)
        h = x.reshape(-1, x.shape[2])  # (N*L, n_in): batch norm over images and locations, as a 1x1 conv
        return self.norm(self.mlp(h) + self.shortcut(h)).view(x.shape[0], x.shape[1], -1)  # (N, L, U)


class DotCritic(nn.Module):
    """Encode-and-dot-product: T(c, y) = phi(c) . psi(y). Returns the encoded (l, g) for local_global_loss.
    As in the official code the score is a raw dot product of layer-normalised U-vectors, of order sqrt(U) at
    initialisation: the first losses lie far above their T = 0 values (JSD 2 log 2) and fall fast."""

    def __init__(self, n_c, n_y, units):
        super().__init__()
        self.phi, self.psi = Embed1x1(n_c, units), Embed1x1(n_y, units)

    def forward(self, c, y):  # c (N, L, C), y (N, Y)
        return self.phi(c).transpose(1, 2), self.psi(y[:, None, :])[:, 0]  # (N, U, L), (N, U)


class ConcatCritic(nn.Module):
    """Concat-and-convolve (global: concat-and-MLP): T(c, y) = MLP([c; y]), 512 -> 512 -> 1 with ReLU, at every
    location (a 1x1 conv). The first layer is split, W [c; y] = W_c c + W_y y, so all N x N pairs cost one add."""

    def __init__(self, n_c, n_y, hidden=512):
        super().__init__()
        self.w_c, self.w_y = nn.Linear(n_c, hidden), nn.Linear(n_y, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, c, y):  # c (N, L, C), y (N, Y)
        a = self.w_c(c)  # (N, L, H)
        b = self.w_y(y)  # (N, H)
        return self.rest(b[:, None, None, :] + a[None]).squeeze(-1)  # (N, N, L): scores [i (y), j (c), l]


class GlobalDotCritic(nn.Module):
    """The official GlobalDIM's critic (rdevon/DIM models/dim.py): the layer goes through a fresh copy of the
    encoder's upper layers ending in a Linear to `units`, Y through a Linear to `units`; T = their dot product."""

    def __init__(self, upper, n_upper, y_dim, units):
        super().__init__()
        self.phi, self.psi = nn.Sequential(upper, nn.Linear(n_upper, units)), nn.Linear(y_dim, units)

    def forward(self, c, y):  # c (N, ...) the layer, y (N, Y)
        return (self.psi(y) @ self.phi(c).T)[:, :, None]  # (N, N, 1): scores [i (y), j (c)]


def fresh_copy(*stages):
    """A copy of the encoder's stages with newly initialised weights (the official code builds them anew)."""
    import copy
    net = copy.deepcopy(nn.Sequential(*stages))
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net


class DIM(nn.Module):
    """Encoder plus the MI critics of Eq. (8). forward(x) -> ({'local': loss, 'global': loss}, Y (N, y_dim)).
    Local DIM scores Y against each of the M*M locations of the local map C (Eq. 6); global DIM scores Y against
    one layer of the whole image (Eq. 3, Fig. 2): by default the paper's, the last conv layer with Y through the
    concat-and-MLP critic [flatten(conv), Y] -> 512 -> 512 -> 1 (Appendix). Critics are built only for
    objectives with a non-zero weight."""

    def __init__(self, encoder, image_size, y_dim=64, local=True, glob=False, critic="dot", units=2048,
                 global_critic="mlp", global_layer="conv"):
        super().__init__()
        self.encoder, self.global_layer = encoder, global_layer
        with torch.no_grad():  # the shape of every tap, from one image (eval mode: BN statistics untouched)
            shapes = {k: v.shape[1:] for k, v in encoder.eval()(torch.zeros(2, 3, image_size, image_size)).items()}
        encoder.train()
        c = shapes["local"][0]
        self.local_critic = None if not local else DotCritic(c, y_dim, units) if critic == "dot" else \
            ConcatCritic(c, y_dim)
        self.global_critic = None
        if glob and global_critic == "mlp":
            self.global_critic = ConcatCritic(math.prod(shapes[global_layer]), y_dim)  # 512 -> 512 -> 1, L = 1
        elif glob:
            upper = [encoder.to_conv, encoder.to_fc] if global_layer == "local" else [encoder.to_fc]
            self.global_critic = GlobalDotCritic(fresh_copy(*upper), encoder.to_y.in_features, y_dim, units)

    def forward(self, x, estimator="jsd", local_samples=0):
        f = self.encoder(x)
        c, y = f["local"].flatten(2).transpose(1, 2), f["y"]  # (N, L = M*M, C), (N, y_dim)
        losses = {}
        if self.local_critic is not None:
            if 0 < local_samples < c.shape[1]:  # the official sample_locations: per image, with replacement
                at = torch.randint(c.shape[1], (c.shape[0], local_samples), device=c.device)  # (N, S)
                c = c[torch.arange(c.shape[0], device=c.device)[:, None], at]  # (N, S, C)
            losses["local"] = self._mi(self.local_critic, c, y, estimator)
        if self.global_critic is not None:
            g = f[self.global_layer]  # (N, C', H', W')
            losses["global"] = self._mi(self.global_critic, g.flatten(1)[:, None] if isinstance(
                self.global_critic, ConcatCritic) else g, y, estimator)
        return losses, y

    @staticmethod
    def _mi(critic, c, y, estimator):
        out = critic(c, y)
        with torch.autocast(c.device.type, enabled=False):  # scores, logsumexp and softplus in fp32
            if isinstance(out, tuple):
                return local_global_loss(out[0].float(), out[1].float(), estimator)
            return mi_loss(out.float(), estimator)


def prior_discriminator(y_dim=64):
    """D: 1000 -> 200 -> 1 with ReLU, no BN (paper Appendix, as in the official code)."""
    return nn.Sequential(nn.Linear(y_dim, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 1))


def prior_d_loss(d, y, gp=0.0):
    """Eq. (7), the discriminator's side: max E_V[log D(v)] + E_P[log(1 - D(sigmoid(E(x))))], V = U[0,1]^64
    (sigmoid on Y: Table 3 text), written as a logistic loss on D's logits. -> (loss, accuracy in %)."""
    fake = torch.sigmoid(y.detach().float())  # (N, Y), no gradient into the encoder
    real = torch.rand_like(fake)  # (N, Y) ~ U[0,1]^Y
    if gp:
        fake, real = fake.requires_grad_(), real.requires_grad_()
    d_real, d_fake = d(real).squeeze(1).float(), d(fake).squeeze(1).float()  # (N,), (N,)
    loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if gp:  # the official code (discriminator.py, gradient_penalty.py): gp * (E_V|grad D|^2 + E_P|grad D|^2) / 2
        grads = torch.autograd.grad(d_real.sum() + d_fake.sum(), [real, fake], create_graph=True)
        loss = loss + gp * 0.5 * sum(g.pow(2).sum(1).mean() for g in grads)
    acc = ((d_real > 0).float().mean() + (d_fake < 0).float().mean()) * 50
    return loss, acc


def prior_encoder_loss(d, y):
    """Eq. (7), the encoder's side, non-saturating (Goodfellow et al. 2014): max E_P[log D(sigmoid(E(x)))].
    Only the encoder's optimizer steps on it; D's gradients from it are discarded."""
    return F.softplus(-d(torch.sigmoid(y.float())).float()).mean()


# ----------------------------------------------------------------------------------------------------
# 3. Encoders: x -> local map C (N, C, M, M) -> conv tap -> fc tap -> Y (N, 64); Y = f(C(x)) (Sec. 3)
# ----------------------------------------------------------------------------------------------------
TAPS = ("local", "conv", "fc", "y")


class Encoder(nn.Module):
    """Four stages; forward(x, upto) returns the outputs of the stages up to `upto` as a dict."""

    def __init__(self, to_local, to_conv, to_fc, to_y):
        super().__init__()
        self.to_local, self.to_conv, self.to_fc, self.to_y = to_local, to_conv, to_fc, to_y

    def forward(self, x, upto="y"):
        out, h = {}, x
        for name, stage in zip(TAPS, (self.to_local, self.to_conv, self.to_fc, self.to_y)):
            h = out[name] = stage(h)
            if name == upto:
                break
        return out


class Tap(nn.Module):
    """images -> the features of one stage (evaluation and the kNN monitor)."""

    def __init__(self, encoder, layer):
        super().__init__()
        self.encoder, self.layer = encoder, layer

    def forward(self, x):
        return self.encoder(x, self.layer)[self.layer]


def conv_bn_relu(i, o, k, s, p):
    return [nn.Conv2d(i, o, k, s, p, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def fc_bn_relu(i, o):
    return [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]


def build_encoder(arch, image_size, y_dim=64):
    if arch == "basic32":  # rdevon/DIM _basic32x32 (paper Table 1): local map 128x8x8, conv tap 256x4x4
        return Encoder(nn.Sequential(*conv_bn_relu(3, 64, 4, 2, 1), *conv_bn_relu(64, 128, 4, 2, 1)),
                       nn.Sequential(*conv_bn_relu(128, 256, 4, 2, 1)),
                       nn.Sequential(nn.Flatten(), *fc_bn_relu(256 * (image_size // 8) ** 2, 1024)),
                       nn.Linear(1024, y_dim))
    if arch == "alex64":  # rdevon/DIM _alex64x64 (STL-10, Tiny ImageNet): local map 384x15x15, conv tap 192x7x7
        pool = nn.MaxPool2d(3, 2)
        return Encoder(nn.Sequential(*conv_bn_relu(3, 96, 3, 1, 1), pool, *conv_bn_relu(96, 192, 3, 1, 1), pool,
                                     *conv_bn_relu(192, 384, 3, 1, 1)),
                       nn.Sequential(*conv_bn_relu(384, 384, 3, 1, 1), *conv_bn_relu(384, 192, 3, 1, 1), pool),
                       nn.Sequential(nn.Flatten(), *fc_bn_relu(192 * 7 * 7, 4096), *fc_bn_relu(4096, 4096)),
                       nn.Linear(4096, y_dim))
    if arch.startswith("resnet") and hasattr(torchvision.models, arch):
        # NOTE(deviation): a torchvision ResNet with the CIFAR stem (3x3/1 conv, no max-pool) for images up to
        # 64 px; local map = layer3 (256x8x8 for resnet18 at 32 px), conv tap = layer4, fc = FC 1024 on the
        # pooled layer4. The official code's ResNets differ in widths (rdevon/DIM#34).
        net = torchvision.models.__dict__[arch]()
        if image_size <= 64:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        width = net.fc.in_features
        return Encoder(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3),
                       net.layer4, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *fc_bn_relu(width, 1024)),
                       nn.Linear(1024, y_dim))
    raise ValueError(f"unknown arch {arch!r}: basic32, alex64 or a torchvision ResNet name")


def encoder_for_eval(ckpt, layer):
    """A dim.py checkpoint dict -> frozen eval-mode module: images -> features of `layer` (conv, fc or y).
    ckpt['model'] None keeps the random initialisation (the baseline of the same architecture)."""
    if layer not in TAPS[1:]:
        raise UserError(f"--layer must be conv, fc or y for a dim.py checkpoint, not {layer!r}")
    a = Args(**{k: v for k, v in ckpt["args"].items() if k in {f.name for f in dataclasses.fields(Args)}})
    encoder = build_encoder(a.arch, a.image_size, a.y_dim)
    if ckpt.get("model") is not None:
        state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        wrong = mismatch(encoder, state)
        if wrong:
            raise UserError(f"checkpoint does not match --arch {a.arch}: {wrong}")
        encoder.load_state_dict(state)
    tap = Tap(encoder, layer).eval()
    for p in tap.parameters():
        p.requires_grad = False
    return tap


# ----------------------------------------------------------------------------------------------------
# 4. Training: one step of Eq. (8), train() on class Run (the plumbing shared with moco.py, Appendix C), main
# ----------------------------------------------------------------------------------------------------
def world_info():
    """(rank, number of processes): (0, 1) unless torch.distributed is initialised (torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def train_step(net, prior, opts, scalers, x, args, amp_dtype):
    """One step of Eq. (8) on the batch x (B, 3, S, S): the encoder and the MI critics under autocast; the prior
    discriminator's step (Eq. 7) outside it, in float32, with its own gradient scaler. -> the logged values,
    detached: (loss, local, global, prior, d_loss, d_acc)."""
    (opt, opt_prior), (scaler, scaler_prior) = opts, scalers
    zero = torch.zeros((), device=x.device)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        mi, y = net(x, args.estimator, args.local_samples)  # {'local', 'global'} losses (fp32), Y (N, y_dim)
    mi_local, mi_global = mi.get("local", zero), mi.get("global", zero)
    d_loss, d_acc, prior_loss = zero, zero, zero
    # NOTE(deviation): alternating updates as Goodfellow et al. 2014 (arXiv 1406.2661, Algorithm 1): the
    # discriminator steps, then the encoder's prior loss reads the stepped discriminator. The official
    # PriorMatching.routine (rdevon/DIM) computes both losses from the same discriminator before either step.
    if args.gamma > 0:  # Eq. (7): one discriminator step on this batch's Y, then the encoder's prior loss
        d_loss, d_acc = prior_d_loss(prior, y, args.prior_gp)
        opt_prior.zero_grad(set_to_none=True)
        scaler_prior.scale(d_loss).backward()
        world = world_info()[1]
        if world > 1:  # the discriminator is small and outside DDP: average its gradients
            grads = [p.grad for p in prior.parameters()]
            for g in grads:
                dist.all_reduce(g)
            torch._foreach_div_(grads, world)
        scaler_prior.step(opt_prior)
        scaler_prior.update()
        prior_loss = prior_encoder_loss(prior, y)
    # Eq. (8): alpha * global + beta * local + gamma * prior (each a loss to minimise)
    loss = args.alpha * mi_global + args.beta * mi_local + args.gamma * prior_loss
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return torch.stack([loss, mi_local, mi_global, prior_loss, d_loss, d_acc]).detach().float()


def train(argv=None):
    run = Run(argv, "dim")
    args, device, world = run.args, run.device, run.world
    # Under torchrun each rank takes batch / world images, and its negatives are the other images of its own
    # share (not gathered across ranks): the estimators are defined per batch, and the paper's batch is 64.
    run.data()
    encoder = build_encoder(args.arch, args.image_size, args.y_dim)
    model = DIM(encoder, args.image_size, args.y_dim, args.beta > 0, args.alpha > 0, args.critic, args.mi_units,
                args.global_critic, args.global_layer)
    model, prior = model.to(device, memory_format=run.fmt), prior_discriminator(args.y_dim).to(device)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.wd)
    opts = torch.optim.Adam(model.parameters(), **adam), torch.optim.Adam(prior.parameters(), **adam)
    scalers = tuple(torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16) for _ in range(2))
    state = {"model": model, "prior": prior, "optimizer": opts[0], "prior_optimizer": opts[1],
             "scaler": scalers[0], "prior_scaler": scalers[1]}  # what ckpt.pt holds, beside epoch, step, rng, args
    start = run.restore(state)  # (epoch, step in it, step): zeros for a fresh run
    for opt in opts:  # the flags' values, also over a resumed optimiser's (its lr, betas and wd are the checkpoint's)
        for g in opt.param_groups:
            g.update(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.wd)
    if args.compile:
        model.encoder.compile()
    net = model
    if world > 1:  # DDP copies rank 0's model to every rank; the discriminator (outside DDP) likewise
        for t in prior.state_dict().values():
            dist.broadcast(t, 0)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run.fit(lambda x, _: train_step(net, prior, opts, scalers, x, args, run.amp_dtype), state, start,
            {"loss": ".4f", "local": ".4f", "global": ".4f", "prior": ".3f", "d_loss": None, "d_acc": ".1f"},
            lambda epoch: opts[0].param_groups[0]["lr"], Tap(model.encoder, "fc"), " (fc)",
            "a lower --lr, --estimator jsd")
    return model, prior


# --- shared: main ---
PREEMPTED = 75  # exit status of a run stopped by --save-on-signal after writing its checkpoint (EX_TEMPFAIL: try again)


def main(argv=None, body=None, oom="lower --batch-size (and --lr with it), or add --amp"):
    """train(argv) (eval_linear.py: its own body), and every way it can end as at most one line and an exit status: 0
    done, 2 an error the user can fix, 3 out of memory, 75 stopped by a signal with its checkpoint written (0 under
    torchrun, whose agent restarts a worker that exits otherwise: OUT/status says stopped), 130 interrupted, 1 the
    end of another process of the run or of a loader process. An error that is none of these is a bug: its traceback."""
    STOP.update({"signal": None, "raise": None, "kept": "nothing was written", "status": None, "lock": None, "old": {}})
    try:
        return (body or train)(argv)
    except (Exception, KeyboardInterrupt, Preempted) as e:
        code, msg = ending(e, oom)
        if msg:
            print(msg, file=sys.stderr, flush=True)
        write_status(msg if code in (0, PREEMPTED, 130) else f"failed: {msg.removeprefix('error: ') or repr(e)[:300]}")
        if code is None:
            raise
        sys.exit(code)
    finally:  # loader processes ignore the stop signals: left alive, they would hold the exit for ever
        end_loaders()
        for name, old in STOP["old"].items():  # after a stop, the stop signals are ignored until the exit
            old = signal.SIG_IGN if STOP["signal"] else signal.SIG_DFL if old is None else old
            signal.signal(getattr(signal, "SIG" + name), old)
        release_lock()


def ending(e, oom):
    """-> (exit status, one line) of an exception that ended the run, or (None, '') for a bug."""
    text = str(e).strip()
    if isinstance(e, KeyboardInterrupt):
        return 130, f"interrupted; {STOP['kept']}"
    if isinstance(e, UserError):  # raised here or in a data-loader worker (then the message carries its traceback)
        return 2, "error: " + text.splitlines()[-1].split("UserError: ", 1)[-1]
    if isinstance(e, torch.OutOfMemoryError):
        return 3, f"error: out of memory: {oom}"
    if isinstance(e, Preempted) or STOP["signal"] is not None:  # a stop, or a peer's stop failed a collective
        return (0 if "TORCHELASTIC_RUN_ID" in os.environ else PREEMPTED), text if isinstance(e, Preempted) else ""
    cause = text.splitlines()[-1].removeprefix("RuntimeError: ")[:300] if text else type(e).__name__
    if "shared memory" in cause or "</torch_" in cause:  # a loader's batch in /dev/shm
        return 1, (f"error: the data loader's shared memory (/dev/shm) cannot take a batch ({cause.split(': ')[-1]}): "
                   f"give it more room (docker run --shm-size=8g), or run with --workers 0; {STOP['kept']}")
    if "DataLoader worker" in text:  # killed (e.g. by the kernel's out-of-memory killer), or its own error
        return 1, f"error: a data loader process failed ({cause}): try fewer --workers; {STOP['kept']}"
    if world_info()[1] > 1 and isinstance(e, (RuntimeError, dist.DistError)):  # a collective whose peer ended
        return 1, f"error: another process of this run ended (its message says why): {text.splitlines()[0][:200]}"
    return None, ""


def end_loaders():
    """Kill the data loader processes that are still alive (an error left their iterator unfinished)."""
    import multiprocessing
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main_thread else None  # or torch's handler would report
    for p in multiprocessing.active_children():  # each of them as a failure
        p.kill()
        p.join(10)
    if main_thread:
        signal.signal(signal.SIGCHLD, old)
# --- end shared: main ---


# ----------------------------------------------------------------------------------------------------
# Appendix A. Data and augmentation (the plain path; gpu_aug.py holds the batched twin of transforms())
# ----------------------------------------------------------------------------------------------------
# --- shared: data ---
HERE = os.path.dirname(os.path.abspath(__file__))
IMG_EXT = torchvision.datasets.folder.IMG_EXTENSIONS + (".gif",)  # ImageFolder's, any case, and GIF
MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the notebook's values
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            "fashionmnist": ((0.2860,) * 3, (0.3530,) * 3), "mnist": ((0.1307,) * 3, (0.3081,) * 3),
            "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))}


def read_idx(path):
    """IDX file (gzip): byte 3 = number of dims, then one big-endian uint32 per dim, then uint8 data."""
    with gzip.open(path, "rb") as f:
        b = f.read()
    shape = [int.from_bytes(b[4 + 4 * i: 8 + 4 * i], "big") for i in range(b[3])]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(shape)


def to_rgb(img):
    """Any PIL image (greyscale, palette, RGBA, CMYK, 16-bit, float) -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        a = a / 257.0 if img.mode != "F" else a * 255.0 if a.max() <= 1.0 else a
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


class ArrayData(torch.utils.data.Dataset):
    """uint8 images [N, H, W] or [N, H, W, 3] in memory with integer labels, in the fields torchvision's in-memory
    data sets (MNIST, CIFAR) have: `data` and `targets`. Every data set here yields (RGB PIL image, label)."""

    def __init__(self, data, targets):
        self.data, self.targets = data, [int(y) for y in targets]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return to_rgb(Image.fromarray(self.data[i])), self.targets[i]


def read_image(path):
    """The image folders' loader: an unreadable or truncated image stops the run with its path and the ways on."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}): --bad-images replace carries on with the next image in its "
                        "place (a resumed run stays exact), --check-images lists every unreadable one; or replace the "
                        "file (without it the data set changes, and a resumed run refuses it)")


class Folder(torchvision.datasets.DatasetFolder):
    """ROOT/<class>/**/<image> with ImageFolder's conventions: the classes are the sorted sub-folders (hidden ones
    such as .ipynb_checkpoints left out), the images are found recursively in each (Tiny ImageNet's
    train/<wnid>/images/*.JPEG). `classes` (train's) labels another split (val) by class name. With `bad_log` (a
    file: --bad-images replace) an unreadable image's next readable one stands in, and its path is listed there."""

    def __init__(self, root, classes=None):
        self.given, self.bad_log = classes, None
        super().__init__(root, read_image, IMG_EXT, allow_empty=True)
        for c in sorted(set(self.classes) - {self.classes[y] for y in self.targets}):
            if os.path.isdir(os.path.join(root, c)):  # val may lack a class folder, but not hold an empty one
                raise UserError(f"class folder {os.path.join(root, c)} has no images")

    def find_classes(self, root):
        try:
            classes = self.given or sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        except OSError as e:  # no permission
            raise UserError(f"cannot read {root} ({e.strerror})") from None
        if not classes:
            raise UserError(f"{root} has no class folders (expected {root}/<class>/<image>)")
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(root, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """ImageFolder's list of (path, label), except that a folder it cannot read stops the run in one line
        (torchvision's os.walk would skip it without a word)."""
        def fail(e):
            raise UserError(f"cannot read {e.filename} ({e.strerror})")
        samples = []
        for c in sorted(class_to_idx):
            if os.path.isdir(os.path.join(root, c)):
                for d, _, files in sorted(os.walk(os.path.join(root, c), onerror=fail, followlinks=True)):
                    samples += [(os.path.join(d, f), class_to_idx[c]) for f in sorted(files)
                                if f.lower().endswith(IMG_EXT)]
        return samples

    def __getitem__(self, i):
        for j in range(len(self.samples) if self.bad_log else 1):
            path, y = self.samples[(i + j) % len(self.samples)]
            try:
                return read_image(path), y
            except UserError:
                if not self.bad_log:
                    raise
                with open(self.bad_log, "a+") as f:  # once per file, from any loader process (a short append)
                    f.seek(0)
                    if path + "\n" not in f.readlines():
                        f.write(path + "\n")
        raise UserError(f"none of the {len(self.samples)} images of a split can be read")


def base_of(ds):
    """The data set under a chain of Subsets."""
    return base_of(ds.dataset) if isinstance(ds, torch.utils.data.Subset) else ds


def check_images(args):
    """--check-images: decode every image file of --data's splits in parallel (a JPEG at 1/8 size: every byte is
    still decoded), list the unreadable ones, and exit: status 0 if none, 2 if some."""
    import multiprocessing
    folders = {id(f): f for f in map(base_of, load_data(args)[:2]) if hasattr(f, "bad_log")}.values()
    paths = sorted({p for f in folders for p, _ in f.samples})
    procs, t0 = usable_cpus(), time.perf_counter()
    with multiprocessing.Pool(procs) as pool:
        why = pool.map(decode_error, paths, chunksize=max(1, min(64, len(paths) // (4 * procs))))
    bad = [(p, w) for p, w in zip(paths, why) if w]
    for p, w in bad:
        print(f"unreadable: {p} ({w})", flush=True)
    dt = time.perf_counter() - t0
    print(f"checked {len(paths)} images in {dt:.1f}s ({len(paths) / max(dt, 1e-9):.0f} images/s, {procs} processes): "
          f"{len(bad)} unreadable" + ("" if folders else f" (--dataset {args.dataset} is read whole when it loads)"))
    if bad:
        raise UserError(f"{len(bad)} of {len(paths)} images cannot be read (listed above): replace them, or train "
                        "with --bad-images replace")
    sys.exit(0)


def decode_error(path):
    """'' if the image at `path` decodes, else why not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            to_rgb(img)
        return ""
    except Exception as e:
        return str(e) or type(e).__name__


def targets(ds):
    """The labels of a data set as a list (`targets`; STL-10's `labels`, -1 = unlabelled), through Subsets."""
    if isinstance(ds, torch.utils.data.Subset):
        t = targets(ds.dataset)
        return [t[i] for i in ds.indices]
    return np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels).tolist()


def labelled(ds, what, hint):
    """The images of `ds` with a label (>= 0): every image trains, but only these enter a kNN bank, a kNN test set
    or a probe (STL-10's 'train+unlabeled' marks its 100,000 unlabeled images with -1)."""
    keep = [i for i, y in enumerate(targets(ds)) if y >= 0]
    if not keep:
        raise UserError(f"{what} has no labelled images (label >= 0){hint}")
    return ds if len(keep) == len(ds) else torch.utils.data.Subset(ds, keep)


def load_data(args, need_val=False):
    """-> (train, test, stats name). Built-in data: the 10,000 Fashion-MNIST test images shipped in data/,
    images 0-7999 for training (and the kNN bank), 8000-9999 for testing. An image folder: folder_splits(), with
    images held out of training only while the kNN monitor runs (--knn-every) and has no val split to test on."""
    if not args.data:
        x, y = (read_idx(os.path.join(HERE, "data", f"t10k-{k}-ubyte.gz")) for k in ("images-idx3", "labels-idx1"))
        return ArrayData(x[:8000], y[:8000]), ArrayData(x[8000:], y[8000:]), "fashionmnist"
    root = os.path.expanduser(args.data)
    if not os.path.isdir(root) and not (args.download and args.dataset != "folder"):
        raise UserError(f"--data {args.data}: no such folder")
    if args.dataset == "folder":
        return (*folder_splits(root, args.holdout_every if args.knn_every else 0, need_val), data_stats(args))
    idx = [os.path.join(root, f"{s}-{k}-ubyte.gz") for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    if args.dataset in ("fashionmnist", "mnist") and all(map(os.path.isfile, idx)):  # the four IDX files in --data
        x, y, xt, yt = (read_idx(p) for p in idx)  # (as Debian's dataset-fashion-mnist installs them)
        return ArrayData(x, y), ArrayData(xt, yt), args.dataset
    tv = torchvision.datasets
    cls = {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100, "fashionmnist": tv.FashionMNIST, "mnist": tv.MNIST,
           "stl10": tv.STL10}[args.dataset]  # the parser checked the name (DATASETS)
    splits = ({"split": "train+unlabeled"}, {"split": "test"}) if cls is tv.STL10 else ({"train": 1}, {"train": 0})
    try:
        return (*(cls(root=root, download=args.download, transform=to_rgb, **s) for s in splits), args.dataset)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise UserError(f"--dataset {args.dataset} at {root}: {str(e).splitlines()[0]} (add --download?)")


def data_stats(args):
    """The name of the mean and std (MEAN_STD) the images of --data, --dataset are normalised with."""
    return "fashionmnist" if not args.data else "imagenet" if args.dataset == "folder" else args.dataset


def folder_splits(root, every, need_val=False):
    """-> (train, test) of an image folder: ROOT/train and its val split (val_split()), else every `every`-th
    image of the class-sorted list of ROOT/train or ROOT held out for testing (every 0: none, test None).
    need_val: no usable val stops here (a protocol that must never test on training images)."""
    tr = os.path.join(root, "train")
    train = Folder(tr if os.path.isdir(tr) else root)
    test, why = val_split(root, train) if os.path.isdir(tr) else (None, f"{root} has no train/ and val/ folders")
    if test is not None:
        return train, test
    if need_val:
        raise UserError(f"no usable test split: {why} (expected val/<class>/..., Tiny ImageNet's val/images with "
                        "val_annotations.txt, or ImageNet's flat val/ with LOC_val_solution.csv)")
    if os.path.isdir(os.path.join(root, "val")) and world_info()[0] == 0:
        print(f"note: {why}: not used" + (f"; every {every}th training image is held out for testing instead" if
                                         every else ""), flush=True)
    if not every:
        return train, None
    held = [j % every == every - 1 for j in range(len(train))]
    return (torch.utils.data.Subset(train, [j for j, h in enumerate(held) if not h]),
            torch.utils.data.Subset(train, [j for j, h in enumerate(held) if h]))


class Listed(torch.utils.data.Dataset):
    """Labelled images from a list, (path, class index) each, read as the folders' images."""

    def __init__(self, samples):
        self.samples, self.targets, self.bad_log = samples, [y for _, y in samples], None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return Folder.__getitem__(self, i)


def val_split(root, train):
    """-> (ROOT/val labelled by train's class names, or None; why not): class folders val/<class>/..., Tiny
    ImageNet's val/images/*.JPEG with val/val_annotations.txt (file, wnid, box), or ImageNet's flat val/*.JPEG with
    LOC_val_solution.csv (ImageId, then the wnid first in PredictionString) in val/, in ROOT or up to three folders
    above it (Kaggle's download: ILSVRC/Data/CLS-LOC/{train,val} and the CSV at the top)."""
    val = os.path.join(root, "val")
    if not os.path.isdir(val):
        return None, f"{val} does not exist"
    subs = sorted(e.name for e in os.scandir(val) if e.is_dir() and e.name[0] != ".")
    if subs and all(c in train.class_to_idx for c in subs):
        return Folder(val, train.classes), ""
    ups = [os.path.abspath(os.path.join(root, *[".."] * n)) for n in range(4)]
    lists = [os.path.join(val, "val_annotations.txt")] + [os.path.join(d, "LOC_val_solution.csv") for d in [val, *ups]]
    found = next((p for p in lists if os.path.isfile(p)), None)
    if found is None:
        bad = next((c for c in subs if c not in train.class_to_idx), None)
        return None, f"{val}: " + (f"{bad} is not a class of {root}/train" if bad else
                                   "no class folders, no val_annotations.txt, no LOC_val_solution.csv")
    images = os.path.join(val, "images") if os.path.isdir(os.path.join(val, "images")) else val
    files = {os.path.splitext(e.name)[0]: e.path for e in os.scandir(images)
             if e.is_file() and e.name.lower().endswith(IMG_EXT)}
    with open(found) as f:
        rows = [line.strip().replace(",", "\t", 1).split() for line in f if line.strip()]
    labels = {os.path.splitext(r[0])[0]: r[1] for r in rows if len(r) > 1 and r[0] != "ImageId"}  # (the CSV's header)
    gone = next((k for k in labels if k not in files), None)
    bad = next((w for w in labels.values() if w not in train.class_to_idx), None)
    if not labels or gone or bad:
        return None, f"{found}: " + (f"lists {gone}, which is not an image in {images}" if gone else
                                     f"{bad} is not a class of {root}/train" if bad else "no labels")
    return Listed([(files[k], train.class_to_idx[w]) for k, w in sorted(labels.items())]), ""


class Seeded(torch.utils.data.Dataset):
    """`transform` of base[i] under a per-sample seed, so that augmentations depend only on (seed, epoch, position)
    and not on the worker count: resuming mid-epoch gives identical batches."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img, y = self.base[i]
        if seed is None:
            return self.transform(img), y
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), y


class EpochSampler(torch.utils.data.Sampler):
    """Each epoch a permutation drawn from (seed, epoch), cut into this rank's share of full global batches
    (drop_last, as the official DistributedSampler + drop_last), starting `skip` batches in."""

    def __init__(self, n, batch, seed, rank=0, world=1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.skip = 0, 0

    def steps(self):
        return self.n // (self.batch * self.world)

    def __len__(self):
        return (self.steps() - self.skip) * self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.steps() * self.batch * self.world]
        mine = order.view(self.steps(), self.world, self.batch)[self.skip:, self.rank].reshape(-1).tolist()
        base = (self.seed * 1000003 + self.epoch) * self.n * 2  # per-sample augmentation seeds
        return iter([(i, base + i) for i in mine])


def loader(ds, batch, workers, sampler=None, device=None):
    """A DataLoader with at most as many processes as this process may use CPUs (more only slow it down), and its
    own generator: starting an epoch must not draw from the global RNG, or a resumed run would differ."""
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, shuffle=False, drop_last=False,
                                       num_workers=min(workers, usable_cpus()), worker_init_fn=leave_stop_signals,
                                       pin_memory=device is not None and device.type == "cuda",
                                       persistent_workers=False, generator=torch.Generator().manual_seed(0))


def leave_stop_signals(_):
    """A loader process ignores the stop signals (a scheduler may signal the whole process group): the run saves
    and stops; the loader processes end with it."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
# --- end shared: data ---


def test_transform(size, stats):
    """The plain view (evaluation, kNN, and training without augmentation): resize, centre-crop, normalise."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(*MEAN_STD[stats])])


def transforms(args, stats):
    """-> (train, test) transforms. `crop`: STL-10's random 64x64 crops of the 96x96 image plus flips (Sec. 4);
    other images are first resized to 1.5x the crop, the same ratio. Test images are resized to the crop."""
    test = test_transform(args.image_size, stats)
    if args.aug == "none":
        return test, test
    train = T.Compose([T.Resize(args.image_size * 3 // 2), T.RandomCrop(args.image_size), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize(*MEAN_STD[stats])])
    return train, test


# ----------------------------------------------------------------------------------------------------
# Appendix B. Monitoring: weighted kNN on frozen features (the CIFAR notebook: k=200, t=0.1, cosine)
# ----------------------------------------------------------------------------------------------------
# --- shared: knn ---
@torch.no_grad()
def extract(encode, batches, device):
    """-> features (M, D) in fp32 (a dict of them where `encode` returns a dict of taps) and labels (M,) of
    (images, labels) batches, in order: the one feature-extraction path of the kNN monitor, eval_linear.py and
    study.py."""
    feats, labels = [], []
    for x, y in batches:
        f = encode(x.to(device, non_blocking=True))
        feats.append({k: v.float().flatten(1) for k, v in f.items()} if isinstance(f, dict) else f.float().flatten(1))
        labels.append(y.to(device))
    if isinstance(feats[0], dict):
        return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}, torch.cat(labels)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_all(encode, ds, tf, workers, device):
    """Features (M, D) and labels (M,) of a whole data set, in order, on every rank. Under torchrun rank r encodes
    its contiguous share, images r*M//world .. (r+1)*M//world - 1, and the shares are gathered: a pass over
    ImageNet costs each of 8 ranks 1/8 of it, instead of rank 0 the whole pass while the others wait."""
    rank, world = world_info()
    if len(ds) < world:
        raise UserError(f"{len(ds)} images cannot be shared by {world} processes")
    bounds = [r * len(ds) // world for r in range(world + 1)]
    share = torch.utils.data.Subset(ds, range(bounds[rank], bounds[rank + 1]))
    f, y = extract(encode, loader(Seeded(share, tf), 512, workers, device=device), device)  # (m, D), (m,)
    if world == 1:
        return f, y
    per = -(-len(ds) // world)  # all_gather takes equal sizes: every share padded to the largest
    fs, ys = [f.new_empty(per, f.shape[1]) for _ in range(world)], [y.new_empty(per) for _ in range(world)]
    dist.all_gather(fs, F.pad(f, (0, 0, 0, per - len(f))))
    dist.all_gather(ys, F.pad(y, (0, per - len(y)), value=-1))
    n = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    return torch.cat([t[:k] for t, k in zip(fs, n)]), torch.cat([t[:k] for t, k in zip(ys, n)])  # (M, D), (M,)


@torch.no_grad()
def knn_top1(bank, bank_y, test, test_y, k=200, t=0.1, chunk=1024):
    """Top-1 % of Wu et al. 2018's (arXiv 1805.01978v1) weighted kNN: the top-k cosine neighbours vote exp(s/t)."""
    bank, test = F.normalize(bank, dim=1), F.normalize(test, dim=1)  # (M, D), (n, D)
    classes, preds = int(max(bank_y.max(), test_y.max())) + 1, []
    chunk = max(1, min(chunk, 2 ** 28 // len(bank)))  # a (chunk, M) block of at most 1 GB: 209 rows for ImageNet
    for f in test.split(chunk):
        sim, idx = (f @ bank.T).topk(min(k, len(bank)), dim=1)  # (c, k)
        votes = torch.zeros(len(f), classes, device=f.device)  # (c, classes)
        preds.append(votes.scatter_add_(1, bank_y[idx], (sim / t).exp()).argmax(1))
    return (torch.cat(preds) == test_y).float().mean().item() * 100


def knn_accuracy(encode, bank_set, test_set, tf, workers, device, k=200, t=0.1):
    """The kNN monitor: every rank encodes its share of the bank and of the test set (labelled images only,
    labelled()) and every rank returns the same top-1 %."""
    if world_info()[1] > 1:  # BN statistics are rank-local until DDP's next forward: use rank 0's (the checkpoint's)
        for b in encode.buffers():
            dist.broadcast(b, 0)
    bank, bank_y = extract_all(encode.eval(), bank_set, tf, workers, device)  # (M, D), (M,)
    test, test_y = extract_all(encode, test_set, tf, workers, device)  # (n, D), (n,)
    return knn_top1(bank, bank_y, test, test_y, k, t)
# --- end shared: knn ---


# ----------------------------------------------------------------------------------------------------
# Appendix C. Utilities: device, checkpoints, RNG, arguments, and the run loop shared with moco.py
# ----------------------------------------------------------------------------------------------------
# --- shared: utilities ---
class UserError(Exception):
    """An error the user can fix; main() prints it as one line."""


class Preempted(BaseException):
    """A stop signal ended the run, after its checkpoint was written or before its first step; main() exits with
    PREEMPTED. Raised by the signal handler wherever the code is, so, as KeyboardInterrupt, not an Exception: no
    `except Exception` eats it."""


# the stop signal received; the message to raise at once outside the steps (start-up, kNN monitor); what a failure
# leaves (main()'s line); rank 0's OUT/status and OUT/run.lock; the handlers catch_signals() replaced
STOP = {"signal": None, "raise": None, "kept": "nothing was written", "status": None, "lock": None, "old": {}}


def catch_signals(names, now):
    """--save-on-signal: from here until main() returns, each of these signals (SIGTERM from a scheduler, SIGUSR1 ahead
    of a time limit) asks the run to stop: after the current optimisation step while it trains, at once with the
    message `now` elsewhere (STOP["raise"]). A second signal changes nothing. main() puts the old handlers back."""
    if bad_signals(names):
        raise UserError(f"--save-on-signal {names!r}: {bad_signals(names)}")
    STOP["raise"] = now
    if threading.current_thread() is threading.main_thread():  # Python sets handlers in the main thread only
        for name in [n.strip().upper().removeprefix("SIG") for n in names.split(",") if n.strip()]:
            STOP["old"].setdefault(name, signal.signal(getattr(signal, "SIG" + name), StopOnSignals.handler))


class StopOnSignals:
    """The stop signals caught by catch_signals(), agreed on by the ranks: under torchrun every rank must stop at the
    same step, so each step's flags are combined (max) over the ranks while the next step runs, and every rank reads
    the same answer one step later, with no wait on the hot path."""

    def __init__(self, world=1, group=None):
        self.world, self.group, self.pending, self.now, self.before = world, group, None, False, None

    def __enter__(self):
        self.before, STOP["raise"] = STOP["raise"], None  # start-up's message, kept for the first batch
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.settle()

    def settle(self):
        """Wait for the last combination of the flags (every rank posted it): before the process group goes."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    @staticmethod
    def handler(signum, frame):
        STOP["signal"] = STOP["signal"] or signal.Signals(signum).name
        if STOP["raise"] is not None:  # inside the kNN monitor: the checkpoint is written, leave at once
            raise Preempted(STOP["raise"])

    def agreed(self, wait=False):
        """-> whether the run must stop now: the same answer on every rank at the same step. The flags are combined
        (max) over the ranks while the next step runs; wait=True combines them at once (before the kNN monitor)."""
        if self.world == 1:
            self.now = STOP["signal"] is not None
            return self.now
        seen = False
        if self.pending is not None:  # the flags of the step before
            self.pending.wait()
            seen = bool(self.flag.item())
        self.flag = torch.tensor([STOP["signal"] is not None], dtype=torch.int32)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if wait:
            self.pending.wait()
            seen, self.pending = seen or bool(self.flag.item()), None
        self.now = seen
        return seen


def bad_signals(names):
    """'' if every name of --save-on-signal is a signal a run can catch, else what is wrong."""
    for name in filter(None, (n.strip().upper().removeprefix("SIG") for n in names.split(","))):
        if name in ("KILL", "STOP") or not isinstance(getattr(signal, "SIG" + name, None), signal.Signals):
            return f"{name} is not a signal a process can catch (e.g. TERM, USR1, USR2, INT)"
    return ""


def setup_device(args):
    """Device, rank and world size; one code path for CPU, one GPU and torchrun (NCCL on GPU, gloo on CPU)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world, local = 0, 1, 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        # torchrun's store (the agent's, or rank 0's), our keys under the restart count: after --max-restarts
        # restarted the workers, the process group must not read the dead workers' addresses from the same store
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
            raise UserError("RANK and WORLD_SIZE are set, MASTER_ADDR and MASTER_PORT are not: launch with torchrun")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=not agent and rank == 0, multi_tenant=True)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"run{attempt}/", store),
                                rank=rank, world_size=world)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed + rank)
    return torch.device("cuda", local) if use_cuda else torch.device("cpu"), rank, world


def usable_cpus():
    """The CPUs this process may use, shared by the processes torchrun started on this machine."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class WholeWrites:
    """An unbuffered file whose write() writes every byte or raises what stopped it, and keeps it: torch.save's writer
    turns a short write (a file-size limit, a full disk) and even Ctrl-C into a mere position mismatch."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        view = memoryview(b).cast("B")
        try:
            while view:
                view = view[self.f.write(view):]
        except BaseException as e:
            self.error = e
            raise
        return len(b)

    def flush(self):
        pass


def replace_file(path, write, what="file", prev=None):
    """write(f) into a temporary file beside `path`, fsync, rename: `path` is either the old file or the new one,
    never half of one (the old one moved to `prev` first, if given). A failed write (disk full, quota, file-size
    limit) removes the temporary file and stops the run in one line; the old file stays as it was."""
    tmp, f = f"{path}.tmp.{os.getpid()}", None
    try:
        with open(tmp, "wb", buffering=0) as raw:
            f = WholeWrites(raw)
            write(f)
            os.fsync(raw.fileno())
        if prev and os.path.exists(path):
            os.replace(path, prev)
        move(tmp, path)
    except BaseException as e:  # torch.save reports a failed write (and Ctrl-C) as a RuntimeError: f.error says why
        if os.path.exists(tmp):
            os.remove(tmp)
        e = f.error if f is not None and f.error is not None else e
        if not isinstance(e, (OSError, RuntimeError)):  # Ctrl-C, a stop signal outside the steps
            raise e from None
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        old = "; the previous one is intact" if os.path.exists(path) else ""
        raise UserError(f"cannot write {what} {path}: {cause}{old}") from None


def move(src, dst):
    """os.replace, then fsync of the folder: the rename itself survives a power cut."""
    os.replace(src, dst)
    fd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state, path, prev=None):
    replace_file(path, lambda f: torch.save(state, f), "checkpoint", prev)


def append_line(path, line):
    """One line at the end of a text file, whole or not at all (a failed write is cut off again)."""
    try:
        with open(path, "ab") as f:
            size = f.tell()
            try:
                f.write((line + "\n").encode())
                f.flush()
            except OSError:
                f.truncate(size)
                raise
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def load_checkpoint(path, algo=None, need=(), ways=""):
    """-> the checkpoint dict at `path`, of `algo` (moco, dim) if given, with the entries `need`; every script's one
    loader. Only tensors, numbers, strings, lists and dicts are read (weights_only): loading a file runs no code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or an object that only code could rebuild (a GLOBAL)
        if not (isinstance(e, pickle.UnpicklingError) and "GLOBAL " in str(e)):
            raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): truncated or not a checkpoint{ways}")
        raise UserError(f"{path} holds {str(e).split('GLOBAL ', 1)[1].split()[0]}, not only tensors, numbers, strings, "
                        "lists and dicts: not loaded, as loading it could run code") from None
    if not isinstance(ckpt, dict) or algo and ckpt.get("algo") != algo:
        found = ckpt.get("algo", "not ours") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {algo + '.py checkpoint' if algo else 'checkpoint dict'} (found: {found})")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(map(repr, missing))}: not a whole checkpoint{ways}")
    return ckpt


def rng_states(device):
    """Every rank's random state, in rank order (under torchrun a collective: call it on every rank)."""
    mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    states = [mine] * world_info()[1]
    if len(states) > 1:
        dist.all_gather_object(states, mine)
    return states


def set_rng_state(states, device):
    """Restore this rank's random state -> False when the checkpoint was saved by another number of processes: then
    the ranks it has a state for take it (rank 0, which draws the shuffle-BN permutation and the memory bank's
    negatives for all, goes on as it would have), the others go on from their own."""
    rank, world = world_info()
    states = [states] if isinstance(states, dict) else states  # checkpoints before per-rank states: one state
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        if device.type == "cuda" and states[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    return len(states) == world


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def shown_default(f, presets, preset):
    """--help's default of field f: the default preset's value, and where another preset sets another."""
    def fmt(v):
        return ("on" if v else "off") if isinstance(v, bool) else repr(v) if v in ("", None) else str(v)
    value = presets.get(preset, {}).get(f.name, f.default)
    others = {}
    for name, p in presets.items():
        v = p.get(f.name, f.default)
        if name != preset and v != value:
            others.setdefault(fmt(v), []).append(name)
    by = f" with --preset {preset}" if f.name in presets.get(preset, {}) else ""
    return f"(default {fmt(value)}{by}" + "".join(f"; {', '.join(n)}: {v}" for v, n in others.items()) + ")"


def parse_args(argv=None, cls=None, presets=None):
    """-> (cls(...), the flags given): dataclass defaults <- preset <- flags on the command line. Every script's
    parser (moco.py, dim.py, eval_linear.py, study.py): a field's `choices` are checked, errors are one line, and
    --help shows each flag's effective default (a help text that states its default itself keeps its own words)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UserError(message)
    cls, presets = cls or Args, PRESETS if presets is None else presets
    preset = getattr(cls, "preset", None)
    p = Parser(description=sys.modules[cls.__module__].__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        name, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        own = "(default" in text or "no default)" in text  # the help text states its default itself
        text = (text if own else f"{text} {shown_default(f, presets, preset)}").replace("%", "%%")
        if f.type is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(name, type=f.type, choices=f.metadata["choices"], help=text)
    given = vars(p.parse_args(argv))
    for k, v in given.items():  # the values meet float32 tensors (lr, T, momentum, ...): 1e39 would be inf there
        if isinstance(v, float) and math.isfinite(v) and abs(v) > torch.finfo(torch.float32).max:
            raise UserError(f"--{k.replace('_', '-')} {v} does not fit a float32 (at most 3.4e38 in size)")
    chosen = presets.get(given.get("preset", preset), {})  # the parser checked its name
    return cls(**{**chosen, **given}), given
# --- end shared: utilities ---


# --- shared: run ---
RESUME_NEEDS = ("algo", "epoch", "step_in_epoch", "step", "rng", "args")  # beside the state (model, optimizer, ...)
OWN_FILES = ("ckpt.pt", "ckpt.pt.prev", "args.json", "metrics.jsonl", "status")  # a run's files in OUT


class Run:
    """The plumbing of one training run, the same in moco.py and dim.py: arguments (a resumed run takes its
    checkpoint's, then the flags given again, and says what changed), checks before any work, device and torchrun,
    the output folder (its run's alone) and its log, data, resume, the step loop with logging, checkpoints, the kNN
    monitor and stop signals. The script's train() builds the model and hands fit() a function that takes one
    optimisation step. Checkpoints: nothing non-finite is written, and one counts as kept once the step after it gave
    a finite loss (one update can blow the weights up to 1e19 while they and the loss before it are still finite):
    until then the one before stays as OUT/ckpt.pt.prev, and a run that diverges puts it back."""

    def __init__(self, argv, algo):
        args, given = parse_args(argv)
        if args.check_images:
            check_images(args)
        catch_signals(args.save_on_signal, "stopped by a signal before the first step: nothing new to save")
        if args.resume not in ("", "auto") and "out" not in given:  # a checkpoint's run goes on in its own folder
            args.out = os.path.dirname(args.resume) or "."
        given["out"] = args.out  # the folder is this command's, never the checkpoint's (it may have moved)
        self.algo, self.path, self.ckpt, self.src, notes = algo, os.path.join(args.out, "ckpt.pt"), None, None, []
        self.pending, self.kept, self.files, self.nan_hint, self.early = None, None, {}, "a lower --lr", []
        if args.resume == "auto" and args.overwrite:
            notes.append(f"note: --overwrite: a fresh run, whatever {self.path} holds")
        elif args.resume:
            self.src = self.path if args.resume == "auto" else args.resume
            if args.resume == "auto" and not os.path.exists(self.path) and os.path.exists(self.path + ".prev"):
                with contextlib.suppress(FileNotFoundError):  # killed between its two renames (another rank's?)
                    os.replace(self.path + ".prev", self.path)
            if args.resume != "auto" or os.path.exists(self.src):
                ways = "; start over with --overwrite, or give --resume another checkpoint"
                self.ckpt = load_checkpoint(self.src, algo, RESUME_NEEDS + STATE_NEEDS, ways)
                args, notes = resumed_args(self.ckpt["args"], given, self.src)
        self.args = args = resolve(args)
        self.device, self.rank, self.world = setup_device(args)
        STOP["raise"] = "" if self.rank else STOP["raise"]  # rank 0 speaks for all
        check_args(args, self.world, self.device)
        # stop signals are agreed on with a CPU tensor over gloo: no wait on the GPU
        self.ctrl = dist.new_group(backend="gloo") if self.world > 1 and dist.get_backend() != "gloo" else None
        if self.world > 1:  # every rank resumes from the same step (each machine reads --out itself)
            steps = [None] * self.world
            dist.all_gather_object(steps, self.ckpt and self.ckpt["step"], group=self.ctrl)
            if len(set(steps)) > 1:
                raise UserError(f"the processes see different checkpoints in --out {args.out} (the step each would "
                                f"resume from, by rank: {steps}): every machine must see the same folder")
        own = self.ckpt is not None and os.path.abspath(self.src) == os.path.abspath(self.path)
        self.files = rank0_decides(lambda: self.prepare_out(own), self.ctrl)
        if own and rank0_decides(lambda: os.path.exists(self.path + ".prev"), self.ctrl):  # stopped (or killed)
            self.mark(self.ckpt.get("prev_step"), self.ckpt["step"])  # before the step after it: the resumed run's
        else:  # first step decides
            self.mark(self.ckpt["step"] if own else None)
        self.tb = None  # a resumed run's events follow its checkpoint's step
        if args.tensorboard and self.rank == 0:
            self.tb = tensorboard_writer(args.out, self.ckpt["step"] + 1 if own else 0)
        self.log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()))
        for note in notes:
            self.log(note)
        if self.ckpt is not None and not own:
            self.log(f"note: continues from {self.src} (step {self.ckpt['step']}) in {args.out}; "
                     f"{os.path.dirname(self.src) or '.'} is left as it is")
        if self.ckpt is None and args.resume == "auto" and not args.overwrite:
            self.log(f"note: --resume auto found no {self.path}; starting fresh")
        self.amp_dtype = self.autocast_dtype()
        last = args.channels_last == "on" or args.channels_last == "auto" and self.device.type == "cuda"
        self.fmt = torch.channels_last if last else torch.contiguous_format

    def autocast_dtype(self):
        """--amp: bf16 autocast where the device has it (CUDA GPUs from Ampere on, every CPU), else fp16 with a
        gradient scaler, and TF32 matrix products on CUDA; --amp-dtype chooses. None without --amp."""
        args = self.args
        if not args.amp:
            return None
        dtype = getattr(torch, args.amp_dtype) if args.amp_dtype != "auto" else torch.float16 \
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            name = str(dtype).removeprefix("torch.")
            self.log(f"note: --amp on the CPU: {name} autocast, fast only on CPUs with native {name} arithmetic")
        return dtype

    def prepare_out(self, own):
        """(Rank 0) The output folder is its run's alone -> the paths of its args.json and metrics.jsonl. One run at a
        time (OUT/run.lock); a fresh run into a folder holding a checkpoint stops, unless --overwrite, which leaves
        the old run whole until the new one has kept its first checkpoint (the new args.json and metrics.jsonl are
        *.new until then). Temporary files of killed writers go."""
        args = self.args
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:  # a file, no permission
            raise UserError(f"--out {args.out}: cannot make the output folder ({e.strerror or e})") from None
        take_lock(os.path.join(args.out, "run.lock"))
        if not own and not args.overwrite and os.path.exists(self.path):
            raise UserError(f"--out {args.out} already holds a run ({self.path}): continue it with --resume auto, "
                            "choose another --out, or add --overwrite to start over")
        for name in os.listdir(args.out):  # no other run writes here (the lock): these are leftovers
            if name.split(".tmp.")[0].removesuffix(".new") in OWN_FILES and name not in OWN_FILES:
                os.remove(os.path.join(args.out, name))
        new = "" if own or not os.path.exists(self.path) else ".new"
        STOP["status"] = os.path.join(args.out, "status")
        write_status(f"running: PID {os.getpid()} on {socket.gethostname()}")
        return {k: os.path.join(args.out, k + new) for k in ("args.json", "metrics.jsonl")}

    def open_log(self):
        """(Rank 0, once the checkpoint is in place) args.json, and metrics.jsonl anew, or a resumed run's up to the
        checkpoint's step (a line logged after the checkpoint would appear twice)."""
        files, args = self.files, self.args
        replace_file(files["args.json"], lambda f: f.write(json.dumps(dataclasses.asdict(args), indent=1).encode()),
                     "arguments")
        keep = lines_upto(files["metrics.jsonl"], self.ckpt["step"]) if self.ckpt and self.kept is not None else []
        replace_file(files["metrics.jsonl"], lambda f: f.write("".join(keep + self.early).encode()), "metrics")
        self.early = None  # the lines logged before (train()'s choices) are in

    def mark(self, kept, pending=None):
        """OUT/ckpt.pt holds step `kept`, or `pending` (awaiting its next step; OUT/ckpt.pt.prev then holds `kept`)."""
        self.kept, self.pending = kept, pending
        step = kept if self.pending is None else self.pending
        STOP["kept"] = (f"the last checkpoint, {self.path} (step {step}), is intact" if step is not None
                        else f"{self.src} (step {self.ckpt['step']}) is unchanged" if self.ckpt
                        else "no checkpoint was written")

    def log(self, text, **metrics):
        """A readable line on stdout and, given metrics, one JSON object in OUT/metrics.jsonl and (--tensorboard)
        the same values as scalars at their step in OUT/tb (rank 0 only)."""
        if self.rank == 0:
            print(text, flush=True)
            if metrics and self.early is not None:  # until open_log()
                self.early.append(json.dumps(metrics) + "\n")
            elif metrics:
                append_line(self.files["metrics.jsonl"], json.dumps(metrics))
            for k, v in metrics.items() if self.tb is not None else ():
                if k != "step" and isinstance(v, (int, float)):  # (not --fused auto's choice, a word)
                    self.tb.add_scalar(k, v, metrics["step"])

    def data(self):
        """The training set with its sampler and batches (the CPU loader, or the device path of gpu_aug.py), and
        the kNN monitor's labelled bank and test sets."""
        args, device = self.args, self.device
        train_set, test_set, stats = load_data(args)
        if len(train_set) == 0:
            raise UserError("the training set is empty")
        if args.batch_size > len(train_set):
            raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} images)")
        if self.ckpt is not None and self.ckpt.get("n_train", len(train_set)) != len(train_set):
            raise UserError(f"the training set has {len(train_set)} images and {self.src}'s had {self.ckpt['n_train']}: "
                            "a resumed run needs the same data (its steps and data order depend on it; --knn-every "
                            "and --holdout-every decide whether a folder's images are held out)")
        self.bad_log = os.path.join(args.out, "bad_images.txt") if args.bad_images == "replace" else None
        for ds in (train_set, test_set):
            if hasattr(base_of(ds), "bad_log"):  # image files (Folder, Listed)
                base_of(ds).bad_log = self.bad_log
        train_tf, self.test_tf = transforms(args, stats)
        self.sampler = EpochSampler(len(train_set), args.batch_size // self.world, args.seed, self.rank, self.world)
        self.loader = loader(Seeded(train_set, train_tf), self.sampler.batch, args.workers, self.sampler, device)
        if args.knn_every and test_set is None:
            raise UserError("the kNN monitor has no test set: no usable val split and --holdout-every 0; hold images "
                            "out with --holdout-every N, or turn the monitor off with --knn-every 0")
        hint = "; turn the kNN monitor off with --knn-every 0"  # the monitor's sets: labelled images only
        self.bank_set = labelled(train_set, "the kNN bank (the training set)", hint) if args.knn_every else None
        self.knn_test = labelled(test_set, "the kNN test set", hint) if args.knn_every else None
        if args.knn_every and len(set(targets(self.bank_set))) < 2:
            self.log("note: the kNN bank has one class: its top-1 is 100% whatever the features (it measures nothing)")
        self.gpu_batches = None  # --gpu-aug, speed only: gpu_aug.py, imported on that path alone
        if args.gpu_aug != "off":
            try:
                import gpu_aug
                self.gpu_batches = gpu_aug.device_path(train_set, args, device, self.sampler, self.log,
                                                       lambda: batch_prepare(gpu_aug, args, stats, device))
            except ImportError:
                if args.gpu_aug == "on":
                    raise UserError("--gpu-aug on needs gpu_aug.py next to this script")
        some = f" ({len(self.bank_set)} labelled: the kNN bank)" if len(self.bank_set or train_set) < len(train_set) \
            else ""
        held = len(test_set) if getattr(test_set, "dataset", 0) is getattr(train_set, "dataset", 1) else 0
        some += f", {held} held out as the kNN monitor's test set (every {args.holdout_every}th)" if held else ""
        workers = min(args.workers, usable_cpus())
        how = "read" if getattr(args, "aug", "") == "none" else "augmented"
        self.log(f"data: {len(train_set)} images pretrain{some}, " + (
            f"uint8 on {device}, {how} there in batches (gpu_aug.py)" if self.gpu_batches else
            f"{how} by the CPU loader with {workers} workers"
            + (f" (--workers {args.workers}: more than the {usable_cpus()} CPUs this process may use)"
               if workers < args.workers else "")))

    def batches(self, epoch):
        """The rest of the epoch's batches on the device: (a tensor (B, 3, S, S) or a tuple of views, the images'
        indices in the training set (B,))."""
        idx = torch.tensor([i for i, _ in self.sampler], device=self.device).view(-1, self.sampler.batch)
        views = self.gpu_batches(epoch) if self.gpu_batches is not None else (x for x, _ in self.loader)
        for x, i in zip(views, idx):  # x: a tensor, or a list or tuple of views
            x = [v.to(self.device, non_blocking=True, memory_format=self.fmt)
                 for v in (x if isinstance(x, (list, tuple)) else [x])]
            yield tuple(x) if len(x) > 1 else x[0], i

    def restore(self, state):
        """Load the checkpoint into `state` (name -> module, optimizer or scaler) -> (epoch, position, step). Every
        entry is checked whole first: a missing one or a wrong shape stops the run in one line that names it."""
        if self.ckpt is None:
            rank0_decides(self.open_log, self.ctrl)
            return 0, 0, 0
        for name, obj in state.items():
            if name not in self.ckpt:  # a gradient scaler added later (dim.py's prior_scaler); the rest: STATE_NEEDS
                continue
            wrong = mismatch(obj, self.ckpt[name])
            try:
                if wrong:
                    raise ValueError(wrong)
                obj.load_state_dict(self.ckpt[name])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.src} does not match these settings ({name}): {str(e).splitlines()[0]}")
        if not set_rng_state(self.ckpt["rng"], self.device):
            self.log(f"note: {self.src} was saved by another number of processes: the ranks beyond its own go on "
                     "from their current random state (the data order and augmentations do not depend on it)")
        rank0_decides(self.open_log, self.ctrl)
        self.log(f"resumed from {self.src} at epoch {self.ckpt['epoch']} step {self.ckpt['step']}")
        return self.ckpt["epoch"], self.ckpt["step_in_epoch"], self.ckpt["step"]

    def save(self, state, epoch, pos, step, final=False):
        """Write the checkpoint of `step` as OUT/ckpt.pt, the kept one before it moved to OUT/ckpt.pt.prev; the next
        step's loss decides (confirm()), or the run's end (final=True). A stop leaves the decision to the resumed run's
        first step (hold())."""
        rngs = rng_states(self.device)  # every rank's, so that a resumed run draws what an uninterrupted one would
        if not all_finite([v.state_dict() for v in state.values()]):
            raise UserError(self.diverged(f"a weight or statistic is not finite after step {step}"))
        if self.rank == 0:
            save_checkpoint({"algo": self.algo, **{k: v.state_dict() for k, v in state.items()}, "epoch": epoch,
                             "step_in_epoch": pos, "step": step, "rng": rngs, "args": dataclasses.asdict(self.args),
                             "n_train": self.sampler.n, "time_s": self.elapsed(), "prev_step": self.kept},
                            self.path, None if self.pending is not None else self.path + ".prev")
        self.mark(self.kept, step)
        if final:
            self.confirm()

    def hold(self):
        """At a stop: the checkpoint awaiting its next step stays so, for the resumed run's first step to decide;
        but the first of an --overwrite run takes over at once (its args.json and metrics.jsonl with it)."""
        if self.pending is not None and any(p.endswith(".new") for p in self.files.values()):
            self.confirm()

    def confirm(self, loss=None, step=None):
        """The checkpoint awaiting its next step is kept if that step's loss is finite on every rank."""
        if loss is not None:
            x = loss.detach().float().reshape(1).clone()
            if self.world > 1:
                dist.all_reduce(x)
            if not math.isfinite(x.item()):
                raise UserError(self.diverged(f"loss is {x.item()} at step {step}"))
        if self.rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path + ".prev")
            for name, path in self.files.items():  # --overwrite: the new run's files take over
                if path.endswith(".new"):
                    move(path, path.removesuffix(".new"))
                    self.files[name] = path.removesuffix(".new")
        self.mark(self.pending)

    def diverged(self, what):
        """-> the one line of a diverged run, after putting back the last kept checkpoint."""
        if self.pending is not None:  # the checkpoint no finite step followed goes
            if self.rank == 0 and os.path.exists(self.path + ".prev"):
                move(self.path + ".prev", self.path)
            elif self.rank == 0:
                os.remove(self.path)
            self.mark(self.kept)
        if self.kept is None:  # (--resume PATH into another folder: PATH is as it was; --overwrite: the old run is)
            where = f"; {STOP['kept']}" if self.ckpt else f"; {self.path} is the earlier run's" if os.path.exists(
                self.path) else ""
            return (f"{what}: stopped; no checkpoint of this run is kept (none was followed by a finite step){where}: "
                    f"start again with {self.nan_hint}")
        return (f"{what}: stopped; {self.path} holds step {self.kept}, the last checkpoint a finite step followed: go "
                f"on with --resume auto and {self.nan_hint}, or without --amp")

    def fit(self, step_fn, state, start, metrics, lr_of, knn_encoder, knn_name="", nan_hint="a lower --lr"):
        """The step loop from start = (epoch, position in it, step): step_fn(batch, the images' indices) -> a tensor
        of the `metrics` (name -> format, None = JSON only), summed on the device and read back only when a line is
        logged; lr_of(epoch) sets and returns the epoch's lr; `state` is what the checkpoints hold. A checkpoint at
        every epoch's end (before the kNN monitor), every --save-every steps, at the end, and at a stop signal."""
        args, (epoch, pos, step) = self.args, start
        per_epoch, self.nan_hint = self.sampler.steps(), nan_hint
        total = min(args.max_steps or math.inf, args.epochs * per_epoch)
        self.t_start, self.first, self.last, self.total, knn, done0 = time.perf_counter(), None, None, total, None, step
        self.elapsed = lambda: (self.ckpt or {}).get("time_s", 0.0) + time.perf_counter() - self.t_start
        self.eta = lambda s: (time.perf_counter() - self.t_start) / max(1, s - done0) * (total - s)
        final_knn = step >= total and args.knn_every and not rank0_decides(lambda: knn_logged(self.files, step),
                                                                            self.ctrl)
        if step >= total and not final_knn:  # a final kNN pass cut short by a stop is still to do
            self.log(f"nothing to do: {self.src} is at step {step}, where this run ends (--epochs {args.epochs}, "
                     f"--max-steps {args.max_steps}); give more to train on")
            write_status(f"finished: {step} steps")
            return self.close()
        with StopOnSignals(self.world, self.ctrl) as stop:
            while step < total and epoch < args.epochs:
                pos, step = self.steps(step_fn, state, metrics, lr_of(epoch), (epoch, pos, step), total, stop)
                ended = pos == per_epoch
                epoch, pos = (epoch + 1, 0) if ended else (epoch, pos)
                monitor = ended and args.knn_every and epoch % args.knn_every == 0
                stopping = stop.now or monitor and stop.agreed(wait=True)  # no kNN pass once a rank is signalled
                self.save(state, epoch, pos, step, final=not stopping and (step >= total or epoch >= args.epochs))
                if stopping:
                    stop.settle()
                    self.stopped(step)
                if monitor:
                    knn = self.knn(knn_encoder, knn_name, f"epoch {epoch}", step, epoch)
            if args.knn_every and knn is None:  # stopped by --max-steps before any epoch ended, or a resumed run
                knn = self.knn(knn_encoder, knn_name, f"step {step}", step, epoch + pos / per_epoch)  # cut in it
        STOP["raise"] = None  # the run is done: a signal from here on changes nothing
        loss_txt = "n/a" if self.first is None else f"{self.first:.4f} -> {self.last:.4f}"
        self.log(f"done: {step} steps in {fmt_time(time.perf_counter() - self.t_start)}, loss {loss_txt}, kNN top-1"
                 f"{knn_name} {'off' if knn is None else f'{knn:.2f}'}, checkpoint {self.path}")
        write_status(f"finished: {step} steps, kNN top-1{knn_name} {'off' if knn is None else f'{knn:.2f}'}")
        self.close()

    def steps(self, step_fn, state, metrics, lr, at, total, stop):
        """The steps of one epoch from `at` = (epoch, position, step) until its end, `total` or an agreed stop ->
        (position, step)."""
        (epoch, pos, step), per_epoch = at, self.sampler.steps()
        for m in state.values():  # the kNN monitor left the encoder in eval()
            if isinstance(m, nn.Module):
                m.train()
        self.sampler.epoch, self.sampler.skip = epoch, pos
        it = self.batches(epoch)
        t_last, wait, seen, sums = time.perf_counter(), 0.0, 0, None
        while pos < per_epoch and step < total and not stop.now:
            t0 = time.perf_counter()
            batch, idx = next(it)
            wait += time.perf_counter() - t0
            if stop.before is not None:  # this run's first batch: a signal while it loaded leaves no step to save
                if STOP["signal"] is not None and self.world == 1:
                    raise Preempted(stop.before)
                stop.before = None
            vals = step_fn(batch, idx)  # (len(metrics),), detached, on the device
            step, pos, seen, sums = step + 1, pos + 1, seen + 1, vals if sums is None else sums + vals
            if self.pending is not None:  # the step after a checkpoint: its loss decides whether it is kept
                self.confirm(vals[0], step)
            stopping, saving = stop.agreed(), self.args.save_every and step % self.args.save_every == 0
            if stopping or saving or step % self.args.log_every == 0 or pos == per_epoch or step == total:
                self.report(metrics, sums / seen, seen, time.perf_counter() - t_last, wait, epoch, pos, step, lr)
                t_last, wait, seen, sums = time.perf_counter(), 0.0, 0, None
            if saving and not stopping and pos < per_epoch and step < total:  # a stop and an epoch's end save after
                self.save(state, epoch, pos, step)
        return pos, step

    def report(self, metrics, means, seen, dt, wait, epoch, pos, step, lr):
        """One log line of the means over the last `seen` steps (over all ranks), and its JSON object."""
        if self.world > 1:  # the mean over all ranks, not rank 0's share
            dist.all_reduce(means)
            means /= self.world
        m = dict(zip(metrics, means.tolist()))
        if not math.isfinite(m["loss"]):
            raise UserError(self.diverged(f"loss is {m['loss']} at step {step}"))
        self.first, self.last = self.first if self.first is not None else m["loss"], m["loss"]
        shown = " ".join(f"{k} {v:{metrics[k]}}" for k, v in m.items() if metrics[k])
        img_s, bad = seen * self.args.batch_size / dt, count_lines(self.bad_log) if self.rank == 0 else 0
        if bad:
            m["bad_images"] = bad
        self.log(f"epoch {epoch + 1}/{self.args.epochs} step {step}/{self.total} {shown} lr {lr:.4g} img/s {img_s:.0f} "
                 f"data {100 * wait / dt:.0f}% eta {fmt_time(self.eta(step))}"
                 + (f" | {bad} unreadable image(s) replaced: {self.bad_log}" if bad else ""), step=step,
                 epoch=epoch + pos / self.sampler.steps(), **m, lr=lr, img_s=img_s, data_wait=wait / dt,
                 time_s=self.elapsed())

    def stopped(self, step):
        """After the checkpoint of `step`: one line, and out with PREEMPTED (0 under torchrun)."""
        code = "0: torchrun restarts workers that exit otherwise" if "TORCHELASTIC_RUN_ID" in os.environ \
            else PREEMPTED
        line = (f"stopped by {STOP['signal'] or 'a signal to another rank'} after step {step}: checkpoint "
                f"{self.path}; continue with --resume auto (exit status {code})")
        self.hold()
        self.log(line)
        write_status(line)
        self.close()
        raise Preempted("")

    def knn(self, encode, name, when, step, epoch):
        """The kNN monitor. The checkpoint is written before it: a stop signal during the pass keeps it and ends the
        run at once; --resume auto then runs a final pass that was cut short."""
        STOP["raise"] = "" if self.rank else (f"stopped by a signal during the kNN monitor after step {step}: "
                                              f"checkpoint {self.path}; continue with --resume auto")
        try:
            t0 = time.perf_counter()
            knn = knn_accuracy(encode, self.bank_set, self.knn_test, self.test_tf, self.args.workers, self.device)
        except Preempted:
            self.hold()
            raise
        finally:
            STOP["raise"] = None
        knn_s = time.perf_counter() - t0
        self.log(f"{when} kNN top-1{name} {knn:.2f} ({knn_s:.1f}s)", step=step, epoch=epoch, knn_top1=knn, knn_s=knn_s)
        return knn

    def close(self):
        release_lock()
        if self.tb is not None:
            self.tb.close()
        if self.world > 1:
            dist.destroy_process_group()


def rank0_decides(fn, group=None):
    """fn() on rank 0 -> its value on every rank; a one-line error it raises is raised on every rank, so that they
    all end at once instead of waiting for a collective that rank 0 never joins."""
    out = [None, None]
    if world_info()[0] == 0:
        try:
            out[0] = fn()
        except UserError as e:
            out[1] = str(e)
    if world_info()[1] > 1:
        dist.broadcast_object_list(out, src=0, group=group)
    if out[1] is not None:
        raise UserError(out[1])
    return out[0]


def take_lock(path):
    """One run per folder: `path` holds the host and PID of the run that uses it. Another live run's lock stops this
    one in one line; a dead run's (this host, its PID gone) is taken over."""
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                other_host, _, pid = open(path).read().partition(" ")
                if other_host == host and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
                    os.remove(path)  # a dead run's (or an earlier one of this process: a test)
                    continue
                raise UserError(f"--out {os.path.dirname(path)} is in use by another run (PID {pid or '?'} on "
                                f"{other_host or '?'}, {path}): wait for its end or choose another --out"
                                + ("" if other_host == host else "; delete the file if that run is dead"))
            continue  # removed meanwhile: try again
        with os.fdopen(fd, "w") as f:
            f.write(f"{host} {os.getpid()}")
        STOP["lock"] = path
        return
    raise UserError(f"cannot take the lock {path}: several runs are starting in --out {os.path.dirname(path)}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def release_lock():
    path, STOP["lock"] = STOP["lock"], None
    if path is not None and os.path.exists(path):
        with contextlib.suppress(OSError):
            if open(path).read() == f"{socket.gethostname()} {os.getpid()}":
                os.remove(path)


def write_status(text):
    """OUT/status (rank 0), one line a job script reads: its first word is running (also a run killed outright),
    finished, stopped, interrupted or failed."""
    if STOP["status"] and text:
        with contextlib.suppress(UserError):  # never hides what the run is ending with
            replace_file(STOP["status"], lambda f: f.write((text + "\n").encode()), "status")


def all_finite(obj):
    """Whether every floating-point tensor in a state dict (nested dicts and lists too) is finite."""
    flags = [t.isfinite().all().cpu() for t in tensors_of(obj) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for x in items for t in tensors_of(x)]


def mismatch(obj, saved):
    """'' if the saved state fits obj (a module or an optimizer) shape by shape, else the first difference."""
    if isinstance(obj, nn.Module):
        own = obj.state_dict()
        for k in sorted(set(own) ^ set(saved)):
            return f"{'missing' if k in own else 'unexpected'} key {k}"
        for k, v in own.items():
            if tuple(v.shape) != tuple(saved[k].shape):
                return f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here"
    elif isinstance(obj, torch.optim.Optimizer) and isinstance(saved, dict):
        params = [p for g in obj.param_groups for p in g["params"]]
        for i, st in saved.get("state", {}).items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() and i < len(params) and v.shape != params[i].shape:
                    return f"{k} of parameter {i} is {list(v.shape)} there, the parameter {list(params[i].shape)} here"
    return ""


def count_lines(path):
    if not path or not os.path.exists(path):
        return 0
    with open(path) as f:
        return len({line for line in f if line.strip()})


def knn_logged(files, step):
    """Whether metrics.jsonl holds the kNN monitor's result at `step` (a final pass cut by a stop does not)."""
    return any('"knn_top1"' in line and json.loads(line).get("step") == step
               for line in lines_upto(files["metrics.jsonl"], step))


def tensorboard_writer(out, purge_step):
    """--tensorboard: a SummaryWriter on OUT/tb (imported on this path only). TensorBoard's reader drops the events
    of earlier runs in OUT/tb at purge_step and later: a resumed run's curves go on without repeated steps, a fresh
    run's (purge_step 0) start clean."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(out, "tb"), purge_step=purge_step, flush_secs=30)


def lines_upto(path, step):
    """The lines of a metrics.jsonl up to `step` (a resumed run logs the later ones again); [] without the file."""
    if not os.path.exists(path):
        return []
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a torn last line of a run killed mid-write
                pass
    return keep


def resumed_args(saved, given, src):
    """A resumed run's arguments: the checkpoint's, then the flags given again -> (Args, a note per changed flag).
    A change that would break the run (fixed_on_resume: the model's shape, the global batch, the data, the
    mechanism) stops it in one line. --overwrite is never taken from the checkpoint."""
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)}}
    old = resolve(Args(**saved))
    new = resolve(Args(**{**saved, "overwrite": False, **{k: v for k, v in given.items() if k != "preset"}}))
    if given.get("preset", old.preset) != old.preset:
        raise UserError(f"--preset {given['preset']}: {src} was trained with --preset {old.preset}; a resumed run keeps "
                        "its checkpoint's settings (change single flags, or start a new run with another --out)")
    fixed = [f"--{k.replace('_', '-')} {getattr(new, k)} (it has {getattr(old, k)})" for k in fixed_on_resume(old, new)]
    if fixed:
        raise UserError(f"{src} cannot go on with {', '.join(fixed)}: a resumed run keeps the model's shape, the global "
                        "batch and the data; start a new run with another --out")
    changed = [k for k in given if k not in ("preset", "resume", "out") and getattr(new, k) != getattr(old, k)]
    return new, [f"note: resumed with --{k.replace('_', '-')} {getattr(old, k)} -> {getattr(new, k)}" for k in changed]
# --- end shared: run ---


# ----------------------------------------------------------------------------------------------------
# Appendix D. What class Run asks of this script: the checks of its flags, its automatic values, its --gpu-aug
# preparation
# ----------------------------------------------------------------------------------------------------
def check_args(args, world, device):
    """Values that make no sense stop here, before any work, in one line (exit 2). The parser has checked the
    choices (--estimator, --critic, ...)."""
    for bad, msg in [
        (not (args.arch in ("basic32", "alex64") or args.arch.startswith("resnet") and hasattr(torchvision.models,
                                                                                                args.arch)),
         f"unknown --arch {args.arch!r}: basic32, alex64 or a torchvision ResNet name (resnet18, ...)"),
        (args.image_size < 8, f"--image-size {args.image_size} must be >= 8 (0 = the encoder's)"),
        (args.arch == "basic32" and args.image_size % 8 or args.arch == "alex64" and args.image_size != 64,
         f"--arch {args.arch} needs --image-size {64 if args.arch == 'alex64' else 'a multiple of 8'}"),
        (not all(0 <= w < math.inf for w in (args.alpha, args.beta, args.gamma)) or args.alpha + args.beta == 0,
         "--alpha, --beta, --gamma must be >= 0, with --alpha or --beta > 0 (no MI objective)"),
        (not 0 < args.lr < math.inf, f"--lr {args.lr} must be > 0"),
        (args.batch_size < 2, "--batch-size must be at least 2 (the negatives come from the other images)"),
        (args.epochs < 1, f"--epochs {args.epochs} must be >= 1"),
        (not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1), "--beta1 and --beta2 must be in [0, 1)"),
        (not 0 <= args.wd < math.inf, f"--wd {args.wd} must be >= 0"),
        (not 0 <= args.prior_gp < math.inf, f"--prior-gp {args.prior_gp} must be >= 0"),
        (min(args.y_dim, args.mi_units) < 1, "--y-dim and --mi-units must be >= 1"),
        (args.local_samples < 0, f"--local-samples {args.local_samples} must be >= 0 (0 = all locations)"),
        (args.workers < 0, f"--workers {args.workers} must be >= 0"),
        (args.log_every < 1, f"--log-every {args.log_every} must be >= 1"),
        (min(args.max_steps, args.save_every, args.knn_every, args.holdout_every) < 0,
         "--max-steps, --save-every, --knn-every and --holdout-every must be >= 0"),
        (args.batch_size % world or args.batch_size // world < 2,  # needs the number of processes
         f"--batch-size {args.batch_size} (global) cannot be split into {world} processes' shares of 2 or more images"),
    ]:
        if bad:
            raise UserError(msg)


STATE_NEEDS = ("model", "prior", "optimizer", "prior_optimizer")  # the entries of ckpt.pt that train() restores
# (beside the gradient scalers)

# What a resumed run cannot change: the model's shape (the encoder, its input size, the critics: which objectives
# have a weight), the batch (the data order and the step count depend on it) and the data set
RESUME_FIXED = ("arch", "image_size", "y_dim", "mi_units", "critic", "global_critic", "global_layer", "batch_size",
                "dataset")


def fixed_on_resume(old, new):
    return [k for k in RESUME_FIXED if getattr(old, k) != getattr(new, k)] + \
        [k for k in ("alpha", "beta") if (getattr(old, k) > 0) != (getattr(new, k) > 0)]


def resolve(args):
    """Fill in the automatic values, so that args.json and the checkpoint hold the numbers actually used."""
    size = args.image_size or (64 if args.arch == "alex64" else 32)
    # NOTE(deviation): the paper augments STL-10 only (random 64x64 crops + flips, Sec. 4); auto crops and flips
    # every input of 64 px or more (STL-10, Tiny ImageNet, image folders), and nothing smaller (CIFAR, MNIST)
    aug = args.aug if args.aug != "auto" else ("crop" if size >= 64 else "none")
    return dataclasses.replace(args, image_size=size, aug=aug)


def batch_prepare(gpu_aug, args, stats, device):
    """The --gpu-aug twin of transforms(): gpu_aug.BatchPrepare, one view per image."""
    return gpu_aug.BatchPrepare(args.image_size, args.aug, MEAN_STD[stats]), 1


if __name__ == "__main__":
    main()
