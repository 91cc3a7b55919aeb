"""Synthetic and human label noise (the protocol of Cheng et al., arXiv 2411.11924,
``Kciiiman/DD_LNL``; Fashion-MNIST choices documented below).

Specs (``parse_noise_spec``):

- ``none`` -- labels unchanged.
- ``sym:R`` -- symmetric noise: every label independently moves with probability R to one of the other
  C-1 classes, uniformly; transition matrix ``T = (1-R) I + R/(C-1) (11^T - I)`` (Patrini et al. CVPR 2017;
  the DD_LNL protocol: R is the fraction moved to a *different* class).
- ``asym:R`` -- asymmetric pair flips: a sample of class ``s`` in ``mapping`` moves to ``mapping[s]`` with
  probability R; classes outside the mapping are untouched. Named mappings (:data:`ASYM_MAPPINGS`):
  ``cifar10`` (truck->automobile, bird->airplane, cat<->dog, deer->horse; Patrini et al. 2017),
  ``cifar100`` (each fine class to the next one, cyclically, inside consecutive blocks of 5 class indices --
  the ``build_for_cifar100`` convention of the noisy-label literature's common code, which the DD_LNL protocol
  calls "superclass" noise), ``cifar100-superclass`` (the same cycle inside CIFAR-100's true 20
  superclasses), ``fashion-mnist`` (ddfast's default pairs, both directions: T-shirt/top<->Shirt,
  Pullover<->Coat, Sandal<->Sneaker), ``mnist``/``digits`` (2->7, 3->8, 5<->6, 7->1; Patrini et al. 2017).
- ``idn:R`` -- instance-dependent noise (Xia et al., NeurIPS 2020, "Part-dependent label noise", Alg. 2):
  per-sample flip rate ``q_i ~ N(R, 0.1^2)`` truncated to [0, 1]; ``W ~ N(0, 1)`` of shape ``[C, D, C]``;
  ``p = x_i W[y_i]``, ``p[y_i] = -inf``, ``p = q_i softmax(p)``, ``p[y_i] = 1 - q_i``; the new label is drawn
  from p. Needs ``images`` (flattened to D features, used as given).
- ``human:KEY`` -- CIFAR-10N / CIFAR-100N human labels (Wei et al., ICLR 2022), e.g. ``human:worse``,
  ``human:aggre``, ``human:random1``, ``human:noisy`` (see :func:`ddfast.data.load_human_labels`).

All randomness comes from a ``torch.Generator`` seeded with ``seed``: same inputs and seed -> same labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "NoiseSpec",
    "NoisyLabels",
    "parse_noise_spec",
    "corrupt_labels",
    "transition_matrix",
    "estimate_transition",
    "posterior_probabilities",
    "estimate_noise_rate",
    "posterior_labels",
    "forward_corrected_cross_entropy",
    "symmetric_transition",
    "pair_transition",
    "get_mapping",
    "ASYM_MAPPINGS",
    "CIFAR100_SUPERCLASSES",
]

_KINDS = ("none", "sym", "asym", "idn", "human")


@dataclass(frozen=True)
class NoiseSpec:
    """A parsed noise spec: ``kind`` in {none, sym, asym, idn, human}, ``rate`` (0 for none/human),
    ``key`` (human-label key, else None)."""

    kind: str
    rate: float = 0.0
    key: Optional[str] = None

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "human":
            return f"human:{self.key}"
        return f"{self.kind}:{self.rate:g}"


def parse_noise_spec(spec: Union[str, NoiseSpec]) -> NoiseSpec:
    """Parses ``"none"``, ``"sym:0.4"``, ``"asym:0.4"``, ``"idn:0.2"``, ``"human:worse"``.

    Raises:
        ValueError: unknown kind, missing/non-numeric rate, rate outside [0, 1), missing human key.
    """
    if isinstance(spec, NoiseSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in ("none", "clean", ""):
        return NoiseSpec("none")
    kind, sep, arg = s.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"spec {spec!r}: unknown noise kind {kind!r}; choose one of {_KINDS}")
    if kind == "none":
        return NoiseSpec("none")
    if not sep or not arg:
        raise ValueError(f"spec {spec!r}: expected '{kind}:{'KEY' if kind == 'human' else 'RATE'}'")
    if kind == "human":
        return NoiseSpec("human", 0.0, spec.strip().partition(":")[2].strip())
    try:
        rate = float(arg)
    except ValueError:
        raise ValueError(f"spec {spec!r}: rate {arg!r} is not a number") from None
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"spec {spec!r}: rate must lie in [0, 1), got {rate}")
    return NoiseSpec(kind, rate)


@dataclass
class NoisyLabels:
    """The result of :func:`corrupt_labels`.

    Attributes:
        labels: ``int64 [N]`` noisy labels.
        clean_mask: ``bool [N]``, True where the noisy label equals the clean one.
        transition: ``float64 [C, C]`` realised transition matrix, ``T[i, j]`` = fraction of the samples of
            clean class i that now carry label j (rows of classes absent from the input are all zero).
        spec: the normalised spec string.
        rate: realised noise rate = fraction of samples whose label changed.
        clean_labels: ``int64 [N]`` the input labels.
        target_transition: ``float64 [C, C]`` the intended transition matrix (sym/asym/none), else None.
    """

    labels: torch.Tensor
    clean_mask: torch.Tensor
    transition: torch.Tensor
    spec: str
    rate: float
    clean_labels: Optional[torch.Tensor] = None
    target_transition: Optional[torch.Tensor] = None

    def summary(self) -> Dict[str, object]:
        """JSON-friendly summary (spec, realised rate, number of samples)."""
        return {"spec": self.spec, "rate": float(self.rate), "n": int(self.labels.numel())}


# --------------------------------------------------------------------------------------------------------
# mappings
# --------------------------------------------------------------------------------------------------------

# CIFAR-100's 20 superclasses (Krizhevsky 2009, Table 3), fine class names as in the dataset's meta file
_SUPER = [
    ("aquatic_mammals", ["beaver", "dolphin", "otter", "seal", "whale"]),
    ("fish", ["aquarium_fish", "flatfish", "ray", "shark", "trout"]),
    ("flowers", ["orchid", "poppy", "rose", "sunflower", "tulip"]),
    ("food_containers", ["bottle", "bowl", "can", "cup", "plate"]),
    ("fruit_and_vegetables", ["apple", "mushroom", "orange", "pear", "sweet_pepper"]),
    ("household_electrical_devices", ["clock", "keyboard", "lamp", "telephone", "television"]),
    ("household_furniture", ["bed", "chair", "couch", "table", "wardrobe"]),
    ("insects", ["bee", "beetle", "butterfly", "caterpillar", "cockroach"]),
    ("large_carnivores", ["bear", "leopard", "lion", "tiger", "wolf"]),
    ("large_man-made_outdoor_things", ["bridge", "castle", "house", "road", "skyscraper"]),
    ("large_natural_outdoor_scenes", ["cloud", "forest", "mountain", "plain", "sea"]),
    ("large_omnivores_and_herbivores", ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"]),
    ("medium_mammals", ["fox", "porcupine", "possum", "raccoon", "skunk"]),
    ("non-insect_invertebrates", ["crab", "lobster", "snail", "spider", "worm"]),
    ("people", ["baby", "boy", "girl", "man", "woman"]),
    ("reptiles", ["crocodile", "dinosaur", "lizard", "snake", "turtle"]),
    ("small_mammals", ["hamster", "mouse", "rabbit", "shrew", "squirrel"]),
    ("trees", ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"]),
    ("vehicles_1", ["bicycle", "bus", "motorcycle", "pickup_truck", "train"]),
    ("vehicles_2", ["lawn_mower", "rocket", "streetcar", "tank", "tractor"]),
]
_FINE = sorted(n for _, names in _SUPER for n in names)  # CIFAR-100 fine labels are alphabetical
#: fine class index -> superclass index (CIFAR-100 "coarse_labels")
CIFAR100_SUPERCLASSES: Tuple[int, ...] = tuple(
    next(i for i, (_, names) in enumerate(_SUPER) if fine in names) for fine in _FINE)


def _cycle(groups: Sequence[Sequence[int]]) -> Dict[int, int]:
    out = {}
    for g in groups:
        for a, b in zip(g, list(g[1:]) + [g[0]]):
            out[int(a)] = int(b)
    return out


ASYM_MAPPINGS: Dict[str, Dict[int, int]] = {
    "cifar10": {9: 1, 2: 0, 3: 5, 5: 3, 4: 7},
    "cifar100": _cycle([list(range(5 * i, 5 * i + 5)) for i in range(20)]),
    "cifar100-superclass": _cycle([[_FINE.index(n) for n in names] for _, names in _SUPER]),
    "fashion-mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5},
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
}
_MAP_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion_mnist": "fashion-mnist",
                "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
                "cifar100_superclass": "cifar100-superclass"}


def get_mapping(mapping, num_classes: int) -> Dict[int, int]:
    """Resolves an asymmetric mapping: a name in :data:`ASYM_MAPPINGS`, a dict ``{src: dst}``, a sequence of
    ``(src, dst)`` pairs, or None (only unambiguous for 100 classes -> ``"cifar100"``).

    Raises:
        ValueError: unknown name, a class outside ``[0, num_classes)``, ``src == dst``, duplicate sources,
            or None with a class count that has several conventions.
    """
    if mapping is None:
        if num_classes == 100:
            mapping = "cifar100"
        else:
            raise ValueError(f"mapping: asymmetric noise on {num_classes} classes needs mapping= (one of "
                             f"{sorted(ASYM_MAPPINGS)} or a dict {{src: dst}})")
    if isinstance(mapping, str):
        key = _MAP_ALIASES.get(mapping.lower(), mapping.lower())
        if key not in ASYM_MAPPINGS:
            raise ValueError(f"mapping: unknown name {mapping!r}; choose one of {sorted(ASYM_MAPPINGS)}")
        mapping = ASYM_MAPPINGS[key]
    if isinstance(mapping, Mapping):
        pairs = list(mapping.items())
    else:
        try:
            pairs = [tuple(p) for p in mapping]
        except TypeError:
            raise ValueError(f"mapping must be a name, a dict or (src, dst) pairs, got {type(mapping).__name__}") from None
    out: Dict[int, int] = {}
    for p in pairs:
        if len(p) != 2:
            raise ValueError(f"mapping: bad pair {p!r}")
        s, d = p
        if isinstance(s, bool) or isinstance(d, bool) or int(s) != s or int(d) != d:
            raise ValueError(f"mapping: classes must be ints, got {p!r}")
        s, d = int(s), int(d)
        if not (0 <= s < num_classes and 0 <= d < num_classes):
            raise ValueError(f"mapping: {s}->{d} refers to an unknown class (num_classes={num_classes})")
        if s == d:
            raise ValueError(f"mapping: {s}->{d} maps a class to itself")
        if s in out:
            raise ValueError(f"mapping: class {s} has two targets")
        out[s] = d
    if not out:
        raise ValueError("mapping is empty")
    return out


def symmetric_transition(num_classes: int, rate: float) -> torch.Tensor:
    """``float64 [C, C]``: diagonal ``1 - rate``, off-diagonal ``rate / (C - 1)``."""
    C = int(num_classes)
    T = torch.full((C, C), rate / (C - 1), dtype=torch.float64)
    T.fill_diagonal_(1.0 - rate)
    return T


def pair_transition(num_classes: int, rate: float, mapping: Dict[int, int]) -> torch.Tensor:
    """``float64 [C, C]``: identity except ``T[s, s] = 1 - rate``, ``T[s, mapping[s]] = rate``."""
    T = torch.eye(int(num_classes), dtype=torch.float64)
    for s, d in mapping.items():
        T[s, s] = 1.0 - rate
        T[s, d] = rate
    return T


def transition_matrix(clean: torch.Tensor, noisy: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Realised ``float64 [C, C]``: ``T[i, j] = #{clean=i, noisy=j} / #{clean=i}`` (zero rows for absent i)."""
    C = int(num_classes)
    counts = torch.bincount(clean.long() * C + noisy.long(), minlength=C * C).reshape(C, C).double()
    n = counts.sum(1, keepdim=True)
    return torch.where(n > 0, counts / n.clamp_min(1), torch.zeros_like(counts))


