"""DATM (difficulty-aligned trajectory matching) with MTT's loss and TESLA's gradient: ddfast.distill.datm and the
expert buffers of ddfast.distill.experts. Tiny configs on scikit-learn's 8x8 digits so the file stays fast."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from ddfast.data import load_dataset
from ddfast.distill import make_config, make_distiller
from ddfast.distill.base import SyntheticSet, TrainSet
from ddfast.distill.datm import DATM, DATMConfig, PRESET_DOCS, preset_config, soft_cross_entropy
from ddfast.distill.experts import ExpertRecipe, gsam_direction, train_experts
from ddfast.evaluate import evaluate_synthetic_set
from ddfast.models import NetConfig
from ddfast.evaluate import EvalConfig
from ddfast.io import load_safetensors
from ddfast.models import functional_forward


@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits")
    te = load_dataset("digits", "test")
    return TrainSet(tr.images, tr.labels, 10, tr.mean, tr.std, "digits"), te


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datm_cache"))


def small_config(**kw) -> DATMConfig:
    """A tiny DATM; ``kw`` as :meth:`ddfast.config.Config.replace` (``expert={"epochs": 8}`` merges)."""
    base = DATMConfig(ipc=1, iterations=6, syn_steps=4, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=2,
                      max_start_epoch=4, expansion_end_epoch=10, checkpoint_every=2, eval_epochs=60, eval_runs=2,
                      expert=ExpertRecipe(net=NetConfig(width=8, depth=2), num_experts=3, epochs=6, optimizer="sgd",
                                          lr=0.03))
    return base.replace(**kw)


# ---------------------------------------------------------------------------------------------------------------
# config and presets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("grad_mode", "bptt"), ("syn_steps", 0), ("pix_init", "zeros"),
                                         ("expert.lr", -1.0), ("preprocess", "pca"), ("max_start_epoch", 6),
                                         ("current_max_start_epoch", 0), ("expert.optimizer", "adam"),
                                         ("momentum_y", 1.0), ("dsa_strategy", "color_warp")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_presets():
    q = preset_config("quick", "fashion-mnist", 10)
    assert q.ipc == 10 and q.net.width <= 64 and q.expert.subset_per_class > 0 and q.iterations <= 1000
    f = preset_config("full", "cifar10", 10)
    assert (f.syn_steps, f.expert_epochs, f.batch_syn, f.lr_img, f.lr_lr, f.lr_y, f.threshold) == \
        (80, 2, 100, 100.0, 1e-5, 2.0, 1.0)
    assert (f.min_start_epoch, f.current_max_start_epoch, f.max_start_epoch, f.expansion_end_epoch) == (0, 10, 20, 1000)
    assert f.expert.optimizer == "gsam" and (f.expert.gsam_rho, f.expert.gsam_alpha) == (0.01, 0.3)
    assert f.expert.num_experts == 100
    f1 = preset_config("full", "cifar10", 1)
    assert f1.threshold == 1.1 and not f1.sequential_generation and f1.lr_lr == 1e-7
    assert preset_config("full", "cifar100", 50).pix_init == "real"
    fm = preset_config("full", "fashion-mnist", 50, iterations=7)
    assert fm.net.width == 128 and fm.iterations == 7 and fm.max_start_epoch + fm.expert_epochs <= fm.expert.epochs
    # nested options by dotted path or by dict, checked like any other
    assert preset_config("quick", "fashion-mnist", 10, **{"expert.epochs": 9}).expert.epochs == 9
    assert preset_config("quick", "fashion-mnist", 10, expert={"num_experts": 2}).expert.num_experts == 2
    with pytest.raises(ValueError, match="expert.epochs"):
        preset_config("quick", "fashion-mnist", 10, **{"expert.epochs": "abc"})
    assert make_config("datm", "full", "fashion-mnist", 1).ipc == 1
    with pytest.raises(ValueError, match="ipc=20"):
        preset_config("full", "cifar10", 20)
    with pytest.raises(ValueError, match="bogus"):
        preset_config("quick", "fashion-mnist", 10, bogus=1)
    assert set(PRESET_DOCS) == {"quick", "full"}


# ---------------------------------------------------------------------------------------------------------------
# expert buffers
# ---------------------------------------------------------------------------------------------------------------


def _expert_data(digits):
    train, _ = digits
    return (train.images - 0.3) / 0.35, train.labels


def test_vmapped_and_sequential_experts_agree(digits):
    x, y = _expert_data(digits)
    r = ExpertRecipe(net=NetConfig(width=8, depth=2), num_experts=3, epochs=2, lr=0.03, optimizer="gsam",
                     subset_per_class=40)
    a = train_experts(dataclasses.replace(r, vmap=True, parallel=3), x, y, 10)
    b = train_experts(dataclasses.replace(r, vmap=False, parallel=1), x, y, 10)
    assert a.meta["vmapped"] and not b.meta["vmapped"]
    ta, tb = torch.stack([a.trajectory(k) for k in range(3)]), torch.stack([b.trajectory(k) for k in range(3)])
    assert ta.shape == (3, 3, tb.shape[-1])
    torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)
    # the experts moved and differ from each other (independent seeds)
    assert (ta[:, -1] - ta[:, 0]).norm(dim=1).min() > 1e-2
    assert (ta[0, 0] - ta[1, 0]).norm() > 1e-2


def test_forward_corrected_experts(digits, tmp_path):
    """``transition``: the identity is the plain loss (float rounding), another T changes the trajectories
    and is part of the buffer's identity (a directory holding the plain buffer refuses it)."""
    from ddfast.noise import symmetric_transition

    x, y = _expert_data(digits)
    r = ExpertRecipe(net=NetConfig(width=8, depth=2), num_experts=1, epochs=2, lr=0.03, optimizer="sgd",
                     subset_per_class=40)
    plain = train_experts(r, x, y, 10, directory=str(tmp_path / "b"))
    ident = train_experts(r, x, y, 10, transition=torch.eye(10))
    noisy = train_experts(r, x, y, 10, transition=symmetric_transition(10, 0.4))
    torch.testing.assert_close(ident.trajectory(0), plain.trajectory(0), rtol=1e-4, atol=1e-5)
    moved = (plain.trajectory(0)[-1] - plain.trajectory(0)[0]).norm()
    assert (noisy.trajectory(0)[-1] - plain.trajectory(0)[-1]).norm() > 0.1 * moved
    with pytest.raises(ValueError, match="another expert buffer"):
        train_experts(r, x, y, 10, directory=str(tmp_path / "b"), transition=symmetric_transition(10, 0.4))
    with pytest.raises(ValueError, match="transition"):
        train_experts(r, x, y, 10, transition=torch.eye(9))


