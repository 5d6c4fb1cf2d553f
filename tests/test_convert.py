"""Tests for convert.py: each output format loaded by the code that reads it, against the encoder it came from."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import convert
import dim
import eval_linear
import moco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perturb(module, seed):
    """Every float tensor moved off its initial value (BN statistics too), so a tensor loaded into the wrong
    place, or not loaded, changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return module


def moco_ckpt(path, arch="resnet18", stem="imagenet", mlp=True):
    """A moco.py checkpoint: {'algo': 'moco', 'model': MoCo state_dict, 'args'} (moco.py train's save)."""
    torch.manual_seed(0)
    model = perturb(moco.MoCo(partial(moco.build_encoder, arch, stem), dim=16, K=32, mlp=mlp), 1)
    args = dataclasses.asdict(dataclasses.replace(moco.Args(), arch=arch, stem=stem, mlp=mlp))
    torch.save({"algo": "moco", "model": model.state_dict(), "args": args, "epoch": 1}, path)
    enc = model.encoder_q
    enc.fc = nn.Identity()
    return enc.eval()  # the reference: the checkpoint's encoder without its head


class OfficialMoCo(nn.Module):
    """The state-dict keys of facebookresearch/moco moco/builder.py MoCo(torchvision.models.resnet18)."""

    def __init__(self, dim=16, K=32):
        super().__init__()
        self.encoder_q = torchvision.models.resnet18(num_classes=dim)
        self.encoder_k = torchvision.models.resnet18(num_classes=dim)
        self.register_buffer("queue", torch.randn(dim, K))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def official_ckpt(path, arch="resnet18"):
    """main_moco.py's save under DDP: {'epoch', 'arch', 'state_dict': {module.*}, 'optimizer'}."""
    torch.manual_seed(0)
    model = perturb(OfficialMoCo(), 2)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {}}, path)
    enc = model.encoder_q
    enc.fc = nn.Identity()
    return enc.eval()


def dim_ckpt(path, arch="resnet18", image_size=32):
    """A dim.py checkpoint: {'algo': 'dim', 'model': {encoder.*, critics}, 'args'}."""
    torch.manual_seed(0)
    enc = perturb(dim.build_encoder(arch, image_size, 64), 3)
    args = dataclasses.asdict(dataclasses.replace(dim.Args(), arch=arch, image_size=image_size, y_dim=64))
    model = {"encoder." + k: v for k, v in enc.state_dict().items()}
    model["local_critic.w"] = torch.randn(3)  # the DIM model's other parts are not the encoder's
    ckpt = {"algo": "dim", "model": model, "args": args}
    torch.save(ckpt, path)
    return ckpt


def torchvision_resnet18(stem):
    """The target, built by hand as the docstring of convert.py says."""
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    if stem == "cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return net


def run_pasted(code, monkeypatch):
    """The printed lines, run as a user pastes them: a fresh namespace with torch and nn only, moco.py and dim.py
    not importable."""
    scope = {"torch": torch, "nn": nn}
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "moco", None)  # `import moco` would raise ImportError
        m.setitem(sys.modules, "dim", None)
        exec(code, scope)
    return scope["net"]


def exported(out, capsys):
    """OUT and its sidecar -> (the state dict, the sidecar), checked to be the plain formats the docstring says."""
    state = torch.load(out, weights_only=True)
    assert type(state) is dict and all(type(k) is str and type(v) is torch.Tensor for k, v in state.items())
    with open(out + ".json") as f:
        info = json.load(f)
    assert set(info) == {"weights", "arch", "stem", "features", "image_size", "source", "layout", "layer", "taps",
                         "preprocessing", "code", "torch", "torchvision"}
    assert info["weights"] == os.path.basename(out) and info["code"] in capsys.readouterr().out
    imports = {line for line in info["code"].splitlines() if line.startswith(("import", "from"))}
    assert imports <= {"import torch", "import torch, torchvision", "from torch import nn"}, imports
    return state, info


