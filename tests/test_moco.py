"""Tests for moco.py: the algorithm core against naive references, then the script end to end."""
import json
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_linear
import gpu_aug
import moco
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--batch-size", "32", "--moco-k", "96", "--bn-splits", "4", "--workers", "0",
        "--knn-every", "0", "--log-every", "1", "--fused", "off"]


def tiny_model(K=24, dim=16, fused=None, symmetric=False, bn_splits=1, m=0.99, seed=0):
    torch.manual_seed(seed)
    base = partial(moco.build_encoder, "basic32", "cifar", bn_splits)
    return moco.MoCo(base, dim=dim, K=K, m=m, T=0.2, symmetric=symmetric, fused=fused)


# ----------------------------------------------------------------------------------------------------
# Algorithm core
# ----------------------------------------------------------------------------------------------------
def test_logits_and_loss_match_naive_loop():
    g = torch.Generator().manual_seed(0)
    N, C, K, T = 5, 7, 11, 0.07
    q, k = torch.randn(N, C, generator=g, dtype=torch.float64), torch.randn(N, C, generator=g, dtype=torch.float64)
    queue = torch.randn(C, K, generator=g, dtype=torch.float64)
    logits = moco.infonce_logits(q, k, queue, T)
    loss, n_beat = moco.infonce_loss(q, k, queue, T)
    for i in range(N):
        row = [sum(q[i, c] * k[i, c] for c in range(C)) / T]
        row += [sum(q[i, c] * queue[c, j] for c in range(C)) / T for j in range(K)]
        row = torch.stack(row)
        assert torch.allclose(logits[i], row)
        # Eq. (1): L_q = -log exp(q.k+/T) / sum_i exp(q.k_i/T)
        assert math.isclose(loss[i].item(), -(row[0].exp() / row.exp().sum()).log().item(), rel_tol=1e-10)
        assert n_beat[i].item() == int((row[1:] > row[0]).sum())


def test_initial_loss_is_log_k_plus_1_for_uninformative_features():
    # with T large, every logit is ~equal and the loss is ln(K+1), the chance level of the (K+1)-way task
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(64, 128), dim=1), F.normalize(torch.randn(64, 128), dim=1)
    queue = F.normalize(torch.randn(128, 4096), dim=0)
    loss, _ = moco.infonce_loss(q, k, queue, T=100.0)
    assert abs(loss.mean().item() - math.log(4097)) < 1e-3


@pytest.mark.parametrize("K", [24, 25, 37])
def test_queue_wraps_around_for_any_k(K):
    model = tiny_model(K=K, dim=4)
    ref = model.queue.clone()
    ptr = 0
    g = torch.Generator().manual_seed(K)
    for n in [5, 8, 1, K, 7, 3, 11, 8, 8]:
        keys = torch.randn(n, 4, generator=g)
        model._dequeue_and_enqueue(keys)
        for i in range(n):
            ref[:, (ptr + i) % K] = keys[i]
        ptr = (ptr + n) % K
        assert torch.equal(model.queue, ref)
        assert model.queue_ptr.item() == ptr and model.queue_ptr.dtype == torch.long


@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_momentum_update(m):
    model = tiny_model(m=m)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pk, pq, b in zip(model.encoder_k.parameters(), model.encoder_q.parameters(), before):
        assert torch.allclose(pk, m * b + (1 - m) * pq, atol=1e-6)  # Eq. (2)
        assert not pk.requires_grad


def test_shuffle_is_skipped_only_where_it_changes_nothing():
    """One process, one BN group: a permutation of the batch changes no statistic, so no shuffle (and no
    index to undo); with split BN the keys are shuffled."""
    x = torch.randn(12, 3, 2, 2)
    same, idx_un = tiny_model()._batch_shuffle(x)
    assert same is x and idx_un is None
    shuffled, idx_un = tiny_model(bn_splits=2)._batch_shuffle(x)
    assert idx_un is not None and not torch.equal(shuffled, x)


def test_shuffle_then_unshuffle_is_identity():
    model = tiny_model(bn_splits=2)
    x = torch.randn(12, 3, 2, 2)
    shuffled, idx_un = model._batch_shuffle(x)
    assert not torch.equal(shuffled, x)
    flat = lambda t: sorted(map(tuple, t.flatten(1).tolist()))
    assert flat(shuffled) == flat(x)  # the same images, reordered
    assert torch.equal(model._batch_unshuffle(shuffled, idx_un), x)


