// Small device helpers shared by ddfast's CUDA kernels: warp/block sums and aligned vector loads.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <initializer_list>

namespace ddfast {
namespace cuda {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums N values per thread over the block (blockDim.x a multiple of 32, at most 1024). The totals are valid in
// thread 0 only. `shm` must hold N * 32 values; the caller __syncthreads() before reusing it.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* shm) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shm[k * kWarpSize + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = lane < nwarps ? shm[k * kWarpSize + lane] : T(0);
      v[k] = warp_sum(v[k]);
    }
  }
}

// VEC consecutive elements loaded/stored as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// Elements per 16-byte pack.
template <typename T>
constexpr int kPackOf = static_cast<int>(16 / sizeof(T)) > 0 ? static_cast<int>(16 / sizeof(T)) : 1;

// True when 16-byte packs can be used: every pointer 16-byte aligned and every row stride a multiple of the pack.
template <typename T>
inline bool can_pack(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int vec = kPackOf<T>;
  bool ok = true;
  for (const void* p : ptrs) ok = ok && (reinterpret_cast<std::uintptr_t>(p) % (vec * sizeof(T)) == 0);
  for (int64_t s : strides) ok = ok && (s % vec == 0);
  return ok;
}

// True while the stream is being captured into a CUDA graph (host synchronisation is then not allowed).
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace cuda
}  // namespace ddfast
