"""moco.py's three contrastive mechanisms (MoCo paper Sec. 3.2, Fig. 3) and --shuffle-bn: the end-to-end and
memory-bank losses and the bank update against naive float64 references, then each mechanism end to end."""
import json
import math
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import eval_linear
import moco
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "3", "--batch-size", "32", "--moco-k", "64", "--bn-splits", "4", "--workers", "0",
        "--knn-every", "0", "--log-every", "1", "--device", "cpu", "--fused", "off"]


def base(bn_splits=1):
    return partial(moco.build_encoder, "basic32", "cifar", bn_splits)


def naive_infonce(q, pos, negs, T):
    """-log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.k_j/T)) for one query, by a Python loop (float64)."""
    terms = [torch.dot(q, pos) / T] + [torch.dot(q, n) / T for n in negs]
    return -(terms[0] - torch.logsumexp(torch.stack(terms), 0))


# ----------------------------------------------------------------------------------------------------
# End-to-end
# ----------------------------------------------------------------------------------------------------
def test_end_to_end_loss_and_gradient_match_naive_float64():
    """Query n's positive is key n, its negatives the other B - 1 keys; the keys come from the query encoder and
    carry gradient: the loss and every weight's gradient equal a loop over the batch in float64."""
    torch.manual_seed(0)
    model = moco.EndToEnd(base(), dim=16, T=0.2).double()
    im_q, im_k = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randn(6, 3, 32, 32, dtype=torch.float64)
    loss, acc1, acc5, pending = model.training_loss(im_q, im_k)
    assert pending is None
    grads = torch.autograd.grad(loss, list(model.parameters()))
    q = F.normalize(model.encoder_q(im_q), dim=1)  # the same BN statistics: same batch, train mode
    k = F.normalize(model.encoder_q(im_k), dim=1)
    losses = [naive_infonce(q[n], k[n], [k[j] for j in range(6) if j != n], 0.2) for n in range(6)]
    ref = torch.stack(losses).mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), retain_graph=True)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)
    # the key path matters: detaching the keys changes the gradient (the gradient flows through both)
    q_only = torch.stack([naive_infonce(q[n], k[n].detach(), [k[j].detach() for j in range(6) if j != n], 0.2)
                          for n in range(6)]).mean()
    g_q = torch.autograd.grad(q_only, list(model.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(g_q, ref_grads))
    logits = q @ k.T / 0.2
    beat = (logits > logits.diagonal()[:, None]).sum(1)
    assert acc1.item() == pytest.approx(100 * (beat == 0).double().mean().item())


@pytest.mark.parametrize("shuffle", [True, False])
def test_end_to_end_keys_with_and_without_shuffle_bn(shuffle, monkeypatch):
    """Split BN in 2 groups: with shuffle-BN the keys are encoded in a permuted order (each key sees the
    statistics of a random group) and put back in the batch's order; without, in the queries' order."""
    torch.manual_seed(0)
    model = moco.EndToEnd(base(2), dim=16, T=0.2, shuffle_bn=shuffle).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    perm = torch.tensor([5, 2, 7, 0, 4, 1, 6, 3])
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: perm.clone())
    got = model.keys(x)
    shuffled = F.normalize(model.encoder_q(x[perm]), dim=1)[torch.argsort(perm)]
    in_order = F.normalize(model.encoder_q(x), dim=1)
    want, other = (shuffled, in_order) if shuffle else (in_order, shuffled)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, other, atol=1e-6)  # the groups' statistics depend on the order


def test_moco_shuffle_bn_off_keeps_the_queries_order():
    """MoCo with --shuffle-bn off and split BN: no permutation, the keys are encoded in the queries' order."""
    torch.manual_seed(0)
    model = moco.MoCo(base(2), dim=16, K=32, shuffle_bn=False)
    x = torch.randn(8, 3, 32, 32)
    same, idx = model._batch_shuffle(x)
    assert same is x and idx is None
    on = moco.MoCo(base(2), dim=16, K=32)
    assert on._batch_shuffle(x)[1] is not None


