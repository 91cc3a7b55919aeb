"""Baselines on Fashion-MNIST (CPU): the measurements of benchmarks/RESULTS.md, "Data, noise and the evaluation harness".

Runs, on the real Fashion-MNIST files, with ddfast's harness (``ddfast.evaluate`` / ``ddfast.baselines``):

- ``clean``  : full clean training set (oracle)                      -> must reach >= 91 % test accuracy
- ``noisy``  : full noisy training set, cross entropy                 (sym:0.4 and asym:0.4)
- ``gce``    : full noisy training set, GCE loss (q = 0.7)            (sym:0.4 and asym:0.4)
- ``subset`` : random real subset, IPC 10 per noisy class, noisy labels (none, sym:0.4, asym:0.4)

Each (baseline, noise, run) is one training run; results are appended to a JSON file after every run
(atomically), so an interrupted benchmark resumes where it stopped (``--resume``, default on). ``--report``
prints the Markdown table for benchmarks/RESULTS.md. The load average (``os.getloadavg``) is recorded before
and after each run, next to its wall time.

Usage::

    .venv/bin/python benchmarks/bench_baselines.py                 # everything (long on a busy 2-core CPU)
    .venv/bin/python benchmarks/bench_baselines.py --only clean --runs 2
    .venv/bin/python benchmarks/bench_baselines.py --report
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from ddfast.augment import Normalize  # noqa: E402
from ddfast.baselines import select_random_subset  # noqa: E402
from ddfast.data import load_dataset  # noqa: E402
from ddfast.evaluate import EvalConfig, EvalResult, evaluate_synset  # noqa: E402
from ddfast.io import atomic_write_json, load_json  # noqa: E402
from ddfast.noise import corrupt_labels  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "baselines_fmnist.json")


def full_config(args) -> EvalConfig:
    """Full-data recipe: ConvNet-3 (instance norm, MTT's 28->32 padding) of width ``--width``, SGD momentum
    0.9, weight decay 5e-4, batch 128, cosine lr decay per step from ``--lr``, no DSA, normalised input."""
    return EvalConfig(model="convnet", model_kwargs={"width": args.width}, lr=args.lr, epochs=args.epochs,
                      num_runs=1, batch_size=128, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", dsa=False, eval_batch_size=1000)


def subset_config(args) -> EvalConfig:
    """IPC-10 recipe: MTT/DATM's evaluation (SGD lr 0.01, momentum 0.9, wd 5e-4, lr x0.1 at half, DSA
    color_crop_cutout_flip_scale_rotate) with ``--subset-epochs`` epochs instead of 1000."""
    return EvalConfig(model="convnet", model_kwargs={"width": args.subset_width}, lr=0.01, epochs=args.subset_epochs,
                      num_runs=1, batch_size=256, optimizer="sgd", schedule="step", dsa=True, eval_batch_size=1000)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="clean,noisy,gce,subset", help="comma list of clean,noisy,gce,subset")
    ap.add_argument("--noise", default="sym:0.4,asym:0.4", help="noise specs for noisy/gce/subset")
    ap.add_argument("--runs", type=int, default=2, help="runs per full-data baseline")
    ap.add_argument("--subset-runs", type=int, default=5, help="runs (= subsets) per random-subset baseline")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--subset-epochs", type=int, default=300)
    ap.add_argument("--subset-width", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (<= 2 on this machine)")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="results JSON; --report also merges <out>_*.json (one file per parallel process)")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in --out")
    ap.add_argument("--report", action="store_true", help="print the Markdown table from --out and exit")
    ap.add_argument("--vmap-check", action="store_true",
                    help="time one training step of K=5 runs: loop vs torch.func.vmap (the evaluate.py 'auto' rule)")
    args = ap.parse_args(argv)
    if args.vmap_check:
        torch.set_num_threads(args.threads)
        print(vmap_check())
        return 0

    if args.report:
        import glob

        files = sorted(set(glob.glob(args.out)) | set(glob.glob(os.path.splitext(args.out)[0] + "_*.json")))
        print(report({"runs": [r for f in files for r in load_json(f)["runs"]]}))
        return 0
    torch.set_num_threads(args.threads)
    db = {"runs": []} if args.fresh or not os.path.exists(args.out) else load_json(args.out)
    done = {(r["baseline"], r["noise"], r["run"], r["key"]) for r in db["runs"]}

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    nrm = Normalize(train.mean, train.std)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    noises = [s.strip() for s in args.noise.split(",") if s.strip()]
    jobs = []
    if "clean" in only:
        jobs += [("clean", "none", k) for k in range(args.runs)]
    for spec in noises:
        if "noisy" in only:
            jobs += [("noisy", spec, k) for k in range(args.runs)]
        if "gce" in only:
            jobs += [("gce", spec, k) for k in range(args.runs)]
    if "subset" in only:
        for spec in ["none"] + noises:
            jobs += [("subset", spec, k) for k in range(args.subset_runs)]

    for baseline, spec, k in jobs:
        cfg = subset_config(args) if baseline == "subset" else full_config(args)
        if baseline == "gce":
            cfg = cfg.replace(loss="gce", gce_q=0.7)
        cfg = cfg.replace(seed=k)
        key = f"{cfg.to_dict()}|threads={args.threads}|noise_seed={args.noise_seed}"
        if (baseline, spec, k, key) in done:
            continue
        nl = corrupt_labels(train.labels, spec, 10, seed=args.noise_seed, mapping="fashion-mnist")
        images, labels, extra = train.images, nl.labels, {}
        if baseline == "subset":
            idx = select_random_subset(nl.labels, 10, 10, seed=k)
            images, labels = train.images[idx], nl.labels[idx]
            extra["subset_clean_share"] = float(nl.clean_mask[idx].double().mean())
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res: EvalResult = evaluate_synset(images, labels, test, config=cfg, transform=nrm, num_classes=10)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        row = {"baseline": baseline, "noise": spec, "run": k, "key": key, "acc": res.accs[0], "seconds": wall,
               "load_before": list(load0), "load_after": list(load1), "noise_rate": nl.rate,
               "n_train": int(images.shape[0]), "config": res.config, "machine": machine(),
               "finished": _dt.datetime.now().isoformat(timespec="seconds"), **extra}
        db["runs"].append(row)
        atomic_write_json(db, args.out)
        print(f"{baseline:7s} {spec:9s} run {k}: {res.accs[0]:.2f}%  {wall:.0f} s  load {load0[0]:.1f}->{load1[0]:.1f}",
              flush=True)
    print(report(db))
    return 0


def vmap_check(K: int = 5, widths=(32, 128), batches=(10, 100), reps: int = 5) -> str:
    """Median time of one SGD step of K ConvNets (28x28, 10 classes) on K batches: a Python loop over K
    modules vs one vmapped step over stacked parameters ``[K, P]`` (what ``evaluate_synset(vmap=True)``
    does). Returns a Markdown table."""
    import statistics

    import torch.nn.functional as F

    from ddfast.models import batched_forward, flat_params, get_model

    rows = ["| width | images/step/run | K | loop ms | vmap ms | vmap/loop | load |", "|---|---|---|---|---|---|---|"]
    for width in widths:
        for B in batches:
            ms = [get_model("convnet", 1, 10, 28, seed=k, width=width) for k in range(K)]
            x, y = torch.rand(K, B, 1, 28, 28), torch.randint(0, 10, (K, B))
            opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in ms]
            flats = torch.nn.Parameter(torch.stack([flat_params(m).detach() for m in ms]))
            vopt = torch.optim.SGD([flats], lr=0.01, momentum=0.9)

            def loop():
                for k in range(K):
                    loss = F.cross_entropy(ms[k](x[k]), y[k])
                    opts[k].zero_grad()
                    loss.backward()
                    opts[k].step()

            def vm():
                logits = batched_forward(ms[0], flats, x)
                loss = F.cross_entropy(logits.reshape(K * B, -1), y.reshape(-1), reduction="none").view(K, B).mean(1).sum()
                vopt.zero_grad()
                loss.backward()
                vopt.step()

            times = {"loop": [], "vmap": []}
            loop(), vm()
            for _ in range(reps):  # interleaved, so load changes hit both
                for name, f in (("loop", loop), ("vmap", vm)):
                    t = time.perf_counter()
                    f()
                    times[name].append(1000 * (time.perf_counter() - t))
            lt, vt = statistics.median(times["loop"]), statistics.median(times["vmap"])
            rows.append(f"| {width} | {B} | {K} | {lt:.0f} | {vt:.0f} | {vt / lt:.2f} | {os.getloadavg()[0]:.1f} |")
    return "\n".join(rows)


def report(db: dict) -> str:
    """Markdown table: one row per (baseline, noise) with mean +- std over runs, runs, seconds per run, load."""
    groups = {}
    for r in db["runs"]:
        groups.setdefault((r["baseline"], r["noise"]), []).append(r)
    order = {"clean": 0, "noisy": 1, "gce": 2, "subset": 3}
    names = {"clean": "full clean (oracle)", "noisy": "full noisy (CE)", "gce": "full noisy, GCE q=0.7",
             "subset": "random subset IPC 10 (noisy labels)"}
    lines = ["| baseline | noise | realised rate | test acc % (mean ± std) | runs | s / run | load avg (1 min) | recipe |",
             "|---|---|---|---|---|---|---|---|"]
    noise_order = {"none": 0, "sym": 1, "asym": 2}
    for (b, spec), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9),
                                                                noise_order.get(kv[0][1].split(":")[0], 9), kv[0][1])):
        accs = torch.tensor([r["acc"] for r in rs], dtype=torch.float64)
        std = float(accs.std(unbiased=False)) if len(rs) > 1 else 0.0
        secs = sum(r["seconds"] for r in rs) / len(rs)
        loads = [r["load_before"][0] for r in rs] + [r["load_after"][0] for r in rs]
        c = rs[0]["config"]
        recipe = (f"width {c['model_kwargs'].get('width')}, {c['epochs']} ep, bs {c['batch_size']}, "
                  f"{c['optimizer']} lr {c['lr']:g} {c['schedule']}, {'DSA' if c['dsa'] else 'no aug'}, "
                  f"{c['loss_resolved']}, {rs[0]['machine']['threads']} thr")
        extra = ""
        if b == "subset":
            share = sum(r.get("subset_clean_share", 1.0) for r in rs) / len(rs)
            extra = f"; clean share {100 * share:.0f}%"
        lines.append(f"| {names.get(b, b)} | {spec} | {100 * rs[0]['noise_rate']:.1f}% | {float(accs.mean()):.2f} ± "
                     f"{std:.2f} | {len(rs)} | {secs:.0f} | {min(loads):.1f}-{max(loads):.1f} | {recipe}{extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
