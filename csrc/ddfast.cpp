// ddfast._C: the op schemas, all in one place, and the Python module stub.
//
// Kernels live in csrc/cpu/<op>_kernel.cpp and csrc/cuda/<op>_kernel.cu and are exposed only through
// TORCH_LIBRARY_IMPL(ddfast, CPU|CUDA, m) blocks at the bottom of those files. Autograd formulas, fake
// (meta) kernels and the pure-PyTorch references are registered from Python (ddfast/ops/).
//
// The module is built against the limited Python C API (abi3): importing it runs the static
// initialisers below, which register the ops with the dispatcher; it exposes only build facts.

#include <Python.h>
#include <torch/library.h>

#ifndef DDFAST_CUDA_ARCH_LIST
#define DDFAST_CUDA_ARCH_LIST ""
#endif
#ifndef DDFAST_TORCH_VERSION
#define DDFAST_TORCH_VERSION ""
#endif

extern "C" {
static struct PyModuleDef ddfast_module = {PyModuleDef_HEAD_INIT, "_C", "ddfast's compiled ops (registered in torch.ops.ddfast)", -1, nullptr};

PyObject* PyInit__C(void) {
  PyObject* m = PyModule_Create(&ddfast_module);
  if (m == nullptr) return nullptr;
#ifdef DDFAST_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_arch_list", DDFAST_CUDA_ARCH_LIST);
  PyModule_AddStringConstant(m, "built_with_torch", DDFAST_TORCH_VERSION);
  return m;
}
}

