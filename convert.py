"""Convert moco.py, dim.py and official MoCo checkpoints into the formats other code reads.

    python convert.py runs/moco/ckpt.pt r18.pth                 # torchvision state dict (.pth, .pt) + r18.pth.json
    python convert.py moco_v2_200ep_pretrain.pth.tar r50.pkl    # detectron2 backbone   (.pkl)
    python convert.py runs/moco/ckpt.pt checkpoint_0199.pth.tar # official MoCo layout  (.pth.tar)
    python convert.py runs/dim/ckpt.pt dim_enc.pt --to torchvision

CKPT is a moco.py checkpoint ({"algo": "moco", "model": {encoder_q.*, ...}, "args": {arch, stem, ...}}), a dim.py
one ({"algo": "dim", "model": {encoder.*, ...}, "args": {arch, image_size, y_dim, ...}}) or an official MoCo one
(facebookresearch/moco main_moco.py: {"state_dict": {module.encoder_q.*, ...}, "arch"}). --to defaults to the
format OUT's extension names; any other extension needs --to.

Formats
- torchvision: OUT is a plain state dict (str -> tensor, torch.load(OUT, weights_only=True)) of the checkpoint's
  encoder without its head (fc, or the v2 MLP fc.0/fc.2), for a module made of torch and torchvision alone:
      net = torchvision.models.resnet18(); net.fc = nn.Identity(); net.load_state_dict(torch.load("r18.pth"))
  With stem "cifar" (the MoCo CIFAR notebook's) also net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and
  net.maxpool = nn.Identity(). net(images) is (N, features), the average-pooled last stage. Encoders torchvision
  lacks load into an nn.Sequential of standard layers: moco.py's basic32 (1024 features) and dim.py's basic32
  and alex64, which keep their four stages (net.to_local, to_conv, to_fc, to_y: net(x) = Y, net[:2](x) the conv
  tap, net[:3](x) the fc tap); dim.py's ResNets become torchvision ResNets (net(x) = the conv tap, layer4,
  average-pooled; the fc tap and Y are dropped). Nobody needs moco.py or dim.py to load any of them.
  convert.py prints the few lines of Python that build `net` and load OUT strictly; the sidecar OUT.json
  (r18.pth.json, beside OUT) holds them as text under "code", with how OUT was made: {"weights": OUT's file
  name, "arch", "stem" (imagenet, cifar or null), "features": the width of net(x), "image_size": the training
  crop (null if the checkpoint does not say), "source": CKPT, "layout": moco|dim|official, "layer": what net(x)
  is, "taps": for dim.py's basic32/alex64 {tap: {"module": "net[:2]", "shape": [C, H, W]}}, else null,
  "preprocessing": the test view the features are made from, {"mode": "RGB", "resize", "crop", "mean", "std",
  "stats": the data set they are of, "transform": the torchvision line}, "code", "torch", "torchvision": the versions
  that wrote it}. The code is to read and paste, not to exec.
- detectron2: the pickle of facebookresearch/moco detection/convert-pretrain-to-detectron2.py,
  {"model": {detectron2 key: numpy array}, "__author__": "MOCO", "matching_heuristics": True}, for
  `MODEL.WEIGHTS out.pkl`. Torchvision ResNets with the ImageNet stem only.
- moco: {"state_dict": {module.encoder_q.*, module.encoder_k.*, module.queue, module.queue_ptr}, "arch"}, the
  layout main_moco.py saves, from a moco.py checkpoint; main_lincls.py --pretrained and eval_linear.py read it.
  It has no "epoch" or "optimizer", so main_moco.py --resume cannot continue from it (as with the released
  weights, facebookresearch/moco#27). Torchvision ResNets with the ImageNet stem only (main_lincls.py builds
  torchvision.models.<arch>()).

Every conversion is loaded with strict=True into the module it is for before anything is written; OUT (and its
sidecar) is written to a temporary file and renamed, so a failure never leaves a half-written OUT. Errors: one
line, exit 2.
"""
import argparse
import json
import os
import pickle
import re

import torch
import torch.nn as nn
import torchvision

import moco
from moco import UserError, load_checkpoint  # every script's one checkpoint reader and its one-line errors


# ----------------------------------------------------------------------------------------------------
# 1. The backbone of each checkpoint layout, as a module of torch and torchvision alone
# ----------------------------------------------------------------------------------------------------
RESNET = re.compile(r"(resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_\d+)$")  # torchvision's ResNet family
# dim.py's ResNet Encoder holds torchvision's modules in stages (dim.py build_encoder):
# to_local = (conv1, bn1, relu, maxpool, layer1, layer2, layer3), to_conv = layer4
DIM_TO_TORCHVISION = {"to_local.0.": "conv1.", "to_local.1.": "bn1.", "to_local.4.": "layer1.",
                      "to_local.5.": "layer2.", "to_local.6.": "layer3.", "to_conv.": "layer4."}
