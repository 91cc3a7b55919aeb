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
