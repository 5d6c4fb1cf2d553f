"""Momentum Contrast (MoCo v1 and v2) in one file: CPU, one GPU, or many GPUs with torchrun.

Papers: He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020, arXiv 1911.05722v3 (MoCo v1). Chen, Fan, Girshick, He, "Improved Baselines with
Momentum Contrastive Learning", arXiv 2003.04297v1 (MoCo v2). The official code (facebookresearch/moco,
moco/builder.py, main_moco.py, colab/moco_cifar10_demo.ipynb) is followed exactly where the presets say so;
every deviation is marked NOTE(deviation) and listed in docs/moco.md.

Results: README.md and docs/experiments.md (measured numbers with date, hardware, command and seeds); how to run
it: docs/moco.md, docs/distributed.md.

Commands
    python moco.py                                   # built-in data (Fashion-MNIST test split), CPU-sized
    python moco.py --data ~/imagenet --preset v2     # image folder, the official v2 recipe
    python moco.py --dataset cifar10 --data ~/cifar --preset cifar --amp   # the official CIFAR-10 notebook
    torchrun --nproc_per_node=8 moco.py --data ~/imagenet --preset v2   # the same 8 BN groups of 32 images
    python moco.py --resume auto                     # continue the run in --out (also after a stop signal)
    python moco.py --mechanism end-to-end            # MoCo's rivals (Sec. 3.2, Fig. 3): keys = the batch,
    python moco.py --mechanism memory-bank --epochs 5   # or a memory bank (Wu et al. 2018)
    python moco.py --shuffle-bn off                  # the batch-statistics leak of Appendix A.9
    python eval_linear.py --pretrained runs/moco/ckpt.pt
    python convert.py runs/moco/ckpt.pt r18.pth      # a torchvision state dict (detectron2: .pkl)

Reading order: 1 arguments and presets, 2 the algorithm core (InfoNCE, the queue, the momentum encoder,
shuffle-BN: copy this section alone into your code), 3 the paper's two rival mechanisms, 4 encoders, 5 the
training loop; the appendices hold the plumbing shared with dim.py (data, kNN monitor, checkpoints, signals).

Deliberately left out: MoCo v3 (no queue, ViT), LARS, an online linear probe.
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
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter


# ----------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------
def arg(default, help, choices=None):
    """A flag: its default, its --help text and, for a choice, the values the parser accepts."""
    return field(default=default, metadata={"help": help, "choices": choices})


DATASETS = ("folder", "cifar10", "cifar100", "stl10", "fashionmnist", "mnist")


@dataclass
class Args:
    # shared with dim.py
    data: str = arg("", "image folder or torchvision root; empty = built-in Fashion-MNIST (data/)")
    dataset: str = arg("folder", "an image folder, or a torchvision data set stored at --data", DATASETS)
    download: bool = arg(False, "let torchvision download --dataset into --data")
    out: str = arg("runs/moco", "output folder: args.json, metrics.jsonl, ckpt.pt")
    epochs: int = arg(200, "training epochs")
    batch_size: int = arg(256, "global batch (all ranks together), as the official -b")
    lr: float = arg(0.03, "base learning rate for the global batch (not rescaled by world size)")
    workers: int = arg(4, "data loader processes per rank (at most the CPUs the process may use)")
    device: str = arg("auto", "auto = cuda if a GPU is visible", ("auto", "cpu", "cuda"))
    seed: int = arg(0, "random seed")
    resume: str = arg("", "checkpoint to continue from, or 'auto' for OUT/ckpt.pt if it exists")
    max_steps: int = arg(0, "stop after this many global optimisation steps (0 = no limit)")
    save_every: int = arg(0, "also save a checkpoint every N steps (0 = end of epoch and end of run only)")
    log_every: int = arg(10, "log every N steps")
    tensorboard: bool = arg(False, "also write every value of metrics.jsonl to TensorBoard event files in OUT/tb, for "
                                   "watching and comparing runs live (needs pip install tensorboard)")
    amp: bool = arg(False, "mixed precision: bf16 autocast (fp16 + a gradient scaler on GPUs without bf16) and TF32 "
                           "on CUDA; on a CPU bf16 autocast, fast only on CPUs with bf16 units")
    amp_dtype: str = arg("auto", "the autocast type of --amp; auto = bfloat16 where the device has it",
                         ("auto", "bfloat16", "float16"))
    compile: bool = arg(False, "torch.compile the two encoders")
    channels_last: str = arg("auto", "images and weights in channels-last memory order; auto = on a GPU",
                             ("auto", "on", "off"))
    knn_every: int = arg(1, "kNN monitor every N epochs (0 = off)")
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
    preset: str = arg("small", "a recipe the other flags override: small (ours: the built-in data on a CPU), v1 and v2 "
                               "(main_moco.py's MoCo v1/v2), cifar (the official CIFAR-10 notebook)",
                      ("small", "v1", "v2", "cifar"))
    # MoCo                                                # paper (v1): K=65536, m=0.999, T=0.07
    arch: str = arg("resnet50", "basic32 | a torchvision ResNet name (resnet18, resnet50, ...)")
    stem: str = arg("imagenet", "imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no max-pool",
                    ("imagenet", "cifar"))
    moco_dim: int = arg(128, "feature dimension")
    moco_k: int = arg(65536, "queue size K (any K >= global batch)")
    moco_m: float = arg(0.999, "key-encoder momentum m")
    moco_t: float = arg(0.07, "softmax temperature T")
    mlp: bool = arg(False, "v2: 2-layer MLP head")
    symmetric: bool = arg(False, "symmetric loss of the CIFAR notebook (both crops as queries)")
    bn_splits: int = arg(1, "batch-norm groups of the global batch (official: 8 GPUs), divided among the processes")
    bn: str = arg("shuffle", "shuffle: batch norm per group of the batch with the keys shuffled across the groups "
                             "(official); sync: SyncBatchNorm over the global batch of all GPUs (ignores --bn-splits)",
                  ("shuffle", "sync"))
    fused: str = arg("auto", "fused InfoNCE + enqueue from the moco_ext extension (csrc/); auto = where it is built, "
                             "if it times faster than the eager path at this run's shapes at start-up (the choice is "
                             "kept on resume; on or off pins it)", ("auto", "on", "off"))
    # the dictionary (paper Sec. 3.2, Fig. 3): the same InfoNCE and T for the three mechanisms
    mechanism: str = arg("moco", "moco: queue + momentum encoder; end-to-end: keys = the current batch, with "
                                 "gradients, K = global batch - 1; memory-bank: Wu et al. 2018, K from --moco-k",
                         ("moco", "end-to-end", "memory-bank"))
    shuffle_bn: str = arg("on", "shuffle the keys across batch-norm groups (Sec. 3.3); off = keys in the queries' "
                                "order, the leak of Appendix A.9 (moco and end-to-end)", ("on", "off"))
    bank_t: float = arg(0.5, "memory bank: entry <- normalise(t * entry + (1 - t) * q) after each step")
    # optimisation and augmentation
    momentum: float = arg(0.9, "SGD momentum")
    wd: float = arg(1e-4, "weight decay")
    schedule: str = arg("step", "learning-rate schedule, set once per epoch: step, cos (main_moco.py: epochs counted "
                                "from 0) or cos-notebook (the CIFAR notebook: from 1, its last epoch at lr 0)",
                        ("step", "cos", "cos-notebook"))
    milestones: str = arg("120,160", "epochs at which the step schedule multiplies the lr by 0.1")
    aug: str = arg("v1", "augmentation", ("v1", "v2", "cifar"))
    crop_min: float = arg(0.2, "smallest RandomResizedCrop scale")
    image_size: int = arg(224, "crop size")
    gpu_aug: str = arg("auto", "in-memory data (built-in, CIFAR, MNIST, STL-10) as uint8 on the device, augmented "
                               "there in batches (gpu_aug.py); auto = on a GPU, and on the CPU for images of at "
                               "most 64 px", ("auto", "on", "off"))


# The official ImageNet code has no kNN monitor. Ours encodes 1.33M images (train + val) per pass: measured
# here (CPU) 0.12 (ResNet-50) to 0.43 (ResNet-18) of an epoch's training time, ~0.26 by FLOPs, more when JPEG
# decoding bounds the forward-only pass on GPUs. So v1 and v2 run it every 10th epoch (~1-4% of the run), see docs/moco.md.
PRESETS = {
    # facebookresearch/moco main_moco.py defaults; bn_splits 8 = the official 8 GPUs' groups of 32 images
    "v1": dict(arch="resnet50", stem="imagenet", moco_dim=128, moco_k=65536, moco_m=0.999, moco_t=0.07,
               mlp=False, lr=0.03, momentum=0.9, wd=1e-4, schedule="step", milestones="120,160",
               epochs=200, batch_size=256, aug="v1", crop_min=0.2, image_size=224, bn_splits=8, knn_every=10),
    # Chen et al. 2020 (arXiv 2003.04297v1): v1 + --mlp --moco-t 0.2 --aug-plus --cos
    "v2": dict(arch="resnet50", stem="imagenet", moco_dim=128, moco_k=65536, moco_m=0.999, moco_t=0.2,
               mlp=True, lr=0.03, momentum=0.9, wd=1e-4, schedule="cos", milestones="120,160",
               epochs=200, batch_size=256, aug="v2", crop_min=0.2, image_size=224, bn_splits=8, knn_every=10),
    # the official CIFAR-10 notebook (colab/moco_cifar10_demo.ipynb)
    "cifar": dict(arch="resnet18", stem="cifar", moco_dim=128, moco_k=4096, moco_m=0.99, moco_t=0.1,
                  mlp=False, lr=0.06, momentum=0.9, wd=5e-4, schedule="cos-notebook", epochs=200, batch_size=512,
                  aug="cifar", crop_min=0.08, image_size=32, bn_splits=8, symmetric=False),
    # ours, for the built-in data on a CPU: the notebook recipe with DIM's small 32x32 encoder (cosine counted
    # from epoch 0 as main_moco.py)
    "small": dict(arch="basic32", stem="cifar", moco_dim=128, moco_k=4096, moco_m=0.99, moco_t=0.1,
                  mlp=False, lr=0.06, momentum=0.9, wd=5e-4, schedule="cos", epochs=5, batch_size=256,
                  aug="cifar", crop_min=0.2, image_size=32, bn_splits=8, workers=2),
}


# ----------------------------------------------------------------------------------------------------
# 2. The algorithm core: InfoNCE and the MoCo model (facebookresearch/moco moco/builder.py)
# ----------------------------------------------------------------------------------------------------
def infonce_logits(q, k, queue, T):
    """He et al. 2020 (arXiv 1911.05722v3), Eq. (1): logits [N, 1+K] of q against k+ (first) and the queue."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)  # (N, K)
    return torch.cat([l_pos, l_neg], dim=1) / T  # (N, 1+K)