DIM_STAGES = ("to_local", "to_conv", "to_fc", "to_y")  # dim.py Encoder; the taps local, conv, fc, y


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


def torchvision_resnet(arch, stem):
    """-> (the torchvision ResNet without its head, the lines of Python that make it as `net`)."""
    if not hasattr(torchvision.models, arch):
        raise UserError(f"cannot build {arch}: torchvision {torchvision.__version__} has no such model")
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    code = ["import torch, torchvision", "from torch import nn", f"net = torchvision.models.{arch}()",
            "net.fc = nn.Identity()"]
    if stem == "cifar":  # the MoCo CIFAR notebook's stem: 3x3 stride-1 conv1, no max-pool (moco.py, dim.py)
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        code += ["net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem", "net.maxpool = nn.Identity()"]
    return net, code


def backbone(ckpt, path):
    """-> {"state_dict": the encoder without its head, "net": the module of torch/torchvision it loads into with
    strict=True, "code": lines that make `net`, "arch", "stem", "image_size", "layout", "layer", "taps"}."""
    kind = layout(ckpt, path)
    a = ckpt.get("args", {})
    b = dict(layout=kind, image_size=a.get("image_size") or None, taps=None)
    if kind == "dim":
        arch, size = a.get("arch"), a.get("image_size") or (64 if a.get("arch") == "alex64" else 32)
        state = strip(ckpt["model"], "encoder.")
        if arch in ("basic32", "alex64"):  # the whole Encoder, its stages as they are: the taps dim.py evaluates
            import dim  # lazily: only this branch builds from dim.py's definition
            enc = dim.build_encoder(arch, size, a.get("y_dim", 64))
            net = nn.Sequential()
            for name in DIM_STAGES:
                net.add_module(name, getattr(enc, name))
            b.update(taps={t: {"module": f"net[:{i + 1}]" if i < 3 else "net"} for i, t in enumerate(dim.TAPS)},
                     layer="dim.py's whole Encoder: net(x) = Y; the taps net[:1] local, net[:2] conv, net[:3] fc")
            return checked(dict(b, state_dict=state, net=net, code=plain_code(net), arch=arch, stem=None,
                                image_size=size), path)
        stem = "cifar" if size <= 64 else "imagenet"  # as dim.py build_encoder
        state = {dst + k[len(src):]: v for k, v in state.items()
                 for src, dst in DIM_TO_TORCHVISION.items() if k.startswith(src)}  # drops to_fc, to_y
        b["layer"] = "dim.py's conv tap (layer4), average-pooled; the fc tap and Y are not kept"
    elif kind == "moco":
        arch, stem = a.get("arch"), a.get("stem", "imagenet")
        state = strip(ckpt["model"], "encoder_q.")
    else:  # main_moco.py trains torchvision.models.<arch> with the ImageNet stem
        arch, stem = ckpt.get("arch", "resnet50"), "imagenet"
        state = strip(ckpt["state_dict"], "module.encoder_q.")
    if kind != "dim":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the head: fc, or v2's fc.0 / fc.2
        b["layer"] = "encoder_q without its head (fc, or the v2 MLP): the average-pooled last stage"
    if arch == "basic32" and kind == "moco":  # Basic32 = features (an nn.Sequential of standard layers) + fc
        net = nn.Sequential(*moco.Basic32().features)
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
        b = dict(b, state_dict=state, net=net, code=plain_code(net), arch=arch, stem=None,
                 layer="encoder_q without its head fc: Basic32's 1024 features (FC, BN, ReLU)")
    elif isinstance(arch, str) and RESNET.match(arch):
        net, code = torchvision_resnet(arch, stem)
        b = dict(b, state_dict=state, net=net, code=code, arch=arch, stem=stem)
    else:
        raise UserError(f"{path}: unknown encoder {arch!r} (basic32, alex64 or a torchvision ResNet)")
    return checked(b, path)


