// classwise_gmm (TAD / DivideMix-style per-class loss GMM): CUDA kernel.
//
// Setup (ATen, on the current stream, no host synchronisation): a stable sort of the labels gives the samples in
// class order (xs, perm); class c occupies [start_c, start_c + count_c) (searchsorted), and is cut into work items
// of kChunk samples; item_start = exclusive cumsum of the items per class. Every launch has the host-known upper
// bound N / kChunk + C blocks; block b binary-searches item_start for its class, and blocks past the last item,
// or of a class that is no longer active, return at once.
// EM iteration = two launches:
//   gmm_stats_kernel  -- one block per item: E-step with the class's current parameters and the item's
//                        sufficient statistics {S_k, M_k, Q_k (shifted by the current means), LL}, block-reduced in
//                        double and written to partial[item] (no atomics: the result does not depend on timing);
//   gmm_mstep_kernel  -- one thread per class: sums its items' partials in order, scikit-learn's M-step
//                        (n_k = S_k + 10 eps, ...), the convergence test |LL_t - LL_{t-1}| < tol, n_iter.
// The host reads the number of active classes every kCheckEvery iterations (one sync) and stops when none is
// left. Then gmm_finalize_kernel orders each class's components by mean and writes the parameters, and
// gmm_posterior_kernel writes each sample's responsibility of component 0 back to its input position. Samples
// whose label is outside [0, C) (checked by the Python wrapper before launching) belong to no class and get NaN.
// Same formulas, per-sample precision and accumulation as csrc/cpu/classwise_gmm_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/utils.cuh"
#include "ops.h"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 2048;  // samples per block (8 per thread)
constexpr int kCheckEvery = 8;
constexpr double kLog2Pi = 1.8378770664093454836;
constexpr double kTieSd = 1e-3;  // ordering tie band, in standard deviations (as the CPU kernel)

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }

// The class of work item `item`: the c with item_start[c] <= item < item_start[c + 1] (classes without items
// have item_start[c] == item_start[c + 1] and are skipped). Requires item < item_start[C].
__device__ __forceinline__ int64_t class_of_item(const int64_t* __restrict__ item_start, int64_t C, int64_t item) {
  int64_t lo = 0, hi = C;  // item_start[lo] <= item < item_start[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (item_start[mid] <= item) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
struct Comp {  // E-step form of one class's two components
  T mu0, mu1, a0, a1, h0, h1;
};

template <typename T>
__device__ __forceinline__ Comp<T> load_comp(const double* w, const double* mu, const double* var, int64_t c) {
  Comp<T> p;
  p.mu0 = T(mu[2 * c]);
  p.mu1 = T(mu[2 * c + 1]);
  p.a0 = T(log(w[2 * c]) - 0.5 * (kLog2Pi + log(var[2 * c])));
  p.a1 = T(log(w[2 * c + 1]) - 0.5 * (kLog2Pi + log(var[2 * c + 1])));
  p.h0 = T(0.5 / var[2 * c]);
  p.h1 = T(0.5 / var[2 * c + 1]);
  return p;
}

// Item range [b, e) of the sorted samples for block `item` of class c.
__device__ __forceinline__ void item_range(const int64_t* start, const int64_t* count, const int64_t* item_start,
                                           int64_t c, int64_t item, int64_t& b, int64_t& e) {
  b = start[c] + (item - item_start[c]) * kChunk;
  const int64_t end_c = start[c] + count[c];
  e = b + kChunk < end_c ? b + kChunk : end_c;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gmm_stats_kernel(
    const T* __restrict__ xs, const int64_t* __restrict__ start, const int64_t* __restrict__ count,
    const int64_t* __restrict__ item_start, int64_t C, const bool* __restrict__ active,
    const double* __restrict__ w, const double* __restrict__ mu, const double* __restrict__ var,
    double* __restrict__ partial) {
  __shared__ double shm[7 * cuda::kWarpSize];
  const int64_t item = blockIdx.x;
  if (item >= item_start[C]) return;
  const int64_t c = class_of_item(item_start, C, item);
  if (!active[c]) return;  // uniform over the block: no thread reaches the __syncthreads in block_sum
  const Comp<T> p = load_comp<T>(w, mu, var, c);
  int64_t b, e;
  item_range(start, count, item_start, c, item, b, e);
  T s0 = 0, s1 = 0, m0 = 0, m1 = 0, q0 = 0, q1 = 0, ll = 0;
  for (int64_t j = b + threadIdx.x; j < e; j += kThreads) {
    const T x = xs[j];
    const T d0 = x - p.mu0, d1 = x - p.mu1;
    const T l0 = p.a0 - p.h0 * d0 * d0;
    const T l1 = p.a1 - p.h1 * d1 * d1;
    const T diff = l0 - l1;
    const bool first = diff >= T(0);
    const T t = dexp(first ? -diff : diff);
    const T inv = T(1) / (T(1) + t);
    const T r0 = first ? inv : t * inv;
    const T r1 = first ? t * inv : inv;
    s0 += r0;
    s1 += r1;
    m0 += r0 * d0;
    m1 += r1 * d1;
    q0 += r0 * d0 * d0;
    q1 += r1 * d1 * d1;
    ll += (first ? l0 : l1) + dlog1p(t);
  }
  double v[7] = {double(s0), double(s1), double(m0), double(m1), double(q0), double(q1), double(ll)};
  cuda::block_sum<double, 7>(v, shm);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 7; ++k) partial[7 * item + k] = v[k];
  }
}

