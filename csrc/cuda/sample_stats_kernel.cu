// sample_stats / sample_stats_ema_ (TAD per-sample statistics): CUDA kernel.
//
// One warp per row (grid-stride over rows). Each lane walks its strided share of the row once with an online
// softmax -- running max m, running sum s of exp(z - m) rescaled when m grows, the first index of m, the max o
// over k != y, a NaN flag -- four loads in flight per lane; the 32 partial states are merged with shuffles.
// Lane 0 then reads z_y (a cached reload) and writes
//   loss = (m - z_y) + log s, confidence = exp(z_y - m) / s, margin = (exp(z_y - m) - exp(o - m)) / s,
// and, for sample_stats_ema_, ema <- momentum * ema + (1 - momentum) * loss.
// Accumulation in at::opmath_type (float32; float64 for float64 logits). A row with NaN, +inf or only -inf, or a
// label outside [0, C) (the Python wrapper checks labels before launching; a kernel cannot raise), gets NaN
// statistics. Mirrors csrc/cpu/sample_stats_kernel.cpp.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/utils.cuh"
#include "ops.h"

namespace ddfast {
namespace {

constexpr int kThreads = 256;  // 8 warps = 8 rows per block
constexpr int kUnroll = 4;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

// Online-softmax state of a set of logits.
template <typename acc_t>
struct State {
  acc_t m;    // max
  acc_t s;    // sum of exp(z - m)
  acc_t o;    // max over k != y
  int64_t a;  // first index of m
};

template <typename acc_t>
__device__ __forceinline__ void push(State<acc_t>& st, acc_t v, int64_t k, int64_t y, bool& bad) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  bad |= (v != v);
  if (v > st.m) {  // strict: a later equal value keeps the earlier index
    st.s = st.s * dexp(st.m - v) + acc_t(1);  // m == -inf: s == 0, exp(-inf) == 0
    st.m = v;
    st.a = k;
  } else if (v > ninf) {
    st.s += dexp(v - st.m);
  }
  if (k != y && v > st.o) st.o = v;
}

template <typename acc_t>
__device__ __forceinline__ void merge(State<acc_t>& st, const State<acc_t>& b) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t m = st.m > b.m ? st.m : b.m;
  const acc_t sa = st.m > ninf ? st.s * dexp(st.m - m) : acc_t(0);
  const acc_t sb = b.m > ninf ? b.s * dexp(b.m - m) : acc_t(0);
  if (b.m > st.m || (b.m == st.m && b.a < st.a)) st.a = b.a;
  st.m = m;
  st.s = sa + sb;
  st.o = st.o > b.o ? st.o : b.o;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sample_stats_kernel(
    const scalar_t* __restrict__ z, int64_t rs, int64_t N, int64_t C, const int64_t* __restrict__ labels, int64_t ys,
    acc_t* __restrict__ loss, acc_t* __restrict__ conf, acc_t* __restrict__ margin, int64_t* __restrict__ pred,
    float* __restrict__ ema_f, double* __restrict__ ema_d, int64_t es, double momentum) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t pinf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t warps = kThreads / cuda::kWarpSize;
  for (int64_t row = int64_t(blockIdx.x) * warps + threadIdx.x / cuda::kWarpSize; row < N;
       row += int64_t(gridDim.x) * warps) {
    const int64_t y = labels[row * ys];
    const scalar_t* zr = z + row * rs;
    State<acc_t> st{ninf, acc_t(0), ninf, C};
    bool bad = false;
    int64_t k = lane;
    for (; k + (kUnroll - 1) * cuda::kWarpSize < C; k += kUnroll * cuda::kWarpSize) {
      acc_t v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = static_cast<acc_t>(zr[k + u * cuda::kWarpSize]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) push(st, v[u], k + u * cuda::kWarpSize, y, bad);
    }
    for (; k < C; k += cuda::kWarpSize) push(st, static_cast<acc_t>(zr[k]), k, y, bad);
#pragma unroll
    for (int off = cuda::kWarpSize / 2; off > 0; off >>= 1) {
      State<acc_t> b;
      b.m = __shfl_xor_sync(0xffffffffu, st.m, off);
      b.s = __shfl_xor_sync(0xffffffffu, st.s, off);
      b.o = __shfl_xor_sync(0xffffffffu, st.o, off);
      b.a = __shfl_xor_sync(0xffffffffu, st.a, off);
      merge(st, b);
    }
    bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) {
      const bool ok = !bad && y >= 0 && y < C && st.m != pinf && st.m != ninf;
      acc_t l = qnan, c = qnan, mg = qnan;
      if (ok) {
        const acc_t zy = static_cast<acc_t>(zr[y]);
        const acc_t ey = dexp(zy - st.m);
        const acc_t eo = dexp(st.o - st.m);  // o == -inf -> 0 (C == 1)
        l = (st.m - zy) + dlog(st.s);
        c = ey / st.s;
        mg = (ey - eo) / st.s;
      }
      loss[row] = l;
      conf[row] = c;
      margin[row] = mg;
      pred[row] = st.a < C ? st.a : 0;
      if (ema_f != nullptr) {
        ema_f[row * es] = float(momentum) * ema_f[row * es] + float(1.0 - momentum) * static_cast<float>(l);
      } else if (ema_d != nullptr) {
        ema_d[row * es] = momentum * ema_d[row * es] + (1.0 - momentum) * static_cast<double>(l);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> impl(const at::Tensor& logits_in, const at::Tensor& labels,
                                                                 const at::Tensor* ema, double momentum) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = rows_unit_stride(logits_in);
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = acc_type_of(logits.scalar_type());
  auto loss = at::empty({N}, logits.options().dtype(acc));
  auto conf = at::empty_like(loss);
  auto margin = at::empty_like(loss);
  auto pred = at::empty({N}, logits.options().dtype(at::kLong));
  if (N == 0) return {loss, conf, margin, pred};
  const int64_t rows_per_block = kThreads / cuda::kWarpSize;
  const int64_t blocks = std::min<int64_t>((N + rows_per_block - 1) / rows_per_block, int64_t(cuda::sm_count()) * 64);
  float* ema_f = (ema != nullptr && ema->scalar_type() == at::kFloat) ? ema->mutable_data_ptr<float>() : nullptr;
  double* ema_d = (ema != nullptr && ema->scalar_type() == at::kDouble) ? ema->mutable_data_ptr<double>() : nullptr;
  const int64_t es = ema != nullptr ? ema->stride(0) : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), N, C, labels.const_data_ptr<int64_t>(), labels.stride(0),
        loss.mutable_data_ptr<acc_t>(), conf.mutable_data_ptr<acc_t>(), margin.mutable_data_ptr<acc_t>(),
        pred.mutable_data_ptr<int64_t>(), ema_f, ema_d, es, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, conf, margin, pred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_stats_cuda(const at::Tensor& logits,
                                                                              const at::Tensor& labels) {
  trust::check_sample_stats_args("sample_stats", logits, labels, nullptr, 0.0);
  return impl(logits, labels, nullptr, 0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_stats_ema_cuda(const at::Tensor& logits,
                                                                                  const at::Tensor& labels,
                                                                                  at::Tensor& ema, double momentum) {
  trust::check_sample_stats_args("sample_stats_ema_", logits, labels, &ema, momentum);
  return impl(logits, labels, &ema, momentum);
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("sample_stats", &ddfast::sample_stats_cuda);
  m.impl("sample_stats_ema_", &ddfast::sample_stats_ema_cuda);
}