def test_gsam_direction_matches_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 7, dtype=torch.float64, generator=g)
    A = torch.randn(7, 7, dtype=torch.float64, generator=g)
    A = A @ A.T  # loss_k(w) = 0.5 w^T A w + sum(w^3)/3 per row
    grad = lambda W: W @ A + W.square()  # noqa: E731
    g0 = grad(w)
    rho, alpha = 0.05, 0.3
    d = gsam_direction(grad, w, g0, rho, alpha, adaptive=True)
    for k in range(2):  # direct per-row evaluation of the GSAM formulas
        e = rho * g0[k] * w[k] ** 2 / torch.linalg.norm(w[k].abs() * g0[k])
        g1 = grad((w[k] + e)[None])[0]
        par = (g0[k] @ g1) / (g1 @ g1) * g1
        torch.testing.assert_close(d[k], g1 - alpha * (g0[k] - par))
    d_plain = gsam_direction(grad, w, g0, rho, 0.0, adaptive=False)
    e = rho * g0 / g0.norm(dim=1, keepdim=True)
    torch.testing.assert_close(d_plain, grad(w + e))


def test_expert_buffer_resume_equals_uninterrupted(digits, tmp_path):
    x, y = _expert_data(digits)
    r = ExpertRecipe(net=NetConfig(width=8, depth=2), num_experts=3, epochs=3, lr=0.03, optimizer="gsam",
                     momentum=0.5, subset_per_class=30, parallel=2)
    full = train_experts(r, x, y, 10, directory=str(tmp_path / "a"), key={"k": 1})

    class Stop(Exception):
        pass

    def stop(ks, e):
        if 0 in ks and e == 2:
            raise Stop

    with pytest.raises(Stop):
        train_experts(r, x, y, 10, directory=str(tmp_path / "b"), key={"k": 1}, on_epoch=stop)
    assert os.path.exists(tmp_path / "b" / "expert_0000" / "epoch_0002.safetensors")
    assert not os.path.exists(tmp_path / "b" / "expert_0000" / "epoch_0003.safetensors")
    seen = []
    resumed = train_experts(dataclasses.replace(r, parallel=3), x, y, 10, directory=str(tmp_path / "b"),
                            key={"k": 1}, on_epoch=lambda ks, e: seen.append((tuple(ks), e)))
    # the interrupted pair continued with its next epoch; expert 2 (never started) trained from scratch
    assert [e for ks, e in seen if 0 in ks] == [3] and ((0, 1), 3) in seen
    assert [e for ks, e in seen if ks == (2,)] == [1, 2, 3]
    for k in range(3):
        assert torch.equal(full.trajectory(k), resumed.trajectory(k))
    # complete buffer: loaded, nothing trained; another data key is refused
    again = train_experts(r, x, y, 10, directory=str(tmp_path / "b"), key={"k": 1}, on_epoch=lambda *a: 1 / 0)
    assert torch.equal(again.trajectory(2), full.trajectory(2))
    with pytest.raises(ValueError, match="another expert buffer"):
        train_experts(r, x, y, 10, directory=str(tmp_path / "b"), key={"k": 2})