template <typename T>
__global__ void gmm_mstep_kernel(const int64_t* __restrict__ count, const int64_t* __restrict__ item_start, int64_t C,
                                 bool* __restrict__ active, double* __restrict__ w, double* __restrict__ mu,
                                 double* __restrict__ var, double* __restrict__ ll_prev, int64_t* __restrict__ n_iter,
                                 const double* __restrict__ partial, double tol, double reg_covar) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C || !active[c]) return;
  double tot[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t it = item_start[c]; it < item_start[c + 1]; ++it) {
#pragma unroll
    for (int k = 0; k < 7; ++k) tot[k] += partial[7 * it + k];
  }
  const double eps10 = 10.0 * double(std::numeric_limits<T>::epsilon());
  const double nk0 = tot[0] + eps10, nk1 = tot[1] + eps10;
  const double mo0 = mu[2 * c], mo1 = mu[2 * c + 1];
  const double m0 = (tot[2] + mo0 * tot[0]) / nk0;
  const double m1 = (tot[3] + mo1 * tot[1]) / nk1;
  const double d0 = m0 - mo0, d1 = m1 - mo1;
  const double v0 = fmax(0.0, tot[4] - 2.0 * d0 * tot[2] + d0 * d0 * tot[0]) / nk0 + reg_covar;
  const double v1 = fmax(0.0, tot[5] - 2.0 * d1 * tot[3] + d1 * d1 * tot[1]) / nk1 + reg_covar;
  w[2 * c] = nk0 / (nk0 + nk1);
  w[2 * c + 1] = nk1 / (nk0 + nk1);
  mu[2 * c] = m0;
  mu[2 * c + 1] = m1;
  var[2 * c] = v0;
  var[2 * c + 1] = v1;
  n_iter[c] += 1;
  const double ll = tot[6] / double(count[c]);
  if (fabs(ll - ll_prev[c]) < tol) active[c] = false;
  ll_prev[c] = ll;
}

