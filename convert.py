"""Convert moco.py, dim.py and official MoCo checkpoints into the formats other code reads.

    python convert.py runs/moco/ckpt.pt r18.pth                 # torchvision backbone  (.pth, .pt)
    python convert.py moco_v2_200ep_pretrain.pth.tar r50.pkl    # detectron2 backbone   (.pkl)
    python convert.py runs/moco/ckpt.pt checkpoint_0199.pth.tar # official MoCo layout  (.pth.tar)
    python convert.py runs/dim/ckpt.pt dim_enc.pt --to torchvision

CKPT is a moco.py checkpoint ({"algo": "moco", "model": {encoder_q.*, ...}, "args": {arch, stem, ...}}), a dim.py
one ({"algo": "dim", "model": {encoder.*, ...}, "args": {arch, image_size, y_dim, ...}}) or an official MoCo one
(facebookresearch/moco main_moco.py: {"state_dict": {module.encoder_q.*, ...}, "arch"}). --to defaults to the
format OUT's extension names; any other extension needs --to.

Formats
- torchvision: {"state_dict", "arch", "stem", "build"}, a plain dict that torch.load reads with weights_only=True.
  `build` is one line of Python that makes `enc`, the module state_dict loads into with strict=True (it is also
  printed): for ResNets `torchvision.models.<arch>()` with fc = Identity (the head, fc or the v2 MLP fc.0/fc.2,
  is not kept), and with stem "cifar" conv1 = Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = Identity (the
  MoCo CIFAR notebook's stem). enc(images) gives the features of the checkpoint's encoder without its head.
  moco.py's basic32 builds with moco.Basic32() (fc = Identity, 1024 features); dim.py's basic32 and alex64 keep
  dim.py's whole Encoder (`enc(x, "fc")["fc"]`, taps conv/fc/y); dim.py's ResNets become torchvision ResNets
  (the fc tap and y are dropped; enc(x) = the conv tap average-pooled). `moco`/`dim` must be importable.
      m = torch.load("r18.pth"); exec(m["build"]); enc.load_state_dict(m["state_dict"])
- detectron2: the pickle of facebookresearch/moco detection/convert-pretrain-to-detectron2.py,
  {"model": {detectron2 key: numpy array}, "__author__": "MOCO", "matching_heuristics": True}, for
  `MODEL.WEIGHTS out.pkl`. Torchvision ResNets with the ImageNet stem only.
- moco: {"state_dict": {module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr}, "arch"}, the
  layout main_moco.py saves, from a moco.py checkpoint; main_lincls.py --pretrained and eval_linear.py read it.
  It has no "epoch" or "optimizer", so main_moco.py --resume cannot continue from it (as with the released
  weights, facebookresearch/moco#27). Torchvision ResNets with the ImageNet stem only (main_lincls.py builds
  torchvision.models.<arch>()).

Every conversion is loaded with strict=True into the module `build` makes before anything is written; OUT is
written to a temporary file and renamed, so a failure never leaves a half-written OUT. Errors: one line, exit 2.
"""
import argparse
import os
import pickle
import re
import sys

import torch

from moco import UserError, load_checkpoint  # every script's one checkpoint reader and its one-line errors


# ----------------------------------------------------------------------------------------------------
# 1. The backbone of each checkpoint layout
# ----------------------------------------------------------------------------------------------------
RESNET = re.compile(r"(resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_\d+)$")  # torchvision's ResNet family
# dim.py's ResNet Encoder holds torchvision's modules in stages (dim.py build_encoder):
# to_local = (conv1, bn1, relu, maxpool, layer1, layer2, layer3), to_conv = layer4
DIM_TO_TORCHVISION = {"to_local.0.": "conv1.", "to_local.1.": "bn1.", "to_local.4.": "layer1.",
                      "to_local.5.": "layer2.", "to_local.6.": "layer3.", "to_conv.": "layer4."}


def strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def layout(ckpt, path):
    """-> 'moco' | 'dim' | 'official'."""
    if ckpt.get("algo") in ("moco", "dim") and all(isinstance(ckpt.get(k), dict) for k in ("model", "args")):
        return ckpt["algo"]
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("module.encoder_q.") for k in sd):
        return "official"
    keys = ", ".join(map(str, list(ckpt)[:4]))
    raise UserError(f"{path} is not a moco.py, dim.py or official MoCo checkpoint (its keys: {keys})")


def torchvision_build(arch, stem):
    """One line of Python that makes `enc`: the torchvision ResNet without its head."""
    line = f"import torch, torchvision; enc = torchvision.models.{arch}(); enc.fc = torch.nn.Identity()"
    if stem == "cifar":  # the MoCo CIFAR notebook's stem: 3x3 stride-1 conv1, no max-pool (moco.py, dim.py)
        line += "; enc.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); enc.maxpool = torch.nn.Identity()"
    return line


def backbone(ckpt, path):
    """-> {"state_dict": the encoder without its head, "arch", "stem", "build"}, checked to load strictly."""
    kind = layout(ckpt, path)
    if kind == "dim":
        a = ckpt["args"]
        arch, size, y_dim = a.get("arch"), a.get("image_size"), a.get("y_dim")
        state = strip(ckpt["model"], "encoder.")
        if arch in ("basic32", "alex64"):  # the whole Encoder: its taps are what dim.py evaluates
            b = dict(state_dict=state, arch=arch, stem=None,
                     build=f"import dim; enc = dim.build_encoder({arch!r}, {size!r}, {y_dim!r})")
            return checked(b, path)
        stem = "cifar" if isinstance(size, int) and size <= 64 else "imagenet"  # as dim.py build_encoder
        state = {dst + k[len(src):]: v for k, v in state.items()
                 for src, dst in DIM_TO_TORCHVISION.items() if k.startswith(src)}  # drops to_fc, to_y
    elif kind == "moco":
        arch, stem = ckpt["args"].get("arch"), ckpt["args"].get("stem", "imagenet")
        state = strip(ckpt["model"], "encoder_q.")
    else:  # main_moco.py trains torchvision.models.<arch> with the ImageNet stem
        arch, stem = ckpt.get("arch", "resnet50"), "imagenet"
        state = strip(ckpt["state_dict"], "module.encoder_q.")
    if kind != "dim":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the head: fc, or v2's fc.0 / fc.2
    if arch == "basic32" and kind == "moco":
        b = dict(state_dict=state, arch=arch, stem=None,
                 build="import torch, moco; enc = moco.Basic32(); enc.fc = torch.nn.Identity()")
    elif isinstance(arch, str) and RESNET.match(arch):
        b = dict(state_dict=state, arch=arch, stem=stem, build=torchvision_build(arch, stem))
    else:
        raise UserError(f"{path}: unknown encoder {arch!r} (basic32, alex64 or a torchvision ResNet)")
    return checked(b, path)


def checked(b, path):
    """Build the module b["build"] makes and load b["state_dict"] into it with strict=True."""
    scope = {}
    try:
        exec(b["build"], scope)
    except (ImportError, AttributeError) as e:  # moco/dim not importable, or a ResNet this torchvision lacks
        hint = ": run convert.py from the folder of moco.py and dim.py" if isinstance(e, ImportError) else ""
        raise UserError(f"cannot build {b['arch']} ({e}){hint}")
    missing, unexpected = [], []
    try:
        missing, unexpected = scope["enc"].load_state_dict(b["state_dict"], strict=False)
    except RuntimeError as e:  # a shape mismatch
        unexpected = [str(e).strip().splitlines()[-1].strip()]
    if missing or unexpected:
        raise UserError(f"{path} does not hold a {b['arch']} encoder: {len(missing)} missing keys "
                        f"(e.g. {missing[:2]}), unexpected or mismatched: {unexpected[:2]}")
    return b


