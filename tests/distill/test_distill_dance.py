"""DANCE (ddfast.distill.dance + ddfast.distill.pool) on scikit-learn's digits with tiny configs.

Independent references: explicit crop/resize loops for the multi-formation decode, float64 arithmetic for
the middle encoder, per-class autograd for the batched variant, scikit-free accuracy comparisons through
``ddfast.evaluate`` for "beats its initialisation".
"""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ddfast.augment import Normalize, cutmix, transform_from_state_dict
from ddfast.data import load_dataset
from ddfast.distill import make_config, make_distiller
from ddfast.distill.base import SyntheticSet, TrainSet
from ddfast.distill import dance as dance_mod
from ddfast.distill import pool as pool_mod
from ddfast.distill.dance import DANCE, DANCEConfig, decode, mix_tiles, preset_config
from ddfast.distill.pool import PoolConfig, build_pool, pool_digest
from ddfast.models import NetConfig
from ddfast.evaluate import EvalConfig, evaluate_synset



# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    ts = TrainSet(tr.images, tr.labels, 10, tr.mean, tr.std, name="digits")
    return ts, te


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dance_cache"))


def tiny(**kw) -> DANCEConfig:
    """A tiny DANCE; ``kw`` as :meth:`ddfast.config.Config.replace` (``pool={"epochs": 2}`` merges)."""
    base = DANCEConfig(ipc=1, iterations=4, checkpoint_every=2, factor=1, num_premodel=2, batch_real=32, lr_img=0.05,
                       eval_width=16, eval_epochs=60, eval_runs=3,
                       pool=PoolConfig(net=NetConfig(width=16, depth=2), amount=2, epochs=6, lr=0.05))
    return base.replace(**kw)


def make(cfg, cache_dir=None) -> DANCE:
    return DANCE(cfg, cache_dir=cache_dir, quiet=True)


def ready(cfg, ts, cache_dir=None) -> DANCE:
    d = make(cfg, cache_dir)
    d.train = ts
    d.prepare(ts)
    d.initialize(ts)
    return d


# ----------------------------------------------------------------------------------------------------------
# multi-formation
# ----------------------------------------------------------------------------------------------------------
def _decode_loop(x, f):
    """Reference decode: explicit loops over tiles and images, float64."""
    n, c, H, W = x.shape
    s_h, s_w = math.ceil(H / f), math.ceil(W / f)
    padded = torch.full((n, c, s_h * f, s_w * f), 0.5, dtype=torch.float64)
    padded[:, :, :H, :W] = x.double()
    out = []
    for i in range(f):
        for j in range(f):
            for k in range(n):
                tile = padded[k:k + 1, :, i * s_h:(i + 1) * s_h, j * s_w:(j + 1) * s_w]
                out.append(F.interpolate(tile, size=(H, W), mode="bilinear", align_corners=False))
    return torch.cat(out)


@pytest.mark.parametrize("shape,f", [((3, 2, 8, 8), 2), ((2, 1, 7, 9), 2), ((2, 3, 9, 9), 3), ((1, 1, 28, 28), 2)])
def test_decode_matches_loop_reference(shape, f):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g)
    out = decode(x, f)
    assert out.shape == (shape[0] * f * f,) + shape[1:]
    torch.testing.assert_close(out.double(), _decode_loop(x, f), rtol=0, atol=1e-6)