# ----------------------------------------------------------------------------------------------------
# Memory bank
# ----------------------------------------------------------------------------------------------------
def test_memory_bank_loss_and_update_match_naive_float64(monkeypatch):
    """The positive is the image's bank entry, the negatives K drawn entries (no gradient reaches the bank);
    after the step each entry of the batch becomes normalise(t * entry + (1 - t) * q)."""
    torch.manual_seed(0)
    n_images, K, t = 40, 7, 0.3
    model = moco.MemoryBank(base(), n_images, dim=16, K=K, T=0.2, t=t).double()
    idx = torch.tensor([3, 17, 8, 30, 0])
    neg = torch.tensor([1, 1, 39, 22, 4, 9, 12])  # with replacement; none of the batch
    monkeypatch.setattr(model, "negatives", lambda idx_all: neg)
    im = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    bank0 = model.bank.clone()
    loss, acc1, acc5, pending = model.training_loss(im, idx)
    q = F.normalize(model.encoder_q(im), dim=1)
    ref = torch.stack([naive_infonce(q[n], bank0[:, idx[n]], [bank0[:, j] for j in neg], 0.2)
                       for n in range(5)]).mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
    loss.backward()
    assert not model.bank.requires_grad and model.bank.grad is None
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    model.update_dictionary(pending)
    for j in range(n_images):
        if j in idx.tolist():
            n = idx.tolist().index(j)
            v = t * bank0[:, j] + (1 - t) * q[n].detach()
            assert torch.allclose(model.bank[:, j], v / v.norm(), atol=1e-12)
            assert math.isclose(model.bank[:, j].norm().item(), 1.0, rel_tol=1e-12)
        else:
            assert torch.equal(model.bank[:, j], bank0[:, j])


def test_memory_bank_starts_as_random_unit_vectors():
    model = moco.MemoryBank(base(), 500, dim=32, K=16)
    norms = model.bank.norm(dim=0)
    assert model.bank.shape == (32, 500) and torch.allclose(norms, torch.ones(500), atol=1e-5)
    assert model.bank.mean(1).abs().max() < 0.1  # no common direction: uniform on the sphere
    assert "bank" in model.state_dict()  # in the checkpoint


def test_memory_bank_negatives_are_uniform_outside_the_batch():
    """Many draws over 30 images with a batch of 5: the batch's images never, each of the other 25 as often as
    uniform sampling predicts (chi-square, 24 degrees of freedom, well below the 0.1% point of 51.2)."""
    torch.manual_seed(0)
    model = moco.MemoryBank(base(), 30, dim=4, K=1000)
    batch = torch.tensor([29, 0, 13, 14, 7])
    counts = torch.zeros(30)
    for _ in range(50):
        counts += torch.bincount(model.negatives(batch), minlength=30)
    assert counts[batch].sum() == 0
    rest = counts[[i for i in range(30) if i not in batch.tolist()]]
    expected = 50 * 1000 / 25
    assert ((rest - expected) ** 2 / expected).sum() < 51.2


def test_memory_bank_fused_loss_equals_the_fallback():
    moco_ext = moco.load_fused("on", torch.device("cpu"))  # builds it just in time if it is not installed
    torch.manual_seed(0)
    plain = moco.MemoryBank(base(), 64, dim=16, K=20, T=0.2)
    fused = moco.MemoryBank(base(), 64, dim=16, K=20, T=0.2, fused=moco_ext)
    fused.load_state_dict(plain.state_dict())
    im, idx = torch.randn(8, 3, 32, 32), torch.arange(8) * 3
    torch.manual_seed(1)
    a = plain.training_loss(im, idx)
    torch.manual_seed(1)  # the same negatives
    b = fused.training_loss(im, idx)
    assert torch.allclose(a[0], b[0], atol=1e-5) and a[1] == b[1] and a[2] == b[2]
    ga = torch.autograd.grad(a[0], list(plain.encoder_q.parameters()))
    gb = torch.autograd.grad(b[0], list(fused.encoder_q.parameters()))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


