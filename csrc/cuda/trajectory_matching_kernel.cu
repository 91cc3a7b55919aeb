// Trajectory matching (MTT eq. 2) and TESLA's fused quantities: CUDA kernels (mirror of
// csrc/cpu/trajectory_matching_kernel.cpp).
//
//   forward : reduce3_kernel<TrajSums>  (grid = row chunks x rows; 16-byte loads; warp-shuffle block sums into
//             per-block partials) + finalize_kernel (one block per row sums the partials in a fixed order, so the
//             result is deterministic) -> loss, num, den
//   backward: backward_kernel, one elementwise pass writing the requested gradients
//   tesla   : reduce3_kernel<TeslaSums> + finalize_kernel -> loss, grad_lr and a per-row scale;
//             step_kernel writes v = scale * (e - t - a G)   (theta_N is never materialised)
//
// Everything runs on the current stream; every launch is checked. A row with den == 0 raises ValueError after one
// device-to-host copy of a single int (skipped while the stream is captured into a CUDA graph).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "cuda/utils.cuh"
#include "ops.h"

namespace ddfast {
namespace {

using cuda::block_sum;
using cuda::kPackOf;
using cuda::kWarpSize;
using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kMaxPartials = 8192;  // per row
constexpr int kMaxGridY = 65535;

// ---- per-element contributions of the two reductions ------------------------------------------------------------

// (x0, x1, x2) = (student, start, target): v = (||s - t||^2, ||e - t||^2)
struct TrajSums {
  static constexpr int N = 2;
  template <typename acc_t>
  __device__ __forceinline__ static void add(acc_t (&v)[N], acc_t s, acc_t e, acc_t t, acc_t) {
    const acc_t a = s - t, c = e - t;
    v[0] += a * a;
    v[1] += c * c;
  }
};

// (x0, x1, x2) = (start, target, grad_sum), row parameter lr:
// v = (||e - t||^2, ||e - t - a G||^2, G . (e - t - a G))
struct TeslaSums {
  static constexpr int N = 3;
  template <typename acc_t>
  __device__ __forceinline__ static void add(acc_t (&v)[N], acc_t e, acc_t t, acc_t g, acc_t a) {
    const acc_t et = e - t, d = et - a * g;
    v[0] += et * et;
    v[1] += d * d;
    v[2] += g * d;
  }
};

// partial[(b * gridDim.x + blockIdx.x) * N + k]: sums over columns [blockIdx.x * span, +span) of row b.
template <typename scalar_t, typename acc_t, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) reduce3_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1,
                                                           const scalar_t* __restrict__ x2, int64_t s0, int64_t s1,
                                                           int64_t s2, const acc_t* __restrict__ row_param, int64_t B,
                                                           int64_t P, int64_t span, acc_t* __restrict__ partial) {
  constexpr int N = Op::N;
  __shared__ acc_t shm[N * kWarpSize];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * span;
  const int64_t hi = lo + span < P ? lo + span : P;
  const int64_t hv = lo + ((hi - lo) / VEC) * VEC;  // packed part [lo, hv), scalar tail [hv, hi)
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const scalar_t* r0 = x0 + b * s0;
    const scalar_t* r1 = x1 + b * s1;
    const scalar_t* r2 = x2 + b * s2;
    const acc_t rp = row_param != nullptr ? row_param[b] : acc_t(0);
    acc_t v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = acc_t(0);
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * VEC; i < hv; i += static_cast<int64_t>(blockDim.x) * VEC) {
      const Pack<scalar_t, VEC> a = *reinterpret_cast<const Pack<scalar_t, VEC>*>(r0 + i);
      const Pack<scalar_t, VEC> c = *reinterpret_cast<const Pack<scalar_t, VEC>*>(r1 + i);
      const Pack<scalar_t, VEC> d = *reinterpret_cast<const Pack<scalar_t, VEC>*>(r2 + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        Op::add(v, static_cast<acc_t>(a.val[j]), static_cast<acc_t>(c.val[j]), static_cast<acc_t>(d.val[j]), rp);
      }
    }
    for (int64_t i = hv + threadIdx.x; i < hi; i += blockDim.x) {
      Op::add(v, static_cast<acc_t>(r0[i]), static_cast<acc_t>(r1[i]), static_cast<acc_t>(r2[i]), rp);
    }
    block_sum<acc_t, N>(v, shm);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) partial[(b * gridDim.x + blockIdx.x) * N + k] = v[k];
    }
    __syncthreads();  // shm is reused by the next row
  }
}

