"""ddfast.ops.norm_act_pool (instance norm + ReLU/softplus + 2x2 average pooling, fused) against its reference
(the torch.nn.functional composite that GroupNorm(C, C) -> ReLU -> AvgPool2d(2) computes), in float64: values,
gradients, second derivatives, gradcheck / gradgradcheck, opcheck, torch.compile, layouts, the fallback paths and
the errors. CUDA variants run when a GPU is present."""
import itertools

import pytest
import torch

from ddfast import _extension
from ddfast.ops import _reference as R
from ddfast.ops import norm_act_pool
from ddfast.ops.convnet import uses_kernel
from _helpers import DEVICES, tol

needs_ext = pytest.mark.skipif(not _extension.has_extension(), reason="ddfast._C not built")

# (norm, act, pool) variants and the shapes of the ConvNet blocks (28x28 padded to 32x32, 16, 8; odd sizes too)
VARIANTS = [(n, a, p) for n in (True, False) for a in ("relu", "softplus") for p in (True, False)]
SHAPES = [(3, 4, 8, 8), (2, 3, 7, 5), (1, 2, 2, 2)]


def inputs(shape, *, norm=True, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype).to(device)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device) if norm else None
    b = (torch.randn(C, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(device) if norm else None
    if requires_grad:
        x.requires_grad_(True)
        if norm:
            w.requires_grad_(True)
            b.requires_grad_(True)
    return x, w, b


def kw(act, pool):
    return {"act": act, "softplus_beta": 3.0, "pool": pool}


def ref(x, w, b, act, pool):
    return R.norm_act_pool(x, w, b, act, 3.0, pool, 1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm,act,pool", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(device, dtype, norm, act, pool, shape):
    x, w, b = inputs(shape, norm=norm, dtype=dtype, device=device)
    assert uses_kernel(x, w)
    out = norm_act_pool(x, w, b, **kw(act, pool))
    truth = ref(x.double(), None if w is None else w.double(), None if b is None else b.double(), act, pool)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), truth, **tol(dtype, scale=10))


def _losses(fn, x, w, b, seed=1):
    """A first-order loss <y, r> and its gradients w.r.t. (x, w, b), with the graph kept."""
    y = fn(x, w, b)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    params = [t for t in (x, w, b) if t is not None]
    return y, torch.autograd.grad((y * r).sum(), params, create_graph=True)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm,act,pool", VARIANTS)
def test_first_and_second_derivatives_match_reference(device, dtype, norm, act, pool):
    shape = (2, 3, 6, 6)
    got = {}
    for which in ("ddfast", "reference"):
        x, w, b = inputs(shape, norm=norm, dtype=dtype if which == "ddfast" else torch.float64, device=device,
                         requires_grad=True)
        fn = (lambda x, w, b: norm_act_pool(x, w, b, **kw(act, pool))) if which == "ddfast" else \
            (lambda x, w, b: ref(x, w, b, act, pool))
        y, grads = _losses(fn, x, w, b)
        # a scalar of the gradients (what an unrolled inner step feeds the meta-gradient), differentiated again
        g2 = torch.Generator().manual_seed(2)
        s = sum((gi * torch.randn(gi.shape, generator=g2, dtype=torch.float64).to(gi)).sum() for gi in grads)
        params = [t for t in (x, w, b) if t is not None]
        second = torch.autograd.grad(s, params, allow_unused=True)
        got[which] = [t.detach().double() for t in grads] + [torch.zeros(1) if t is None else t.double()
                                                              for t in second]
    for a, r in zip(got["ddfast"], got["reference"]):
        torch.testing.assert_close(a, r, **tol(dtype, scale=100 if dtype == torch.float32 else 10))


@needs_ext
@pytest.mark.parametrize("norm,act,pool", VARIANTS)
def test_gradcheck_and_gradgradcheck_float64(norm, act, pool):
    x, w, b = inputs((2, 2, 4, 4), norm=norm, requires_grad=True, seed=3)
    args = (x, w, b) if norm else (x,)
    fn = (lambda x, w, b: norm_act_pool(x, w, b, **kw(act, pool))) if norm else \
        (lambda x: norm_act_pool(x, None, None, **kw(act, pool)))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-3)


@needs_ext
def test_upstream_gradient_of_the_backward_itself():
    """d/d(grad_out) of the backward (the double backward's first output) through an unrolled SGD step."""
    for which in ("ddfast", "reference"):
        x, w, b = inputs((2, 3, 4, 4), requires_grad=True, seed=5)
        scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        fn = (lambda t: norm_act_pool(t, w, b)) if which == "ddfast" else (lambda t: ref(t, w, b, "relu", True))
        y = fn(x)
        (gx,) = torch.autograd.grad((y * scale).square().sum(), x, create_graph=True)
        (d,) = torch.autograd.grad(gx.square().sum(), scale)
        if which == "ddfast":
            got = d
        else:
            torch.testing.assert_close(got, d, rtol=1e-9, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(device, layout):
    x, w, b = inputs((2, 4, 8, 6), device=device)
    if layout == "channels_last":
        xv = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        xv = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        xv = torch.stack([x, x], 2)[:, :, 0]
    assert torch.equal(xv, x) and not xv.is_contiguous()
    torch.testing.assert_close(norm_act_pool(xv, w, b), norm_act_pool(x, w, b), rtol=0, atol=0)
    wv = torch.stack([w, w], 1)[:, 0]
    torch.testing.assert_close(norm_act_pool(x, wv, b), norm_act_pool(x, w, b), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, b = inputs((2, 3, 4, 4), dtype=torch.float32, device=device)
    for args in ((x, w, b, 0, 60.0, True, 1e-5), (x, None, None, 1, 3.0, False, 1e-5)):
        torch.library.opcheck(torch.ops.ddfast.norm_act_pool_forward.default, args)
        xg = args[0].detach().clone().requires_grad_(True)
        wg = None if args[1] is None else args[1].detach().clone().requires_grad_(True)
        bg = None if args[2] is None else args[2].detach().clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.ddfast.norm_act_pool_forward.default, (xg, wg, bg) + args[3:])
    out, mean, rstd = torch.ops.ddfast.norm_act_pool_forward(x, w, b, 0, 60.0, True, 1e-5)
    gp = torch.randn_like(out)
    torch.library.opcheck(torch.ops.ddfast.norm_act_pool_backward.default,
                          (gp, x, w, b, mean, rstd, 0, 60.0, True, [True, True, True]))
    torch.library.opcheck(torch.ops.ddfast.norm_act_pool_double_backward.default,
                          (torch.randn_like(x), torch.randn_like(w), None, gp, x, w, b, mean, rstd, 0, 60.0, True,
                           [True, True, True, True]))


@needs_ext
def test_torch_compile_fullgraph():
    x, w, b = inputs((2, 3, 8, 8), dtype=torch.float32)
    fn = torch.compile(lambda x, w, b: norm_act_pool(x, w, b).square().sum(), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w, b), norm_act_pool(x, w, b).square().sum())