def same(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["moco-imagenet-mlp", "moco-cifar", "official", "dim-resnet18"])
def test_torchvision_round_trip(tmp_path, capsys, monkeypatch, source):
    src, out = tmp_path / "ckpt.pt", str(tmp_path / "backbone.pth")
    stem = "cifar" if source in ("moco-cifar", "dim-resnet18") else "imagenet"
    x = torch.randn(3, 3, 32 if stem == "cifar" else 64, 32 if stem == "cifar" else 64)
    if source.startswith("moco"):
        ref = moco_ckpt(src, stem=stem, mlp=source.endswith("mlp"))
    elif source == "official":
        ref = official_ckpt(src)
    else:  # dim.py's ResNet: the torchvision backbone's output is the conv tap (layer4), average-pooled
        tap = dim.encoder_for_eval(dim_ckpt(src), "conv")
        ref = lambda im: tap(im).mean((2, 3))  # noqa: E731
    convert.main([str(src), out])
    state, info = exported(out, capsys)
    assert (info["arch"], info["stem"], info["features"], info["taps"]) == ("resnet18", stem, 512, None)
    assert info["layout"] == source.split("-")[0] and info["source"] == str(src)
    assert not any(k.startswith("fc.") for k in state)
    net = torchvision_resnet18(stem)  # the docstring's line, by hand
    net.load_state_dict(torch.load(out), strict=True)
    with torch.no_grad():
        want = ref(x)
        same(net.eval()(x), want)
        same(run_pasted(info["code"], monkeypatch)(x), want)


def docs_transform(sidecar, image):
    """docs/evaluation.md's lines that build the input of an export from its sidecar, run on `image` -> x."""
    import re
    text = open(os.path.join(ROOT, "docs", "evaluation.md")).read()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if '["preprocessing"]' in b)
    scope = {}
    import textwrap
    exec(textwrap.dedent(code).replace("r50.pth.json", str(sidecar)).replace("cat.jpg", str(image)), scope)
    return scope["x"]


@pytest.mark.parametrize("source, size, stats", [("folder", 224, "imagenet"), ("built-in", 32, "fashionmnist"),
                                                 ("cifar10", 32, "cifar10"), ("official", 224, "imagenet"),
                                                 ("dim-stl10", 64, "stl10")])
def test_sidecar_preprocessing_reproduces_the_evaluated_features(tmp_path, capsys, monkeypatch, source, size, stats):
    """The sidecar's preprocessing, through docs/evaluation.md's lines, gives the tensor moco.test_transform gives
    (the view eval_linear.py and the kNN monitor encode), for a colour and a greyscale image of another shape; and,
    for a 224-pixel folder run, the exported net's features of it equal eval_linear.py's encoder's."""
    from PIL import Image
    src, out = tmp_path / "ckpt.pt", str(tmp_path / "enc.pth")
    if source == "official":
        ref = official_ckpt(src)
    elif source.startswith("dim"):
        dim_ckpt(src, "alex64", 64)
        ck = torch.load(src, weights_only=False)
        ck["args"].update(data="~/stl", dataset="stl10")
        torch.save(ck, src)
    else:
        ref = moco_ckpt(src)
        ck = torch.load(src, weights_only=False)
        ck["args"].update(image_size=size, data={"built-in": ""}.get(source, "~/x"),
                          dataset={"cifar10": "cifar10"}.get(source, "folder"))
        torch.save(ck, src)
    convert.main([str(src), out])
    info = exported(out, capsys)[1]
    assert (info["preprocessing"]["stats"], info["preprocessing"]["crop"]) == (stats, size)
    rng = np.random.default_rng(0)
    for name, img in (("rgb.png", Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))),
                      ("grey.png", Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8)))):
        img.save(tmp_path / name)
        x = docs_transform(out + ".json", tmp_path / name)
        want = moco.test_transform(size, stats)(moco.to_rgb(Image.open(tmp_path / name)))
        assert x.shape == (1, 3, size, size) and torch.equal(x[0], want)
    if source == "folder":
        net = run_pasted(info["code"], monkeypatch)
        with torch.no_grad():
            same(net(x), ref(want[None]))


