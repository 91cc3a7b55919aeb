"""The ``ddfast`` command (also ``python -m ddfast``).

::

    ddfast run                      # the demo: Fashion-MNIST, sym:0.4, IPC 10, DATM + TAD, quick preset
    ddfast run --dataset D --noise SPEC --method datm|dance|rcig [--tad] --ipc K --preset quick|full
               --seed S --out DIR [--device cpu|cuda|auto] [--eval-runs N] [--baselines LIST] [--no-privacy]
               [--quiet]
    ddfast sweep CONFIG.yaml [--only PATTERN] [--dry-run]
    ddfast evaluate DIR [--model resnet18] [--runs N]
    ddfast privacy DIR [--samples N] [--reference-epochs E | --no-reference]
    ddfast info

Errors from bad arguments are one line on stderr with exit code 2 (``DDFAST_DEBUG=1`` shows the traceback);
an interrupted run exits with 130 and resumes when the same command is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

# arguments that define *what* is run; `ddfast run` without any of them is the demo
_WHAT = ("dataset", "noise", "method", "tad", "ipc", "preset", "seed", "noise_seed", "imbalance", "label_file",
         "override", "eval_runs", "baselines")


class _OneLineError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``ddfast run: error: ...``."""

    def error(self, message):  # noqa: D102
        raise _OneLineError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}") from None


