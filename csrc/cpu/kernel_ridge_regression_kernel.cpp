// Batched linear-kernel ridge regression (RCIG): the device-generic orchestration and the CPU backend.
//
//   K_ss = X_s X_s^T,  A = K_ss + diag(ridge) = L L^T (one Cholesky per system),  alpha = A^{-1} Y_s,
//   pred = X_q (X_s^T alpha)            -- reassociated: K_qs = X_q X_s^T [m, n] is formed only when that is cheaper
//
// Backward with G = dL/dpred, reusing L (never K_ss or K_qs):
//   V = X_q^T G [p, C],  beta = A^{-1} (X_s V),  W = X_s^T alpha,  U = X_s^T beta  (all [p, C])
//   dY_s = beta,  dX_q = G W^T,  dX_s = alpha (V - U)^T - beta W^T = [alpha | beta] [V - U | -W]^T,
//   dridge = -sum(beta * alpha)
// so the backward costs O((n + m) p C + n^2 C) instead of the composite's O(n m p + n^2 p + n^3).
//
// The orchestration below (GEMMs through at::bmm, the data checks, the backward algebra) is shared with the CUDA
// file, which supplies its own Backend (a shared-memory Cholesky for small n). The CPU backend factorises small
// systems with a hand-written Cholesky run in parallel over the batch, and large ones with LAPACK through ATen.
//
// Data checks (one status vector per call, one device-to-host copy on CUDA): a negative/non-finite ridge, NaN/inf
// in support_x (seen as a non-finite diagonal of K_ss), NaN/inf in the right-hand side, and a matrix that is not
// positive definite -- each raises ValueError naming the batch index.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace ddfast {
namespace krr {
namespace {

// Status codes of a system (int32 per batch entry): 0 fine, > 0 the order of the first leading minor that is not
// positive (as LAPACK's info), and the negative codes below.
constexpr int kBadRidge = -1;
constexpr int kBadSupportX = -2;
constexpr int kBadRhs = -3;

struct Dims {
  int64_t B, n, p;
};

Dims check_support_x(const char* op, const at::Tensor& support_x) {
  check_dim(op, "support_x", support_x, 3);
  TORCH_CHECK_TYPE(support_x.scalar_type() == at::kFloat || support_x.scalar_type() == at::kDouble, op,
                   ": support_x must be float32 or float64, got ", support_x.scalar_type());
  return {support_x.size(0), support_x.size(1), support_x.size(2)};
}

void check_rows(const char* op, const char* name, const at::Tensor& x, const at::Tensor& support_x, int64_t rows_dim,
                int64_t rows, const char* what) {
  check_dim(op, name, x, 3);
  check_same_device_dtype(op, "support_x", support_x, name, x);
  TORCH_CHECK_VALUE(x.size(0) == support_x.size(0), op, ": ", name, " has batch size ", x.size(0),
                    " but support_x has ", support_x.size(0));
  TORCH_CHECK_VALUE(x.size(rows_dim) == rows, op, ": ", name, " has ", what, " = ", x.size(rows_dim),
                    " but support_x has ", rows, " (shapes ", x.sizes(), " and ", support_x.sizes(), ")");
}

void check_ridge(const char* op, const at::Tensor& ridge, const at::Tensor& support_x) {
  TORCH_CHECK_VALUE(ridge.dim() == 1 && ridge.size(0) == support_x.size(0), op, ": ridge must have shape [B] = [",
                    support_x.size(0), "], got ", ridge.sizes());
  check_same_device_dtype(op, "support_x", support_x, "ridge", ridge);
}

void check_factor(const char* op, const at::Tensor& factor, const at::Tensor& support_x) {
  check_dim(op, "factor", factor, 3);
  check_same_device_dtype(op, "support_x", support_x, "factor", factor);
  const int64_t B = support_x.size(0), n = support_x.size(1);
  TORCH_CHECK_VALUE(factor.size(0) == B && factor.size(1) == n && factor.size(2) == n, op,
                    ": factor must have shape [B, n, n] = [", B, ", ", n, ", ", n, "], got ", factor.sizes());
}

// One int32 status per system, combined on the device, then one copy to the host and a ValueError for the first
// bad system. Any argument may be undefined (not checked).
void raise_on_status(const char* op, const at::Tensor& ridge, const at::Tensor& gram_diag, const at::Tensor& rhs,
                     const char* rhs_name, const at::Tensor& info) {
  const int64_t B = ridge.size(0);
  if (B == 0) return;
  auto opts = ridge.options().dtype(at::kInt);
  at::Tensor status = info.defined() ? info.to(at::kInt) : at::zeros({B}, opts);
  if (rhs.defined() && rhs.numel() > 0) {
    status = at::where(at::isfinite(rhs).reshape({B, -1}).all(1), status, kBadRhs);
  }
  if (gram_diag.defined() && gram_diag.numel() > 0) {
    status = at::where(at::isfinite(gram_diag).all(1), status, kBadSupportX);
  }
  status = at::where(at::logical_and(ridge >= 0, at::isfinite(ridge)), status, kBadRidge);
  const at::Tensor host = status.to(at::kCPU);
  const int* s = host.const_data_ptr<int>();
  for (int64_t b = 0; b < B; ++b) {
    if (s[b] == 0) continue;
    switch (s[b]) {
      case kBadRidge:
        TORCH_CHECK_VALUE(false, op, ": ridge must be >= 0 and finite, got ", ridge[b].item<double>(),
                          " at batch index ", b);
      case kBadSupportX:
        TORCH_CHECK_VALUE(false, op, ": support_x holds NaN/inf values (or its squared row norms overflow) at batch index ",
                          b);
      case kBadRhs:
        TORCH_CHECK_VALUE(false, op, ": ", rhs_name, " holds NaN/inf values at batch index ", b);
      default:
        TORCH_CHECK_VALUE(false, op, ": K_ss + ridge * I is not positive definite at batch index ", b,
                          " (leading minor of order ", s[b], " is not positive); increase ridge or use float64 features");
    }
  }
}

at::Tensor gram(const at::Tensor& support_x) {
  return at::bmm(support_x, support_x.transpose(1, 2)).contiguous();
}

// GEMM layout: the narrow label dimension C (and n) is kept as the *leading* dimension of every product, e.g.
// W^T = alpha^T X_s [B, C, p] instead of W = X_s^T alpha [B, p, C]. The maths is the same; BLAS libraries run
// products with a narrow last output dimension far below peak on CPUs (measured on a 2-core EPYC with MKL:
// alpha^T X_s 0.6 ms vs X_s^T alpha 15 ms at B=30, n=20, p=2048, C=10), and cuBLAS takes the transposes as flags.

// pred = X_q (X_s^T alpha) computed as (W^T X_q^T)^T, or (X_q X_s^T) alpha = (alpha^T K_sq)^T when that is cheaper.
at::Tensor predict_from_alpha(const at::Tensor& support_x, const at::Tensor& query_x, const at::Tensor& alpha) {
  const double n = support_x.size(1), p = support_x.size(2), m = query_x.size(1), C = alpha.size(2);
  const at::Tensor alpha_t = alpha.transpose(1, 2);                          // [B, C, n]
  at::Tensor pred_t;                                                          // [B, C, m]
  if ((n + m) * p * C <= m * n * (p + C)) {
    pred_t = at::bmm(at::bmm(alpha_t, support_x), query_x.transpose(1, 2));  // W^T X_q^T
  } else {
    pred_t = at::bmm(alpha_t, at::bmm(support_x, query_x.transpose(1, 2)));  // alpha^T K_sq
  }
  return pred_t.transpose(1, 2).contiguous();
}

// [W | U]^T = [alpha | beta]^T X_s and dX_s = -(beta W^T + alpha U^T) (+ alpha V^T when V^T is defined).
// V_t is V^T = G^T X_q [B, C, p] (or undefined); *W_t_out receives W^T [B, C, p].
at::Tensor grad_support_x(const at::Tensor& support_x, const at::Tensor& alpha, const at::Tensor& beta,
                          const at::Tensor& V_t, at::Tensor* W_t_out) {
  const int64_t C = alpha.size(2);
  const at::Tensor ab = at::cat({alpha, beta}, 2);                          // [B, n, 2C]
  const at::Tensor WU_t = at::bmm(ab.transpose(1, 2), support_x);           // [B, 2C, p]
  const at::Tensor W_t = WU_t.narrow(1, 0, C), U_t = WU_t.narrow(1, C, C);
  if (W_t_out) *W_t_out = W_t;
  // dX_s = [alpha | beta] [M_alpha | M_beta]^T with M_alpha = V - U (or -U), M_beta = -W
  const at::Tensor Ma_t = V_t.defined() ? V_t - U_t : -U_t;
  const at::Tensor M_t = at::cat({Ma_t, -W_t}, 1);                          // [B, 2C, p]
  return at::bmm(ab, M_t);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// device-generic entry points (declared in ops.h)

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Backend& be, const at::Tensor& support_x,
                                                       const at::Tensor& support_y, const at::Tensor& query_x,
                                                       const at::Tensor& ridge) {
  const char* op = "kernel_ridge_regression";
  const Dims d = check_support_x(op, support_x);
  check_rows(op, "support_y", support_y, support_x, 1, d.n, "n");
  check_rows(op, "query_x", query_x, support_x, 2, d.p, "feature dimension p");
  check_ridge(op, ridge, support_x);
  at::Tensor K = gram(support_x);
  const at::Tensor diag = K.diagonal(0, 1, 2).clone();
  at::Tensor L, info, alpha;
  std::tie(L, info, alpha) = be.factor_solve(K, ridge, support_y.contiguous());
  raise_on_status(op, ridge, diag, support_y, "support_y", info);
  return {predict_from_alpha(support_x, query_x, alpha), alpha, L};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Backend& be, const at::Tensor& grad_pred,
                                                                    const at::Tensor& support_x,
                                                                    const at::Tensor& query_x, const at::Tensor& alpha,
                                                                    const at::Tensor& factor,
                                                                    c10::ArrayRef<bool> output_mask) {
  const char* op = "kernel_ridge_regression_backward";
  const Dims d = check_support_x(op, support_x);
  check_rows(op, "query_x", query_x, support_x, 2, d.p, "feature dimension p");
  check_rows(op, "alpha", alpha, support_x, 1, d.n, "n");
  check_rows(op, "grad_pred", grad_pred, support_x, 1, query_x.size(1), "m");
  check_factor(op, factor, support_x);
  const bool m_xs = output_mask[0], m_ys = output_mask[1], m_xq = output_mask[2], m_r = output_mask[3];
  at::Tensor d_xs = unused_grad(support_x), d_ys = unused_grad(support_x), d_xq = unused_grad(support_x),
             d_r = unused_grad(support_x);
  at::Tensor V_t, beta, W_t;
  if (m_xs || m_ys || m_r) {
    V_t = at::bmm(grad_pred.transpose(1, 2), query_x);                          // V^T = G^T X_q  [B, C, p]
    beta = be.solve(factor, at::bmm(V_t, support_x.transpose(1, 2)).transpose(1, 2).contiguous());  // A^-1 X_s V
  }
  if (m_xs) d_xs = grad_support_x(support_x, alpha, beta, V_t, &W_t);
  if (m_xq) {
    if (!W_t.defined()) W_t = at::bmm(alpha.transpose(1, 2), support_x);        // W^T = alpha^T X_s [B, C, p]
    d_xq = at::bmm(grad_pred, W_t);                                             // G W^T
  }
  if (m_ys) d_ys = beta;
  if (m_r) d_r = -(beta * alpha).sum({1, 2});
  return {d_xs, d_ys, d_xq, d_r};
}

at::Tensor factor(const Backend& be, const at::Tensor& support_x, const at::Tensor& ridge) {
  const char* op = "krr_factor";
  check_support_x(op, support_x);
  check_ridge(op, ridge, support_x);
  at::Tensor K = gram(support_x);
  const at::Tensor diag = K.diagonal(0, 1, 2).clone();
  at::Tensor L, info, unused;
  std::tie(L, info, unused) = be.factor_solve(K, ridge, at::Tensor());
  raise_on_status(op, ridge, diag, at::Tensor(), "", info);
  return L;
}

std::tuple<at::Tensor, at::Tensor> predict(const Backend& be, const at::Tensor& factor, const at::Tensor& support_x,
                                           const at::Tensor& support_y, const at::Tensor& query_x,
                                           const at::Tensor& ridge) {
  const char* op = "krr_predict";
  const Dims d = check_support_x(op, support_x);
  check_factor(op, factor, support_x);
  check_rows(op, "support_y", support_y, support_x, 1, d.n, "n");
  check_rows(op, "query_x", query_x, support_x, 2, d.p, "feature dimension p");
  check_ridge(op, ridge, support_x);
  raise_on_status(op, ridge, at::Tensor(), support_y, "support_y", at::Tensor());
  const at::Tensor alpha = be.solve(factor, support_y.contiguous());
  return {predict_from_alpha(support_x, query_x, alpha), alpha};
}

at::Tensor solve(const Backend& be, const at::Tensor& factor, const at::Tensor& support_x, const at::Tensor& rhs,
                 const at::Tensor& ridge) {
  const char* op = "krr_solve";
  const Dims d = check_support_x(op, support_x);
  check_factor(op, factor, support_x);
  check_rows(op, "rhs", rhs, support_x, 1, d.n, "n");
  check_ridge(op, ridge, support_x);
  raise_on_status(op, ridge, at::Tensor(), rhs, "rhs", at::Tensor());
  return be.solve(factor, rhs.contiguous());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_backward(const Backend& be, const at::Tensor& grad_alpha,
                                                              const at::Tensor& factor, const at::Tensor& support_x,
                                                              const at::Tensor& alpha, c10::ArrayRef<bool> output_mask) {
  const char* op = "krr_solve_backward";
  const Dims d = check_support_x(op, support_x);
  check_factor(op, factor, support_x);
  check_rows(op, "alpha", alpha, support_x, 1, d.n, "n");
  check_rows(op, "grad_alpha", grad_alpha, support_x, 1, d.n, "n");
  at::Tensor d_xs = unused_grad(support_x), d_rhs = unused_grad(support_x), d_r = unused_grad(support_x);
  if (!(output_mask[0] || output_mask[1] || output_mask[2])) return {d_xs, d_rhs, d_r};
  const at::Tensor beta = be.solve(factor, grad_alpha.contiguous());
  if (output_mask[0]) d_xs = grad_support_x(support_x, alpha, beta, at::Tensor(), nullptr);
  if (output_mask[1]) d_rhs = beta;
  if (output_mask[2]) d_r = -(beta * alpha).sum({1, 2});
  return {d_xs, d_rhs, d_r};
}

// ---------------------------------------------------------------------------------------------------------------
// CPU backend

namespace {

constexpr int64_t kSmallN = 64;  // hand-written Cholesky up to this n; LAPACK above

// In-place lower Cholesky of one n x n row-major system (upper triangle zeroed). Returns 0 or the order of the
// first non-positive (or non-finite) pivot.
template <typename T>
int chol_inplace(T* a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    T* rj = a + j * n;
    T sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < j; ++k) sq += rj[k] * rj[k];
    const T djj = rj[j] - sq;
    if (!(djj > T(0)) || !std::isfinite(djj)) return static_cast<int>(j + 1);
    const T ljj = std::sqrt(djj);
    rj[j] = ljj;
    const T inv = T(1) / ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      T* ri = a + i * n;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < j; ++k) dot += ri[k] * rj[k];
      ri[j] = (ri[j] - dot) * inv;
    }
    for (int64_t k = j + 1; k < n; ++k) rj[k] = T(0);
  }
  return 0;
}