def infonce_loss(q, k, queue, T):
    """-> per-row loss L_q = -log softmax(logits)[0] (N,) and n_beat (N,): queue logits above the positive."""
    logits = infonce_logits(q, k, queue, T)  # (N, 1+K)
    loss = F.cross_entropy(logits, logits.new_zeros(len(q), dtype=torch.long), reduction="none")  # (N,)
    return loss, (logits[:, 1:] > logits[:, :1]).sum(1)  # (N,), (N,)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Algorithm 1's enqueue + dequeue: keys (B, C) replace the oldest B columns of queue (C, K), from ptr (1,) on.
    NOTE(deviation): a wrap-around write, so any K >= B works (official: assert K % batch == 0). The pointer stays
    on the device: no host sync."""
    idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % queue.shape[1]  # (B,)
    queue.index_copy_(1, idx, keys.T.to(queue.dtype))
    ptr.copy_((ptr + keys.shape[0]) % queue.shape[1])


def accuracies(n_beat):
    """Top-1 and top-5 % of the pretext task from n_beat (N,): the negatives scored above each positive."""
    return (n_beat == 0).float().mean() * 100, (n_beat < 5).float().mean() * 100


def at_least_fp32(x):
    """Half-precision outputs (autocast) -> float32; float32 and float64 stay as they are, so a float64 model
    computes in float64 (how this code is checked against the official builder step by step)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def world_info():
    """(rank, number of processes): (0, 1) unless torch.distributed is initialised (torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


@torch.no_grad()
def concat_all_gather(x):
    """all_gather + cat (no gradient), the identity on one process."""
    rank, world = world_info()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def add_mlp(net):
    """v2's head, in place: fc -> Linear(d, d) + ReLU + fc (no BN), the official keys fc.0 / fc.2."""
    d = net.fc.weight.shape[1]
    net.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), net.fc)
    return net


