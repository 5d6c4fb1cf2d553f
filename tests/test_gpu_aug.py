"""Tests for the batched augmentation (gpu_aug.py) and moco.py --gpu-aug, on the CPU.
References are independent: torchvision's functional ops and RandomResizedCrop.get_params, PIL resizing,
F.interpolate, and plain indexing."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import dim
import gpu_aug
import moco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = dict(jitter_p=0.0, grey_p=0.0, blur_p=0.0, flip_p=0.0, mean_std=((0.0,) * 3, (1.0,) * 3))  # crop only


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and much faster on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n=8, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def batch_augment(args, stats, channels_last=False):
    """moco.py's --gpu-aug augmentation for these flags (moco.batch_prepare)."""
    return gpu_aug.moco_augment(args.aug, args.image_size, args.crop_min, moco.MEAN_STD[stats], channels_last)


@pytest.mark.parametrize("aug", ["v1", "v2", "cifar"])
@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (30, 41)])
def test_shapes_dtypes_ranges(aug, hw):
    args, _ = moco.parse_args(["--aug", aug, "--image-size", "24"])
    out = batch_augment(args, "cifar10")(images(6, *hw), gen(0))
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in moco.MEAN_STD["cifar10"])
    raw = out * std + mean  # undo the normalisation: pixels in [0, 1]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    last = batch_augment(args, "cifar10", channels_last=True)(images(6, *hw), gen(0))
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)


def test_same_seed_same_views_other_seed_other_views():
    args, _ = moco.parse_args(["--aug", "v2", "--image-size", "32"])
    aug, x = batch_augment(args, "imagenet"), images(16)
    a, b, c = aug(x, gen(3)), aug(x, gen(3)), aug(x, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(3)
    first, second = aug(x, g), aug(x, g)  # two views from one generator differ
    assert torch.equal(first, a) and not torch.equal(first, second)


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (40, 40)])
def test_full_crop_without_flip_or_colour_is_a_plain_resize(hw):
    x = images(4, *hw)
    out = gpu_aug.BatchAugment(32, scale=(1.0, 1.0), **PLAIN)(x, gen(0))
    ref = F.interpolate(x.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-5)
    if hw[0] <= 32:  # enlarging: PIL's bilinear filter is the same interpolation, up to its uint8 rounding
        for i in range(len(x)):
            pil = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((32, 32), Image.BILINEAR)
            pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
            assert (out[i] - pil).abs().max() <= 1 / 255 + 1e-5


def test_flip_flips():
    x = images(8)
    keep = gpu_aug.BatchAugment(32, scale=(0.3, 1.0), **PLAIN)(x, gen(1))
    flipped = gpu_aug.BatchAugment(32, scale=(0.3, 1.0), **{**PLAIN, "flip_p": 1.0})(x, gen(1))
    assert torch.allclose(flipped, keep.flip(-1), atol=1e-5)
    half = gpu_aug.BatchAugment(32, scale=(1.0, 1.0), **{**PLAIN, "flip_p": 0.5})(images(400, 8, 8), gen(2))
    ref = gpu_aug.BatchAugment(32, scale=(1.0, 1.0), **PLAIN)(images(400, 8, 8), gen(2))
    share = (~torch.isclose(half, ref, atol=1e-5).flatten(1).all(1)).float().mean().item()
    assert 0.4 < share < 0.6