@pytest.mark.parametrize("shape", [(16, 6, 3, 3), (16, 6)])
def test_split_batchnorm_equals_separate_groups(shape):
    """Group s is the contiguous slice 4s..4s+3 (rank s's slice under torchrun): values, gradients and the
    running statistics equal those of S separate BatchNorms, one per group; eval() is plain batch norm."""
    torch.manual_seed(0)
    S, C = 4, shape[1]
    bn = moco.SplitBatchNorm(C, num_splits=S)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(*shape, dtype=torch.float64)
    bn = bn.double()
    y = bn(x)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    refs = [(nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(C).double() for _ in range(S)]
    for s, r in enumerate(refs):
        with torch.no_grad():
            r.weight.copy_(bn.weight)
            r.bias.copy_(bn.bias)
        xs = x.detach()[4 * s:4 * s + 4].clone().requires_grad_()
        ys = r(xs)
        (gs,) = torch.autograd.grad((ys * w[4 * s:4 * s + 4]).sum(), xs)
        assert torch.allclose(y[4 * s:4 * s + 4], ys, atol=1e-10)
        assert torch.allclose(gx[4 * s:4 * s + 4], gs, atol=1e-10)
    assert torch.allclose(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0), atol=1e-12)
    assert torch.allclose(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0), atol=1e-12)
    bn.eval()
    plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(C).double().eval()
    plain.load_state_dict(bn.state_dict())
    assert torch.allclose(bn(x), plain(x))


def test_forward_official_and_training_step_agree():
    """forward() returns the official (logits, labels); training_loss() + update_dictionary() give the same loss and the
    queue ends up the same (fp64-free check on a tiny encoder, identical seeds)."""
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    a, b = tiny_model(), tiny_model()
    torch.manual_seed(1)
    logits, labels = a(x1, x2)
    torch.manual_seed(1)
    loss, acc1, acc5, keys = b.training_loss(x1, x2)
    b.update_dictionary(keys)
    assert logits.shape == (8, 1 + 24) and torch.equal(labels, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(F.cross_entropy(logits, labels), loss, atol=1e-6)
    top5 = logits.topk(5, dim=1).indices
    assert math.isclose(acc1.item(), (top5[:, 0] == 0).float().mean().item() * 100, abs_tol=1e-4)
    assert math.isclose(acc5.item(), (top5 == 0).any(1).float().mean().item() * 100, abs_tol=1e-4)
    assert torch.equal(a.queue, b.queue) and a.queue_ptr.item() == b.queue_ptr.item() == 8


def test_float64_model_matches_the_official_builder_step_by_step():
    """A float64 model computes in float64 (nothing is cast to float32 inside): 3 SGD steps against the official
    builder's algorithm written out here (facebookresearch/moco builder.py: q, momentum update, shuffled keys,
    einsum logits against queue.clone().detach(), cross-entropy with label 0, enqueue at ptr), to 1e-12."""
    import copy
    ours = tiny_model(K=24, dim=16).double()  # K a multiple of the batch of 8: the official assert holds
    ref = copy.deepcopy(ours)
    sgd = lambda model: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                                        weight_decay=1e-4)
    opt_a, opt_b = sgd(ours), sgd(ref)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x1, x2 = (torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
        torch.manual_seed(100 + step)
        logits_a, labels = ours(x1, x2)
        torch.manual_seed(100 + step)
        q = F.normalize(ref.encoder_q(x1), dim=1)  # (N, C)
        with torch.no_grad():
            for pq, pk in zip(ref.encoder_q.parameters(), ref.encoder_k.parameters()):
                pk.data = pk.data * ref.m + pq.data * (1.0 - ref.m)
            idx = torch.randperm(8)
            k = F.normalize(ref.encoder_k(x2[idx]), dim=1)[torch.argsort(idx)]  # (N, C)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, ref.queue.clone().detach()])
        logits_b = torch.cat([l_pos, l_neg], dim=1) / ref.T  # (N, 1+K)
        ptr = int(ref.queue_ptr)
        ref.queue[:, ptr:ptr + 8] = k.T
        ref.queue_ptr[0] = (ptr + 8) % ref.K
        assert logits_a.dtype == torch.float64
        assert torch.allclose(logits_a, logits_b, rtol=0, atol=1e-12), (logits_a - logits_b).abs().max()
        for opt, logits in ((opt_a, logits_a), (opt_b, logits_b)):
            opt.zero_grad()
            F.cross_entropy(logits, labels).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-12), name