// One block per row (grid-stride over rows): totals of the partials in a fixed order, then the per-row outputs.
//   TrajSums : out0 = loss (scalar_t), num, den (acc_t)
//   TeslaSums: out0 = loss (scalar_t), out1 = grad_lr (scalar_t), scale = -2 a / den (acc_t)
template <typename scalar_t, typename acc_t, typename Op>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const acc_t* __restrict__ partial, int nblk, int64_t B,
                                                            const acc_t* __restrict__ row_param,
                                                            scalar_t* __restrict__ out0, scalar_t* __restrict__ out1,
                                                            acc_t* __restrict__ num, acc_t* __restrict__ den,
                                                            acc_t* __restrict__ scale, int* __restrict__ zero_row) {
  constexpr int N = Op::N;
  __shared__ acc_t shm[N * kWarpSize];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = acc_t(0);
    for (int j = threadIdx.x; j < nblk; j += blockDim.x) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] += partial[(b * nblk + j) * N + k];
    }
    block_sum<acc_t, N>(v, shm);
    if (threadIdx.x == 0) {
      if constexpr (N == 2) {  // TrajSums: v = (num, den)
        const acc_t nb = v[0], db = v[N - 1];
        num[b] = nb;
        den[b] = db;
        out0[b] = static_cast<scalar_t>(nb / db);
        if (db == acc_t(0)) atomicMin(zero_row, static_cast<int>(b < INT_MAX ? b : INT_MAX - 1));
      } else {  // TeslaSums: v = (den, num, dot)
        const acc_t db = v[0], nb = v[1], pb = v[N - 1];
        out0[b] = static_cast<scalar_t>(nb / db);
        out1[b] = static_cast<scalar_t>(acc_t(-2) * pb / db);
        scale[b] = acc_t(-2) * row_param[b] / db;
        if (db == acc_t(0)) atomicMin(zero_row, static_cast<int>(b < INT_MAX ? b : INT_MAX - 1));
      }
    }
    __syncthreads();
  }
}

// ds = cs (s - t), de = ce (e - t), dt = -(ds + de) with cs = 2 g / den, ce = -2 g L / den; null outputs skipped.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ grad, const acc_t* __restrict__ num, const acc_t* __restrict__ den,
    const scalar_t* __restrict__ s, const scalar_t* __restrict__ e, const scalar_t* __restrict__ t, int64_t ss,
    int64_t es, int64_t ts, int64_t B, int64_t P, scalar_t* __restrict__ ds, scalar_t* __restrict__ de,
    scalar_t* __restrict__ dt) {
  const bool need_s = ds != nullptr || dt != nullptr;
  const bool need_e = de != nullptr || dt != nullptr;
  const int64_t pv = (P / VEC) * VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc_t g = static_cast<acc_t>(grad[b]), d = den[b];
    const acc_t cs = acc_t(2) * g / d;
    const acc_t ce = acc_t(-2) * g * (num[b] / d) / d;
    const scalar_t* sr = s + b * ss;
    const scalar_t* er = e + b * es;
    const scalar_t* tr = t + b * ts;
    const int64_t o = b * P;
    for (int64_t i = first * VEC; i < pv; i += step * VEC) {
      const Pack<scalar_t, VEC> tp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(tr + i);
      Pack<scalar_t, VEC> sp, ep, gs_out, ge_out, gt_out;
      if (need_s) sp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(sr + i);
      if (need_e) ep = *reinterpret_cast<const Pack<scalar_t, VEC>*>(er + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t tt = static_cast<acc_t>(tp.val[j]);
        const acc_t gs = need_s ? cs * (static_cast<acc_t>(sp.val[j]) - tt) : acc_t(0);
        const acc_t ge = need_e ? ce * (static_cast<acc_t>(ep.val[j]) - tt) : acc_t(0);
        gs_out.val[j] = static_cast<scalar_t>(gs);
        ge_out.val[j] = static_cast<scalar_t>(ge);
        gt_out.val[j] = static_cast<scalar_t>(-(gs + ge));
      }
      if (ds) *reinterpret_cast<Pack<scalar_t, VEC>*>(ds + o + i) = gs_out;
      if (de) *reinterpret_cast<Pack<scalar_t, VEC>*>(de + o + i) = ge_out;
      if (dt) *reinterpret_cast<Pack<scalar_t, VEC>*>(dt + o + i) = gt_out;
    }
    for (int64_t i = pv + first; i < P; i += step) {
      const acc_t tt = static_cast<acc_t>(tr[i]);
      const acc_t gs = need_s ? cs * (static_cast<acc_t>(sr[i]) - tt) : acc_t(0);
      const acc_t ge = need_e ? ce * (static_cast<acc_t>(er[i]) - tt) : acc_t(0);
      if (ds) ds[o + i] = static_cast<scalar_t>(gs);
      if (de) de[o + i] = static_cast<scalar_t>(ge);
      if (dt) dt[o + i] = static_cast<scalar_t>(-(gs + ge));
    }
  }
}

