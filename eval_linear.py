"""Frozen-feature evaluation of moco.py, dim.py and official MoCo checkpoints: linear probe, MLP probe, kNN, fine-tuning.

The protocols in full, with every default and why: docs/evaluation.md. The kNN here reads --layer (for MoCo the
backbone, the encoder without its head), while moco.py's kNN monitor reads the 128-d head: two numbers for one
checkpoint, both printed with what they read.

- `--protocol main_lincls`: facebookresearch/moco main_lincls.py's linear classification, exactly (the backbone frozen
  in eval() mode, a linear layer N(0, 0.01) on raw features, SGD lr 30, momentum 0.9, no weight decay, x0.1 at 60% and
  80% of 100 epochs, batch 256, RandomResizedCrop + flip views of every image every epoch, the last partial batch
  kept, best and last top-1); flags for what main_lincls.py does not do stop the run.
- `--protocol ours` (default): main_lincls.py's head and sanity check with our defaults: standardised features and lr
  0.1, and features of the plain view extracted once for images of 64 px or less (both NOTE(deviation) below).
- `--probe mlp`: the DIM paper's probe (Hjelm et al. 2019, arXiv 1808.06670v5, Sec. 4.1) as rdevon/DIM's
  cortex_DIM/evaluation_models/classification_eval.py trains it (200 hidden units, dropout 0.1, BN; Adam 1e-4, betas
  (0.5, 0.999), batch 64, MultiStepLR(milestones=[50, 100], gamma=0.1), here at 50% and 100% of the epochs); its
  100 epochs are ours.
- `--finetune`, `--label-fraction F`, `--labels-per-class N`: the semi-supervised protocols (the whole encoder trains;
  a class-balanced subset of the labels).
- kNN (k=200, t=0.1, cosine; the MoCo CIFAR notebook), always reported. Top-1 after every epoch, the best of them
  (chosen on the test set, as main_lincls.py's best_acc1) beside the last.
- OUT.json, and OUT.pt: the probe's checkpoint (the head; the fine-tuned backbone), written at a stop signal
  (--save-on-signal, exit status 75) and at the end; --resume auto goes on from it.

Commands
    python eval_linear.py --pretrained runs/moco/ckpt.pt                  # data and size from the checkpoint
    python eval_linear.py --pretrained runs/dim/ckpt.pt --layer fc --probe mlp
    python eval_linear.py --pretrained moco_v2_200ep_pretrain.pth.tar --data ~/imagenet --protocol main_lincls
    python eval_linear.py --pretrained runs/dim/ckpt.pt --layer y --random-init   # same encoder, random init
    python eval_linear.py --pretrained runs/moco/ckpt.pt --finetune --label-fraction 0.1   # semi-supervised
"""
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import moco
from moco import UserError, arg


