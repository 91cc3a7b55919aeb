// Shared declarations and small helpers of ddfast's kernels (host side, CPU and CUDA translation units).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace ddfast {

// Accumulation dtype: float64 for float64 inputs, float32 otherwise (float32, float16, bfloat16).
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `x` as a 2-D tensor whose rows are contiguous (inner stride 1); any row stride is kept (no copy).
inline at::Tensor rows_unit_stride(const at::Tensor& x) {
  if (x.size(1) <= 1 || x.stride(1) == 1) return x;
  return x.contiguous();
}

// Argument checks of the op entry points (the Python wrappers check first, with friendlier messages; these
// guard direct torch.ops.ddfast.* calls). TORCH_CHECK_VALUE / TORCH_CHECK_TYPE map to ValueError / TypeError.
inline void check_dim(const char* op, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK_VALUE(x.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", x.sizes());
}

inline void check_same_device_dtype(const char* op, const char* ref_name, const at::Tensor& ref, const char* name,
                                    const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), op, ": ", name, " is on ", x.device(), " but ", ref_name, " is on ",
                    ref.device());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but ",
                   ref_name, " has ", ref.scalar_type());
}

// Three [B, P] tensors of one floating dtype, one device and one shape (trajectory-matching ops).
inline void check_triplet(const char* op, const char* n0, const at::Tensor& a, const char* n1, const at::Tensor& b,
                   const char* n2, const at::Tensor& c) {
  check_dim(op, n0, a, 2);
  check_dim(op, n1, b, 2);
  check_dim(op, n2, c, 2);
  check_same_device_dtype(op, n0, a, n1, b);
  check_same_device_dtype(op, n0, a, n2, c);
  TORCH_CHECK_VALUE(a.sizes() == b.sizes() && a.sizes() == c.sizes(), op, ": ", n0, ", ", n1, " and ", n2,
                    " must have one shape, got ", a.sizes(), ", ", b.sizes(), " and ", c.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), op, ": ", n0, " must be floating point, got ", a.scalar_type());
}

// An empty placeholder for a gradient that output_mask did not ask for.
inline at::Tensor unused_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// ---- kernel ridge regression: device-generic orchestration (csrc/cpu/kernel_ridge_regression_kernel.cpp) ----
//
// Everything that is GEMMs, status checks and the backward's algebra is shared by the CPU and CUDA
// implementations; a backend supplies only the factorisation and the triangular solves.
namespace krr {

struct Backend {
  // A = K + diag(ridge) (K = X_s X_s^T [B,n,n], contiguous, may be overwritten) -> (L [B,n,n] lower, zeros above;
  // info [B] int32: 0, or the order of the first non-positive leading minor). When `rhs` is defined, also
  // returns alpha = A^{-1} rhs (else an undefined tensor).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*factor_solve)(const at::Tensor& K, const at::Tensor& ridge,
                                                                 const at::Tensor& rhs);
  // (L L^T)^{-1} rhs for L [B,n,n] (lower), rhs [B,n,C].
  at::Tensor (*solve)(const at::Tensor& L, const at::Tensor& rhs);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Backend& be, const at::Tensor& support_x,
                                                       const at::Tensor& support_y, const at::Tensor& query_x,
                                                       const at::Tensor& ridge);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Backend& be, const at::Tensor& grad_pred,
                                                                    const at::Tensor& support_x,
                                                                    const at::Tensor& query_x, const at::Tensor& alpha,
                                                                    const at::Tensor& factor,
                                                                    c10::ArrayRef<bool> output_mask);
at::Tensor factor(const Backend& be, const at::Tensor& support_x, const at::Tensor& ridge);
std::tuple<at::Tensor, at::Tensor> predict(const Backend& be, const at::Tensor& factor, const at::Tensor& support_x,
                                           const at::Tensor& support_y, const at::Tensor& query_x,
                                           const at::Tensor& ridge);
at::Tensor solve(const Backend& be, const at::Tensor& factor, const at::Tensor& support_x, const at::Tensor& rhs,
                 const at::Tensor& ridge);