# ---------------------------------------------------------------------------------------------------------------
# TESLA vs unroll
# ---------------------------------------------------------------------------------------------------------------


def _double_distiller(digits, cache, **kw):
    train, _ = digits
    d = DATM(small_config(**kw), cache_dir=cache, quiet=True)
    d.prepare(train)
    d.initialize(train)
    d._template.double()
    d.image_syn = d.image_syn.detach().double().requires_grad_(True)
    d.label_syn = d.label_syn.detach().double().requires_grad_(True)
    d.syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    theta0 = d.experts.snapshot(1, 2).double()
    target = d.experts.snapshot(1, 4).double()
    return d, theta0, target


def _grads(d, mode, theta0, target, plan):
    for t in (d.image_syn, d.label_syn, d.syn_lr):
        t.grad = None
    loss = (d._unroll if mode == "unroll" else d._tesla)(theta0, target, plan)
    return loss, d.image_syn.grad.clone(), d.label_syn.grad.clone(), d.syn_lr.grad.clone()


def test_tesla_equals_unroll_for_one_step(digits, cache):
    d, theta0, target = _double_distiller(digits, cache, syn_steps=1, ipc=2, batch_syn=8)
    plan = d._plan()
    lu, *gu = _grads(d, "unroll", theta0, target, plan)
    lt, *gt = _grads(d, "tesla", theta0, target, plan)
    assert math.isclose(lu, lt, rel_tol=1e-12)
    for a, b in zip(gu, gt):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("dsa_mode", ["S", "M", "off"])