// x <- (L L^T)^{-1} x for one system: x is n x C row-major (columns are right-hand sides).
template <typename T>
void chol_solve_inplace(const T* l, T* x, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i) {  // L y = x
    const T* li = l + i * n;
    T* xi = x + i * C;
    for (int64_t k = 0; k < i; ++k) {
      const T lik = li[k];
      const T* xk = x + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) xi[c] -= lik * xk[c];
    }
    const T inv = T(1) / li[i];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) xi[c] *= inv;
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // L^T z = y
    T* xi = x + i * C;
    for (int64_t k = i + 1; k < n; ++k) {
      const T lki = l[k * n + i];
      const T* xk = x + k * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) xi[c] -= lki * xk[c];
    }
    const T inv = T(1) / l[i * n + i];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) xi[c] *= inv;
  }
}

at::Tensor cpu_solve(const at::Tensor& L, const at::Tensor& rhs) {
  const int64_t B = L.size(0), n = L.size(1), C = rhs.size(2);
  if (n > kSmallN) return at::cholesky_solve(rhs, L, /*upper=*/false).contiguous();  // LAPACK: column-major
  const at::Tensor Lc = L.contiguous();
  at::Tensor x = rhs.clone(at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return x;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "krr_cpu_solve", [&] {
    const scalar_t* lp = Lc.const_data_ptr<scalar_t>();
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) chol_solve_inplace(lp + b * n * n, xp + b * n * C, n, C);
    });
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_factor_solve(const at::Tensor& K, const at::Tensor& ridge,
                                                                const at::Tensor& rhs) {
  const int64_t B = K.size(0), n = K.size(1);
  at::Tensor A = K;  // contiguous, owned: overwritten in place
  A.diagonal(0, 1, 2).add_(ridge.unsqueeze(1));
  at::Tensor L, info;
  if (n > kSmallN) {
    std::tie(L, info) = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
    L = L.contiguous();
  } else {
    info = at::zeros({B}, K.options().dtype(at::kInt));
    int* ip = info.mutable_data_ptr<int>();
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "krr_cpu_factor", [&] {
      scalar_t* ap = A.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) ip[b] = chol_inplace(ap + b * n * n, n);
      });
    });
    L = A;
  }
  at::Tensor alpha;
  if (rhs.defined()) alpha = cpu_solve(L, rhs);
  return {L, info, alpha};
}