def test_symmetric_loss_is_both_directions_and_enqueues_k1_then_k2():
    """The notebook's symmetric loss on two distinct views, written out here in float64 from an asymmetric twin's
    encoders after one momentum update: loss(q1, k2) + loss(q2, k1), the same gradients, and the keys enqueued as
    torch.cat([k1, k2]) (colab/moco_cifar10_demo.ipynb). forward(), the builder's asymmetric API, refuses it."""
    import copy
    model = tiny_model(K=40, symmetric=True).double()
    twin = copy.deepcopy(model)
    twin.symmetric = False
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    queue = model.queue.clone()
    loss, _, _, keys = model.training_loss(x1, x2)
    loss.backward()
    model.update_dictionary(keys)
    with torch.no_grad():
        for pq, pk in zip(twin.encoder_q.parameters(), twin.encoder_k.parameters()):
            pk.mul_(twin.m).add_(pq, alpha=1 - twin.m)
        k1, k2 = (F.normalize(twin.encoder_k(x), dim=1) for x in (x1, x2))  # (N, C) each

    def asymmetric(q, k):  # Eq. (1) against the queue as it was before the step
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / twin.T  # (N, 1+K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    q1, q2 = (F.normalize(twin.encoder_q(x), dim=1) for x in (x1, x2))
    ref = asymmetric(q1, k2) + asymmetric(q2, k1)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=0, atol=1e-12), (loss - ref).abs()
    for (name, a), b in zip(model.encoder_q.named_parameters(), twin.encoder_q.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12), name
    assert model.queue_ptr.item() == 16
    assert torch.allclose(model.queue[:, :16].T, torch.cat([k1, k2]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="forward\\(\\) is the official asymmetric API"):
        model(x1, x2)


def test_no_gradient_reaches_key_encoder_or_queue():
    model = tiny_model()
    loss = model.training_loss(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))[0]
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------
def run_main(argv, capsys):
    """moco.main in this process -> (exit code, stdout, stderr)."""
    try:
        moco.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_presets_reproduce_official_recipes():
    v1, _ = moco.parse_args(["--preset", "v1"])
    assert (v1.arch, v1.moco_dim, v1.moco_k, v1.moco_m, v1.moco_t, v1.lr, v1.momentum, v1.wd, v1.milestones,
            v1.epochs, v1.batch_size, v1.aug, v1.mlp, v1.schedule) == \
        ("resnet50", 128, 65536, 0.999, 0.07, 0.03, 0.9, 1e-4, "120,160", 200, 256, "v1", False, "step")
    v2, _ = moco.parse_args(["--preset", "v2"])
    assert (v2.mlp, v2.moco_t, v2.aug, v2.schedule, v2.moco_k, v2.lr) == (True, 0.2, "v2", "cos", 65536, 0.03)
    c, _ = moco.parse_args(["--preset", "cifar"])
    assert (c.arch, c.stem, c.moco_k, c.moco_m, c.moco_t, c.lr, c.batch_size, c.wd, c.schedule, c.bn_splits) == \
        ("resnet18", "cifar", 4096, 0.99, 0.1, 0.06, 512, 5e-4, "cos-notebook", 8)
    over, given = moco.parse_args(["--preset", "v2", "--moco-k", "1000", "--no-mlp"])
    assert over.moco_k == 1000 and over.mlp is False and over.moco_t == 0.2 and given["moco_k"] == 1000


def test_v2_mlp_head_has_official_keys():
    model = moco.MoCo(partial(moco.build_encoder, "resnet18"), dim=128, K=256, mlp=True)
    keys = model.state_dict().keys()
    assert {"encoder_q.fc.0.weight", "encoder_q.fc.2.weight", "encoder_k.fc.0.bias", "queue", "queue_ptr"} <= set(keys)
    assert model.encoder_q.fc[0].weight.shape == (512, 512)