def test_graph_iteration_equals_the_eager_unroll(digits, cache, dsa_mode):
    """cuda_graph's static iteration (buffers filled from the plan, DSA's group as a one-hot weight), run here
    without capture, gives the eager unroll's loss and gradients (float64)."""
    from ddfast.augment import DSA
    from ddfast.distill.datm import _UnrollGraph

    d, theta0, target = _double_distiller(digits, cache, syn_steps=3, ipc=2, batch_syn=10)
    d._dsa = None if dsa_mode == "off" else DSA(d.config.dsa_strategy, mode=dsa_mode)
    plan = d._plan()
    lu, *gu = _grads(d, "unroll", theta0, target, plan)
    g = _UnrollGraph(d, 10, theta0.numel())
    g.theta0, g.target = g.theta0.double(), g.target.double()
    if g.u is not None:
        g.u = g.u.double()
    if g.w is not None:
        g.w = g.w.double()
    g.fill(theta0, target, plan)
    loss, *gg = g.run()
    assert math.isclose(lu, float(loss), rel_tol=1e-12)
    for a, b in zip(gu, gg):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-15)


def test_cuda_graph_needs_cuda_and_unroll(digits):
    with pytest.raises(ValueError, match="cuda_graph"):
        small_config(cuda_graph=True, grad_mode="tesla")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
            DATM(small_config(cuda_graph=True), device="cpu", quiet=True)
        small_config(cuda_graph=True).check_device("cuda:0")  # accepted where it can run


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_run_tracks_the_eager_run(digits, cache):
    """The same distillation with and without the CUDA graph: same losses and synthetic images to TF32 rounding."""
    train, _ = digits
    out = {}
    for graph in (False, True):
        d = DATM(small_config(cuda_graph=graph, ipc=2, batch_syn=10, iterations=4), device="cuda",
                 cache_dir=cache, quiet=True)
        d.prepare(train)
        d.initialize(train)
        losses = [d.step()["loss"] for _ in range(4)]
        out[graph] = (losses, d.image_syn.detach().cpu())
    for a, b in zip(out[False][0], out[True][0]):
        assert math.isclose(a, b, rel_tol=1e-2), (out[False][0], out[True][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-2, atol=1e-3)


def test_tesla_drops_exactly_the_cross_step_terms(digits, cache):
    """N = 2: unroll = TESLA + dropped terms, the dropped terms computed independently with a Hessian-vector
    product at theta_1 (module docstring of ddfast.distill.datm)."""
    d, theta0, target = _double_distiller(digits, cache, syn_steps=2, ipc=2, batch_syn=10)
    plan = d._plan()
    lu, gxu, gyu, glu = _grads(d, "unroll", theta0, target, plan)
    lt, gxt, gyt, glt = _grads(d, "tesla", theta0, target, plan)
    assert math.isclose(lu, lt, rel_tol=1e-10)
    a = d.syn_lr.detach()
    X, Y = d.image_syn, d.label_syn
    f = lambda th, x: functional_forward(d._template, th, x)  # noqa: E731
    (i0, s0), (i1, s1) = plan
    # forward with plain tensors
    th = theta0.clone().requires_grad_(True)
    x0, y0 = d._batch(X.detach(), Y.detach(), i0, s0)
    g0 = torch.autograd.grad(soft_cross_entropy(f(th, x0), y0), th)[0]
    th1 = (theta0 - a * g0).requires_grad_(True)
    x1, y1 = d._batch(X.detach(), Y.detach(), i1, s1)
    g1 = torch.autograd.grad(soft_cross_entropy(f(th1, x1), y1), th1, create_graph=True)[0]
    th2 = th1.detach() - a * g1.detach()
    den = (theta0 - target).square().sum()
    u = 2 * (th2 - target) / den
    v = -a * u
    w = torch.autograd.grad((g1 * v).sum(), th1)[0]  # H_1 v
    # dropped image/label term: -alpha * d/dX [w . g0(theta_0; X)]
    th0 = theta0.clone().requires_grad_(True)
    x0g, y0g = d._batch(X, Y, i0, s0)
    g0g = torch.autograd.grad(soft_cross_entropy(f(th0, x0g), y0g), th0, create_graph=True)[0]
    dx, dy = torch.autograd.grad(-a * (w * g0g).sum(), (X, Y))
    torch.testing.assert_close(gxu, gxt + dx, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(gyu, gyt + dy, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(glu, glt - (w * g0).sum(), rtol=1e-8, atol=1e-13)
    # the dropped terms are real (not zero) but small relative to the gradient
    assert 0 < dx.norm() < 0.5 * gxu.norm()


def test_tesla_and_unroll_runs_track_each_other(digits, cache):
    train, _ = digits
    hist = {}
    for mode in ("unroll", "tesla"):
        d = DATM(small_config(grad_mode=mode, iterations=3), cache_dir=cache, quiet=True)
        d.run(train)
        hist[mode] = [h["loss"] for h in d.history]
    # same draws -> the first iteration's loss is identical; later ones differ only by TESLA's dropped terms
    assert math.isclose(hist["unroll"][0], hist["tesla"][0], rel_tol=1e-5)
    assert all(abs(a - b) < 0.05 * a for a, b in zip(hist["unroll"], hist["tesla"]))


# ---------------------------------------------------------------------------------------------------------------
# the distillation loop
# ---------------------------------------------------------------------------------------------------------------


def test_distillation_reduces_loss_and_beats_its_initialisation(digits, cache):
    train, test = digits
    cfg = small_config(expert={"net": {"width": 16}, "num_experts": 4, "epochs": 8}, max_start_epoch=6, syn_steps=10,
                       expansion_end_epoch=20, iterations=30, eval_epochs=100, eval_runs=4)
    d = DATM(cfg, cache_dir=cache, quiet=True)
    d.prepare(train)
    d.initialize(train)
    segs = [(k, t) for k in range(4) for t in (0, 2, 4)]
    before = sum(d.matching_loss(k, t, seed=i) for i, (k, t) in enumerate(segs)) / len(segs)
    syn0 = d.synthetic_set()
    syn = d.run(train, initialize=False, iterations=30)
    after = sum(d.matching_loss(k, t, seed=i) for i, (k, t) in enumerate(segs)) / len(segs)
    assert after < 0.7 * before
    r0 = evaluate_synthetic_set(syn0, test)
    r1 = evaluate_synthetic_set(syn, test)
    diffs = torch.tensor(r1.accs) - torch.tensor(r0.accs)  # paired: same seeds, same protocol
    se = diffs.std() / math.sqrt(len(diffs)) + 1e-9
    assert diffs.mean() > 5.0 and diffs.mean() > 3 * se, (r0, r1)


def test_resume_equals_uninterrupted(digits, cache, tmp_path):
    train, _ = digits
    cfg = small_config(iterations=6, checkpoint_every=2)
    full = DATM(cfg, cache_dir=cache, quiet=True).run(train, checkpoint_dir=str(tmp_path / "a"))

    class Stop(Exception):
        pass

    def cb(dist, m):
        if m["iteration"] == 5:
            raise Stop

    with pytest.raises(Stop):
        DATM(cfg, cache_dir=cache, quiet=True).run(train, checkpoint_dir=str(tmp_path / "b"), callback=cb)
    d = DATM(cfg, cache_dir=cache, quiet=True)
    resumed = d.run(train, checkpoint_dir=str(tmp_path / "b"))
    assert d.history[0]["iteration"] == 1 and len(d.history) == 6
    assert torch.equal(full.images, resumed.images)
    assert torch.equal(full.labels, resumed.labels)
    assert full.lr == resumed.lr


def test_threshold_gate_skips_updates(digits, cache):
    train, _ = digits
    d = DATM(small_config(threshold=1e-9, iterations=3), cache_dir=cache, quiet=True)
    d.prepare(train)
    d.initialize(train)
    x0, y0, lr0 = d.image_syn.detach().clone(), d.label_syn.detach().clone(), float(d.syn_lr.detach())
    d.run(train, initialize=False, iterations=3)
    assert d.faults == 3 and all(h["fault"] == 1.0 for h in d.history)
    assert torch.equal(d.image_syn.detach(), x0) and torch.equal(d.label_syn.detach(), y0) and float(d.syn_lr.detach()) == lr0
    d2 = DATM(small_config(threshold=1e9, iterations=3), cache_dir=cache, quiet=True)
    d2.run(train)
    assert d2.faults == 0 and not torch.equal(d2.image_syn.detach(), x0)


def test_extra_loss_is_added_to_the_image_and_label_objective(digits, cache):
    train, _ = digits
    lam = 0.01
    out = {}
    for use in (False, True):
        d = DATM(small_config(threshold=1e9, iterations=1), cache_dir=cache, quiet=True)
        d.prepare(train)
        d.initialize(train)
        x0, y0 = d.image_syn.detach().clone(), d.label_syn.detach().clone()
        if use:
            d.extra_loss = lambda x, y: lam * (x.square().sum() + y.square().sum())
        m = d.step()
        out[use] = (d.image_syn.detach().clone(), d.label_syn.detach().clone(), float(d.syn_lr.detach()), m["extra_loss"])
    cfg = d.config
    # first SGD step with momentum: p <- p - lr * grad, so the difference is -lr * d(extra)/dp
    torch.testing.assert_close(out[True][0] - out[False][0], -cfg.lr_img * 2 * lam * x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[True][1] - out[False][1], -cfg.lr_y * 2 * lam * y0, rtol=1e-4, atol=1e-6)
    assert out[True][2] == out[False][2] and out[False][3] == 0.0 and out[True][3] > 0


def test_trust_fields_are_respected(digits, cache):
    train, _ = digits
    g = torch.Generator().manual_seed(3)
    n = train.labels.shape[0]
    trusted = torch.rand(n, generator=g) < 0.5
    repl = torch.full((n,), -1, dtype=torch.long)
    flip = torch.nonzero(trusted).flatten()[:40]
    repl[flip] = (train.labels[flip] + 1) % 10
    t2 = dataclasses.replace(train, trusted_mask=trusted, replacement_labels=repl)
    d = DATM(small_config(ipc=2), cache_dir=cache, quiet=True)
    d.prepare(t2)
    d.initialize(t2)
    idx = torch.tensor(d.init_info["indices"])
    eff = t2.effective_labels()
    assert trusted[idx].all()
    assert torch.equal(eff[idx], torch.arange(10).repeat_interleave(2))  # slot class = effective label
    # the experts are exactly those trained on the effective subset (trusted samples, replacement labels)
    ref = train_experts(d.config.expert, d._x_all[t2.effective_indices()], eff[t2.effective_indices()], 10)
    for k in range(d.experts.num_experts):
        assert torch.equal(d.experts.trajectory(k), ref.trajectory(k))
    # update_train keeps the experts unless asked to rebuild
    before = d.experts
    d.update_train(train)
    assert d.experts is before
    d.update_train(train, rebuild_experts=True)
    assert d.experts is not before and not torch.equal(d.experts.trajectory(0), before.trajectory(0))


def test_fallback_to_random_real_samples_warns(digits, cache):
    train, _ = digits
    # experts that barely move from their random initialisation classify most classes wrongly
    cfg = small_config(expert={"lr": 1e-7, "num_experts": 1}, ipc=3)
    d = DATM(cfg, cache_dir=cache, quiet=True)
    with pytest.warns(RuntimeWarning, match="random real samples"):
        d.run(train, iterations=1)
    idx = torch.tensor(d.init_info["indices"])
    assert d.init_info["fallback_classes"] and torch.equal(train.labels[idx], torch.arange(10).repeat_interleave(3))
    assert torch.isfinite(d.label_syn).all()


def test_synthetic_set_roundtrip_and_protocol(digits, cache, tmp_path):
    train, test = digits
    d = make_distiller("datm", small_config(iterations=2), cache_dir=cache, quiet=True)
    syn = d.run(train)
    assert syn.images.shape == (10, 1, 8, 8) and syn.labels.shape == (10, 10) and syn.labels.dtype == torch.float32
    assert syn.preprocess["kind"] == "zca" and syn.preprocess["images_transformed"]
    ec = syn.eval_config
    assert ec["loss"] == "soft_ce" and ec["momentum"] == 0.9 and ec["weight_decay"] == 5e-4 and ec["dsa"]
    assert ec["lr"] == syn.lr and ec["schedule"] == "step" and ec["batch_size"] == 128
    EvalConfig(**ec).validate()
    back = SyntheticSet.load(syn.save(str(tmp_path / "s")))
    assert torch.equal(back.images, syn.images) and back.lr == syn.lr and back.eval_config == json.loads(
        json.dumps(ec))
    # the synthetic images are the (learned) ZCA images; the stored transform maps real images into that space
    from ddfast.augment import transform_from_state_dict

    tr = transform_from_state_dict(back.preprocess["kind"], back.preprocess_state)
    torch.testing.assert_close(tr(train.images[:5]), d.transform(train.images[:5]))
    r = evaluate_synthetic_set(back, test, epochs=5, runs=1)
    assert 0 <= r.mean <= 100


def test_a_warning_is_printed_once():
    """DATM's warnings reach stderr once (warnings.warn), not a second time through logging's last resort."""
    import subprocess
    import sys

    code = ("from ddfast.distill.datm import DATM, preset_config\n"
            "DATM(preset_config('quick', 'digits', 1), device='cpu', quiet=True)._warn('probe-message')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("probe-message") == 1, p.stderr


def test_corrupt_expert_buffers_are_named_with_the_fix(digits, tmp_path):
    """A garbage manifest, a truncated or NaN trajectory: a ValueError naming the file and how to rebuild."""
    from safetensors.torch import save_file

    x, y = _expert_data(digits)
    r = ExpertRecipe(net=NetConfig(width=8, depth=2), num_experts=2, epochs=1, lr=0.03, optimizer="sgd",
                     subset_per_class=20)
    d = tmp_path / "buf"
    train_experts(r, x, y, 10, directory=str(d), key={"k": 1})
    final = sorted(p for p in d.rglob("*.safetensors") if "epoch_" not in p.name)[0]
    good = final.read_bytes()
    final.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=rf"{final.name}: not a readable expert trajectory.*delete"):
        train_experts(r, x, y, 10, directory=str(d), key={"k": 1})
    final.write_bytes(good)
    traj = load_safetensors(str(final))["trajectory"]
    traj[1, 0] = float("nan")
    save_file({"trajectory": traj.contiguous()}, str(final))
    with pytest.raises(ValueError, match=rf"{final.name}: the trajectory holds NaN"):
        train_experts(r, x, y, 10, directory=str(d), key={"k": 1})
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json is corrupt.*delete"):
        train_experts(r, x, y, 10, directory=str(d), key={"k": 1})


def test_a_corrupt_cached_input_transform_is_set_aside_and_rebuilt(digits, tmp_path):
    tr, _ = digits
    train = TrainSet(tr.images[:200], tr.labels[:200], 10, tr.mean, tr.std, name="digits")
    cfg = small_config(preprocess="zca")
    d = DATM(cfg, device="cpu", quiet=True, cache_dir=str(tmp_path))
    first = d._fit_transform(train)
    (path,) = list((tmp_path / "datm_transforms").glob("*.safetensors"))
    path.write_bytes(b"PK\x03\x04 a pickle, not safetensors")
    with pytest.warns(RuntimeWarning, match="is corrupt"):
        again = DATM(cfg, device="cpu", quiet=True, cache_dir=str(tmp_path))._fit_transform(train)
    assert list((tmp_path / "datm_transforms").glob("*.corrupt-*"))
    x = train.images[:5]
    torch.testing.assert_close(again(x), first(x))
