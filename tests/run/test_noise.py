"""Tests of ddfast.noise: realised rates and transition matrices against binomial tolerances, pair flips
only along the mapping, reproducibility, errors."""
import math

import numpy as np
import pytest
import torch

from ddfast.noise import (ASYM_MAPPINGS, CIFAR100_SUPERCLASSES, NoiseSpec, corrupt_labels, estimate_noise_rate,
                          estimate_transition,
                          forward_corrected_cross_entropy, posterior_labels, posterior_probabilities, get_mapping,
                          pair_transition, parse_noise_spec,
                          symmetric_transition, transition_matrix)


def _labels(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n,), generator=g)


def _within_binomial(p_hat, p, n, z=5.0):
    return abs(p_hat - p) <= z * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_parse_specs_and_errors():
    assert parse_noise_spec("sym:0.4") == NoiseSpec("sym", 0.4)
    assert parse_noise_spec(" ASYM:0.2 ") == NoiseSpec("asym", 0.2)
    assert parse_noise_spec("none") == NoiseSpec("none")
    assert parse_noise_spec("human:worse_label") == NoiseSpec("human", 0.0, "worse_label")
    assert str(parse_noise_spec("idn:0.30")) == "idn:0.3"
    for bad, msg in (("sym:1.0", r"\[0, 1\)"), ("sym:-0.1", r"\[0, 1\)"), ("flip:0.2", "unknown noise kind"),
                     ("sym:abc", "not a number"), ("sym", "expected"), ("human:", "expected"), ("sym:nan", r"\[0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            parse_noise_spec(bad)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_symmetric_rate_and_transition(rate):
    C, N = 10, 60000
    y = _labels(N, C)
    nl = corrupt_labels(y, f"sym:{rate}", C, seed=1)
    assert _within_binomial(nl.rate, rate, N)
    assert torch.equal(nl.clean_mask, nl.labels == y)
    assert torch.equal(nl.clean_labels, y)
    counts = torch.bincount(y, minlength=C)
    T = nl.transition
    for i in range(C):
        n_i = int(counts[i])
        assert _within_binomial(float(T[i, i]), 1 - rate, n_i)
        for j in range(C):
            if j != i:
                assert _within_binomial(float(T[i, j]), rate / (C - 1), n_i)
    torch.testing.assert_close(nl.target_transition, symmetric_transition(C, rate))
    # chi-square goodness of fit of the off-diagonal flips (uniform over the other classes)
    from scipy.stats import chisquare

    flips = (~nl.clean_mask)
    off = ((nl.labels[flips] - y[flips]) % C).numpy()
    assert chisquare(np.bincount(off, minlength=C)[1:]).pvalue > 1e-4


def test_transition_matrix_matches_sklearn_confusion():
    from sklearn.metrics import confusion_matrix

    y = _labels(5000, 7, seed=3)
    nl = corrupt_labels(y, "sym:0.5", 7, seed=0)
    ref = confusion_matrix(y.numpy(), nl.labels.numpy(), labels=range(7), normalize="true")
    np.testing.assert_allclose(nl.transition.numpy(), ref)
    # absent classes -> zero rows
    T = transition_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 3)
    assert torch.equal(T[2], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name,C", [("fashion-mnist", 10), ("cifar10", 10), ("cifar100", 100), ("mnist", 10),
                                    ("cifar100-superclass", 100)])
def test_asymmetric_flips_only_along_mapping(name, C):
    rate = 0.4
    N = 40000 if C == 10 else 100000
    y = _labels(N, C, seed=5)
    nl = corrupt_labels(y, f"asym:{rate}", C, seed=2, mapping=name)
    mp = ASYM_MAPPINGS[name]
    changed = ~nl.clean_mask
    dst = torch.tensor([mp.get(c, c) for c in range(C)])
    assert torch.equal(nl.labels[changed], dst[y[changed]])  # every flip follows the mapping
    untouched = torch.tensor([c not in mp for c in range(C)])
    assert nl.clean_mask[untouched[y]].all()  # classes outside the mapping never change
    src = torch.tensor([c in mp for c in range(C)])[y]
    assert _within_binomial(float(changed[src].double().mean()), rate, int(src.sum()))
    for s in mp:
        n_s = int((y == s).sum())
        assert _within_binomial(float(nl.transition[s, mp[s]]), rate, n_s)
    expected_overall = rate * float(src.double().mean())
    assert _within_binomial(nl.rate, expected_overall, N)