def estimate_transition(probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        quantile: float = 0.5) -> torch.Tensor:
    """Estimates the noise transition ``T[i, j] = P(given label j | true class i)`` from a classifier's
    predictions, without clean labels: the anchor-point estimator of Patrini et al. (CVPR 2017, "Making deep
    neural networks robust to label noise: a loss correction approach"), with a group of anchors per
    class instead of one. Class ``i``'s anchors are the samples the classifier assigns to ``i`` most
    confidently -- the top ``quantile`` of those it predicts as ``i``, by probability -- and row ``i`` is the
    distribution of their given labels. A class the classifier never predicts gets the identity row.

    Args:
        probs: ``float [N, C]`` class probabilities (rows sum to 1), e.g. a softmax of a network trained on
            the noisy labels and refined on a trusted set (:mod:`ddfast.tad`).
        labels: ``int64 [N]`` given (noisy) labels in ``[0, C)``.
        num_classes: C.
        quantile: share in (0, 1] of each predicted class used as its anchors. Default 0.5.

    Returns:
        ``float64 [C, C]``, rows summing to 1.

    Raises:
        ValueError: shapes that do not match, labels outside ``[0, C)``, ``quantile`` outside (0, 1].
    """
    y = _check_labels(labels, num_classes)
    C = int(num_classes)
    if probs.dim() != 2 or probs.shape != (y.shape[0], C):
        raise ValueError(f"probs must be [{y.shape[0]}, {C}], got {tuple(probs.shape)}")
    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    p = probs.detach().double().cpu()
    conf, pred = p.max(1)
    T = torch.eye(C, dtype=torch.float64)
    for i in range(C):
        idx = torch.nonzero(pred == i).flatten()
        if idx.numel() == 0:
            continue
        k = max(1, int(math.ceil(float(quantile) * idx.numel())))
        top = idx[torch.topk(conf[idx], k).indices]
        T[i] = torch.bincount(y[top], minlength=C).double() / k
    return T