TORCH_LIBRARY(ddfast, m) {
  // ---- 1. trajectory matching (MTT / DATM / TESLA) -------------------------------------------
  // student, start, target: [B, P] (the Python wrapper views [P] as [1, P]); any row stride.
  // forward -> (loss [B] in the input dtype, num [B], den [B] in the accumulation dtype: float32, or float64
  // for float64 inputs). loss = num / den; a row with den == 0 raises ValueError.
  m.def("trajectory_matching_loss_forward(Tensor student, Tensor start, Tensor target) -> (Tensor, Tensor, Tensor)");
  // -> (d_student, d_start, d_target); an output whose output_mask entry is false is an empty [0] tensor.
  m.def("trajectory_matching_loss_backward(Tensor grad_loss, Tensor student, Tensor start, Tensor target, Tensor num, Tensor den, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // TESLA: theta_N = start - lr * grad_sum, lr [B] in the accumulation dtype;
  // -> (loss [B], step_vector = dL/dG [B, P], grad_lr = dL/dlr [B]) in the input dtype.
  m.def("tesla_quantities(Tensor start, Tensor target, Tensor grad_sum, Tensor lr) -> (Tensor, Tensor, Tensor)");

  // ---- 2. batched kernel ridge regression (RCIG) ---------------------------------------------
  // support_x [B,n,p], support_y [B,n,C], query_x [B,m,p], ridge [B] (support_x's dtype)
  //   -> (pred [B,m,C], alpha [B,n,C], factor [B,n,n] = lower Cholesky L of X_s X_s^T + ridge I)
  m.def("kernel_ridge_regression_forward(Tensor support_x, Tensor support_y, Tensor query_x, Tensor ridge) -> (Tensor, Tensor, Tensor)");
  // -> (d_support_x, d_support_y, d_query_x, d_ridge); masked-off outputs are empty [0] tensors.
  m.def("kernel_ridge_regression_backward(Tensor grad_pred, Tensor support_x, Tensor query_x, Tensor alpha, Tensor factor, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Factor reuse (RCIG inner steps): L once, then many solves / predictions with it. support_x and ridge are
  // inputs of the solve/predict ops only so that autograd can route their gradients (see ddfast/ops/krr.py).
  m.def("kernel_ridge_regression_factor(Tensor support_x, Tensor ridge) -> Tensor");
  m.def("kernel_ridge_regression_predict(Tensor factor, Tensor support_x, Tensor support_y, Tensor query_x, Tensor ridge) -> (Tensor, Tensor)");
  m.def("kernel_ridge_regression_solve(Tensor factor, Tensor support_x, Tensor rhs, Tensor ridge) -> Tensor");
  // -> (d_support_x, d_rhs, d_ridge)
  m.def("kernel_ridge_regression_solve_backward(Tensor grad_alpha, Tensor factor, Tensor support_x, Tensor alpha, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- 3. per-sample trust scoring (TAD) -----------------------------------------------------
  // logits [N,C] (f16/bf16/f32/f64, unit column stride or copied), labels [N] int64 ->
  // (loss, confidence, margin) [N] in the accumulation dtype (f64 for f64, else f32), prediction [N] int64
  m.def("sample_stats(Tensor logits, Tensor labels) -> (Tensor, Tensor, Tensor, Tensor)");
  // the same, plus ema <- momentum * ema + (1 - momentum) * loss in place (ema [N] f32/f64, any stride)
  m.def("sample_stats_ema_(Tensor logits, Tensor labels, Tensor(a!) ema, float momentum) -> (Tensor, Tensor, Tensor, Tensor)");
  // values [N] f32/f64, labels [N] int64, init_* [C,2] in values' dtype ->
  // (posterior_low [N], weights [C,2], means [C,2], variances [C,2], n_iter [C] int64)
  m.def("classwise_gmm(Tensor values, Tensor labels, int num_classes, int num_iters, float tol, float reg_covar, Tensor init_weights, Tensor init_means, Tensor init_variances) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // features [N,D], anchors [C,D], precision [D,D] or None (Euclidean) -> (mahalanobis_sq [N,C], cosine [N,C])
  m.def("anchor_distances(Tensor features, Tensor anchors, Tensor? precision, float eps) -> (Tensor, Tensor)");

  // ---- 4. the ConvNet block: instance norm (affine) + activation + 2x2 average pooling --------------------
  // x [N, C, H, W] f32/f64 (any layout; read as NCHW), weight / bias [C] or both None (no normalisation),
  // act 0 = ReLU, 1 = softplus(beta, threshold 20), pool = 2x2 average pooling with stride 2 (floor), eps of the norm
  //   -> (out [N, C, H/2, W/2] (or [N, C, H, W] without pooling), mean [N, C], rstd [N, C]; [0, 0] without norm)
  m.def("norm_act_pool_forward(Tensor x, Tensor? weight, Tensor? bias, int act, float beta, bool pool, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (d_x, d_weight, d_bias); masked-off (or, without norm, weight / bias) gradients are empty [0] tensors
  m.def("norm_act_pool_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int act, float beta, bool pool, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The backward as a function of (grad_out, x, weight, bias), differentiated: grad_grad_* are the upstream gradients
  // of (d_x, d_weight, d_bias) (None = zero) -> (d_grad_out, d_x, d_weight, d_bias), masked-off ones empty [0]
  m.def("norm_act_pool_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, Tensor? grad_grad_bias, Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int act, float beta, bool pool, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- 5. the first ConvNet layer: 3x3 convolution, 1-4 input channels, stride 1, zero padding (CPU only) -------
  // x [N, C_in, H, W], weight [C_out, C_in, 3, 3], bias [C_out] or None (f32/f64) -> y [N, C_out, H+2p-2, W+2p-2]
  m.def("conv3x3_forward(Tensor x, Tensor weight, Tensor? bias, int padding) -> Tensor");
  // grad_out [N, C_out, Ho, Wo], weight -> d_x [N, C_in, height, width]
  m.def("conv3x3_input_grad(Tensor grad_out, Tensor weight, int padding, int height, int width) -> Tensor");
  // grad_out [N, C_out, Ho, Wo], x [N, C_in, H, W] -> d_weight [C_out, C_in, 3, 3]
  m.def("conv3x3_weight_grad(Tensor grad_out, Tensor x, int padding) -> Tensor");
}