@dataclass
class Args:
    pretrained: str = arg("", "checkpoint: moco.py, dim.py, or official MoCo ({'state_dict': module.encoder_q.*}) "
                              "(required: no default)")
    data: str = arg(None, "image folder or torchvision root (default: the checkpoint's; the built-in data if none)")
    dataset: str = arg(None, "an image folder or a torchvision data set (default: the checkpoint's)", moco.DATASETS)
    download: bool = arg(False, "let torchvision download --dataset (default: off)")
    out: str = arg("", "result JSON (default: eval_<layer>_<probe><tags>.json next to the checkpoint, tags such as "
                       "_finetune)")
    protocol: str = arg("ours", "main_lincls: facebookresearch/moco main_lincls.py's linear probe exactly (crop "
                                "views every epoch, raw features, lr 30); ours: the values each flag states "
                                "(default ours)",
                        ("ours", "main_lincls"))
    probe: str = arg("linear", "linear: one linear layer (main_lincls.py's); mlp: the DIM paper's, 200 hidden "
                               "units, dropout, BN", ("linear", "mlp"))
    layer: str = arg("backbone", "moco: backbone (the encoder without its fc head); dim: conv | fc | y")
    epochs: int = arg(None, "training epochs (default 100)")
    batch_size: int = arg(None, "global batch, shared by torchrun's processes (default 256 linear, 64 mlp)")
    lr: float = arg(None, "the head's lr (default: linear 0.1 on standardised features, 30 on raw ones; mlp 1e-4; "
                          "with --finetune 0.1 linear, 1e-4 mlp)")
    standardize: bool = arg(True, "standardise features with the training split's mean and std, a fixed affine map "
                                  "(the probe stays linear), so that one lr suits every encoder (default: on; off "
                                  "with --protocol main_lincls)")
    milestones: str = arg(None, "epochs at which the lr is multiplied by 0.1 (default: 60%,80% of --epochs for "
                                "linear and --finetune, 60,80 of 100; mlp 50%,100%, rdevon/DIM's 50,100)")
    aug: str = arg("auto", "crop: RandomResizedCrop + flip views through the backbone every epoch; none: features "
                           "of the plain view extracted once (default auto: crop above 64 px, none at 64 px or "
                           "less; crop with --protocol main_lincls)", ("auto", "crop", "none"))
    image_size: int = arg(None, "input size (default: the checkpoint's; 224 for official checkpoints)")
    random_init: bool = arg(False, "evaluate the same encoder with random weights, the baseline (default: off)")
    workers: int = arg(min(4, os.cpu_count() or 1), "data loader processes")
    device: str = arg("auto", "auto = cuda if a GPU is visible", ("auto", "cpu", "cuda"))
    seed: int = arg(0, "random seed (also draws the --label-fraction / --labels-per-class subset)")
    finetune: bool = arg(False, "train the whole encoder with the head, backbone in train() mode (default: off)")
    backbone_lr: float = arg(None, "backbone lr with --finetune (default 0.05 x the head's lr: 0.005 linear, 5e-6 "
                                   "mlp; the trunk/head ratio of SwAV's eval_semisup.py)")
    label_fraction: float = arg(None, "train on a class-balanced fraction 0 < F <= 1 of the labelled images "
                                      "(default: all of them)")
    labels_per_class: int = arg(None, "train on N labelled images per class, all of a class with fewer (default: "
                                      "all of them)")
    resume: str = arg("", "continue from OUT's .pt (the probe's checkpoint) if it exists: auto; or a path "
                          "(default: start anew)")
    save_on_signal: str = arg("TERM,USR1", "signals that stop the probe's training after the current step with a "
                                           "checkpoint (exit status 75); empty = none (default TERM,USR1)")
    bad_images: str = arg("stop", "an image that cannot be read: stop, or replace (the next readable image of its "
                                  "split stands in, listed in OUT's .bad_images.txt) (default stop)",
                          ("stop", "replace"))
    check_images: bool = arg(False, "decode every image of the data in parallel, list the unreadable ones and exit "
                                    "(status 0: none, 2: some) (default: off)")


# NOTE(deviation): lr 0.1 on standardised features (a fixed affine map: the probe stays linear), because lr 30 on
# raw features (main_lincls.py's) diverges on small encoders and one lr then suits every encoder and layer
# mlp: rdevon/DIM classification_eval.py (its epoch count is not set there: 100 is ours)
PROBE_DEFAULTS = {"linear": dict(epochs=100, batch_size=256, lr=0.1), "mlp": dict(epochs=100, batch_size=64, lr=1e-4)}


def default_milestones(probe, epochs):
    """lr x0.1 at 60% and 80% of the epochs (main_lincls.py's 60, 80 of 100), or at 50% and 100% for the MLP probe
    (rdevon/DIM's MultiStepLR milestones [50, 100]); rounded half up, at least epoch 1."""
    return ",".join(str(max(1, math.floor(f * epochs + 0.5))) for f in ((0.5, 1.0) if probe == "mlp" else (0.6, 0.8)))