def has_split_bn(net):
    """On one process, a permutation of the batch matters only when BN statistics are taken over groups of it."""
    return any(getattr(mod, "num_splits", 1) > 1 for mod in net.modules())


@torch.no_grad()
def batch_shuffle(x, enabled=True):
    """Shuffle-BN (Sec. 3.3): gather the key images of all ranks, permute them with one permutation broadcast
    from rank 0, hand each rank its slice -> (this rank's shuffled images, the inverse permutation), or (x, None)."""
    if not enabled:
        return x, None
    rank, world = world_info()
    x_all = concat_all_gather(x)  # (world*N, ...)
    idx = torch.randperm(x_all.shape[0], device=x.device)  # (world*N,)
    if world > 1:
        dist.broadcast(idx, src=0)
    n = x.shape[0]
    return x_all[idx[rank * n:(rank + 1) * n]], torch.argsort(idx)


class MoCo(nn.Module):
    """The official builder's model: same constructor, state-dict keys and forward, plus keyword options
    (symmetric loss, fused op, shuffle-BN off) whose defaults keep the official behaviour, and training_loss() +
    update_dictionary() for the training step, the interface of the two rival mechanisms below. forward() is the
    builder's asymmetric API and refuses symmetric=True, whose loss (the notebook's sum of both directions) only
    training_loss() computes."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, symmetric=False, fused=None,
                 shuffle_bn=True):
        super().__init__()
        self.K, self.m, self.T, self.symmetric, self.fused, self.shuffle_bn = K, m, T, symmetric, fused, shuffle_bn
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        if mlp:
            add_mlp(self.encoder_q)
            add_mlp(self.encoder_k)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data.copy_(pq.data)  # theta_k starts as theta_q, and gets no gradient
            pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # (C, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.split_bn = has_split_bn(self.encoder_k)

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        # Eq. (2): theta_k <- m * theta_k + (1 - m) * theta_q (parameters only; BN buffers are the key
        # encoder's own, official behaviour, facebookresearch/moco#70)
        pk = [p.data for p in self.encoder_k.parameters()]
        torch._foreach_mul_(pk, self.m)
        torch._foreach_add_(pk, [p.data for p in self.encoder_q.parameters()], alpha=1.0 - self.m)

    @torch.no_grad()
    def _batch_shuffle(self, x):
        """Shuffle-BN (Sec. 3.3): gather the key images of all ranks, permute them with one permutation
        broadcast from rank 0, hand each rank its slice. Skipped on one process without split BN, where a
        permutation of the batch changes no statistic, and with shuffle_bn=False (keys in the queries' order)."""
        return batch_shuffle(x, self.shuffle_bn and (world_info()[1] > 1 or self.split_bn))

    @torch.no_grad()
    def _batch_unshuffle(self, x, idx_unshuffle):
        if idx_unshuffle is None:
            return x
        rank, n = world_info()[0], x.shape[0]
        return concat_all_gather(x)[idx_unshuffle[rank * n:(rank + 1) * n]]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)  # (B_global, C)
        if self.fused is not None:
            return self.fused.enqueue_(self.queue, self.queue_ptr, keys.to(self.queue.dtype))
        enqueue(self.queue, self.queue_ptr, keys)

    def _query_and_key(self, im_q, im_k):
        """-> q (N, C) and the momentum encoder's k (N, C), both L2-normalised and at least fp32 under autocast."""
        q = F.normalize(at_least_fp32(self.encoder_q(im_q)), dim=1)  # (N, C)
        with torch.no_grad():
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(at_least_fp32(self.encoder_k(im_k)), dim=1)  # (N, C)
            return q, self._batch_unshuffle(k, idx_unshuffle)

    def forward(self, im_q, im_k):
        """Official: -> (logits [N, 1+K], labels [N] of zeros); the keys are enqueued before it returns, so the
        logits read a copy of the queue."""
        if self.symmetric:
            raise ValueError("MoCo(symmetric=True): forward() is the official asymmetric API; use training_loss()")
        with torch.no_grad():
            self._momentum_update_key_encoder()
        q, k = self._query_and_key(im_q, im_k)  # (N, C) each
        with torch.autocast(q.device.type, enabled=False):  # logits and softmax in fp32 under --amp
            logits = infonce_logits(q, k, self.queue.clone().detach(), self.T)  # (N, 1+K)
        self._dequeue_and_enqueue(k)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def training_loss(self, im_q, im_k):
        """The training step's loss: -> (mean L_q, top-1 and top-5 accuracy of the (K+1)-way task, keys (N', C)).
        The same values as forward() + cross-entropy (and the notebook's symmetric loss if so built), with the
        fused op if given, but the loss reads the queue itself, not a copy: the caller enqueues the returned keys
        with update_dictionary() after the backward pass."""
        with torch.no_grad():
            self._momentum_update_key_encoder()
        pairs = [(im_q, im_k), (im_k, im_q)] if self.symmetric else [(im_q, im_k)]
        losses, beats, keys = [], [], []
        for a, b in pairs:
            q, k = self._query_and_key(a, b)  # (N, C) each
            with torch.autocast(q.device.type, enabled=False):  # logits and softmax in fp32 under --amp
                if self.fused is not None:  # no (N, 1+K) logits in memory
                    loss, n_beat = self.fused.infonce_loss(q, k, self.queue, self.T)[:2]
                else:
                    loss, n_beat = infonce_loss(q, k, self.queue.detach(), self.T)
            losses.append(loss.mean())
            beats.append(n_beat)
            keys.append(k)
        n_beat = torch.cat(beats)
        # symmetric: enqueue [k1, k2] as the notebook does
        return (sum(losses), *accuracies(n_beat), torch.cat(keys[::-1]))

    def update_dictionary(self, keys):
        """Algorithm 1's enqueue(queue, k) + dequeue(queue), after the backward pass of training_loss()."""
        self._dequeue_and_enqueue(keys)


