"""Tests of ddfast.tad (trust-aware diversion, arXiv 2502.05027; ddfast's design in ddfast.tad's docstring).

Partition quality is checked on scikit-learn's digits and on Fashion-MNIST slices with ddfast.noise's symmetric
and asymmetric noise; the building blocks against independent references (scikit-learn's Ledoit-Wolf,
float64 loops, numpy quantiles, torch's cross-entropy); the diversion, the consistency hook, the schedules and
exact resume with a tiny distiller defined here; and TAD end to end with DATM, DANCE and RCIG at tiny sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddfast.tad as tad
from ddfast.augment import Normalize
from ddfast.data import load_dataset
from ddfast.distill.base import DistillConfig, Distiller, SyntheticSet, TrainSet
from ddfast.noise import corrupt_labels
from ddfast.tad import TADConfig, diverted_view, run_tad, tad_partition

torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------------------------------------------------
# data and cached TAD partitions
# ----------------------------------------------------------------------------------------------------------
def _fashion_available() -> bool:
    try:
        load_dataset("fashion-mnist", "test")
        return True
    except Exception:
        return False


HAS_FMNIST = _fashion_available()

# small, fast scoring networks for the test sizes (the defaults are sized for 60k Fashion-MNIST)
DIGITS_TAD = {"scorer.net.width": 16, "scorer.net.depth": 2, "scorer.warmup_epochs": 8.0, "scorer.refine_epochs": 2.0,
              "rounds": 3, "cleanlab": True}
FMNIST_TAD = {"scorer.net.width": 16, "scorer.net.depth": 3, "scorer.warmup_epochs": 3.0, "scorer.refine_epochs": 1.0,
              "rounds": 3, "cleanlab": True}


def tadcfg(options) -> TADConfig:
    """A TADConfig from a dict of (dotted) options (:meth:`ddfast.config.Config.replace`)."""
    return TADConfig().replace(**options)


@functools.lru_cache(maxsize=None)
def noisy_data(name: str, spec: str, n: int = 0, seed: int = 0):
    """(TrainSet, NoisyLabels) of ``name`` (digits: all 1,437 training images; fashion-mnist: a seeded slice of n)."""
    ds = load_dataset(name)
    if n and n < len(ds):
        ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n])
    nl = corrupt_labels(ds.labels, spec, 10, seed=seed, mapping=ds.name)
    return TrainSet(ds.images, nl.labels, 10, ds.mean, ds.std, ds.name), nl


@functools.lru_cache(maxsize=None)
def partition_run(name: str, spec: str, overrides: tuple = ()):
    ts, nl = noisy_data(name, spec, 3000 if name == "fashion-mnist" else 0)
    base = dict(DIGITS_TAD if name == "digits" else FMNIST_TAD)
    base.update(dict(overrides))
    return tad_partition(ts, tadcfg(base), clean_labels=nl)


CASES = [("digits", "sym:0.4"), ("digits", "asym:0.4"),
         pytest.param("fashion-mnist", "sym:0.4", marks=pytest.mark.skipif(not HAS_FMNIST, reason="no Fashion-MNIST")),
         pytest.param("fashion-mnist", "asym:0.4", marks=pytest.mark.skipif(not HAS_FMNIST, reason="no Fashion-MNIST"))]


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("rounds", 0), ("schedule", "dual"), ("scorer.net.width", 0), ("scorer.net.norm", "group"),
    ("scorer.warmup_epochs", 0), ("scorer.lr", -0.1), ("scorer.momentum", 1.0), ("scorer.refine", "both"),
    ("loss_ema", 1.0), ("loss_ema", -0.1),
    ("loss_norm", "zscore"), ("gmm_iters", 0), ("gmm_reg_covar", 0.0), ("tau", 1.0), ("tau", 0.0),
    ("trust_update", "shrink"), ("covariance", "oas"), ("shrinkage", 1.5), ("maha_quantile", 0.0),
    ("kappa", 1.5), ("recall", 1), ("consistency_lambda", -1.0), ("consistency_dsa", "color_warp"),
    ("consistency_target", "logits"), ("cleanlab_folds", 1), ("seed", 1.5), ("min_trusted_per_class", -1),
    ("divert_pool", "yes"), ("divert_pool", 1), ("divert_real", "corrected"), ("divert_real", 1), ("scorer.warmup_epochs", float("nan")), ("recall_ratio", 0.0), ("recall_ratio", 1.1),
    ("trust_statistic", "entropy"), ("scorer.high_noise_epochs", -1.0), ("divert_real", "soft"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TADConfig().replace(**{field: value})


def test_high_noise_epochs_extend_the_warmup_only_when_most_labels_look_wrong():
    """scorer.high_noise_epochs: f trains on only when the noise rate estimated after the warm-up exceeds
    divert_noise_rate; the estimate is the one round 0 reports without the extension, and below the threshold
    the run is the run without it, tensor for tensor."""
    short = (("scorer.warmup_epochs", 2.0), ("rounds", 1), ("cleanlab", False))
    on = lambda spec: partition_run("digits", spec, short + (("scorer.high_noise_epochs", 6.0),))  # noqa: E731
    off = lambda spec: partition_run("digits", spec, short + (("scorer.high_noise_epochs", 0.0),))  # noqa: E731
    hi_on, hi_off = on("sym:0.8").rounds[0], off("sym:0.8").rounds[0]
    assert hi_off["scorer_epochs"] == 2.0 and "warmup_noise_rate_estimate" not in hi_off
    assert hi_on["warmup_noise_rate_estimate"] == hi_off["noise_rate_estimate"] > 0.5
    assert hi_on["scorer_epochs"] == 6.0 and hi_on["scorer_accuracy"] > hi_off["scorer_accuracy"]
    lo_on, lo_off = on("sym:0.2"), off("sym:0.2")
    assert lo_on.rounds[0]["warmup_noise_rate_estimate"] == lo_off.rounds[0]["noise_rate_estimate"] < 0.5
    assert lo_on.rounds[0]["scorer_epochs"] == 2.0
    for name in ("trusted", "replacement", "weights", "ema", "posterior", "posterior_probs"):
        assert torch.equal(getattr(lo_on.state, name), getattr(lo_off.state, name)), name


def test_config_round_trip_and_unknown_option():
    cfg = TADConfig(rounds=2, kappa=-1.0)
    assert TADConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(tau=0.6).tau == 0.6
    with pytest.raises(ValueError, match="bogus"):
        TADConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        cfg.replace(bogus=1)


# ----------------------------------------------------------------------------------------------------------
# partition quality (the issue's acceptance properties)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spec", CASES)
def test_trusted_precision_far_above_clean_rate(name, spec):
    res = partition_run(name, spec)
    _, nl = noisy_data(name, spec, 3000 if name == "fashion-mnist" else 0)
    clean_rate = float(nl.clean_mask.double().mean())
    # symmetric noise: the trusted set keeps at most half the noise of the data and most clean samples.
    # Pair flips (asym) between confusable classes separate less: on the 3,000-image Fashion-MNIST slice the
    # scorer reaches 63% accuracy and the loss GMM alone keeps 93% of the noise (measured); with the agreement
    # filter (TADConfig.trust_agreement) the GMM partition keeps 58% of it in round 0 and 74-76% in rounds 1-2,
    # the trusted set after recall 78-82% (measured, fused and plain modules). The bounds leave a margin: float
    # rounding of the scorer moves these shares by about 0.01.
    sym = spec.startswith("sym")
    for d in res.rounds:
        assert 1.0 - d["precision"] <= (0.5 if sym else 0.9) * (1.0 - clean_rate), (d["round"], d["precision"])
        assert 1.0 - d["gmm_precision"] <= (0.5 if sym else 0.85) * (1.0 - clean_rate), (d["round"], d["gmm_precision"])
        assert d["recall"] >= (0.75 if sym else 0.6), (d["round"], d["recall"])
    # checked against the ground truth directly, not only through the diagnostics
    st = res.state
    eff = st.effective_labels(noisy_data(name, spec, 3000 if name == "fashion-mnist" else 0)[0].labels)
    prec = float((eff[st.trusted] == nl.clean_labels[st.trusted]).double().mean())
    assert prec == pytest.approx(res.rounds[-1]["precision"])


# Not fashion-mnist asym:0.4: on the 3,000-image slice the scorer mistakes one class of a pair for the other
# (T-shirt/Shirt, Pullover/Coat), so the few samples it recalls get its wrong pseudo-labels (measured: 117 recalled,
# 5% correct). At full size (60k) round 0 recalls 61 samples (3% correct) and round 1 1,033 (95% correct).
@pytest.mark.parametrize("name,spec", CASES[:3])
def test_pseudo_labels_beat_the_labels_they_replace(name, spec):
    res = partition_run(name, spec)
    r0 = res.rounds[0]
    assert r0["n_recalled"] > 0
    assert r0["pseudo_label_accuracy"] >= r0["replaced_label_accuracy"] + 0.3
    if spec.startswith("sym"):  # over *all* untrusted candidates (not only the recalled ones)
        assert r0["candidate_pseudo_accuracy"] > r0["candidate_label_accuracy"] + 0.2
    # final labels are more accurate than the given ones overall
    assert res.rounds[-1]["label_accuracy_after"] > res.rounds[0]["label_accuracy"]


@pytest.mark.parametrize("name,spec", CASES)
def test_rounds_grow_the_trusted_set(name, spec):
    res = partition_run(name, spec)
    sizes = [d["n_trusted"] for d in res.rounds]
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] > sizes[0], sizes
    assert all(d["n_trusted"] > d["n_trusted_gmm"] or d["round"] > 0 for d in res.rounds)


def test_cleanlab_is_reported_side_by_side():
    res = partition_run("digits", "sym:0.4")
    for d in res.rounds:
        assert 0 < d["cleanlab_n_clean"] <= d["n"]
        assert 0.0 <= d["cleanlab_precision"] <= 1.0 and 0.0 <= d["cleanlab_recall"] <= 1.0


@pytest.mark.parametrize("name,spec", CASES[:2])
def test_per_class_diagnostics_match_a_slow_loop(name, spec):
    res = partition_run(name, spec)
    ts, nl = noisy_data(name, spec, 0)
    last = res.rounds[-1]
    eff = res.state.effective_labels(ts.labels).tolist()
    trusted = res.state.trusted.tolist()
    clean = nl.clean_labels.tolist()
    C = ts.num_classes
    for c in range(C):
        n_t = sum(1 for i in range(len(eff)) if trusted[i] and eff[i] == c)
        hits = sum(1 for i in range(len(eff)) if trusted[i] and eff[i] == c and clean[i] == c)
        n_c = sum(1 for y in clean if y == c)
        assert last["trusted_per_class"][c] == n_t
        assert last["coverage_per_class"][c] == pytest.approx(hits / n_c)
        assert last["precision_per_class"][c] == pytest.approx(hits / n_t)
    assert sum(last["trusted_per_class"]) == last["n_trusted"]


def test_cleanlab_detector_matches_find_label_issues():
    from cleanlab.filter import find_label_issues

    g = torch.Generator().manual_seed(3)
    y = torch.arange(5).repeat(40)
    logits = torch.randn(200, 5, generator=g) + 3.0 * F.one_hot(y, 5)
    y_noisy = y.clone()
    y_noisy[:30] = (y[:30] + 1) % 5
    probs = torch.softmax(logits.double(), 1)
    ours = tad.cleanlab_detector(y_noisy, probs)
    ref = ~find_label_issues(y_noisy.numpy(), probs.numpy(), n_jobs=1)
    assert torch.equal(ours, torch.from_numpy(ref))


def test_kfold_out_of_sample_cleanlab():
    res = partition_run("digits", "sym:0.4", (("rounds", 1), ("cleanlab_folds", 3)))
    d = res.rounds[0]
    assert d["cleanlab_oos_folds"] == 3 and d["cleanlab_oos_n_clean"] > 0
    assert d["cleanlab_oos_precision"] > 0.8  # clean rate 0.6


# ----------------------------------------------------------------------------------------------------------
# building blocks against references
# ----------------------------------------------------------------------------------------------------------
def _blobs(n_per=60, C=3, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(C, D, generator=g)
    A = torch.randn(D, D, generator=g) / math.sqrt(D)
    y = torch.arange(C).repeat_interleave(n_per)
    x = centres[y] + torch.randn(C * n_per, D, generator=g) @ A
    return x.float(), y


def test_pooled_precision_matches_sklearn_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    x, y = _blobs()
    anchors = torch.stack([x[y == c].mean(0) for c in range(3)])
    prec, a = tad.pooled_precision(x, y, anchors, method="ledoit_wolf")
    xc = (x - anchors[y]).double().numpy()
    lw = LedoitWolf(assume_centered=True).fit(xc)
    assert a == pytest.approx(lw.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(prec.double().numpy(), lw.precision_, rtol=1e-4, atol=1e-5)


def test_pooled_precision_fixed_and_identity():
    x, y = _blobs()
    anchors = torch.stack([x[y == c].mean(0) for c in range(3)])
    prec, a = tad.pooled_precision(x, y, anchors, method="fixed", shrinkage=0.3)
    xc = (x - anchors[y]).double().numpy()
    S = xc.T @ xc / xc.shape[0]
    ref = np.linalg.inv(0.7 * S + 0.3 * np.trace(S) / S.shape[0] * np.eye(S.shape[0]))
    assert a == 0.3
    np.testing.assert_allclose(prec.double().numpy(), ref, rtol=1e-4, atol=1e-6)
    assert tad.pooled_precision(x, y, anchors, method="identity")[0] is None
    with pytest.raises(ValueError, match="covariance"):
        tad.pooled_precision(x, y, anchors, method="oas")


def test_recall_matches_a_float64_loop():
    x, y = _blobs(seed=1)
    N, C = x.shape[0], 3
    g = torch.Generator().manual_seed(5)
    trusted = torch.rand(N, generator=g) < 0.7
    labels = y.clone()
    flip = ~trusted & (torch.rand(N, generator=g) < 0.5)
    labels[flip] = (labels[flip] + 1) % C
    pred = y.clone()
    pred[:7] = (pred[:7] + 2) % C  # a few disagreements
    out = tad.recall(x, pred, labels, trusted, C, covariance="fixed", shrinkage=0.2, maha_quantile=0.8, kappa=0.1,
                     distance_ratio=0.9)
    # reference: anchors, covariance, distances, quantiles and the rule, in float64 with numpy
    X, L, T = x.double().numpy(), labels.numpy(), trusted.numpy()
    mu = np.stack([X[T & (L == c)].mean(0) for c in range(C)])
    R = X[T] - mu[L[T]]
    S = R.T @ R / R.shape[0]
    P = np.linalg.inv(0.8 * S + 0.2 * np.trace(S) / S.shape[0] * np.eye(S.shape[0]))
    d = np.array([[(X[i] - mu[c]) @ P @ (X[i] - mu[c]) for c in range(C)] for i in range(N)])
    cos = np.array([[X[i] @ mu[c] / (np.linalg.norm(X[i]) * np.linalg.norm(mu[c])) for c in range(C)]
                    for i in range(N)])
    cstar = d.argmin(1)
    thr = np.array([np.quantile(d[T & (L == c), c], 0.8) for c in range(C)])
    second = np.sort(d, 1)[:, 1]
    ok = (~T) & (d[np.arange(N), cstar] <= thr[cstar]) & (cos[np.arange(N), cstar] >= 0.1) & (cstar == pred.numpy())
    ok &= d[np.arange(N), cstar] <= 0.9 * second
    assert np.array_equal(out["pseudo"].numpy(), cstar)
    np.testing.assert_allclose(out["thresholds"].double().numpy(), thr, rtol=1e-4)
    np.testing.assert_allclose(out["mahalanobis_sq"].double().numpy(), d[np.arange(N), cstar], rtol=1e-4, atol=1e-4)
    assert np.array_equal(out["reliable"].numpy(), ok)
    assert ok.sum() > 0


def test_recall_switches_really_switch():
    """Each reliability criterion, switched off, lets a superset through; alone, each one refuses samples."""
    res = partition_run("digits", "sym:0.4", (("rounds", 1),))
    ts, nl = noisy_data("digits", "sym:0.4")
    scorer = tad.TrustScorer(tadcfg(DIGITS_TAD), 1, 10, (8, 8), ts.mean, ts.std)
    # f after round 0 is in the state's checkpoint-free run: rebuild it deterministically
    scorer.train(ts.images, ts.labels, DIGITS_TAD["scorer.warmup_epochs"], tad.tad_seed(0, 1, 0))
    logits, feats = scorer.score(ts.images)
    pred = logits.argmax(1)
    from ddfast.ops import sample_stats

    stats = sample_stats(logits, ts.labels)
    trusted, w, *_ = tad.partition(stats.loss, ts.labels, 10, gmm_iters=20, min_per_class=1,
                                   eligible=pred == ts.labels)
    base = dict(covariance="ledoit_wolf", maha_quantile=0.9, kappa=0.5, require_agreement=True, distance_ratio=0.7)
    ref = tad.recall(feats, pred, ts.labels, trusted, 10, **base)["reliable"]
    # the run used exactly this rule on this f (samples kept out only by the agreement filter are not candidates)
    assert int((ref & ~(w > 0.5)).sum()) == res.rounds[0]["n_recalled"]
    all_off = dict(maha_quantile=1.0, kappa=-1.0, require_agreement=False, distance_ratio=1.0)
    everything = tad.recall(feats, pred, ts.labels, trusted, 10, **{**base, **all_off})["reliable"]
    assert bool(everything.eq(~trusted).all())  # with every criterion off, every untrusted sample is recalled
    for name in all_off:
        more = tad.recall(feats, pred, ts.labels, trusted, 10, **{**base, name: all_off[name]})["reliable"]
        assert bool((more | ref).eq(more).all()), name  # switched off: a superset
        strict = {**base, "kappa": 0.9}[name]  # features are post-ReLU: cosines to the anchors are mostly > 0.5
        alone = tad.recall(feats, pred, ts.labels, trusted, 10, **{**base, **all_off, name: strict})["reliable"]
        assert int(alone.sum()) < int(everything.sum()), name  # alone: it bites
    euclid = tad.recall(feats, pred, ts.labels, trusted, 10, **{**base, "covariance": "identity"})
    assert euclid["shrinkage"] == 1.0 and not torch.equal(euclid["reliable"], ref)


def test_partition_threshold_and_per_class_minimum():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(50)
    losses = torch.rand(200, generator=g) * 0.2
    losses[::3] += 3.0  # a high-loss mode in every class
    trusted, w, fit, nfb = tad.partition(losses, y, 4, tau=0.5)
    assert torch.equal(trusted, w > 0.5) and nfb == 0
    assert not bool(trusted[::3].any()) and bool(trusted[1::3].all())
    # a class whose samples are all high-loss still gets its minimum, highest posteriors first
    losses2 = losses.clone()
    losses2[y == 2] = 3.0 + torch.rand(50, generator=g) * 1e-3
    t2, w2, _, nfb2 = tad.partition(losses2, y, 4, min_per_class=30)
    assert int(t2[y == 2].sum()) >= 30 and nfb2 >= 30 - int((w2[y == 2] > 0.5).sum())
    with pytest.raises(ValueError, match="tau"):
        tad.partition(losses, y, 4, tau=1.0)


# ----------------------------------------------------------------------------------------------------------
# rounds: EMA, refine, trust update, recall switch
# ----------------------------------------------------------------------------------------------------------
def _round_losses(res_dir, r, ts):
    """Per-sample CE of the scoring network stored after round r (torch's cross-entropy as the reference)."""
    from ddfast.io import load_tensors

    tensors, meta = load_tensors(f"{res_dir}/tad/round_{r:03d}.safetensors")
    cfg = TADConfig.from_dict(meta["fingerprint"]["tad_config"])
    scorer = tad.TrustScorer(cfg, 1, 10, (8, 8), ts.mean, ts.std)
    scorer.model.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
    logits, _ = scorer.score(ts.images)
    return tensors, logits


@pytest.mark.parametrize("m", [0.0, 0.7])
def test_loss_ema_across_rounds(tmp_path, m):
    ts, nl = noisy_data("digits", "sym:0.4")
    cfg = dict(DIGITS_TAD, rounds=2, loss_ema=m, cleanlab=False)
    tad_partition(ts, tadcfg(cfg), checkpoint_dir=str(tmp_path))
    t0, _ = _round_losses(tmp_path, 0, ts)
    t1, logits1 = _round_losses(tmp_path, 1, ts)
    labels1 = torch.where(t0["replacement"] >= 0, t0["replacement"], ts.labels)
    loss1 = F.cross_entropy(logits1.double(), labels1, reduction="none").float()
    changed = labels1 != ts.labels
    expect = torch.where(changed, loss1, m * t0["ema"] + (1 - m) * loss1)
    torch.testing.assert_close(t1["ema"], expect, rtol=1e-4, atol=1e-5)
    assert bool(changed.any())


def test_margin_statistic(tmp_path):
    ts, _ = noisy_data("digits", "sym:0.4")
    tad_partition(ts, tadcfg(dict(DIGITS_TAD, rounds=1, trust_statistic="margin", cleanlab=False)),
                  checkpoint_dir=str(tmp_path))
    t0, logits = _round_losses(tmp_path, 0, ts)
    p = torch.softmax(logits.double(), 1)
    py = p.gather(1, ts.labels[:, None]).squeeze(1)
    other = p.scatter(1, ts.labels[:, None], -1.0).max(1).values
    torch.testing.assert_close(t0["ema"], (1.0 - (py - other)).float(), rtol=1e-4, atol=1e-5)


def test_refine_none_keeps_the_scorer_and_finetune_changes_it(tmp_path):
    ts, _ = noisy_data("digits", "sym:0.4")
    for refine in ("none", "finetune"):
        d = tmp_path / refine
        tad_partition(ts, tadcfg(dict(DIGITS_TAD, rounds=2, cleanlab=False, **{"scorer.refine": refine})),
                      checkpoint_dir=str(d))
        t0, _ = _round_losses(d, 0, ts)
        t1, _ = _round_losses(d, 1, ts)
        same = all(torch.equal(t0[k], t1[k]) for k in t0 if k.startswith("scorer."))
        assert same == (refine == "none")


def test_recall_off_and_refit_switches():
    off = partition_run("digits", "sym:0.4", (("recall", False),))
    for d in off.rounds:
        assert d["n_recalled"] == 0 and d["n_trusted"] == d["n_trusted_gmm"] + d["n_kept"]
    assert bool((off.state.replacement == -1).all())
    on = partition_run("digits", "sym:0.4")
    assert on.rounds[0]["n_recalled"] > 0 and bool((on.state.replacement >= 0).any())
    refit = partition_run("digits", "sym:0.4", (("trust_update", "refit"),))
    for d in refit.rounds:
        assert d["n_kept"] == 0 and d["n_trusted"] == d["n_trusted_gmm"] + d["n_recalled"]
    grow = on.rounds
    assert any(d["n_kept"] > 0 for d in grow[1:])


def test_same_seed_same_partition_other_seed_differs():
    a = partition_run("digits", "sym:0.4", (("rounds", 1), ("cleanlab", False)))
    b = tad_partition(noisy_data("digits", "sym:0.4")[0], tadcfg(dict(DIGITS_TAD, rounds=1, cleanlab=False)))
    c = tad_partition(noisy_data("digits", "sym:0.4")[0], tadcfg(dict(DIGITS_TAD, rounds=1, cleanlab=False, seed=1)))
    assert torch.equal(a.state.trusted, b.state.trusted) and torch.equal(a.state.replacement, b.state.replacement)
    assert not torch.equal(a.state.weights, c.state.weights)


# ----------------------------------------------------------------------------------------------------------
# a tiny distiller that records what each part sees
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TinyConfig(DistillConfig):
    ipc: int = 2
    iterations: int = 6
    checkpoint_every: int = 2
    lr_img: float = 0.05


def _sig(train: TrainSet) -> Dict[str, Any]:
    return {"n": int(train.effective_indices().numel()), "masked": train.trusted_mask is not None,
            "weights": train.weights is not None,
            "relabelled": int((train.replacement_labels >= 0).sum()) if train.replacement_labels is not None else 0,
            "transition": train.transition is not None}


class Tiny(Distiller):
    """Per-class mean matching in pixel space against real batches drawn from ``self.train`` (DM-like)."""

    name = "tiny"
    config_class = TinyConfig
    fail_at = -1  # class attribute (not in the config): a killed process, for the resume tests

    def __init__(self, config, **kw):
        super().__init__(config, **kw)
        self.seen = {"prepare": [], "initialize": [], "update_train": [], "step": []}
        self.extra_values = []

    def prepare(self, train):
        self.seen["prepare"].append(_sig(train))
        self.train = train

    def update_train(self, train):
        self.seen["update_train"].append(_sig(train))
        self.train = train

    def initialize(self, train):
        self.seen["initialize"].append(_sig(train))
        self.norm = Normalize(train.mean, train.std)
        picks = [ix[torch.randperm(ix.numel(), generator=self.generator)[: self.config.ipc]]
                 for ix in train.class_indices()]
        idx = torch.cat(picks)
        self.init_idx = idx
        self.images = self.norm.transform(train.images[idx]).clone().requires_grad_(True)
        self.labels = train.effective_labels()[idx].clone()
        self.opt = torch.optim.SGD([self.images], lr=self.config.lr_img, momentum=0.5)

    def step(self):
        if 0 <= Tiny.fail_at <= self.iteration:
            raise KeyboardInterrupt("injected")
        self.seen["step"].append(_sig(self.train))
        loss = self.images.new_zeros(())
        for c, ix in enumerate(self.train.class_indices()):
            pick = ix[torch.randperm(ix.numel(), generator=self.generator)[:16]]
            real = self.norm.transform(self.train.images[pick]).mean(0)
            loss = loss + (real - self.images[self.labels == c].mean(0)).pow(2).sum()
        out = {"loss": float(loss.detach())}
        if self.extra_loss is not None:
            e = self.extra_loss(self.images, self.labels)
            self.extra_values.append(float(e.detach()))
            loss = loss + e
            out["extra_loss"] = float(e.detach())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return out

    def synthetic_set(self):
        return SyntheticSet(self.images.detach().clone(), self.labels.clone(), self.train.num_classes,
                            self.config.ipc, "tiny", preprocess={"transform": "normalize", **{
                                "mean": list(self.train.mean), "std": list(self.train.std)}},
                            preprocess_state=self.norm.state_dict())

    def state_dict(self):
        return {"images": self.images.detach().clone(), "labels": self.labels.clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.labels = state["labels"].clone()
        self.opt.load_state_dict(state["opt"])


FAST_TAD = dict(DIGITS_TAD, rounds=2, cleanlab=False)


def _tiny_run(tmp=None, distiller_kw=None, **tad_kw):
    ts, nl = noisy_data("digits", "sym:0.4")
    d = Tiny(TinyConfig(**(distiller_kw or {})), quiet=True)
    res = run_tad(d, ts, tadcfg({**FAST_TAD, **tad_kw}), clean_labels=nl, checkpoint_dir=str(tmp) if tmp else None,
                  quiet=True)
    return d, res


def test_diversion_default_every_part_sees_the_trusted_set():
    d, res = _tiny_run(consistency_lambda=0.0)
    n_t = int(res.state.trusted.sum())
    assert n_t == res.rounds[-1]["n_trusted"] < 1437
    for part in ("prepare", "initialize", "step"):
        assert d.seen[part] and all(s["n"] == n_t and s["masked"] and s["weights"] for s in d.seen[part]), part
    assert len(d.seen["prepare"]) == 1
    assert bool(res.state.trusted[d.init_idx].all())
    # the synthetic labels come from the effective (pseudo-)labels of trusted samples
    eff = res.state.effective_labels(noisy_data("digits", "sym:0.4")[0].labels)
    assert torch.equal(res.synset.labels, eff[d.init_idx])
    assert res.synset.metadata["tad"]["summary"]["n_trusted"] == n_t
    # "auto" (the default) diverts every distiller without divert_pool_by_noise_rate
    assert res.summary["divert_pool"] is True and res.synset.metadata["tad"]["config"]["divert_pool"] == "auto"


def test_noise_rate_estimate_in_rounds_state_and_summary():
    ts, nl = noisy_data("digits", "sym:0.4")
    _, res = _tiny_run(consistency_lambda=0.0)
    realised = float((ts.labels != nl.clean_labels).double().mean())
    for r in res.rounds:
        assert r["noise_rate_realised"] == pytest.approx(realised, abs=1e-12)
        # the anchors of a 1,437-image set are ~14 per class: a rough estimate, but the realised rate's, not 0
        assert abs(r["noise_rate_estimate"] - realised) < 0.15, r["noise_rate_estimate"]
    assert res.state.noise_rate == res.rounds[-1]["noise_rate_estimate"] == res.summary["noise_rate_estimate"]


class _ByRate(Tiny):
    divert_pool_by_noise_rate = True


def test_resolve_divert_pool_rule():
    from ddfast.tad import resolve_divert_pool

    _, res = _tiny_run(consistency_lambda=0.0, rounds=1)
    st = res.state
    by_rate, pool = _ByRate(TinyConfig(), quiet=True), Tiny(TinyConfig(), quiet=True)
    for explicit in (True, False, "relabel", "corrected", "posterior"):
        assert resolve_divert_pool(explicit, by_rate, st, 0.5) == explicit
    assert resolve_divert_pool("auto", pool, dataclasses.replace(st, noise_rate=0.1)) is True
    assert resolve_divert_pool("auto", by_rate, dataclasses.replace(st, noise_rate=0.51), 0.5) is True
    assert resolve_divert_pool("auto", by_rate, dataclasses.replace(st, noise_rate=0.5), 0.5) is False
    assert resolve_divert_pool("auto", by_rate, dataclasses.replace(st, noise_rate=0.3), 0.2) is True
    assert resolve_divert_pool("auto", by_rate, None) is True
    with pytest.raises(ValueError, match="noise-rate"):
        resolve_divert_pool("auto", by_rate, dataclasses.replace(st, noise_rate=None))


def test_min_class_share_against_a_loop():
    _, res = _tiny_run(consistency_lambda=0.0, rounds=1)
    ts = noisy_data("digits", "sym:0.4")[0]
    st = res.state
    eff = st.effective_labels(ts.labels)
    shares = []
    for c in range(10):
        given = sum(1 for y in ts.labels.tolist() if y == c)
        kept = sum(1 for i in range(len(eff)) if bool(st.trusted[i]) and int(eff[i]) == c)
        shares.append(kept / given)
    assert st.min_class_share(ts.labels, 10) == pytest.approx(min(shares), abs=1e-12)
    # a trusted set that drops all but a tenth of one class
    one = torch.nonzero((eff == 3) & st.trusted).flatten()
    keep = int(0.1 * int((ts.labels == 3).sum()))
    dropped = dataclasses.replace(st, trusted=st.trusted.clone())
    dropped.trusted[one[keep:]] = False
    assert dropped.min_class_share(ts.labels, 10) == pytest.approx(keep / int((ts.labels == 3).sum()))
    # a class without any given label is skipped
    assert st.min_class_share(ts.labels, 12) == pytest.approx(min(shares), abs=1e-12)


def test_auto_rules_choose_the_posterior_when_a_class_is_nearly_dropped():
    from ddfast.tad import resolve_divert_pool, resolve_divert_real

    _, res = _tiny_run(consistency_lambda=0.0, rounds=1)
    ts = noisy_data("digits", "sym:0.4")[0]
    st = res.state
    share = st.min_class_share(ts.labels, 10)
    assert 0 < share < 1
    by_rate, pool = _ByRate(TinyConfig(), quiet=True), Tiny(TinyConfig(), quiet=True)
    for d in (by_rate, pool):
        assert resolve_divert_pool("auto", d, st, 0.5, labels=ts.labels, min_class_share=share + 1e-6) == "posterior"
        assert resolve_divert_pool("auto", d, st, 0.5, labels=ts.labels, min_class_share=share) == \
            resolve_divert_pool("auto", d, st, 0.5)  # at or above the threshold: the noise-rate rule
    assert resolve_divert_pool("auto", pool, st, 0.5, labels=ts.labels, min_class_share=0.0) is True
    assert resolve_divert_pool(False, pool, st, 0.5, labels=ts.labels, min_class_share=1.0) is False
    assert resolve_divert_real("auto", st, ts.labels, share + 1e-6) == "posterior"
    assert resolve_divert_real("auto", st, ts.labels, share) is True
    assert resolve_divert_real("auto", None, ts.labels, 1.0) is True
    # a threshold the posterior labels do not reach either: no switch
    post_share = float((torch.bincount(st.posterior, minlength=10).double()
                        / torch.bincount(ts.labels, minlength=10).double()).min())
    assert share < post_share < 1
    assert resolve_divert_real("auto", st, ts.labels, post_share) == "posterior"
    assert resolve_divert_real("auto", st, ts.labels, post_share + 1e-6) is True
    assert resolve_divert_pool("auto", pool, st, 0.5, labels=ts.labels, min_class_share=post_share + 1e-6) is True
    for explicit in (True, False, "relabel", "posterior"):
        assert resolve_divert_real(explicit, st, ts.labels, 1.0) == explicit
    old = dataclasses.replace(st, posterior=None)  # a round checkpoint from before the posterior existed
    with pytest.raises(ValueError, match="posterior"):
        resolve_divert_real("auto", old, ts.labels, 0.2)
    with pytest.raises(ValueError, match="posterior"):
        resolve_divert_pool("auto", pool, old, labels=ts.labels, min_class_share=0.2)


@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_auto_share_rule_end_to_end(threshold):
    # here the trusted set keeps ~0.21 of its smallest class, the posterior labels ~0.92
    d, res = _tiny_run(consistency_lambda=0.0, divert_min_class_share=threshold)
    share = res.summary["min_class_share"]
    posterior = share < threshold
    assert posterior == (threshold == 0.5)
    assert res.summary["divert_pool"] == ("posterior" if posterior else True)
    assert res.summary["divert_real"] == ("posterior" if posterior else True)
    from ddfast.report import _tad_divert_sentence

    text = _tad_divert_sentence(res.synset.metadata["tad"], "rcig")
    assert (f"keeps only {share:.2f} of its smallest class, below 0.50" in text) == posterior
    assert text.startswith("Real batches") == posterior
    for part in ("prepare", "step"):
        assert all(s["masked"] != posterior and s["n"] == (1437 if posterior else int(res.state.trusted.sum()))
                   for s in d.seen[part]), part
    assert all(s["masked"] for s in d.seen["initialize"])  # the initialisation stays on the trusted view


@pytest.mark.parametrize("threshold", [0.9, 0.1])
def test_auto_diverts_a_by_rate_distiller_only_above_the_threshold(threshold):
    ts, nl = noisy_data("digits", "sym:0.4")
    d = _ByRate(TinyConfig(), quiet=True)
    res = run_tad(d, ts, tadcfg({**FAST_TAD, "consistency_lambda": 0.0, "divert_noise_rate": threshold}),
                  clean_labels=nl, quiet=True)
    diverted = res.state.noise_rate > threshold  # the estimate is ~0.35 here
    assert diverted == (threshold < 0.5)
    assert res.summary["divert_pool"] is diverted
    assert all(s["masked"] == diverted and s["n"] == (int(res.state.trusted.sum()) if diverted else 1437)
               for s in d.seen["prepare"])
    assert all(s["masked"] for s in d.seen["initialize"] + d.seen["step"])  # the other parts stay diverted


@pytest.mark.parametrize("part", ["pool", "init", "real"])
def test_each_diversion_switch(part):
    d, res = _tiny_run(consistency_lambda=0.0, **{f"divert_{part}": False})
    hook = {"pool": "prepare", "init": "initialize", "real": "step"}[part]
    for h in ("prepare", "initialize", "step"):
        diverted = all(s["masked"] for s in d.seen[h])
        assert diverted == (h != hook), (part, h)
    assert all(s["n"] == 1437 for s in d.seen[hook])


def test_relabel_pool_sees_every_sample_with_the_pseudo_labels():
    d, res = _tiny_run(consistency_lambda=0.0, divert_pool="relabel")
    n_pseudo = int((res.state.replacement >= 0).sum())
    assert n_pseudo > 0
    (pool,) = d.seen["prepare"]
    # no sample dropped, no weights, every pseudo-label applied; the other parts still see the trusted view
    assert pool == {"n": 1437, "masked": False, "weights": False, "relabelled": n_pseudo, "transition": False}
    assert all(s["masked"] and s["n"] == int(res.state.trusted.sum()) for s in d.seen["step"])
    ts = noisy_data("digits", "sym:0.4")[0]
    view = diverted_view(ts, res.state, "relabel")
    assert torch.equal(view.effective_labels(), res.state.effective_labels(ts.labels))
    assert torch.equal(view.effective_indices(), torch.arange(1437))
    with pytest.raises(ValueError, match="divert"):
        diverted_view(ts, res.state, "trusted")


def test_corrected_pool_sees_every_sample_with_the_estimated_transition():
    from ddfast.noise import transition_matrix

    d, res = _tiny_run(consistency_lambda=0.0, divert_pool="corrected")
    (pool,) = d.seen["prepare"]
    # every sample with its given label, and the noise transition; the other parts still see the trusted view
    assert pool == {"n": 1437, "masked": False, "weights": False, "relabelled": 0, "transition": True}
    assert all(s["masked"] and not s["transition"] for s in d.seen["step"] + d.seen["initialize"])
    ts, nl = noisy_data("digits", "sym:0.4")
    T = res.state.transition
    assert T.shape == (10, 10) and T.dtype == torch.float64
    torch.testing.assert_close(T.sum(1), torch.ones(10, dtype=torch.float64))
    last = res.rounds[-1]
    assert last["transition_diagonal"] == [round(float(v), 4) for v in T.diagonal()]
    true_t = transition_matrix(nl.clean_labels, ts.labels, 10)
    assert last["transition_error"] == pytest.approx(float((T - true_t).abs().sum(1).max()))
    view = diverted_view(ts, res.state, "corrected")
    assert torch.equal(view.transition, T) and torch.equal(view.effective_labels(), ts.labels)
    old = dataclasses.replace(res.state, transition=None)  # a round checkpoint from before the estimate existed
    with pytest.raises(ValueError, match="transition"):
        diverted_view(ts, old, "corrected")
    assert diverted_view(ts, old, True).transition is None


def test_posterior_pool_sees_every_sample_with_its_posterior_label(tmp_path):
    from ddfast.noise import posterior_labels

    d, res = _tiny_run(tmp_path, consistency_lambda=0.0, divert_pool="posterior")
    ts, nl = noisy_data("digits", "sym:0.4")
    post = res.state.posterior
    changed = int((post != ts.labels).sum())
    assert changed > 0
    (pool,) = d.seen["prepare"]
    # every sample, its posterior label where it differs; the other parts still see the trusted view
    assert pool == {"n": 1437, "masked": False, "weights": False, "relabelled": changed, "transition": False}
    assert all(s["masked"] for s in d.seen["step"] + d.seen["initialize"])
    last = res.rounds[-1]
    assert last["n_posterior_changed"] == changed
    assert last["posterior_label_accuracy"] == pytest.approx(float((post == nl.clean_labels).double().mean()))
    # stored with the round: Bayes' rule on that round's scorer and transition estimate, balanced to the given
    # labels' class shares (posterior_balance, the default)
    t, logits = _round_losses(tmp_path, FAST_TAD["rounds"] - 1, ts)
    assert torch.equal(t["posterior"], post)
    shares = torch.bincount(ts.labels, minlength=10).double() / ts.labels.numel()
    assert torch.equal(posterior_labels(torch.softmax(logits.double(), 1), ts.labels, t["transition"],
                                        class_prior=shares), post)
    view = diverted_view(ts, res.state, "posterior")
    assert torch.equal(view.effective_labels(), post) and view.trusted_mask is None and view.weights is None
    assert view.soft_labels is None
    # the distribution behind it: stored with the round, argmax = the posterior labels; the soft view carries it
    q = res.state.posterior_probs
    assert q.shape == (ts.labels.numel(), 10) and torch.equal(t["posterior_probs"], q)
    assert torch.equal(q.argmax(1), post)
    soft = diverted_view(ts, res.state, "posterior_soft")
    assert torch.equal(soft.soft_labels, q) and torch.equal(soft.effective_labels(), post)
    assert diverted_view(ts, res.state, True).soft_labels is None
    old = dataclasses.replace(res.state, posterior=None)  # a round checkpoint from before the posterior existed
    with pytest.raises(ValueError, match="posterior"):
        diverted_view(ts, old, "posterior")
    with pytest.raises(ValueError, match="posterior"):
        diverted_view(ts, dataclasses.replace(res.state, posterior_probs=None), "posterior_soft")


@pytest.mark.parametrize("real", ["posterior", "relabel"])
def test_real_batches_from_every_sample_with_tads_labels(real):
    from ddfast.report import _tad_divert_sentence

    d, res = _tiny_run(consistency_lambda=0.0, divert_real=real)
    ts = noisy_data("digits", "sym:0.4")[0]
    relabelled = int((res.state.posterior != ts.labels).sum() if real == "posterior" else (res.state.replacement >= 0).sum())
    assert relabelled > 0
    # the distillation steps see every sample with those labels, the pool and the initialisation the trusted view
    assert d.seen["step"] and all(s == {"n": 1437, "masked": False, "weights": False, "relabelled": relabelled,
                                        "transition": False} for s in d.seen["step"])
    assert all(s["masked"] for s in d.seen["prepare"] + d.seen["initialize"])
    tad_meta = res.synset.metadata["tad"]
    assert tad_meta["config"]["divert_real"] == real
    text = _tad_divert_sentence(tad_meta, "rcig")
    assert text.startswith("Real batches") and ("posterior" in text) == (real == "posterior")
    assert "Real batches" not in _tad_divert_sentence({"config": {}, "summary": {"divert_pool": True}}, "dance")


def test_pass_weights_switch():
    d, _ = _tiny_run(consistency_lambda=0.0, pass_weights=False)
    assert all(s["masked"] and not s["weights"] for s in d.seen["step"])


def test_consistency_hook_on_and_off():
    d0, _ = _tiny_run(consistency_lambda=0.0)
    assert d0.extra_values == [] and d0.extra_loss is None
    d1, res = _tiny_run(consistency_lambda=0.5)
    assert len(d1.extra_values) == 6 and all(v > 0 for v in d1.extra_values)
    assert d1.extra_loss is None  # removed after the run
    assert [h.get("extra_loss") for h in d1.history] == d1.extra_values


def test_consistency_regularizer_value_and_gradient():
    ts, _ = noisy_data("digits", "sym:0.4")
    cfg = TADConfig(consistency_lambda=0.3, consistency_dsa="")
    f = tad.TrustScorer(cfg.replace(scorer={"net": {"width": 8, "depth": 2}}), 1, 10, (8, 8), ts.mean, ts.std).model
    zca_like = Normalize([0.3], [0.7])  # the distiller's input space differs from f's
    x_pix = ts.images[:12]
    x = zca_like.transform(x_pix).requires_grad_(True)
    reg = tad.ConsistencyRegularizer(f, cfg, ts.mean, ts.std, to_scorer=lambda z: Normalize(ts.mean, ts.std)
                                     .transform(zca_like.inverse(z)))
    soft = torch.randn(12, 10)
    val = reg(x, soft)
    with torch.no_grad():
        logits = f(Normalize(ts.mean, ts.std).transform(x_pix))
    ref = 0.3 * -(torch.softmax(soft, 1) * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-6)
    val.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in f.parameters())
    hard = reg(x.detach(), soft.argmax(1))
    assert float(hard) > 0
    # "hard" target: one-hot of the argmax of float labels
    reg_h = tad.ConsistencyRegularizer(f, cfg.replace(consistency_target="hard"), ts.mean, ts.std,
                                       to_scorer=reg._to_scorer)
    torch.testing.assert_close(reg_h(x.detach(), soft), reg(x.detach(), soft.argmax(1)))


def test_synset_transform_inverts_zca():
    from ddfast.augment import build_input_transform

    ts, _ = noisy_data("digits", "sym:0.4")
    tr = build_input_transform("normalize+zca", ts.images, mean=ts.mean, std=ts.std)
    syn = SyntheticSet(tr.transform(ts.images[:5]), torch.zeros(5, dtype=torch.long), 10, 1, "x",
                       preprocess={"kind": tr.kind}, preprocess_state=tr.state_dict())
    back = syn.input_transform().inverse(syn.images)
    torch.testing.assert_close(back, ts.images[:5], rtol=1e-3, atol=1e-3)


def test_interleaved_schedule_swaps_views_between_rounds():
    d, res = _tiny_run(schedule="interleaved", rounds=3, consistency_lambda=0.0, distiller_kw={"iterations": 7})
    ends = [r["end_iteration"] for r in res.rounds]
    assert ends == [2, 4, 7] and [r["start_iteration"] for r in res.rounds] == [0, 2, 4]
    assert len(d.seen["prepare"]) == 1 and d.iteration == 7
    n_round = [r["n_trusted"] for r in res.rounds]
    assert d.seen["prepare"][0]["n"] == n_round[0] and d.seen["initialize"][0]["n"] == n_round[0]
    assert [s["n"] for s in d.seen["step"]] == [n_round[0]] * 2 + [n_round[1]] * 2 + [n_round[2]] * 3


# ----------------------------------------------------------------------------------------------------------
# checkpoints and exact resume
# ----------------------------------------------------------------------------------------------------------
def _strip(rounds):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


@pytest.mark.parametrize("schedule", ["pre", "interleaved"])
def test_resume_after_a_killed_round_equals_uninterrupted(tmp_path, monkeypatch, schedule):
    kw = dict(schedule=schedule, rounds=3, consistency_lambda=0.2)
    _, full = _tiny_run(tmp_path / "a", **kw)
    calls = []
    import ddfast.tad.run as tad_run

    real_round = tad_run.run_round

    def dying(ctx, r, prev):
        if r == 2:
            raise KeyboardInterrupt("killed in round 2")
        calls.append(r)
        return real_round(ctx, r, prev)

    monkeypatch.setattr(tad_run, "run_round", dying)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b", **kw)
    assert calls == [0, 1]
    monkeypatch.setattr(tad_run, "run_round", lambda ctx, r, prev: (calls.append(r), real_round(ctx, r, prev))[1])
    _, resumed = _tiny_run(tmp_path / "b", **kw)
    assert calls == [0, 1, 2]  # rounds 0 and 1 were loaded, not recomputed
    assert _strip(resumed.rounds) == _strip(full.rounds)
    assert torch.equal(resumed.synset.images, full.synset.images)
    assert torch.equal(resumed.state.trusted, full.state.trusted)
    assert torch.equal(resumed.state.transition, full.state.transition)  # saved with the round and loaded
    assert resumed.state.noise_rate == full.state.noise_rate is not None


def test_resume_inside_distillation_equals_uninterrupted(tmp_path, monkeypatch):
    kw = dict(schedule="interleaved", rounds=2, consistency_lambda=0.2)
    _, full = _tiny_run(tmp_path / "a", distiller_kw={"iterations": 8}, **kw)
    monkeypatch.setattr(Tiny, "fail_at", 7)  # dies in round 1's distillation (checkpoint at iteration 6)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "b", distiller_kw={"iterations": 8}, **kw)
    monkeypatch.setattr(Tiny, "fail_at", -1)
    d, resumed = _tiny_run(tmp_path / "b", distiller_kw={"iterations": 8}, **kw)
    assert len(d.seen["step"]) == 2  # iterations 7 and 8 only
    assert _strip(resumed.rounds) == _strip(full.rounds)
    assert torch.equal(resumed.synset.images, full.synset.images)


def test_resume_refuses_another_config(tmp_path):
    _tiny_run(tmp_path, consistency_lambda=0.0)
    with pytest.raises(ValueError, match="another TAD run"):
        _tiny_run(tmp_path, consistency_lambda=0.0, tau=0.6)


# ----------------------------------------------------------------------------------------------------------
# the three distillers, end to end at tiny sizes
# ----------------------------------------------------------------------------------------------------------
def _have(mod):
    return importlib.util.find_spec(f"ddfast.distill.{mod}") is not None


def _e2e(method, cfg, tmp_path, **tad_kw):
    from ddfast.distill import make_distiller

    ts, nl = noisy_data("digits", "sym:0.4")
    d = make_distiller(method, cfg, cache_dir=str(tmp_path / "cache"), quiet=True)
    # one short round leaves a poor trusted set, whose smallest class share would switch "auto" to the posterior
    # labels; 0 keeps the noise-rate rule unless a test asks otherwise
    res = run_tad(d, ts, tadcfg({**FAST_TAD, "rounds": 1, "consistency_lambda": 0.1, "scorer.warmup_epochs": 4.0,
                                 "divert_min_class_share": 0.0, **tad_kw}),
                  clean_labels=nl, checkpoint_dir=str(tmp_path / "ckpt"), quiet=True)
    syn = res.synset
    assert syn.images.shape[0] == 10 * cfg.ipc * getattr(cfg, "factor", 1) ** 2
    assert bool(torch.isfinite(syn.images).all()) and bool(torch.isfinite(syn.labels.float()).all())
    assert syn.metadata["tad"]["summary"]["n_trusted"] == int(res.state.trusted.sum())
    extra = [h.get("extra_loss", h.get("extra")) for h in d.history]
    assert all(e is not None and e > 0 for e in extra), extra
    assert d.extra_loss is None
    return d, res


@pytest.mark.skipif(not _have("datm"), reason="ddfast.distill.datm does not exist yet")
@pytest.mark.parametrize("divert_pool", [True, "auto"])
def test_tad_with_datm(tmp_path, monkeypatch, divert_pool):
    from ddfast.distill.datm import DATM, DATMConfig

    seen = []
    real_prepare = DATM.prepare
    monkeypatch.setattr(DATM, "prepare", lambda self, train: (seen.append(_sig(train)), real_prepare(self, train))[1])
    cfg = DATMConfig.from_dict(dict(
        ipc=1, iterations=3, expert=dict(net=dict(width=8, depth=2), num_experts=2, epochs=6, optimizer="sgd", lr=0.03),
        syn_steps=3, expert_epochs=2, min_start_epoch=0, current_max_start_epoch=2, max_start_epoch=4,
        expansion_end_epoch=10, checkpoint_every=2, eval_epochs=10, eval_runs=1))
    d, res = _e2e("datm", cfg, tmp_path, divert_pool=divert_pool)
    n_t = int(res.state.trusted.sum())
    if divert_pool is True:  # experts from the trusted set only
        assert seen and all(s["n"] == n_t and s["masked"] for s in seen)
    else:  # "auto": the estimated noise rate (~0.35, digits sym 0.4) is below 0.5 -> experts on every sample
        assert res.state.noise_rate < 0.5 and res.summary["divert_pool"] is False
        assert seen and all(s["n"] == 1437 and not s["masked"] for s in seen)
    # the initial images come from the trusted set either way
    assert bool(res.state.trusted[torch.tensor(d.init_info["indices"])].all())


@pytest.mark.skipif(not _have("datm"), reason="ddfast.distill.datm does not exist yet")
def test_tad_with_datm_forward_corrected_experts(tmp_path):
    """divert_pool="corrected": DATM's experts train on every sample with forward loss correction under TAD's
    estimate, in a buffer of their own."""
    from ddfast.distill import make_distiller
    from ddfast.distill.datm import DATMConfig

    cfg = DATMConfig.from_dict(dict(
        ipc=1, iterations=2, expert=dict(net=dict(width=8, depth=2), num_experts=1, epochs=3, optimizer="sgd", lr=0.03),
        syn_steps=2, expert_epochs=1, min_start_epoch=0, current_max_start_epoch=1, max_start_epoch=2,
        expansion_end_epoch=10, checkpoint_every=2, eval_epochs=10, eval_runs=1))
    ts, nl = noisy_data("digits", "sym:0.4")
    tcfg = tadcfg(dict(FAST_TAD, rounds=1, consistency_lambda=0.0, divert_pool="corrected"))
    d = make_distiller("datm", cfg, cache_dir=str(tmp_path / "cache"), quiet=True)
    res = run_tad(d, ts, tcfg, clean_labels=nl, quiet=True)
    assert d.experts.meta["key"]["transition"] and d.experts.meta["recipe"]
    assert d.experts.meta["stats"]["0"]["loss"]  # trained on all 1,437 samples
    assert len(d.experts.meta["stats"]["0"]["loss"]) == 3
    # the same recipe on the plain noisy view: another buffer, other trajectories
    d2 = make_distiller("datm", cfg, cache_dir=str(tmp_path / "cache"), quiet=True)
    d2.prepare(diverted_view(ts, res.state, False))
    assert d2.experts_key != d.experts_key
    assert not torch.allclose(d2.experts.trajectory(0)[-1], d.experts.trajectory(0)[-1])
    torch.testing.assert_close(d2.experts.trajectory(0)[0], d.experts.trajectory(0)[0])  # same initialisation


@pytest.mark.skipif(not _have("dance"), reason="ddfast.distill.dance does not exist yet")
def test_tad_with_dance(tmp_path):
    from ddfast.distill.dance import DANCEConfig

    cfg = DANCEConfig.from_dict(dict(
        ipc=1, iterations=2, checkpoint_every=2, factor=1, num_premodel=2, batch_real=32, lr_img=0.05, eval_width=8,
        eval_epochs=10, eval_runs=1, pool=dict(net=dict(width=8, depth=2), amount=2, epochs=2, lr=0.05)))
    d, res = _e2e("dance", cfg, tmp_path)
    assert res.synset.metadata["n_real_used"] == int(res.state.trusted.sum())
    # the share rule on: the pool and the real statistics see every image with its posterior label
    # (one short round: the trusted set keeps ~0.03 of its smallest class, the posterior labels ~0.34)
    d, res = _e2e("dance", cfg, tmp_path / "posterior", divert_min_class_share=0.2)
    assert res.summary["divert_pool"] == res.summary["divert_real"] == "posterior"
    assert res.synset.metadata["n_real_used"] == 1437


@pytest.mark.skipif(not _have("rcig"), reason="ddfast.distill.rcig does not exist yet")
def test_tad_with_rcig(tmp_path):
    from ddfast.distill.rcig import RCIGConfig

    cfg = RCIGConfig(ipc=1, iterations=2, base_width=4, pool_model_count=2, max_online_steps=5, n_max_steps_pool=2,
                     real_batch_size=64, n_inner_steps=2, n_hinv_steps=2, checkpoint_every=2, eval_steps=20,
                     eval_warmup_steps=5, eval_runs=1)
    d, res = _e2e("rcig", cfg, tmp_path)
    assert torch.equal(torch.sort(d._real_idx).values, torch.nonzero(res.state.trusted).flatten())
    assert res.summary["divert_pool"] == "n/a"  # RCIG's pool trains on the support set, not on real images


def test_run_tad_arguments():
    ts, _ = noisy_data("digits", "sym:0.4")
    with pytest.raises(TypeError, match="TrainSet"):
        run_tad(Tiny(TinyConfig(), quiet=True), ts.images)
    with pytest.raises(TypeError, match="Distiller"):
        run_tad("datm", ts)
    with pytest.raises(ValueError, match="clean_labels"):
        run_tad(Tiny(TinyConfig(), quiet=True), ts, tadcfg(FAST_TAD), clean_labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="bogus"):
        run_tad(Tiny(TinyConfig(), quiet=True), ts, {"bogus": 1})
    with pytest.raises(TypeError, match="config"):
        run_tad(Tiny(TinyConfig(), quiet=True), ts, 3)
