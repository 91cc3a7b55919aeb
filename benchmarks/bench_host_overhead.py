"""Host time per call of the fused ConvNet block (``ddfast.ops.norm_act_pool``) at a size where the arithmetic is
negligible, against the eager composite (``group_norm -> relu -> avg_pool2d``).

On a GPU the ConvNet's kernels take microseconds, so what bounds an iteration is the host: Python, argument
checks, the dispatcher and autograd's bookkeeping per op. This measures that cost on any machine: process CPU
time per call (median of 7 rounds of 300 calls, one thread) of forward, forward + backward, and forward +
backward with ``create_graph=True`` + backward again (DATM's unrolled step), on ``x [2, 4, 4, 4]``.

To compare two versions of ddfast, run it once per checkout, alternating::

    for i in 1 2 3; do for v in OLD NEW; do PYTHONPATH=$v python benchmarks/bench_host_overhead.py; done; done
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from ddfast.ops import norm_act_pool

    torch.set_num_threads(1)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)

    def eager(t):
        return F.avg_pool2d(F.relu(F.group_norm(t, 4, w, b)), 2)

    def fused(t):
        return norm_act_pool(t, w, b, act="relu", pool=True)

    def fwd_bwd(f):
        f(x).sum().backward()

    def fwd_bwd_bwd2(f):
        (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        g.square().sum().backward()

    out = {}
    for mode, call in (("fwd", lambda f: f(x)), ("fwd+bwd", fwd_bwd), ("fwd+bwd+bwd2", fwd_bwd_bwd2)):
        for f in (eager, fused):
            for _ in range(50):
                call(f)
        times = {"eager": [], "ddfast": []}
        for _ in range(7):
            for name, f in (("eager", eager), ("ddfast", fused)):
                t0 = time.process_time()
                for _ in range(300):
                    call(f)
                times[name].append((time.process_time() - t0) / 300 * 1e6)
        out[mode] = {k: round(sorted(v)[3], 1) for k, v in times.items()}
    print(json.dumps({"us_per_call": out}))


if __name__ == "__main__":
    main()