def checked(b, path):
    """Load b["state_dict"] into b["net"] with strict=True; note the width of net(x) (and the taps' shapes)."""
    missing, unexpected = [], []
    try:
        missing, unexpected = b["net"].load_state_dict(b["state_dict"], strict=False)
    except RuntimeError as e:  # a shape mismatch
        unexpected = [str(e).strip().splitlines()[-1].strip()]
    if missing or unexpected:
        raise UserError(f"{path} does not hold a {b['arch']} encoder: {len(missing)} missing keys "
                        f"(e.g. {missing[:2]}), unexpected or mismatched: {unexpected[:2]}")
    # the width does not depend on the image size except in dim.py's small encoders (their FC reads C x H x W)
    net, size = b["net"].eval(), b["image_size"] if b["taps"] else 32 if b["stem"] in (None, "cifar") else 64
    with torch.no_grad():
        h = x = torch.zeros(1, 3, size, size)
        for t in b["taps"] or {}:  # dim.py's stages one after the other
            h = net[DIM_STAGES.index("to_" + t)](h)
            b["taps"][t]["shape"] = list(h.shape[1:])
        b["features"] = h.shape[1] if b["taps"] else net(x).shape[1]
    return b


# ----------------------------------------------------------------------------------------------------
# 2. The lines of plain PyTorch that make an nn.Sequential of standard layers (moco.py's and dim.py's small
#    encoders), so that a user loads them with torch alone; the test runs these lines as printed
# ----------------------------------------------------------------------------------------------------
def layer_code(m):
    """One standard layer -> the Python that makes it, or UserError for anything else."""
    t, same = type(m), lambda pair: len(set(pair)) == 1
    if t is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros" \
            and same(m.kernel_size) and same(m.stride) and same(m.padding):
        bias = "" if m.bias is not None else ", bias=False"
        return f"nn.Conv2d({m.in_channels}, {m.out_channels}, {m.kernel_size[0]}, {m.stride[0]}, {m.padding[0]}{bias})"
    if t in (nn.BatchNorm1d, nn.BatchNorm2d) and m.affine and m.track_running_stats and m.eps == 1e-5:
        return f"nn.{t.__name__}({m.num_features})"
    if t is nn.Linear:
        return f"nn.Linear({m.in_features}, {m.out_features}{'' if m.bias is not None else ', bias=False'})"
    if t is nn.MaxPool2d and m.padding == 0 and m.dilation == 1 and not m.ceil_mode:
        return f"nn.MaxPool2d({m.kernel_size}, {m.stride})"
    if t is nn.AdaptiveAvgPool2d:
        return f"nn.AdaptiveAvgPool2d({m.output_size})"
    if t is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1):
        return "nn.Flatten()"
    if t is nn.ReLU:
        return "nn.ReLU()"
    raise UserError(f"cannot write {m} as plain PyTorch")


def sequential_code(seq):
    """'nn.Sequential(\\n    conv, bn, relu,\\n    ...\\n)': a line ends after each ReLU or pooling."""
    if not isinstance(seq, nn.Sequential):
        return layer_code(seq)
    lines, line = [], []
    for i, m in enumerate(seq):
        line.append(layer_code(m))
        if i == len(seq) - 1 or isinstance(m, (nn.ReLU, nn.MaxPool2d)) and not isinstance(seq[i + 1], nn.MaxPool2d):
            lines.append("    " + ", ".join(line) + ",")
            line = []
    return "nn.Sequential(\n" + "\n".join(lines) + "\n)"


def plain_code(net):
    """An nn.Sequential of layers (moco.py basic32) or of named stages (dim.py) -> the lines that make `net`."""
    code = ["import torch", "from torch import nn"]
    if all(name.isdigit() for name, _ in net.named_children()):
        return code + ["net = " + sequential_code(net)]
    return code + ["net = nn.Sequential()"] + [f"net.{name} = {sequential_code(m)}" for name, m in net.named_children()]


def load_code(b, out):
    """The lines a user pastes: make `net`, load OUT with strict=True, and what net(x) gives."""
    taps = [f"{v['module']}(x) {t} (N, {', '.join(map(str, v['shape']))})" for t, v in (b["taps"] or {}).items()
            if t != "y"]
    return "\n".join(b["code"] + [f"net.load_state_dict(torch.load({out!r}, weights_only=True))  # strict",
                                  f"net.eval()  # net(x): {'Y ' if taps else ''}(N, {b['features']})"]
                     + (["# taps: " + ", ".join(taps)] if taps else []))


# ----------------------------------------------------------------------------------------------------
# 3. The conversions
# ----------------------------------------------------------------------------------------------------
def preprocessing(ckpt, kind, size):
    """The view of a test image the encoder's features are made from, as moco.py's kNN monitor and eval_linear.py
    make it (moco.test_transform): RGB, resize, centre crop, ToTensor, Normalize with the training data's mean and
    std (ImageNet's for image folders and official checkpoints, the data set's own otherwise)."""
    a = ckpt.get("args", {})
    stats = "imagenet" if kind == "official" else moco.data_stats(moco.Args(data=a.get("data", ""),
                                                                           dataset=a.get("dataset", "folder")))
    size = size or 224  # official checkpoints: ImageNet's 224
    mean, std = (list(v) for v in moco.MEAN_STD[stats])
    resize = int(size / 0.875) if size > 64 else size  # 256 for 224
    return dict(mode="RGB", resize=resize, crop=size, mean=mean, std=std, stats=stats,
                transform=f"T.Compose([T.Resize({resize}), T.CenterCrop({size}), T.ToTensor(), "
                          f"T.Normalize({mean}, {std})])  # import torchvision.transforms as T; on img.convert('RGB')")


