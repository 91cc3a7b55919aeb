"""Pure-PyTorch references of batched linear-kernel ridge regression (RCIG).

The fallback of :mod:`ddfast.ops.krr`, the oracle of the tests and the eager baseline of the benchmarks.
Inputs are batched (``support_x [B, n, p]``, ``support_y [B, n, C]``, ``query_x [B, m, p]``, ``ridge [B]``);
the public wrappers validate shapes, dtypes and devices and handle the unbatched form. Differentiable by
autograd (through ``torch.linalg.cholesky_ex`` and ``torch.cholesky_solve``).
"""
from __future__ import annotations

import torch

__all__ = [
    "kernel_ridge_regression",
    "krr_cholesky",
    "krr_cholesky_solve",
    "check_krr_inputs",
    "check_factorization",
]


def check_krr_inputs(support_x_gram_diag: torch.Tensor, support_y, ridge: torch.Tensor, op: str,
                     y_name: str = "support_y") -> None:
    """Data checks of a KRR system, raising ``ValueError`` naming the argument and the batch index.

    ``support_x_gram_diag [B, n]`` is ``diag(X_s X_s^T)``: it is non-finite exactly when a row of
    ``support_x`` holds a NaN/inf (or its squared norm overflows). ``support_y`` (named ``y_name`` in the message) may be None (factor only).
    Skipped while ``torch.compile`` traces (data-dependent); the factorisation check then still asserts.
    """
    if torch.compiler.is_compiling():
        return
    if ridge.numel() > 0:
        bad = torch.nonzero(~(ridge >= 0)).flatten()  # catches NaN too
        if bad.numel() > 0:
            b = int(bad[0])
            raise ValueError(f"{op}: ridge must be >= 0 and finite, got {float(ridge[b])} at batch index {b}")
        bad = torch.nonzero(~torch.isfinite(ridge)).flatten()
        if bad.numel() > 0:
            b = int(bad[0])
            raise ValueError(f"{op}: ridge must be finite, got {float(ridge[b])} at batch index {b}")
    if support_x_gram_diag.numel() > 0:
        bad = torch.nonzero(~torch.isfinite(support_x_gram_diag).all(-1)).flatten()
        if bad.numel() > 0:
            raise ValueError(f"{op}: support_x holds NaN/inf values (or overflows) at batch index {int(bad[0])}")
    if support_y is not None and support_y.numel() > 0:
        bad = torch.nonzero(~torch.isfinite(support_y).flatten(1).all(-1)).flatten()
        if bad.numel() > 0:
            raise ValueError(f"{op}: {y_name} holds NaN/inf values at batch index {int(bad[0])}")


def check_factorization(info: torch.Tensor, op: str) -> None:
    """Raises ``ValueError`` naming the first batch index whose ``K_ss + ridge I`` is not positive definite
    (``info`` from ``torch.linalg.cholesky_ex``). Under ``torch.compile`` an asynchronous assertion."""
    if info.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch._assert_async(torch.all(info == 0), f"{op}: K_ss + ridge * I is not positive definite")
        return
    bad = torch.nonzero(info).flatten()
    if bad.numel() > 0:
        b = int(bad[0])
        raise ValueError(
            f"{op}: K_ss + ridge * I is not positive definite at batch index {b} (leading minor of order "
            f"{int(info[b])} is not positive); increase ridge or use float64 features"
        )


def krr_cholesky(support_x: torch.Tensor, ridge: torch.Tensor, op: str = "kernel_ridge_regression") -> torch.Tensor:
    """Lower Cholesky factor ``L [B, n, n]`` of ``K_ss + ridge I`` with ``K_ss = X_s X_s^T``."""
    k_ss = support_x @ support_x.mT
    check_krr_inputs(torch.diagonal(k_ss, dim1=-2, dim2=-1), None, ridge, op)
    n = support_x.shape[-2]
    eye = torch.eye(n, dtype=support_x.dtype, device=support_x.device)
    a = k_ss + ridge[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(a)
    check_factorization(info, op)
    return chol


def krr_cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^{-1} rhs`` for ``L [B, n, n]``, ``rhs [B, n, C]``."""
    return torch.cholesky_solve(rhs, chol)


def kernel_ridge_regression(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                            ridge: torch.Tensor) -> torch.Tensor:
    """``pred = K_qs (K_ss + ridge I)^{-1} Y_s`` with the linear kernel (RCIG's last-layer KRR).

    ``K_ss = X_s X_s^T``, ``K_qs = X_q X_s^T``; the system is solved by Cholesky. Returns ``[B, m, C]``.
    Raises ``ValueError`` (batch index named) for NaN/inf inputs, a negative ridge or a matrix that is not
    positive definite.
    """
    k_ss = support_x @ support_x.mT
    k_qs = query_x @ support_x.mT
    check_krr_inputs(torch.diagonal(k_ss, dim1=-2, dim2=-1), support_y, ridge, "kernel_ridge_regression")
    n = support_x.shape[-2]
    eye = torch.eye(n, dtype=support_x.dtype, device=support_x.device)
    chol, info = torch.linalg.cholesky_ex(k_ss + ridge[:, None, None] * eye)
    check_factorization(info, "kernel_ridge_regression")
    alpha = torch.cholesky_solve(support_y, chol)
    return k_qs @ alpha