const Backend kCpuBackend{&cpu_factor_solve, &cpu_solve};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& xs, const at::Tensor& ys,
                                                           const at::Tensor& xq, const at::Tensor& ridge) {
  return forward(kCpuBackend, xs, ys, xq, ridge);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& g, const at::Tensor& xs,
                                                                        const at::Tensor& xq, const at::Tensor& alpha,
                                                                        const at::Tensor& L,
                                                                        std::array<bool, 4> mask) {
  return backward(kCpuBackend, g, xs, xq, alpha, L, mask);
}

at::Tensor factor_cpu(const at::Tensor& xs, const at::Tensor& ridge) { return factor(kCpuBackend, xs, ridge); }

std::tuple<at::Tensor, at::Tensor> predict_cpu(const at::Tensor& L, const at::Tensor& xs, const at::Tensor& ys,
                                               const at::Tensor& xq, const at::Tensor& ridge) {
  return predict(kCpuBackend, L, xs, ys, xq, ridge);
}

at::Tensor solve_cpu(const at::Tensor& L, const at::Tensor& xs, const at::Tensor& rhs, const at::Tensor& ridge) {
  return solve(kCpuBackend, L, xs, rhs, ridge);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_backward_cpu(const at::Tensor& g, const at::Tensor& L,
                                                                  const at::Tensor& xs, const at::Tensor& alpha,
                                                                  std::array<bool, 3> mask) {
  return solve_backward(kCpuBackend, g, L, xs, alpha, mask);
}

}  // namespace
}  // namespace krr
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("kernel_ridge_regression_forward", &ddfast::krr::forward_cpu);
  m.impl("kernel_ridge_regression_backward", &ddfast::krr::backward_cpu);
  m.impl("kernel_ridge_regression_factor", &ddfast::krr::factor_cpu);
  m.impl("kernel_ridge_regression_predict", &ddfast::krr::predict_cpu);
  m.impl("kernel_ridge_regression_solve", &ddfast::krr::solve_cpu);
  m.impl("kernel_ridge_regression_solve_backward", &ddfast::krr::solve_backward_cpu);
}