def parse_args(argv=None):
    """moco.py's parser (one line per error) with this file's Args, then the protocol's and probe's defaults."""
    args, given = moco.parse_args(argv, Args, {})
    if not args.pretrained:
        raise UserError("give --pretrained CHECKPOINT: a moco.py or dim.py ckpt.pt, or an official MoCo checkpoint "
                        "(python eval_linear.py --help)")
    if args.protocol == "main_lincls":
        for bad, flag in [(args.probe != "linear", f"--probe {args.probe}"), (args.finetune, "--finetune"),
                          (args.aug == "none", "--aug none"), (given.get("standardize"), "--standardize"),
                          (args.label_fraction is not None, "--label-fraction"),
                          (args.labels_per_class is not None, "--labels-per-class")]:
            if bad:
                raise UserError(f"{flag} is not main_lincls.py's: --protocol main_lincls trains a linear layer on "
                                "raw features of crop views of every training image; drop one of the two")
        args.standardize, args.aug = False, "crop"
    d = PROBE_DEFAULTS[args.probe]
    args.epochs = d["epochs"] if args.epochs is None else args.epochs
    args.batch_size = d["batch_size"] if args.batch_size is None else args.batch_size
    if args.lr is None:  # never derived from lr 30 when the backbone trains
        args.lr = 30.0 if args.probe == "linear" and not args.standardize and not args.finetune else d["lr"]
    if args.milestones is None:
        args.milestones = default_milestones(args.probe, args.epochs)
    if args.finetune and args.backbone_lr is None:
        args.backbone_lr = 0.05 * args.lr  # SwAV eval_semisup.py, 10% labels: --lr 0.01 --lr_last_layer 0.2
    return args


def check_flags(args, world):
    """Values that make no sense stop here in one line, before minutes of feature extraction and training."""
    for bad, msg in [
        (args.epochs < 1, f"--epochs {args.epochs} must be >= 1"),
        (args.batch_size < 1, f"--batch-size {args.batch_size} must be >= 1"),
        (args.batch_size % world, f"--batch-size {args.batch_size} is not divisible by the {world} processes"),
        (not all(m.strip().isdigit() for m in args.milestones.split(",") if m.strip()),
         f"--milestones {args.milestones!r}: expected epochs separated by commas, e.g. 60,80"),
        (args.backbone_lr is not None and not args.finetune, "--backbone-lr is for --finetune"),
        (args.finetune and (args.backbone_lr or 0) < 0, f"--backbone-lr {args.backbone_lr} must be >= 0"),
        (args.label_fraction is not None and args.labels_per_class is not None,
         "give --label-fraction or --labels-per-class, not both"),
        (args.label_fraction is not None and not 0 < args.label_fraction <= 1,
         f"--label-fraction {args.label_fraction} must be in (0, 1]"),
        (args.labels_per_class is not None and args.labels_per_class < 1,
         f"--labels-per-class {args.labels_per_class} must be >= 1")]:
        if bad:
            raise UserError(msg)


def label_subset(labels, args):
    """A class-balanced subset of the labelled positions (label >= 0) of 0..len(labels)-1, drawn by args.seed: per
    class c with n_c images, round(F * n_c) (at least 1) for --label-fraction F, or min(N, n_c) for N per class."""
    y = torch.as_tensor(labels)                                            # (N,)
    g = torch.Generator().manual_seed(args.seed)
    pick = []
    for c in y[y >= 0].unique().tolist():                                  # ascending: the same draws on every run
        idx = (y == c).nonzero().flatten()                                 # (n_c,)
        k = (min(args.labels_per_class, len(idx)) if args.labels_per_class is not None
             else max(1, round(args.label_fraction * len(idx))))
        pick.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(pick).sort().values.tolist()


# ----------------------------------------------------------------------------------------------------
# Encoders from checkpoints
# ----------------------------------------------------------------------------------------------------
def moco_backbone(state, arch, stem, random_init):
    """encoder_q without its head (fc -> Identity), loaded strictly from `state` (keys without prefix)."""
    net = moco.build_encoder(arch, stem)
    net.fc = nn.Identity()
    if not random_init:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        wrong = moco.mismatch(net, state)
        if wrong:
            raise UserError(f"checkpoint does not match --arch {arch}: {wrong}")
        net.load_state_dict(state)
    return net