def _ratio(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {s!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"must be n_min / n_max in (0, 1], got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="ddfast", description="Dataset distillation as a label denoiser: distil a noisy-label "
                "dataset into a few synthetic images per class and compare with what you would otherwise do.")
    p.add_argument("--version", action="version", version=f"ddfast {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{run,sweep,evaluate,privacy,info}")

    r = sub.add_parser("run", help="distil, evaluate, run the baselines, write the report (no arguments: the demo)",
                       description="Distil a noisy dataset, evaluate the distilled set with the method's protocol, "
                       "run the baselines and write DIR/report.md. Without arguments: the demo (Fashion-MNIST, "
                       "sym:0.4, IPC 10, DATM + TAD, quick preset, seed 0, out runs/demo). Rerunning the same "
                       "command resumes an interrupted run.")
    r.add_argument("--dataset", help="fashion-mnist | mnist | cifar10 | cifar100 | digits | a .safetensors/.pt "
                   "file (default fashion-mnist)")
    r.add_argument("--noise", help="sym:R | asym:R | idn:R | human:KEY | none | file (default sym:0.4)")
    r.add_argument("--method", help="datm | dance | rcig (default datm)")
    r.add_argument("--tad", action="store_true", default=None, help="wrap the distiller in trust-aware diversion")
    r.add_argument("--ipc", type=_int, help="images per class (default 10)")
    r.add_argument("--preset", help="quick | full (default quick)")
    r.add_argument("--seed", type=_int, help="seed of distillation, evaluation and baselines (default 0)")
    r.add_argument("--noise-seed", type=_int, help="seed of the label corruption (default: --seed)")
    r.add_argument("--imbalance", type=_ratio, metavar="R", help="long-tailed training set: exponential class profile "
                   "with n_min / n_max = R (CIFAR-10-LT protocol), drawn before the noise; the test set stays balanced")
    r.add_argument("--label-file", help="noisy labels from a file (with --noise file, or a CIFAR-N *_human.pt "
                   "with --noise human:KEY)")
    r.add_argument("--out", help="run directory (default runs/<method>[-tad]-<dataset>-<noise>-ipc<K>-s<seed>, "
                   "runs/demo for the demo)")
    r.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    r.add_argument("--eval-runs", type=_positive_int, help="evaluation runs of the distilled set and the random "
                   "subset (default: the method's protocol)")
    r.add_argument("--baselines", help="comma list of full_noisy,random_subset,gce,full_clean or 'none' "
                   "(default full_noisy,random_subset,gce)")
    r.add_argument("--data-root", help="extra folder searched for dataset files")
    r.add_argument("--cache-dir", help="cache of experts, pools and baselines (default $DDFAST_CACHE or "
                   "~/.cache/ddfast)")
    r.add_argument("--override", "-O", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="advanced: distill.KEY (distiller config), tad.KEY (run_tad option), eval.KEY "
                   "(EvalConfig field), baseline.KEY (epochs, width, num_runs, ...), data.train_per_class / "
                   "data.test_limit; repeatable")
    r.add_argument("--no-privacy", action="store_true", help="skip the privacy audit (nearest training images, "
                   "membership inference) and its report section")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    s = sub.add_parser("sweep", help="a grid of runs from a YAML file, one results table",
                       description="Run the grid methods x noise x IPC x TAD x seeds of CONFIG.yaml, each cell as "
                       "`ddfast run` would in its own sub-directory (finished cells are skipped, interrupted ones "
                       "resume), then write OUT/results.md and OUT/results.csv.")
    s.add_argument("config", help="sweep YAML (see examples/sweep_fmnist.yaml)")
    s.add_argument("--only", help="run only the cells whose name contains this text")
    s.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    s.add_argument("--device", default=None, help="cpu | cuda | auto (default: the file's, else auto)")
    s.add_argument("--keep-going", action="store_true", help="continue with the next cell when one fails")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    e = sub.add_parser("evaluate", help="re-evaluate a saved synthetic set (e.g. another architecture)",
                       description="Train fresh networks on the synthetic set in DIR with its evaluation "
                       "protocol and test them on the run's test set.")
    e.add_argument("dir", help="a run directory (or any folder with synset.safetensors + synset.json)")
    e.add_argument("--model", help="network for a cross-architecture check: convnet | resnet18 | resnet18_in | ...")
    e.add_argument("--runs", type=_positive_int, help="evaluation runs (default: the protocol's)")
    e.add_argument("--epochs", type=_positive_int, help="training epochs (default: the protocol's)")
    e.add_argument("--dataset", help="test set (default: the run's)")
    e.add_argument("--data-root", help="extra folder searched for dataset files")
    e.add_argument("--device", default="auto", help="cpu | cuda | auto")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--quiet", "-q", action="store_true")

    pv = sub.add_parser("privacy", help="nearest training images and membership inference for a run's distilled set",
                        description="Measure whether the distilled set in DIR copies training images (distance to the "
                        "nearest training image against test images' distances) and whether a model trained on it "
                        "leaks membership (loss-threshold attack), beside a model trained on the full noisy set. "
                        "Writes DIR/privacy.json, privacy.md, privacy_pairs.png and adds the section to report.md.")
    pv.add_argument("dir", help="a run directory")
    pv.add_argument("--samples", type=_positive_int, default=1000, help="members / non-members (default 1000)")
    pv.add_argument("--reference-epochs", type=_positive_int,
                    help="epochs of the model trained on the full noisy set (default: the baselines' budget)")
    pv.add_argument("--no-reference", action="store_true", help="skip the full-noisy model (and the feature space)")
    pv.add_argument("--data-root", help="extra folder searched for dataset files")
    pv.add_argument("--device", default="auto", help="cpu | cuda | auto")
    pv.add_argument("--quiet", "-q", action="store_true")

    i = sub.add_parser("info", help="versions, compiled extension, datasets found, presets")
    i.add_argument("--json", action="store_true", help="print as JSON")
    return p


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------
def _run_config(args) -> "Any":
    from .pipeline import DEMO, DEMO_OVERRIDES, RunConfig, UsageError, parse_overrides

    given = {k for k in _WHAT if getattr(args, k, None) not in (None, [], False)}
    if not given:
        cfg = RunConfig(**{**DEMO.to_dict(), "baselines": DEMO.baselines,
                           "overrides": {k: dict(v) for k, v in DEMO_OVERRIDES.items()}})
    else:
        cfg = RunConfig(tad=bool(args.tad), out="")
        for k in ("dataset", "noise", "method", "ipc", "preset", "seed", "noise_seed", "imbalance", "label_file",
                  "eval_runs"):
            v = getattr(args, k)
            if v is not None:
                setattr(cfg, k, v)
        if args.label_file and args.noise is None:
            cfg.noise = "file"
        if args.baselines is not None:
            b = [x.strip() for x in args.baselines.split(",") if x.strip()]
            cfg.baselines = () if b in (["none"], []) else tuple(b)
        cfg.overrides = parse_overrides(args.override)
    cfg.method = cfg.method.lower()
    cfg.device = args.device
    cfg.quiet = bool(args.quiet)
    cfg.privacy = not args.no_privacy
    cfg.data_root = args.data_root
    cfg.cache_dir = args.cache_dir
    if args.out:
        cfg.out = args.out
    elif given:
        noise = cfg.noise.replace(":", "").replace("/", "_")
        lt = f"-lt{cfg.imbalance:g}" if cfg.imbalance is not None else ""
        cfg.out = os.path.join("runs", f"{cfg.method}{'-tad' if cfg.tad else ''}-{os.path.basename(str(cfg.dataset))}"
                               f"-{noise}{lt}-ipc{cfg.ipc}-s{cfg.seed}")
    if not isinstance(cfg.ipc, int):
        raise UsageError(f"--ipc must be an integer, got {cfg.ipc!r}")
    return cfg


def _cmd_run(args, argv) -> int:
    from .pipeline import run

    cfg = _run_config(args)
    m = run(cfg, argv=argv)
    from . import distributed

    if not cfg.quiet and distributed.is_main():
        _print_summary(m)
    return 0


def _print_summary(m: Dict[str, Any]) -> None:
    from .report import baseline_title, fmt_acc

    res = m.get("results", {})
    out = m.get("files", {}).get("out_dir", "")
    lines = [f"ddfast: {m.get('command')}"]
    for k in ("distilled", "random_subset", "full_noisy", "gce", "full_clean"):
        if k in res:
            lines.append(f"  {baseline_title(k, (m.get('noise') or {}).get('spec')):40s} {fmt_acc(res[k]):>16s} %")
    lines.append(f"  report: {os.path.join(out, 'report.md')}  ({m.get('total_seconds', 0):.0f} s)")
    print("\n".join(lines))


def _cmd_sweep(args, argv) -> int:
    from .sweep import load_sweep, run_sweep

    spec = load_sweep(args.config)
    if args.device:
        spec["device"] = args.device
    if args.quiet:
        spec["quiet"] = True
    summary = run_sweep(spec, only=args.only, dry_run=args.dry_run, keep_going=args.keep_going)
    from . import distributed

    if not distributed.is_main():
        return 0 if summary.get("n_failed", 0) == 0 else EXIT_FAILURE
    if args.dry_run:
        for c in summary["cells"]:
            print(f"{c['state']:9s} {c['name']}  ->  {c['out']}")
        return 0
    if not spec.get("quiet"):
        print(summary["table_markdown"])
        print(f"ddfast sweep: {summary['n_done']} of {summary['n_cells']} cells done; "
              f"table in {summary['table_md']} and {summary['table_csv']}")
    return 0 if summary["n_failed"] == 0 else EXIT_FAILURE


def _cmd_evaluate(args, argv) -> int:
    from .pipeline import evaluate_dir

    ov = {}
    if args.epochs:
        ov["epochs"] = args.epochs
    r = evaluate_dir(args.dir, model=args.model, runs=args.runs, device=args.device, dataset=args.dataset,
                     data_root=args.data_root, overrides=ov, quiet=args.quiet)
    from . import distributed

    if not distributed.is_main():
        return 0
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{args.dir}: {r['model']} on {r['dataset']}: {r['mean']:.2f} +- {r['std']:.2f} % "
              f"({len(r['accs'])} runs: {', '.join(f'{a:.2f}' for a in r['accs'])}; {r['seconds']:.1f} s)")
    return 0