# ----------------------------------------------------------------------------------------------------
# 3. MoCo's two rivals (Sec. 3.2, Fig. 2): keys from the current batch (end-to-end) or from a memory bank
# ----------------------------------------------------------------------------------------------------
class GatherWithGrad(torch.autograd.Function):
    """all_gather + cat whose backward hands each rank the gradient of its own rows, summed over all ranks'
    losses: with DDP's mean over ranks, the gradient of the mean loss over the global batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return concat_all_gather(x)  # (world*N, ...)

    @staticmethod
    def backward(ctx, grad):
        rank, world = world_info()
        if world > 1:
            grad = grad.contiguous()
            dist.all_reduce(grad)
        return grad[rank * ctx.n:(rank + 1) * ctx.n]


class EndToEnd(nn.Module):
    """MoCo's first rival (Sec. 3.2, Fig. 2a): the dictionary is the current global batch, its keys encoded
    with gradients by the query encoder itself (the paper does not say whether the two encoders share weights;
    docs/moco.md, "The three mechanisms", says why they do here); query n's positive is key n, its K = B - 1
    negatives the other keys. Shuffle-BN as for MoCo (Sec. 3.3). No queue, no momentum encoder."""

    def __init__(self, base_encoder, dim=128, T=0.07, mlp=False, shuffle_bn=True):
        super().__init__()
        self.T, self.shuffle_bn = T, shuffle_bn
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            add_mlp(self.encoder_q)
        self.split_bn = has_split_bn(self.encoder_q)

    def keys(self, im_k):
        """-> k (B, C): the keys of the whole global batch in its order, gradients flowing to the rank that
        encoded each (shuffled first when shuffle-BN is on)."""
        im_k, idx_unshuffle = batch_shuffle(im_k, self.shuffle_bn and (world_info()[1] > 1 or self.split_bn))
        k = F.normalize(at_least_fp32(self.encoder_q(im_k)), dim=1)  # (N, C)
        k = GatherWithGrad.apply(k) if world_info()[1] > 1 else k  # (B, C)
        return k if idx_unshuffle is None else k[idx_unshuffle]

    def training_loss(self, im_q, im_k):
        """-> (mean L_q, top-1, top-5, None): Eq. (1) with the batch as the dictionary."""
        q = F.normalize(at_least_fp32(self.encoder_q(im_q)), dim=1)  # (N, C)
        k = self.keys(im_k)  # (B, C), B = world * N
        with torch.autocast(q.device.type, enabled=False):
            logits = q @ k.T / self.T  # (N, B)
            pos = world_info()[0] * len(q) + torch.arange(len(q), device=q.device)  # (N,) this rank's keys
            loss = F.cross_entropy(logits, pos)  # = Eq. (1) with the positive first and the B - 1 others after
        n_beat = (logits > logits.gather(1, pos[:, None])).sum(1)  # (N,)
        return (loss, *accuracies(n_beat), None)

    def update_dictionary(self, _):
        """Nothing to do: the next batch is the next dictionary."""


class MemoryBank(nn.Module):
    """MoCo's second rival (Sec. 3.2, Fig. 2b; Wu et al. 2018, arXiv 1805.01978): one L2-normalised feature
    per training image, initialised as random unit vectors (Wu et al. Sec. 3.1). Query n's positive is its own
    image's entry, written at the image's last visit; K negatives are drawn uniformly from the bank each step,
    the same for the whole batch (negatives()); no gradient reaches the bank; after the step each entry of the batch becomes
    normalise(t * entry + (1 - t) * q) (lemniscate.pytorch, lib/NCEAverage.py, t = 0.5). One crop per image, no
    momentum encoder, no shuffle-BN (nothing is encoded for the keys). Identical on every rank by construction."""

    def __init__(self, base_encoder, n_images, dim=128, K=4096, T=0.07, mlp=False, t=0.5, fused=None):
        super().__init__()
        self.K, self.T, self.t, self.fused = K, T, t, fused
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            add_mlp(self.encoder_q)
        self.register_buffer("bank", F.normalize(torch.randn(dim, n_images), dim=0))  # (C, N_images)

    @torch.no_grad()
    def negatives(self, idx_all):
        """K bank indices (K,) drawn uniformly, with replacement, from the images outside the global batch
        idx_all (B,), drawn by rank 0 and broadcast. NOTE(deviation): lemniscate also draws the batch's own
        entries, so a query can meet its positive among its negatives (1 - (1 - 1/N)^K of them do: 24% at K 16384
        and 60,000 images); leaving the batch out removes that without changing the distribution of the others."""
        B = len(idx_all)
        # NOTE(deviation): one draw of K for the whole batch; lemniscate draws K per query, whose gathered negatives
        # (N, K, C) would take 2 GB at N 256, K 16384, C 128 (and a batched product), against (C, K) once here
        r = torch.randint(self.bank.shape[1] - B, (self.K,), device=idx_all.device)  # (K,) ranks among the rest
        taken = idx_all.sort().values - torch.arange(B, device=idx_all.device)  # (B,) nondecreasing
        neg = r + torch.searchsorted(taken, r, right=True)  # (K,) the r-th index not in the batch
        if world_info()[1] > 1:
            dist.broadcast(neg, src=0)
        return neg

    def training_loss(self, im_q, idx):
        """-> (mean L_q, top-1, top-5, (q, idx) for update_dictionary()): Eq. (1) with the bank's entry of each
        image as its positive and K entries of other images as negatives; idx (N,) are this rank's image indices."""
        q = F.normalize(at_least_fp32(self.encoder_q(im_q)), dim=1)  # (N, C)
        neg = self.negatives(concat_all_gather(idx))  # (K,)
        k, negatives = self.bank[:, idx].T, self.bank[:, neg]  # (N, C), (C, K): buffers, no gradient
        with torch.autocast(q.device.type, enabled=False):
            if self.fused is not None:
                loss, n_beat = self.fused.infonce_loss(q, k.to(q.dtype), negatives.to(q.dtype), self.T)[:2]
            else:
                loss, n_beat = infonce_loss(q, k.to(q.dtype), negatives.to(q.dtype), self.T)
        return (loss.mean(), *accuracies(n_beat), (q.detach(), idx))

    @torch.no_grad()
    def update_dictionary(self, pending):
        """After the optimiser step: entry <- normalise(t * entry + (1 - t) * q) for every image of the global batch."""
        q, idx = (concat_all_gather(x) for x in pending)  # (B, C), (B,)
        v = self.t * self.bank[:, idx] + (1 - self.t) * q.T.to(self.bank.dtype)  # (C, B)
        self.bank.index_copy_(1, idx, F.normalize(v, dim=0))


