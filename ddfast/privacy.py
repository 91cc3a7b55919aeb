"""Privacy checks of a distilled set: is a synthetic image a copy of a training image, and does a model trained
on the distilled set leak which images were in the training data?

Dataset distillation is often said to protect privacy because only the distilled set is shared (e.g. the
noisy-label distillation study of Cheng et al., arXiv 2411.11924). That is a claim to measure, not a guarantee:
nothing here is a formal (differential) privacy bound. Two measurements, for a run directory or in Python:

- **Nearest training image** (:func:`nearest_neighbours`): for every synthetic image, the Euclidean distance to
  its nearest training image, in the network-input space of the run (after normalisation / ZCA) and, when a
  network trained on the noisy data is given, in that network's feature space; compared with the same distance
  for held-out test images (never trained on). A synthetic image much closer to a training image than test images
  ever are is a near copy of that image (the memorisation test of Carlini et al., "Extracting Training Data from
  Diffusion Models", USENIX Security 2023, Sec. 4, with the test set as the reference distribution).
- **Membership inference** (:func:`membership_attack`): a loss-threshold attack (Yeom et al., "Privacy Risk in
  Machine Learning", CSF 2018): score = minus the cross entropy of a sample under the attacked model, members =
  random training images, non-members = as many test images of the same classes (:func:`class_matched`: on a
  long-tailed training set random members are mostly head-class images, which any model fits better than the
  balanced test set, so unmatched sides would measure the class mix), both scored with their true (clean) labels -- with
  the noisy labels on the member side only, the 40 % wrong labels would make members look *less* likely than test
  images and the AUC would measure the noise, not the leak (measured: AUC 0.32 at sym 0.4). Reported as ROC AUC (0.5 = no leak) and the true-positive rate at 1 % false positives
  (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022, Sec. III), for a model trained
  on the distilled set and, beside it, for a model trained on the full noisy set.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["nearest_neighbours", "membership_attack", "sample_scores", "distance_summary", "class_matched", "audit",
           "render"]


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor, *, chunk: int = 1024,
                       candidates: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean nearest neighbour of each query among the references.

    The search ranks ``candidates`` references per query with float32 matrix products (``torch.cdist``), then
    recomputes those candidates' distances exactly in float64 and keeps the smallest (ties: the lower index), so
    rounding of the fast pass cannot pick a wrong neighbour unless more than ``candidates`` references tie.

    Args:
        queries: ``float [q, ...]`` (flattened per row).
        refs: ``float [r, ...]`` with the same per-row size; ``r >= 1``.
        chunk: queries per block (memory ``chunk x r`` floats).
        candidates: references re-ranked exactly per query.

    Returns:
        ``(distance float64 [q], index int64 [q])``.

    Raises:
        ValueError: no references, different row sizes, or NaN / inf in either tensor.
    """
    if refs.shape[0] == 0:
        raise ValueError("nearest_neighbours: refs is empty")
    q = queries.reshape(queries.shape[0], -1) if queries.shape[0] else queries.reshape(0, refs[0].numel())
    r = refs.reshape(refs.shape[0], -1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_neighbours: queries have {q.shape[1]} values per row but refs {r.shape[1]}")
    for name, t in (("queries", q), ("refs", r)):
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"nearest_neighbours: {name} contains NaN or inf")
    k = min(int(candidates), r.shape[0])
    r32, r64 = r.float(), r.double()
    dist = torch.empty(q.shape[0], dtype=torch.float64)
    idx = torch.empty(q.shape[0], dtype=torch.int64)
    for s in range(0, q.shape[0], chunk):
        qb = q[s:s + chunk]
        cand = torch.cdist(qb.float(), r32).topk(k, dim=1, largest=False).indices.sort(dim=1).values  # [b, k]
        exact = (qb.double().unsqueeze(1) - r64[cand]).square().sum(-1)  # [b, k]
        # the smallest exact distance; a stable sort over index-ordered candidates keeps the lower index on ties
        j = torch.sort(exact, dim=1, stable=True).indices[:, :1]
        dist[s:s + chunk] = exact.gather(1, j).squeeze(1).sqrt()
        idx[s:s + chunk] = cand.gather(1, j).squeeze(1)
    return dist, idx