// v = scale[b] * (e - t - a G) into the contiguous [B, P] output.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) step_kernel(const scalar_t* __restrict__ e, const scalar_t* __restrict__ t,
                                                        const scalar_t* __restrict__ G, int64_t es, int64_t ts,
                                                        int64_t gs, const acc_t* __restrict__ lr,
                                                        const acc_t* __restrict__ scale, int64_t B, int64_t P,
                                                        scalar_t* __restrict__ v) {
  const int64_t pv = (P / VEC) * VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc_t a = lr[b], c = scale[b];
    const scalar_t* er = e + b * es;
    const scalar_t* tr = t + b * ts;
    const scalar_t* gr = G + b * gs;
    scalar_t* vr = v + b * P;
    for (int64_t i = first * VEC; i < pv; i += step * VEC) {
      const Pack<scalar_t, VEC> ep = *reinterpret_cast<const Pack<scalar_t, VEC>*>(er + i);
      const Pack<scalar_t, VEC> tp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(tr + i);
      const Pack<scalar_t, VEC> gp = *reinterpret_cast<const Pack<scalar_t, VEC>*>(gr + i);
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = static_cast<acc_t>(ep.val[j]) - static_cast<acc_t>(tp.val[j]) - a * static_cast<acc_t>(gp.val[j]);
        out.val[j] = static_cast<scalar_t>(c * d);
      }
      *reinterpret_cast<Pack<scalar_t, VEC>*>(vr + i) = out;
    }
    for (int64_t i = pv + first; i < P; i += step) {
      const acc_t d = static_cast<acc_t>(er[i]) - static_cast<acc_t>(tr[i]) - a * static_cast<acc_t>(gr[i]);
      vr[i] = static_cast<scalar_t>(c * d);
    }
  }
}

// ---- launch helpers -------------------------------------------------------------------------------------------------

struct ReduceGrid {
  int nblk;      // blocks per row
  int64_t span;  // columns per block (a multiple of the pack)
};

template <typename scalar_t>
ReduceGrid reduce_grid(int64_t B, int64_t P) {
  constexpr int vec = kPackOf<scalar_t>;
  // ~4 waves of 256-thread blocks: small tail effect, many loads in flight
  const int64_t target_blocks = static_cast<int64_t>(cuda::sm_count()) * 32;
  const int64_t by_size = (P + kThreads * vec * 4 - 1) / (kThreads * vec * 4);      // >= 4 packs per thread
  const int64_t by_occupancy = std::max<int64_t>(1, (target_blocks + B - 1) / B);
  int64_t nblk = std::max<int64_t>(1, std::min<int64_t>({by_size, by_occupancy, kMaxPartials}));
  int64_t span = (P + nblk - 1) / nblk;
  span = ((span + vec - 1) / vec) * vec;
  nblk = (P + span - 1) / span;
  return {static_cast<int>(nblk), span};
}

dim3 elementwise_grid(int64_t B, int64_t P, int vec) {
  const int64_t per_row = (P + static_cast<int64_t>(kThreads) * vec - 1) / (static_cast<int64_t>(kThreads) * vec);
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(cuda::sm_count()) * 32 / std::max<int64_t>(B, 1));
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(per_row, cap))),
              static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)));
}

// The row stride that matters for 16-byte packs: none when there is a single row.
inline int64_t row_stride(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : 0; }

