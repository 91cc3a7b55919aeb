"""End to end: one distillation iteration of ddfast's DATM (full unroll and TESLA), DANCE and RCIG
against a plain-PyTorch port of each official per-iteration loop, same config, same process.

What is compared
----------------
``ddfast``: ``Distiller.step()`` of :class:`ddfast.distill.datm.DATM` (``grad_mode`` ``"unroll"`` / ``"tesla"``),
:class:`ddfast.distill.dance.DANCE` (per-class steps, its default; also ``batched_classes=True``) and
:class:`ddfast.distill.rcig.RCIG`, each with its ``quick`` preset on Fashion-MNIST's shape (1x28x28, 10 classes,
IPC 10) and random pixels (the cost of an iteration does not depend on the pixel values).

``reference``: a compact port, written for this benchmark in plain PyTorch, of the per-iteration algorithm as the
official code runs it (``distill/DATM.py``, ``DATM_tesla.py``, ``DANCE.py``, RCIG's ``algorithms.py``), sharing nothing with ddfast's distillers but the
data, the expert / pool parameters and the augmentation (ddfast's DSA / DiffAug, the same in both, so the
comparison is about the distillation loop, not about augmentation):

- DATM / MTT (``distill/DATM.py``): the student is a ConvNet whose parameters live in ONE flat vector and are
  re-attached to the modules before every forward (a ReparamModule, :class:`FlatParamNet`); expert snapshots are
  stored as per-parameter tensors and concatenated each iteration; ``syn_steps`` unrolled steps with
  ``torch.autograd.grad(create_graph=True)``; the normalised parameter distance with ``F.mse_loss(sum)`` / P;
  ``loss.backward()``; the three SGD optimisers step under the gate.
- TESLA (``DATM_tesla.py``): pass 1 keeps ``create_graph=True`` (as that file does) and detaches each gradient;
  pass 2 recomputes each step's gradient with ``create_graph=True``, recomputes ``lr (theta* - theta0) + lr^2 G``
  for every step and back-propagates ``2 (..) . g_i / D`` into images and labels with ``torch.autograd.grad``;
  the learning rate's gradient in closed form (the factor 2 that the official code drops is kept, so the
  gradients can be checked against ddfast's).
- DANCE (``DANCE.py``): every iteration loads the pool model's initial and final ``state_dict`` with
  ``torch.load`` (files in a temporary directory, page cache), interpolates the middle encoder tensor by
  tensor and ``load_state_dict``s it; per class one forward of the concatenated real + synthetic batch (one
  DiffAug draw), the squared distance of the mean features, one SGD step; then per class one calibration
  step (cross entropy of the final model). Multi-formation decode as IDC's ``decode_zoom`` (slices + bilinear
  resize). The networks' parameters are frozen (no parameter gradients), which favours the port.
- RCIG (``algorithms.py``, JAX, ported): the linearised network by ``torch.func.jvp`` of the flat-parameter
  network (primal features + dual logits, recomputed on every call as ``jax.jvp`` does); the inner loss
  ``1/2||R - K alpha||^2 + lambda/2 (tr(alpha^T K alpha) + ||psi||^2)`` with ``K = Phi Phi^T`` and
  ``alpha = torch.linalg.solve(K + lambda I, R)`` formed afresh on every call (no factor reuse), its gradient
  by autograd; the Hessian-vector products forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``);
  ``v = H^-1 g`` by Adam on ``1/2 v^T H v - g^T v`` (the reference's solver; ddfast's preset uses CG with the
  same number of Hessian-vector products); the implicit gradient ``-d/dS [v . grad_psi L_in]`` by double
  backward; clipping, AdaBelief, EMA, and the pool model's Adam steps (the same count as ddfast's step that ran
  just before, so both do the same work).

Checks before timing: DATM (both modes) -- the same loss and the same image / label / lr gradients from the
same start and target parameters, batches and DSA draws (asserted); DANCE -- the same PLTDA and calibration
losses and PLTDA image gradient for the same encoders, batches and DiffAug draw (asserted); RCIG -- the same
outer loss and direct image gradient from the same pool model, support set and real batch (inner solve: Adam
with the same learning rate and step count in both; asserted to rtol 1e-3 / 2e-2).

Timing: :func:`harness.time_fn` of one iteration, ddfast and reference *alternating call by call* in the same
process (``--iters`` of each after a warm-up), median / p20 / p80. Peak memory: each (method, provider) in a
fresh subprocess; after the set-up and one warm-up iteration the resident-set high-water mark is reset
(``echo 5 > /proc/self/clear_refs``) and the peak is ``VmHWM - VmRSS`` after ``--mem-iters`` iterations (the
method of ``bench_distill_datm.py``). Profile (``--profile``): ``torch.profiler`` (CPU) over one ddfast
iteration and one reference iteration per method; the top entries by self CPU time.
The memory children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (:func:`_child_env`): without it glibc keeps the
warm-up iteration's freed blocks resident and the reset high-water mark measures nothing.

Rows: ``benchmarks/results.csv``, benchmark ``e2e_iteration``, provider ``ddfast`` / ``ddfast-batched`` /
``reference``; ``speedup_vs_eager`` = reference median / this median; ``config`` holds the threads, the load
average before and after, the check results and the memory method. ``--json OUT`` also writes everything.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_e2e.py --threads 1 --iters 10 --profile --json /tmp/e2e.json
    python benchmarks/bench_e2e.py --methods datm-unroll,rcig --iters 5 --no-csv
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from harness import proc_status_kb as _status_kb, reset_peak_rss as _reset_hwm  # noqa: E402
from ports.common import PlainConvNet, FlatParamNet  # noqa: E402,F401
from ports.dance import DANCEPort, ref_decode  # noqa: E402
from ports.datm import DATMPort  # noqa: E402
from ports.rcig import RCIGPort  # noqa: E402

import torch  # noqa: E402

METHODS = ("datm-unroll", "datm-tesla", "dance", "rcig")
WIDTH: Optional[int] = None  # --width: the ConvNet width (None: each quick preset's own)
DEVICE: str = "cpu"  # --device
C, IPC, HW = 10, 10, 28
MEAN, STD = (0.286,), (0.353,)


# ==============================================================================================================
# DATM / MTT and TESLA
# ==============================================================================================================
def _datm_train(n_per=40):
    from ddfast.distill.base import TrainSet

    g = torch.Generator().manual_seed(0)
    images = torch.rand(C * n_per, 1, HW, HW, generator=g)
    labels = torch.arange(C).repeat_interleave(n_per)
    return TrainSet(images, labels, C, MEAN, STD, "bench-fmnist-shape")


def datm_config(mode: str):
    from ddfast.distill.datm import preset_config

    # the quick preset (width 32, syn_steps 20, batch_syn 100 = all images, lr_img 100, lr_lr 1e-5, lr_y 2, ZCA,
    # DSA); a one-expert, 3-epoch buffer and start epoch 0 (the cost of an iteration does not depend on them);
    # threshold 1e9 so that every iteration steps the optimisers in both implementations
    expert = {"num_experts": 1, "epochs": 3, "subset_per_class": 40}
    if WIDTH:
        expert["net"] = {"width": WIDTH}
    return preset_config("quick", "fashion-mnist", IPC, grad_mode=mode, expert=expert, sequential_generation=False,
                         min_start_epoch=0, max_start_epoch=1, threshold=1e9, pix_init="real",
                         label_init="first_expert", iterations=10 ** 6)


def datm_build(mode: str, threads: int):
    from ddfast.distill.datm import DATM

    torch.manual_seed(0)
    d = DATM(datm_config(mode), device=DEVICE, quiet=True)
    train = _datm_train()
    d.prepare(train)
    d.initialize(train)
    port = DATMPort(d, mode)
    return d, port


def _net_tol() -> Dict[str, float]:
    """Tolerance of the "same network" checks: float32 rounding on the CPU; on a GPU cuDNN may run the
    convolutions in TF32 (PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``, which the official code
    keeps too), 10-bit mantissas: measured on an H200 at width 128, 2.2e-3 relative / 3.2e-5 absolute."""
    return {"rtol": 1e-2, "atol": 1e-4} if DEVICE.startswith("cuda") else {"rtol": 1e-4, "atol": 1e-5}


def datm_check(d, port) -> Dict[str, float]:
    """Same start/target, plan, images, labels, lr: the same loss and gradients (asserted)."""
    theta0 = d.experts.snapshot(0, 0).to(d.device, torch.float32)  # the buffer lives on the CPU, as in step()
    target = d.experts.snapshot(0, d.config.expert_epochs).to(d.device, torch.float32)
    plan = d._plan()
    for t in (d.image_syn, d.label_syn, d.syn_lr):
        t.grad = None
    # the two networks compute the same function on the same flat parameters
    x = d.image_syn.detach()[:8]
    from ddfast.models import functional_forward

    torch.testing.assert_close(port.net(theta0, x), functional_forward(d._template, theta0, x), **_net_tol())
    loss_d = d._unroll(theta0, target, plan) if d.config.grad_mode == "unroll" else d._tesla(theta0, target, plan)
    loss_r = port.iteration(theta0, target, [(i.cpu(), s) for i, s in plan], step=False)
    out = {"loss_ddfast": float(loss_d), "loss_reference": float(loss_r)}
    assert math.isclose(loss_d, loss_r, rel_tol=1e-3 if DEVICE.startswith("cuda") else 1e-4), out
    for name, a, b in (("images", d.image_syn.grad, port.image_syn.grad), ("labels", d.label_syn.grad,
                                                                          port.label_syn.grad),
                       ("lr", d.syn_lr.grad, port.syn_lr.grad)):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
        out[f"grad_{name}_rel_err"] = rel
        # float32 meta-gradients through 20 unrolled steps differ from the float64 truth by ~2.5e-3 (the port's
        # own images' gradient at width 128; ddfast's fused block 1.6e-3, measured): ReLU masks near zero flip.
        # On a GPU with TF32 convolutions two runs of the SAME code differ by up to 1.4e-2 (H200, width 128)
        assert rel < (5e-2 if DEVICE.startswith("cuda") else 1e-2), (name, out)
    for t in (d.image_syn, d.label_syn, d.syn_lr, port.image_syn, port.label_syn, port.syn_lr):
        t.grad = None
    return out


# ==============================================================================================================
# DANCE
# ==============================================================================================================
def dance_config(batched: bool = False):
    from ddfast.distill.dance import preset_config

    # the quick preset (width 32, batch_real 64, factor 2 -> 40 decoded images per class, lr_img 0.5,
    # num_premodel 3, iter_calib 1); pool of randomly initialised models (no pretraining needed for timing)
    extra = {"pool.net.width": WIDTH} if WIDTH else {}
    return preset_config("quick", "fashion-mnist", IPC, batched_classes=batched, **extra)


def _dance_train(n_per=100):
    from ddfast.distill.base import TrainSet

    g = torch.Generator().manual_seed(0)
    images = torch.rand(C * n_per, 1, HW, HW, generator=g)
    labels = torch.arange(C).repeat_interleave(n_per)
    return TrainSet(images, labels, C, MEAN, STD, "fashion-mnist")


def _dance_random_pool(cfg):
    from ddfast.distill.pool import ModelPool, make_template
    from ddfast.models import flat_params

    pc = cfg.pool
    inits = [flat_params(make_template(pc, 1, C, (HW, HW), seed=2 * k)).detach() for k in range(cfg.pool.amount)]
    finals = [flat_params(make_template(pc, 1, C, (HW, HW), seed=2 * k + 1)).detach()
              for k in range(cfg.pool.amount)]
    return ModelPool(make_template(pc, 1, C, (HW, HW), seed=0), torch.stack(inits), torch.stack(finals))


def dance_build(batched: bool, threads: int, tmpdir: str):
    from ddfast.distill.dance import DANCE

    torch.manual_seed(0)
    cfg = dance_config(batched)
    d = DANCE(cfg, device=DEVICE, quiet=True)
    d.set_pool(_dance_random_pool(cfg))
    train = _dance_train()
    d.train = train
    d.prepare(train)
    d.initialize(train)
    return d, DANCEPort(d, tmpdir)


def dance_check(d, port) -> Dict[str, float]:
    from ddfast.distill.dance import decode

    k, lam = 1, 0.37
    d._load_encoders(k, torch.tensor([lam]))
    port.load_models(k, lam)
    c = 3
    real = port.real_by_class[c][:d.config.batch_real]
    torch.testing.assert_close(ref_decode(d.data[:IPC].detach(), 2), decode(d.data[:IPC].detach(), 2))
    out = {}
    xd = d.data.detach().clone().requires_grad_(True)
    xr = port.data.detach().clone().requires_grad_(True)
    syn_d = decode(xd[c * IPC:(c + 1) * IPC], d.config.factor)
    syn_r = ref_decode(xr[c * IPC:(c + 1) * IPC], d.config.factor)
    ld = d.pltda_loss(d._mid, real, syn_d, 12345)
    lr_ = port.pltda(real, syn_r, 12345)
    ld.backward()
    lr_.backward()
    out["pltda_ddfast"], out["pltda_reference"] = float(ld), float(lr_)
    out["pltda_grad_rel_err"] = float((xd.grad - xr.grad).norm() / xr.grad.norm())
    assert math.isclose(float(ld), float(lr_), rel_tol=1e-4), out
    assert out["pltda_grad_rel_err"] < 1e-3, out
    cd = d.calib_loss(d._expert, syn_d.detach(), c, 777)
    cr = port.calib(syn_r.detach(), c, 777)
    out["calib_ddfast"], out["calib_reference"] = float(cd), float(cr)
    assert math.isclose(float(cd), float(cr), rel_tol=1e-4), out
    return out


# ==============================================================================================================
# RCIG
# ==============================================================================================================
def rcig_config():
    from ddfast.distill.rcig import preset_config

    # the quick preset: widths 16/32/64, softplus beta 60, support n = 100 (no flips for grey images), real
    # batch 256, 8 inner Adam steps (auto-tuned lr), 8 H^-1 steps (ddfast: CG; reference: Adam), AdaBelief, EMA,
    # pool of 10 models with randint(1, 16) Adam steps per iteration
    extra = {"base_width": WIDTH} if WIDTH else {}
    return preset_config("quick", "fashion-mnist", IPC, iterations=10 ** 6, **extra)


def _rcig_train(n_per=300):
    from ddfast.distill.base import TrainSet

    g = torch.Generator().manual_seed(0)
    images = torch.rand(C * n_per, 1, HW, HW, generator=g)
    labels = torch.arange(C).repeat_interleave(n_per)
    return TrainSet(images, labels, C, MEAN, STD, "fashion-mnist")


def rcig_build(threads: int):
    from ddfast.distill.rcig import RCIG

    torch.manual_seed(0)
    d = RCIG(rcig_config(), device=DEVICE, quiet=True)
    train = _rcig_train()
    d.prepare(train)
    d.initialize(train)
    d.inner_lr = d._tune_inner_lr(0)  # the one-off start-up tuning (ddfast's first step would do it)
    return d, RCIGPort(d)


def rcig_check(d, port) -> Dict[str, float]:
    from ddfast.distill.rcig import meta_step

    cfg = d.config
    k = 2
    g = torch.Generator().manual_seed(5)
    sel = torch.randperm(d.train.images.shape[0], generator=g)[:cfg.real_batch_size]
    real_x = d._net_input(d.train.images[sel])
    real_y = d.train.labels[sel].to(d.device)
    # the networks agree
    from ddfast.models import functional_forward

    x8 = d.images.detach()[:8]
    torch.testing.assert_close(port.net(d.pool_params[k], x8), functional_forward(d.model, d.pool_params[k], x8),
                               **_net_tol())
    res = meta_step(d.model, d._params(k), d.images, d.labels, d.log_temp, real_x, real_y,
                    ridge=cfg.l2_rate * d.images.shape[0], n_inner_steps=cfg.n_inner_steps, inner_solver="adam",
                    inner_lr=d.inner_lr, n_hinv_steps=cfg.n_hinv_steps, hinv_solver=cfg.hinv_solver,
                    use_flip=False, margin=cfg.margin, clip_implicit=cfg.clip_implicit, learn_labels=True)
    loss, _, _, _, d_x = port.meta(port.pool[k], d.images, d.labels, d.log_temp, real_x, real_y)
    out = {"outer_loss_ddfast": res.loss, "outer_loss_reference": loss,
           "direct_grad_images_rel_err": float((res.direct_images - d_x).norm() / d_x.norm())}
    assert math.isclose(res.loss, loss, rel_tol=1e-3), out
    assert out["direct_grad_images_rel_err"] < 2e-2, out
    return out


# ==============================================================================================================
# set-up, timing, memory, profile
# ==============================================================================================================
@contextlib.contextmanager
def plain_modules():
    """Models built inside use the plain GroupNorm -> ReLU -> AvgPool2d modules (``DDFAST_FUSED=0``)."""
    old = os.environ.get("DDFAST_FUSED")
    os.environ["DDFAST_FUSED"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DDFAST_FUSED"]
        else:
            os.environ["DDFAST_FUSED"] = old


def build(method: str, threads: int, tmpdir: str, plain: bool = True):
    """Returns ``(providers {name: fn}, check dict)``; every fn runs one iteration. ``ddfast`` uses the fused
    ConvNet block (the default), ``ddfast-plain`` the same distiller on the plain modules."""
    if method.startswith("datm"):
        mode = method.split("-")[1]
        d, port = datm_build(mode, threads)
        chk = datm_check(d, port)
        provs = {"ddfast": d.step, "reference": port.iteration}
        if plain:
            with plain_modules():
                dp, _ = datm_build(mode, threads)
            provs["ddfast-plain"] = dp.step
        return provs, chk
    if method == "dance":
        d, port = dance_build(False, threads, tmpdir)
        chk = dance_check(d, port)
        provs = {"ddfast": d.step, "reference": port.iteration}
        if plain:
            with plain_modules():
                dp, _ = dance_build(False, threads, tmpdir)
            provs["ddfast-plain"] = dp.step
        return provs, chk
    if method == "rcig":
        d, port = rcig_build(threads)
        chk = rcig_check(d, port)
        last = {"n": None}

        def dd_step():
            r = d.step()
            d.iteration += 1
            last["n"] = int(r["pool_steps"])
            return r

        def ref_step():
            return port.iteration(last["n"])  # the same number of pool steps as ddfast's last step

        return {"ddfast": dd_step, "reference": ref_step}, chk
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def time_alternating(provs: Dict[str, Callable], iters: int, reverse: bool = False) -> Dict[str, List[float]]:
    from harness import time_fn

    dev = torch.device(DEVICE)
    if reverse:  # reference first in every round (to see whether the order matters)
        provs = dict(reversed(list(provs.items())))
    for fn in provs.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {k: [] for k in provs}
    for _ in range(iters):
        for k, fn in provs.items():
            times[k] += time_fn(fn, dev, warmup=0, repeats=1, min_time_s=0.0)
    return times


def mem_child(method: str, provider: str, iters: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        provs, _ = build(method, threads, tmp, plain=provider == "ddfast-plain")
        fn = provs[provider]  # (RCIG's reference, run alone, draws its own pool-step count)
        fn()  # warm-up
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            return {"peak_bytes": int(torch.cuda.max_memory_allocated() - base), "base_bytes": int(base),
                    "method": "torch.cuda.max_memory_allocated - memory_allocated"}
        ok = _reset_hwm()
        base = _status_kb("VmRSS") * 1024
        for _ in range(iters):
            fn()
        if ok:
            peak = _status_kb("VmHWM") * 1024 - base
            how = "VmHWM (clear_refs reset) - VmRSS"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
            how = "ru_maxrss - VmRSS (no clear_refs)"
    return {"peak_bytes": int(peak), "base_bytes": int(base), "method": how}


def _child_env() -> Dict[str, str]:
    """The memory children's environment: glibc's mmap threshold fixed at 128 KiB. By default glibc raises the
    threshold after the first large free (up to 32 MiB), so the warm-up iteration's freed activations stay
    resident in the heap: VmRSS after the warm-up then already holds them and ``VmHWM - VmRSS`` reads ~0
    (measured here: -0.2 MiB for DATM's unroll, base 3.9 GB). With a fixed threshold every block >= 128 KiB is
    mmapped and returned on free (same run: base 0.8 GB, peak 1.5 GB). One thread per child."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def profile_one(fn: Callable, top: int = 8) -> List[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    return [{"name": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
             "self_pct": round(100 * e.self_cpu_time_total / total, 1), "calls": int(e.count)} for e in avgs[:top]] + \
        [{"name": "(total self CPU)", "self_cpu_ms": round(total / 1e3, 2), "self_pct": 100.0, "calls": 0}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=8, help="timed iterations of each provider (alternating)")
    ap.add_argument("--mem-iters", type=int, default=2)
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--reverse", action="store_true", help="run the reference first in each round")
    ap.add_argument("--width", type=int, default=None, help="ConvNet width (default: each quick preset's)")
    ap.add_argument("--no-plain", action="store_true", help="skip the ddfast-plain provider (plain modules)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory is then torch.cuda's peak allocation)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--provider", default="ddfast", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global WIDTH, DEVICE
    WIDTH, DEVICE = args.width, args.device
    if args.child:
        print("RESULT " + json.dumps(mem_child(args.child, args.provider, args.mem_iters, args.threads)), flush=True)
        return None
    import harness
    from ddfast import _extension

    results: Dict[str, Any] = {"threads": args.threads, "device": harness.device_name(torch.device(DEVICE)),
                               "torch": torch.__version__, "extension": _extension.has_extension(), "methods": {}}
    rows = []
    for method in args.methods.split(","):
        load0 = [round(v, 2) for v in os.getloadavg()]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            provs, chk = build(method, args.threads, tmp, plain=not args.no_plain)
            print(f"[{method}] check: {json.dumps(chk)}", flush=True)
            times = time_alternating(provs, args.iters, reverse=args.reverse)
            prof = {}
            if args.profile:
                for name in ("ddfast", "reference"):
                    prof[name] = profile_one(provs[name], top=8)
        load1 = [round(v, 2) for v in os.getloadavg()]
        mem = {}
        if not args.no_mem:
            for name in provs:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--provider", name,
                       "--threads", str(args.threads), "--mem-iters", str(args.mem_iters)]
                if args.width:
                    cmd += ["--width", str(args.width)]
                cmd += ["--device", DEVICE]
                out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode != 0 or not line:
                    print(f"[{method}] memory child {name} failed: {out.stderr.strip().splitlines()[-3:]}")
                    continue
                mem[name] = json.loads(line[0][7:])
        load2 = [round(v, 2) for v in os.getloadavg()]
        med = {k: harness.quantiles(v) for k, v in times.items()}
        ref_med = med["reference"][0]
        entry = {"check": chk, "load_before": load0, "load_after_timing": load1, "load_after_memory": load2,
                 "wall_s": round(time.perf_counter() - t0, 1), "times_ms": {k: [round(t, 2) for t in v]
                                                                             for k, v in times.items()},
                 "median_ms": {k: round(v[0], 2) for k, v in med.items()},
                 "ratio_ref_over": {k: round(ref_med / v[0], 3) for k, v in med.items()},
                 "peak_mib": {k: round(v["peak_bytes"] / 2 ** 20, 1) for k, v in mem.items()},
                 "base_mib": {k: round(v["base_bytes"] / 2 ** 20, 1) for k, v in mem.items()},
                 "profile": prof}
        results["methods"][method] = entry
        for prov, (m, p20, p80) in med.items():
            cfg = {"method": method, "preset": "quick fashion-mnist ipc=10 (random pixels)", "threads": args.threads,
                   "width": args.width or "preset",
                   "loadavg_before": load0, "loadavg_after": load1, "iterations_timed": len(times[prov]),
                   "alternating": "reference first" if args.reverse else "ddfast first", "check": chk,
                   "memory_method": mem.get(prov, {}).get("method", ""),
                   "base_mib": entry["base_mib"].get(prov, "")}
            rows.append({
                "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": "e2e_iteration",
                "case": f"{method} fmnist-shape ipc=10 quick", "provider": prov, "mode": "fwd+bwd", "dtype": "float32",
                "device": DEVICE, "device_name": harness.device_name(torch.device(DEVICE)), "threads": args.threads,
                "median_ms": round(m, 3), "p20_ms": round(p20, 3), "p80_ms": round(p80, 3),
                "speedup_vs_eager": round(ref_med / m, 3), "gb_per_s": "", "copy_bw_share": "",
                "peak_mem_mib": entry["peak_mib"].get(prov, ""), "config": json.dumps(cfg, sort_keys=True),
                "git_commit": harness.git_commit(), "torch": torch.__version__,
                "ddfast_extension": _extension.has_extension()})
        print(f"[{method}] " + "  ".join(f"{k}: {v[0]:.1f} ms (p20 {v[1]:.1f}, p80 {v[2]:.1f}), "
                                         f"peak {entry['peak_mib'].get(k, '-')} MiB"
                                         for k, v in med.items()) +
              f"  ref/ddfast {entry['ratio_ref_over']['ddfast']:.2f}x  load {load0} -> {load2}", flush=True)
        for name, top in prof.items():
            print(f"  profile {name}:")
            for e in top:
                print(f"    {e['self_cpu_ms']:>9.2f} ms {e['self_pct']:>5.1f}% {e['calls']:>6}  {e['name']}")
    print()
    print(f"{'method':<13} {'provider':<15} {'median ms':>10} {'p20':>9} {'p80':>9} {'ref/this':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['case'].split()[0]:<13} {r['provider']:<15} {r['median_ms']:>10.1f} {r['p20_ms']:>9.1f} "
              f"{r['p80_ms']:>9.1f} {r['speedup_vs_eager']:>9.2f} {str(r['peak_mem_mib']):>9}")
    if rows and not args.no_csv:
        harness.append_rows(rows)
        print(f"appended {len(rows)} rows to {harness.RESULTS_CSV}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
