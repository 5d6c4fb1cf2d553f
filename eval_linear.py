"""Frozen-feature evaluation of moco.py and dim.py checkpoints and of the official MoCo checkpoints.

Protocols
- `--probe linear` (default): the official MoCo linear classification protocol (facebookresearch/moco,
  main_lincls.py): the backbone stays in eval() mode so batch-norm statistics cannot move, a linear layer
  initialised N(0, 0.01) with zero bias, SGD lr 30, momentum 0.9, weight decay 0, lr x0.1 at epochs 60 and
  80 of 100, batch 256; afterwards the official sanity check that every backbone tensor is unchanged.
  NOTE(deviation): by default the features are standardised with the training split's mean and std first (a
  fixed affine map: still a linear probe) and the lr is 0.1, since lr 30 diverges on small encoders;
  --no-standardize is main_lincls.py exactly.
- `--probe mlp`: the DIM paper's probe (Hjelm et al. 2019, arXiv 1808.06670v5, Sec. 4.1): one hidden layer of
  200 units with dropout (rdevon/DIM classifier: Linear 200, Dropout 0.1, BN, ReLU, Linear), Adam lr 1e-4, cortex's
  betas (0.5, 0.999), batch 64, 100 epochs. NOTE(deviation): lr x0.1 at epoch 50 is ours (the paper gives none).
- kNN (k=200, t=0.1, cosine; the MoCo CIFAR notebook) on the same features, always reported.

`--aug crop` trains the probe on RandomResizedCrop + flip views through the frozen backbone every epoch (the
official protocol for ImageNet-sized images); `--aug none` extracts the features once and trains on them
(fast; the default for images of 64 px or less). Top-1/top-5 are on the test split (the `val` folder, the
torchvision test split, or images 8000-9999 of the built-in data).

Semi-supervised protocols
- `--finetune`: the whole encoder trains with the head (backbone in train() mode, so BN statistics move too), the
  backbone at `--backbone-lr` (default 0.05 x the head's lr: the ratio of SwAV's eval_semisup.py, trunk 0.01 /
  head 0.2 at 10% labels; the value itself is ours), on the views of `--aug`: crop as above, and for `none` the
  plain (test) view of each image, reshuffled every epoch (features cannot be cached while the backbone moves).
  The sanity check is inverted: some backbone weight must have changed. The standardisation becomes a batch norm
  without affine (MAE's linear probe), since fixed statistics of the pre-trained features blow up dead ones that
  come alive; kNN is reported on the pre-trained features, top-1/top-5 on the fine-tuned ones.
- `--label-fraction F` or `--labels-per-class N`: a class-balanced subset of the labelled training images,
  round(F * n_c) (at least 1) or min(N, n_c) of class c, drawn by `--seed`. It trains the probe or the
  fine-tuning and is the kNN bank as well, so every number sees the same labels; its indices (positions in the
  training split as loaded, unlabelled images included) are written to the JSON as "label_idx".

Commands
    python eval_linear.py --pretrained runs/moco/ckpt.pt                  # data and size from the checkpoint
    python eval_linear.py --pretrained runs/dim/ckpt.pt --layer fc --probe mlp
    python eval_linear.py --pretrained moco_v2_200ep_pretrain.pth.tar --data ~/imagenet
    python eval_linear.py --pretrained runs/dim/ckpt.pt --layer y --random-init   # same encoder, random init
    python eval_linear.py --pretrained runs/moco/ckpt.pt --finetune --label-fraction 0.1   # semi-supervised
"""
import json
import os
import sys
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
    pretrained: str = arg("", "checkpoint: moco.py, dim.py, or official MoCo ({'state_dict': module.encoder_q.*})")
    data: str = arg(None, "image folder or torchvision root (default: the checkpoint's; built-in data if none)")
    dataset: str = arg(None, "an image folder or a torchvision data set (default: the checkpoint's)", moco.DATASETS)
    download: bool = arg(False, "let torchvision download --dataset")
    out: str = arg("", "result JSON (default: eval_<layer>_<probe>.json next to the checkpoint)")
    probe: str = arg("linear", "linear: official MoCo protocol; mlp: DIM paper, 200 hidden units, dropout",
                     ("linear", "mlp"))
    layer: str = arg("backbone", "moco: backbone (the encoder without its fc head); dim: conv | fc | y")
    epochs: int = arg(None, "probe epochs (linear 100, mlp 100)")
    batch_size: int = arg(None, "probe batch (linear 256, mlp 64)")
    lr: float = arg(None, "probe learning rate (linear: SGD 30, or 0.1 with --standardize; mlp: Adam 1e-4)")
    standardize: bool = arg(True, "standardise features with the training split's mean and std (a fixed "
                                  "affine map, so the probe stays linear); --no-standardize = main_lincls.py")
    milestones: str = arg(None, "epochs at which the lr is multiplied by 0.1 (linear 60,80; mlp 50)")
    aug: str = arg("auto", "crop: RandomResizedCrop + flip each epoch; none: cached features; auto: crop above 64 px",
                   ("auto", "crop", "none"))
    image_size: int = arg(None, "input size (default: the checkpoint's; 224 for official checkpoints)")
    random_init: bool = arg(False, "evaluate the same encoder with random weights (the baseline)")
    workers: int = arg(min(4, os.cpu_count() or 1), "data loader processes")
    device: str = arg("auto", "auto = cuda if a GPU is visible", ("auto", "cpu", "cuda"))
    seed: int = arg(0, "random seed (also draws the --label-fraction / --labels-per-class subset)")
    finetune: bool = arg(False, "train the whole encoder with the head (backbone in train() mode)")
    backbone_lr: float = arg(None, "backbone lr with --finetune (default 0.05 x --lr: SwAV eval_semisup.py's ratio)")
    label_fraction: float = arg(None, "train on a class-balanced fraction 0 < F <= 1 of the labelled images")
    labels_per_class: int = arg(None, "train on N labelled images per class (all of a class with fewer)")