@pytest.mark.parametrize("source", ["moco-basic32", "dim-basic32", "dim-alex64"])
def test_plain_pytorch_round_trip(tmp_path, capsys, monkeypatch, source):
    """Encoders torchvision lacks: the printed nn.Sequential of standard layers loads OUT strictly and gives the
    features of the encoder in the checkpoint (dim.py's: each tap)."""
    algo, arch = source.split("-")
    src, out = tmp_path / "ckpt.pt", str(tmp_path / "enc.pt")
    size = 64 if arch == "alex64" else 32
    x = torch.randn(4, 3, size, size)
    if algo == "moco":
        ref = moco_ckpt(src, arch="basic32", stem="cifar", mlp=False)  # Basic32 with fc = Identity: 1024 features
    else:
        enc = dim.encoder_for_eval(dim_ckpt(src, arch, image_size=size), "y").encoder  # eval(), as dim.py evaluates
    convert.main([str(src), out])
    state, info = exported(out, capsys)
    net = run_pasted(info["code"], monkeypatch)
    assert all(type(m).__module__.startswith("torch.nn.") for m in net.modules())  # standard layers only
    with torch.no_grad():
        if algo == "moco":
            assert (info["arch"], info["features"], info["taps"]) == ("basic32", 1024, None)
            same(net(x), ref(x))
        else:
            assert (info["arch"], info["features"], info["image_size"]) == (arch, 64, size)
            stages = {"local": net[:1], "conv": net[:2], "fc": net[:3], "y": net}
            assert {t: v["module"] for t, v in info["taps"].items()} == {
                "local": "net[:1]", "conv": "net[:2]", "fc": "net[:3]", "y": "net"}
            for t, stage in stages.items():
                assert list(stage(x).shape[1:]) == info["taps"][t]["shape"]
            for t, want in enc(x).items():  # {tap: features}
                same(stages[t](x), want)


def test_plain_code_of_other_layers():
    assert convert.layer_code(nn.Conv2d(3, 8, 5, 1, 2)) == "nn.Conv2d(3, 8, 5, 1, 2)"
    for m in (nn.GELU(), nn.Conv2d(3, 8, 3, groups=1, dilation=2), nn.BatchNorm2d(8, eps=1e-3)):
        with pytest.raises(convert.UserError, match="cannot write"):
            convert.layer_code(m)


# ----------------------------------------------------------------------------------------------------
# detectron2
# ----------------------------------------------------------------------------------------------------
# hand-written from facebookresearch/moco detection/convert-pretrain-to-detectron2.py
D2_EXPECTED = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.running_mean": "stem.conv1.norm.running_mean",
    "bn1.num_batches_tracked": "stem.conv1.norm.num_batches_tracked",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
    "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
    "layer2.0.downsample.1.weight": "res3.0.shortcut.norm.weight",
    "layer3.1.conv2.weight": "res4.1.conv2.weight",
    "layer4.0.downsample.1.running_var": "res5.0.shortcut.norm.running_var",
    "layer4.1.bn2.running_var": "res5.1.conv2.norm.running_var",
}


@pytest.mark.parametrize("source", ["official", "moco-mlp"])
def test_detectron2_renaming(tmp_path, source):
    src, out = tmp_path / "ckpt.pth.tar", str(tmp_path / "d2.pkl")
    ref = official_ckpt(src) if source == "official" else moco_ckpt(src, mlp=True)
    convert.main([str(src), out])
    with open(out, "rb") as f:
        d2 = pickle.load(f)
    assert set(d2) == {"model", "__author__", "matching_heuristics"}
    assert d2["__author__"] == "MOCO" and d2["matching_heuristics"] is True
    model, tv = d2["model"], ref.state_dict()  # tv: the encoder's keys without fc
    assert all(type(v) is np.ndarray for v in model.values())
    assert len(model) == len(tv) == 120  # resnet18: 122 keys, less fc.weight and fc.bias
    for k, k2 in D2_EXPECTED.items():
        np.testing.assert_array_equal(model[k2], tv[k].numpy())
    for k in model:
        assert k.split(".")[0] in ("stem", "res2", "res3", "res4", "res5"), k
        assert not any(s in k for s in ("fc", "layer", "bn", "downsample")), k


def test_detectron2_bottleneck_keys():
    expected = {"layer1.0.bn3.weight": "res2.0.conv3.norm.weight", "layer3.5.conv3.weight": "res4.5.conv3.weight",
                "layer1.0.downsample.1.running_mean": "res2.0.shortcut.norm.running_mean"}
    assert {k: convert.detectron2_key(k) for k in expected} == expected