def estimate_noise_rate(transition: torch.Tensor, prior: Optional[torch.Tensor] = None) -> float:
    """The share of wrong labels implied by a noise transition: ``rho = 1 - sum_i prior_i T[i, i]``, the
    probability that a sample's given label is not its true class (Patrini et al., CVPR 2017, Sec. 2: the noisy
    label distribution is ``prior @ T``). With :func:`estimate_transition`'s ``T`` and the classifier's predicted
    class shares as ``prior``, no clean label is needed; with the realised :func:`transition_matrix` and the
    true class shares it is exactly the realised noise rate.

    Args:
        transition: ``float [C, C]``, rows summing to 1.
        prior: ``float [C]`` true-class shares summing to 1; None = uniform.

    Returns: rho in [0, 1] (a Python float).

    Raises:
        ValueError: ``transition`` not square, or ``prior`` of another length, negative or not summing to 1.
    """
    T = torch.as_tensor(transition).detach().double().cpu()
    if T.dim() != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"transition must be [C, C], got {tuple(T.shape)}")
    C = T.shape[0]
    if prior is None:
        p = torch.full((C,), 1.0 / C, dtype=torch.float64)
    else:
        p = torch.as_tensor(prior).detach().double().cpu()
        if p.shape != (C,) or bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
            raise ValueError(f"prior must be [{C}] non-negative shares summing to 1, got shape {tuple(p.shape)}, "
                             f"sum {float(p.sum()) if p.numel() else 0.0:.6g}")
    return float(min(1.0, max(0.0, 1.0 - float((p * T.diagonal()).sum()))))