// Orders each class's components by mean (in the double parameter arrays) and writes the outputs.
template <typename T>
__global__ void gmm_finalize_kernel(int64_t C, double* __restrict__ w, double* __restrict__ mu,
                                    double* __restrict__ var, T* __restrict__ w_out, T* __restrict__ mu_out,
                                    T* __restrict__ var_out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // means within kTieSd standard deviations are a tie and keep their order (as the CPU kernel)
  if (mu[2 * c + 1] < mu[2 * c] - kTieSd * sqrt(fmax(var[2 * c], var[2 * c + 1]))) {
    double t;
    t = w[2 * c]; w[2 * c] = w[2 * c + 1]; w[2 * c + 1] = t;
    t = mu[2 * c]; mu[2 * c] = mu[2 * c + 1]; mu[2 * c + 1] = t;
    t = var[2 * c]; var[2 * c] = var[2 * c + 1]; var[2 * c + 1] = t;
  }
  for (int k = 0; k < 2; ++k) {
    w_out[2 * c + k] = T(w[2 * c + k]);
    mu_out[2 * c + k] = T(mu[2 * c + k]);
    var_out[2 * c + k] = T(var[2 * c + k]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gmm_posterior_kernel(
    const T* __restrict__ xs, const int64_t* __restrict__ perm, const int64_t* __restrict__ start,
    const int64_t* __restrict__ count, const int64_t* __restrict__ item_start, int64_t C,
    const double* __restrict__ w, const double* __restrict__ mu, const double* __restrict__ var, T* __restrict__ post) {
  const int64_t item = blockIdx.x;
  if (item >= item_start[C]) return;
  const int64_t c = class_of_item(item_start, C, item);
  const Comp<T> p = load_comp<T>(w, mu, var, c);
  int64_t b, e;
  item_range(start, count, item_start, c, item, b, e);
  for (int64_t j = b + threadIdx.x; j < e; j += kThreads) {
    const T x = xs[j];
    const T d0 = x - p.mu0, d1 = x - p.mu1;
    const T diff = (p.a0 - p.h0 * d0 * d0) - (p.a1 - p.h1 * d1 * d1);
    const bool first = diff >= T(0);
    const T t = dexp(first ? -diff : diff);
    const T inv = T(1) / (T(1) + t);
    post[perm[j]] = first ? inv : t * inv;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> classwise_gmm_cuda(
    const at::Tensor& values, const at::Tensor& labels, int64_t num_classes, int64_t num_iters, double tol,
    double reg_covar, const at::Tensor& init_weights, const at::Tensor& init_means, const at::Tensor& init_variances) {
  trust::check_classwise_gmm_args(values, labels, num_classes, num_iters, tol, reg_covar, init_weights, init_means,
                                  init_variances);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t N = values.size(0), C = num_classes;
  const auto opts = values.options();
  const auto lopts = opts.dtype(at::kLong);
  auto post = at::full({N}, std::numeric_limits<double>::quiet_NaN(), opts);
  auto w_out = at::empty({C, 2}, opts), mu_out = at::empty({C, 2}, opts), var_out = at::empty({C, 2}, opts);
  auto n_iter = at::zeros({C}, lopts);
  // parameters in double, updated in place by the M-step
  auto w = init_weights.to(at::kDouble).contiguous().clone();
  auto mu = init_means.to(at::kDouble).contiguous().clone();
  auto var = init_variances.to(at::kDouble).contiguous().clone();

  auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor ys = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const at::Tensor cls = at::arange(C, lopts);
  const at::Tensor start = at::searchsorted(ys, cls, /*out_int32=*/false, /*right=*/false).contiguous();
  const at::Tensor count = (at::searchsorted(ys, cls, false, true) - start).contiguous();
  const at::Tensor item_start = at::cat({at::zeros({1}, lopts), at::cumsum(at::floor_divide(count + (kChunk - 1), kChunk), 0)})
                                    .contiguous();
  const at::Tensor xs = values.index_select(0, perm).contiguous();
  auto active = (num_iters > 0 ? count.ge(2) : at::zeros({C}, opts.dtype(at::kBool))).contiguous();
  auto ll_prev = at::full({C}, -std::numeric_limits<double>::infinity(), opts.dtype(at::kDouble));
  const int64_t max_items = N / kChunk + C;  // >= item_start[C]
  auto partial = at::empty({max_items * 7}, opts.dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned class_blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "classwise_gmm_cuda", [&] {
    using T = scalar_t;
    if (N > 0) {
      for (int64_t it = 0; it < num_iters; ++it) {
        gmm_stats_kernel<T><<<static_cast<unsigned>(max_items), kThreads, 0, stream>>>(
            xs.const_data_ptr<T>(), start.const_data_ptr<int64_t>(), count.const_data_ptr<int64_t>(),
            item_start.const_data_ptr<int64_t>(), C, active.const_data_ptr<bool>(), w.const_data_ptr<double>(),
            mu.const_data_ptr<double>(), var.const_data_ptr<double>(), partial.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gmm_mstep_kernel<T><<<class_blocks, kThreads, 0, stream>>>(
            count.const_data_ptr<int64_t>(), item_start.const_data_ptr<int64_t>(), C, active.mutable_data_ptr<bool>(),
            w.mutable_data_ptr<double>(), mu.mutable_data_ptr<double>(), var.mutable_data_ptr<double>(),
            ll_prev.mutable_data_ptr<double>(), n_iter.mutable_data_ptr<int64_t>(), partial.const_data_ptr<double>(),
            tol, reg_covar);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // stop early once every class has converged (one host sync every kCheckEvery iterations; none while
        // the stream is being captured into a CUDA graph: the remaining launches then return at once)
        if ((it + 1) % kCheckEvery == 0 && it + 1 < num_iters && !cuda::stream_is_capturing(stream) &&
            !active.any().item<bool>()) {
          break;
        }
      }
    }
    gmm_finalize_kernel<T><<<class_blocks, kThreads, 0, stream>>>(
        C, w.mutable_data_ptr<double>(), mu.mutable_data_ptr<double>(), var.mutable_data_ptr<double>(),
        w_out.mutable_data_ptr<T>(), mu_out.mutable_data_ptr<T>(), var_out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N > 0) {
      gmm_posterior_kernel<T><<<static_cast<unsigned>(max_items), kThreads, 0, stream>>>(
          xs.const_data_ptr<T>(), perm.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(),
          count.const_data_ptr<int64_t>(), item_start.const_data_ptr<int64_t>(), C, w.const_data_ptr<double>(),
          mu.const_data_ptr<double>(), var.const_data_ptr<double>(), post.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {post, w_out, mu_out, var_out, n_iter};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) { m.impl("classwise_gmm", &ddfast::classwise_gmm_cuda); }
