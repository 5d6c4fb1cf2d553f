"""Memory and time per GPU of each preset, before the first GPU hour: measured on the CPU where it can be.

    python tests/bench_memory.py                     # v1, v2 (8 GPUs), cifar, dimL (one GPU): a few minutes
    python tests/bench_memory.py --presets cifar     # one preset
    python tests/bench_memory.py --tiny              # every preset at toy sizes (the test suite's run), seconds
    python tests/bench_memory.py --device cuda       # also each step's measured peak on this GPU beside the estimate

For each preset at its batch per GPU (v1 and v2: the official 8 GPUs of 32 images; cifar, dimL: one GPU) one
training step of moco.py or dim.py is built as train() builds it, and its memory counted (a MoCo batch per GPU above
--max-batch, cifar's 512, is measured at 64 and 128 and extrapolated linearly, which is exact: every saved tensor and
FLOP of its step is proportional to the batch or constant):
- params, grads, optimizer: the trainable parameters in float32, their gradients, and the optimiser's state (SGD:
  momentum, 1x; Adam: 2x), counted from the modules; key encoder: MoCo's momentum encoder (no gradients); queue:
  MoCo's (C, K) float32 dictionary; batch: the step's input images (MoCo: two views) in float32.
- activations: measured, the bytes of the tensors autograd saves in the forward pass for the backward
  (torch.autograd.graph.saved_tensors_hooks; each storage once, parameters excluded), in float32 and under bf16
  autocast (what --amp runs on a GPU; the casted weights autocast saves are counted).
- total: their sum, an estimate of the peak: the backward's transient buffers, cuDNN workspaces, the allocator's
  rounding and the CUDA context (some hundreds of MB) come on top.
FLOPs per step: bench_train.count_flops of the whole float32 step (forward, backward, DIM's gradient penalty), per
GPU. Epoch floor: the steps of one epoch (ImageNet's 1,281,167 training images for v1/v2, CIFAR-10's 50,000 for
cifar/dimL) at the chip's dense bf16 peak (--peak-tflops, default 989: H100/H200 SXM), a lower bound that no run
reaches (the data path, the kNN monitor and memory-bound layers are not in it).
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import dim  # noqa: E402
import moco  # noqa: E402
from bench_train import count_flops  # noqa: E402

MiB = 2 ** 20
# preset -> (script, GPUs of the recipe, training images of an epoch)
PRESETS = {"v1": ("moco", 8, 1281167), "v2": ("moco", 8, 1281167), "cifar": ("moco", 1, 50000),
           "dimL": ("dim", 1, 50000)}


def saved_bytes(forward):
    """-> the bytes of the tensors autograd saves while forward() runs, each storage once, parameters excluded,
    and forward()'s result (kept alive, so that no saved storage is freed and its address reused meanwhile)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return seen, out