def membership_attack(member_scores: torch.Tensor, nonmember_scores: torch.Tensor,
                      fpr: float = 0.01) -> Dict[str, float]:
    """Threshold attack from per-sample scores (higher = "member"): ROC AUC and the true-positive rate at a
    false-positive rate of at most ``fpr`` (scikit-learn's ``roc_auc_score`` / ``roc_curve``).

    Returns:
        ``{"auc", "tpr_at_fpr", "fpr", "n_members", "n_nonmembers"}``; AUC 0.5 = chance.

    Raises:
        ValueError: an empty side, or a non-finite score.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    m = torch.as_tensor(member_scores, dtype=torch.float64).flatten()
    n = torch.as_tensor(nonmember_scores, dtype=torch.float64).flatten()
    if m.numel() == 0 or n.numel() == 0:
        raise ValueError("membership_attack: need at least one member and one non-member score")
    if not bool(torch.isfinite(m).all() & torch.isfinite(n).all()):
        raise ValueError("membership_attack: scores must be finite")
    y = torch.cat([torch.ones(m.numel()), torch.zeros(n.numel())]).numpy()
    s = torch.cat([m, n]).numpy()
    f, t, _ = roc_curve(y, s)
    tpr = float(max(tt for ff, tt in zip(f, t) if ff <= fpr))
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_fpr": tpr, "fpr": float(fpr),
            "n_members": int(m.numel()), "n_nonmembers": int(n.numel())}


def class_matched(member_idx: torch.Tensor, member_labels: torch.Tensor, test_labels: torch.Tensor,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(members, non_members)`` with the same number of images of every class on both sides: per class ``c``,
    ``k_c = min(#members of c, #test images of c)`` of the members (in their given order) and ``k_c`` random
    test images of ``c``. Without it a loss-threshold attack on a long-tailed training set scores the class
    mix (members mostly of the well-learnt head classes, non-members balanced), not membership.

    Args:
        member_idx: ``int64 [n]`` candidate members (indices into the training set, in random order).
        member_labels: ``int64 [n]`` their true labels; test_labels: ``int64 [n_test]``.

    Returns:
        ``int64`` indices into the training set and into the test set, equal in length (grouped by class).
    """
    mem_out, non_out = [], []
    for c in torch.unique(member_labels).tolist():
        m_c = member_idx[member_labels == c]
        t_c = torch.nonzero(test_labels == c, as_tuple=False).flatten()
        k = min(m_c.numel(), t_c.numel())
        mem_out.append(m_c[:k])
        non_out.append(t_c[torch.randperm(t_c.numel(), generator=generator)[:k]])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(mem_out) if mem_out else empty), (torch.cat(non_out) if non_out else empty)


