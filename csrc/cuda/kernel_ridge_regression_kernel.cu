// Batched linear-kernel ridge regression (RCIG): the CUDA backend.
//
// The GEMMs (cuBLAS through at::bmm), the data checks and the backward algebra are the device-generic orchestration
// of csrc/cpu/kernel_ridge_regression_kernel.cpp (declared in ops.h); this file supplies the factorisation and the
// triangular solves:
//
//   n <= 128 (and the factor fits in shared memory): one thread block per system. The lower triangle of
//     A = K + ridge I is loaded into shared memory (odd leading dimension: column accesses are bank-conflict free),
//     factorised by a right-looking Cholesky with one barrier per column, written back as L, and the right-hand
//     sides are solved in shared memory in chunks of up to 32 columns (forward then backward substitution, one
//     barrier per row). The factorisation and the first solve share one launch.
//   larger n: cuSOLVER through at::linalg_cholesky_ex / at::cholesky_solve -- still one factorisation per op call,
//     reused by the backward.
//
// Launches run on the current stream and are checked with C10_CUDA_KERNEL_LAUNCH_CHECK.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/utils.cuh"
#include "ops.h"

namespace ddfast {
namespace krr {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSmallN = 128;
constexpr int64_t kMaxRhsChunk = 32;

// Odd leading dimension of the shared factor: L[i][j] and L[i+1][j] fall in different banks.
__host__ __device__ inline int lead_dim(int n) { return n | 1; }

// Lower Cholesky in shared memory. On entry a[i * ld + k] (k <= i) holds A, on exit L. `piv` holds n scratch values.
// Returns 0, or j + 1 when the j-th pivot is not positive and finite (the return is uniform across the block: every
// thread reads the same pivot after the same barrier). Ends with a barrier on success.
//
// Step j updates the trailing lower triangle (columns > j) from the still unscaled column j
// (L_ij L_kj = a_ij a_kj / a_jj) and scales column j - 1, which no thread reads in step j; one barrier per step.
template <typename T>
__device__ int block_cholesky(T* a, T* piv, int n, int ld) {
  for (int j = 0; j < n; ++j) {
    const T d = a[j * ld + j];
    if (!(d > T(0) && isfinite(d))) return j + 1;
    if (threadIdx.x == 0) piv[j] = d;  // read from step j + 1 on, after the barrier
    const T inv = T(1) / d;
    const int r = n - j - 1;
    for (int idx = threadIdx.x; idx < r * r; idx += blockDim.x) {
      const int ii = idx / r, kk = idx - ii * r;
      if (kk <= ii) {
        const int i = j + 1 + ii, k = j + 1 + kk;
        a[i * ld + k] -= a[i * ld + j] * a[k * ld + j] * inv;
      }
    }
    if (j > 0) {
      const int c = j - 1;
      const T sq = sqrt(piv[c]);
      for (int i = c + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
        a[i * ld + c] = (i == c) ? sq : a[i * ld + c] / sq;
      }
    }
    __syncthreads();
  }
  if (n > 0 && threadIdx.x == 0) a[(n - 1) * ld + (n - 1)] = sqrt(piv[n - 1]);
  __syncthreads();
  return 0;
}

// x (n rows, w columns, row-major with leading dimension w) <- (L L^T)^{-1} x, L in shared memory.
// Row j is scaled one step late (it is not read in the step that scales it); one barrier per row.
template <typename T>
__device__ void block_chol_solve(const T* a, int n, int ld, T* x, int w) {
  for (int j = 0; j < n; ++j) {  // L y = x
    const T ljj = a[j * ld + j];
    const int r = n - j - 1;
    for (int idx = threadIdx.x; idx < r * w; idx += blockDim.x) {
      const int ii = idx / w, c = idx - ii * w;
      const int i = j + 1 + ii;
      x[i * w + c] -= a[i * ld + j] * (x[j * w + c] / ljj);
    }
    if (j > 0) {
      const T lp = a[(j - 1) * ld + (j - 1)];
      for (int c = threadIdx.x; c < w; c += blockDim.x) x[(j - 1) * w + c] /= lp;
    }
    __syncthreads();
  }
  if (n > 0) {
    const T lp = a[(n - 1) * ld + (n - 1)];
    for (int c = threadIdx.x; c < w; c += blockDim.x) x[(n - 1) * w + c] /= lp;
  }
  __syncthreads();
  for (int j = n - 1; j >= 0; --j) {  // L^T z = y
    const T ljj = a[j * ld + j];
    for (int idx = threadIdx.x; idx < j * w; idx += blockDim.x) {
      const int i = idx / w, c = idx - i * w;
      x[i * w + c] -= a[j * ld + i] * (x[j * w + c] / ljj);
    }
    if (j + 1 < n) {
      const T lp = a[(j + 1) * ld + (j + 1)];
      for (int c = threadIdx.x; c < w; c += blockDim.x) x[(j + 1) * w + c] /= lp;
    }
    __syncthreads();
  }
  if (n > 0) {
    const T lp = a[0];
    for (int c = threadIdx.x; c < w; c += blockDim.x) x[c] /= lp;
  }
  __syncthreads();
}

// out[n, C] = (L L^T)^{-1} rhs[n, C] in chunks of cc columns staged in shared memory `xs` (n * cc values).
template <typename T>
__device__ void solve_chunks(const T* a, int n, int ld, const T* __restrict__ rhs, T* __restrict__ out, int C, int cc,
                             T* xs) {
  for (int c0 = 0; c0 < C; c0 += cc) {
    const int w = min(cc, C - c0);
    for (int idx = threadIdx.x; idx < n * w; idx += blockDim.x) {
      const int i = idx / w, c = idx - i * w;
      xs[idx] = rhs[static_cast<int64_t>(i) * C + c0 + c];
    }
    __syncthreads();
    block_chol_solve(a, n, ld, xs, w);
    for (int idx = threadIdx.x; idx < n * w; idx += blockDim.x) {
      const int i = idx / w, c = idx - i * w;
      out[static_cast<int64_t>(i) * C + c0 + c] = xs[idx];
    }
    __syncthreads();  // xs is overwritten by the next chunk
  }
}

// Shared memory: factor (n * ld) | pivots (n) | right-hand-side chunk (n * cc).
template <typename T>
__device__ __forceinline__ void carve(unsigned char* raw, int n, T*& a, T*& piv, T*& xs) {
  a = reinterpret_cast<T*>(raw);
  piv = a + n * lead_dim(n);
  xs = piv + n;
}

// One block per system b: A = K_b + ridge_b I -> L (written over K_b), info_b, and x_b = A^{-1} rhs_b when rhs != null.
template <typename T>
__global__ void __launch_bounds__(kThreads) factor_solve_small_kernel(T* __restrict__ K, const T* __restrict__ ridge,
                                                                      const T* __restrict__ rhs, T* __restrict__ x,
                                                                      int* __restrict__ info, int n, int C, int cc) {
  extern __shared__ __align__(16) unsigned char smem[];
  T *a, *piv, *xs;
  carve(smem, n, a, piv, xs);
  const int ld = lead_dim(n);
  const int64_t b = blockIdx.x;
  T* Kb = K + b * n * n;
  const T r = ridge[b];
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, k = idx - i * n;
    if (k <= i) a[i * ld + k] = Kb[idx] + (i == k ? r : T(0));
  }
  __syncthreads();
  const int status = block_cholesky(a, piv, n, ld);
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, k = idx - i * n;
    Kb[idx] = k <= i ? a[i * ld + k] : T(0);
  }
  if (threadIdx.x == 0) info[b] = status;
  if (status != 0 || rhs == nullptr) return;  // uniform
  solve_chunks(a, n, ld, rhs + b * n * C, x + b * n * C, C, cc, xs);
}

