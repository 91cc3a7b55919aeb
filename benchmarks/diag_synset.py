"""Diagnostics of a saved synthetic set (a `ddfast run` directory) on Fashion-MNIST's test set.

    python benchmarks/diag_synset.py RUN_DIR [--runs 2] [--threads 1] [--max-prob P]

Trains ``--runs`` networks with the set's own evaluation protocol (as ``ddfast evaluate`` does) and prints the
per-class test accuracy (%, mean over runs) and the soft labels' mean max-probability and entropy (nats).
With ``--max-prob P`` the soft labels are first rescaled by a temperature T (logits / T, found by bisection)
so that their mean max-probability is P: the temperature-swap test of benchmarks/RESULTS.md ("Why TAD lowers
DATM"). Prints one JSON line, then a table.
"""
from __future__ import annotations

import argparse
import json

import torch

from ddfast.data import load_dataset
from ddfast.distill.base import SyntheticSet
from ddfast.evaluate import train_classifier
from ddfast.pipeline import synset_eval_config


def temperature_for(logits: torch.Tensor, target: float) -> float:
    """T > 0 with mean_i max softmax(logits_i / T) = target (bisection on log T)."""
    def max_prob(t):
        return float(torch.softmax(logits / t, 1).max(1).values.mean())
    lo, hi = 1e-2, 1e2
    for _ in range(80):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if max_prob(mid) > target else (lo, mid)
    return (lo * hi) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-prob", type=float, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    syn = SyntheticSet.load(a.run_dir)
    test = load_dataset((syn.metadata or {}).get("ddfast_run", {}).get("dataset", "fashion-mnist"), "test")
    ec = synset_eval_config(syn, torch.device("cpu"), a.runs, 0, {})
    tf = syn.input_transform()
    labels = syn.labels
    T = 1.0
    if a.max_prob is not None:
        if not labels.is_floating_point():
            raise SystemExit("--max-prob needs soft labels (logits)")
        T = temperature_for(labels.float(), a.max_prob)
        labels = labels.float() / T
    with torch.no_grad():
        xt = tf(test.images)
    y = test.labels
    C = int(syn.num_classes)
    per_class = torch.zeros(a.runs, C)
    overall = []
    for r in range(a.runs):
        m = train_classifier(syn.images, labels, config=ec, transform=tf, images_transformed=True, run=r).eval()
        with torch.no_grad():
            pred = torch.cat([m(xt[i:i + 2000]).argmax(1) for i in range(0, len(xt), 2000)])
        overall.append(100 * float((pred == y).float().mean()))
        for c in range(C):
            per_class[r, c] = 100 * float((pred[y == c] == c).float().mean())
    out = {"dir": a.run_dir, "runs": a.runs, "temperature": T, "overall": overall,
           "per_class": per_class.mean(0).tolist()}
    if labels.is_floating_point():
        p = torch.softmax(labels.float(), 1)
        out["soft_label_max_prob"] = float(p.max(1).values.mean())
        out["soft_label_entropy"] = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
    print(json.dumps(out))
    print(f"overall {sum(overall) / len(overall):.2f} % ({', '.join(f'{v:.2f}' for v in overall)})")
    for c in range(C):
        print(f"  {str(test.classes[c])[:14]:14s} {per_class[:, c].mean():6.2f}")


if __name__ == "__main__":
    main()