void raise_if_zero_den(const char* op, const at::Tensor& zero_row, cudaStream_t stream) {
  if (cuda::stream_is_capturing(stream)) return;  // no host sync inside graph capture
  const int row = zero_row.item<int>();
  TORCH_CHECK_VALUE(row == INT_MAX, op, ": start and target are identical in batch row ", row,
                    " (||start - target||^2 == 0), so the normalised distance is undefined; "
                    "pass an expert segment whose start and target differ");
}

// ---- ops --------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> traj_forward_cuda(const at::Tensor& student, const at::Tensor& start,
                                                                 const at::Tensor& target) {
  const char* op = "trajectory_matching_loss";
  check_triplet(op, "student", student, "start", start, "target", target);
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = rows_unit_stride(student), e = rows_unit_stride(start), t = rows_unit_stride(target);
  const int64_t B = s.size(0), P = s.size(1);
  const auto acc = acc_type_of(s.scalar_type());
  at::Tensor loss = at::empty({B}, s.options());
  at::Tensor num = at::empty({B}, s.options().dtype(acc));
  at::Tensor den = at::empty({B}, s.options().dtype(acc));
  if (B == 0) return {loss, num, den};
  TORCH_CHECK_VALUE(P > 0, op, ": the parameter dimension P is 0; the loss would be 0/0");
  at::Tensor zero_row = at::full({1}, INT_MAX, s.options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "trajectory_matching_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = kPackOf<scalar_t>;
    const ReduceGrid rg = reduce_grid<scalar_t>(B, P);
    at::Tensor partial = at::empty({B, rg.nblk, TrajSums::N}, s.options().dtype(acc));
    const dim3 grid(rg.nblk, static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)));
    const bool packed = cuda::can_pack<scalar_t>({s.const_data_ptr(), e.const_data_ptr(), t.const_data_ptr()},
                                                 {row_stride(s), row_stride(e), row_stride(t)});
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(s.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(),
                                            t.const_data_ptr<scalar_t>(), s.stride(0), e.stride(0), t.stride(0),
                                            static_cast<const acc_t*>(nullptr), B, P, rg.span,
                                            partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(reduce3_kernel<scalar_t, acc_t, VEC, TrajSums>);
    } else {
      launch(reduce3_kernel<scalar_t, acc_t, 1, TrajSums>);
    }
    finalize_kernel<scalar_t, acc_t, TrajSums><<<static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), rg.nblk, B, nullptr, loss.mutable_data_ptr<scalar_t>(), nullptr,
        num.mutable_data_ptr<acc_t>(), den.mutable_data_ptr<acc_t>(), nullptr, zero_row.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_if_zero_den(op, zero_row, stream);
  return {loss, num, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> traj_backward_cuda(const at::Tensor& grad_loss,
                                                                  const at::Tensor& student, const at::Tensor& start,
                                                                  const at::Tensor& target, const at::Tensor& num,
                                                                  const at::Tensor& den,
                                                                  std::array<bool, 3> output_mask) {
  const char* op = "trajectory_matching_loss_backward";
  check_triplet(op, "student", student, "start", start, "target", target);
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = rows_unit_stride(student), e = rows_unit_stride(start), t = rows_unit_stride(target);
  const int64_t B = s.size(0), P = s.size(1);
  const auto acc = acc_type_of(s.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.numel() == B && num.numel() == B && den.numel() == B, op,
                    ": grad_loss, num and den must have B = ", B, " elements");
  TORCH_CHECK_VALUE(grad_loss.device() == s.device() && num.device() == s.device() && den.device() == s.device(), op,
                    ": grad_loss, num and den must be on ", s.device());
  const at::Tensor g = grad_loss.reshape({B}).to(s.scalar_type()).contiguous();
  const at::Tensor n = num.reshape({B}).to(acc).contiguous(), d = den.reshape({B}).to(acc).contiguous();
  at::Tensor ds = output_mask[0] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor de = output_mask[1] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor dt = output_mask[2] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  if (s.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) return {ds, de, dt};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "trajectory_matching_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = kPackOf<scalar_t>;
    scalar_t* dsp = output_mask[0] ? ds.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dep = output_mask[1] ? de.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dtp = output_mask[2] ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    const bool packed = cuda::can_pack<scalar_t>(
        {s.const_data_ptr(), e.const_data_ptr(), t.const_data_ptr(), dsp, dep, dtp},
        {row_stride(s), row_stride(e), row_stride(t), B > 1 ? P : 0});
    const dim3 grid = elementwise_grid(B, P, packed ? VEC : 1);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(), n.const_data_ptr<acc_t>(),
                                            d.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(),
                                            e.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), s.stride(0),
                                            e.stride(0), t.stride(0), B, P, dsp, dep, dtp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch(backward_kernel<scalar_t, acc_t, VEC>);
    } else {
      launch(backward_kernel<scalar_t, acc_t, 1>);
    }
  });
  return {ds, de, dt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tesla_cuda(const at::Tensor& start, const at::Tensor& target,
                                                          const at::Tensor& grad_sum, const at::Tensor& lr) {
  const char* op = "tesla_quantities";
  check_triplet(op, "start", start, "target", target, "grad_sum", grad_sum);
  c10::cuda::CUDAGuard guard(start.device());
  const at::Tensor e = rows_unit_stride(start), t = rows_unit_stride(target), G = rows_unit_stride(grad_sum);
  const int64_t B = e.size(0), P = e.size(1);
  const auto acc = acc_type_of(e.scalar_type());
  TORCH_CHECK_VALUE(lr.numel() == B, op, ": lr must have B = ", B, " elements, got shape ", lr.sizes());
  TORCH_CHECK_VALUE(lr.device() == e.device(), op, ": lr is on ", lr.device(), " but start is on ", e.device());
  const at::Tensor a = lr.reshape({B}).to(acc).contiguous();
  at::Tensor loss = at::empty({B}, e.options());
  at::Tensor step = at::empty(e.sizes(), e.options());
  at::Tensor grad_lr = at::empty({B}, e.options());
  if (B == 0) return {loss, step, grad_lr};
  TORCH_CHECK_VALUE(P > 0, op, ": the parameter dimension P is 0; the loss would be 0/0");
  at::Tensor zero_row = at::full({1}, INT_MAX, e.options().dtype(at::kInt));
  at::Tensor scale = at::empty({B}, e.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "tesla_quantities_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = kPackOf<scalar_t>;
    const ReduceGrid rg = reduce_grid<scalar_t>(B, P);
    at::Tensor partial = at::empty({B, rg.nblk, TeslaSums::N}, e.options().dtype(acc));
    const bool packed_in = cuda::can_pack<scalar_t>({e.const_data_ptr(), t.const_data_ptr(), G.const_data_ptr()},
                                                    {row_stride(e), row_stride(t), row_stride(G)});
    const dim3 grid(rg.nblk, static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)));
    auto launch_reduce = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(e.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                            G.const_data_ptr<scalar_t>(), e.stride(0), t.stride(0), G.stride(0),
                                            a.const_data_ptr<acc_t>(), B, P, rg.span, partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed_in) {
      launch_reduce(reduce3_kernel<scalar_t, acc_t, VEC, TeslaSums>);
    } else {
      launch_reduce(reduce3_kernel<scalar_t, acc_t, 1, TeslaSums>);
    }
    finalize_kernel<scalar_t, acc_t, TeslaSums><<<static_cast<unsigned>(std::min<int64_t>(B, kMaxGridY)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), rg.nblk, B, a.const_data_ptr<acc_t>(), loss.mutable_data_ptr<scalar_t>(),
        grad_lr.mutable_data_ptr<scalar_t>(), nullptr, nullptr, scale.mutable_data_ptr<acc_t>(),
        zero_row.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const bool packed = packed_in && cuda::can_pack<scalar_t>({step.const_data_ptr()}, {B > 1 ? P : 0});
    const dim3 egrid = elementwise_grid(B, P, packed ? VEC : 1);
    auto launch_step = [&](auto kernel) {
      kernel<<<egrid, kThreads, 0, stream>>>(e.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                             G.const_data_ptr<scalar_t>(), e.stride(0), t.stride(0), G.stride(0),
                                             a.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), B, P,
                                             step.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (packed) {
      launch_step(step_kernel<scalar_t, acc_t, VEC>);
    } else {
      launch_step(step_kernel<scalar_t, acc_t, 1>);
    }
  });
  raise_if_zero_den(op, zero_row, stream);
  return {loss, step, grad_lr};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("trajectory_matching_loss_forward", &ddfast::traj_forward_cuda);
  m.impl("trajectory_matching_loss_backward", &ddfast::traj_backward_cuda);
  m.impl("tesla_quantities", &ddfast::tesla_cuda);
}