@torch.no_grad()
def sample_scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 512) -> torch.Tensor:
    """``float64 [n]``: minus the cross entropy of each (network-input space) image under ``model`` with its
    label -- the loss-threshold attack's score. The model is put in eval mode for the pass and restored."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size].to(dev))
        out.append(-F.cross_entropy(logits, labels[i:i + batch_size].to(dev).long(), reduction="none").double().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def distance_summary(syn_dist: torch.Tensor, test_dist: torch.Tensor) -> Dict[str, Any]:
    """Synthetic-to-train nearest distances against test-to-train ones: their quantiles, and the share of
    synthetic images closer to a training image than the closest 1 % of test images are (near copies)."""
    def q(t, p):
        return float(torch.quantile(t.double(), p)) if t.numel() else math.nan
    p1 = q(test_dist, 0.01)
    return {"synthetic": {"min": q(syn_dist, 0.0), "median": q(syn_dist, 0.5), "max": q(syn_dist, 1.0)},
            "test": {"p01": p1, "median": q(test_dist, 0.5)},
            "share_closer_than_test_p01": float((syn_dist < p1).double().mean()) if syn_dist.numel() else math.nan,
            "median_ratio": q(syn_dist, 0.5) / q(test_dist, 0.5) if test_dist.numel() else math.nan}


def _pairs_picture(syn_pixels: torch.Tensor, train_pixels: torch.Tensor, path: str) -> str:
    """Two rows: the synthetic images and, under each, its nearest training image (pixels in [0, 1])."""
    from torchvision.utils import make_grid, save_image

    from .io import atomic_open

    x = torch.cat([syn_pixels, train_pixels]).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    scale = max(1, 64 // max(1, x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=max(1, syn_pixels.shape[0]), padding=2, pad_value=1.0)
    with atomic_open(path, "wb") as f:
        save_image(grid, f, format="png")
    return path


def audit(syn, train, noisy_labels: torch.Tensor, test, *, n_samples: int = 1000, seed: int = 0,
          device: str = "cpu", reference_model: Optional[torch.nn.Module] = None,
          reference_transform=None, member_pool: Optional[torch.Tensor] = None, n_pairs: int = 8,
          pairs_path: Optional[str] = None, eval_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Both privacy measurements (module docstring) for a distilled set.

    Args:
        syn: the :class:`ddfast.distill.base.SyntheticSet` (images in its network-input space).
        train, test: :class:`ddfast.data.ImageDataset` of the run (pixels in [0, 1]).
        noisy_labels: ``int64 [len(train)]``, the labels the distilled set was made from (reported with the closest
            pairs; the attack scores members with ``train.labels``, their true labels, as the test images).
        n_samples: candidate members of the attack and test images of the distance reference (each at most the
            size of its set); the attack keeps, per class, as many members as the test set has images of that
            class and as many test images as non-members (:func:`class_matched`).
        reference_model: a network trained on the full noisy set (e.g. the ``full_noisy`` baseline's): its
            feature space gives the second distance, and it is attacked beside the distilled set's model. None:
            both are left out.
        reference_transform: maps pixels in [0, 1] to ``reference_model``'s input (e.g. the full-data baselines'
            per-channel normalisation); the synthetic images reach it through ``syn.input_transform().inverse``.
            None: the reference model takes the distilled set's input space (``syn.input_transform()``).
        member_pool: ``int64`` indices of the training images the members are drawn from (the images the
            reference model was trained on, i.e. without a held-out share); None: all.
        n_pairs: closest synthetic / training pairs kept (and drawn to ``pairs_path`` when given).
        eval_overrides: :class:`ddfast.evaluate.EvalConfig` fields for the model trained on the distilled set
            (its protocol otherwise, one run).

    Returns:
        ``{"pixel": distances, "feature": distances or None, "pairs": [...], "attack": {"distilled": ...,
        "full_noisy": ... or None}, "n_samples", "seed"}`` (:func:`distance_summary`, :func:`membership_attack`).
    """
    from .evaluate import synset_eval_config, train_classifier

    T = syn.input_transform()
    with torch.no_grad():
        Xtr = T(train.images.float())
        Xte = T(test.images.float())
    y_noisy = torch.as_tensor(noisy_labels).long()
    if y_noisy.shape != (len(train),):
        raise ValueError(f"noisy_labels must have shape [{len(train)}], got {tuple(y_noisy.shape)}")
    pool = torch.arange(len(train)) if member_pool is None else torch.as_tensor(member_pool).long().reshape(-1)
    if pool.numel() and (int(pool.min()) < 0 or int(pool.max()) >= len(train)):
        raise ValueError(f"member_pool holds indices outside [0, {len(train)})")
    g = torch.Generator().manual_seed(int(seed))
    n = int(min(n_samples, pool.numel(), len(test)))
    mem = pool[torch.randperm(pool.numel(), generator=g)[:n]]
    non = torch.randperm(len(test), generator=g)[:n]
    syn_x = syn.images.detach().float().cpu()
    syn_d, syn_i = nearest_neighbours(syn_x, Xtr)
    te_d, _ = nearest_neighbours(Xte[non], Xtr)
    out: Dict[str, Any] = {"n_samples": n, "seed": int(seed), "pixel": distance_summary(syn_d, te_d)}
    order = torch.argsort(syn_d)[:n_pairs]
    out["pairs"] = [{"synthetic": int(i), "train": int(syn_i[i]), "distance": float(syn_d[i]),
                     "train_label_noisy": int(y_noisy[syn_i[i]])} for i in order]
    if pairs_path is not None and len(order):
        with torch.no_grad():
            _pairs_picture(T.inverse(syn_x[order]), train.images[syn_i[order]].float(), pairs_path)
        out["pairs_picture"] = os.path.basename(pairs_path)
    cfg = synset_eval_config(syn, device, 1, seed, eval_overrides)
    model = train_classifier(syn.images.detach(), syn.labels.detach(), config=cfg, images_transformed=True,
                             num_classes=int(syn.num_classes))
    y_true = train.labels.long()
    a_mem, a_non = class_matched(mem, y_true[mem], test.labels.long(), g)  # the attack's members / non-members
    out["attack"] = {"distilled": membership_attack(sample_scores(model, Xtr[a_mem], y_true[a_mem]),
                                                    sample_scores(model, Xte[a_non], test.labels[a_non])),
                     "full_noisy": None, "class_matched": True}
    out["feature"] = None
    if reference_model is not None:
        ref = reference_model.eval()
        dev = next(ref.parameters()).device
        with torch.no_grad():
            if reference_transform is None:  # the reference model reads the distilled set's input space
                Rtr, Rte, Rsyn = Xtr, Xte, syn_x
            else:
                Rtr = reference_transform(train.images.float())
                Rte = reference_transform(test.images.float())
                Rsyn = reference_transform(T.inverse(syn_x))

        def embed(x):
            with torch.no_grad():
                return torch.cat([ref(x[i:i + 512].to(dev), output="embed").cpu() for i in range(0, len(x), 512)])
        ftr = embed(Rtr)
        fs_d, _ = nearest_neighbours(embed(Rsyn), ftr)
        ft_d, _ = nearest_neighbours(embed(Rte[non]), ftr)
        out["feature"] = distance_summary(fs_d, ft_d)
        out["attack"]["full_noisy"] = membership_attack(sample_scores(ref, Rtr[a_mem], y_true[a_mem]),
                                                        sample_scores(ref, Rte[a_non], test.labels[a_non]))
    return out