def _cmd_privacy(args, argv) -> int:
    from .pipeline import privacy_dir

    r = privacy_dir(args.dir, samples=args.samples, reference_epochs=args.reference_epochs,
                    reference=not args.no_reference, device=args.device, data_root=args.data_root, quiet=args.quiet)
    a = r["attack"]
    line = (f"{args.dir}: synthetic images closer to a training image than 99 % of test images: "
            f"{100 * r['pixel']['share_closer_than_test_p01']:.1f} % (network-input space); membership AUC "
            f"{a['distilled']['auc']:.3f} for the distilled set's model")
    if a.get("full_noisy"):
        line += f", {a['full_noisy']['auc']:.3f} for the full noisy set's"
    print(line + f" ({os.path.join(args.dir, 'privacy.md')})")
    return 0


def datasets_found() -> List[Dict[str, Any]]:
    """Where each built-in dataset's files are (without loading them)."""
    from .data import DATASETS, search_dirs

    out = []
    for name in DATASETS:
        if name == "digits":
            out.append({"dataset": name, "found": True, "where": "sklearn.datasets.load_digits (bundled)"})
            continue
        where = None
        for d in search_dirs(name):
            if name in ("fashion-mnist", "mnist"):
                ok = any(os.path.isfile(os.path.join(d, f"train-images-idx3-ubyte{e}")) for e in (".gz", ""))
            elif name == "cifar10":
                ok = os.path.isfile(os.path.join(d, "data_batch_1"))
            else:
                ok = os.path.isfile(os.path.join(d, "train"))
            if ok:
                where = d
                break
        out.append({"dataset": name, "found": where is not None, "where": where or "not found"})
    return out


