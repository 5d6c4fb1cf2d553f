"""The speed-only data path of moco.py and dim.py (`--gpu-aug`): an in-memory data set kept as uint8 on the
device (CPU or GPU) and augmented there in batches, every random number drawn from one torch.Generator per step.

Nothing here is part of either algorithm: each script's plain path (torchvision transforms in a DataLoader) is
complete without this file, and the scripts import it only when `--gpu-aug` turns it on. The augmentations are
the batched twins of the scripts' torchvision pipelines (tests/test_gpu_aug.py and tests/test_dim.py hold them to
those: same distributions, per-sample checks where the draws can be matched), so the two paths train the same
models up to the noise of the draws (docs/speed.md: the loss curves of tests/bench_curves.py).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def device_path(train_set, args, device, sampler, log, make_prepare):
    """The scripts' --gpu-aug data path -> batches(epoch), or None for their CPU loader. auto = on for in-memory data
    on a GPU, and on the CPU for images of at most 64 px (measured faster there, docs/speed.md); on = wherever the
    images are in memory. make_prepare() -> (prepare(x, g), views per image): the script's batched augmentation."""
    cpu_auto = args.gpu_aug == "auto" and device.type != "cuda"
    images = device_images(train_set, device, max_side=64 if cpu_auto else None)  # uint8 (N, 3, H, W)
    if images is None:
        if args.gpu_aug == "on":
            log("note: --gpu-aug on needs in-memory data (built-in, CIFAR, MNIST, STL-10); using the CPU loader")
        return None
    prepare, views = make_prepare()
    return lambda epoch: batches(images, prepare, views, sampler, args.seed, epoch)


def device_images(ds, device, max_side=None):
    """An in-memory data set's images as uint8 [N, 3, H, W] on `device`, or None: image folders, and images larger
    than max_side. Reads the fields of torchvision's in-memory data sets and the scripts' ArrayData: `data` uint8
    [N, H, W] (MNIST, greyscale), [N, H, W, 3] (CIFAR) or [N, 3, H, W] (STL-10)."""
    x = getattr(ds, "data", None)
    if not isinstance(x, (np.ndarray, torch.Tensor)) or x.dtype not in (np.uint8, torch.uint8) or x.ndim not in (3, 4):
        return None
    side = max(x.shape[1:3]) if x.ndim == 3 or x.shape[-1] == 3 else max(x.shape[2:])
    if max_side is not None and side > max_side:
        return None
    x = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x.clone()  # a writable copy
    if x.dim() == 3:  # greyscale (N, H, W) -> RGB, as to_rgb does
        x = x[:, None].expand(-1, 3, -1, -1)
    elif x.shape[-1] == 3:  # (N, H, W, 3) -> (N, 3, H, W); STL-10 is stored channels first already
        x = x.permute(0, 3, 1, 2)
    return x.contiguous().to(device) if x.shape[1] == 3 else None


def batches(images, prepare, views, sampler, seed, epoch):
    """The rest of the epoch on the device: the indices `sampler` hands this rank, `views` calls of
    prepare(x, g) on each batch x = images[idx] (uint8 (B, 3, H, W)), g seeded by (seed, epoch, step, rank) so
    that a resumed run draws exactly what an uninterrupted one would. Yields a tensor, or a tuple of `views`."""
    idx = torch.tensor([i for i, _ in sampler], device=images.device).view(-1, sampler.batch)  # (steps left, B)
    g = torch.Generator(images.device)
    for step, batch in enumerate(idx, start=sampler.skip):
        g.manual_seed((((seed * 1000003 + epoch) * 1000003 + step) * 1009 + sampler.rank) % 2 ** 63)
        x = images[batch]  # (B, 3, H, W) uint8
        out = tuple(prepare(x, g) for _ in range(views))  # each (B, 3, S, S)
        yield out if views > 1 else out[0]


def moco_augment(aug, size, crop_min, mean_std, channels_last=False):
    """moco.py's --aug v1 | v2 | cifar as a BatchAugment: the same crop, jitter, greyscale and blur, in the same
    order as moco.transforms()."""
    order, jitter, jitter_p, blur_p = {"v1": (("grey", "jitter"), (0.4, 0.4, 0.4, 0.4), 1.0, 0.0),
                                       "v2": (("jitter", "grey", "blur"), (0.4, 0.4, 0.4, 0.1), 0.8, 0.5),
                                       "cifar": (("jitter", "grey"), (0.4, 0.4, 0.4, 0.1), 0.8, 0.0)}[aug]
    return BatchAugment(size, (crop_min, 1.0), jitter, jitter_p, 0.2, blur_p, order, mean_std,
                        channels_last=channels_last)