def posterior_probabilities(probs: torch.Tensor, labels: torch.Tensor, transition: torch.Tensor,
                            class_prior: Optional[torch.Tensor] = None, iterations: int = 50) -> torch.Tensor:
    """The distribution of every sample's true class given its image and its given label, by Bayes' rule under a
    class-conditional noise transition: ``P(true j | x, given y~) = p_j(x) T[j, y~] / sum_k p_k(x) T[k, y~]``, with a
    classifier's probabilities ``p(x)`` standing in for ``P(true j | x)`` (the latent-true-label posterior of
    Xiao et al., CVPR 2015, "Learning from massive noisy labeled data for image classification", Sec. 3, with the
    noise independent of the image given the true class). Its argmax (:func:`posterior_labels`) changes a label
    only when the classifier's preference for another class outweighs how rarely that class is flipped into the given one: under pair flips
    (asymmetric noise) the flipped pairs are resolved by the image; under symmetric noise of rate r over C classes
    a label moves to class j only when ``p_j / p_y~ > (1 - r) (C - 1) / r``.

    A classifier trained on the noisy labels that cannot tell two swapped classes apart tilts slightly towards
    one of them, and the argmax then moves most of the other class into it (measured on Fashion-MNIST under pair
    swaps: 89 % of the T-shirts became Shirts). With ``class_prior`` the posterior is class-balanced: per-class
    weights ``w`` are fitted (``iterations`` Sinkhorn-Knopp rescalings, as for the equipartitioned pseudo-labels
    of Asano et al., ICLR 2020, "Self-labelling via simultaneous clustering and representation learning") so that the normalised posteriors ``p_j T[j, y~] w_j`` of all samples sum to
    ``N * class_prior_j`` per class. The argmax then keeps each class at about its share, and within a
    pair the samples with the strongest evidence move.

    Args:
        probs: ``float [N, C]`` class probabilities (rows sum to 1), e.g. the softmax of TAD's scorer.
        labels: ``int64 [N]`` given (noisy) labels in ``[0, C)``.
        transition: ``float [C, C]`` ``T[i, j] = P(given label j | true class i)``, rows summing to 1
            (:func:`estimate_transition` without clean labels).
        class_prior: optional ``float [C]`` true-class shares (non-negative, summing to 1) the labels should
            keep, e.g. the given labels' shares (class-conditional noise that swaps classes of equal size keeps
            them). None = no balancing.
        iterations: rescalings of the balancing (>= 1).

    Returns:
        ``float64 [N, C]`` on the CPU, rows summing to 1 (with ``class_prior``: the balanced posteriors
        ``p_j T[j, y~] w_j``, normalised). Its argmax is :func:`posterior_labels`; as a soft target of a
        cross-entropy it is the expected clean-label loss under the model (``E[-log s_true] = -sum_j q_j log s_j``).

    Raises:
        ValueError: shapes that do not match, labels outside ``[0, C)``, a ``class_prior`` that is not ``C``
            non-negative shares summing to 1, ``iterations < 1``.
    """
    C = int(probs.shape[1]) if probs.dim() == 2 else -1
    if C < 1:
        raise ValueError(f"probs must be [N, C], got {tuple(probs.shape)}")
    y = _check_labels(labels, C)
    if probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [{y.shape[0]}, C] like labels, got {tuple(probs.shape)}")
    T = torch.as_tensor(transition).detach().double().cpu()
    if T.shape != (C, C):
        raise ValueError(f"transition must be [{C}, {C}] like probs' classes, got {tuple(T.shape)}")
    post = probs.detach().double().cpu() * T[:, y].T
    if class_prior is None:
        return post / post.sum(1, keepdim=True).clamp_min(1e-300)
    pi = torch.as_tensor(class_prior).detach().double().cpu()
    if pi.shape != (C,) or bool((pi < 0).any()) or abs(float(pi.sum()) - 1.0) > 1e-6:
        raise ValueError(f"class_prior must be [{C}] non-negative shares summing to 1, got shape "
                         f"{tuple(pi.shape)}")
    if int(iterations) < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    post = post / post.sum(1, keepdim=True).clamp_min(1e-300)
    target = pi * post.shape[0]
    w = torch.ones(C, dtype=torch.float64)
    for _ in range(int(iterations)):
        q = post * w
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
        w = w * target / q.sum(0).clamp_min(1e-300)
    q = post * w
    return q / q.sum(1, keepdim=True).clamp_min(1e-300)