def to_torchvision(ckpt, path, out):
    """-> (OUT's state dict, the sidecar's dict)."""
    b = backbone(ckpt, path)
    info = dict(weights=os.path.basename(out), arch=b["arch"], stem=b["stem"], features=b["features"],
                image_size=b["image_size"], source=str(path), layout=b["layout"], layer=b["layer"], taps=b["taps"],
                preprocessing=preprocessing(ckpt, b["layout"], b["image_size"]), code=load_code(b, out),
                torch=torch.__version__, torchvision=torchvision.__version__)
    return b["state_dict"], info


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


FORMATS = ("detectron2", "moco", "torchvision")
EXTENSIONS = ((".pth.tar", "moco"), (".pkl", "detectron2"), (".pth", "torchvision"), (".pt", "torchvision"))


# ----------------------------------------------------------------------------------------------------
# 4. Files and main
# ----------------------------------------------------------------------------------------------------
def write(files):
    """{path: a function that writes the file to an open binary file}: each to a temporary file, fsync'd, then
    all renamed: OUT and its sidecar are either complete or untouched. A failed write (a full disk, a file-size
    limit) is one line."""
    tmps, path, f = {}, None, None
    try:
        for path, dump in files.items():
            tmps[path] = f"{path}.tmp.{os.getpid()}"
            with open(tmps[path], "wb", buffering=0) as raw:
                f = moco.WholeWrites(raw)  # keeps the OSError that torch.save reports as a RuntimeError
                dump(f)
                os.fsync(raw.fileno())
        for path, tmp in tmps.items():
            moco.move(tmp, path)
    except (OSError, RuntimeError) as e:
        e = f.error if f is not None and isinstance(f.error, OSError) else e
        raise UserError(f"cannot write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[-1]}") from None
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def convert(ckpt_path, out, to=None):
    """-> what OUT holds (and, for torchvision, the sidecar's dict)."""
    if to is None:
        to = next((fmt for ext, fmt in EXTENSIONS if out.endswith(ext)), None)
        if to is None:
            raise UserError(f"cannot tell the format from {out!r}: add --to torchvision|detectron2|moco")
    if os.path.exists(out) and os.path.exists(ckpt_path) and os.path.samefile(out, ckpt_path):
        raise UserError(f"OUT {out} is CKPT: choose another file name")
    ckpt = load_checkpoint(ckpt_path)
    missing = [k for k in ("model", "args") if k not in ckpt]
    if ckpt.get("algo") in ("moco", "dim") and missing:
        raise UserError(f"{ckpt_path} lacks {', '.join(map(repr, missing))}: not a whole checkpoint")
    if to == "torchvision":
        state, info = to_torchvision(ckpt, ckpt_path, out)
        write({f"{out}.json": lambda f: f.write(json.dumps(info, indent=1).encode() + b"\n"),
               out: lambda f: torch.save(state, f)})
        print(f"wrote {out}: a state dict of {len(state)} tensors, {info['arch']} ({info['features']} features) "
              f"from {ckpt_path}; how it was made: {out}.json")
        print(f"load it with {'torch and torchvision' if 'torchvision' in info['code'] else 'torch'} alone:")
        print(info["code"])
        return state, info
    obj = (to_detectron2 if to == "detectron2" else to_moco)(ckpt, ckpt_path)
    write({out: (lambda f: pickle.dump(obj, f)) if to == "detectron2" else (lambda f: torch.save(obj, f))})
    print(f"wrote {out}: {to}, {len(obj['model'] if to == 'detectron2' else obj['state_dict'])} tensors "
          f"from {ckpt_path}")
    return obj


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="moco.py, dim.py or official MoCo checkpoint")
    p.add_argument("out", help="output file: .pth/.pt torchvision (and OUT.json), .pkl detectron2, "
                               ".pth.tar official MoCo")
    p.add_argument("--to", choices=FORMATS, help="output format (default: from OUT's extension)")
    args = p.parse_args(argv)
    moco.main(argv, lambda _: convert(args.ckpt, args.out, args.to))  # every error as one line (moco.py's)


if __name__ == "__main__":
    main()