def activations(forward, params, device, dtype):
    """Saved-tensor bytes of forward() (fp32: dtype None; else under autocast), parameters' storages left out."""
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        seen, out = saved_bytes(forward)
    total = sum(n for ptr, n in seen.items() if ptr not in ptrs)
    del out
    return total


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def moco_plan(args, world, device):
    """-> (components in bytes, the forward of one step, the whole step, its trainable parameters)."""
    model = moco.build_model(args, 1000, world, None).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=args.momentum,
                          weight_decay=args.wd)
    B, S = args.batch_size // world, args.image_size
    views = [torch.randn(B, 3, S, S, device=device) for _ in range(2)]  # (B, 3, S, S) each
    trainable = [p for p in model.encoder_q.parameters()]
    key = list(model.encoder_k.parameters()) + list(model.encoder_k.buffers())
    parts = dict(params=nbytes(trainable), grads=nbytes(trainable), optimizer=nbytes(trainable),  # SGD momentum
                 key_encoder=nbytes(key), queue=nbytes([model.queue]), batch=nbytes(views))

    def forward():
        return model.training_loss(*views)

    def step():
        loss, _, _, keys = model.training_loss(*views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_dictionary(keys)
    return parts, forward, step, trainable


def dim_plan(args, world, device):
    encoder = dim.build_encoder(args.arch, args.image_size, args.y_dim)
    model = dim.DIM(encoder, args.image_size, args.y_dim, args.beta > 0, args.alpha > 0, args.critic, args.mi_units,
                    args.global_critic, args.global_layer).to(device)
    prior = dim.prior_discriminator(args.y_dim).to(device)
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.wd)
    opts = torch.optim.Adam(model.parameters(), **adam), torch.optim.Adam(prior.parameters(), **adam)
    scalers = tuple(torch.amp.GradScaler(device.type, enabled=False) for _ in range(2))
    x = torch.randn(args.batch_size // world, 3, args.image_size, args.image_size, device=device)  # (B, 3, S, S)
    trainable = list(model.parameters()) + list(prior.parameters())
    parts = dict(params=nbytes(trainable), grads=nbytes(trainable), optimizer=2 * nbytes(trainable),  # Adam
                 key_encoder=0, queue=0, batch=nbytes([x]))

    def forward():  # train_step's forward: the MI objectives, the discriminator's loss (its penalty), the prior loss
        mi, y = model(x, args.estimator, args.local_samples)
        return mi, dim.prior_d_loss(prior, y, args.prior_gp), dim.prior_encoder_loss(prior, y)

    def step():
        dim.train_step(model, prior, opts, scalers, x, args, None)
    return parts, forward, step, trainable


def preset_args(name, tiny):
    """The preset's arguments as the script resolves them (tiny: small images and batches, the same recipe)."""
    script = PRESETS[name][0]
    flags = ["--preset", name]
    if tiny:
        flags += {"dimL": ["--batch-size", "4"]}.get(name, ["--image-size", "32", "--batch-size", "4",
                                                             "--bn-splits", "2"])
    mod = moco if script == "moco" else dim
    return mod.resolve(mod.parse_args(flags)[0])


def measure(name, device, tiny, peak_tflops, max_batch, batch=None):
    """-> one row: {name, gpus, batch, components (bytes), act_fp32, act_bf16, flops, epoch floor s, cuda peak}. A
    MoCo batch per GPU above max_batch is measured at max_batch / 2 and max_batch and extrapolated linearly: every
    saved tensor and every FLOP of its step is proportional to the batch or constant (the casted weights). batch:
    another batch per GPU than the preset's."""
    script, gpus, n_train = PRESETS[name]
    args = preset_args(name, tiny)
    world = gpus if not tiny else min(gpus, 2)
    args = dataclasses.replace(args, batch_size=batch * world) if batch else args
    B = args.batch_size // world
    sizes = [B] if B <= max_batch or script != "moco" else [max_batch // 2, max_batch]
    t0, rows = time.perf_counter(), []
    for b in sizes:
        torch.manual_seed(0)
        a = dataclasses.replace(args, batch_size=b * world)
        parts, forward, step, trainable = (moco_plan if script == "moco" else dim_plan)(a, world, device)
        rows.append(dict(parts=parts, act_fp32=activations(forward, trainable, device, None),
                         act_bf16=activations(forward, trainable, device, torch.bfloat16), flops=count_flops(step)))
    row = dict(name=name, gpus=world, batch=B, parts=dict(rows[-1]["parts"], batch=rows[-1]["parts"]["batch"] * B //
                                                           sizes[-1]), sizes=sizes)
    for k in ("act_fp32", "act_bf16", "flops"):  # linear in the batch through the two measured sizes
        row[k] = rows[0][k] if len(rows) == 1 else round(rows[0][k] + (rows[1][k] - rows[0][k]) *
                                                         (B - sizes[0]) / (sizes[1] - sizes[0]))
    row["steps"] = n_train // args.batch_size  # global steps of an epoch (drop_last); each GPU does its share
    row["floor_s"] = row["steps"] * row["flops"] / (peak_tflops * 1e12)
    if device.type == "cuda":  # the measured peak of real steps at the real batch, float32 and bf16 autocast
        torch.manual_seed(0)
        step = (moco_plan if script == "moco" else dim_plan)(args, world, device)[2]
        row["cuda"] = {}
        for dtype in (None, torch.bfloat16):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                for _ in range(2):
                    step()
            torch.cuda.synchronize()
            row["cuda"]["bf16" if dtype else "fp32"] = torch.cuda.max_memory_allocated()
    row["seconds"] = time.perf_counter() - t0
    return row


def floor(s):
    """Seconds as '5.3 s' or '2.0 min'."""
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="v1,v2,cifar,dimL", help="comma-separated: v1, v2, cifar, dimL")
    p.add_argument("--tiny", action="store_true", help="toy sizes (32 px, batch 4): checks that every row runs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 TFLOP/s (989: H100/H200 SXM)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--max-batch", type=int, default=128, help="a larger MoCo batch per GPU is measured at this and half "
                                                              "of it, and extrapolated (memory of a 2-core machine)")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    names = [n for n in opts.presets.split(",") if n]
    unknown = set(names) - set(PRESETS)
    if unknown:
        raise SystemExit(f"error: unknown preset(s) {sorted(unknown)}: choose from {', '.join(PRESETS)}")
    print(f"# memory per GPU in MiB (activations measured on {device}; the rest counted), torch {torch.__version__}"
          f"{', toy sizes' if opts.tiny else ''}")
    cols = ("params", "grads", "optimizer", "key_encoder", "queue", "batch")
    print(f"{'preset':7s} {'GPUs':>4s} {'batch/GPU':>9s} " + " ".join(f"{c:>11s}" for c in cols)
          + f" {'act fp32':>9s} {'act bf16':>9s} {'total fp32':>10s} {'total bf16':>10s} {'GFLOP/step':>10s}"
          f" {'epoch floor':>11s}")
    for name in names:
        r = measure(name, device, opts.tiny, opts.peak_tflops, opts.max_batch)
        fixed = sum(r["parts"].values())
        print(f"{name:7s} {r['gpus']:4d} {r['batch']:9d} " + " ".join(f"{r['parts'][c] / MiB:11.1f}" for c in cols)
              + f" {r['act_fp32'] / MiB:9.1f} {r['act_bf16'] / MiB:9.1f} {(fixed + r['act_fp32']) / 2 ** 30:8.2f}Gi"
              f" {(fixed + r['act_bf16']) / 2 ** 30:8.2f}Gi {r['flops'] / 1e9:10.1f} {floor(r['floor_s']):>11s}",
              flush=True)
        if "cuda" in r:
            print(f"{name:7s} measured peak on {torch.cuda.get_device_name()}: fp32 {r['cuda']['fp32'] / 2 ** 30:.2f} "
                  f"GiB, bf16 autocast {r['cuda']['bf16'] / 2 ** 30:.2f} GiB (torch.cuda.max_memory_allocated; "
                  f"estimate {(fixed + r['act_fp32']) / 2 ** 30:.2f} / {(fixed + r['act_bf16']) / 2 ** 30:.2f} GiB)")
        how = f"measured at batch {r['sizes'][0]}" + (f" and {r['sizes'][1]}, extrapolated to {r['batch']}" if
                                                        len(r["sizes"]) > 1 else "")
        print(f"{name:7s} {r['steps']} steps per epoch, floor at {opts.peak_tflops:g} dense bf16 TFLOP/s; {how}, "
              f"in {r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
