"""Two processes with torchrun (gloo, CPU): the multi-GPU code paths of moco.py without GPUs."""
import os
import subprocess
import sys

import torch

import moco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "ddp_moco.py")


def torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", DRIVER]
    r = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_two_ranks_stay_identical(tmp_path, image_folder):
    """DDP training for 4 steps: both ranks end with the same weights, queue and pointer; the keys of both
    ranks were enqueued (pointer = 4 x global batch mod K). The queue is excluded from DDP's buffer broadcast,
    so equality shows that every rank built the same queue from the gathered keys."""
    out = str(tmp_path / "run")
    log = torchrun(["train", out, "--data", image_folder, "--max-steps", "4", "--batch-size", "32", "--moco-k", "100",
                    "--bn-splits", "2", "--workers", "0", "--knn-every", "1", "--log-every", "1", "--epochs", "2",
                    "--device", "cpu"], port=29541)
    assert "done: 4 steps" in log
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for k in r0:  # BN running statistics are rank-local until DDP broadcasts rank 0's at the next forward
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(r0[k], r1[k]), k
    assert r0["queue_ptr"].item() == (4 * 32) % 100
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["step"] == 4 and torch.equal(ck["model"]["queue"], r0["queue"])


def test_two_ranks_match_one_process_with_split_bn(tmp_path, monkeypatch):
    """Shuffle-BN on 2 ranks of 8 images == one process on the 16 images with --bn-splits 2, given the same
    permutation. SplitBatchNorm puts sample 2n+s in group s, so the single process sees the batch
    interleaved, and the permutation is mapped to put rank r's shuffled keys in group r."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import ddp_moco
    out = str(tmp_path / "logits")
    torchrun(["logits", out], port=29542)
    ref = torch.load(os.path.join(out, "logits.pt"))
    xq, xk, perm = ddp_moco.batch_and_perm()
    inter = torch.tensor([s * 8 + n for n in range(8) for s in range(2)])  # position 2n+s holds image 8s+n
    pos = torch.argsort(inter)  # image i sits at pos[i]
    single_perm = torch.empty(16, dtype=torch.long)
    for s in range(2):
        for j in range(8):
            single_perm[2 * j + s] = pos[perm[s * 8 + j]]  # rank s's j-th shuffled key -> group s
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: single_perm.clone())
    model = ddp_moco.small_moco(2)
    with torch.no_grad():
        logits, _ = model(xq[inter], xk[inter])  # (16, 1+K), interleaved order
    got = logits[pos]  # back to image order
    assert torch.allclose(got, ref["logits"], atol=1e-4), (got - ref["logits"]).abs().max()
    assert model.queue_ptr.item() == ref["ptr"].item() == 16