// One block per system b: x_b = (L_b L_b^T)^{-1} rhs_b.
template <typename T>
__global__ void __launch_bounds__(kThreads) solve_small_kernel(const T* __restrict__ L, const T* __restrict__ rhs,
                                                               T* __restrict__ x, int n, int C, int cc) {
  extern __shared__ __align__(16) unsigned char smem[];
  T *a, *piv, *xs;
  carve(smem, n, a, piv, xs);
  const int ld = lead_dim(n);
  const int64_t b = blockIdx.x;
  const T* Lb = L + b * n * n;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, k = idx - i * n;
    if (k <= i) a[i * ld + k] = Lb[idx];
  }
  __syncthreads();
  solve_chunks(a, n, ld, rhs + b * n * C, x + b * n * C, C, cc, xs);
}

// ---- host side ------------------------------------------------------------------------------------------------------

struct SmallConfig {
  bool ok;
  int cc;        // right-hand-side columns per chunk
  size_t bytes;  // dynamic shared memory
};

SmallConfig small_config(int64_t n, int64_t C, size_t elt) {
  if (n > kMaxSmallN) return {false, 0, 0};
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t base = static_cast<size_t>(n * lead_dim(static_cast<int>(n)) + n) * elt;
  int64_t cc = std::min<int64_t>(std::max<int64_t>(C, 1), kMaxRhsChunk);
  while (cc > 1 && base + static_cast<size_t>(n * cc) * elt > limit) cc /= 2;
  const size_t bytes = base + static_cast<size_t>(n * cc) * elt;
  if (bytes > limit) return {false, 0, 0};
  return {true, static_cast<int>(cc), bytes};
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

at::Tensor cuda_solve(const at::Tensor& L, const at::Tensor& rhs) {
  c10::cuda::CUDAGuard guard(L.device());
  const int64_t B = L.size(0), n = L.size(1), C = rhs.size(2);
  const SmallConfig cfg = small_config(n, C, L.element_size());
  if (!cfg.ok) return at::cholesky_solve(rhs, L, /*upper=*/false).contiguous();  // cuSOLVER: column-major
  const at::Tensor Lc = L.contiguous(), y = rhs.contiguous();
  at::Tensor x = at::empty_like(y);
  if (x.numel() == 0) return x;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "krr_solve_cuda", [&] {
    allow_smem(solve_small_kernel<scalar_t>, cfg.bytes);
    solve_small_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, cfg.bytes, stream>>>(
        Lc.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(),
        static_cast<int>(n), static_cast<int>(C), cfg.cc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_factor_solve(const at::Tensor& K, const at::Tensor& ridge,
                                                                 const at::Tensor& rhs) {
  c10::cuda::CUDAGuard guard(K.device());
  const int64_t B = K.size(0), n = K.size(1);
  const int64_t C = rhs.defined() ? rhs.size(2) : 0;
  const SmallConfig cfg = small_config(n, C, K.element_size());
  if (!cfg.ok) {  // cuSOLVER through ATen
    at::Tensor A = K;
    A.diagonal(0, 1, 2).add_(ridge.unsqueeze(1));
    auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
    at::Tensor x = rhs.defined() ? at::cholesky_solve(rhs, L, /*upper=*/false).contiguous() : at::Tensor();
    return {L.contiguous(), info.to(at::kInt), x};
  }
  at::Tensor info = at::zeros({B}, K.options().dtype(at::kInt));
  at::Tensor x = rhs.defined() ? at::empty(rhs.sizes(), rhs.options()) : at::Tensor();
  if (B == 0 || n == 0) return {K, info, x};
  const at::Tensor r = ridge.contiguous();
  const at::Tensor y = rhs.defined() ? rhs.contiguous() : at::Tensor();
  const bool solve_too = rhs.defined() && C > 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krr_factor_solve_cuda", [&] {
    allow_smem(factor_solve_small_kernel<scalar_t>, cfg.bytes);
    factor_solve_small_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, cfg.bytes, stream>>>(
        K.mutable_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
        solve_too ? y.const_data_ptr<scalar_t>() : nullptr, solve_too ? x.mutable_data_ptr<scalar_t>() : nullptr,
        info.mutable_data_ptr<int>(), static_cast<int>(n), static_cast<int>(C), cfg.cc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {K, info, x};
}

const Backend kCudaBackend{&cuda_factor_solve, &cuda_solve};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& xs, const at::Tensor& ys,
                                                            const at::Tensor& xq, const at::Tensor& ridge) {
  c10::cuda::CUDAGuard guard(xs.device());
  return forward(kCudaBackend, xs, ys, xq, ridge);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& g, const at::Tensor& xs,
                                                                         const at::Tensor& xq, const at::Tensor& alpha,
                                                                         const at::Tensor& L,
                                                                         std::array<bool, 4> mask) {
  c10::cuda::CUDAGuard guard(xs.device());
  return backward(kCudaBackend, g, xs, xq, alpha, L, mask);
}

at::Tensor factor_cuda(const at::Tensor& xs, const at::Tensor& ridge) {
  c10::cuda::CUDAGuard guard(xs.device());
  return factor(kCudaBackend, xs, ridge);
}

std::tuple<at::Tensor, at::Tensor> predict_cuda(const at::Tensor& L, const at::Tensor& xs, const at::Tensor& ys,
                                                const at::Tensor& xq, const at::Tensor& ridge) {
  c10::cuda::CUDAGuard guard(xs.device());
  return predict(kCudaBackend, L, xs, ys, xq, ridge);
}

at::Tensor solve_cuda(const at::Tensor& L, const at::Tensor& xs, const at::Tensor& rhs, const at::Tensor& ridge) {
  c10::cuda::CUDAGuard guard(xs.device());
  return solve(kCudaBackend, L, xs, rhs, ridge);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_backward_cuda(const at::Tensor& g, const at::Tensor& L,
                                                                   const at::Tensor& xs, const at::Tensor& alpha,
                                                                   std::array<bool, 3> mask) {
  c10::cuda::CUDAGuard guard(xs.device());
  return solve_backward(kCudaBackend, g, L, xs, alpha, mask);
}

}  // namespace
}  // namespace krr
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("kernel_ridge_regression_forward", &ddfast::krr::forward_cuda);
  m.impl("kernel_ridge_regression_backward", &ddfast::krr::backward_cuda);
  m.impl("kernel_ridge_regression_factor", &ddfast::krr::factor_cuda);
  m.impl("kernel_ridge_regression_predict", &ddfast::krr::predict_cuda);
  m.impl("kernel_ridge_regression_solve", &ddfast::krr::solve_cuda);
  m.impl("kernel_ridge_regression_solve_backward", &ddfast::krr::solve_backward_cuda);
}
