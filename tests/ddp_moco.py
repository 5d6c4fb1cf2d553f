"""Run by torchrun from test_ddp.py (2 processes, gloo). Not a test module itself.

    torchrun --nproc_per_node=2 tests/ddp_moco.py train OUT moco.py-flags...   -> OUT/rank{r}.pt
    torchrun --nproc_per_node=2 tests/ddp_moco.py logits OUT                   -> OUT/logits.pt
    torchrun --nproc_per_node=2 tests/ddp_moco.py dim OUT dim.py-flags...      -> OUT/rank{r}.pt
    torchrun --nproc_per_node=2 tests/ddp_moco.py fused OUT moco.py-flags...   -> OUT/fused_rank{r}.json
    torchrun --nproc_per_node=2 tests/ddp_moco.py observe OUT SCRIPT flags...  -> OUT/observed_rank{r}.json
train and dim also write OUT/extract_rank{r}.json: the number of images rank r encoded in each call of extract().
fused: --fused auto where each rank's timing would choose differently (rank 0: the fused op is faster, rank 1: the
eager path); the JSON says how often the rank measured and called the fused op, and whether its model holds it.
observe: SCRIPT's main (moco or dim) with OUT as --out, seen inside each rank's steps (conftest.Inside's hook): the
dtypes of the convolutions' outputs, the memory orders of their inputs and weights, the calls of moco_ext's loss.
"""
import json
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moco  # noqa: E402


def batch_and_perm():
    """A fixed global batch of 16 (query and key images) and the shuffle-BN permutation."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g), torch.randperm(16, generator=g)


def count_images(extract, counts):
    """extract() that also appends the number of images it encoded to `counts`."""
    def counted(encode, data, device):
        f, y = extract(encode, data, device)
        counts.append(len(y))
        return f, y
    return counted


def small_moco(bn_splits):
    torch.manual_seed(0)
    return moco.MoCo(partial(moco.build_encoder, "basic32", "cifar", bn_splits), dim=16, K=64, m=0.99, T=0.2)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    if mode == "observe":
        import types
        import conftest
        import dim
        inside = conftest.Inside(types.SimpleNamespace(setattr=setattr))
        torch.nn.modules.module.register_module_forward_hook(inside.hook)
        ext = moco.load_fused("on", torch.device("cpu"))
        inside.count(ext, "infonce_loss", "fused loss")
        script = {"moco": moco, "dim": dim}[sys.argv[3]]
        script.main(sys.argv[4:] + ["--out", out])
        with open(os.path.join(out, f"observed_rank{rank}.json"), "w") as f:
            json.dump({"dtypes": sorted(str(d) for d in inside.dtypes()), "layouts": sorted(inside.layouts()),
                       **inside.calls}, f)
    elif mode == "fused":
        calls = {"measured": 0, "fused loss": 0}

        def timed(*a, **k):  # (eager, fused) seconds
            calls["measured"] += 1
            return (2.0, 1.0) if rank == 0 else (1.0, 2.0)
        moco.time_infonce = timed
        ext = moco.load_fused("on", torch.device("cpu"))
        loss = ext.infonce_loss

        def counted(*a, **k):
            calls["fused loss"] += 1
            return loss(*a, **k)
        ext.infonce_loss = counted
        model = moco.train(sys.argv[3:] + ["--out", out])
        with open(os.path.join(out, f"fused_rank{rank}.json"), "w") as f:
            json.dump({**calls, "holds the op": model.fused is not None}, f)
    elif mode in ("train", "dim"):
        import dim
        counts = []  # images this rank encoded in each feature extraction (the kNN monitor's bank and test set)
        for script in (moco, dim):
            script.extract = count_images(script.extract, counts)
        if mode == "dim":
            model, prior = dim.train(sys.argv[3:] + ["--out", out])
            model = torch.nn.ModuleDict({"model": model, "prior": prior})
        else:
            model = moco.train(sys.argv[3:] + ["--out", out])
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
        with open(os.path.join(out, f"extract_rank{rank}.json"), "w") as f:
            json.dump(counts, f)
    else:
        dist.init_process_group("gloo")
        xq, xk, perm = batch_and_perm()
        torch.randperm = lambda n, device=None: perm.clone()  # the permutation rank 0 would draw and broadcast
        model = small_moco(1)
        with torch.no_grad():
            logits, _ = model(xq[rank * 8:(rank + 1) * 8], xk[rank * 8:(rank + 1) * 8])  # (8, 1+K)
        logits = moco.concat_all_gather(logits)  # (16, 1+K)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            torch.save({"logits": logits, "queue": model.queue, "ptr": model.queue_ptr}, os.path.join(out, "logits.pt"))
        dist.destroy_process_group()