PROBE_DEFAULTS = {"linear": dict(epochs=100, batch_size=256, lr=30.0, milestones="60,80"),  # lr 0.1 standardised
                  "mlp": dict(epochs=100, batch_size=64, lr=1e-4, milestones="50")}


def parse_args(argv=None):
    """moco.py's parser (one line per error) with this file's Args, then the probe's defaults."""
    args = moco.parse_args(argv, Args, {})[0]
    for k, v in PROBE_DEFAULTS[args.probe].items():
        if getattr(args, k) is None:
            setattr(args, k, 0.1 if k == "lr" and args.probe == "linear" and args.standardize else v)
    if args.finetune and args.backbone_lr is None:
        args.backbone_lr = 0.05 * args.lr  # SwAV eval_semisup.py, 10% labels: --lr 0.01 --lr_last_layer 0.2
    return args


def check_flags(args, world):
    """Values that make no sense stop here in one line, before minutes of feature extraction and training."""
    for bad, msg in [
        (args.batch_size % world, f"--batch-size {args.batch_size} is not divisible by the {world} processes"),
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
        missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                  strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint does not match --arch {arch}: {len(missing)} missing keys "
                            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return net


def load_encoder(args):
    """-> (frozen encoder: images -> features, {data, dataset, image_size, algo}) of a moco.py, dim.py or official
    MoCo checkpoint, read by moco.py's loader."""
    ckpt = moco.load_checkpoint(args.pretrained)
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


def fit_probe(args, train_f, train_y, classes, batches=None, ddp=False, say=print, backbone=None):
    """Trains args.probe on (features, labels) for args.epochs; `batches(epoch)` yields (features, labels) when
    the features are not cached (crop views), or (images, labels) when `backbone` is given: then the backbone
    trains too (fine-tuning), in train() mode. Returns the head in eval() mode, standardisation included."""
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
    milestones = [int(m) for m in args.milestones.split(",") if m]
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for grp in opt.param_groups:  # main_lincls.py: lr x0.1 at each milestone, set per epoch
            grp["lr"] = grp["base_lr"] * 0.1 ** sum(epoch >= m for m in milestones)
        head.train()
        if backbone is not None:
            backbone.train()
        if batches is None:
            perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
            epoch_batches = ((train_f[i], train_y[i]) for i in perm.split(args.batch_size))
        else:
            epoch_batches = batches(epoch)
        total, n = 0.0, 0
        for f, y in epoch_batches:
            if len(y) < 2 and (args.probe == "mlp" or backbone is not None):  # batch norm needs 2
                continue
            loss = F.cross_entropy(step_head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        if not torch.isfinite(torch.tensor(total)):
            raise UserError(f"probe loss is not finite at epoch {epoch + 1}: lower --lr")
        if (epoch + 1) % max(1, args.epochs // 10) == 0 or epoch + 1 == args.epochs:
            say(f"probe epoch {epoch + 1}/{args.epochs} loss {total / max(n, 1):.4f}", flush=True)
    if backbone is not None:
        backbone.eval()
    return head.eval()


def evaluate(args, argv_out=print):
    device, rank, world = moco.setup_device(args)
    check_flags(args, world)
    torch.manual_seed(args.seed)  # the same probe initialisation on every rank
    encoder, ck = load_encoder(args)
    tag = (("_finetune" if args.finetune else "") + (f"_frac{args.label_fraction:g}" if args.label_fraction else "")
           + (f"_n{args.labels_per_class}" if args.labels_per_class else "") + ("_random" if args.random_init else ""))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.pretrained)),
                                   f"eval_{args.layer}_{args.probe}{tag}.json")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--out {out}: not a writable file name in an existing folder")
    encoder = encoder.to(device).eval()
    for p in encoder.parameters():
        p.requires_grad = args.finetune
    before = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    data = moco.Args(data=args.data if args.data is not None else ck.get("data", ""),
                     dataset=args.dataset or ck.get("dataset", "folder"), download=args.download)
    train_set, test_set, stats = moco.load_data(data)
    hint = ": a probe needs labels"  # STL-10's unlabeled images (label -1) are left out of probes and kNN
    labelled_set = moco.labelled(train_set, "the training split", hint)
    test_set = moco.labelled(test_set, "the test split", hint)
    label_idx = None  # positions in the training split as loaded (unlabelled images included)
    if args.label_fraction is not None or args.labels_per_class is not None:
        label_idx = label_subset(moco.targets(train_set), args)
        labelled_set = torch.utils.data.Subset(train_set, label_idx)
    train_set = labelled_set
    size = args.image_size or ck.get("image_size", 224)
    aug = args.aug if args.aug != "auto" else ("crop" if size > 64 else "none")
    if (aug == "crop" or args.finetune) and len(train_set) < args.batch_size:  # full batches only (drop_last)
        raise UserError(f"{len(train_set)} training images are fewer than one --batch-size {args.batch_size}")
    plain = moco.test_transform(size, stats)
    t0 = time.perf_counter()
    # moco.py's kNN-monitor path: each rank encodes its contiguous share of a split, gathered in order
    train_f, train_y = moco.extract_all(encoder, train_set, plain, args.workers, device)  # (N, D), (N,)
    test_f, test_y = moco.extract_all(encoder, test_set, plain, args.workers, device)  # (n, D), (n,)
    classes = int(max(train_y.max(), test_y.max())) + 1
    knn = moco.knn_top1(train_f, train_y, test_f, test_y)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"features: {train_f.shape[1]}-d, {len(train_f)} train / {len(test_f)} test images, "
        f"kNN top-1 {knn:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    batches = None  # cached features: every rank trains the same probe on all of them (no communication)
    if aug == "crop" or args.finetune:  # each rank its share of every batch; DDP averages the gradients
        tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(*moco.MEAN_STD[stats])]) if aug == "crop" else plain
        batches = train_batches(args, None if args.finetune else encoder, train_set, tf, device, rank, world)
    head = fit_probe(args, train_f, train_y, classes, batches, ddp=world > 1 and batches is not None, say=say,
                     backbone=encoder if args.finetune else None)
    if args.finetune:
        if world > 1:  # BN statistics are rank-local after the last forward: use rank 0's
            for b in [*encoder.buffers(), *head.buffers()]:
                dist.broadcast(b, 0)
        test_f, test_y = moco.extract_all(encoder, test_set, plain, args.workers, device)  # (n, D), (n,)
    with torch.no_grad():
        top1, top5 = topk_acc(head(test_f), test_y)
    sanity_check(encoder, before, args.finetune)
    result = dict(pretrained=args.pretrained, algo=ck["algo"],
                  layer=args.layer, probe=args.probe, aug=aug, random_init=args.random_init, top1=top1, top5=top5,
                  knn_top1=knn, feature_dim=train_f.shape[1], n_train=len(train_f), n_test=len(test_f),
                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, finetune=args.finetune,
                  backbone_lr=args.backbone_lr if args.finetune else None, label_fraction=args.label_fraction,
                  labels_per_class=args.labels_per_class, seconds=time.perf_counter() - t0, label_idx=label_idx)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    say(f"{args.probe} {'fine-tuned' if args.finetune else 'probe'} on {args.layer}: top-1 {top1:.2f} "
        f"top-5 {top5:.2f} kNN top-1 {knn:.2f} (sanity check passed) -> {out}")
    if world > 1:
        dist.destroy_process_group()
    return result


def train_batches(args, encoder, train_set, tf, device, rank, world):
    """batches(epoch) for fit_probe: `tf` views of train_set, this rank's share of each global batch, as features
    of the frozen `encoder`, or as images (encoder None: fine-tuning, the backbone runs inside fit_probe)."""
    sampler = moco.EpochSampler(len(train_set), args.batch_size // world, args.seed, rank, world)
    view_loader = moco.loader(moco.Seeded(train_set, tf), args.batch_size // world, args.workers, sampler, device)

    def batches(epoch):
        sampler.epoch = epoch
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


def main(argv=None):
    try:
        return evaluate(parse_args(argv))
    except UserError as e:  # the message of one raised in a data-loader worker ends with the UserError line
        print(f"error: {str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print("error: out of memory: lower --batch-size", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