def test_learning_lowers_held_out_loss():
    """40 MoCo steps on real images (the built-in data, batch 32, K 256, split BN) lower the InfoNCE loss
    of held-out images: queries of 128 test images against their own second view and 256 other test
    images as negatives. (The training loss itself is no use here: it rises while the random initial
    queue is replaced by real keys, facebookresearch/moco#12.) Mild crops keep a few dozen steps enough."""
    import copy
    import torchvision.transforms as T
    args, _ = moco.parse_args([])
    train, test, stats = moco.load_data(args)
    tf = T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(*moco.MEAN_STD[stats])])

    def views(ds, idx):
        return [torch.stack([tf(ds[i][0]) for i in idx]) for _ in range(2)]
    torch.manual_seed(0)
    held_q, held_k = views(test, range(128))
    held_neg, _ = views(test, range(128, 384))
    model = tiny_model(K=256, dim=128, bn_splits=4)
    model.T = 0.1

    def held_out_loss():
        m = copy.deepcopy(model)  # BN in training mode, as the keys are made, without touching the model
        with torch.no_grad():
            q, k = F.normalize(m.encoder_q(held_q), dim=1), F.normalize(m.encoder_k(held_k), dim=1)
            neg = F.normalize(m.encoder_k(held_neg), dim=1)  # (256, C)
            return moco.infonce_loss(q, k, neg.T, 0.1)[0].mean().item()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.06, momentum=0.9,
                          weight_decay=5e-4)
    before = held_out_loss()
    for step in range(40):
        loss, _, _, keys = model.training_loss(*views(train, range(32 * step, 32 * step + 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_dictionary(keys)
    after = held_out_loss()
    assert after < before - 0.2, (before, after)


@pytest.mark.slow
def test_end_to_end_then_eval_linear(tmp_path):
    """The real command line: moco.py on an image folder, then eval_linear.py on its checkpoint."""
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "moco.py", "--out", out, "--max-steps", "3", "--batch-size", "32",
                        "--moco-k", "100", "--workers", "0", "--log-every", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stdout and "kNN top-1" in r.stdout
    lines = [json.loads(s) for s in open(os.path.join(out, "metrics.jsonl"))]
    logged = [m for m in lines if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert {"epoch", "loss", "acc1", "acc5", "lr", "img_s"} <= set(logged[0])
    assert any("knn_top1" in m for m in lines)
    saved = json.load(open(os.path.join(out, "args.json")))
    assert saved["moco_k"] == 100 and saved["arch"] == "basic32"
    r = subprocess.run([sys.executable, "eval_linear.py", "--pretrained", os.path.join(out, "ckpt.pt"),
                        "--epochs", "2", "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "sanity check passed" in r.stdout
    res = json.load(open(os.path.join(out, "eval_backbone_linear.json")))
    assert res["n_train"] == 8000 and res["n_test"] == 2000 and res["feature_dim"] == 1024
    assert res["top5"] >= res["top1"] and res["algo"] == "moco"
    # the checkpoint's weights were used: the same architecture at random init (the same seed) gives other features
    r = subprocess.run([sys.executable, "eval_linear.py", "--pretrained", os.path.join(out, "ckpt.pt"),
                        "--epochs", "2", "--workers", "0", "--random-init"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rand = json.load(open(os.path.join(out, "eval_backbone_linear_random.json")))
    assert (rand["knn_top1"], rand["top1"]) != (res["knn_top1"], res["top1"]), (rand, res)


def run_moco(argv, workers):
    return in_process(moco.main, *TINY, "--workers", workers, *argv, check=True).stdout


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, image_folder):
    """120 images, batch 32: 3 steps per epoch. 8 steps straight == 4 steps, stop, resume to 8 (mid-epoch,
    across an epoch end, with a different number of data workers)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", image_folder, "--epochs", "3", "--knn-every", "1"]
    run_moco(common + ["--out", a, "--max-steps", "8"], workers=0)
    run_moco(common + ["--out", b, "--max-steps", "4"], workers=0)
    out = run_moco(common + ["--out", b, "--max-steps", "8", "--resume", "auto"], workers=2)
    assert "resumed" in out
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=False)
    assert ca["step"] == cb["step"] == 8 and ca["epoch"] == cb["epoch"] == 2 and cb["step_in_epoch"] == 2
    for key, va in ca["model"].items():
        assert torch.equal(va, cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    la = [json.loads(s)["loss"] for s in open(os.path.join(a, "metrics.jsonl")) if '"loss"' in s]
    lb = [json.loads(s)["loss"] for s in open(os.path.join(b, "metrics.jsonl")) if '"loss"' in s]
    assert la == lb


def test_probe_standardisation():
    """Standardize = torch's mean(0) / std(0) (its chunked sum of squares, on far-from-zero features), and
    fit_probe on cached features (standardised once) trains the same head as on the same batches standardised
    one by one (the crop-view path)."""
    g = torch.Generator().manual_seed(0)
    f = 100 + 0.01 * torch.randn(20000, 33, generator=g)  # (n, D): mean 100, std 0.01
    s = eval_linear.Standardize(f)
    assert torch.allclose(s.mean, f.mean(0)) and torch.allclose(s.std, f.std(0), rtol=1e-4)
    assert torch.isfinite(eval_linear.Standardize(f[:1]).std).all()
    f, y = torch.randn(600, 16, generator=g) * 3 + 1, torch.randint(0, 4, (600,), generator=g)

    def batches(epoch, skip=0):  # the order fit_probe draws for cached features
        perm = torch.randperm(len(f), generator=gen)
        return ((f[i], y[i]) for i in perm.split(64))
    for probe in ("linear", "mlp"):
        pa = eval_linear.Args(probe=probe, epochs=3, batch_size=64, lr=0.1 if probe == "linear" else 1e-3,
                              milestones="2", seed=0)
        cached = eval_linear.fit_probe(pa, f, y, 4, say=lambda *a, **k: None)
        gen = torch.Generator().manual_seed(0)
        streamed = eval_linear.fit_probe(pa, f, y, 4, batches=batches, say=lambda *a, **k: None)
        with torch.no_grad():
            assert torch.allclose(cached(f), streamed(f), atol=1e-4)


def test_fused_auto_falls_back_where_the_kernels_cannot_run(monkeypatch, capsys):
    """--fused auto on a device the extension has no kernels for (moco_ext.unusable_reason gives the reason)
    falls back to pure PyTorch with a one-line note; --fused on stops with that reason in one line."""
    ext = moco.load_fused("on", torch.device("cpu"))  # builds it just in time if it is not installed
    assert ext is not None and ext.unusable_reason(torch.device("cpu")) is None
    capsys.readouterr()
    monkeypatch.setattr(ext, "unusable_reason", lambda device: "moco_ext has CUDA kernels for sm_90 but this GPU is sm_80")
    assert moco.load_fused("auto", torch.device("cpu")) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "sm_80" in out and "pure-PyTorch" in out, out
    with pytest.raises(moco.UserError, match="sm_80"):
        moco.load_fused("on", torch.device("cpu"))


def test_official_checkpoint_loads_in_eval_linear(tmp_path):
    torch.manual_seed(0)
    model = moco.MoCo(partial(moco.build_encoder, "resnet18"), dim=128, K=256)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    path = str(tmp_path / "checkpoint_0199.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    args = eval_linear.parse_args(["--pretrained", path])
    net, meta = eval_linear.load_encoder(args)
    got = net.state_dict()
    for k, v in model.encoder_q.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert isinstance(net.fc, nn.Identity) and meta["image_size"] == 224


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A failed write (here: the disk fills up half-way) names the path and the cause in one line, leaves the previous
    checkpoint loadable and no temporary file behind."""
    path = str(tmp_path / "ckpt.pt")
    moco.save_checkpoint({"algo": "moco", "step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(moco.UserError, match=f"cannot write checkpoint {path}: No space left on device; the previous"):
        moco.save_checkpoint({"algo": "moco", "step": 2}, path)
    monkeypatch.undo()
    assert moco.load_checkpoint(path, "moco")["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_cosine_schedules_count_epochs_as_their_sources():
    """main_moco.py's cosine counts epochs from 0 (first epoch at the base lr); the CIFAR notebook's from 1 (its
    first epoch already decayed, its last at lr 0): the cifar preset follows the notebook."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    main = moco.parse_args(["--preset", "v2"])[0]
    nb = moco.parse_args(["--preset", "cifar"])[0]
    assert moco.adjust_lr(opt, 0, main) == main.lr
    assert moco.adjust_lr(opt, 199, main) > 0
    assert moco.adjust_lr(opt, 0, nb) == pytest.approx(nb.lr * 0.5 * (1 + math.cos(math.pi / 200)))
    assert moco.adjust_lr(opt, 199, nb) == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "no such folder"),
    (["--moco-k", "16"], "smaller than the 32 keys"),
    (["--moco-k", "48", "--symmetric"], "x2 for --symmetric"),
    (["--bn-splits", "5"], "cannot be split into --bn-splits 5"),
    (["--bn-splits", "32"], "groups of 2 or more images"),  # groups of one image
    (["--bn-splits", "0"], "--bn-splits 0 must be >= 1"),
    (["--preset", "v9"], "argument --preset: invalid choice: 'v9' (choose from 'small', 'v1', 'v2', 'cifar')"),
    (["--fused", "maybe"], "argument --fused: invalid choice: 'maybe'"),
    (["--arch", "vgg16"], "unknown --arch"),
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["--resume", "/no/such/ckpt.pt"], "does not exist"),
])
def test_user_errors_are_one_line(argv, message, tmp_path, capsys):
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o")] + argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--moco-m", "1.5"], "--moco-m 1.5 must be in [0, 1]"),
    (["--moco-m", "-0.1"], "--moco-m -0.1 must be in [0, 1]"),
    (["--moco-m", "nan"], "--moco-m nan must be in [0, 1]"),
    (["--moco-k", "0"], "--moco-k 0 must be >= 1"),
    (["--moco-t", "0"], "--moco-t 0.0 must be > 0"),
    (["--moco-t", "-0.1"], "--moco-t -0.1 must be > 0"),
    (["--moco-dim", "0"], "--moco-dim 0 must be >= 1"),
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--lr", "-0.03"], "--lr -0.03 must be > 0"),
    (["--lr", "inf"], "--lr inf must be > 0"),
    (["--batch-size", "1"], "--batch-size 1 must be >= 2"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 2"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--momentum", "1"], "--momentum 1.0 must be in [0, 1)"),
    (["--wd", "-0.5"], "--wd -0.5 must be >= 0"),
    (["--crop-min", "0"], "--crop-min 0.0 must be in (0, 1]"),
    (["--crop-min", "1.5"], "--crop-min 1.5 must be in (0, 1]"),
    (["--image-size", "4"], "--image-size 4 must be >= 8"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
    (["--log-every", "0"], "--log-every 0 must be >= 1"),
    (["--max-steps", "-1"], "must be >= 0"),
    (["--knn-every", "-1"], "must be >= 0"),
    (["--milestones", "120,x"], "--milestones '120,x' must be epochs"),
    (["--aug", "v3"], "argument --aug: invalid choice: 'v3' (choose from 'v1', 'v2', 'cifar')"),
    (["--schedule", "linear"], "argument --schedule: invalid choice"),
    (["--bn", "group"], "argument --bn: invalid choice"),
    (["--stem", "tiny"], "argument --stem: invalid choice"),
    (["--mechanism", "bank"], "argument --mechanism: invalid choice"),
    (["--moco-k", "1e3"], "argument --moco-k: invalid int value: '1e3'"),
    (["--save-on-signal", "TERM,KILL"], "--save-on-signal 'TERM,KILL': KILL is not a signal a process can catch"),
    (["--save-on-signal", "FOO"], "FOO is not a signal"),
    (["--arch", "vgg16"], "unknown --arch 'vgg16'"),
])
def test_nonsense_hyperparameters_stop_before_any_work(argv, message, tmp_path, capsys):
    """One line, exit 2, and nothing done: no output folder, no data read."""
    out = tmp_path / "o"
    code, stdout, err = run_main(TINY + ["--out", str(out)] + argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists() and "data:" not in stdout


def test_momentum_one_is_a_frozen_key_encoder(tmp_path, capsys):
    """m = 1 is legal: after 1 and after 3 steps the key encoder's weights are the same (its initialisation)
    while the query encoder's moved."""
    states = []
    for steps in (1, 3):
        out = tmp_path / f"s{steps}"
        code, _, err = run_main(TINY + ["--out", str(out), "--moco-m", "1", "--max-steps", str(steps)], capsys)
        assert code == 0, err
        states.append(torch.load(out / "ckpt.pt", weights_only=False)["model"])
    weights = [k for k in states[0] if k.endswith("weight")]
    assert all(torch.equal(states[0][k], states[1][k]) for k in weights if k.startswith("encoder_k."))
    assert not all(torch.equal(states[0][k], states[1][k]) for k in weights if k.startswith("encoder_q."))


@pytest.mark.parametrize("sub", ["", "o"])
def test_out_that_cannot_be_a_folder(sub, tmp_path, capsys):
    """--out naming a file, or a folder under a file: one line, exit 2, the file untouched."""
    f = tmp_path / "a_file"
    f.write_text("keep me")
    code, _, err = run_main(TINY + ["--out", str(f / sub if sub else f)], capsys)
    assert code == 2 and err.startswith("error: --out ") and "cannot make the output folder" in err, err
    assert err.count("\n") == 1 and f.read_text() == "keep me"


def test_folder_errors(tmp_path, capsys, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--data", str(empty)], capsys)
    assert code == 2 and "no class folders" in err
    (empty / "cat").mkdir()
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--data", str(empty)], capsys)
    assert code == 2 and "has no images" in err
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--data", image_folder, "--batch-size", "128",
                                    "--moco-k", "256"], capsys)
    assert code == 2 and "larger than the training set" in err


def test_corrupt_image_is_named(tmp_path, capsys, image_folder):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "class0" / "000.png").write_bytes(b"not an image")
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--data", str(data), "--knn-every", "1"], capsys)
    assert code == 2 and "000.png" in err and err.count("\n") == 1, err


def test_wrong_or_truncated_checkpoint(tmp_path, capsys):
    bad = tmp_path / "dim.pt"
    torch.save({"algo": "dim", "args": {}}, bad)
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--resume", str(bad)], capsys)
    assert code == 2 and "not a moco.py checkpoint" in err
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK\x03\x04garbage")
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "o"), "--resume", str(trunc)], capsys)
    assert code == 2 and "truncated or not a checkpoint" in err
    with pytest.raises(SystemExit) as e:
        eval_linear.main(["--pretrained", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "missing.pt does not exist" in capsys.readouterr().err


def test_non_finite_loss_stops_with_checkpoint_intact(tmp_path, capsys):
    out = str(tmp_path / "o")
    code, _, err = run_main(TINY + ["--out", out, "--max-steps", "2"], capsys)
    assert code == 0, err
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    code, _, err = run_main(TINY + ["--out", out, "--resume", "auto", "--max-steps", "4", "--lr", "1e30"], capsys)
    assert code == 2 and ("loss is nan" in err.lower() or "loss is inf" in err.lower()), err
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert after["step"] == before["step"] == 2


def test_unusual_images_just_work(tmp_path):
    import numpy as np
    from PIL import Image
    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(d / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(d / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(d / "tiny.png")  # smaller than the crop
    data = moco.Folder(str(tmp_path / "imgs"))
    assert len(data) == 6
    args, _ = moco.parse_args(["--image-size", "32"])
    train_tf, test_tf = moco.transforms(args, "imagenet")
    for i in range(len(data)):
        img, y = data[i]
        assert img.mode == "RGB" and y == 0
        a, b = train_tf(img)
        assert a.shape == b.shape == test_tf(img).shape == (3, 32, 32)
    deep = dict(zip([os.path.basename(p) for p, _ in data.samples], range(6)))["deep16.png"]
    assert np.asarray(data[deep][0]).max() > 128  # 16-bit values are scaled, not clipped to white/black


def test_idx_folder_is_read_directly(tmp_path):
    """--dataset fashionmnist|mnist --data FOLDER with the four IDX .gz files (Debian's layout, torchvision's raw/
    folder): read with read_idx into memory; with a file missing, torchvision's loader (and its message)."""
    import shutil
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copyfile(os.path.join(ROOT, "data", f"t10k-{kind}-ubyte.gz"), tmp_path / f"{split}-{kind}-ubyte.gz")
    train, test, stats = moco.load_data(moco.Args(data=str(tmp_path), dataset="fashionmnist"))
    ref = moco.read_idx(os.path.join(ROOT, "data", "t10k-images-idx3-ubyte.gz"))
    assert stats == "fashionmnist" and len(train) == len(test) == 10000
    assert (train.data == ref).all() and train.targets[:3] == test.targets[:3]
    x = gpu_aug.device_images(train, torch.device("cpu"))
    assert x.shape == (10000, 3, 28, 28) and torch.equal(x[:, 0], torch.tensor(ref))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(moco.UserError, match="add --download"):
        moco.load_data(moco.Args(data=str(tmp_path), dataset="fashionmnist"))
