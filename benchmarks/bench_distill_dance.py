"""DANCE: time and peak memory per condensation iteration (one ``DANCE.step``) at fixed configs, and the
pool-training step sequential vs ``torch.func.vmap`` over several models.

Cases (Fashion-MNIST shapes, 1x28x28, 10 classes, IPC 10, factor 2 -> 40 decoded images per class):

- ``quick``: the quick preset's network (ConvNet-3 width 32), batch_real 64;
- ``full``: the full preset (ConvNet-3 width 128, batch_real 128, batch_syn_max 200);
- ``full-batched``: the full preset with ``batched_classes=True`` (one forward per view).

The pool is made of randomly initialised models (init and "final" = two different random draws): a step
costs the same whatever the weights, and no pretraining is needed. The real images are Fashion-MNIST's
when found, else uniform noise of the same shape.

Time: :func:`harness.time_fn` of ``DANCE.step`` (median and 20/80th percentiles, ms). Peak memory: each case
runs in a **fresh subprocess**; on CPU we report the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after the timed steps, and, as ``config.rss_step_mib``, its
growth over the RSS measured just before the first step (what the iterations themselves add: activations,
autograd buffers, allocator caches). On CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps.

Pool training (``pool-train``): one SGD step of K=4 ConvNets on batches of 64, as K sequential steps and
as one vmapped step (``ddfast.models.batched_forward``), time per model-step.

Usage: ``python benchmarks/bench_distill_dance.py [--device cpu] [--threads 2] [--repeats 10] [--no-csv]``.

``--fmnist-ipc10 OUT.json``: the done-when measurement instead (benchmarks/RESULTS.md, "DANCE on clean
Fashion-MNIST"): the quick preset (or ``--preset full``) on clean Fashion-MNIST at IPC 10 from an empty pool
cache (pool pretraining timed), then ``ddfast.evaluate`` of the DANCE set and of a random real subset (10 per
class, seeded) under the same protocol (the preset's ``eval_config``); writes everything to ``OUT.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402

CASES = {
    "quick": {"pool.net.width": 32, "batch_real": 64, "batched_classes": False},
    "full": {"pool.net.width": 128, "batch_real": 128, "batched_classes": False},
    "full-batched": {"pool.net.width": 128, "batch_real": 128, "batched_classes": True},
}


def _train_set():
    from ddfast.distill.base import TrainSet

    try:
        from ddfast.data import load_dataset

        ds = load_dataset("fashion-mnist", "train")
        return TrainSet(ds.images, ds.labels, 10, ds.mean, ds.std, name="fashion-mnist"), "fashion-mnist"
    except Exception:
        g = torch.Generator().manual_seed(0)
        n = 6000
        return TrainSet(torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10, 10, (0.286,), (0.353,),
                        name="noise"), "noise"


def _random_pool(cfg, train, device):
    from ddfast.distill.pool import ModelPool, make_template
    from ddfast.models import flat_params

    pc = cfg.pool
    inits, finals = [], []
    for k in range(cfg.num_premodel):
        inits.append(flat_params(make_template(pc, 1, 10, (28, 28), seed=2 * k)).detach())
        finals.append(flat_params(make_template(pc, 1, 10, (28, 28), seed=2 * k + 1)).detach())
    return ModelPool(make_template(pc, 1, 10, (28, 28), seed=0).to(device), torch.stack(inits).to(device),
                     torch.stack(finals).to(device))


def child(case: str, device: str, repeats: int) -> dict:
    """Runs one case in this (fresh) process; returns the measurement."""
    from ddfast.distill.dance import DANCE, preset_config

    dev = torch.device(device)
    train, data_name = _train_set()
    cfg = preset_config("full", "fashion-mnist", 10, num_premodel=5, **{"pool.amount": 5}, **CASES[case])
    d = DANCE(cfg, device=dev, quiet=True)
    d.set_pool(_random_pool(cfg, train, dev))
    d.train = train
    d.prepare(train)
    d.initialize(train)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = harness.time_fn(d.step, dev, warmup=2, repeats=repeats, min_time_s=0.0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss1
    return {"times": times, "peak": peak, "rss_before_steps": rss0, "rss_after": rss1, "data": data_name,
            "config": {**{k: getattr(cfg, k) for k in ("ipc", "factor", "batch_real", "batch_syn_max",
                                                        "num_premodel", "iter_calib", "batched_classes")},
                       "pool.net.width": cfg.pool.net.width}}


def pool_train_case(device: str, repeats: int, K: int = 4, width: int = 32) -> list:
    """Per-model time of one pool-training SGD step: K sequential steps vs one vmapped step over K."""
    import torch.nn.functional as F

    from ddfast.models import batched_forward, convnet_datm, flat_params

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    models = [convnet_datm(1, 10, im_size=(28, 28), width=width).to(dev) for _ in range(K)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in models]
    x = torch.rand(K, 64, 1, 28, 28, generator=g).to(dev)
    y = torch.randint(0, 10, (K, 64), generator=g).to(dev)

    def sequential():
        for k in range(K):
            loss = F.cross_entropy(models[k](x[k]), y[k])
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()

    flats = torch.nn.Parameter(torch.stack([flat_params(m).detach() for m in models]))
    vopt = torch.optim.SGD([flats], lr=0.01, momentum=0.9, weight_decay=5e-4)

    def vmapped():
        logits = batched_forward(models[0], flats, x)
        loss = F.cross_entropy(logits.reshape(K * 64, -1), y.reshape(-1), reduction="none").view(K, 64).mean(1).sum()
        vopt.zero_grad(set_to_none=True)
        loss.backward()
        vopt.step()

    rows = []
    for name, fn in (("sequential", sequential), ("vmap", vmapped)):
        times = [t / K for t in harness.time_fn(fn, dev, warmup=2, repeats=repeats, min_time_s=0.0)]
        rows.append((name, times))
    return rows


def _row(benchmark, case, provider, times, device, peak_mib, config):
    from ddfast import _extension

    med, p20, p80 = harness.quantiles(times)
    return {"timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": benchmark,
            "case": case, "provider": provider, "mode": "fwd+bwd", "dtype": "float32", "device": device.type,
            "device_name": harness.device_name(device), "threads": torch.get_num_threads(),
            "median_ms": round(med, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3), "speedup_vs_eager": "",
            "gb_per_s": "", "copy_bw_share": "", "peak_mem_mib": peak_mib, "config": json.dumps(config, sort_keys=True),
            "git_commit": harness.git_commit(), "torch": torch.__version__,
            "ddfast_extension": _extension.has_extension()}


def fmnist_ipc10(out_path: str, preset: str, device: str, seed: int = 0) -> dict:
    """The done-when measurement (module docstring). Returns the JSON-able result."""
    import tempfile
    import time

    from ddfast.augment import Normalize
    from ddfast.data import load_dataset
    from ddfast.distill.base import TrainSet
    from ddfast.distill.dance import DANCE, preset_config
    from ddfast.evaluate import EvalConfig, evaluate_synset

    def load():
        return [round(v, 2) for v in os.getloadavg()]

    tr, te = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    ts = TrainSet(tr.images, tr.labels, 10, tr.mean, tr.std, name="fashion-mnist")
    cfg = preset_config(preset, "fashion-mnist", 10, seed=seed)
    res = {"preset": preset, "config": cfg.to_dict(), "threads": torch.get_num_threads(), "load_start": load()}
    with tempfile.TemporaryDirectory() as cache:
        d = DANCE(cfg, device=device, cache_dir=cache, quiet=True)
        t0, c0 = time.perf_counter(), time.process_time()
        syn = d.run(ts)
        res["distill_wall_s"], res["distill_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    res["stages"] = {k: dict(v) for k, v in d.timer.stages.items()}
    res["iterations"] = d.iteration
    res["pool_train_acc"] = [i.get("train_acc") for i in d.pool.info]
    res["history_first_last"] = [d.history[0], d.history[-1]]
    res["load_after_distill"] = load()
    ec = EvalConfig(**syn.eval_config).replace(device=device, seed=seed)
    norm = Normalize(tr.mean, tr.std)
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(tr.labels == c).flatten()[torch.randperm(int((tr.labels == c).sum()), generator=g)[:10]]
                     for c in range(10)])
    for name, X, Y, transformed in (("dance", syn.images, syn.labels, True),
                                    ("random_subset", tr.images[idx], tr.labels[idx], False)):
        t0 = time.perf_counter()
        r = evaluate_synset(X, Y, te, config=ec, transform=norm, images_transformed=transformed)
        res[name] = {"mean": r.mean, "std": r.std, "accs": r.accs, "seconds": time.perf_counter() - t0,
                     "n_train": int(X.shape[0])}
        res[f"load_after_{name}"] = load()
        print(name, r, flush=True)
    res["eval_config"] = ec.to_dict()
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2, default=str)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cases", default=",".join(list(CASES) + ["pool-train"]))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--fmnist-ipc10", default=None, metavar="OUT.json", help="the done-when measurement")
    ap.add_argument("--preset", default="quick")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fmnist_ipc10:
        fmnist_ipc10(args.fmnist_ipc10, args.preset, args.device)
        return []
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.device, args.repeats)))
        return []
    device = torch.device(args.device)
    rows = []
    for case in args.cases.split(","):
        if case == "pool-train":
            for name, times in pool_train_case(args.device, args.repeats):
                rows.append(_row("dance_pool_train_step", "K=4,width=32,batch=64", name, times, device, "",
                                 {"K": 4, "width": 32, "batch": 64, "unit": "ms per model-step"}))
            continue
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--device", args.device,
                              "--threads", str(args.threads), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        cfg = dict(res["config"], data=res["data"],
                   rss_step_mib=round((res["rss_after"] - res["rss_before_steps"]) / 2**20, 1),
                   peak_kind="cuda max_memory_allocated" if device.type == "cuda" else "subprocess ru_maxrss")
        rows.append(_row("dance_step", f"fmnist-ipc10-f2-{case}", "batched" if "batched" in case else "per-class", res["times"],
                         device, round(res["peak"] / 2**20, 1), cfg))
    for r in rows:
        print(f"{r['benchmark']:<22} {r['case']:<28} {r['provider']:<10} median {r['median_ms']:>10.1f} ms "
              f"(p20 {r['p20_ms']:.1f}, p80 {r['p80_ms']:.1f})  peak {r['peak_mem_mib']} MiB  {r['config']}")
    if not args.no_csv and rows:
        harness.append_rows(rows)
        print(f"appended {len(rows)} rows to {harness.RESULTS_CSV}")
    return rows


if __name__ == "__main__":
    main()