def test_reference_paths_under_transforms_and_other_dtypes():
    """vmap, jvp and half precision take the reference (custom ops have no batching / forward-mode rules)."""
    x, w, b = inputs((3, 2, 4, 4))
    xs = torch.stack([x, 2 * x])
    v = torch.func.vmap(lambda t: norm_act_pool(t, w, b))(xs)
    torch.testing.assert_close(v[1], ref(2 * x, w, b, "relu", True))
    _, t = torch.func.jvp(lambda t: norm_act_pool(t, w, b, act="softplus", softplus_beta=3.0), (x,), (x,))
    _, t_ref = torch.func.jvp(lambda t: ref(t, w, b, "softplus", True), (x,), (x,))
    torch.testing.assert_close(t, t_ref)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    assert not uses_kernel(xb, wb)
    torch.testing.assert_close(norm_act_pool(xb, wb, bb), ref(xb, wb, bb, "relu", True))


@needs_ext
def test_fallback_equals_kernel(monkeypatch):
    x, w, b = inputs((2, 3, 8, 8), dtype=torch.float32, requires_grad=True)
    y = norm_act_pool(x, w, b)
    monkeypatch.setattr(_extension, "use_kernel", lambda *t: False)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    assert not uses_kernel(x2, w2)
    y2 = norm_act_pool(x2, w2, b2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    (y * y).sum().backward()
    (y2 * y2).sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-5)


@needs_ext
def test_third_derivative_raises_a_clear_error():
    x, w, b = inputs((1, 2, 4, 4), requires_grad=True)
    (g,) = torch.autograd.grad(norm_act_pool(x, w, b).square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(gg.sum(), x)


def test_bad_arguments_name_the_problem():
    x, w, b = inputs((2, 3, 4, 4))
    for call, exc, msg in [
        (lambda: norm_act_pool(x[0], w, b), ValueError, "x must be 4-D"),
        (lambda: norm_act_pool(x, w, None), ValueError, "weight and bias"),
        (lambda: norm_act_pool(x, w[:2], b[:2]), ValueError, r"weight must have shape \[3\]"),
        (lambda: norm_act_pool(x, w.float(), b), TypeError, "weight has dtype"),
        (lambda: norm_act_pool(x, w, b, act="gelu"), ValueError, "act must be one of"),
        (lambda: norm_act_pool(x, w, b, act="softplus", softplus_beta=0), ValueError, "softplus_beta"),
        (lambda: norm_act_pool(x[:, :, :1], w, b), ValueError, "at least 2x2"),
        (lambda: norm_act_pool(x, w, b, eps=0), ValueError, "eps"),
        (lambda: norm_act_pool(x.long(), w, b), TypeError, "x must have dtype"),
        (lambda: norm_act_pool(x, w, b, pool=1), TypeError, "pool must be a bool"),
    ]:
        with pytest.raises(exc, match=msg):
            call()
    if _extension.has_extension():
        with pytest.raises(ValueError, match="grad_out must have shape"):
            out, m, r = torch.ops.ddfast.norm_act_pool_forward(x, w, b, 0, 1.0, True, 1e-5)
            torch.ops.ddfast.norm_act_pool_backward(out[:, :, :1], x, w, b, m, r, 0, 1.0, True, [True] * 3)


@needs_ext
def test_empty_batch_and_masked_outputs():
    x, w, b = inputs((0, 3, 4, 4))
    assert norm_act_pool(x, w, b).shape == (0, 3, 2, 2)
    x, w, b = inputs((2, 3, 4, 4))
    out, m, r = torch.ops.ddfast.norm_act_pool_forward(x, w, b, 0, 1.0, True, 1e-5)
    dx, dw, db = torch.ops.ddfast.norm_act_pool_backward(torch.ones_like(out), x, w, b, m, r, 0, 1.0, True,
                                                         [False, True, False])
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == (3,)


@needs_ext
def test_thread_count_does_not_change_results():
    x, w, b = inputs((8, 16, 16, 16), dtype=torch.float32, requires_grad=True)
    res = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = norm_act_pool(x, w, b)
            gs = torch.autograd.grad(y.square().sum(), (x, w, b))
            res.append([y] + list(gs))
    finally:
        torch.set_num_threads(old)
    for a, c in itertools.zip_longest(*res):
        assert torch.equal(a, c)