def render(result: Dict[str, Any]) -> str:
    """The "Privacy" section of a report (markdown) from :func:`audit`'s result."""
    px, ft, at = result["pixel"], result.get("feature"), result["attack"]
    lines = ["## Privacy", "",
             "Measured, not guaranteed: no formal privacy bound is claimed. Distances are Euclidean, to the nearest "
             f"training image; {result['n_samples']} random test images give the reference (never trained on).", "",
             "| space | synthetic: min | synthetic: median | test: 1st percentile | test: median | "
             "synthetic closer than 99 % of test images |", "|---|---|---|---|---|---|"]
    for name, d in (("network input", px), ("features of a model trained on the noisy data", ft)):
        if d:
            lines.append(f"| {name} | {d['synthetic']['min']:.3f} | {d['synthetic']['median']:.3f} | "
                         f"{d['test']['p01']:.3f} | {d['test']['median']:.3f} | "
                         f"{100 * d['share_closer_than_test_p01']:.1f} % |")
    n_att = (at.get("distilled") or {}).get("n_members")
    matched = ("as many test images of the same classes (class for class, so the class mix of a long-tailed "
               "training set is not mistaken for membership)" if at.get("class_matched") else "as many test images")
    lines += ["", f"Membership inference (loss threshold; members: {n_att if n_att is not None else 'random'} random "
              f"training images, non-members: {matched}, both with their true labels):", "",
              "| model attacked | ROC AUC (0.5 = chance) | true-positive rate at 1 % false positives |", "|---|---|---|"]
    for name, a in (("trained on the distilled set", at.get("distilled")),
                    ("trained on the full noisy set", at.get("full_noisy"))):
        if a:
            lines.append(f"| {name} | {a['auc']:.3f} | {100 * a['tpr_at_fpr']:.2f} % |")
    ref = result.get("reference")
    if ref:
        lines += ["", f"The model trained on the full noisy set is {ref['what']} (ConvNet width {ref['width']}, "
                      f"{ref['epochs']} epochs on {ref['n_train']} noisy images); the members are drawn from those "
                      "images. The model trained on the distilled set: one run of the set's evaluation protocol."]
    if result.get("pairs_picture"):
        lines += ["", f"![closest synthetic / training pairs]({result['pairs_picture']})",
                  "(top row: the synthetic images closest to a training image; bottom row: that training image)"]
    return "\n".join(lines) + "\n"