def test_named_mappings_are_what_the_protocol_says():
    assert ASYM_MAPPINGS["cifar10"] == {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}
    fm = ASYM_MAPPINGS["fashion-mnist"]
    assert fm == {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5}  # T-shirt<->Shirt, Pullover<->Coat, Sandal<->Sneaker
    c100 = ASYM_MAPPINGS["cifar100"]
    assert len(c100) == 100 and all(c100[c] // 5 == c // 5 for c in range(100))
    assert c100[4] == 0 and c100[0] == 1  # cyclic within the block
    sup = ASYM_MAPPINGS["cifar100-superclass"]
    assert len(CIFAR100_SUPERCLASSES) == 100 and np.bincount(CIFAR100_SUPERCLASSES).tolist() == [5] * 20
    assert all(CIFAR100_SUPERCLASSES[c] == CIFAR100_SUPERCLASSES[sup[c]] for c in range(100))
    # one 5-cycle per superclass: following the mapping 5 times returns to the start
    for c in range(100):
        d = c
        for _ in range(5):
            d = sup[d]
        assert d == c and sup[c] != c
    # known facts: fine 0 'apple' and 83 'sweet_pepper' are fruit_and_vegetables (coarse 4); 'baby' (2) is people (14)
    assert CIFAR100_SUPERCLASSES[0] == 4 and CIFAR100_SUPERCLASSES[83] == 4 and CIFAR100_SUPERCLASSES[2] == 14


def test_user_mapping_and_mapping_errors():
    y = _labels(2000, 4)
    nl = corrupt_labels(y, "asym:0.5", 4, mapping={1: 3})
    assert set(torch.unique(nl.labels[~nl.clean_mask]).tolist()) == {3}
    nl2 = corrupt_labels(y, "asym:0.5", 4, mapping=[(1, 3)])
    assert torch.equal(nl.labels, nl2.labels)
    with pytest.raises(ValueError, match="unknown class"):
        corrupt_labels(y, "asym:0.2", 4, mapping={1: 7})
    with pytest.raises(ValueError, match="itself"):
        get_mapping({2: 2}, 4)
    with pytest.raises(ValueError, match="needs mapping"):
        corrupt_labels(y, "asym:0.2", 4)
    with pytest.raises(ValueError, match="unknown name"):
        get_mapping("imagenet", 10)
    assert get_mapping(None, 100) == ASYM_MAPPINGS["cifar100"]


def test_seeds_reproduce_and_differ():
    y = _labels(5000, 10)
    imgs = torch.rand(5000, 1, 4, 4)
    for spec in ("sym:0.3", "asym:0.3", "idn:0.3"):
        a = corrupt_labels(y, spec, 10, seed=7, images=imgs, mapping="cifar10")
        b = corrupt_labels(y, spec, 10, seed=7, images=imgs, mapping="cifar10")
        c = corrupt_labels(y, spec, 10, seed=8, images=imgs, mapping="cifar10")
        assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(corrupt_labels(y, "sym:0.3", 10, seed=g1).labels, corrupt_labels(y, "sym:0.3", 10, seed=g2).labels)


def test_instance_dependent_noise():
    N, C = 20000, 10
    y = _labels(N, C, seed=11)
    imgs = torch.rand(N, 1, 6, 6)
    nl = corrupt_labels(y, "idn:0.4", C, seed=0, images=imgs)
    # E[q] of N(0.4, 0.1) truncated to [0, 1] is 0.4 (symmetric truncation far away): realised rate ~ 0.4
    assert abs(nl.rate - 0.4) < 0.02
    assert nl.target_transition is None
    # depends on the images: other images, same seed -> other labels
    other = corrupt_labels(y, "idn:0.4", C, seed=0, images=torch.rand(N, 1, 6, 6))
    assert not torch.equal(nl.labels, other.labels)
    # instance dependence: flips of a class concentrate on few targets (softmax of a random projection)
    row = nl.transition[0].clone()
    row[0] = 0
    assert float(row.max()) > 1.5 * float(row.sum()) / (C - 1)
    with pytest.raises(ValueError, match="images"):
        corrupt_labels(y, "idn:0.4", C)
    with pytest.raises(ValueError, match="first dimension"):
        corrupt_labels(y, "idn:0.4", C, images=torch.rand(5, 2))


def test_none_zero_rate_and_label_errors():
    y = _labels(100, 5)
    for spec in ("none", "sym:0", "asym:0.0"):
        nl = corrupt_labels(y, spec, 5, mapping={0: 1})
        assert torch.equal(nl.labels, y) and nl.rate == 0.0 and nl.clean_mask.all()
    assert corrupt_labels([0, 1, 2], "sym:0.5", 3).labels.dtype == torch.int64
    with pytest.raises(ValueError, match="lie in"):
        corrupt_labels(torch.tensor([0, 5]), "sym:0.1", 5)
    with pytest.raises(ValueError, match="integers"):
        corrupt_labels(torch.tensor([0.0, 1.0]), "sym:0.1", 5)
    with pytest.raises(ValueError, match="num_classes"):
        corrupt_labels(torch.tensor([0, 1]), "sym:0.1", 1)
    with pytest.raises(ValueError, match="entries"):
        corrupt_labels(y, "human:worse", 5, human_labels=torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# forward loss correction (Patrini et al., CVPR 2017) and the anchor estimate of T
# --------------------------------------------------------------------------------------------------------
def _slow_forward_nll(logits, y, T):
    """float64 loop: -log sum_k softmax(z)_k T[k, y]."""
    out = []
    for i in range(logits.shape[0]):
        z = logits[i].double()
        p = torch.exp(z - z.max())
        p = p / p.sum()
        out.append(-math.log(sum(float(p[k]) * float(T[k, y[i]]) for k in range(z.numel()))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_corrected_cross_entropy_against_a_loop(dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(17, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (17,), generator=g)
    T = torch.rand(5, 5, generator=g, dtype=torch.float64) + torch.eye(5, dtype=torch.float64) * 3
    T = T / T.sum(1, keepdim=True)
    got = forward_corrected_cross_entropy(z.to(dtype), y, T, reduction="none")
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), _slow_forward_nll(z, y, T), rtol=tol, atol=tol)
    torch.testing.assert_close(forward_corrected_cross_entropy(z.to(dtype), y, T).double(), got.double().mean(),
                               rtol=tol, atol=tol)
    # the identity transition is the plain cross-entropy, values and gradients
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    la = forward_corrected_cross_entropy(a, y, torch.eye(5, dtype=torch.float64))
    lb = torch.nn.functional.cross_entropy(b, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="transition"):
        forward_corrected_cross_entropy(z, y, T[:4])
    with pytest.raises(ValueError, match="reduction"):
        forward_corrected_cross_entropy(z, y, T, reduction="max")


@pytest.mark.parametrize("T_of", [lambda: symmetric_transition(4, 0.5), lambda: pair_transition(4, 0.4, {0: 1, 2: 3})])
def test_forward_correction_recovers_the_clean_posterior(T_of):
    """Theorem 2 of Patrini et al.: the minimiser of the expected corrected loss under noisy labels drawn with T
    is the clean class posterior (here: one input of clean class c, its noisy-label distribution T[c])."""
    T = T_of()
    for c in range(4):
        z = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], lr=1, max_iter=200, line_search_fn="strong_wolfe")
        noisy = T[c]  # the expected loss: sum_j T[c, j] * loss(z, j)

        def closure():
            opt.zero_grad()
            loss = sum(noisy[j] * forward_corrected_cross_entropy(z, torch.tensor([j]), T) for j in range(4))
            loss.backward()
            return loss

        opt.step(closure)
        p = torch.softmax(z.detach(), 1)[0]
        assert int(p.argmax()) == c and float(p[c]) > 0.98, (c, p)


def test_estimate_transition_with_exact_predictions_is_the_realised_matrix():
    clean = _labels(4000, 6, seed=3)
    nl = corrupt_labels(clean, "sym:0.3", 6, seed=1)
    # a classifier that predicts the clean class, with confidences that ignore the given label
    conf = 0.5 + 0.5 * torch.rand(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probs = torch.full((4000, 6), 0.0, dtype=torch.float64)
    probs += ((1 - conf) / 5).unsqueeze(1)
    probs[torch.arange(4000), clean] = conf
    T = estimate_transition(probs, nl.labels, 6, quantile=1.0)
    torch.testing.assert_close(T, transition_matrix(clean, nl.labels, 6), rtol=0, atol=1e-12)
    # a quantile keeps the most confident anchors; confidences independent of the noise keep the estimate close
    Tq = estimate_transition(probs, nl.labels, 6, quantile=0.3)
    assert torch.allclose(Tq.sum(1), torch.ones(6, dtype=torch.float64))
    assert float((Tq - symmetric_transition(6, 0.3)).abs().max()) < 0.06
    # slow reference for the quantile: per predicted class, the top ceil(q * n_i) by confidence
    for i in range(6):
        idx = [k for k in range(4000) if int(clean[k]) == i]
        idx.sort(key=lambda k: -float(conf[k]))
        top = idx[:math.ceil(0.3 * len(idx))]
        row = np.bincount(nl.labels[top].numpy(), minlength=6) / len(top)
        np.testing.assert_allclose(Tq[i].numpy(), row, atol=1e-12)


def test_estimate_transition_edge_cases_and_errors():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]], dtype=torch.float64)
    T = estimate_transition(probs, torch.tensor([0, 1, 1]), 3, quantile=1.0)
    # class 2 is never predicted: identity row
    torch.testing.assert_close(T, torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                                               dtype=torch.float64))
    with pytest.raises(ValueError, match="probs"):
        estimate_transition(probs[:, :2], torch.tensor([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="quantile"):
        estimate_transition(probs, torch.tensor([0, 1, 1]), 3, quantile=0.0)
    with pytest.raises(ValueError):
        estimate_transition(probs, torch.tensor([0, 1, 3]), 3)


@pytest.mark.parametrize("spec", ["sym:0.3", "asym:0.4", "idn:0.4"])
def test_estimate_noise_rate_of_the_realised_transition_is_the_realised_rate(spec):
    clean = _labels(3000, 10, seed=5)
    kw = {"mapping": "fashion-mnist"} if spec.startswith("asym") else {}
    if spec.startswith("idn"):
        kw["images"] = torch.rand(3000, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    nl = corrupt_labels(clean, spec, 10, seed=2, **kw)
    T = transition_matrix(clean, nl.labels, 10)
    prior = torch.bincount(clean, minlength=10).double() / 3000
    realised = float((nl.labels != clean).double().mean())
    assert estimate_noise_rate(T, prior) == pytest.approx(realised, abs=1e-12)
    # slow reference: sum over samples of P(label kept | class)
    kept = sum(float(T[int(c), int(c)]) for c in clean) / 3000
    assert estimate_noise_rate(T, prior) == pytest.approx(1.0 - kept, abs=1e-9)


def test_estimate_noise_rate_uniform_prior_and_errors():
    assert estimate_noise_rate(symmetric_transition(6, 0.3)) == pytest.approx(0.3, abs=1e-12)
    assert estimate_noise_rate(torch.eye(4)) == 0.0
    with pytest.raises(ValueError, match="transition"):
        estimate_noise_rate(torch.ones(3, 4) / 4)
    with pytest.raises(ValueError, match="prior"):
        estimate_noise_rate(torch.eye(3), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="prior"):
        estimate_noise_rate(torch.eye(3), torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="prior"):
        estimate_noise_rate(torch.eye(3), torch.tensor([1.2, -0.1, -0.1]))


def _slow_posterior(p, y, T):
    """argmax_j of the normalised posterior P(true j | x, given y) = p_j T[j, y] / sum_k p_k T[k, y], one sample
    at a time in Python floats."""
    out = []
    for i in range(y.numel()):
        w = [float(p[i, j]) * float(T[j, int(y[i])]) for j in range(p.shape[1])]
        z = sum(w)
        post = [v / z for v in w]
        out.append(max(range(len(post)), key=lambda j: post[j]))
    return torch.tensor(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_labels_against_a_loop(dtype):
    g = torch.Generator().manual_seed(0)
    C = 5
    p = torch.softmax(torch.randn(300, C, generator=g, dtype=torch.float64) * 2, 1)
    y = torch.randint(0, C, (300,), generator=g)
    T = torch.rand(C, C, generator=g, dtype=torch.float64) + torch.eye(C, dtype=torch.float64) * 2
    T = T / T.sum(1, keepdim=True)
    got = posterior_labels(p.to(dtype), y, T)
    assert got.dtype == torch.int64 and got.shape == (300,)
    assert torch.equal(got, _slow_posterior(p, y, T))
    assert 0 < int((got != y).sum()) < 300
    # no noise: every given label stands
    assert torch.equal(posterior_labels(p, y, torch.eye(C, dtype=torch.float64)), y)


def test_posterior_labels_resolve_pair_flips_and_respect_the_symmetric_threshold():
    T = pair_transition(4, 0.4, {0: 1})  # 40 % of class 0 labelled 1
    p = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # looks like 0, labelled 1: a flipped 0
                      [0.2, 0.8, 0.0, 0.0],   # looks like 1, labelled 1: stays
                      [0.1, 0.9, 0.0, 0.0]], dtype=torch.float64)  # labelled 0: class 1 is never flipped to 0
    assert posterior_labels(p, torch.tensor([1, 1, 0]), T).tolist() == [0, 1, 0]
    # symmetric noise, r = 0.4, C = 5: the label moves only when p_j / p_y > (1 - r) (C - 1) / r = 6
    S = symmetric_transition(5, 0.4)
    for ratio, moves in ((5.9, False), (6.1, True)):
        q = torch.tensor([[ratio, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        assert posterior_labels(q / q.sum(), torch.tensor([1]), S).item() == (0 if moves else 1)


def test_balanced_posterior_keeps_the_class_shares_and_moves_the_strongest_evidence():
    """Two swapped classes a classifier cannot tell apart, its probabilities tilted towards class 1: the plain
    posterior moves every sample labelled 0 into class 1; balanced to the given shares, each class keeps half,
    and the samples moved to class 0 are those with the largest p_0 / p_1."""
    g = torch.Generator().manual_seed(0)
    n = 400
    T = pair_transition(2, 0.4, {0: 1, 1: 0})
    p0 = 0.25 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)  # p_0 in [0.25, 0.35]: 0.6 p_0 < 0.4 p_1
    p = torch.stack([p0, 1 - p0], 1)
    y = torch.arange(n) % 2
    plain = posterior_labels(p, y, T)
    assert int((plain == 0).sum()) == 0
    shares = torch.tensor([0.5, 0.5], dtype=torch.float64)
    bal = posterior_labels(p, y, T, class_prior=shares)
    assert abs(int((bal == 0).sum()) - n // 2) <= 4
    # within each given label, class 0 goes to the samples with the strongest evidence for it
    for lab in (0, 1):
        idx = torch.nonzero(y == lab).flatten()
        moved = bal[idx] == 0
        if bool(moved.any()) and bool((~moved).any()):
            assert float(p0[idx][moved].min()) >= float(p0[idx][~moved].max())
    # shares the plain posterior already meets are left alone
    q = torch.softmax(torch.randn(300, 3, generator=g, dtype=torch.float64) * 4, 1)
    yy = q.argmax(1)
    eye = torch.eye(3, dtype=torch.float64)
    sh = torch.bincount(yy, minlength=3).double() / 300
    assert torch.equal(posterior_labels(q, yy, eye, class_prior=sh), yy)


def test_posterior_labels_errors():
    p = torch.full((4, 3), 1 / 3)
    T = torch.eye(3)
    with pytest.raises(ValueError, match="transition"):
        posterior_labels(p, torch.tensor([0, 1, 2, 0]), torch.eye(4))
    with pytest.raises(ValueError, match="like labels"):
        posterior_labels(p, torch.tensor([0, 1, 2]), T)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        posterior_labels(p, torch.tensor([0, 1, 2, 3]), T)
    with pytest.raises(ValueError, match="probs"):
        posterior_labels(torch.ones(4), torch.tensor([0, 1, 2, 0]), T)
    y = torch.tensor([0, 1, 2, 0])
    for bad in (torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.6, -0.1]), torch.tensor([0.2, 0.2, 0.2])):
        with pytest.raises(ValueError, match="class_prior"):
            posterior_labels(p, y, T, class_prior=bad)
    with pytest.raises(ValueError, match="iterations"):
        posterior_labels(p, y, T, class_prior=torch.full((3,), 1 / 3), iterations=0)


@pytest.mark.parametrize("balanced", [False, True])
def test_posterior_probabilities_against_a_loop(balanced):
    """Without balancing: the normalised Bayes posterior of every sample (a Python loop); with it: rows still
    distributions, column sums at N times the class prior, argmax = posterior_labels either way."""
    g = torch.Generator().manual_seed(1)
    C, n = 4, 200
    p = torch.softmax(torch.randn(n, C, generator=g, dtype=torch.float64) * 2, 1)
    y = torch.randint(0, C, (n,), generator=g)
    T = torch.rand(C, C, generator=g, dtype=torch.float64) + torch.eye(C, dtype=torch.float64) * 2
    T = T / T.sum(1, keepdim=True)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) if balanced else None
    q = posterior_probabilities(p.float(), y, T, class_prior=prior)
    assert q.dtype == torch.float64 and q.shape == (n, C)
    torch.testing.assert_close(q.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q.argmax(1), posterior_labels(p.float(), y, T, class_prior=prior))
    if not balanced:
        for i in range(0, n, 17):
            w = [float(p[i, j].float()) * float(T[j, int(y[i])]) for j in range(C)]
            assert q[i].tolist() == pytest.approx([v / sum(w) for v in w], rel=1e-6)
    else:
        torch.testing.assert_close(q.sum(0), n * prior, rtol=1e-6, atol=1e-6)
