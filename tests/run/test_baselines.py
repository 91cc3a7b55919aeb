"""Tests of ddfast.baselines on digits with synthetic noise."""
import json

import pytest
import torch

from ddfast import baselines as B
from ddfast.data import load_dataset
from ddfast.evaluate import EvalConfig
from ddfast.noise import corrupt_labels

CFG = EvalConfig(model_kwargs={"width": 16, "depth": 2}, epochs=8, num_runs=1, batch_size=64, lr=0.01, dsa=False)


@pytest.fixture(scope="module")
def data():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    return tr, te, corrupt_labels(tr.labels, "sym:0.6", 10, seed=0)


def test_full_clean_beats_full_noisy_and_gce_is_recorded(data):
    tr, te, noisy = data
    clean = B.full_clean(tr, te, config=CFG)
    bad = B.full_noisy(tr, noisy, te, config=CFG)
    robust = B.gce(tr, noisy, te, config=CFG)
    assert clean.mean > 85.0 and clean.config["baseline"] == "full_clean"
    assert bad.config["noise"] == "sym:0.6" and abs(bad.config["noise_rate"] - noisy.rate) < 1e-12
    assert clean.mean > bad.mean
    assert robust.config["loss_resolved"] == "gce" and robust.config["gce_q"] == 0.7
    assert robust.mean > 10.0  # learns despite 60% noise (chance is 10%)
    for r in (clean, bad, robust):
        json.dumps(r.to_dict(), allow_nan=False)


def test_random_subset_selection_and_result(data):
    tr, te, noisy = data
    idx = B.select_random_subset(noisy.labels, 5, 10, seed=3)
    assert idx.numel() == 50 and idx.unique().numel() == 50
    assert torch.equal(torch.bincount(noisy.labels[idx], minlength=10), torch.full((10,), 5))
    assert torch.equal(idx, B.select_random_subset(noisy.labels, 5, 10, seed=3))
    assert not torch.equal(idx, B.select_random_subset(noisy.labels, 5, 10, seed=4))
    r = B.random_subset(tr, noisy, te, ipc=5, config=CFG.replace(num_runs=2, epochs=20))
    assert len(r.accs) == 2 and r.config["ipc"] == 5 and r.config["n_train"] == 50
    assert 0.0 < r.config["subset_clean_share"] < 1.0
    assert r.mean > 10.0
    with pytest.raises(ValueError, match="ipc"):
        B.select_random_subset(noisy.labels, 0, 10)
    with pytest.raises(ValueError, match="only"):
        B.select_random_subset(noisy.labels, 10_000, 10)
    with pytest.raises(ValueError, match="entries"):
        B.full_noisy(tr, noisy.labels[:10], te, config=CFG)


def test_full_data_protocol_reports_last_best_and_early_stopped_epochs(data):
    """One run records the per-epoch test and held-out curves; the headline is the last epoch, the best epoch
    (oracle) is the curve's maximum, early stopping picks the epoch of the best held-out noisy-label accuracy."""
    tr, te, noisy = data
    r = B.full_noisy(tr, noisy, te, config=CFG.replace(epochs=5), holdout=0.2)
    ev = r.config
    assert len(ev["curve"]) == 5 and len(ev["holdout_curve"]) == 5 and ev["epochs_trained"] == 5
    assert r.accs == [ev["curve"][-1]]
    assert ev["best_epoch"]["accs"] == [max(ev["curve"])]
    e = ev["early_stop"]["epochs"][0]
    assert ev["holdout_curve"][e - 1] == max(ev["holdout_curve"])
    assert ev["early_stop"]["accs"] == [ev["curve"][e - 1]]
    n_hold = int(round(0.2 * len(tr.labels)))
    assert ev["n_holdout"] == n_hold and ev["n_train"] == len(tr.labels) - n_hold
    # no held-out share: everything trains, no early stopping
    r0 = B.full_noisy(tr, noisy, te, config=CFG.replace(epochs=2), holdout=0.0)
    assert "early_stop" not in r0.config and r0.config["n_train"] == len(tr.labels)
    json.dumps(r.to_dict(), allow_nan=False)


def test_holdout_split_is_seeded_and_disjoint():
    a, b = B.holdout_split(1000, 0.1, seed=3)
    assert a.numel() == 900 and b.numel() == 100
    assert torch.equal(torch.sort(torch.cat([a, b])).values, torch.arange(1000))
    a2, b2 = B.holdout_split(1000, 0.1, seed=3)
    assert torch.equal(b, b2) and not torch.equal(b, B.holdout_split(1000, 0.1, seed=4)[1])
    with pytest.raises(ValueError, match="holdout"):
        B.holdout_split(10, 1.0)


def test_noise_rate_estimate_from_losses_alone():
    """Losses of a clean majority (low) and a flipped share (high), per class: the estimate is close to the share."""
    g = torch.Generator().manual_seed(0)
    n, rate = 4000, 0.3
    labels = torch.randint(0, 5, (n,), generator=g)
    flipped = torch.rand(n, generator=g) < rate
    losses = torch.where(flipped, 3.0 + 0.5 * torch.randn(n, generator=g), 0.3 + 0.1 * torch.randn(n, generator=g))
    est = B.estimate_noise_rate(losses.abs(), labels, 5)
    assert abs(est - float(flipped.double().mean())) < 0.02


def test_coteaching_estimates_its_forget_rate_and_learns_under_heavy_noise(data):
    tr, te, noisy = data
    co = B.coteaching(tr, noisy, te, config=CFG.replace(epochs=8), tk=3, holdout=0.1)
    tau = co.config["forget_rate"][0]
    assert co.config["forget_rate_source"] == "estimated" and abs(tau - noisy.rate) < 0.2
    assert len(co.config["curve"]) == 8 and co.config["baseline"] == "coteaching"
    assert co.mean > 40.0  # digits, 60 % symmetric noise (chance: 10 %)
    given = B.coteaching(tr, noisy, te, config=CFG.replace(epochs=2), forget_rate=0.5, tk=1)
    assert given.config["forget_rate"] == [0.5] and given.config["forget_rate_source"] == "given"


def test_multi_formation_baseline_equals_a_slow_reference(data):
    """Real images stored f^2 to an image and decoded: each training image is its real image resized (nearest) to a
    tile and back (bilinear), in the decoder's tile-major order within each class."""
    import torch.nn.functional as F

    tr, _, _ = data
    ipc, f, C = 2, 2, 3
    idx = torch.cat([torch.nonzero(tr.labels == c).flatten()[:ipc * f * f] for c in range(C)])
    x = tr.images[idx]
    got = B.multi_formation(x, ipc, f, C)
    H, W = x.shape[-2:]
    want = torch.stack([F.interpolate(F.interpolate(img[None], size=(H // f, W // f), mode="nearest"),
                                      size=(H, W), mode="bilinear", align_corners=False)[0] for img in x])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="hold"):
        B.multi_formation(x[:-1], ipc, f, C)