# ----------------------------------------------------------------------------------------------------
# 4. Encoders: ResNets with split batch norm (the CIFAR notebook), and DIM's 32x32 encoder
# ----------------------------------------------------------------------------------------------------
class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are computed separately over `num_splits` groups of the batch
    (the CIFAR notebook's SplitBatchNorm): one device behaves like num_splits GPUs for shuffle-BN. Group s is
    the contiguous slice s*N/S .. (s+1)*N/S - 1, the slice rank s holds under torchrun, so 1 process with S
    splits and S processes train the same model. NOTE(deviation): the notebook interleaves (sample n*S+s in
    group s); on a randomly ordered batch both give the same distribution of groups.
    Works for [N, C] and [N, C, H, W]; running statistics are the average over the groups."""

    def __init__(self, num_features, num_splits=1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        S, N = self.num_splits, x.shape[0]
        if not self.training or S == 1:
            return super().forward(x)
        if N % S or N // S < 2:
            raise ValueError(f"batch of {N} cannot be split into {S} batch-norm groups of 2 or more images")
        # statistics and normalisation in float32 also under autocast (as BatchNorm2d's kernels), output in x's type
        with torch.autocast(x.device.type, enabled=False):
            xs = x.unflatten(0, (S, N // S))  # (S, N/S, C, ...), a view in any memory format
            xs = xs.float() if xs.dtype in (torch.float16, torch.bfloat16) else xs
            dims = [1] + list(range(3, xs.dim()))  # all but the group and the channel
            var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)  # (S, 1, C, 1, ...) each
            shape = [1, 1, -1] + [1] * (xs.dim() - 3)
            scale = torch.rsqrt(var + self.eps) * self.weight.view(shape)  # (S, 1, C, 1, ...)
            y = (xs - mean) * scale + self.bias.view(shape)  # (S, N/S, C, ...)
        with torch.no_grad():  # running statistics: the average over the groups (unbiased variance, as BN)
            n = xs[0].numel() // xs.shape[2]  # values per channel in one group
            self.running_mean.lerp_(mean.reshape(S, -1).mean(0).to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var.reshape(S, -1).mean(0) * (n / (n - 1))).to(self.running_var.dtype),
                                   self.momentum)
            self.num_batches_tracked.add_(1)
        return y.flatten(0, 1).to(x.dtype)  # (N, C, ...)


class Basic32(nn.Module):
    """DIM's 32x32 encoder (Hjelm et al. 2019, rdevon/DIM configs/convnets.py basic32x32): three 4x4/2 convs
    64-128-256 with BN+ReLU, FC 1024 with BN+ReLU, then `fc` (the head, as in torchvision ResNets)."""

    def __init__(self, num_classes=128, norm_layer=nn.BatchNorm2d):
        super().__init__()
        norm1d = nn.BatchNorm1d if norm_layer is nn.BatchNorm2d else norm_layer  # SplitBatchNorm takes 2D too

        def block(i, o):
            return [nn.Conv2d(i, o, 4, 2, 1, bias=False), norm_layer(o), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*block(3, 64), *block(64, 128), *block(128, 256), nn.AdaptiveAvgPool2d(4),
                                      nn.Flatten(), nn.Linear(256 * 16, 1024, bias=False), norm1d(1024),
                                      nn.ReLU(inplace=True))
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))  # (N, num_classes)


def build_encoder(arch, stem="imagenet", bn_splits=1, sync=False, num_classes=128):
    """base_encoder(num_classes) as in the official builder, with the notebook's CIFAR stem and split BN (or
    SyncBatchNorm: batch norm over the global batch of all processes)."""
    norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    if arch == "basic32":
        net = Basic32(num_classes, norm_layer=norm)
    elif arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(torchvision.models, arch):
        net = getattr(torchvision.models, arch)(num_classes=num_classes, norm_layer=norm)
        if stem == "cifar":  # the notebook: 3x3 stride-1 first conv and no max-pool
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
    else:
        raise ValueError(f"unknown arch {arch!r}: basic32 or a torchvision ResNet name")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync else net


# ----------------------------------------------------------------------------------------------------
# 5. Training: one step, the model, train() on class Run (the plumbing shared with dim.py, Appendix C), main
# ----------------------------------------------------------------------------------------------------
class TrainingLoss(nn.Module):
    """DDP synchronises gradients through a module's forward: this one's forward is the model's training_loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model.training_loss(*inputs)