std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_backward(const Backend& be, const at::Tensor& grad_alpha,
                                                              const at::Tensor& factor, const at::Tensor& support_x,
                                                              const at::Tensor& alpha, c10::ArrayRef<bool> output_mask);

}  // namespace krr
}  // namespace ddfast

// ---- per-sample trust scoring (TAD) ---------------------------------------------------------------------------
// Argument checks shared by the CPU and CUDA kernels of sample_stats, classwise_gmm and anchor_distances
// (csrc/{cpu,cuda}/<op>_kernel.*; maintained with those files).
namespace ddfast {
namespace trust {

inline void check_sample_stats_args(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor* ema, double momentum) {
  check_dim(op, "logits", logits, 2);
  check_dim(op, "labels", labels, 1);
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": logits must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.size(0) == logits.size(0), op, ": labels must have shape [", logits.size(0),
                    "] to match logits, got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), op, ": labels is on ", labels.device(), " but logits is on ",
                    logits.device());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits needs at least one class, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) <= 2147483647, op, ": too many classes (", logits.size(1), ")");
  if (ema == nullptr) return;
  check_dim(op, "ema", *ema, 1);
  TORCH_CHECK_TYPE(ema->scalar_type() == at::kFloat || ema->scalar_type() == at::kDouble, op,
                   ": ema must be float32 or float64, got ", ema->scalar_type());
  TORCH_CHECK_VALUE(ema->size(0) == logits.size(0), op, ": ema must have shape [", logits.size(0), "], got ",
                    ema->sizes());
  TORCH_CHECK_VALUE(ema->device() == logits.device(), op, ": ema is on ", ema->device(), " but logits is on ",
                    logits.device());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, op, ": momentum must be in [0, 1], got ", momentum);
  // updated in place, one element per row: rows sharing memory (stride 0, an expanded tensor) would race
  TORCH_CHECK_VALUE(ema->size(0) <= 1 || ema->stride(0) != 0, op, ": ema has overlapping memory (stride 0, e.g. an "
                    "expanded tensor) and is updated in place; pass a tensor with one element per row (.clone())");
}

inline void check_classwise_gmm_args(const at::Tensor& values, const at::Tensor& labels, int64_t num_classes,
                                     int64_t num_iters, double tol, double reg_covar, const at::Tensor& init_weights,
                                     const at::Tensor& init_means, const at::Tensor& init_variances) {
  const char* op = "classwise_gmm";
  check_dim(op, "values", values, 1);
  check_dim(op, "labels", labels, 1);
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
                   ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.size(0) == values.size(0), op, ": labels must have shape [", values.size(0), "], got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == values.device(), op, ": labels is on ", labels.device(), " but values is on ",
                    values.device());
  TORCH_CHECK_VALUE(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK_VALUE(num_iters >= 0, op, ": num_iters must be >= 0, got ", num_iters);
  TORCH_CHECK_VALUE(tol >= 0, op, ": tol must be >= 0, got ", tol);
  TORCH_CHECK_VALUE(reg_covar > 0, op, ": reg_covar must be > 0, got ", reg_covar);
  const char* names[3] = {"init_weights", "init_means", "init_variances"};
  const at::Tensor* inits[3] = {&init_weights, &init_means, &init_variances};
  for (int k = 0; k < 3; ++k) {
    check_same_device_dtype(op, "values", values, names[k], *inits[k]);
    TORCH_CHECK_VALUE(inits[k]->dim() == 2 && inits[k]->size(0) == num_classes && inits[k]->size(1) == 2, op, ": ",
                      names[k], " must have shape [", num_classes, ", 2], got ", inits[k]->sizes());
  }
}