# ----------------------------------------------------------------------------------------------------
# End to end: each mechanism trains, resumes exactly, and eval_linear.py reads its checkpoint
# ----------------------------------------------------------------------------------------------------
def run_moco(argv):
    return in_process(moco.main, *TINY, *argv, check=True).stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--mechanism", "end-to-end"], ["--mechanism", "memory-bank"],
                                   ["--shuffle-bn", "off"], ["--mechanism", "memory-bank", "--gpu-aug", "off"]],
                         ids=["end-to-end", "memory-bank", "moco-no-shuffle", "memory-bank-cpu-loader"])
def test_mechanism_resumes_exactly(flags, tmp_path, image_folder):
    """120 images, batch 32 (3 steps per epoch): 7 steps straight == 4, stop, resume to 7 (mid-epoch, across an
    epoch end); the bank is in the checkpoint, and eval_linear.py loads the encoder."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", image_folder] + flags
    run_moco(common + ["--out", a, "--max-steps", "7"])
    run_moco(common + ["--out", b, "--max-steps", "4"])
    assert "resumed" in run_moco(common + ["--out", b, "--max-steps", "7", "--resume", "auto"])
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"] == 7
    for key, va in ca["model"].items():
        assert torch.equal(va, cb["model"][key]), key
    la, lb = ([json.loads(s)["loss"] for s in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in s] for d in (a, b))
    assert la == lb
    keys = set(ca["model"])
    mech = ca["args"]["mechanism"]
    assert ("bank" in keys) == (mech == "memory-bank") and ("queue" in keys) == (mech == "moco")
    assert not any(k.startswith("encoder_k.") for k in keys) or mech == "moco"
    if mech == "memory-bank":  # one unit vector per training image (all 120: no kNN monitor, nothing held out)
        bank = ca["model"]["bank"]
        assert bank.shape == (128, 120) and torch.allclose(bank.norm(dim=0), torch.ones(120), atol=1e-5)
    enc, meta = eval_linear.load_encoder(eval_linear.Args(pretrained=os.path.join(a, "ckpt.pt"), layer="backbone"))
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 1024) and meta["mechanism"] == mech


@pytest.mark.parametrize("argv, message", [
    (["--mechanism", "bank"], "argument --mechanism: invalid choice: 'bank' (choose from 'moco', 'end-to-end', "
                              "'memory-bank')"),
    (["--shuffle-bn", "no"], "argument --shuffle-bn: invalid choice: 'no' (choose from 'on', 'off')"),
    (["--mechanism", "end-to-end", "--symmetric"], "--symmetric is for --mechanism moco"),
    (["--mechanism", "memory-bank", "--bank-t", "1"], "--bank-t 1.0 must be in [0, 1)"),
    (["--mechanism", "memory-bank", "--batch-size", "8000", "--bn-splits", "1"], "leaves none of the 8000"),
])
def test_mechanism_user_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        moco.main(["--out", str(tmp_path / "o"), "--max-steps", "1", "--workers", "0"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_end_to_end_ignores_the_queue_size(tmp_path):
    """K of end-to-end is the batch: a --moco-k below the batch is no error there (it is for MoCo)."""
    moco.main(["--out", str(tmp_path / "o"), "--max-steps", "1", "--workers", "0", "--batch-size", "32",
               "--moco-k", "8", "--knn-every", "0", "--mechanism", "end-to-end", "--device", "cpu"])
    r = in_process(moco.main, "--out", tmp_path / "p", "--max-steps", "1", "--workers", "0", "--batch-size", "32",
                   "--moco-k", "8", "--knn-every", "0", "--device", "cpu")
    assert r.returncode == 2 and r.stderr == ("error: queue size --moco-k 8 is smaller than the 32 keys enqueued per "
                                              "step (global batch 32)\n"), r.stderr
