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
  // student, start, target: [B, P] (the Python wrapper views [P] as [1, P]). loss = num / den per row.
  m.def("trajectory_matching_loss_forward(Tensor student, Tensor start, Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def("trajectory_matching_loss_backward(Tensor grad_loss, Tensor student, Tensor start, Tensor target, Tensor loss, Tensor den) -> (Tensor, Tensor, Tensor)");
  // TESLA: theta_N = start - lr * grad_sum; returns (loss, step_vector = dL/dG, grad_lr = dL/dlr)
  m.def("tesla_quantities(Tensor start, Tensor target, Tensor grad_sum, Tensor lr) -> (Tensor, Tensor, Tensor)");

  // ---- 2. batched kernel ridge regression (RCIG) ---------------------------------------------
  // support_x [B,n,p], support_y [B,n,C], query_x [B,m,p], ridge [B] -> (pred [B,m,C], alpha [B,n,C], factor [B,n,n])
  m.def("kernel_ridge_regression_forward(Tensor support_x, Tensor support_y, Tensor query_x, Tensor ridge) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_ridge_regression_backward(Tensor grad_pred, Tensor support_x, Tensor query_x, Tensor alpha, Tensor factor) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- 3. per-sample trust scoring (TAD) -----------------------------------------------------
  m.def("sample_stats(Tensor logits, Tensor labels) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_stats_ema_(Tensor logits, Tensor labels, Tensor(a!) ema, float momentum) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("classwise_gmm(Tensor values, Tensor labels, int num_classes, int num_iters, float tol, float reg_covar, Tensor init_weights, Tensor init_means, Tensor init_variances) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("anchor_distances(Tensor features, Tensor anchors, Tensor? precision) -> (Tensor, Tensor)");
}