inline void check_anchor_distances_args(const at::Tensor& features, const at::Tensor& anchors,
                                        const c10::optional<at::Tensor>& precision, double eps) {
  const char* op = "anchor_distances";
  check_dim(op, "features", features, 2);
  check_dim(op, "anchors", anchors, 2);
  check_same_device_dtype(op, "features", features, "anchors", anchors);
  const auto st = features.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble, op, ": features must be float32 or float64, got ", st);
  const int64_t D = features.size(1);
  TORCH_CHECK_VALUE(anchors.size(1) == D, op, ": anchors must be [C, ", D, "] to match features, got ",
                    anchors.sizes());
  if (precision.has_value()) {
    check_same_device_dtype(op, "features", features, "precision", *precision);
    TORCH_CHECK_VALUE(precision->dim() == 2 && precision->size(0) == D && precision->size(1) == D, op,
                      ": precision must be square [", D, ", ", D, "], got ", precision->sizes());
  }
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

}  // namespace trust
}  // namespace ddfast

// ---- the ConvNet block: instance norm + activation + 2x2 average pooling -----------------------------------------
// Argument checks shared by the CPU and CUDA kernels of norm_act_pool (csrc/{cpu,cuda}/norm_act_pool_kernel.*).
#include "norm_act_pool_math.h"

namespace ddfast {
namespace nap_check {

struct Sizes {
  int64_t N, C;
  nap::Geom g;
  bool norm;
};

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline Sizes forward_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, int64_t act, double beta, bool pool, double eps) {
  const char* op = "norm_act_pool";
  check_dim(op, "x", x, 4);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(given(weight) == given(bias), op, ": weight and bias must both be given (instance norm) or both "
                    "be None (no normalisation)");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool norm = given(weight);
  if (norm) {
    check_dim(op, "weight", *weight, 1);
    check_dim(op, "bias", *bias, 1);
    check_same_device_dtype(op, "x", x, "weight", *weight);
    check_same_device_dtype(op, "x", x, "bias", *bias);
    TORCH_CHECK_VALUE(weight->size(0) == C && bias->size(0) == C, op, ": weight and bias must have shape [", C,
                      "] (the channels of x), got ", weight->sizes(), " and ", bias->sizes());
    TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  }
  TORCH_CHECK_VALUE(act == nap::kReLU || act == nap::kSoftplus, op, ": act must be 0 (ReLU) or 1 (softplus), got ", act);
  TORCH_CHECK_VALUE(act != nap::kSoftplus || beta > 0, op, ": softplus beta must be > 0, got ", beta);
  TORCH_CHECK_VALUE(!pool || (H >= 2 && W >= 2), op, ": 2x2 pooling needs an image of at least 2x2, got ", H, "x", W);
  return {N, C, {H, W, pool ? H / 2 : H, pool ? W / 2 : W}, norm};
}

inline Sizes backward_args(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                           int64_t act, double beta, bool pool) {
  const char* op = "norm_act_pool_backward";
  const Sizes s = forward_args(x, weight, bias, act, beta, pool, 1.0);
  check_same_device_dtype(op, "x", x, "grad_out", grad_out);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.C &&
                        grad_out.size(2) == s.g.Ho && grad_out.size(3) == s.g.Wo,
                    op, ": grad_out must have shape [", s.N, ", ", s.C, ", ", s.g.Ho, ", ", s.g.Wo, "], got ",
                    grad_out.sizes());
  if (s.norm) {
    check_same_device_dtype(op, "x", x, "mean", mean);
    check_same_device_dtype(op, "x", x, "rstd", rstd);
    TORCH_CHECK_VALUE(mean.dim() == 2 && mean.size(0) == s.N && mean.size(1) == s.C && rstd.sizes() == mean.sizes(),
                      op, ": mean and rstd must have shape [", s.N, ", ", s.C, "], got ", mean.sizes(), " and ",
                      rstd.sizes());
  }
  return s;
}