def load_encoder(args):
    """-> (frozen encoder: images -> features, {data, dataset, image_size, algo}) of a moco.py, dim.py or official
    MoCo checkpoint, read by moco.py's loader."""
    ckpt = moco.load_checkpoint(args.pretrained)
    missing = [k for k in ("model", "args") if k not in ckpt]
    if ckpt.get("algo") in ("moco", "dim") and missing:  # never a random encoder in disguise
        raise UserError(f"{args.pretrained} lacks {', '.join(map(repr, missing))}: not a whole checkpoint")
    if ckpt.get("algo") == "dim":
        import dim  # dim.py rebuilds its own encoders and taps (conv, fc, y)
        if args.random_init:
            torch.manual_seed(args.seed)
            ckpt = {**ckpt, "model": None}
        try:
            return dim.encoder_for_eval(ckpt, args.layer), {**ckpt["args"], "algo": "dim"}
        except dim.UserError as e:  # dim.py's own copy of the class
            raise UserError(str(e))
    if args.layer != "backbone":
        raise UserError(f"--layer {args.layer} is for dim.py checkpoints; MoCo checkpoints use --layer backbone")
    torch.manual_seed(args.seed)
    if ckpt.get("algo") == "moco":
        a = ckpt["args"]
        state = {k[len("encoder_q."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder_q.")}
        return moco_backbone(state, a["arch"], a["stem"], args.random_init), {**a, "algo": "moco"}
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict) and any(k.startswith("module.encoder_q.") for k in sd):  # official main_moco.py
        state = {k[len("module.encoder_q."):]: v for k, v in sd.items() if k.startswith("module.encoder_q.")}
        net = moco_backbone(state, ckpt.get("arch", "resnet50"), "imagenet", args.random_init)
        return net, {"data": "", "dataset": "folder", "image_size": 224, "algo": "moco-official"}
    raise UserError(f"{args.pretrained} has no encoder: expected a moco.py/dim.py checkpoint or an official "
                    "MoCo one with module.encoder_q.* weights")


# ----------------------------------------------------------------------------------------------------
# Probe training
# ----------------------------------------------------------------------------------------------------
class Standardize(nn.Module):
    """(f - mean) / std with the training split's statistics, fixed (not trained)."""

    def __init__(self, feats):
        super().__init__()
        mean = feats.mean(0)                                               # (D,)
        # sum of squares over chunks of rows: torch's std(0) is ~10x slower on a tall CPU matrix
        ss = sum((c - mean).pow_(2).sum(0, dtype=torch.float64) for c in feats.split(8192))  # (D,)
        self.register_buffer("mean", mean)
        self.register_buffer("std", (ss / max(len(feats) - 1, 1)).sqrt().to(feats.dtype).clamp_min(1e-6))  # (D,)

    def forward(self, f):
        return (f - self.mean) / self.std


def make_head(probe, dim_in, classes):
    if probe == "linear":
        head = nn.Linear(dim_in, classes)
        nn.init.normal_(head.weight, 0.0, 0.01)  # main_lincls.py
        nn.init.zeros_(head.bias)
        return head
    return nn.Sequential(nn.Linear(dim_in, 200), nn.Dropout(0.1), nn.BatchNorm1d(200), nn.ReLU(),
                         nn.Linear(200, classes))


def make_opt(args, head, backbone=None):
    """The probe's optimiser; with a backbone (fine-tuning) a second parameter group at args.backbone_lr."""
    groups = [dict(params=list(head.parameters()), lr=args.lr, base_lr=args.lr)]
    if backbone is not None:
        groups.append(dict(params=list(backbone.parameters()), lr=args.backbone_lr, base_lr=args.backbone_lr))
    if args.probe == "linear":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    return torch.optim.Adam(groups, betas=(0.5, 0.999))  # cortex's default (rdevon/cortex _lib/optimizer.py)


@torch.no_grad()
def topk_acc(logits, y, ks=(1, 5)):
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (n, 5)
    hit = top == y[:, None]
    return [hit[:, :k].any(1).float().mean().item() * 100 for k in ks]


def fit_probe(args, train_f, train_y, classes, batches=None, ddp=False, say=print, backbone=None, on_epoch=None,
              progress=None, stop=None):
    """Trains args.probe on (features, labels) for args.epochs; `batches(epoch, skip)` yields (features, labels) when
    the features are not cached (crop views), or (images, labels) when `backbone` is given: then the backbone
    trains too (fine-tuning), in train() mode. After every epoch `on_epoch(record, head)` may add to the record
    {epoch, loss, images: the examples the epoch's steps saw, over all processes}, with the head in eval() mode.
    `progress` (a Progress) restores a stopped run and writes the checkpoint at an agreed `stop` and at the end.
    Returns the head in eval() mode, standardisation included."""
    torch.manual_seed(args.seed)
    head = make_head(args.probe, train_f.shape[1], classes).to(train_f.device)
    opt = make_opt(args, head, backbone)
    step_head = head
    if args.standardize:  # fine-tuning moves the features, and a fixed map would divide the pre-trained dead ones
        # by ~0 once they come alive: BN without affine (MAE's linear probe, arXiv 2111.06377v3) follows them
        norm = nn.BatchNorm1d(train_f.shape[1], affine=False) if backbone is not None else Standardize(train_f)
        head = nn.Sequential(norm.to(train_f.device), head)
        if batches is None:  # cached features: standardised once here, not in every batch
            train_f = head[0](train_f)
        else:
            step_head = head
    if backbone is not None:
        step_head = nn.Sequential(backbone, nn.Flatten(1), head)
    if ddp:  # a dim.py tap below y (dim.Tap.layer) leaves the encoder's later stages without gradients
        unused = backbone is not None and getattr(backbone, "layer", "y") != "y"
        step_head = nn.parallel.DistributedDataParallel(step_head, find_unused_parameters=unused)
    milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
    g = torch.Generator().manual_seed(args.seed)
    modules = {"head": head, "optimizer": opt, **({"backbone": backbone} if backbone is not None else {})}
    start, skip, sums = progress.restore(modules, g) if progress else (0, 0, (0.0, 0))
    for epoch in range(start, args.epochs):
        order = g.get_state()  # the cached features' order of this epoch, drawn below
        for grp in opt.param_groups:  # main_lincls.py's adjust_learning_rate: x0.1 per milestone, set per epoch
            grp["lr"] = grp["base_lr"] * 0.1 ** sum(epoch >= m for m in milestones)
        head.train()
        if backbone is not None:
            backbone.train()
        if batches is None:  # every example, the last partial batch too
            perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
            epoch_batches = ((train_f[i], train_y[i]) for i in perm.split(args.batch_size)[skip:])
        else:
            epoch_batches = batches(epoch, skip)
        (total, n), pos = (sums if skip else (0.0, 0)), skip
        for f, y in epoch_batches:
            if len(y) >= 2 or (args.probe == "linear" and backbone is None):  # batch norm needs 2
                loss = F.cross_entropy(step_head(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(y), n + len(y)
            pos += 1
            if stop is not None and stop.agreed():
                stop.settle()
                progress.save(modules, epoch, pos, order, (total, n))
                raise moco.Preempted(progress.stopped(epoch, pos))
        skip = 0
        if not torch.isfinite(torch.tensor(total)):
            raise UserError(f"probe loss is not finite at epoch {epoch + 1}: lower --lr")
        record = dict(epoch=epoch + 1, loss=total / max(n, 1), images=n * (dist.get_world_size() if ddp else 1))
        if on_epoch is not None:
            on_epoch(record, head.eval())
        if (epoch + 1) % max(1, args.epochs // 10) == 0 or epoch + 1 == args.epochs:
            say(f"probe epoch {epoch + 1}/{args.epochs} loss {record['loss']:.4f} ({record['images']} images)"
                + (f" test top-1 {record['top1']:.2f}" if "top1" in record else ""), flush=True)
    if progress:
        progress.save(modules, args.epochs, 0, g.get_state(), (0.0, 0))
    if backbone is not None:
        backbone.eval()
    return head.eval()


class Progress:
    """OUT's .pt, the probe's checkpoint: the head (fine-tuning: and the backbone), its optimiser, the position in
    the epochs, every rank's random state and the epochs' records. Written at a stop signal (--save-on-signal,
    after the current step, every rank at the same step) and at the end; --resume goes on from it to the numbers an
    uninterrupted run gives."""

    KEEP = ("pretrained", "protocol", "probe", "layer", "epochs", "batch_size", "lr", "standardize", "milestones",
            "aug", "image_size", "random_init", "seed", "finetune", "backbone_lr", "label_fraction", "labels_per_class")

    def __init__(self, args, path, device, records):
        self.args, self.path, self.device, self.records, self.ckpt = args, path, device, records, None
        src = path if args.resume == "auto" else args.resume
        if args.resume and (args.resume != "auto" or os.path.exists(src)):
            self.ckpt = moco.load_checkpoint(src, "eval_linear")
            saved = self.ckpt["args"]
            changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in self.KEEP
                       if saved.get(k) != getattr(args, k)]
            if changed:
                raise UserError(f"{src} was trained with other settings ({', '.join(changed)}): give the same "
                                "flags to go on, or leave out --resume to start anew")

    def restore(self, modules, g):
        """-> (epoch, steps done in it, their (loss sum, examples)); the modules, the generator and the random state
        as the checkpoint left them."""
        if self.ckpt is None:
            return 0, 0, (0.0, 0)
        for name, m in modules.items():
            m.load_state_dict(self.ckpt[name])
        g.set_state(self.ckpt["order"])
        moco.set_rng_state(self.ckpt["rng"], self.device)
        self.records[:] = self.ckpt["records"]
        return self.ckpt["epoch"], self.ckpt["step_in_epoch"], tuple(self.ckpt["sums"])

    def save(self, modules, epoch, pos, order, sums):
        rngs = moco.rng_states(self.device)
        if moco.world_info()[0] == 0:
            moco.save_checkpoint({"algo": "eval_linear", **{k: m.state_dict() for k, m in modules.items()},
                                  "epoch": epoch, "step_in_epoch": pos, "order": order, "sums": list(sums),
                                  "rng": rngs, "records": self.records, "args": vars(self.args)}, self.path)

    def stopped(self, epoch, pos):
        return "" if moco.world_info()[0] else (
            f"stopped by {moco.STOP['signal'] or 'a signal to another rank'} at epoch {epoch + 1} step {pos}: "
            f"checkpoint {self.path}; continue with --resume auto (exit status {moco.PREEMPTED})")


def evaluate(args, stop):
    device, rank, world = moco.setup_device(args)
    stop.world = world  # stop signals are agreed on over gloo (a CPU tensor), as in moco.py
    stop.group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None
    check_flags(args, world)
    torch.manual_seed(args.seed)  # the same probe initialisation on every rank
    encoder, ck = load_encoder(args)
    out = output_path(args)
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad = args.finetune
    before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    train_set, test_set, stats, label_idx = datasets(args, ck)
    size = args.image_size or ck.get("image_size", 224)
    # NOTE(deviation): auto caches the plain view's features once for images of 64 px or less (main_lincls.py: crop
    # views through the backbone every epoch, at every size): one pass of the backbone, without augmentation
    aug = args.aug if args.aug != "auto" else ("crop" if size > 64 else "none")
    if ((aug == "crop" or args.finetune) and args.protocol != "main_lincls"  # ours: full batches only (drop_last)
            and len(train_set) < args.batch_size):
        raise UserError(f"{len(train_set)} training images are fewer than one --batch-size {args.batch_size}")
    plain = moco.test_transform(size, stats)
    t0 = time.perf_counter()
    per_epoch = []
    progress = Progress(args, os.path.splitext(out)[0] + ".pt", device, per_epoch)
    # moco.py's kNN-monitor path: each rank encodes its contiguous share of a split, gathered in order; a stop
    # signal meanwhile ends the run at once (nothing to save yet)
    moco.STOP["raise"] = "" if rank else "stopped by a signal during the feature extraction: nothing to save yet"
    train_f, train_y = moco.extract_all(encoder, train_set, plain, args.workers, device)  # (N, D), (N,)
    test_f, test_y = moco.extract_all(encoder, test_set, plain, args.workers, device)  # (n, D), (n,)
    moco.STOP["raise"] = None
    classes = int(max(train_y.max(), test_y.max())) + 1
    knn = moco.knn_top1(train_f, train_y, test_f, test_y)
    say = print if rank == 0 else (lambda *a, **k: None)
    if len(set(train_y.tolist())) < 2:
        say("note: the training split has one class: every accuracy is 100% whatever the features (it measures "
            "nothing)")
    say(f"features: {train_f.shape[1]}-d, {len(train_f)} train / {len(test_f)} test images, "
        f"kNN top-1 on {args.layer} {knn:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    batches = None  # cached features: every rank trains the same probe on all of them (no communication)
    if aug == "crop" or args.finetune:  # each rank its share of every batch; DDP averages the gradients
        tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(*moco.MEAN_STD[stats])]) if aug == "crop" else plain
        batches = train_batches(args, None if args.finetune else encoder, train_set, tf, device, rank, world)

    def test_each_epoch(record, head):  # cheap on the cached test features; fine-tuning would re-extract them
        if not args.finetune:
            with torch.no_grad():
                record["top1"] = topk_acc(head(test_f), test_y)[0]
        per_epoch.append(record)
    head = fit_probe(args, train_f, train_y, classes, batches, ddp=world > 1 and batches is not None, say=say,
                     backbone=encoder if args.finetune else None, on_epoch=test_each_epoch, progress=progress,
                     stop=stop)
    if args.finetune:
        if world > 1:  # BN statistics are rank-local after the last forward: use rank 0's
            for b in [*encoder.buffers(), *head.buffers()]:
                dist.broadcast(b, 0)
        test_f, test_y = moco.extract_all(encoder, test_set, plain, args.workers, device)  # (n, D), (n,)
    with torch.no_grad():
        top1, top5 = topk_acc(head(test_f), test_y)
    sanity_check(encoder, before, args.finetune)
    best = max(per_epoch, key=lambda r: r["top1"]) if not args.finetune else dict(top1=None, epoch=None)
    result = dict(pretrained=args.pretrained, algo=ck["algo"], protocol=args.protocol, layer=args.layer,
                  probe=args.probe, aug=aug, standardize=args.standardize, random_init=args.random_init, top1=top1,
                  top5=top5, top1_best=best["top1"], top1_best_epoch=best["epoch"], knn_top1=knn,
                  feature_dim=train_f.shape[1], n_train=len(train_f), n_test=len(test_f), epochs=args.epochs,
                  lr=args.lr, milestones=args.milestones, batch_size=args.batch_size, finetune=args.finetune,
                  backbone_lr=args.backbone_lr if args.finetune else None, label_fraction=args.label_fraction,
                  labels_per_class=args.labels_per_class, seconds=time.perf_counter() - t0, per_epoch=per_epoch,
                  label_idx=label_idx)
    if rank == 0:
        moco.replace_file(out, lambda f: f.write(json.dumps(result, indent=1).encode()), "result")
    best_text = "" if args.finetune else f"; best {best['top1']:.2f} at epoch {best['epoch']}, chosen on the test set"
    say(f"{args.probe} {'fine-tuned' if args.finetune else 'probe'} on {args.layer}: top-1 {top1:.2f} (last epoch"
        f"{best_text}) top-5 {top5:.2f} kNN top-1 on {args.layer} {knn:.2f} (sanity check passed) -> {out}")
    if world > 1:
        dist.destroy_process_group()
    return result


def output_path(args):
    """--out, or eval_<layer>_<probe><tags>.json next to the checkpoint; checked before any work."""
    tag = ("_main_lincls" if args.protocol == "main_lincls" else "") + ("_finetune" if args.finetune else "") + (
        f"_frac{args.label_fraction:g}" if args.label_fraction else "") + (
        f"_n{args.labels_per_class}" if args.labels_per_class else "") + ("_random" if args.random_init else "")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.pretrained)),
                                   f"eval_{args.layer}_{args.probe}{tag}.json")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--out {out}: not a writable file name in an existing folder")
    return out