def train_step(net, model, opt, scaler, inputs, amp_dtype):
    """One SGD step of Algorithm 1 on the two views (B, 3, S, S) (the memory bank: one view and the images'
    indices) -> (loss, acc1, acc5), detached."""
    with torch.autocast(inputs[0].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, acc1, acc5, pending = net(*inputs)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    model.update_dictionary(pending)  # after the backward pass, which read the dictionary as it was in the forward
    return torch.stack([loss.detach(), acc1, acc5])


def build_model(args, n_images, world, fused):
    """The --mechanism's model: MoCo, or one of its two rivals with the same encoder, head, InfoNCE and T."""
    # --bn-splits counts the groups of the global batch (the official run: 8 GPUs); each rank holds its share
    sync = args.bn == "sync"
    base = partial(build_encoder, args.arch, args.stem, 1 if sync else args.bn_splits // world, sync)
    shuffle = args.shuffle_bn == "on"
    if args.mechanism == "end-to-end":
        return EndToEnd(base, args.moco_dim, args.moco_t, args.mlp, shuffle)
    if args.mechanism == "memory-bank":
        return MemoryBank(base, n_images, args.moco_dim, args.moco_k, args.moco_t, args.mlp, args.bank_t, fused)
    return MoCo(base, args.moco_dim, args.moco_k, args.moco_m, args.moco_t, args.mlp, args.symmetric, fused, shuffle)


def train(argv=None):
    run = Run(argv, "moco")
    args, device, world = run.args, run.device, run.world
    run.data()
    if args.mechanism == "memory-bank" and args.batch_size >= run.sampler.n:
        raise UserError(f"--mechanism memory-bank draws its negatives from the images outside the batch: "
                        f"--batch-size {args.batch_size} leaves none of the {run.sampler.n}")
    if args.bn == "sync":
        run.log(f"note: --bn sync: batch norm over the global batch of {world} process(es)"
                + (f"; --bn-splits {args.bn_splits} is ignored" if args.bn_splits > 1 else "")
                + ("; on one process the keys' statistics include their positives (no shuffle-BN)" if world == 1 else ""))
    fused = load_fused(args.fused, device, run.log) if args.mechanism != "end-to-end" else None
    if args.fused == "auto" and args.mechanism != "end-to-end":
        fused = choose_fused(fused, run)
    model = build_model(args, run.sampler.n, world, fused).to(device, memory_format=run.fmt)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                          momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    state = {"model": model, "optimizer": opt, "scaler": scaler}  # what ckpt.pt holds, beside epoch, step, rng, args
    start = run.restore(state)  # (epoch, step in it, step): zeros for a fresh run
    if args.compile:
        for name in ("encoder_q", "encoder_k"):
            if hasattr(model, name):
                getattr(model, name).compile()
    net = TrainingLoss(model)
    if world > 1:  # rank 0's initial queue (bank) on every rank; identical from then on by construction, so DDP
        dictionary = [n for n in ("queue", "queue_ptr", "bank") if hasattr(model, n)]  # must not re-broadcast it
        for name in dictionary:  # (33.5 MB at K = 65536) at every forward
            dist.broadcast(getattr(model, name), 0)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            net, [f"model.{n}" for n in dictionary])
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    bank = args.mechanism == "memory-bank"
    # the kNN monitor reads encoder_q's normalised output, its 128-d head, as the notebook (eval_linear.py's kNN
    # reads the backbone below the head: another number for the same checkpoint)
    run.fit(lambda views, idx: train_step(net, model, opt, scaler, (views, idx) if bank else views, run.amp_dtype),
            state, start, {"loss": ".4f", "acc1": ".1f", "acc5": ".1f"}, lambda epoch: adjust_lr(opt, epoch, args),
            model.encoder_q, " (head)")
    return model


def adjust_lr(opt, epoch, args):
    """main_moco.py: set once per epoch; cosine or x0.1 at each milestone. Epochs count from 0 (main_moco.py); the
    CIFAR notebook counts from 1, so its first epoch is already decayed and its last at lr 0 (cos-notebook)."""
    if args.schedule in ("cos", "cos-notebook"):
        lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch + (args.schedule == "cos-notebook")) / args.epochs))
    else:
        lr = args.lr * 0.1 ** sum(epoch >= int(m) for m in args.milestones.split(",") if m)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


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