# ----------------------------------------------------------------------------------------------------
# The official layout
# ----------------------------------------------------------------------------------------------------
def test_moco_to_official_layout(tmp_path):
    src, out = tmp_path / "ckpt.pt", str(tmp_path / "checkpoint_0001.pth.tar")
    ref = moco_ckpt(src, mlp=True)
    convert.main([str(src), out])
    saved = torch.load(out, weights_only=True)
    mine = torch.load(src, weights_only=False)["model"]
    assert saved["arch"] == "resnet18" and set(saved["state_dict"]) == {"module." + k for k in mine}
    assert {"module.queue", "module.queue_ptr"} <= set(saved["state_dict"])
    for k, v in mine.items():
        assert torch.equal(saved["state_dict"]["module." + k], v), k
    # main_lincls.py: torchvision.models.<arch>(), module.encoder_q.* minus fc, only fc missing
    net = torchvision.models.resnet18()
    state = {k[len("module.encoder_q."):]: v for k, v in saved["state_dict"].items()
             if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc")}
    msg = net.load_state_dict(state, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    # eval_linear.py's official-checkpoint branch gives the same backbone as the moco.py checkpoint
    x = torch.randn(3, 3, 64, 64)
    official, info = eval_linear.load_encoder(eval_linear.parse_args(["--pretrained", out]))
    assert info["algo"] == "moco-official"
    ours, _ = eval_linear.load_encoder(eval_linear.parse_args(["--pretrained", str(src)]))
    with torch.no_grad():
        same(official.eval()(x), ref(x))
        same(ours.eval()(x), ref(x))


# ----------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no OUT
# ----------------------------------------------------------------------------------------------------
def make_bad(tmp_path, case):
    """-> (CKPT, OUT, extra arguments, a word the message must contain)."""
    p = tmp_path / "in.pt"
    if case == "missing":
        return tmp_path / "nope.pt", "out.pth", [], "does not exist"
    if case == "truncated":
        official_ckpt(p)
        p.write_bytes(p.read_bytes()[:5000])
        return p, "out.pth", [], "truncated"
    if case == "not-torch":
        p.write_text("hello\n")
        return p, "out.pth", [], "truncated"
    if case == "foreign":
        torch.save({"weights": {"conv.weight": torch.zeros(1)}}, p)
        return p, "out.pth", [], "not a moco.py, dim.py or official"
    if case == "wrong-arch":  # resnet18 weights that say resnet50
        official_ckpt(p, arch="resnet50")
        return p, "out.pth", [], "does not hold a resnet50"
    if case == "unknown-resnet":
        official_ckpt(p, arch="resnet1000")
        return p, "out.pth", [], "no such model"
    if case == "basic32-to-d2":
        moco_ckpt(p, arch="basic32", stem="cifar", mlp=False)
        return p, "out.pkl", [], "ImageNet stem"
    if case == "cifar-to-d2":
        moco_ckpt(p, stem="cifar", mlp=False)
        return p, "out.bin", ["--to", "detectron2"], "cifar stem"
    if case == "dim-to-moco":
        dim_ckpt(p)
        return p, "out.pth.tar", [], "dim.py"
    if case == "no-extension":
        official_ckpt(p)
        return p, "out.bin", [], "--to"
    official_ckpt(p)  # unwritable
    return p, os.path.join("no_such_folder", "out.pth"), [], "cannot write"


@pytest.mark.parametrize("case", ["missing", "truncated", "not-torch", "foreign", "wrong-arch", "unknown-resnet",
                                  "basic32-to-d2",
                                  "cifar-to-d2", "dim-to-moco", "no-extension", "unwritable"])
def test_user_errors(tmp_path, capsys, case):
    src, out, extra, word = make_bad(tmp_path, case)
    out = str(tmp_path / out)
    before = set(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        convert.main([str(src), out, *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and word in err, err
    assert set(os.listdir(tmp_path)) == before  # no OUT, no temporary file


def test_failed_write_keeps_old_out(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "ckpt.pt", tmp_path / "backbone.pth"
    official_ckpt(src)
    out.write_bytes(b"old")
    (tmp_path / "backbone.pth.json").write_bytes(b"old sidecar")

    def full_disk(obj, f):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(convert.torch, "save", full_disk)
    with pytest.raises(SystemExit):
        convert.main([str(src), str(out)])
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and (tmp_path / "backbone.pth.json").read_bytes() == b"old sidecar"
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "backbone.pth.json", "ckpt.pt"]


def test_command_line(tmp_path):
    p = tmp_path / "foreign.pt"
    torch.save([1, 2], p)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), str(p), str(tmp_path / "o.pth")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == f"error: {p} is not a checkpoint dict (found: list)\n", r.stderr
    assert not (tmp_path / "o.pth").exists()