def datasets(args, ck):
    """-> (labelled training images, or the --label-fraction / --labels-per-class subset of them; labelled test
    images; normalisation stats name; the subset's positions in the training split as loaded, or None)."""
    data = data_args(args, ck)
    try:  # main_lincls never tests on held-out training images: a folder without a usable val split stops
        train_set, test_set, stats = moco.load_data(data, need_val=args.protocol == "main_lincls")
    except UserError as e:
        raise UserError(f"--protocol {args.protocol}: {e}" if args.protocol == "main_lincls" else str(e)) from None
    for ds in (train_set, test_set):  # --bad-images replace: the bad files listed beside the result
        if hasattr(moco.base_of(ds), "bad_log") and args.bad_images == "replace":  # image files
            moco.base_of(ds).bad_log = os.path.splitext(output_path(args))[0] + ".bad_images.txt"
    held = getattr(test_set, "dataset", 0) is getattr(train_set, "dataset", 1)
    if held and "holdout_every" in ck and not ck.get("knn_every") and data.data == ck.get("data") and \
            moco.world_info()[0] == 0:
        print(f"note: the test split is every {data.holdout_every}th image of {data.data}, which the checkpoint "
              "pretrained on too (without labels: it ran with --knn-every 0, so nothing was held out)", flush=True)
    hint = ": a probe needs labels"  # STL-10's unlabeled images (label -1) are left out of probes and kNN
    labelled_set = moco.labelled(train_set, "the training split", hint)
    test_set = moco.labelled(test_set, "the test split", hint)
    label_idx = None  # positions in the training split as loaded (unlabelled images included)
    if args.label_fraction is not None or args.labels_per_class is not None:
        label_idx = label_subset(moco.targets(train_set), args)
        labelled_set = torch.utils.data.Subset(train_set, label_idx)
    return labelled_set, test_set, stats, label_idx


