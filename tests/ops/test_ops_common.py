"""Extension loading, build facts and the pure-PyTorch fallback of ddfast.ops (all op families)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ddfast
import ddfast._extension as ext
import ddfast.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILT_SO = [f for f in os.listdir(os.path.join(ROOT, "ddfast")) if f.startswith("_C") and f.endswith(".so")]


def test_public_api_names():
    for name in ("trajectory_matching_loss", "kernel_ridge_regression", "sample_stats", "classwise_gmm",
                 "anchor_distances", "has_extension", "tesla_quantities", "build_info"):
        assert callable(getattr(ops, name)), name
    assert ops.TeslaQuantities._fields == ("loss", "step_vector", "grad_lr")


def test_has_extension_agrees_with_build_info():
    info = ops.build_info()
    assert isinstance(ops.has_extension(), bool)
    assert info["extension"] is ops.has_extension()
    if ops.has_extension():
        assert info["built_with_torch"] == torch.__version__, "ddfast._C was built against another torch: rebuild"
        assert isinstance(info["cuda_kernels"], bool)
        assert ops.has_cuda_kernels() is info["cuda_kernels"]
        if info["cuda_kernels"]:
            archs = info["cuda_arch_list"].replace(" ", ";").split(";")
            assert archs and all(a for a in archs)
    else:
        assert info["reason"]


@pytest.mark.skipif(not BUILT_SO or os.environ.get("DDFAST_DISABLE_EXTENSION", "0") not in ("", "0"),
                    reason="no compiled ddfast._C in the source tree")
def test_built_extension_loads():
    """A compiled _C next to the package must load (a silent fallback would hide a broken build)."""
    assert ext.has_extension(), ext.load_error()
    for op in ("trajectory_matching_loss_forward", "tesla_quantities", "kernel_ridge_regression_forward",
               "kernel_ridge_regression_solve"):
        assert hasattr(torch.ops.ddfast, op)


@pytest.mark.skipif(not torch.cuda.is_available() or not ops.has_cuda_kernels(), reason="needs a GPU and CUDA kernels")
def test_cuda_kernels_serve_cuda_tensors():
    x = torch.ones(3, device="cuda")
    assert ext.use_kernel(x)


def test_use_kernel_rules():
    x = torch.ones(2)
    assert ext.use_kernel(x) is ext.has_extension()
    assert ext.use_kernel(x, None) is ext.has_extension()


_CHILD = r"""
import json, torch, ddfast.ops as o, ddfast._extension as ext
from ddfast.ops.krr import krr_factor, krr_solve
g = torch.Generator().manual_seed(0)
s, e, t = (torch.randn(2, 300, generator=g, dtype=torch.float64) for _ in range(3))
s.requires_grad_(True)
loss = o.trajectory_matching_loss(s, e, t)
loss.sum().backward()
q = o.tesla_quantities(e, t, s.detach(), 0.1)
xs, ys, xq = (torch.randn(2, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
xs.requires_grad_(True)
pred = o.kernel_ridge_regression(xs, ys, xq[:, :4], 0.5)
pred.square().sum().backward()
alpha = krr_solve(krr_factor(xs.detach(), 0.5), ys)
print(json.dumps({"has_extension": o.has_extension(), "reason": ext.load_error(),
                  "loss": loss.tolist(), "grad": s.grad.sum().item(), "tesla": q.grad_lr.tolist(),
                  "pred": pred.sum().item(), "xs_grad": xs.grad.sum().item(), "alpha": alpha.sum().item()}))
"""


_CHILD_CACHE = {}


def _child(env_extra):
    key = tuple(sorted(env_extra.items()))
    if key in _CHILD_CACHE:
        return _CHILD_CACHE[key]
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    _CHILD_CACHE[key] = json.loads(out.stdout.strip().splitlines()[-1]), out.stderr
    return _CHILD_CACHE[key]


def test_fallback_with_extension_disabled_matches_kernels():
    """DDFAST_DISABLE_EXTENSION=1: the references serve every op, with the kernels' values."""
    off, stderr = _child({"DDFAST_DISABLE_EXTENSION": "1"})
    assert off["has_extension"] is False
    assert "DDFAST_DISABLE_EXTENSION" in off["reason"]
    assert "compiled ops unavailable" not in stderr  # disabling on purpose is not a warning
    on, _ = _child({"DDFAST_DISABLE_EXTENSION": "0"})
    assert on["has_extension"] is ext.has_extension()
    for key in ("loss", "grad", "tesla", "pred", "xs_grad", "alpha"):
        torch.testing.assert_close(torch.tensor(on[key], dtype=torch.float64),
                                   torch.tensor(off[key], dtype=torch.float64), rtol=1e-10, atol=1e-12, msg=key)


def test_package_imports_without_extension_error():
    """ddfast imports even when _C cannot be imported (here: disabled), and says why."""
    off, _ = _child({"DDFAST_DISABLE_EXTENSION": "1"})
    assert off["reason"]
    assert ddfast.__version__