# ----------------------------------------------------------------------------------------------------
# 2. The conversions
# ----------------------------------------------------------------------------------------------------
def detectron2_key(k):
    """torchvision ResNet key -> detectron2 ResNet key, the renaming of facebookresearch/moco
    detection/convert-pretrain-to-detectron2.py: conv1.weight -> stem.conv1.weight,
    layer2.0.bn1.weight -> res3.0.conv1.norm.weight, layer2.0.downsample.1.bias -> res3.0.shortcut.norm.bias."""
    k = k if "layer" in k else "stem." + k  # conv1, bn1 form the stem
    k = re.sub(r"layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", k)  # stages 1-4 are res2-res5
    k = re.sub(r"bn([1-3])", r"conv\1.norm", k)  # each BN is the `norm` of its conv
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(ckpt, path):
    b = backbone(ckpt, path)
    if b["stem"] != "imagenet":
        held = b["arch"] + (f" with the {b['stem']} stem" if b["stem"] else "")
        raise UserError(f"--to detectron2 needs a torchvision ResNet with the ImageNet stem; {path} holds {held} "
                        "(use --to torchvision)")
    # NOTE(deviation): the official script also keeps encoder_q.fc (as stem.fc.*, which detectron2 ignores)
    model = {detectron2_key(k): v.detach().cpu().numpy() for k, v in b["state_dict"].items()}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def to_moco(ckpt, path):
    kind = layout(ckpt, path)
    if kind != "moco":
        raise UserError(f"--to moco reads a moco.py checkpoint; {path} is "
                        + ("a dim.py one" if kind == "dim" else "already in the official layout"))
    b = backbone(ckpt, path)  # checks encoder_q
    if b["stem"] != "imagenet":
        raise UserError(f"--to moco needs a torchvision ResNet with the ImageNet stem (main_lincls.py builds "
                        f"torchvision.models.<arch>()); {path} holds {b['arch']} (use --to torchvision)")
    # moco.py's MoCo has the official builder's state-dict keys; DDP adds `module.`
    return {"state_dict": {"module." + k: v for k, v in ckpt["model"].items()}, "arch": b["arch"]}


CONVERT = {"torchvision": backbone, "detectron2": to_detectron2, "moco": to_moco}
EXTENSIONS = ((".pth.tar", "moco"), (".pkl", "detectron2"), (".pth", "torchvision"), (".pt", "torchvision"))


# ----------------------------------------------------------------------------------------------------
# 3. Files and main
# ----------------------------------------------------------------------------------------------------
def write(obj, out, fmt):
    """Temporary file, fsync, rename: OUT is either complete or untouched."""
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if fmt == "detectron2":
                pickle.dump(obj, f)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert(ckpt_path, out, to=None):
    if to is None:
        to = next((fmt for ext, fmt in EXTENSIONS if out.endswith(ext)), None)
        if to is None:
            raise UserError(f"cannot tell the format from {out!r}: add --to torchvision|detectron2|moco")
    if os.path.exists(out) and os.path.exists(ckpt_path) and os.path.samefile(out, ckpt_path):
        raise UserError(f"OUT {out} is CKPT: choose another file name")
    obj = CONVERT[to](load_checkpoint(ckpt_path), ckpt_path)
    write(obj, out, to)
    n = len(obj["model"] if to == "detectron2" else obj["state_dict"])
    print(f"wrote {out}: {to}, {n} tensors from {ckpt_path}")
    if to == "torchvision":
        print(f"build: {obj['build']}")
    return obj


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="moco.py, dim.py or official MoCo checkpoint")
    p.add_argument("out", help="output file: .pth/.pt torchvision, .pkl detectron2, .pth.tar official MoCo")
    p.add_argument("--to", choices=sorted(CONVERT), help="output format (default: from OUT's extension)")
    args = p.parse_args(argv)
    try:
        convert(args.ckpt, args.out, args.to)
    except UserError as e:
        print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
