"""Tests for dim.py: estimators against naive loops, prior gradient signs, learning, end to end, resume, errors."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import dim
import eval_linear
import gpu_aug
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *argv, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {argv} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


# ---------------------------------------------------------------------------------------------------
# Estimators: each against a naive loop over images, locations and negatives, in float64 Python floats
# ---------------------------------------------------------------------------------------------------
def naive_local_global_loss(l, g, estimator):
    N, D, L = l.shape
    l, g = l.tolist(), g.tolist()

    def T(i, j, loc):  # critic score of global feature i against location loc of image j
        return sum(g[i][d] * l[j][d][loc] for d in range(D))

    sp = lambda t: math.log1p(math.exp(t))
    pos = {(i, loc): T(i, i, loc) for i in range(N) for loc in range(L)}
    neg = {i: [T(i, j, k) for j in range(N) if j != i for k in range(L)] for i in range(N)}
    all_neg = [t for i in range(N) for t in neg[i]]
    if estimator == "jsd":  # Eq. (4), negated
        return sum(sp(-t) for t in pos.values()) / len(pos) + sum(sp(t) for t in all_neg) / len(all_neg)
    if estimator == "nce":  # Eq. (5), negated: each (image, location) against all locations of the other images
        return -sum(t - math.log(math.exp(t) + sum(math.exp(u) for u in neg[i])) for (i, _), t in pos.items()) / len(pos)
    if estimator == "dv":  # Eq. (2), negated
        return -(sum(pos.values()) / len(pos) - math.log(sum(math.exp(u) for u in all_neg) / len(all_neg)))
    raise ValueError(estimator)


@pytest.mark.parametrize("estimator", ["jsd", "nce", "dv"])
@pytest.mark.parametrize("N,D,L", [(5, 3, 7), (6, 4, 2)])
def test_estimator_matches_naive_loop(estimator, N, D, L):
    g = torch.Generator().manual_seed(N * 100 + L)
    l = torch.randn(N, D, L, generator=g, dtype=torch.float64)
    glob = torch.randn(N, D, generator=g, dtype=torch.float64)
    got = dim.local_global_loss(l, glob, estimator)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(got.item() - naive_local_global_loss(l, glob, estimator)) < 1e-10


@pytest.mark.parametrize("n", [2, 3, 7])
def test_mi_loss_splits_scores_as_the_boolean_mask(n):
    """mi_loss takes positives and negatives without a boolean mask (which syncs with the host): the same
    values in the same order as scores[eye] and scores[~eye], exactly."""
    scores = torch.randn(n, n, 5, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.bool)
    seen = {}
    dim.ESTIMATORS["probe"] = lambda pos, neg: seen.update(pos=pos, neg=neg) or pos.sum()
    try:
        dim.mi_loss(scores, "probe")
    finally:
        del dim.ESTIMATORS["probe"]
    assert torch.equal(seen["pos"], scores[eye]) and torch.equal(seen["neg"], scores[~eye].reshape(n, -1))


def test_estimators_at_zero_scores():
    """T = 0 everywhere: JSD loss 2 log 2, NCE loss log(1 + (N-1)L), DV loss 0 (the documented offsets)."""
    N, D, L = 4, 3, 5
    l, g = torch.zeros(N, D, L, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    assert math.isclose(dim.local_global_loss(l, g, "jsd").item(), 2 * math.log(2))
    assert math.isclose(dim.local_global_loss(l, g, "nce").item(), math.log(1 + (N - 1) * L))
    assert abs(dim.local_global_loss(l, g, "dv").item()) < 1e-12


def test_concat_critic_equals_concatenation():
    """The split first layer W_c c + W_y y equals an MLP on the concatenation [c; y], for every pair."""
    torch.manual_seed(0)
    crit = dim.ConcatCritic(5, 3, hidden=8).double()
    c, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    scores = crit(c, y)  # (4, 4, 6)
    w = torch.cat([crit.w_c.weight, crit.w_y.weight], 1)  # (8, 8)
    for i in range(4):
        for j in range(4):
            for loc in range(6):
                h = w @ torch.cat([c[j, loc], y[i]]) + crit.w_c.bias
                assert torch.allclose(scores[i, j, loc], crit.rest(h).squeeze(), atol=1e-12)


def global_dim(argv):
    args = dim.resolve(dim.parse_args(argv)[0])
    torch.manual_seed(0)
    enc = dim.build_encoder(args.arch, args.image_size, args.y_dim)
    return dim.DIM(enc, args.image_size, args.y_dim, args.beta > 0, args.alpha > 0, args.critic, args.mi_units,
                   args.global_critic, args.global_layer), args


@pytest.mark.parametrize("preset", ["dimG", "dimLG"])
def test_dimg_presets_build_the_papers_global_critic(preset):
    """The paper's DIM(G) (Appendix, Tables 6-7): the last conv layer (256x4x4 for basic32) flattened and
    concatenated with Y, then 512 -> 512 -> 1; scores for every (Y_i, image j) pair."""
    model, args = global_dim(["--preset", preset])
    assert (args.global_critic, args.global_layer) == ("mlp", "conv")
    crit = model.global_critic
    assert isinstance(crit, dim.ConcatCritic)
    assert crit.w_c.weight.shape == (512, 256 * 4 * 4) and crit.w_y.weight.shape == (512, 64)
    assert [m.weight.shape for m in crit.rest if isinstance(m, torch.nn.Linear)] == [(512, 512), (1, 512)]
    assert (model.local_critic is not None) == (preset == "dimLG")
    x = torch.randn(6, 3, 32, 32)
    f = model.encoder(x)
    scores = crit(f["conv"].flatten(1)[:, None], f["y"])  # (N, N, 1): [i (y), j (conv)]
    assert scores.shape == (6, 6, 1)
    torch.manual_seed(1)
    losses, y = model(x)
    assert set(losses) == ({"global"} if preset == "dimG" else {"local", "global"}) and y.shape == (6, 64)
    want = dim.mi_loss(scores.float(), "jsd")
    assert torch.allclose(losses["global"], want, atol=1e-5)


def test_official_global_dim_is_a_dot_critic_on_the_local_map():
    """--global-critic dot --global-layer local: the official GlobalDIM, the 128x8x8 local map through a fresh
    copy of the encoder's upper layers (conv 256, FC 1024) and a Linear to mi_units, Y through a Linear to
    mi_units, scored by their dot product."""
    model, _ = global_dim(["--preset", "dimG", "--global-critic", "dot", "--global-layer", "local", "--mi-units", "32"])
    crit = model.global_critic
    assert isinstance(crit, dim.GlobalDotCritic)
    convs = [m for m in crit.phi.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.shape for c in convs] == [(256, 128, 4, 4)]
    assert crit.phi[-1].weight.shape == (32, 1024) and crit.psi.weight.shape == (32, 64)
    enc_conv = model.encoder.to_conv[0].weight
    assert not torch.equal(convs[0].weight, enc_conv)  # a fresh copy, not the encoder's weights
    assert convs[0].weight.data_ptr() != enc_conv.data_ptr()
    x = torch.randn(5, 3, 32, 32)
    f = model.encoder(x)
    scores = crit(f["local"], f["y"])  # (5, 5, 1)
    for i in range(5):
        for j in range(5):
            ref = torch.dot(crit.psi(f["y"][i:i + 1])[0], crit.phi(f["local"])[j])
            assert torch.allclose(scores[i, j, 0], ref, atol=1e-4)
    conv_model, _ = global_dim(["--preset", "dimG", "--global-critic", "dot", "--mi-units", "32"])
    assert not any(isinstance(m, torch.nn.Conv2d) for m in conv_model.global_critic.phi.modules())  # FC 1024 only


def test_local_samples_are_drawn_per_image_with_replacement(monkeypatch):
    """--local-samples S (the official sample_locations): each image its own S locations, with replacement."""
    model, _ = global_dim(["--preset", "dimL", "--mi-units", "16"])
    seen = []
    real = dim.DIM._mi
    monkeypatch.setattr(dim.DIM, "_mi",
                        staticmethod(lambda critic, c, y, est: seen.append(c) or real(critic, c, y, est)))
    x = torch.randn(8, 3, 32, 32)
    model(x, local_samples=20)
    full = model.encoder(x)["local"].flatten(2).transpose(1, 2)  # (8, 64, 128)
    c = seen[-1]
    assert c.shape == (8, 20, 128)
    picks = [[next(l for l in range(64) if torch.equal(full[n, l], c[n, s])) for s in range(20)] for n in range(8)]
    assert len({tuple(p) for p in picks}) == 8  # per image
    assert any(len(set(p)) < 20 for p in picks)  # with replacement (20 of 64: a repeat in 8 images is all but sure)


def test_prior_gradient_penalty_is_the_official_mean_of_real_and_fake():
    """gp * (E_V|grad_v D|^2 + E_P|grad D|^2) / 2 on top of the logistic loss (rdevon/DIM discriminator.py)."""
    torch.manual_seed(0)
    d, y = dim.prior_discriminator(8), torch.randn(16, 8)  # prior_d_loss computes in float32
    torch.manual_seed(1)
    loss0, _ = dim.prior_d_loss(d, y, gp=0.0)
    torch.manual_seed(1)
    loss1, _ = dim.prior_d_loss(d, y, gp=1.0)
    torch.manual_seed(1)
    fake = torch.sigmoid(y).requires_grad_()
    real = torch.rand_like(fake).requires_grad_()
    pen = [torch.autograd.grad(d(v).sum(), v)[0].pow(2).sum(1).mean() for v in (real, fake)]
    assert math.isclose((loss1 - loss0).item(), 0.5 * (pen[0] + pen[1]).item(), rel_tol=1e-4)
    assert dim.Args().prior_gp == 1.0  # the official value is the default


# ---------------------------------------------------------------------------------------------------
# Prior matching (Eq. 7): the discriminator learns to tell, the encoder learns to fool
# ---------------------------------------------------------------------------------------------------
def d_eval(d, y):
    """-> D's loss, hard accuracy (%), and mean probability that it calls the encoder's sigmoid(y) fake."""
    torch.manual_seed(123)  # the same prior samples for every evaluation
    with torch.no_grad():
        loss, acc = dim.prior_d_loss(d, y)
        p_fake = 1 - torch.sigmoid(d(torch.sigmoid(y))).mean()
    return loss.item(), acc.item(), p_fake.item()


def test_prior_gradient_signs():
    """One discriminator step makes D better at telling sigmoid(Y) from U[0,1]^Y; one encoder step on the
    non-saturating loss makes it worse (the sign that popular reimplementations get wrong)."""
    torch.manual_seed(0)
    d = dim.prior_discriminator(8)
    y = (2.0 + 0.5 * torch.randn(512, 8)).requires_grad_()  # sigmoid(y) is far from uniform
    loss0, acc0, fake0 = d_eval(d, y)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-2)
    torch.manual_seed(1)
    loss, _ = dim.prior_d_loss(d, y)
    opt_d.zero_grad()
    loss.backward()
    assert y.grad is None  # the discriminator's loss sends no gradient into the encoder
    opt_d.step()
    loss1, acc1, fake1 = d_eval(d, y)
    assert loss1 < loss0 and acc1 > acc0 and fake1 > fake0
    before = [p.detach().clone() for p in d.parameters()]
    opt_e = torch.optim.Adam([y], lr=0.3)
    dim.prior_encoder_loss(d, y).backward()
    opt_e.step()
    loss2, acc2, fake2 = d_eval(d, y)
    assert loss2 > loss1 and acc2 <= acc1 and fake2 < fake1
    assert all(torch.equal(a, b) for a, b in zip(before, d.parameters()))  # the encoder step leaves D alone


def test_prior_step_runs_outside_autocast_with_its_own_scaler(monkeypatch, inside):
    """train_step under bf16 autocast (CPU autocast here): the encoder runs under autocast (its convolutions give
    bf16), the discriminator's
    loss, step and the encoder's prior loss outside it in float32, and the discriminator's loss goes through its
    own gradient scaler (the encoder's scaler sees only the encoder's loss)."""
    torch.manual_seed(0)
    model, prior = dim.DIM(dim.build_encoder("basic32", 32), 32, units=32), dim.prior_discriminator()
    seen = []

    def spy(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen.append((fn.__name__, torch.is_autocast_enabled("cpu"), (out[0] if isinstance(out, tuple) else out).dtype))
            return out
        return wrapped
    monkeypatch.setattr(dim, "prior_d_loss", spy(dim.prior_d_loss))
    monkeypatch.setattr(dim, "prior_encoder_loss", spy(dim.prior_encoder_loss))

    class Scaler(torch.amp.GradScaler):
        def __init__(self):
            super().__init__("cpu", enabled=False)
            self.scaled = []

        def scale(self, loss):
            self.scaled.append(loss)
            return super().scale(loss)
    scaler, scaler_prior = Scaler(), Scaler()
    opts = torch.optim.Adam(model.parameters(), 1e-4), torch.optim.Adam(prior.parameters(), 1e-4)
    before = [p.detach().clone() for p in prior.parameters()]
    args = dim.Args(gamma=0.1, estimator="jsd")
    vals = dim.train_step(model, prior, opts, (scaler, scaler_prior), torch.randn(8, 3, 32, 32), args, torch.bfloat16)
    assert seen == [("prior_d_loss", False, torch.float32), ("prior_encoder_loss", False, torch.float32)], seen
    assert inside.dtypes() == {torch.bfloat16}, inside.dtypes()
    assert len(scaler_prior.scaled) == 1 and scaler_prior.scaled[0] is not scaler.scaled[0]
    assert torch.isclose(scaler_prior.scaled[0], vals[4]) and torch.isfinite(vals).all()
    assert all(p.grad.dtype == torch.float32 for p in prior.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, prior.parameters()))  # the discriminator stepped


# ---------------------------------------------------------------------------------------------------
# Learning: a short local-DIM run on real images beats the same encoder at random initialisation
# ---------------------------------------------------------------------------------------------------
def test_local_dim_learns():
    """kNN accuracy of the conv-tap features on a subset of the built-in data (3000 bank / 1000 test images),
    after 100 DIM(L) steps, against the same network at its random initialisation. The conv tap moves first;
    fc and Y dip before they improve, so a short run cannot be judged on them. lr 1e-3 (paper: 1e-4) to learn
    in 100 steps."""
    torch.manual_seed(0)
    train, test, stats = dim.load_data(dim.Args())
    tf = dim.test_transform(32, stats)

    def tensors_of(ds, n):
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack([tf(x) for x in xs]), torch.tensor(ys)
    x_bank, y_bank = tensors_of(train, 3000)
    x_test, y_test = tensors_of(test, 1000)

    def knn(encoder):
        tap = dim.Tap(encoder, "conv").eval()
        with torch.no_grad():
            feats = lambda x: torch.cat([tap(b).flatten(1) for b in x.split(500)])
            return dim.knn_top1(feats(x_bank), y_bank, feats(x_test), y_test)

    encoder = dim.build_encoder("basic32", 32)
    before = knn(encoder)
    model, d = dim.DIM(encoder, 32, units=64), dim.prior_discriminator()
    opt = torch.optim.Adam(model.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(100):
        model.train()
        mi, y = model(x_bank[torch.randint(0, 3000, (32,))], "jsd")
        d_loss, _ = dim.prior_d_loss(d, y)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        loss = mi["local"] + 0.1 * dim.prior_encoder_loss(d, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mi["local"].item())
    after = knn(encoder)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after > before, (before, after)


# ---------------------------------------------------------------------------------------------------
# End to end: dim.py on the built-in data for a few steps, then eval_linear.py on each tap
# ---------------------------------------------------------------------------------------------------
TINY = ["--mi-units", "64", "--workers", "0", "--knn-every", "0", "--log-every", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dim")
    p = run("dim.py", "--out", out, "--max-steps", 10, *TINY)
    assert "done: 10 steps" in p.stdout
    args = json.load(open(out / "args.json"))
    assert args["image_size"] == 32 and args["aug"] == "none" and (args["alpha"], args["beta"], args["gamma"]) == (0, 1, 0.1)
    assert len(open(out / "metrics.jsonl").readlines()) == 2
    return out


def probe(ckpt, layer, *extra):
    """eval_linear.py on one tap: conv as a real process (the command line), the others in this process."""
    out = os.path.join(os.path.dirname(ckpt), f"eval_{layer}{'_'.join(extra)}.json")
    argv = ["--pretrained", ckpt, "--layer", layer, "--epochs", 2, "--workers", 0, "--out", out, *extra]
    if layer == "conv":
        run("eval_linear.py", *argv)
    else:
        in_process(eval_linear.main, *argv, check=True)
    return json.load(open(out))


@pytest.mark.parametrize("layer", ["conv", "fc", "y"])
@pytest.mark.slow
def test_end_to_end_eval_linear(trained, layer):
    res = probe(str(trained / "ckpt.pt"), layer)
    assert res["feature_dim"] == {"conv": 256 * 4 * 4, "fc": 1024, "y": 64}[layer]
    assert res["n_train"] == 8000 and res["n_test"] == 2000 and not res["random_init"]
    if layer == "y":  # the checkpoint's weights were used: the same encoder at random init (same seed) differs
        rand = probe(str(trained / "ckpt.pt"), layer, "--random-init")
        assert rand["random_init"] and (rand["knn_top1"], rand["top1"]) != (res["knn_top1"], res["top1"]), (rand, res)


def test_encoder_for_eval(trained):
    ckpt = torch.load(trained / "ckpt.pt", weights_only=False)
    x = torch.randn(3, 3, 32, 32)
    for layer, shape in [("conv", (3, 256, 4, 4)), ("fc", (3, 1024)), ("y", (3, 64))]:
        net = dim.encoder_for_eval(ckpt, layer)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert net(x).shape == shape
    with pytest.raises(dim.UserError):
        dim.encoder_for_eval(ckpt, "backbone")
    rand = dim.encoder_for_eval({**ckpt, "model": None}, "y")
    assert not torch.equal(rand(x), dim.encoder_for_eval(ckpt, "y")(x))


# ---------------------------------------------------------------------------------------------------
# Exact resume: 8 steps straight equal 4 steps, then 4 more resumed (mid-epoch), tensor for tensor
# ---------------------------------------------------------------------------------------------------
def tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from tensors(v, f"{prefix}.{k}")


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    common = ["--batch-size", 16, "--mi-units", 32, "--workers", 0, "--knn-every", 0, "--gamma", 0.1,
              "--local-samples", 16]
    in_process(dim.main, "--out", tmp_path / "a", "--max-steps", 8, *common, check=True)
    in_process(dim.main, "--out", tmp_path / "c", "--max-steps", 4, *common, check=True)
    p = in_process(dim.main, "--out", tmp_path / "c", "--max-steps", 8, "--resume", "auto", check=True)
    assert f"resumed from {tmp_path / 'c' / 'ckpt.pt'} at epoch 0 step 4" in p.stdout
    a, c = (torch.load(tmp_path / x / "ckpt.pt", weights_only=False) for x in "ac")
    assert a["step"] == c["step"] == 8
    ta, tc = dict(tensors({k: a[k] for k in ("model", "prior", "optimizer", "prior_optimizer", "rng")})), \
        dict(tensors({k: c[k] for k in ("model", "prior", "optimizer", "prior_optimizer", "rng")}))
    assert ta.keys() == tc.keys() and len(ta) > 20
    for k in ta:
        assert torch.equal(ta[k], tc[k]), k


def test_resume_applies_the_flags_lr_betas_and_wd(tmp_path):
    """dim.py sets its two Adam optimisers' lr, betas and weight decay from the flags at every start: a run resumed
    with other values trains with them (a resumed optimiser would otherwise keep the checkpoint's)."""
    common = ["--out", tmp_path / "run", "--batch-size", 16, "--mi-units", 32, "--workers", 0, "--knn-every", 0]
    in_process(dim.main, *common, "--max-steps", 1, check=True)
    r = in_process(dim.main, *common, "--max-steps", 2, "--resume", "auto", "--lr", 3e-4, "--beta1", 0.9,
                   "--wd", 1e-5, check=True)
    assert "lr 0.0003" in r.stdout.splitlines()[-2]
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    for opt in ("optimizer", "prior_optimizer"):
        for g in ck[opt]["param_groups"]:
            assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (3e-4, (0.9, 0.999), 1e-5), (opt, g)


# ---------------------------------------------------------------------------------------------------
# --gpu-aug: uint8 images on the device, prepared in batches, against the CPU loader's transforms
# ---------------------------------------------------------------------------------------------------
def test_batch_prepare_matches_the_cpu_transform():
    """Resize 28 -> 32 + normalise: the PIL pipeline rounds to uint8 after resizing, so <= ~1/255 apart."""
    train, _, stats = dim.load_data(dim.Args())
    x = gpu_aug.device_images(train, torch.device("cpu"))
    assert x.shape == (8000, 3, 28, 28) and x.dtype == torch.uint8
    out = gpu_aug.BatchPrepare(32, "none", dim.MEAN_STD[stats])(x[:50], torch.Generator())  # (50, 3, 32, 32)
    ref = torch.stack([dim.test_transform(32, stats)(train[i][0]) for i in range(50)])
    err = (out - ref).abs().max().item() * dim.MEAN_STD[stats][1][0] * 255  # in pixel levels
    assert out.shape == ref.shape and 0 < err <= 1.01, err


def test_batch_prepare_crop_is_a_window_of_the_enlarged_image():
    """aug crop: each sample is a 32x32 window of the image resized to 48 (flipped or not), and the windows
    and flips vary across samples."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8)
    big = gpu_aug.BatchPrepare(48, "none", dim.MEAN_STD["cifar10"])(x, None)  # (16, 3, 48, 48)
    out = gpu_aug.BatchPrepare(32, "crop", dim.MEAN_STD["cifar10"])(x, torch.Generator().manual_seed(1))  # (16, 3, 32, 32)
    found = []
    for n in range(16):
        hits = [(i, j, f) for i in range(17) for j in range(17) for f in (0, 1)
                if torch.allclose((big[n, :, i:i + 32, j:j + 32].flip(-1) if f else big[n, :, i:i + 32, j:j + 32]),
                                  out[n], atol=1e-5)]
        assert hits, n
        found.append(hits[0])
    assert len(set(found)) > 8 and {f for _, _, f in found} == {0, 1}


@pytest.mark.slow
def test_gpu_aug_on_the_cpu_follows_the_loader_and_resumes_exactly(tmp_path):
    """dim.py --gpu-aug on (built-in data, no augmentation at 32 px): the loss curve of the CPU loader to within
    the uint8 rounding of the resize, and 6 steps straight == 3 steps, stop, resume to 6 (torch.equal)."""
    common = ["--batch-size", 16, "--mi-units", 32, "--workers", 0, "--knn-every", 0, "--log-every", 1]
    in_process(dim.main, "--out", tmp_path / "cpu", "--max-steps", 6, "--gpu-aug", "off", *common, check=True)
    p = in_process(dim.main, "--out", tmp_path / "dev", "--max-steps", 6, "--gpu-aug", "on", *common, check=True)
    assert "uint8 on cpu, read there in batches" in p.stdout
    curve = [[json.loads(l)["loss"] for l in open(tmp_path / x / "metrics.jsonl") if '"loss"' in l]
             for x in ("cpu", "dev")]
    assert len(curve[0]) == len(curve[1]) == 6
    assert abs(curve[0][0] - curve[1][0]) < 0.005 * curve[0][0], curve  # the same weights, inputs ~1/255 apart
    for a, b in zip(*curve):  # then the two runs drift apart slowly, as any two runs of SGD on nearby inputs
        assert abs(a - b) < 0.04 * abs(a), curve
    in_process(dim.main, "--out", tmp_path / "half", "--max-steps", 3, "--gpu-aug", "on", *common, check=True)
    in_process(dim.main, "--out", tmp_path / "half", "--max-steps", 6, "--gpu-aug", "on", "--resume", "auto", check=True)
    a, c = (torch.load(tmp_path / x / "ckpt.pt", weights_only=False) for x in ("dev", "half"))
    ta, tc = dict(tensors({k: a[k] for k in ("model", "prior", "optimizer")})), \
        dict(tensors({k: c[k] for k in ("model", "prior", "optimizer")}))
    assert a["step"] == c["step"] == 6 and ta.keys() == tc.keys()
    for k in ta:
        assert torch.equal(ta[k], tc[k]), k
    assert c["time_s"] > 0


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr starting with "error:", exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------
def assert_user_error(p, pattern):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), p.stderr


def test_bad_inputs(tmp_path):
    quick = ["--out", tmp_path / "o", "--workers", 0, "--knn-every", 0]
    assert_user_error(run("dim.py", "--data", tmp_path / "missing", *quick, check=False), "no such folder")  # a process
    assert_user_error(in_process(dim.main, "--batch-size", 9000, *quick), "larger than the training set")
    assert_user_error(in_process(dim.main, "--estimator", "mine", *quick), "--estimator")
    assert_user_error(in_process(dim.main, "--preset", "dimX", *quick), "argument --preset: invalid choice")
    assert_user_error(in_process(dim.main, "--gpu-aug", "yes", *quick), "argument --gpu-aug: invalid choice")
    assert_user_error(in_process(dim.main, "--no-such-flag", *quick), "unrecognized arguments: --no-such-flag")
    torch.save({"algo": "moco", "args": {}}, tmp_path / "moco.pt")
    assert_user_error(in_process(dim.main, "--resume", tmp_path / "moco.pt", *quick), "not a dim.py checkpoint")
    (tmp_path / "a_file").write_text("keep me")
    p = in_process(dim.main, *quick[2:], "--out", tmp_path / "a_file")
    assert_user_error(p, "--out .*cannot make the output folder")
    assert (tmp_path / "a_file").read_text() == "keep me"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_user_error(in_process(dim.main, "--resume", tmp_path / "junk.pt", *quick), "cannot read")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0"], "--lr 0.0 must be > 0"),
    (["--lr", "nan"], "--lr nan must be > 0"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--epochs", "0"], "--epochs 0 must be >= 1"),
    (["--beta1", "1"], "--beta1 and --beta2 must be in [0, 1)"),
    (["--beta2", "-0.1"], "--beta1 and --beta2 must be in [0, 1)"),
    (["--wd", "-1"], "--wd -1.0 must be >= 0"),
    (["--prior-gp", "-1"], "--prior-gp -1.0 must be >= 0"),
    (["--gamma", "-0.1"], "--alpha, --beta, --gamma must be >= 0"),
    (["--alpha", "0", "--beta", "0"], "with --alpha or --beta > 0"),
    (["--alpha", "inf"], "--alpha, --beta, --gamma must be >= 0"),
    (["--y-dim", "0"], "--y-dim and --mi-units must be >= 1"),
    (["--mi-units", "0"], "--y-dim and --mi-units must be >= 1"),
    (["--local-samples", "-1"], "--local-samples -1 must be >= 0"),
    (["--image-size", "-8"], "--image-size -8 must be >= 8"),
    (["--image-size", "36"], "needs --image-size a multiple of 8"),
    (["--workers", "-1"], "--workers -1 must be >= 0"),
    (["--log-every", "0"], "--log-every 0 must be >= 1"),
    (["--save-every", "-1"], "must be >= 0"),
    (["--critic", "bilinear"], "argument --critic: invalid choice: 'bilinear' (choose from 'dot', 'concat')"),
    (["--aug", "flip"], "argument --aug: invalid choice: 'flip'"),
    (["--global-critic", "x"], "argument --global-critic: invalid choice"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
])
def test_nonsense_hyperparameters_stop_before_any_work(argv, message, tmp_path, capsys):
    """One line, exit 2, and nothing done: no output folder, no data read."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        dim.main(["--out", str(out), "--workers", "0", "--knn-every", "0"] + argv)
    cap = capsys.readouterr()
    assert e.value.code == 2 and cap.err.startswith("error: ") and message in cap.err, cap.err
    assert cap.err.count("\n") == 1 and not out.exists() and "data:" not in cap.out


def test_eval_linear_checks_flags_before_the_work(trained, tmp_path):
    """A bad --out or --aug stops eval_linear.py in one line before feature extraction (no "features:" line)."""
    bad_out = "--out .*not a writable file"
    for flags, pattern in [(["--out", tmp_path / "missing" / "r.json"], bad_out), (["--out", tmp_path], bad_out),
                           (["--aug", "flip"], "argument --aug: invalid choice")]:
        p = in_process(eval_linear.main, "--pretrained", trained / "ckpt.pt", "--layer", "fc", "--workers", 0, *flags)
        assert_user_error(p, pattern)
        assert "features:" not in p.stdout


def test_bad_layer_in_eval_linear(trained):
    """eval_linear.py turns dim.encoder_for_eval's UserError into its one-line error."""
    p = run("eval_linear.py", "--pretrained", trained / "ckpt.pt", "--layer", "backbone", "--workers", 0, check=False)
    assert_user_error(p, "--layer")
