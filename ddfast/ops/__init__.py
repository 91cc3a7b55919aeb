"""ddfast's fused ops, with autograd, fake kernels for ``torch.compile`` and pure-PyTorch fallbacks.

Public ops (each op's maths, gradients and error behaviour in its docstring):

- :func:`trajectory_matching_loss` -- MTT/DATM normalised parameter distance (MTT eq. 2), with
  :func:`tesla_quantities` for TESLA's constant-memory meta-gradient.
- :func:`kernel_ridge_regression` -- batched linear-kernel ridge regression by Cholesky (RCIG), with
  :func:`krr_factor` / :func:`krr_solve` / :func:`krr_predict` to reuse one factorisation across many solves.
- :func:`sample_stats`, :func:`classwise_gmm`, :func:`anchor_distances` -- per-sample trust scoring (TAD).
- :func:`norm_act_pool` -- the ConvNet block after the convolution (instance norm + ReLU/softplus + 2x2 average
  pooling), fused, with a fused backward and double backward (the distillers' and the harness's hot path);
  :func:`conv2d`, the convolution with a double backward made of convolution kernels (direct CPU kernels for the
  grayscale first layer); :func:`avg_pool_2x2` / :func:`avg_pool_2x2_adjoint`, 2x2 average pooling as
  strided sums.

Every op runs the compiled kernel when :func:`has_extension` is True and the device is supported, and its
reference in ``ddfast.ops._reference`` otherwise (or with ``DDFAST_DISABLE_EXTENSION=1``).
"""
from .._extension import build_info, has_cuda_kernels, has_extension
from .convnet import avg_pool_2x2, avg_pool_2x2_adjoint, conv2d, norm_act_pool
from .krr import KRRFactor, kernel_ridge_regression, krr_factor, krr_predict, krr_solve
from .trajectory import TeslaQuantities, tesla_quantities, trajectory_matching_loss
from .trust import AnchorDistances, GMMFit, SampleStats, anchor_distances, classwise_gmm, sample_stats

__all__ = [
    "trajectory_matching_loss",
    "tesla_quantities",
    "TeslaQuantities",
    "kernel_ridge_regression",
    "KRRFactor",
    "krr_factor",
    "krr_solve",
    "krr_predict",
    "sample_stats",
    "SampleStats",
    "classwise_gmm",
    "GMMFit",
    "anchor_distances",
    "AnchorDistances",
    "norm_act_pool",
    "conv2d",
    "avg_pool_2x2",
    "avg_pool_2x2_adjoint",
    "has_extension",
    "has_cuda_kernels",
    "build_info",
]