def posterior_labels(probs: torch.Tensor, labels: torch.Tensor, transition: torch.Tensor,
                     class_prior: Optional[torch.Tensor] = None, iterations: int = 50) -> torch.Tensor:
    """The most probable true class of every sample given its image and its given label:
    ``argmax_j P(true j | x, given y~) = argmax_j p_j(x) T[j, y~]`` (class-balanced with ``class_prior``), the
    argmax of :func:`posterior_probabilities` (same arguments, same errors).

    Returns:
        ``int64 [N]`` on the CPU; ties go to the lowest class index (``torch.argmax``).
    """
    return posterior_probabilities(probs, labels, transition, class_prior, iterations).argmax(1)


def forward_corrected_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, transition: torch.Tensor,
                                    reduction: str = "mean") -> torch.Tensor:
    """Forward loss correction (Patrini et al., CVPR 2017, Theorem 2): the cross-entropy of the *noisy*
    targets under the model's clean-class posterior pushed through the noise,
    ``-log (softmax(logits) @ T)[y]``. Minimising it on noisy labels drawn with ``T`` gives the same minimiser
    as the plain cross-entropy on clean labels, so a network trained with it learns the clean posterior.

    Args:
        logits: ``float [B, C]``; targets: ``int64 [B]`` noisy labels; transition: ``[C, C]``, row ``i`` the
            distribution of the given label of a class-``i`` sample (:func:`estimate_transition`).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Returns: a scalar, or ``[B]`` with ``reduction="none"``; same dtype as ``logits``.
    """
    if transition.shape != (logits.shape[-1], logits.shape[-1]):
        raise ValueError(f"transition must be [{logits.shape[-1]}, {logits.shape[-1]}], got "
                         f"{tuple(transition.shape)}")
    q = torch.softmax(logits, dim=-1) @ transition.to(logits.dtype)
    nll = -torch.log(q.gather(-1, targets.unsqueeze(-1)).squeeze(-1).clamp_min(1e-12))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------------------------------------