class BatchAugment:
    """moco.py's batched twin of its transforms(args, stats): random resized crop, horizontal flip, colour
    jitter, greyscale, Gaussian blur and normalisation for a uint8 batch on any device, every random number
    drawn from one torch.Generator (reproducible, resumable).
    Per sample, as torchvision: crop (scale, ratio 3/4-4/3, 10 tries then the centre crop), flip p=0.5,
    jitter factors b, c, s ~ U[1-x, 1+x], hue ~ U[-h, h] in a random order per sample with probability
    jitter_p, greyscale (0.2989 R + 0.587 G + 0.114 B) with grey_p, blur sigma ~ U[0.1, 2] px with blur_p.
    `order` lists the colour steps in the order they run; flipping commutes with all of them and runs first.
    NOTE(deviation): bilinear sampling without antialiasing (a crop shrunk more than 2x aliases; CIFAR and
    MNIST crops at 32 px are only enlarged), float arithmetic throughout (PIL rounds to uint8 after each
    step), and a true Gaussian kernel (PIL approximates it by box filters)."""

    def __init__(self, size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2, blur_p=0.0,
                 order=("jitter", "grey"), mean_std=IMAGENET, flip_p=0.5, blur_sigma=(0.1, 2.0),
                 channels_last=False):
        self.size, self.scale, self.ratio = size, scale, (3 / 4, 4 / 3)
        self.jitter, self.jitter_p, self.grey_p, self.blur_p, self.flip_p = jitter, jitter_p, grey_p, blur_p, flip_p
        self.order, self.blur_sigma, self.channels_last = tuple(order), blur_sigma, channels_last
        self.mean_std, self.consts = mean_std, {}

    def _consts(self, dev):
        """Small constant tensors, made once per device: a tensor from a Python list would sync with CUDA."""
        if dev not in self.consts:
            self.consts[dev] = dict(mean=torch.tensor(self.mean_std[0], device=dev).view(1, 3, 1, 1),
                                    std=torch.tensor(self.mean_std[1], device=dev).view(1, 3, 1, 1),
                                    same=torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev),  # identity jitter
                                    steps=torch.arange(4, device=dev), n=torch.tensor([5.0, 3.0, 1.0], device=dev))
        return self.consts[dev]

    def __call__(self, x, g):
        """x: uint8 (B, 3, H, W) on g's device -> float (B, 3, S, S), normalised."""
        B, dev = x.shape[0], x.device

        def u(*shape, lo=0.0, hi=1.0):  # every draw goes through here: a fixed sequence per generator seed
            return torch.rand(*shape, generator=g, device=dev) * (hi - lo) + lo

        y = self._crop_flip(x, u)  # (B, 3, S, S) in [0, 1]
        ops = {"jitter": lambda y: self._jitter(y, u), "grey": lambda y: self._grey(y, u(B) < self.grey_p),
               "blur": lambda y: self._blur(y, u(B) < self.blur_p, u(B, lo=self.blur_sigma[0], hi=self.blur_sigma[1]))}
        for name in self.order:
            y = ops[name](y)
        y = (y - self._consts(dev)["mean"]) / self._consts(dev)["std"]  # (B, 3, S, S)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def _crop_flip(self, x, u):
        """torchvision RandomResizedCrop.get_params, 10 tries for all samples at once, then one affine grid
        per sample (crop, resize and flip in a single bilinear grid_sample)."""
        B, _, H, W = x.shape
        area = H * W * u(B, 10, lo=self.scale[0], hi=self.scale[1])  # (B, 10)
        aspect = torch.exp(u(B, 10, lo=math.log(self.ratio[0]), hi=math.log(self.ratio[1])))  # (B, 10)
        w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()  # (B, 10)
        ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)  # (B, 10)
        first = ok.float().argmax(1, keepdim=True)  # (B, 1): the first try that fits
        w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)  # (B,)
        # no try fits: the whole image, its aspect ratio clamped into `ratio`, centred
        r = W / H
        fw, fh = (W, round(W / self.ratio[0])) if r < self.ratio[0] else (round(H * self.ratio[1]), H) \
            if r > self.ratio[1] else (W, H)
        w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))  # (B,)
        top = torch.where(found, torch.minimum((u(B) * (H - h + 1)).floor(), H - h), float((H - fh) // 2))  # (B,)
        left = torch.where(found, torch.minimum((u(B) * (W - w + 1)).floor(), W - w), float((W - fw) // 2))  # (B,)
        flip = u(B) < self.flip_p  # (B,)
        # output x' in [-1, 1] (align_corners=False: pixel edges) -> input x = cx + (w / W) x', negated to flip
        theta = torch.zeros(B, 2, 3, device=x.device)  # (B, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
        theta[:, 0, 2] = (2 * left + w) / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = (2 * top + h) / H - 1
        grid = F.affine_grid(theta, [B, 3, self.size, self.size], align_corners=False)  # (B, S, S, 2)
        # torchvision crops, then resizes: a sample past the box's outer pixel centres takes the box's edge pixel,
        # not a blend with the pixel outside the box (this matters when enlarging: CIFAR, MNIST)
        lo = torch.stack([(2 * left + 1) / W - 1, (2 * top + 1) / H - 1], 1)[:, None, None]  # (B, 1, 1, 2)
        hi = torch.stack([(2 * (left + w) - 1) / W - 1, (2 * (top + h) - 1) / H - 1], 1)[:, None, None]
        grid = torch.minimum(torch.maximum(grid, lo), hi)  # (B, S, S, 2)
        y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return y * (1 / 255)  # (B, 3, S, S)

    @staticmethod
    def _grey_of(y):
        return (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)  # (B, 1, S, S), ITU-R 601

    def _grey(self, y, on):
        return torch.where(on.view(-1, 1, 1, 1), self._grey_of(y).expand_as(y), y)  # (B, 3, S, S)

    def _jitter(self, y, u):
        """torchvision ColorJitter: factors drawn per sample, the four steps in a random order per sample. In
        slot t every sample runs all four steps, with identity factors (1, hue 0) for the three it did not
        pick: more arithmetic than needed, but no host sync and no per-sample loop."""
        B = y.shape[0]
        on = u(B) < self.jitter_p  # (B,)
        b, c, s, hue = self.jitter
        f = torch.stack([u(B, lo=max(0.0, 1 - b), hi=1 + b), u(B, lo=max(0.0, 1 - c), hi=1 + c),
                         u(B, lo=max(0.0, 1 - s), hi=1 + s), u(B, lo=-hue, hi=hue)], 1)  # (B, 4)
        same, steps = self._consts(y.device)["same"], self._consts(y.device)["steps"]
        f = torch.where(on[:, None], f, same)  # (B, 4)
        rank = u(B, 4).argsort(1)  # (B, 4): rank[i, t] = the step sample i runs t-th
        for t in range(4):
            pick = rank[:, t:t + 1] == steps  # (B, 4): one step per sample in this slot
            y = self._adjust(y, torch.where(pick, f, same), pick[:, 3] & on if hue > 0 else None)
        return y

    def _adjust(self, y, k, hue_on=None):
        """torchvision's adjust_brightness b*y, adjust_contrast c*y + (1-c)*mean(grey(y)), adjust_saturation
        s*y + (1-s)*grey(y), each clamped to [0, 1], then adjust_hue where hue_on; factors k (B, 4) = b, c, s, h.
        Factor 1 leaves an image exactly unchanged (1*y + 0*z == y)."""
        k = k.view(-1, 4, 1, 1, 1)  # (B, 4, 1, 1, 1)
        y = (y * k[:, 0]).clamp(0, 1)  # (B, 3, S, S)
        m = self._grey_of(y).mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        y = (k[:, 1] * y + (1 - k[:, 1]) * m).clamp(0, 1)
        y = (k[:, 2] * y + (1 - k[:, 2]) * self._grey_of(y)).clamp(0, 1)
        if hue_on is not None:
            y = torch.where(hue_on.view(-1, 1, 1, 1), self._hue(y, k[:, 3]), y)
        return y

    def _hue(self, y, shift):
        """Rotate the HSV hue by `shift` turns (B, 1, 1, 1), keeping value (max) and chroma (max - min):
        hexagonal hue H' in [0, 6) from the largest channel; back with channel = max - chroma *
        clamp(min(k, 4 - k), 0, 1), k = (n + H') mod 6, n = 5, 3, 1 for R, G, B (Wikipedia, 'HSL and HSV')."""
        r, g, b = y.unbind(1)  # (B, S, S) each
        mx, mn = y.amax(1), y.amin(1)  # (B, S, S)
        chroma = mx - mn
        d = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
        h = torch.where(mx == r, (g - b) / d, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))  # (B, S, S)
        h = torch.remainder(h + 6 * shift[:, 0], 6)  # (B, S, S)
        n = self._consts(y.device)["n"].view(1, 3, 1, 1)
        k = torch.remainder(n + h[:, None], 6)  # (B, 3, S, S)
        return mx[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)  # (B, 3, S, S)

    def _blur(self, y, on, sigma):
        """Separable Gaussian with a per-sample sigma, radius ceil(3 * max sigma), edges replicated; samples
        that skip the blur get the identity kernel."""
        B, C, S, _ = y.shape
        r = math.ceil(3 * self.blur_sigma[1])
        t = torch.arange(-r, r + 1, device=y.device, dtype=y.dtype)  # (2r+1,)
        k = torch.exp(-t ** 2 / (2 * sigma[:, None] ** 2))  # (B, 2r+1)
        k = torch.where(on[:, None], k / k.sum(1, keepdim=True), (t == 0).to(y.dtype))  # (B, 2r+1)
        k = k.repeat_interleave(C, 0)  # (B*C, 2r+1): one kernel per channel of each sample
        z = F.pad(y, (r, r, r, r), mode="replicate").reshape(1, B * C, S + 2 * r, S + 2 * r)
        z = F.conv2d(z, k.view(B * C, 1, 1, -1), groups=B * C)  # (1, B*C, S+2r, S) along the width
        z = F.conv2d(z, k.view(B * C, 1, -1, 1), groups=B * C)  # (1, B*C, S, S) along the height
        return z.view(B, C, S, S)


class BatchPrepare:
    """dim.py's batched twin of its transforms(args, stats) for uint8 images on any device (--gpu-aug): resize
    the shorter side (bilinear, antialiased when shrinking) and centre-crop; with `crop`, resize to 1.5x the
    size, then a random crop and a horizontal flip (p=0.5) per sample from the generator; normalise.
    NOTE(deviation): float arithmetic throughout (PIL rounds the resized image to uint8): values differ from the
    CPU loader's by up to ~1/255 before normalisation."""

    def __init__(self, size, aug, mean_std):
        self.size, self.crop, self.mean_std, self.consts = size, aug == "crop", mean_std, {}

    def _consts(self, dev):
        """mean and std (1, 3, 1, 1) made once per device: a copy from the host at every call would sync."""
        if dev not in self.consts:
            self.consts[dev] = [torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in self.mean_std]
        return self.consts[dev]

    def __call__(self, x, g):
        x = x.float() / 255  # (B, 3, H, W)
        big = self.size * 3 // 2 if self.crop else self.size
        h, w = x.shape[-2:]
        if min(h, w) != big:  # T.Resize(big): the shorter side becomes big
            hw = (big, max(big, round(w * big / h))) if h <= w else (max(big, round(h * big / w)), big)
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=min(h, w) > big)
        top, left = (x.shape[-2] - big) // 2, (x.shape[-1] - big) // 2
        x = x[..., top:top + big, left:left + big]  # (B, 3, big, big), T.CenterCrop
        if self.crop:  # T.RandomCrop(size) + T.RandomHorizontalFlip() per sample, by gathering rows and columns
            B, S, d = len(x), self.size, x.device
            oy, ox = (torch.randint(0, big - S + 1, (B,), generator=g, device=d) for _ in range(2))
            flip = torch.rand(B, generator=g, device=d) < 0.5
            rows = oy[:, None] + torch.arange(S, device=d)  # (B, S)
            cols = ox[:, None] + torch.arange(S, device=d)  # (B, S)
            cols = torch.where(flip[:, None], cols.flip(1), cols)
            x = x[torch.arange(B, device=d)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, S, S, 3)
            x = x.permute(0, 3, 1, 2)  # (B, 3, S, S)
        mean, std = self._consts(x.device)
        return ((x - mean) / std).contiguous()  # (B, 3, S, S)