inline void double_backward_args(const c10::optional<at::Tensor>& ggx, const c10::optional<at::Tensor>& ggw,
                                 const c10::optional<at::Tensor>& ggb, const at::Tensor& x, const Sizes& s) {
  const char* op = "norm_act_pool_double_backward";
  if (given(ggx)) {
    check_same_device_dtype(op, "x", x, "grad_grad_x", *ggx);
    TORCH_CHECK_VALUE(ggx->sizes() == x.sizes(), op, ": grad_grad_x must have x's shape ", x.sizes(), ", got ",
                      ggx->sizes());
  }
  for (const auto* t : {&ggw, &ggb}) {
    if (!given(*t)) continue;
    TORCH_CHECK_VALUE(s.norm, op, ": gradients of weight / bias given for a block without normalisation");
    check_same_device_dtype(op, "x", x, "grad_grad_weight/bias", **t);
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == s.C, op, ": grad_grad_weight / bias must have shape [",
                      s.C, "], got ", (*t)->sizes());
  }
}

}  // namespace nap_check
// ---- the small-input-channel 3x3 convolution (csrc/cpu/conv3x3_kernel.cpp) ----
namespace conv3x3_check {

constexpr int64_t kMaxInChannels = 4;

struct Sizes {
  int64_t N, C, O, H, W, Ho, Wo;
};

inline void common(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                   int64_t padding) {
  check_dim(op, an, a, 4);
  check_dim(op, bn, b, 4);
  check_same_device_dtype(op, an, a, bn, b);
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op, ": ", an,
                   " must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK_VALUE(padding >= 0 && padding <= 8, op, ": padding must be in [0, 8], got ", padding);
}

inline void check_weight(const char* op, const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.size(2) == 3 && w.size(3) == 3, op, ": weight must be [C_out, C_in, 3, 3], got ", w.sizes());
  TORCH_CHECK_VALUE(w.size(1) >= 1 && w.size(1) <= kMaxInChannels, op, ": at most ", kMaxInChannels,
                    " input channels, got ", w.size(1));
}

inline Sizes forward_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                          int64_t padding) {
  const char* op = "conv3x3_forward";
  common(op, x, "x", w, "weight", padding);
  check_weight(op, w);
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), op, ": x has ", x.size(1), " channels but weight expects ", w.size(1));
  const int64_t Ho = x.size(2) + 2 * padding - 2, Wo = x.size(3) + 2 * padding - 2;
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, op, ": the output would be empty (", Ho, "x", Wo, ")");
  if (bias.has_value() && bias->defined()) {
    check_same_device_dtype(op, "x", x, "bias", *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": bias must be [", w.size(0), "], got ",
                      bias->sizes());
  }
  return {x.size(0), x.size(1), w.size(0), x.size(2), x.size(3), Ho, Wo};
}

inline Sizes input_grad_args(const at::Tensor& g, const at::Tensor& w, int64_t padding, int64_t H, int64_t W) {
  const char* op = "conv3x3_input_grad";
  common(op, g, "grad_out", w, "weight", padding);
  check_weight(op, w);
  TORCH_CHECK_VALUE(g.size(1) == w.size(0), op, ": grad_out has ", g.size(1), " channels but weight has ", w.size(0),
                    " outputs");
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && g.size(2) == H + 2 * padding - 2 && g.size(3) == W + 2 * padding - 2, op,
                    ": grad_out ", g.sizes(), " is not the output of a ", H, "x", W, " input with padding ", padding);
  return {g.size(0), w.size(1), w.size(0), H, W, g.size(2), g.size(3)};
}

inline Sizes weight_grad_args(const at::Tensor& g, const at::Tensor& x, int64_t padding) {
  const char* op = "conv3x3_weight_grad";
  common(op, g, "grad_out", x, "x", padding);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(1) <= kMaxInChannels, op, ": at most ", kMaxInChannels,
                    " input channels, got ", x.size(1));
  TORCH_CHECK_VALUE(g.size(0) == x.size(0) && g.size(2) == x.size(2) + 2 * padding - 2 &&
                        g.size(3) == x.size(3) + 2 * padding - 2,
                    op, ": grad_out ", g.sizes(), " is not the output of x ", x.sizes(), " with padding ", padding);
  return {x.size(0), x.size(1), g.size(1), x.size(2), x.size(3), g.size(2), g.size(3)};
}

}  // namespace conv3x3_check

}  // namespace ddfast