# corruption
# --------------------------------------------------------------------------------------------------------


def _check_labels(labels, num_classes: int) -> torch.Tensor:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    y = torch.as_tensor(labels)
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {y.dtype}")
    y = y.to(torch.int64).cpu()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


def _gen(seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _truncated_normal(n: int, mean: float, std: float, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    a = torch.special.ndtr(torch.tensor((lo - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((hi - mean) / std, dtype=torch.float64))
    u = torch.rand(n, generator=g, dtype=torch.float64) * (b - a) + a
    u = u.clamp(1e-15, 1 - 1e-15)
    return (mean + std * torch.special.ndtri(u)).clamp(lo, hi)


def corrupt_labels(labels, spec: Union[str, NoiseSpec], num_classes: int, seed: Union[int, torch.Generator] = 0,
                   images: Optional[torch.Tensor] = None, mapping=None, human_root: Optional[str] = None,
                   human_labels: Optional[torch.Tensor] = None) -> NoisyLabels:
    """Corrupts ``labels`` according to ``spec`` (module docstring).

    Args:
        labels: ``int [N]`` clean labels in ``[0, num_classes)`` (tensor, array or list).
        spec: ``"none"``, ``"sym:R"``, ``"asym:R"``, ``"idn:R"`` or ``"human:KEY"`` (R in [0, 1)).
        num_classes: C.
        seed: int or CPU ``torch.Generator``.
        images: ``float [N, ...]`` (``idn`` only), flattened per sample.
        mapping: ``asym`` only: a name in :data:`ASYM_MAPPINGS` (e.g. the dataset name) or ``{src: dst}``;
            see :func:`get_mapping`.
        human_root: ``human`` only: folder holding ``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``.
        human_labels: ``human`` only: the label array itself (skips the file lookup).

    Returns:
        :class:`NoisyLabels` (noisy labels, clean mask, realised transition matrix and rate).

    Raises:
        ValueError: bad spec/rate/kind, labels out of range, bad mapping, ``idn`` without matching
            ``images``, human labels of the wrong length or whose clean labels disagree with ``labels``.
    """
    ns = parse_noise_spec(spec)
    y = _check_labels(labels, num_classes)
    C, N = num_classes, y.numel()
    g = _gen(seed)
    target = None
    if ns.kind == "none":
        noisy = y.clone()
        target = torch.eye(C, dtype=torch.float64)
    elif ns.kind == "sym":
        u = torch.rand(N, generator=g, dtype=torch.float64)
        shift = torch.randint(1, C, (N,), generator=g)
        noisy = torch.where(u < ns.rate, (y + shift) % C, y)
        target = symmetric_transition(C, ns.rate)
    elif ns.kind == "asym":
        mp = get_mapping(mapping, C)
        dst = torch.arange(C)
        for s, d in mp.items():
            dst[s] = d
        u = torch.rand(N, generator=g, dtype=torch.float64)
        noisy = torch.where(u < ns.rate, dst[y], y)
        target = pair_transition(C, ns.rate, mp)
    elif ns.kind == "idn":
        if images is None:
            raise ValueError("images: idn noise needs the images (instance-dependent, Xia et al. 2020)")
        imgs = torch.as_tensor(images)
        if imgs.dim() < 1 or imgs.shape[0] != N or N == 0:
            raise ValueError(f"images must have the same (non-zero) first dimension as labels ({N}), "
                             f"got shape {tuple(imgs.shape)}")
        x = imgs.detach().cpu().reshape(N, -1).to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        D = x.shape[1]
        q = _truncated_normal(N, ns.rate, 0.1, 0.0, 1.0, g)
        W = torch.randn(C, D, C, generator=g, dtype=torch.float64)
        # scores for all samples, grouped by class to avoid materialising W[y] per sample
        scores = torch.empty(N, C, dtype=torch.float64)
        for c in range(C):
            idx = (y == c).nonzero().flatten()
            if idx.numel():
                scores[idx] = x[idx] @ W[c]
        scores[torch.arange(N), y] = -math.inf
        p = q.view(-1, 1) * torch.softmax(scores, dim=1)
        p[torch.arange(N), y] = 1.0 - q
        noisy = torch.multinomial(p.clamp_min(0), 1, generator=g).flatten()
    else:  # human
        if human_labels is None:
            from .data import load_human_labels

            human = load_human_labels(C, ns.key, root=human_root)
            try:
                clean_ref = load_human_labels(C, "clean", root=human_root)
            except (ValueError, FileNotFoundError):
                clean_ref = None
        else:
            human = torch.as_tensor(human_labels).long().cpu()
            clean_ref = None
        if human.shape != y.shape:
            raise ValueError(f"human labels have {human.numel()} entries, labels have {N} (CIFAR-N covers the "
                             "50,000 CIFAR training images in their original order)")
        if clean_ref is not None and not torch.equal(clean_ref, y):
            raise ValueError("labels do not match the CIFAR-N file's clean labels (wrong order or dataset)")
        if human.numel() and (int(human.min()) < 0 or int(human.max()) >= C):
            raise ValueError(f"human labels out of range [0, {C})")
        noisy = human.clone()
    noisy = noisy.to(torch.int64)
    clean_mask = noisy == y
    rate = float((~clean_mask).double().mean()) if N else 0.0
    return NoisyLabels(labels=noisy, clean_mask=clean_mask, transition=transition_matrix(y, noisy, C), spec=str(ns),
                       rate=rate, clean_labels=y, target_transition=target)
