"""Tests of ddfast.evaluate: the harness learns digits, vmap == loop, losses, transforms on the test set,
schedules, config validation, JSON."""
import json

import pytest
import torch
import torch.nn.functional as F

from ddfast import evaluate as E
from ddfast.augment import Normalize
from ddfast.data import load_dataset
from ddfast.models import flat_params, get_model

SMALL = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", "test")


def test_harness_learns_digits(digits):
    tr, te = digits
    r = E.evaluate_synset(tr.images, tr.labels, te, model_kwargs=SMALL, epochs=8, num_runs=2, batch_size=64,
                          lr=0.01, dsa=False)
    assert r.mean > 85.0 and len(r.accs) == 2  # chance is 10%
    assert r.std == pytest.approx(float(torch.tensor(r.accs, dtype=torch.float64).std(unbiased=False)), abs=1e-9)
    assert r.config["n_train"] == 1437 and r.config["label_kind"] == "hard" and r.config["loss_resolved"] == "ce"
    assert r.seconds > 0
    back = E.EvalResult.from_json(r.to_json())
    assert back.accs == r.accs and back.config == json.loads(json.dumps(r.config))


@pytest.mark.parametrize("vmap", [False, True])
def test_per_class_accuracy_against_a_slow_loop(digits, vmap):
    """The per-class accuracies of each run average to EvalResult.per_class; weighted by the class sizes they give
    back the run's accuracy; and a slow per-image loop over the trained model gives the same numbers."""
    tr, te = digits
    X, Y = tr.images[:200], tr.labels[:200]
    cfg = E.EvalConfig(model_kwargs={"width": 4, "depth": 2}, epochs=2, batch_size=32, lr=0.05, num_runs=2,
                       dsa=False, optimizer="sgd", num_classes=10)
    r = E.evaluate_synset(X, Y, te, config=cfg, vmap=vmap)
    assert r.config["vmapped"] is vmap and len(r.per_class) == 10
    n_c = torch.bincount(te.labels, minlength=10).double()
    assert float((torch.tensor(r.per_class, dtype=torch.float64) * n_c).sum() / n_c.sum()) == pytest.approx(
        r.mean, abs=1e-9)
    # slow reference on run 0's model (trained exactly as the harness trains run 0)
    m = E.train_classifier(X, Y, config=cfg, run=0, num_classes=10).eval()
    hit, tot = [0] * 10, [0] * 10
    with torch.no_grad():
        for x, y in zip(te.images, te.labels):
            tot[int(y)] += 1
            hit[int(y)] += int(m(x[None]).argmax(1).item() == int(y))
    pc = []
    acc = E.evaluate_model(m, te, per_class_into=pc)
    assert pc[0] == pytest.approx([100.0 * h / t for h, t in zip(hit, tot)], abs=1e-9)
    assert acc == pytest.approx(100.0 * sum(hit) / sum(tot), abs=1e-9)
    assert E.EvalResult.from_json(r.to_json()).per_class == r.per_class


def test_soft_labels_with_dsa_learn(digits):
    tr, te = digits
    soft = 5.0 * F.one_hot(tr.labels, 10).float()  # label logits
    r = E.evaluate_synset(tr.images, soft, te, model_kwargs=SMALL, epochs=6, num_runs=1, batch_size=64,
                          lr=torch.tensor(0.02), dsa=True)  # a learned lr may come as a tensor
    assert r.config["loss_resolved"] == "soft_ce" and r.config["label_kind"] == "soft"
    assert r.config["lr"] == pytest.approx(0.02) and isinstance(r.config["lr"], float)
    assert r.mean > 60.0


@pytest.mark.parametrize("dsa", [False, True])
def test_vmapped_training_equals_loop(digits, dsa):
    tr, _ = digits
    X, Y = tr.images[:96], tr.labels[:96]
    cfg = E.EvalConfig(model_kwargs={"width": 4, "depth": 2}, epochs=2, batch_size=32, lr=0.05, num_runs=3, dsa=dsa,
                       optimizer="sgd")
    template = get_model("convnet", 1, 10, (8, 8), **cfg.model_kwargs)
    flats0 = torch.stack([flat_params(E._new_model(cfg, 1, 10, (8, 8), k)).detach() for k in range(3)])
    flats = E._train_vmapped(template, flats0, X, Y, cfg, "ce", None)
    for k in range(3):
        m = E.train_classifier(X, Y, config=cfg, run=k, num_classes=10)
        torch.testing.assert_close(flats[k], flat_params(m).detach(), rtol=1e-4, atol=1e-5)
    # and through the public entry point: same accuracies
    te = (tr.images[96:300], tr.labels[96:300])
    a = E.evaluate_synset(X, Y, te, config=cfg, vmap=True, num_classes=10)
    b = E.evaluate_synset(X, Y, te, config=cfg, vmap=False, num_classes=10)
    assert a.config["vmapped"] and not b.config["vmapped"]
    assert a.accs == pytest.approx(b.accs, abs=0.6)


def test_adam_cosine_mse_rcig_recipe_runs(digits):
    tr, te = digits
    r = E.evaluate_synset(tr.images[:200], tr.labels[:200], te, model="convnet_rcig",
                          model_kwargs={"base_width": 4}, loss="mse", optimizer="adam", lr=1e-3, schedule="cosine",
                          warmup_steps=5, epochs=3, num_runs=1, batch_size=50, dsa=False)
    assert r.config["loss_resolved"] == "mse" and r.config["weight_decay"] is None
    assert 0 <= r.mean <= 100


