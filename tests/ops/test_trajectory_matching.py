"""Tests of ddfast.ops.trajectory_matching_loss and ddfast.ops.tesla_quantities (MTT eq. 2, TESLA).

Oracles: exact float64 sums (math.fsum) for the loss, the closed-form gradients of the op's docstring evaluated in float64, and
autograd of the explicit TESLA loss L = ||start - lr G - target||^2 / ||start - target||^2 in float64.
Each test runs on the compiled kernel when the extension is loaded, and the reference path is exercised by
forcing the fallback (``ref_path`` fixture).
"""
from __future__ import annotations

import math

import pytest
import torch

import ddfast._extension as ext
from ddfast.ops import TeslaQuantities, tesla_quantities, trajectory_matching_loss

from _helpers import ALL_FLOAT_DTYPES, DEVICES, randn, tol

needs_ext = pytest.mark.skipif(not ext.has_extension(), reason="compiled extension not loaded")
PATHS = ["kernel", "reference"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Runs a test on the compiled kernel and on the pure-PyTorch reference (fallback)."""
    if request.param == "kernel" and not ext.has_extension():
        pytest.skip("compiled extension not loaded")
    if request.param == "reference":
        monkeypatch.setattr(ext, "use_kernel", lambda *a: False)
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# oracles

def fsum_loss(s, e, t):
    """Exact float64 loss per row by math.fsum."""
    s, e, t = (x.detach().double().cpu().reshape(-1, x.shape[-1]) for x in (s, e, t))
    out = []
    for b in range(s.shape[0]):
        num = math.fsum(((s[b] - t[b]) ** 2).tolist())
        den = math.fsum(((e[b] - t[b]) ** 2).tolist())
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64)


def closed_form_grads(s, e, t, g):
    """The closed-form gradients (MTT eq. 2) in float64: dL/ds, dL/de, dL/dt, scaled by the upstream gradient g [B]."""
    s, e, t = (x.detach().double() for x in (s, e, t))
    num = ((s - t) ** 2).sum(-1, keepdim=True)
    den = ((e - t) ** 2).sum(-1, keepdim=True)
    L = num / den
    g = g.double().to(s.device).reshape(num.shape)
    ds = 2 * (s - t) / den * g
    dt = (-2 * (s - t) + 2 * L * (e - t)) / den * g
    de = -2 * L * (e - t) / den * g
    return ds, de, dt


SHAPES = [(1,), (7,), (1000,), (1, 1), (3, 1), (1, 17), (3, 1000), (2, 20_000)]  # 20k > one CPU chunk (16k)


# ---------------------------------------------------------------------------------------------------------------
# values and gradients

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_grads_match_float64(path, device, dtype, shape):
    s = randn(shape, dtype=dtype, device=device, seed=1, requires_grad=True)
    e = randn(shape, dtype=dtype, device=device, seed=2, requires_grad=True)
    t = randn(shape, dtype=dtype, device=device, seed=3, requires_grad=True)
    loss = trajectory_matching_loss(s, e, t)
    assert loss.dtype == dtype and loss.shape == shape[:-1]
    truth = fsum_loss(s, e, t).reshape(shape[:-1])
    torch.testing.assert_close(loss.double().cpu(), truth, **tol(dtype))

    g = randn(shape[:-1], dtype=dtype, device=device, seed=4)
    grads = torch.autograd.grad(loss, (s, e, t), g)
    want = closed_form_grads(s, e, t, g)
    for name, got, ref in zip(("student", "start", "target"), grads, want):
        assert got.dtype == dtype and got.shape == shape, name
        scale = ref.abs().max().item() + 1e-30
        torch.testing.assert_close(got.double().cpu() / scale, ref.cpu() / scale, **tol(dtype, 4.0), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noncontig", ["rowstride", "step", "transpose"])
def test_non_contiguous_inputs(path, device, noncontig):
    shape = (3, 301)
    s = randn(shape, device=device, seed=1, noncontig=noncontig, requires_grad=True)
    e = randn(shape, device=device, seed=2, noncontig=noncontig, requires_grad=True)
    t = randn(shape, device=device, seed=3, noncontig=noncontig)
    assert not s.is_contiguous()
    loss = trajectory_matching_loss(s, e, t)
    torch.testing.assert_close(loss.double().cpu(), fsum_loss(s, e, t), **tol(torch.float32))
    ds, de = torch.autograd.grad(loss.sum(), (s, e))
    ref = closed_form_grads(s, e, t, torch.ones(3))
    torch.testing.assert_close(ds.double().cpu(), ref[0].cpu(), **tol(torch.float32, 10))
    torch.testing.assert_close(de.double().cpu(), ref[1].cpu(), **tol(torch.float32, 10))


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_and_offset_rows(path, device):
    """A stride-0 row dimension (one vector broadcast to B rows) and a storage offset that breaks 16-byte alignment."""
    base = randn((1, 1001), device=device, seed=1)
    s = base.expand(4, 1001)
    buf = randn((4 * 1001 + 1,), device=device, seed=2)
    e = buf[1:].view(4, 1001)  # misaligned pointer
    t = randn((4, 1001), device=device, seed=3)
    loss = trajectory_matching_loss(s, e, t)
    torch.testing.assert_close(loss.double().cpu(), fsum_loss(s, e, t), **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_values(path, device, dtype):
    scale = 1e15 if dtype == torch.float32 else 1e150
    s = randn((2, 500), dtype=dtype, device=device, seed=1, scale=scale)
    e = randn((2, 500), dtype=dtype, device=device, seed=2, scale=scale)
    t = randn((2, 500), dtype=dtype, device=device, seed=3, scale=scale)
    loss = trajectory_matching_loss(s, e, t)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double().cpu(), fsum_loss(s, e, t), **tol(dtype, 10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, False), (False, True, True)])
def test_only_requested_gradients(path, device, which):
    tensors = [randn((2, 333), dtype=torch.float64, device=device, seed=i, requires_grad=r)
               for i, r in enumerate(which)]
    loss = trajectory_matching_loss(*tensors)
    loss.sum().backward()
    ref = closed_form_grads(*tensors, torch.ones(2, dtype=torch.float64, device=device))
    for x, r, want in zip(tensors, which, ref):
        if r:
            torch.testing.assert_close(x.grad, want, **tol(torch.float64))
        else:
            assert x.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(path, device):
    s, e, t = (randn((2, 9), dtype=torch.float64, device=device, seed=i, requires_grad=True) for i in range(3))
    assert torch.autograd.gradcheck(trajectory_matching_loss, (s, e, t))
    assert torch.autograd.gradgradcheck(trajectory_matching_loss, (s, e, t))
    s1, e1, t1 = (x[0].detach().requires_grad_() for x in (s, e, t))
    assert torch.autograd.gradcheck(trajectory_matching_loss, (s1, e1, t1))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(path, device):
    s = torch.zeros(0, 5, device=device, requires_grad=True)
    loss = trajectory_matching_loss(s, torch.zeros(0, 5, device=device), torch.zeros(0, 5, device=device))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert s.grad.shape == (0, 5)


# ---------------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("device", DEVICES)
def test_identical_start_and_target_raises_naming_the_row(path, device):
    s = randn((3, 50), device=device, seed=1)
    e = randn((3, 50), device=device, seed=2)
    t = randn((3, 50), device=device, seed=3)
    t[1] = e[1]
    with pytest.raises(ValueError, match="batch row 1"):
        trajectory_matching_loss(s, e, t)
    with pytest.raises(ValueError, match="batch row 0"):
        trajectory_matching_loss(s[1], e[1], t[1])
    with pytest.raises(ValueError, match="batch row 1"):
        tesla_quantities(e, t, s, 0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_raise_naming_the_argument_on_every_backend(path, device, bad):
    """NaN / inf anywhere in an argument: a ValueError naming it and the row, on the kernel and the reference
    alike (never a NaN loss, never the misleading zero-distance message)."""
    args = {n: randn((3, 40), device=device, seed=k) for k, n in enumerate(("student", "start", "target"))}
    for name in args:
        a = {k: v.clone() for k, v in args.items()}
        a[name][2, 7] = bad
        with pytest.raises(ValueError, match=rf"{name} has NaN or inf values in batch row 2"):
            trajectory_matching_loss(a["student"], a["start"], a["target"])
    for name, key in (("start", "start"), ("target", "target"), ("grad_sum", "student")):
        a = {k: v.clone() for k, v in args.items()}
        a[key][1, 3] = bad
        with pytest.raises(ValueError, match=rf"{name} has NaN or inf values in batch row 1"):
            tesla_quantities(a["start"], a["target"], a["student"], 0.1)
    with pytest.raises(ValueError, match="lr is NaN or inf"):
        tesla_quantities(args["start"], args["target"], args["student"], bad)
    # finite inputs whose squared distance overflows float32
    big = randn((1, 40), device=device, seed=9, scale=1e30)
    with pytest.raises(ValueError, match="overflow"):
        trajectory_matching_loss(big, -big, big * 0.5)


def test_argument_errors(path):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="student must be 1-D or 2-D"):
        trajectory_matching_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="target has shape"):
        trajectory_matching_loss(x, x, torch.randn(3, 5))
    with pytest.raises(ValueError, match="start has shape"):
        trajectory_matching_loss(x, torch.randn(4), x)
    with pytest.raises(TypeError, match="start has dtype float64"):
        trajectory_matching_loss(x, x.double(), x)
    with pytest.raises(TypeError, match="student must have dtype"):
        trajectory_matching_loss(x.long(), x.long(), x.long())
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        trajectory_matching_loss(x, x, x.tolist())
    with pytest.raises(ValueError, match="target is on meta"):
        trajectory_matching_loss(x, x, torch.empty(3, 4, device="meta"))
    with pytest.raises(ValueError, match="P is 0"):
        trajectory_matching_loss(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match="lr must be"):
        tesla_quantities(x, x + 1, x, torch.ones(2))
    with pytest.raises(TypeError, match="lr must be a floating-point"):
        tesla_quantities(x, x + 1, x, torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="lr must be a float or a tensor"):
        tesla_quantities(x, x + 1, x, "0.1")
    with pytest.raises(ValueError, match="grad_sum has shape"):
        tesla_quantities(x, x + 1, torch.randn(3, 5), 0.1)


@needs_ext
def test_raw_ops_check_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="must be 2-D"):
        torch.ops.ddfast.trajectory_matching_loss_forward(x[0], x[0], x[0])
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.ddfast.trajectory_matching_loss_forward(x, x.double(), x)
    with pytest.raises(ValueError, match="lr must have B"):
        torch.ops.ddfast.tesla_quantities(x, x + 1, x, torch.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# TESLA

def tesla_truth(start, target, grad_sum, lr):
    """Autograd of the explicit loss in float64: (loss, dL/dG, dL/dlr) per row."""
    e, t = start.detach().double(), target.detach().double()
    G = grad_sum.detach().double().clone().requires_grad_(True)
    rows = e.shape[0] if e.dim() == 2 else 1
    a = (lr.detach().double().clone() if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64))
    a = a.to(e.device).reshape(-1).expand(rows).clone().requires_grad_(True)
    col = a if e.dim() == 1 else a.unsqueeze(-1)
    col = col.reshape(()) if e.dim() == 1 else col
    loss = ((e - col * G - t) ** 2).sum(-1) / ((e - t) ** 2).sum(-1)
    dG, da = torch.autograd.grad(loss.sum(), (G, a))
    return loss.detach(), dG, da.reshape(loss.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1000,), (1, 5), (3, 777), (2, 20_000)])
@pytest.mark.parametrize("lr_kind", ["float", "scalar", "per_row"])
def test_tesla_quantities_match_autograd_of_explicit_loss(path, device, dtype, shape, lr_kind):
    start = randn(shape, dtype=dtype, device=device, seed=1)
    target = randn(shape, dtype=dtype, device=device, seed=2)
    G = randn(shape, dtype=dtype, device=device, seed=3, scale=0.5)
    if lr_kind == "float":
        lr = 0.37
    elif lr_kind == "scalar":
        lr = torch.tensor(0.37, device=device, requires_grad=True)
    else:
        if len(shape) == 1:
            pytest.skip("per-row lr needs a batch")
        lr = torch.linspace(0.1, 0.9, shape[0], device=device)
    q = tesla_quantities(start, target, G, lr)
    assert isinstance(q, TeslaQuantities)
    loss, dG, da = tesla_truth(start, target, G, lr)
    assert q.loss.shape == loss.shape and q.step_vector.shape == start.shape and q.grad_lr.shape == loss.shape
    assert not q.step_vector.requires_grad and not q.grad_lr.requires_grad
    torch.testing.assert_close(q.loss.double(), loss, **tol(dtype, 2))
    sv = dG.abs().max().item()
    rtol, atol = tol(dtype, 4).values()
    sub = 2.0 ** -24 if dtype == torch.float16 else 0.0  # fp16 subnormal spacing: |v| ~ lr/P can be subnormal
    torch.testing.assert_close(q.step_vector.double(), dG, rtol=rtol, atol=atol * sv + sub)
    torch.testing.assert_close(q.grad_lr.double(), da, **tol(dtype, 16))
    # v = 2 [lr (target - start) + lr^2 G] / den, as tesla_quantities' docstring writes it
    if dtype == torch.float64 and lr_kind != "per_row":
        a = 0.37
        den = ((start - target) ** 2).sum(-1, keepdim=True)
        v = 2 * (a * (target - start) + a * a * G) / den
        torch.testing.assert_close(q.step_vector, v.reshape(start.shape))


@pytest.mark.parametrize("device", DEVICES)
def test_tesla_consistent_with_loss_op(path, device):
    """loss(start - lr G) from the loss op equals TESLA's loss; TESLA's v equals the loss op's dL/dG."""
    start, target, G = (randn((2, 321), dtype=torch.float64, device=device, seed=i) for i in range(3))
    lr = 0.05
    q = tesla_quantities(start, target, G, lr)
    Gv = G.clone().requires_grad_(True)
    loss = trajectory_matching_loss(start - lr * Gv, start, target)
    loss.sum().backward()
    torch.testing.assert_close(q.loss, loss.detach())
    torch.testing.assert_close(q.step_vector, Gv.grad)


# ---------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(device, dtype):
    s, e, t = (randn((3, 37), dtype=dtype, device=device, seed=i) for i in range(3))
    ops = torch.ops.ddfast
    torch.library.opcheck(ops.trajectory_matching_loss_forward, (s, e, t))
    torch.library.opcheck(ops.trajectory_matching_loss_forward, (s.clone().requires_grad_(), e, t.clone().requires_grad_()))
    _, num, den = ops.trajectory_matching_loss_forward(s, e, t)
    g = randn((3,), dtype=dtype, device=device, seed=9)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(ops.trajectory_matching_loss_backward, (g, s, e, t, num, den, mask))
    lr = torch.full((3,), 0.1, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    torch.library.opcheck(ops.tesla_quantities, (s, e, t, lr))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(path, device):
    s = randn((2, 513), device=device, seed=1, requires_grad=True)
    e, t = randn((2, 513), device=device, seed=2), randn((2, 513), device=device, seed=3)

    def step(s, e, t):
        loss = trajectory_matching_loss(s, e, t)
        q = tesla_quantities(e, t, s.detach(), 0.1)
        return loss.sum() + q.loss.sum() + q.grad_lr.sum(), q.step_vector

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if path == "reference" else "inductor")
    out, v = compiled(s, e, t)
    out.backward()
    got = s.grad.clone()
    s.grad = None
    ref_out, ref_v = step(s, e, t)
    ref_out.backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(v, ref_v)
    torch.testing.assert_close(got, s.grad)


def test_check_finite_false_lets_a_non_finite_loss_through(path):
    """For callers with their own handling (DATM's loss gate): the loss comes back non-finite instead of raising."""
    s, e, t = (randn((2, 30), seed=k) for k in range(3))
    s[1, 4] = float("inf")
    loss = trajectory_matching_loss(s, e, t, check_finite=False)
    assert torch.isfinite(loss[0]) and not torch.isfinite(loss[1])
    q = tesla_quantities(e, t, s, 0.1, check_finite=False)
    assert torch.isfinite(q.loss[0]) and not torch.isfinite(q.loss[1])
