"""ddfast.ops.conv2d (a convolution whose backward is differentiable with convolution kernels, and whose 1-4
input-channel 3x3 case runs on direct CPU kernels) and ddfast.ops.avg_pool_2x2 / avg_pool_2x2_adjoint (2x2 average
pooling as strided sums), against torch.nn.functional in float64: values, first, second and third derivatives,
gradcheck / gradgradcheck, the direct kernels against ATen's convolution_backward, opcheck, the errors, and thread
independence."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ddfast import _extension
from ddfast.ops import avg_pool_2x2, avg_pool_2x2_adjoint, conv2d
from ddfast.ops.convnet import _ConvGeom, _direct_primitives
from _helpers import tol

needs_ext = pytest.mark.skipif(not _extension.has_extension(), reason="ddfast._C not built")

# (N, C_in, C_out, H, W, padding, stride, groups): the ConvNet's first layers (28x28 with padding 3, RGB 32x32),
# a wide first layer (ATen path for gradients), inner layers, odd sizes, padding 0, stride 2 and groups (ATen)
CASES = [(3, 1, 5, 8, 8, 3, 1, 1), (2, 3, 4, 7, 9, 1, 1, 1), (2, 1, 70, 6, 5, 1, 1, 1), (2, 6, 4, 6, 6, 1, 1, 1),
         (2, 2, 3, 5, 4, 0, 1, 1), (2, 4, 4, 7, 7, 2, 1, 1), (2, 4, 6, 9, 8, 1, 2, 1), (2, 4, 6, 6, 6, 1, 1, 2)]


def _inputs(case, dtype=torch.float64, seed=0):
    N, C, O, H, W, p, st, gr = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = torch.randn(O, C // gr, 3, 3, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    b = torch.randn(O, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return x, w, b, dict(stride=st, padding=p, groups=gr)


def _derivatives(fn, x, w, b, kw):
    """Value, first derivatives (create_graph), second and third derivatives of a scalar built from them."""
    y = fn(x, w, b, **kw)
    r = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    g = torch.autograd.grad((y * r).sum(), (x, w, b), create_graph=True)
    s2 = sum((gi * gi).sum() for gi in g)
    g2 = torch.autograd.grad(s2, (x, w), create_graph=True)
    s3 = sum((gi.sin()).sum() for gi in g2)
    g3 = torch.autograd.grad(s3, (x, w))
    return [y, *g, *g2, *g3]


@pytest.mark.parametrize("case", CASES)
def test_conv2d_values_and_three_derivatives_match_functional_float64(case):
    x, w, b, kw = _inputs(case)
    ours = _derivatives(conv2d, x, w, b, kw)
    ref = _derivatives(F.conv2d, x, w, b, kw)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_conv2d_gradcheck_and_gradgradcheck(case):
    x, w, b, kw = _inputs(case)
    fn = lambda x, w, b: conv2d(x, w, b, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_float32_and_float64_against_float64_functional(dtype):
    for case in CASES[:4]:
        x, w, b, kw = _inputs(case, dtype=dtype, seed=3)
        y = conv2d(x, w, b, **kw)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
        x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
        y64 = F.conv2d(x64, w64, b64, **kw)
        rx, rw = torch.autograd.grad(y64.square().sum(), (x64, w64))
        t = tol(dtype, scale=10.0)
        rtol, atol = t["rtol"], t["atol"]
        torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=atol)
        torch.testing.assert_close(gx.double(), rx, rtol=rtol, atol=atol * 10)
        torch.testing.assert_close(gw.double(), rw, rtol=rtol, atol=atol * 100)


@needs_ext
def test_direct_kernels_are_used_where_the_table_says():
    x = torch.randn(2, 1, 8, 8)
    assert _ConvGeom.of(x, torch.randn(32, 1, 3, 3), [1, 1], [3, 3], [1, 1], 1).direct == {"fwd", "gin", "gw"}
    assert _ConvGeom.of(x, torch.randn(128, 1, 3, 3), [1, 1], [3, 3], [1, 1], 1).direct == {"fwd"}
    x3 = torch.randn(2, 3, 8, 8)
    assert not _ConvGeom.of(x3, torch.randn(32, 3, 3, 3), [1, 1], [1, 1], [1, 1], 1).direct
    assert not _ConvGeom.of(x, torch.randn(32, 1, 3, 3), [2, 2], [1, 1], [1, 1], 1).direct
    assert not _ConvGeom.of(x3, torch.randn(32, 3, 5, 5), [1, 1], [1, 1], [1, 1], 1).direct
    assert not _ConvGeom.of(torch.randn(2, 8, 8, 8), torch.randn(32, 8, 3, 3), [1, 1], [1, 1], [1, 1], 1).direct
    assert _direct_primitives(1, 64) == {"fwd", "gin", "gw"} and _direct_primitives(5, 8) == frozenset()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 1, 32, 28, 28, 3), (2, 3, 8, 9, 7, 1), (2, 4, 5, 5, 6, 0), (1, 2, 3, 4, 4, 2),
                                   (2, 1, 4, 3, 3, 5)])
def test_direct_kernels_match_aten(dtype, shape):
    N, C, O, H, W, p = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    gy = torch.randn(N, O, H + 2 * p - 2, W + 2 * p - 2, generator=g, dtype=torch.float64)
    ry = F.conv2d(x, w, b, padding=p)
    rx, rw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                                                    [True, True, False])
    D = torch.ops.ddfast
    xs, ws, bs, gs = (t.to(dtype) for t in (x, w, b, gy))
    t = tol(dtype, scale=10.0)
    rtol, atol = t["rtol"], t["atol"]
    torch.testing.assert_close(D.conv3x3_forward(xs, ws, bs, p).double(), ry, rtol=rtol, atol=atol)
    torch.testing.assert_close(D.conv3x3_forward(xs, ws, None, p).double(), ry - b.view(1, -1, 1, 1), rtol=rtol,
                               atol=atol)
    torch.testing.assert_close(D.conv3x3_input_grad(gs, ws, p, H, W).double(), rx, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(D.conv3x3_weight_grad(gs, xs, p).double(), rw, rtol=rtol, atol=atol * 100)


@needs_ext
def test_direct_kernels_opcheck_and_layouts():
    D = torch.ops.ddfast
    x = torch.randn(2, 1, 6, 6)
    w = torch.randn(4, 1, 3, 3)
    g = torch.randn(2, 4, 8, 8)
    torch.library.opcheck(D.conv3x3_forward.default, (x, w, torch.randn(4), 2))
    torch.library.opcheck(D.conv3x3_input_grad.default, (g, w, 2, 6, 6))
    torch.library.opcheck(D.conv3x3_weight_grad.default, (g, x, 2))
    # channels-last / sliced inputs are read as NCHW
    xc = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(D.conv3x3_forward(xc, w3, None, 1), F.conv2d(xc, w3, None, padding=1))
    xs = torch.randn(2, 3, 6, 12)[..., ::2]
    torch.testing.assert_close(D.conv3x3_forward(xs, w3, None, 1), F.conv2d(xs, w3, None, padding=1))


@needs_ext
def test_direct_kernels_name_bad_arguments():
    D = torch.ops.ddfast
    x, w = torch.randn(2, 1, 6, 6), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="at most 4 input channels"):
        D.conv3x3_forward(torch.randn(2, 5, 6, 6), torch.randn(4, 5, 3, 3), None, 1)
    with pytest.raises(ValueError, match="weight must be"):
        D.conv3x3_forward(x, torch.randn(4, 1, 5, 5), None, 1)
    with pytest.raises(ValueError, match="channels but weight expects"):
        D.conv3x3_forward(torch.randn(2, 2, 6, 6), w, None, 1)
    with pytest.raises(ValueError, match="bias must be"):
        D.conv3x3_forward(x, w, torch.randn(3), 1)
    with pytest.raises(ValueError, match="padding"):
        D.conv3x3_forward(x, w, None, -1)
    with pytest.raises(TypeError, match="float32 or float64"):
        D.conv3x3_forward(x.half(), w.half(), None, 1)
    with pytest.raises(ValueError, match="is not the output"):
        D.conv3x3_input_grad(torch.randn(2, 4, 5, 5), w, 1, 6, 6)
    with pytest.raises(ValueError, match="is not the output"):
        D.conv3x3_weight_grad(torch.randn(2, 4, 5, 5), x, 1)


@needs_ext
def test_direct_kernels_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 28, 28, generator=g)
    w = torch.randn(32, 1, 3, 3, generator=g)
    gy = torch.randn(16, 32, 32, 32, generator=g)
    D = torch.ops.ddfast
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append([D.conv3x3_forward(x, w, None, 3), D.conv3x3_input_grad(gy, w, 3, 28, 28),
                        D.conv3x3_weight_grad(gy, x, 3)])
    finally:
        torch.set_num_threads(old)
    for a, c in itertools.zip_longest(*res):
        assert torch.equal(a, c)


# ---- 2x2 average pooling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 5), (1, 1, 2, 3)])
def test_avg_pool_2x2_and_adjoint_match_functional_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    ours = _pool_derivatives(avg_pool_2x2, x)
    ref = _pool_derivatives(lambda t: F.avg_pool2d(t, 2, 2), x)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-14)
    gp = torch.randn(ours[0].shape, generator=g, dtype=torch.float64)
    (rx,) = torch.autograd.grad(F.avg_pool2d(x, 2, 2), x, gp)
    torch.testing.assert_close(avg_pool_2x2_adjoint(gp, shape), rx, rtol=1e-12, atol=1e-14)
    gq = gp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: avg_pool_2x2_adjoint(t, shape), (gq,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))


def _pool_derivatives(fn, x):
    y = fn(x)
    g = torch.autograd.grad((y * y).sum(), x, create_graph=True)[0]
    (g2,) = torch.autograd.grad(g.sin().sum(), x)
    return [y, g, g2]
