// anchor_distances (TAD inner loop: Mahalanobis / cosine to class anchors): CUDA kernel.
//
// Same decomposition as csrc/cpu/anchor_distances_kernel.cpp:
//   Euclidean: a direct kernel, per (row i, class c)  sum_d (f_id - a_cd)^2  and  f_i . a_c  (no cancellation).
//   Mahalanobis: the O(N D^2) part is cuBLAS through ATen on row blocks of features centred on the mean anchor m,
//     Y = (F - m) P, Z = (A - m) P, then the direct kernel computes sum_d (y_id - z_cd)(f_id - a_cd).
// Direct kernel: one block per row (grid-stride), threads stride over D; classes in tiles of kTile, each tile's
// 2 kTile partial sums (distance, dot) block-reduced at once; ||f_i|| in a first reduction. The feature row is
// read from global memory once per tile (L1/L2 hits after the first), anchors stay in L2.
// Accumulation in the input dtype (float32 or float64); distances clamped at 0.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/utils.cuh"
#include "ops.h"

namespace ddfast {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 8;

template <typename T, bool kHasP>
__global__ void __launch_bounds__(kThreads) anchor_kernel(const T* __restrict__ F, int64_t fs, const T* __restrict__ Y,
                                                          int64_t y0, const T* __restrict__ A, const T* __restrict__ Z,
                                                          const T* __restrict__ an, int64_t r0, int64_t r1, int64_t C,
                                                          int64_t D, T eps, T* __restrict__ maha, T* __restrict__ cosv) {
  __shared__ T shm[2 * kTile * cuda::kWarpSize];
  __shared__ T nf_shared;
  for (int64_t i = r0 + blockIdx.x; i < r1; i += gridDim.x) {  // uniform over the block
    const T* f = F + i * fs;
    const T* y = kHasP ? Y + (i - y0) * D : nullptr;
    T n2[1] = {T(0)};
    for (int64_t d = threadIdx.x; d < D; d += kThreads) n2[0] += f[d] * f[d];
    cuda::block_sum<T, 1>(n2, shm);
    if (threadIdx.x == 0) {
      const T nf = sqrt(n2[0]);
      nf_shared = nf > eps ? nf : eps;
    }
    __syncthreads();  // nf_shared visible; shm free again
    const T nf = nf_shared;
    for (int64_t c0 = 0; c0 < C; c0 += kTile) {
      T acc[2 * kTile];
#pragma unroll
      for (int t = 0; t < 2 * kTile; ++t) acc[t] = T(0);
      for (int64_t d = threadIdx.x; d < D; d += kThreads) {
        const T fd = f[d];
        const T yd = kHasP ? y[d] : T(0);
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          const int64_t c = c0 + t;
          if (c < C) {
            const T ad = A[c * D + d];
            const T diff = fd - ad;
            acc[t] += kHasP ? (yd - Z[c * D + d]) * diff : diff * diff;
            acc[kTile + t] += fd * ad;
          }
        }
      }
      cuda::block_sum<T, 2 * kTile>(acc, shm);
      if (threadIdx.x == 0) {
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          const int64_t c = c0 + t;
          if (c < C) {
            maha[i * C + c] = acc[t] > T(0) ? acc[t] : T(0);
            cosv[i * C + c] = acc[kTile + t] / (nf * an[c]);
          }
        }
      }
      __syncthreads();  // shm reused by the next tile / row; nf_shared rewritten by the next row
    }
  }
}

template <typename T>
void launch(const at::Tensor& features, const T* Y, int64_t y0, const at::Tensor& anchors, const T* Z,
            const at::Tensor& an, int64_t r0, int64_t r1, double eps, at::Tensor& maha, at::Tensor& cosv) {
  const int64_t C = anchors.size(0), D = anchors.size(1);
  const int64_t blocks = std::min<int64_t>(r1 - r0, int64_t(cuda::sm_count()) * 16);
  if (blocks <= 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (Y != nullptr) {
    anchor_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        features.const_data_ptr<T>(), features.stride(0), Y, y0, anchors.const_data_ptr<T>(), Z,
        an.const_data_ptr<T>(), r0, r1, C, D, static_cast<T>(eps), maha.mutable_data_ptr<T>(),
        cosv.mutable_data_ptr<T>());
  } else {
    anchor_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        features.const_data_ptr<T>(), features.stride(0), nullptr, 0, anchors.const_data_ptr<T>(), nullptr,
        an.const_data_ptr<T>(), r0, r1, C, D, static_cast<T>(eps), maha.mutable_data_ptr<T>(),
        cosv.mutable_data_ptr<T>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> anchor_distances_cuda(const at::Tensor& features_in, const at::Tensor& anchors_in,
                                                         const c10::optional<at::Tensor>& precision, double eps) {
  trust::check_anchor_distances_args(features_in, anchors_in, precision, eps);
  const auto st = features_in.scalar_type();
  const int64_t D = features_in.size(1);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = rows_unit_stride(features_in);
  const at::Tensor anchors = anchors_in.contiguous();
  const int64_t N = features.size(0), C = anchors.size(0);
  auto maha = at::empty({N, C}, features.options());
  auto cosv = at::empty({N, C}, features.options());
  if (N == 0 || C == 0) return {maha, cosv};
  const at::Tensor an = (anchors * anchors).sum(1).sqrt().clamp_min(eps).contiguous();  // as the CPU kernel
  AT_DISPATCH_FLOATING_TYPES(st, "anchor_distances_cuda", [&] {
    if (!precision.has_value()) {
      launch<scalar_t>(features, nullptr, 0, anchors, nullptr, an, 0, N, eps, maha, cosv);
      return;
    }
    const at::Tensor& P = *precision;
    const at::Tensor center = anchors.mean(0, /*keepdim=*/true);
    const at::Tensor Zt = at::mm(anchors - center, P).contiguous();
    // row blocks of at most 2^26 elements of Y
    const int64_t rb = std::max<int64_t>(1, (int64_t(1) << 26) / std::max<int64_t>(D, 1));
    for (int64_t r0 = 0; r0 < N; r0 += rb) {
      const int64_t r1 = std::min(N, r0 + rb);
      const at::Tensor Yt = at::mm(features.slice(0, r0, r1) - center, P).contiguous();
      launch<scalar_t>(features, Yt.const_data_ptr<scalar_t>(), r0, anchors, Zt.const_data_ptr<scalar_t>(), an, r0,
                       r1, eps, maha, cosv);
    }
  });
  return {maha, cosv};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) { m.impl("anchor_distances", &ddfast::anchor_distances_cuda); }