def test_decode_constant_tiles_and_identity():
    # a stored image made of four constant tiles decodes into four constant images, tile-major order
    vals = [0.1, 0.2, 0.3, 0.4]
    x = torch.empty(2, 1, 8, 8)
    for n in range(2):
        for t, v in enumerate(vals):
            i, j = divmod(t, 2)
            x[n, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = v + n
    out = decode(x, 2)
    for t, v in enumerate(vals):
        for n in range(2):
            assert torch.allclose(out[t * 2 + n], torch.full((1, 8, 8), v + n)), (t, n)
    assert decode(x, 1) is x
    with pytest.raises(ValueError, match="factor"):
        decode(x, 0)


def test_mix_tiles_then_decode():
    g = torch.Generator().manual_seed(2)
    real = torch.rand(8, 1, 8, 8, generator=g)  # f=2, n=2: tiles t use real[2t:2t+2]
    stored = mix_tiles(real, 2, 2)
    assert stored.shape == (2, 1, 8, 8)
    dec = decode(stored, 2)
    for t in range(4):
        want = F.interpolate(F.interpolate(real[2 * t:2 * t + 2], size=(4, 4), mode="nearest"), size=(8, 8),
                             mode="bilinear", align_corners=False)
        torch.testing.assert_close(dec[2 * t:2 * t + 2], want, rtol=0, atol=1e-6)
    # uneven sizes: the first H % f tile rows are one pixel taller
    st = mix_tiles(torch.ones(9, 1, 7, 7) * torch.arange(9.).view(9, 1, 1, 1), 1, 3)
    assert st[0, 0, 0, 0] == 0 and st[0, 0, 2, 2] == 0 and st[0, 0, 3, 3] == 4 and st[0, 0, 6, 6] == 8
    with pytest.raises(ValueError):
        mix_tiles(real, 3, 2)


# ----------------------------------------------------------------------------------------------------------
# pool: interpolation, memory, caching, resume
# ----------------------------------------------------------------------------------------------------------
def test_middle_encoder_interpolation_is_exact(digits, cache):
    ts, _ = digits
    d = ready(tiny(), ts, cache)
    pool = d.pool
    for k in range(len(pool)):
        assert torch.equal(pool.middle(k, 0.0), pool.finals[k])
        assert torch.equal(pool.middle(k, 1.0), pool.inits[k])
        ref = 0.25 * pool.inits[k].double() + 0.75 * pool.finals[k].double()
        torch.testing.assert_close(pool.middle(k, 0.25).double(), ref, rtol=0, atol=1e-6)
    assert not torch.equal(pool.inits[0], pool.finals[0])
    # the module used in a step carries exactly theta_mid
    d._load_encoders(1, torch.tensor([0.3]))
    from ddfast.models import flat_params
    assert torch.equal(flat_params(d._mid), pool.middle(1, torch.tensor([0.3])))
    assert torch.equal(flat_params(d._expert), pool.finals[1])


def test_steps_never_read_the_pool_from_disk(digits, cache, monkeypatch):
    ts, _ = digits
    d = ready(tiny(), ts, cache)

    def boom(*a, **k):
        raise AssertionError("pool read from disk during a step")

    monkeypatch.setattr(pool_mod, "load_tensors", boom)
    monkeypatch.setattr(torch, "load", boom)
    for _ in range(2):
        d.step()


def _tiny_pool_inputs(ts, n=300):
    idx = torch.arange(n)
    return ts.images[idx], ts.labels[idx], Normalize(ts.mean, ts.std)


def test_pool_models_with_forward_correction(digits):
    """A transition makes the pool models minimise the forward-corrected loss (TAD's divert_pool="corrected"):
    the identity transition is the plain recipe up to float rounding, another one changes the model, and
    DANCE's cache key (the label digest) tells the two pools apart."""
    from ddfast.distill.base import labels_digest
    from ddfast.noise import symmetric_transition

    ts, _ = digits
    X, Y, norm = _tiny_pool_inputs(ts)
    cfg = PoolConfig(net=NetConfig(width=8, depth=2), amount=1, epochs=2, batch_size=64)
    plain = pool_mod.train_pool_model(X, Y, 10, norm, cfg, 0)
    ident = pool_mod.train_pool_model(X, Y, 10, norm, cfg, 0, transition=torch.eye(10))
    noisy = pool_mod.train_pool_model(X, Y, 10, norm, cfg, 0, transition=symmetric_transition(10, 0.4))
    torch.testing.assert_close(ident[1], plain[1], rtol=1e-4, atol=1e-5)
    assert (noisy[1] - plain[1]).norm() > 0.1 * (plain[1] - plain[0]).norm()
    seen = []
    build_pool(X, Y, 10, norm, cfg, trainer=lambda *a, **k: (seen.append(k.get("transition")),
                                                              pool_mod.train_pool_model(*a, **k))[1],
               transition=symmetric_transition(10, 0.4))
    assert len(seen) == 1 and torch.equal(seen[0], symmetric_transition(10, 0.4))
    with_t = dataclasses.replace(ts, transition=symmetric_transition(10, 0.4))
    assert labels_digest(with_t) != labels_digest(ts)
    with pytest.raises(ValueError, match="row-stochastic"):
        dataclasses.replace(ts, transition=2 * symmetric_transition(10, 0.4))
    with pytest.raises(ValueError, match="transition"):
        dataclasses.replace(ts, transition=torch.eye(3))


def test_pool_build_resumes_after_a_kill(digits, tmp_path):
    ts, _ = digits
    X, Y, norm = _tiny_pool_inputs(ts)
    cfg = PoolConfig(net=NetConfig(width=8, depth=2), amount=3, epochs=1, batch_size=64)
    key = {"dataset": "digits", "labels": "x"}
    calls = []

    def killing(*a, **k):
        if a[5] == 1:
            raise KeyboardInterrupt("killed")
        calls.append(a[5])
        return pool_mod.train_pool_model(*a, **k)

    def counting(*a, **k):
        calls.append(a[5])
        return pool_mod.train_pool_model(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        build_pool(X, Y, 10, norm, cfg, key=key, cache_dir=str(tmp_path / "a"), trainer=killing)
    assert calls == [0]
    calls.clear()
    resumed = build_pool(X, Y, 10, norm, cfg, key=key, cache_dir=str(tmp_path / "a"), trainer=counting)
    assert calls == [1, 2]  # continues with the next model
    calls.clear()
    again = build_pool(X, Y, 10, norm, cfg, key=key, cache_dir=str(tmp_path / "a"), trainer=counting)
    assert calls == []  # everything cached
    fresh = build_pool(X, Y, 10, norm, cfg, key=key, cache_dir=str(tmp_path / "b"))
    for p in (resumed, again):
        assert torch.equal(p.inits, fresh.inits) and torch.equal(p.finals, fresh.finals)
    # a larger pool reuses the first models; another label digest is another folder
    bigger = build_pool(X, Y, 10, norm, dataclasses.replace(cfg, amount=4), key=key,
                        cache_dir=str(tmp_path / "a"), trainer=counting)
    assert calls == [3] and torch.equal(bigger.finals[:3], fresh.finals)
    calls.clear()
    build_pool(X, Y, 10, norm, cfg, key=dict(key, labels="y"), cache_dir=str(tmp_path / "a"), trainer=counting)
    assert calls == [0, 1, 2]
    assert len(os.listdir(tmp_path / "a" / "dance_pool")) == 2


def test_pool_cache_key_depends_on_noise_and_trust(digits):
    ts, _ = digits
    d = make(tiny())
    k0 = d.cache_key(ts)
    noisy = dataclasses.replace(ts, labels=(ts.labels + (torch.arange(len(ts.labels)) % 7 == 0).long()) % 10)
    mask = torch.ones(len(ts.labels), dtype=torch.bool)
    mask[::5] = False
    trusted = dataclasses.replace(ts, trusted_mask=mask)
    digests = {pool_digest(k) for k in (k0, d.cache_key(noisy), d.cache_key(trusted))}
    assert len(digests) == 3
    assert pool_digest(d.cache_key(ts)) == pool_digest(k0)


# ----------------------------------------------------------------------------------------------------------
# the losses and the set
# ----------------------------------------------------------------------------------------------------------
def _probe(d: DANCE, ts: TrainSet):
    """PLTDA and calibration losses at fixed encoders, real batches and augmentation seeds."""
    cls = ts.class_indices()
    pl, ca = [], []
    ipc = d.config.ipc
    with torch.no_grad():
        syn_all = d.data.detach().clamp(0, 1)
    for k in range(len(d.pool)):
        expert = d.pool.module(d.pool.finals[k])
        for lam in (0.0, 0.5, 0.9):
            mid = d.middle_encoder(k, lam)
            for c in range(10):
                real = ts.images[cls[c][:64]]
                syn = decode(syn_all[c * ipc:(c + 1) * ipc], d.config.factor)
                with torch.no_grad():
                    pl.append(float(d.pltda_loss(mid, real, syn, 1000 + c)))
        for c in range(10):
            syn = decode(syn_all[c * ipc:(c + 1) * ipc], d.config.factor)
            with torch.no_grad():
                ca.append(float(d.calib_loss(expert, syn, c, 2000 + c)))
    return sum(pl) / len(pl), sum(ca) / len(ca)


def test_pltda_and_calibration_losses_go_down(digits, cache):
    ts, _ = digits
    d = ready(tiny(ipc=2), ts, cache)
    pl0, ca0 = _probe(d, ts)
    for _ in range(20):
        d.step()
    pl1, ca1 = _probe(d, ts)
    assert pl1 < 0.7 * pl0, (pl0, pl1)
    assert ca1 < 0.9 * ca0, (ca0, ca1)


def test_synthetic_set_beats_its_initialisation(digits, cache):
    ts, te = digits
    cfg = tiny(ipc=1, iterations=40, lr_img=0.05, eval_width=32, eval_epochs=100, eval_runs=8)
    d = ready(cfg, ts, cache)
    syn0 = d.synthetic_set()  # the random-real initialisation
    syn = d.run(ts, initialize=False)
    assert d.iteration == 40
    ec = EvalConfig(**syn.eval_config)  # DANCE's protocol (DSA + CutMix), ConvNet width 32, 100 epochs
    norm = Normalize(ts.mean, ts.std)
    r0 = evaluate_synset(syn0.images, syn0.labels, te, config=ec, transform=norm, images_transformed=True)
    r1 = evaluate_synset(syn.images, syn.labels, te, config=ec, transform=norm, images_transformed=True)
    # paired by evaluation seed (same network init and data order per run k); the mean gain must exceed
    # 3 standard errors of the paired differences and 3 points
    diff = torch.tensor(r1.accs, dtype=torch.float64) - torch.tensor(r0.accs, dtype=torch.float64)
    se = float(diff.std()) / math.sqrt(len(diff))
    assert float(diff.mean()) > max(3 * se, 3.0), (r0, r1)


def test_resume_equals_uninterrupted(digits, cache, tmp_path):
    ts, _ = digits
    cfg = tiny(ipc=2, iterations=4, checkpoint_every=2)
    full = make(cfg, cache).run(ts, checkpoint_dir=str(tmp_path / "a"))
    part = make(cfg, cache)
    part.run(ts, checkpoint_dir=str(tmp_path / "b"), until=2)
    assert part.iteration == 2
    resumed_d = make(cfg, cache)
    resumed = resumed_d.run(ts, checkpoint_dir=str(tmp_path / "b"))
    assert resumed_d.iteration == 4
    assert torch.equal(full.images, resumed.images)
    # a different pool refuses the checkpoint
    other = make(dataclasses.replace(cfg), None)
    other.config = cfg
    other.prepare(ts)
    other._pool_fp = "different"
    other.initialize(ts)
    from ddfast.io import load_torch
    with pytest.raises(ValueError, match="pool"):
        other.load_full_state(load_torch(str(tmp_path / "b" / "checkpoint.pt")))


def test_synthetic_set_output(digits, cache, tmp_path):
    ts, te = digits
    d = ready(tiny(ipc=2, factor=2), ts, cache)
    d.step()
    syn = d.synthetic_set()
    assert isinstance(syn, SyntheticSet) and syn.ipc == 2 and syn.metadata["decoded_per_class"] == 8
    assert syn.images.shape == (10 * 8, 1, 8, 8) and syn.labels.dtype == torch.int64
    assert torch.equal(syn.labels, torch.arange(10).repeat_interleave(8))
    t = transform_from_state_dict(syn.preprocess["transform"], syn.preprocess_state)
    torch.testing.assert_close(t.inverse(syn.images), d.decoded_images(), rtol=0, atol=1e-5)
    assert 0.0 <= float(d.decoded_images().min()) and float(d.decoded_images().max()) <= 1.0
    ec = EvalConfig(**syn.eval_config).validate()
    assert ec.cutmix_p == 0.5 and ec.dsa_mode == "idc" and ec.schedule == "multistep" and ec.batch_size == 64
    assert "flip" not in ec.dsa_strategy  # digits: MNIST-like, no flips (the reference)
    back = SyntheticSet.load(syn.save(str(tmp_path / "syn")))
    assert torch.equal(back.images, syn.images) and back.eval_config == syn.eval_config


def test_trust_fields_respected(digits, monkeypatch):
    ts, _ = digits
    n = len(ts.labels)
    mask = torch.ones(n, dtype=torch.bool)
    mask[::3] = False
    repl = torch.full((n,), -1, dtype=torch.long)
    repl[1::7] = (ts.labels[1::7] + 1) % 10  # "pseudo-labels" on some trusted samples
    images = ts.images.clone()
    images[~mask] = float("nan")  # any use of an untrusted image poisons the losses
    noisy = dataclasses.replace(ts, images=images, trusted_mask=mask, replacement_labels=repl)
    seen = {}
    real_build = dance_mod.build_pool

    def spy(X, Y, *a, **k):
        seen["X"], seen["Y"] = X, Y
        return real_build(X, Y, *a, **k)

    monkeypatch.setattr(dance_mod, "build_pool", spy)
    cfg = tiny(ipc=2, factor=2, iterations=2)
    d = make(cfg)
    syn = d.run(noisy)
    eff_x, eff_y, _ = noisy.effective()
    assert torch.equal(seen["Y"], eff_y) and torch.equal(seen["X"], eff_x)
    assert torch.isfinite(syn.images).all() and torch.isfinite(d.pool.finals).all()
    for c, idx in enumerate(noisy.class_indices()):
        assert torch.equal(d._real[d._class_pos[c]], noisy.images[idx])
    # a new trusted view: statistics follow it, the pool only on request
    fp = d._pool_fp
    mask2 = mask.clone()
    mask2[1::3] = False
    view2 = dataclasses.replace(noisy, trusted_mask=mask2)
    d.update_train(view2)
    assert d._pool_fp == fp
    assert sum(int(p.numel()) for p in d._class_pos) == int(mask2.sum())
    d.update_train(view2, rebuild_pool=True)
    assert d._pool_fp != fp and torch.equal(seen["Y"], view2.effective()[1])
    d.step()


def test_soft_labels_draw_real_batches_by_posterior(digits, cache):
    """TrainSet.soft_labels (TAD's posterior distribution): class c's real batches come from the images with
    soft_labels[:, c] > 0, each drawn about in proportion to its weight (two weight levels, many draws)."""
    ts, _ = digits
    n = len(ts.labels)
    d = ready(tiny(ipc=2, factor=2), ts, cache)
    g = torch.Generator().manual_seed(0)
    support = torch.rand(n, generator=g) < 0.3  # class 0's weight sits on these images only ...
    heavy = support & (torch.arange(n) % 2 == 0)  # ... four times as much on every other one of them
    q = torch.full((n, 10), 0.0)
    q[:, 0] = torch.where(heavy, 0.8, torch.where(support, 0.2, 0.0))
    q[:, 1:] = ((1 - q[:, 0]) / 9).unsqueeze(1)
    d.update_train(dataclasses.replace(ts, soft_labels=q))
    cfg_b = d.config.batch_real
    ref = ts.images.reshape(n, -1)
    counts = torch.zeros(n)
    for _ in range(30):
        x = d._sample_real(0).reshape(-1, ref.shape[1])
        assert x.shape[0] == cfg_b
        hit = torch.cdist(x, ref).argmin(1)
        assert bool(support[hit].all()) and hit.unique().numel() == cfg_b  # distinct images from the support
        counts[hit] += 1
    per_heavy = float(counts[heavy].sum()) / int(heavy.sum())
    per_light = float(counts[support & ~heavy].sum()) / int((support & ~heavy).sum())
    assert 2.5 < per_heavy / per_light < 6.0  # 4x the weight (without replacement pulls it a little to 1)
    d.step()
    d.update_train(ts)  # back to the hard labels
    assert d._soft is None


def test_batched_variant_gradient_is_sum_of_class_gradients(digits, cache):
    ts, _ = digits
    d = ready(tiny(ipc=2, factor=2, batched_classes=True), ts, cache)
    d._load_encoders(0, torch.tensor([0.4]))
    grads = []

    def record(loss):
        d.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(d.data.grad.clone())

    d._update = record
    state = d.generator.get_state()
    d._step_batched()
    d.generator.set_state(state)
    reals = [d._sample_real(c) for c in range(10)]
    for c in range(10):  # advance the generator by the same draws as the batched step
        d._syn_class(c)
    seeds = [d._seed() for _ in range(10)]
    want = torch.zeros_like(d.data)
    for c in range(10):
        d.data.grad = None
        ipc = d.config.ipc
        syn = decode(d.data[c * ipc:(c + 1) * ipc], 2)
        d.pltda_loss(d._mid, reals[c], syn, seeds[c]).backward()
        want += d.data.grad
    torch.testing.assert_close(grads[0], want, rtol=1e-4, atol=1e-7)
    assert len(grads) == 2  # one PLTDA step and one calibration step per iteration


def test_extra_loss_hook(digits, cache):
    ts, _ = digits
    d = ready(tiny(ipc=2, factor=2, iter_calib=1), ts, cache)
    calls = []

    def extra(images, labels):
        calls.append((images.shape, labels.clone()))
        return 0.1 * images.pow(2).mean()

    d.extra_loss = extra
    m = d.step()
    assert "extra" in m and m["extra"] > 0 and len(calls) == 10
    for c, (shape, lab) in enumerate(calls):
        assert shape == (8, 1, 8, 8) and torch.equal(lab, torch.full((8,), c))
    d2 = ready(tiny(ipc=2, factor=2, iter_calib=0), ts, cache)
    d2.extra_loss = extra
    calls.clear()
    d2.step()
    assert len(calls) == 10  # its own per-class steps when calibration is off


# ----------------------------------------------------------------------------------------------------------
# config, presets, CutMix and the evaluation protocol
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("factor", 0), ("ipc", 0), ("init", "bogus"), ("mom_img", 1.5),
                                         ("lr_img", -1.0), ("aug_type", "color_bogus"), ("pool.epochs", 0),
                                         ("pool.cutmix_p", 2.0), ("batch_real", 0), ("decode_type", "multi")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_presets():
    full = preset_config("full", "cifar10", 10)
    assert (full.iterations, full.lr_img_resolved, full.mom_img, full.factor) == (10000, 0.1, 0.5, 2)
    assert (full.pool.amount, full.pool.epochs, full.num_premodel, full.iter_calib) == (20, 60, 5, 1)
    assert (full.batch_real, full.batch_syn_max, full.pool.net.width, full.eval_epochs) == (128, 200, 128, 1500)
    for ipc in (1, 10, 50):
        fm = make_config("dance", "full", "fashion-mnist", ipc)
        assert fm.lr_img_resolved == pytest.approx(0.01 * ipc) and fm.init_resolved == "mix"
    q = preset_config("quick", "fashion-mnist", 10, iterations=7)
    assert q.iterations == 7 and q.pool.net.width <= 64 and q.pool.subset > 0
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge", "cifar10", 10)
    with pytest.raises(ValueError, match="unknown"):
        preset_config("quick", "cifar10", 10, bogus=1)
    assert set(dance_mod.PRESET_DOCS) == {"quick", "full"}
    assert isinstance(make_distiller("dance", q, quiet=True), DANCE)


def test_cutmix_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, 8, 8)
    y = torch.arange(6)
    seen_mix = False
    for _ in range(20):
        out, yb, ratio = cutmix(x, y, g, beta=1.0, p=1.0)
        perm = yb  # labels are 0..5, so yb is the permutation itself
        kept = (out == x).all(1)  # [N, H, W]
        replaced = (out == x[perm]).all(1)
        assert (kept | replaced).all()
        moved = ~(out == x).all(1)[0]
        if ratio < 1.0:
            seen_mix = True
            assert abs(1 - ratio - float(moved.float().mean())) <= 1.0 / 64 + 1e-9 or perm[0] == 0
    assert seen_mix
    out, yb, ratio = cutmix(x, y, g, p=0.0)
    assert out is x and ratio == 1.0
    s = g.get_state()
    a = cutmix(x, y, g, p=1.0)
    g.set_state(s)
    b = cutmix(x, y, g, p=1.0)
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    with pytest.raises(ValueError):
        cutmix(x, y, g, beta=0.0)


def test_eval_protocol_runs_with_cutmix_and_idc_aug(digits):
    ts, te = digits
    idx = torch.cat([torch.nonzero(ts.labels == c).flatten()[:3] for c in range(10)])
    ec = EvalConfig(**dance_mod.dance_eval_config(tiny(), "digits")).replace(epochs=3, num_runs=2,
                                                                            model_kwargs={"width": 8})
    r = evaluate_synset(ts.images[idx], ts.labels[idx], te, config=ec, transform=Normalize(ts.mean, ts.std))
    assert len(r.accs) == 2 and all(0 <= a <= 100 for a in r.accs)
    r2 = evaluate_synset(ts.images[idx], ts.labels[idx], te, config=ec.replace(vmap=False),
                         transform=Normalize(ts.mean, ts.std))
    assert len(r2.accs) == 2
    with pytest.raises(ValueError, match="dsa_mode"):
        EvalConfig(dsa_mode="X").validate()
    with pytest.raises(ValueError, match="cutmix_p"):
        EvalConfig(cutmix_p=1.5).validate()