def test_per_sample_losses_against_references():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = -torch.log_softmax(z, 1)[torch.arange(6), y]
    torch.testing.assert_close(E.per_sample_loss("ce", z, y), ce)
    torch.testing.assert_close(E.per_sample_loss("soft_ce", z, 1e4 * F.one_hot(y, 4).double()), ce)
    torch.testing.assert_close(E.per_sample_loss("soft_ce", z, y), ce)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    manual = torch.stack([-(torch.softmax(t[i], 0) * torch.log_softmax(z[i], 0)).sum() for i in range(6)])
    torch.testing.assert_close(E.per_sample_loss("soft_ce", z, t), manual)
    centred = F.one_hot(y, 4).double() - 0.25
    torch.testing.assert_close(E.per_sample_loss("mse", z, y), 0.5 * ((z - centred) ** 2).sum(1))
    p_y = torch.softmax(z, 1)[torch.arange(6), y]
    torch.testing.assert_close(E.per_sample_loss("gce", z, y, gce_q=1.0), 1 - p_y)  # q = 1: MAE-like
    torch.testing.assert_close(E.per_sample_loss("gce", z, y, gce_q=1e-6), ce, rtol=1e-4, atol=1e-5)  # q -> 0: CE
    with pytest.raises(ValueError, match="integer"):
        E.per_sample_loss("ce", z, t)


class _Spy:
    kind = "spy"

    def __init__(self):
        self.calls = []

    def transform(self, x):
        self.calls.append(x.shape[0])
        return (x - 0.3) / 0.2

    __call__ = transform

    def inverse(self, x):
        return x * 0.2 + 0.3


def test_transform_is_applied_to_the_test_set(digits):
    tr, te = digits
    spy = _Spy()
    E.evaluate_synset(tr.images[:50], tr.labels[:50], te, model_kwargs=SMALL, epochs=1, num_runs=1, transform=spy,
                      dsa=False)
    assert sorted(spy.calls) == sorted([50, len(te)])
    spy2 = _Spy()
    r = E.evaluate_synset(tr.images[:50], tr.labels[:50], te, model_kwargs=SMALL, epochs=1, num_runs=1,
                          transform=spy2, images_transformed=True, dsa=False)
    assert spy2.calls == [len(te)] and r.config["images_transformed"]
    # evaluate_model applies the same transform: accuracy equals the harness's
    nrm = Normalize(tr.mean, tr.std)
    cfg = E.EvalConfig(model_kwargs=SMALL, epochs=3, num_runs=1, batch_size=64, dsa=False)
    m = E.train_classifier(tr.images, tr.labels, config=cfg, transform=nrm)
    r = E.evaluate_synset(tr.images, tr.labels, te, config=cfg, transform=nrm)
    assert E.evaluate_model(m, te, transform=nrm) == pytest.approx(r.accs[0])
    # the trap of mtt-distillation #11: testing without the transform gives a different (worse) accuracy
    assert E.evaluate_model(m, te) != pytest.approx(r.accs[0])


def test_schedules():
    cfg = E.EvalConfig(epochs=10, schedule="step")
    assert [E.lr_factor(cfg, e, 0, 100) for e in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]
    cfg = E.EvalConfig(epochs=12, schedule="multistep")
    assert [E.lr_factor(cfg, e, 0, 100) for e in (0, 7, 8, 10)] == pytest.approx([1.0, 1.0, 0.2, 0.04])
    cfg = E.EvalConfig(epochs=10, schedule="cosine", warmup_steps=10)
    assert E.lr_factor(cfg, 0, 4, 110) == pytest.approx(0.5)
    assert E.lr_factor(cfg, 0, 10, 110) == pytest.approx(1.0)
    assert E.lr_factor(cfg, 0, 60, 110) == pytest.approx(0.5)
    assert E.lr_factor(cfg, 0, 110, 110) == pytest.approx(0.0, abs=1e-12)


def test_callback_weights_and_errors(digits):
    tr, te = digits
    X, Y = tr.images[:64], tr.labels[:64]
    seen = []
    cfg = E.EvalConfig(model_kwargs=SMALL, epochs=3, batch_size=32, dsa=False)
    E.train_classifier(X, Y, config=cfg, callback=lambda e, m: seen.append((e, flat_params(m).detach().clone())))
    assert [e for e, _ in seen] == [0, 1, 2, 3] and not torch.equal(seen[0][1], seen[-1][1])
    a = flat_params(E.train_classifier(X, Y, config=cfg, num_classes=10)).detach()
    b = flat_params(E.train_classifier(X, Y, config=cfg, num_classes=10, weights=torch.ones(64))).detach()
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        E.evaluate_synset(X, Y, te, learning_rate=0.1)
    with pytest.raises(ValueError, match="lr"):
        E.evaluate_synset(X, Y, te, lr=-1.0)
    with pytest.raises(ValueError, match="loss"):
        E.evaluate_synset(X, Y, te, loss="hinge")
    with pytest.raises(ValueError, match="integer labels"):
        E.evaluate_synset(X, torch.rand(64, 10), te, loss="gce", epochs=1)
    with pytest.raises(ValueError, match="NaN"):
        E.evaluate_synset(torch.full_like(X, float("nan")), Y, te)
    with pytest.raises(ValueError, match="soft labels"):
        E.evaluate_synset(X, torch.rand(63, 10), te)
    with pytest.raises(ValueError, match="differ in shape"):
        E.evaluate_synset(X, Y, (torch.rand(5, 1, 9, 9), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="batch-norm"):
        E.evaluate_synset(X, Y, te, model_kwargs={**SMALL, "norm": "batch"}, vmap=True, num_runs=2, epochs=1)
    with pytest.raises(ValueError, match="weights"):
        E.evaluate_synset(X, Y, te, weights=torch.ones(3), epochs=1)