def _cmd_info(args, argv) -> int:
    import torch

    from ._extension import build_info, has_cuda_kernels, has_extension
    from .distill import describe_presets
    from .pipeline import default_cache_dir, environment_info

    env = environment_info()
    info = {"environment": env, "extension": build_info(), "has_extension": has_extension(),
            "has_cuda_kernels": has_cuda_kernels(), "datasets": datasets_found(), "cache_dir": default_cache_dir(),
            "presets": describe_presets(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    ext = info["extension"]
    print(f"ddfast {env['ddfast']}  torch {env['torch']} (CUDA {env['torch_cuda']})  torchvision "
          f"{env['torchvision']}  Python {env['python']}  {env['platform']}")
    print(f"CPU threads {env['num_threads']} of {env['cpu_count']} cores; CUDA devices: "
          f"{', '.join(info['cuda_devices']) or 'none'}")
    if ext.get("extension"):
        print(f"extension: loaded from {ext.get('path')}; CUDA kernels: {ext.get('cuda_kernels')}; CUDA archs: "
              f"{ext.get('cuda_arch_list') or '-'}; built with torch {ext.get('built_with_torch')}")
    else:
        print(f"extension: not loaded ({ext.get('reason')}); ops use the pure-PyTorch references")
    print("datasets:")
    for d in info["datasets"]:
        print(f"  {d['dataset']:14s} {'found' if d['found'] else 'missing':8s} {d['where']}")
    print(f"cache: {info['cache_dir']}")
    print("presets:")
    for m, presets in info["presets"].items():
        if isinstance(presets, dict) and "error" in presets:
            print(f"  {m}: unavailable ({presets['error']})")
            continue
        for name, doc in (presets or {}).items():
            print(f"  {m} {name}: {doc}")
        if not presets:
            print(f"  {m}: quick, full")
    return 0


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


def _quiet_openmp() -> None:
    """OpenMP threads that wait *passively* (sleep) instead of spinning, unless the user chose otherwise.

    Must run before torch is imported. Measured on the shared 2-core machine (load ~16): one ConvNet-3 SGD
    step with 2 threads took 8.4 s wall / 1.03 s CPU with libgomp's default spin-waiting and 1.06 s / 0.11 s
    with ``OMP_WAIT_POLICY=PASSIVE`` (1 thread: 1.1 s / 0.10 s): spinning threads burn the CPU that the
    descheduled partner thread needs. The price is a wake-up latency per parallel region, small next to the
    convolution-sized work of ddfast. Set ``OMP_WAIT_POLICY=ACTIVE`` to get libgomp's default back.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns the exit code (``sys.exit(main())``)."""
    if "torch" not in sys.modules:
        _quiet_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DDFAST_DEBUG", "0") not in ("", "0")
    from .io import WriteError
    from .pipeline import UsageError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        cmd = {"run": _cmd_run, "sweep": _cmd_sweep, "evaluate": _cmd_evaluate, "privacy": _cmd_privacy,
               "info": _cmd_info}[args.command]
        return cmd(args, argv)
    except _OneLineError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        if debug:
            raise
        print("ddfast: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, FileNotFoundError, WriteError) as exc:
        if debug:
            raise
        print(f"ddfast: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as exc:
        # bad values reaching the library (its checks name the argument)
        if debug:
            raise
        print(f"ddfast: error: {_one_line(exc)} (DDFAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a command-line tool
        if debug:
            raise
        print(f"ddfast: error: {type(exc).__name__}: {_one_line(exc)} (DDFAST_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        from . import distributed

        distributed.destroy()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