def test_greyscale_gives_equal_channels_at_rate_p():
    out = gpu_aug.BatchAugment(32, **{**PLAIN, "grey_p": 1.0})(images(8), gen(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    out = gpu_aug.BatchAugment(32, **{**PLAIN, "grey_p": 0.2})(images(1000, 8, 8), gen(0))
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.15 < grey.float().mean().item() < 0.25


@pytest.mark.parametrize("flip", [False, True])
def test_crop_matches_torchvision_resized_crop(flip):
    """Given boxes (the random draws replaced): the view equals torchvision's resized_crop on the PIL image (crop,
    then bilinear resize) up to PIL's uint8 rounding, also at the box's edges when the crop is enlarged."""
    boxes = [(3, 4, 14, 12), (10, 2, 9, 20), (0, 0, 28, 28), (5, 5, 20, 20), (0, 17, 11, 11), (20, 0, 8, 6)]
    B, H, W, S = len(boxes), 28, 28, 32
    top, left, h, w = (torch.tensor([b[i] for b in boxes], dtype=torch.float) for i in range(4))
    draws = iter([(h * w).view(B, 1).expand(B, 10) / (H * W),  # area fraction: every try fits, the first is used
                  (w / h).log().view(B, 1).expand(B, 10),  # log aspect ratio
                  (top + 0.5) / (H - h + 1), (left + 0.5) / (W - w + 1),  # uniforms that floor to top, left
                  torch.full((B,), 0.0 if flip else 1.0)])  # flip when below flip_p
    x = images(B, H, W, seed=3)
    u = lambda *shape, lo=0.0, hi=1.0: next(draws)  # the drawn values themselves, in the order _crop_flip asks

    aug = gpu_aug.BatchAugment(S, scale=(0.0, 1.0), **{**PLAIN, "flip_p": 0.5})
    got = aug._crop_flip(x, u)  # (B, 3, S, S)
    for i, (t, l, bh, bw) in enumerate(boxes):
        pil = TF.resized_crop(Image.fromarray(x[i].permute(1, 2, 0).numpy()), t, l, bh, bw, [S, S])
        want = torch.from_numpy(np.array(TF.hflip(pil) if flip else pil)).permute(2, 0, 1).float() / 255
        assert (got[i] - want).abs().max() <= 1 / 255 + 1e-5, (t, l, bh, bw)


def test_crop_boxes_follow_torchvision_get_params():
    """Images whose red channel is the column and green the row: the output's corners reveal each crop box.
    Relative area and aspect ratio must stay in range and match the distribution of torchvision's get_params."""
    n, H, W, S = 2000, 64, 48, 16
    col, row = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")[::-1]
    x = torch.stack([col, row, torch.zeros_like(col)]).to(torch.uint8).expand(n, 3, H, W)
    out = gpu_aug.BatchAugment(S, scale=(0.2, 1.0), **PLAIN)(x, gen(0)) * 255  # (n, 3, S, S)
    # output pixel centre p maps to left + (p + 0.5) w / S - 0.5: the first and last centres are (S - 1) w / S apart
    w = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) * S / (S - 1)
    h = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) * S / (S - 1)
    area, aspect = w * h / (H * W), w / h
    assert area.min() > 0.2 - 0.03 and area.max() <= 1 + 1e-4
    assert aspect.min() > 3 / 4 - 0.05 and aspect.max() < 4 / 3 + 0.05
    torch.manual_seed(0)
    ref = [T.RandomResizedCrop.get_params(torch.empty(3, H, W), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ref_area = torch.tensor([bh * bw / (H * W) for _, _, bh, bw in ref])
    ref_aspect = torch.tensor([bw / bh for _, _, bh, bw in ref])
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    assert abs(aspect.log().mean() - ref_aspect.log().mean()) < 0.03
    # the offsets cover the image: left edges from 0 up to W - w
    left = out[:, 0, 0, 0] - 0.5 * w / S + 0.5
    assert left.min() < 0.5 and (left + w).max() > W - 0.5 and (left >= -1e-3).all() and (left + w <= W + 1e-3).all()


def test_colour_steps_match_torchvision_functional():
    y = images(6).float() / 255
    aug = gpu_aug.BatchAugment(32)
    f = torch.tensor([0.6, 0.9, 1.1, 1.4, 1.0, 1.25])
    one = torch.ones(6)
    for step, ref in enumerate([TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]):
        k = torch.stack([f if s == step else one for s in range(3)] + [torch.zeros(6)], 1)  # (6, 4)
        got = aug._adjust(y, k)
        want = torch.stack([ref(y[i], f[i].item()) for i in range(6)])
        assert torch.allclose(got, want, atol=1e-5), ref.__name__
    shift = torch.tensor([-0.4, -0.1, 0.0, 0.05, 0.3, 0.5])
    k = torch.stack([one, one, one, shift], 1)
    got = aug._adjust(y, k, torch.ones(6, dtype=torch.bool))
    want = torch.stack([TF.adjust_hue(y[i], shift[i].item()) for i in range(6)])
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(aug._adjust(y, torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(6, 4)), y)  # identity is exact


def test_jitter_statistics():
    """Brightness alone on mid-grey images: the factor out/in is U[0.6, 1.4] for a share jitter_p of samples."""
    x = torch.full((2000, 3, 8, 8), 100, dtype=torch.uint8)
    aug = gpu_aug.BatchAugment(8, scale=(1.0, 1.0), jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.8, grey_p=0.0, flip_p=0.0,
                            mean_std=((0.0,) * 3, (1.0,) * 3))
    factor = aug(x, gen(0)).mean((1, 2, 3)) / (100 / 255)  # (2000,)
    changed = (factor - 1).abs() > 1e-6
    assert 0.77 < changed.float().mean().item() < 0.83
    jit = factor[changed]
    assert jit.min() >= 0.6 - 1e-5 and jit.max() <= 1.4 + 1e-5 and jit.min() < 0.62 and jit.max() > 1.38
    assert abs(jit.mean().item() - 1.0) < 0.03 and abs(jit.var().item() - 0.8 ** 2 / 12) < 0.01


def test_colour_order_is_random_per_sample():
    """Contrast then brightness differs from brightness then contrast once clamping bites: with the same factors,
    different samples of one batch must show both orders."""
    x = images(1, 16, 16).expand(400, 3, 16, 16)
    aug = gpu_aug.BatchAugment(16, scale=(1.0, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=1.0, grey_p=0.0, flip_p=0.0,
                            mean_std=((0.0,) * 3, (1.0,) * 3))
    g = gen(0)
    out = aug(x, g)
    y = x.float() / 255
    g = gen(0)  # replay the draws: crop tries (area, aspect), top, left, flip; then jitter on/off, b, c
    for shape in [(400, 10), (400, 10), (400,), (400,), (400,), (400,)]:
        torch.rand(*shape, generator=g)
    b, c = (torch.rand(400, generator=g) * (1.4 - 0.6) + 0.6 for _ in range(2))
    bc = torch.stack([TF.adjust_contrast(TF.adjust_brightness(y[i], b[i].item()), c[i].item()) for i in range(400)])
    cb = torch.stack([TF.adjust_brightness(TF.adjust_contrast(y[i], c[i].item()), b[i].item()) for i in range(400)])
    is_bc = torch.isclose(out, bc, atol=1e-5).flatten(1).all(1)
    is_cb = torch.isclose(out, cb, atol=1e-5).flatten(1).all(1)
    assert (is_bc | is_cb).all() and (is_bc & ~is_cb).any() and (is_cb & ~is_bc).any()


def test_blur_is_a_gaussian():
    y = images(2, 40, 40).float() / 255
    aug = gpu_aug.BatchAugment(40, blur_sigma=(1.5, 1.5))
    got = aug._blur(y, torch.tensor([True, False]), torch.tensor([1.5, 1.5]))
    r = math.ceil(3 * 1.5)
    want = TF.gaussian_blur(y[0], [2 * r + 1] * 2, [1.5, 1.5])  # reflect padding: compare the interior only
    assert torch.allclose(got[0, :, r:-r, r:-r], want[:, r:-r, r:-r], atol=1e-5)
    assert torch.equal(got[1], y[1])  # not selected: unchanged
    flat = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(aug._blur(flat, torch.tensor([True]), torch.tensor([2.0])), flat, atol=1e-6)


class FakeTV:
    """What device_images reads from a torchvision data set: `.data` and `.targets` or `.labels`."""

    def __init__(self, data, **labels):
        self.data = data
        self.__dict__.update(labels)


def test_device_images_from_every_in_memory_layout(image_folder):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x = gpu_aug.device_images(moco.ArrayData(grey, range(5)), torch.device("cpu"))
    assert x.shape == (5, 3, 28, 28) and x.dtype == torch.uint8
    assert all(torch.equal(x[:, c], torch.from_numpy(grey)) for c in range(3))
    x = gpu_aug.device_images(moco.ArrayData(rgb, [1] * 5), torch.device("cpu"))
    for i in range(5):  # the same pixels as the CPU loader's PIL image
        assert torch.equal(x[i].permute(1, 2, 0), torch.from_numpy(np.array(moco.ArrayData(rgb, [1] * 5)[i][0])))
    cases = [(FakeTV(rgb, targets=[2] * 5), torch.from_numpy(rgb)),  # CIFAR: numpy (N, H, W, 3), list
             (FakeTV(torch.from_numpy(grey), targets=torch.zeros(5)), torch.from_numpy(grey)[..., None]),  # MNIST
             (FakeTV(rgb.transpose(0, 3, 1, 2).copy(), labels=np.zeros(5)), torch.from_numpy(rgb))]  # STL-10
    for ds, ref in cases:
        x = gpu_aug.device_images(ds, torch.device("cpu"))
        assert torch.equal(x.permute(0, 2, 3, 1), ref.expand(5, *ref.shape[1:3], 3))
        assert gpu_aug.device_images(ds, torch.device("cpu"), max_side=27) is None  # 28 and 32 px: too large
    assert gpu_aug.device_images(moco.Folder(image_folder), torch.device("cpu")) is None
    assert gpu_aug.device_images(FakeTV(rgb.astype(np.float32)), torch.device("cpu")) is None  # not uint8


def test_device_batches_follow_the_epoch_sampler_and_resume():
    x = images(40, 8, 8)
    sampler = moco.EpochSampler(40, 8, seed=3)
    sampler.epoch = 2
    order = torch.tensor([i for i, _ in sampler]).view(-1, 8)  # (5, 8)
    got = list(gpu_aug.batches(x, lambda b, g: b, 2, sampler, 3, 2))
    assert len(got) == 5 and all(torch.equal(q, x[o]) and torch.equal(k, x[o]) for (q, k), o in zip(got, order))
    aug = gpu_aug.BatchAugment(8)
    full = list(gpu_aug.batches(x, aug, 2, sampler, 3, 2))
    sampler.skip = 3  # resumed at step 3 of the epoch: the same last two pairs
    tail = list(gpu_aug.batches(x, aug, 2, sampler, 3, 2))
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
    assert not torch.equal(full[0][0], full[0][1])  # two different views of each image


TINY = ["--batch-size", "32", "--moco-k", "64", "--bn-splits", "1", "--workers", "0", "--knn-every", "0",
        "--log-every", "1", "--device", "cpu", "--gpu-aug", "on"]


def test_script_with_gpu_aug_runs_and_resumes_exactly(tmp_path, capsys):
    """python moco.py --gpu-aug on on the CPU; 4 steps straight == 2 steps, stop, resume to 4. --fused off in
    all three: the subprocess and this process must take the same loss path (on a fresh clone the extension is
    importable here, built by tests/test_ext.py, but not in the subprocess)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the thread count of this process (one_thread): the same sums
    flags = TINY + ["--fused", "off"]
    r = subprocess.run([sys.executable, "moco.py", "--out", a, "--max-steps", "4"] + flags,
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "uint8 on cpu, augmented there in batches" in r.stdout and "done: 4 steps" in r.stdout
    moco.main(flags + ["--out", b, "--max-steps", "2"])
    moco.main(flags + ["--out", b, "--max-steps", "4", "--resume", "auto"])
    assert "resumed" in capsys.readouterr().out
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=False)
    assert ca["step"] == cb["step"] == 4
    for key, va in ca["model"].items():
        assert torch.equal(va, cb["model"][key]), key
    la = [json.loads(s) for s in open(os.path.join(a, "metrics.jsonl"))]
    lb = [json.loads(s) for s in open(os.path.join(b, "metrics.jsonl"))]
    assert [m["step"] for m in la] == [1, 2, 3, 4] and all(0 <= m["data_wait"] <= 1 for m in la)
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]


@pytest.mark.parametrize("script", [moco, dim])
@pytest.mark.parametrize("side,mode,device_path", [(28, "auto", True), (64, "auto", True), (65, "auto", False),
                                                    (96, "auto", False), (96, "on", True)])
def test_gpu_aug_auto_on_cpu_takes_the_device_path_for_small_images_only(script, side, mode, device_path):
    """--gpu-aug auto on the CPU: in-memory images of at most 64 px are augmented in batches (measured faster,
    docs/speed.md), larger ones by the CPU loader; on forces the batched path (off: the script never asks)."""
    ds = script.ArrayData(np.zeros((8, side, side), dtype=np.uint8), [0] * 8)
    args = script.Args(gpu_aug=mode, image_size=32, **({"aug": "none"} if script is dim else {}))
    cpu = torch.device("cpu")
    got = gpu_aug.device_path(ds, args, cpu, script.EpochSampler(8, 4, 0), print,
                              lambda: script.batch_prepare(gpu_aug, args, "fashionmnist", cpu))
    assert (got is not None) == device_path
    if got is not None:  # two views for moco.py, one for dim.py, of the sampler's batches of 4
        batch = list(got(0))[0]
        views = batch if script is moco else [batch]
        assert [v.shape for v in views] == [(4, 3, 32, 32)] * (2 if script is moco else 1)


def test_gpu_aug_auto_on_the_builtin_data_and_bad_value_is_a_user_error(tmp_path, capsys):
    moco.main(TINY[:-1] + ["auto", "--out", str(tmp_path / "o"), "--max-steps", "1"])
    assert "uint8 on cpu, augmented there in batches" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        moco.main(TINY[:-1] + ["maybe", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "argument --gpu-aug: invalid choice" in capsys.readouterr().err
    moco.main(TINY[:-1] + ["off", "--out", str(tmp_path / "o2"), "--max-steps", "1"])
    assert "augmented by the CPU loader" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_views_are_reproducible_and_never_sync_with_the_host():
    args, _ = moco.parse_args(["--aug", "v2", "--image-size", "32"])
    aug, x = batch_augment(args, "imagenet", channels_last=True), images(64).cuda()
    aug(x, torch.Generator("cuda").manual_seed(0))  # the constants are made once, here
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = aug(x, torch.Generator("cuda").manual_seed(1))
        b = aug(x, torch.Generator("cuda").manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(a, b) and a.shape == (64, 3, 32, 32) and a.is_contiguous(memory_format=torch.channels_last)