class EveryImageSampler(torch.utils.data.DistributedSampler):
    """main_lincls.py's training sampler: every image each epoch, the last partial batch kept; under torchrun
    torch's DistributedSampler (the permutation padded with its first images to a multiple of the processes), so
    every process gets as many batches. Yields (index, augmentation seed) for moco.Seeded."""

    def __init__(self, n, seed, rank, world, batch):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.batch, self.skip = batch, 0  # this rank's batch, and the batches already done in the epoch (a resume)

    def __iter__(self):
        base = (self.seed * 1000003 + self.epoch) * len(self.dataset) * 2  # as moco.EpochSampler's
        return iter([(i, base + i) for i in list(super().__iter__())[self.skip * self.batch:]])


def train_batches(args, encoder, train_set, tf, device, rank, world):
    """batches(epoch) for fit_probe: `tf` views of train_set, this rank's share of each global batch, as features
    of the frozen `encoder`, or as images (encoder None: fine-tuning, the backbone runs inside fit_probe). Full
    batches only (moco.py's sampler), except under --protocol main_lincls (every image, EveryImageSampler)."""
    sampler = (EveryImageSampler(len(train_set), args.seed, rank, world, args.batch_size // world)
               if args.protocol == "main_lincls" else
               moco.EpochSampler(len(train_set), args.batch_size // world, args.seed, rank, world))
    view_loader = moco.loader(moco.Seeded(train_set, tf), args.batch_size // world, args.workers, sampler, device)

    def batches(epoch, skip=0):
        sampler.epoch, sampler.skip = epoch, skip  # both samplers draw their permutation from (seed, epoch)
        if encoder is None:
            return ((x.to(device), y.to(device)) for x, y in view_loader)
        return ((encoder(x.to(device)).flatten(1), y.to(device)) for x, y in view_loader)
    return batches


def sanity_check(encoder, before, finetune):
    """main_lincls.py's sanity_check: a frozen backbone (weights and BN statistics) did not change. Inverted for
    --finetune: some weight must have changed (BN statistics move in train() mode even at --backbone-lr 0)."""
    if finetune:
        if all(torch.equal(p.detach(), before[k]) for k, p in encoder.named_parameters()):
            raise RuntimeError("sanity check failed: no backbone weight changed during fine-tuning")
        return
    for k, v in encoder.state_dict().items():
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"sanity check failed: backbone tensor {k} changed during probe training")


def data_args(args, ck):
    """The data flags moco.load_data reads: the given ones, else the checkpoint's (and its held-out images, if any)."""
    return moco.Args(data=args.data if args.data is not None else ck.get("data", ""),
                     dataset=args.dataset or ck.get("dataset", "folder"), download=args.download,
                     holdout_every=ck.get("holdout_every") or 10)


def run(argv):
    args = parse_args(argv)
    if args.check_images:
        moco.check_images(data_args(args, moco.load_checkpoint(args.pretrained) if args.data is None else {}))
    moco.catch_signals(args.save_on_signal, "stopped by a signal before the probe's training: nothing to save yet")
    return evaluate(args, moco.StopOnSignals())


def main(argv=None):
    """moco.py's main(): every way the evaluation ends is one line and an exit status (2 a user's error, 3 out of
    memory, 75 stopped by a signal with the probe's checkpoint written, 130 interrupted)."""
    return moco.main(argv, run, "lower --batch-size")


if __name__ == "__main__":
    main()