class PILBlur:
    """v2 'aug+' blur: PIL GaussianBlur with radius ~ U[0.1, 2] (moco/loader.py), drawn from torch's RNG."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


class TwoCrops:
    def __init__(self, t):
        self.t = t

    def __call__(self, img):
        return self.t(img), self.t(img)


def test_transform(size, stats):
    """The plain view for kNN and evaluation: resize (and centre-crop 224 of 256 for large images)."""
    resize = [T.Resize(int(size / 0.875)), T.CenterCrop(size)] if size > 64 else [T.Resize(size), T.CenterCrop(size)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(*MEAN_STD[stats])])


def transforms(args, stats):
    """Training augmentation exactly as main_moco.py (v1, v2 'aug+') or the CIFAR notebook."""
    crop = T.RandomResizedCrop(args.image_size, scale=(args.crop_min, 1.0))
    aug = {
        "v1": [crop, T.RandomGrayscale(0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()],
        "v2": [crop, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
               T.RandomApply([PILBlur()], p=0.5), T.RandomHorizontalFlip()],
        "cifar": [crop, T.RandomHorizontalFlip(0.5), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                  T.RandomGrayscale(0.2)],
    }[args.aug]
    train = T.Compose(aug + [T.ToTensor(), T.Normalize(*MEAN_STD[stats])])
    one_view = args.mechanism == "memory-bank"  # its positive is the bank's entry, not a second view
    return train if one_view else TwoCrops(train), test_transform(args.image_size, stats)


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
# Appendix C. Utilities: device, checkpoints, RNG, arguments, and the run loop shared with dim.py
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
# augmentation; and the loader of the fused op (speed only: csrc/ and moco_ext/)
# ----------------------------------------------------------------------------------------------------
def check_args(args, world, device):
    """Values that make no sense stop here, before any work, in one line (exit 2). The parser has checked the
    choices (--aug, --mechanism, ...)."""
    keys, S = args.batch_size * (2 if args.symmetric else 1), 1 if args.bn == "sync" else max(args.bn_splits, 1)
    for bad, msg in [
        (not (args.arch == "basic32" or args.arch.startswith(("resnet", "wide_resnet", "resnext"))
              and hasattr(torchvision.models, args.arch)),
         f"unknown --arch {args.arch!r}: basic32 or a torchvision ResNet name (resnet18, resnet50, ...)"),
        (args.symmetric and args.mechanism != "moco", "--symmetric is for --mechanism moco"),
        (not 0 <= args.bank_t < 1, f"--bank-t {args.bank_t} must be in [0, 1)"),
        (not 0 <= args.moco_m <= 1, f"--moco-m {args.moco_m} must be in [0, 1] (1 = a frozen key encoder)"),
        (args.moco_k < 1, f"--moco-k {args.moco_k} must be >= 1"),
        (not 0 < args.moco_t < math.inf, f"--moco-t {args.moco_t} must be > 0"),
        (args.moco_dim < 1, f"--moco-dim {args.moco_dim} must be >= 1"),
        (not 0 < args.lr < math.inf, f"--lr {args.lr} must be > 0"),
        (args.batch_size < 2, f"--batch-size {args.batch_size} must be >= 2"),
        (args.epochs < 1, f"--epochs {args.epochs} must be >= 1"),
        (not 0 <= args.momentum < 1, f"--momentum {args.momentum} must be in [0, 1)"),
        (not 0 <= args.wd < math.inf, f"--wd {args.wd} must be >= 0"),
        (not 0 < args.crop_min <= 1, f"--crop-min {args.crop_min} must be in (0, 1]"),
        (args.image_size < 8, f"--image-size {args.image_size} must be >= 8"),
        (args.bn_splits < 1, f"--bn-splits {args.bn_splits} must be >= 1"),
        (args.workers < 0, f"--workers {args.workers} must be >= 0"),
        (args.log_every < 1, f"--log-every {args.log_every} must be >= 1"),
        (min(args.max_steps, args.save_every, args.knn_every, args.holdout_every) < 0,
         "--max-steps, --save-every, --knn-every and --holdout-every must be >= 0"),
        (not all(m.strip().isdigit() for m in args.milestones.split(",") if m.strip()),
         f"--milestones {args.milestones!r} must be epochs separated by commas, e.g. 120,160"),
        # the checks that need the number of processes or the device
        (args.bn == "sync" and world > 1 and device.type != "cuda",
         "--bn sync needs GPUs: SyncBatchNorm does not run on the CPU under torchrun"),
        (args.batch_size % world, f"--batch-size {args.batch_size} (global) is not divisible by the {world} processes"),
        (args.mechanism == "moco" and args.moco_k < keys,
         f"queue size --moco-k {args.moco_k} is smaller than the {keys} keys enqueued per step (global batch "
         f"{args.batch_size}{', x2 for --symmetric' if args.symmetric else ''})"),
        (S % world and args.bn != "sync", f"--bn-splits {args.bn_splits} (batch-norm groups of the global batch) is "
                                          f"not a multiple of the {world} processes; e.g. --bn-splits {world}"),
        (args.batch_size % S or args.batch_size // S < 2,
         f"--batch-size {args.batch_size} cannot be split into --bn-splits {args.bn_splits} batch-norm groups of 2 "
         "or more images"),
    ]:
        if bad:
            raise UserError(msg)


STATE_NEEDS = ("model", "optimizer")  # the entries of ckpt.pt that train() restores (beside a gradient scaler)

# What a resumed run cannot change: the model's shape, the global batch (the data order and the step count depend
# on it), the mechanism and the data set
RESUME_FIXED = ("arch", "stem", "moco_dim", "moco_k", "mlp", "mechanism", "batch_size", "dataset")


def fixed_on_resume(old, new):
    return [k for k in RESUME_FIXED if getattr(old, k) != getattr(new, k)]


def resolve(args):
    """moco.py has no automatic values to fill in (dim.py's image size and augmentation have)."""
    return args


def batch_prepare(gpu_aug, args, stats, device):
    """The --gpu-aug twin of transforms(): gpu_aug.BatchAugment, two views per image (the memory bank: one)."""
    last = args.channels_last == "on" or args.channels_last == "auto" and device.type == "cuda"
    return gpu_aug.moco_augment(args.aug, args.image_size, args.crop_min, MEAN_STD[stats],
                                channels_last=last), 1 if args.mechanism == "memory-bank" else 2


def load_fused(mode, device, log=print):
    """--fused: the moco_ext extension (csrc/: no (N, 1+K) logits in memory), or None for the pure-PyTorch path.
    auto: where the library is built (pip install -e .) and passes its trial launch here (choose_fused then times
    it against the eager path); on: always, built with ninja at the import if it is not installed."""
    if mode == "off":
        return None
    jit = os.environ.get("MOCO_EXT_JIT")
    try:
        if mode == "on":
            os.environ["MOCO_EXT_JIT"] = "1"  # read by the import below only
        import moco_ext
        reason = moco_ext.unusable_reason(device)  # no CUDA kernels, none for this GPU's architecture, a bad trial
        if reason:
            raise ImportError(reason)
        return moco_ext
    except Exception as e:
        if mode == "on":
            raise UserError(f"--fused on: cannot import or build moco_ext: {str(e).splitlines()[0]} (a resumed run "
                            "keeps its checkpoint's --fused, also where --fused auto chose it: give --fused off)")
        log(f"note: fused InfoNCE not available ({str(e).splitlines()[0]}); using the pure-PyTorch path")
        return None
    finally:
        if mode == "on" and jit is None:
            os.environ.pop("MOCO_EXT_JIT", None)
        elif mode == "on":
            os.environ["MOCO_EXT_JIT"] = jit


def choose_fused(fused, run):
    """--fused auto, as cuDNN's benchmark mode picks convolution algorithms: the fused op (None: not available) and
    this script's own eager path timed at this run's shapes, the faster taken. Rank 0 measures and decides, the
    others follow. The choice is written into the arguments (--fused on or off), so the checkpoint holds it and a
    resumed run keeps it (resume stays exact); --fused auto given again measures again. -> the op or None."""
    args, device = run.args, run.device
    N, C, K, T = args.batch_size // run.world, args.moco_dim, args.moco_k, args.moco_t
    keys = args.batch_size * (2 if args.symmetric else 1) if args.mechanism == "moco" else 0  # enqueued per step
    times = torch.zeros(2)  # (eager, fused) seconds per step
    if fused is not None and run.rank == 0:
        times = torch.tensor(time_infonce(fused, N, C, K, T, keys, device))
    choice = torch.tensor([float(fused is not None and times[1] < times[0])])
    if run.world > 1:  # a CPU tensor: gloo, or the control group beside NCCL
        dist.broadcast(choice, 0, group=run.ctrl)
    args.fused = "on" if choice.item() else "off"
    if fused is not None:
        where = f"{device.type}" + (f", TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
                                    if device.type == "cuda" else "")
        run.log(f"fused InfoNCE: {times[1] * 1e3:.3f} ms against eager {times[0] * 1e3:.3f} ms per step (forward, "
                f"backward{', enqueue' if keys else ''}; N {N}, C {C}, K {K}, float32, {where}): --fused "
                f"{args.fused}, kept on resume", step=run.ckpt["step"] if run.ckpt else 0,
                fused_ms=times[1].item() * 1e3, eager_ms=times[0].item() * 1e3, fused=args.fused)
    return fused if args.fused == "on" else None


def time_infonce(fused, N, C, K, T, keys, device, warmup=3, repeat=10):
    """-> (eager, fused) median seconds of one step's InfoNCE: the loss's forward and backward for N queries
    against K negatives of C dimensions (float32), then the enqueue of `keys` keys (0: none), this script's
    infonce_loss and enqueue against fused's; after `warmup` calls each, the two take turns, synchronised. The
    inputs come from a generator of their own: the run's random streams are left as they were."""
    g = torch.Generator(device).manual_seed(0)

    def unit(*shape, dim):
        return F.normalize(torch.randn(*shape, generator=g, device=device), dim=dim)
    q, k, queue = unit(N, C, dim=1).requires_grad_(), unit(N, C, dim=1), unit(C, K, dim=0)  # (N, C), (N, C), (C, K)
    new, ptr = unit(max(keys, 1), C, dim=1), torch.zeros(1, dtype=torch.long, device=device)  # (B, C), (1,)

    def step(loss_fn, enqueue_fn):
        loss_fn(q, k, queue, T)[0].mean().backward()
        if keys:
            enqueue_fn(queue, ptr, new)
    paths = [partial(step, infonce_loss, enqueue), partial(step, fused.infonce_loss, fused.enqueue_)]
    times = [[], []]
    for i in range(warmup + repeat):
        for path, t in zip(paths, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            path()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


if __name__ == "__main__":
    main()
