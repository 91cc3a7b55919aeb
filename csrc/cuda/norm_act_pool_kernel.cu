// The ConvNet block -- instance norm (affine) + activation + 2x2 average pooling -- forward, backward and double
// backward: CUDA kernels, mirroring csrc/cpu/norm_act_pool_kernel.cpp (the maths is written out there and in
// ddfast/ops/convnet.py). One thread block per (image, channel) plane; its threads stride over the plane's pixels,
// block-wide sums (csrc/cuda/utils.cuh) give the plane's statistics, and every thread recomputes what it needs
// per pixel instead of keeping scratch rows. Per-channel sums (d weight, d bias) are written per plane and summed
// over the images by at::sum (a fixed reduction order). Accumulation in float32 (float64 for float64 inputs).
// Everything runs on the current stream; every launch is checked.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "norm_act_pool_math.h"
#include "ops.h"
#include "utils.cuh"

namespace ddfast {
namespace {

using nap::Geom;

inline int threads_for(const Geom& g) {
  const int64_t m = g.in_size();
  int t = 32;
  while (t < 256 && t < m) t *= 2;
  return t;
}

// the block-wide sums of N values, returned to every thread
template <typename A, int N>
__device__ __forceinline__ void all_sum(A (&v)[N], A* shm) {
  cuda::block_sum<A, N>(v, shm);
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shm[k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = shm[k];
  __syncthreads();
}

template <bool POOL, typename T, typename A>
__device__ __forceinline__ A spread_at(const T* gp, const Geom& g, int64_t i) {
  const int64_t j = nap::out_index<POOL>(g, i);
  return j < 0 ? A(0) : static_cast<A>(gp[j]) * nap::pool_weight<POOL, A>();
}

// the plane's mean and rstd (two passes over x), for every thread
template <typename T, typename A>
__device__ __forceinline__ void plane_moments(const T* x, int64_t M, A eps, A* shm, A& mu, A& rs) {
  A s[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) s[0] += static_cast<A>(x[i]);
  all_sum<A, 1>(s, shm);
  mu = s[0] / A(M);
  A v[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A d = static_cast<A>(x[i]) - mu;
    v[0] += d * d;
  }
  all_sum<A, 1>(v, shm);
  rs = A(1) / ::sqrt(v[0] / A(M) + eps);
}

// ---------------------------------------------------------------------------------------------------------------
template <typename T, int ACT, bool POOL, bool NORM>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bi,
                               T* __restrict__ out, T* __restrict__ mean, T* __restrict__ rstd, Geom g, int64_t C,
                               at::opmath_type<T> eps, at::opmath_type<T> beta) {
  using A = at::opmath_type<T>;
  __shared__ A shm[cuda::kWarpSize];
  const int64_t p = blockIdx.x, M = g.in_size();
  const T* xp = x + p * M;
  A a = 1, b = 0;
  if (NORM) {
    A mu, rs;
    plane_moments(xp, M, eps, shm, mu, rs);
    if (threadIdx.x == 0) {
      mean[p] = static_cast<T>(mu);
      rstd[p] = static_cast<T>(rs);
    }
    // y from the stored (rounded) statistics, exactly as the backward recomputes it
    const A mu_t = static_cast<A>(static_cast<T>(mu)), rs_t = static_cast<A>(static_cast<T>(rs));
    const int64_t ch = p % C;
    a = static_cast<A>(w[ch]) * rs_t;
    b = static_cast<A>(bi[ch]) - a * mu_t;
  }
  T* op = out + p * g.out_size();
  for (int64_t j = threadIdx.x; j < g.out_size(); j += blockDim.x) {
    if (POOL) {
      const int64_t oh = j / g.Wo, ow = j - oh * g.Wo;
      const T* r0 = xp + 2 * oh * g.W + 2 * ow;
      const T* r1 = r0 + g.W;
      const A s = (nap::act_value<ACT>(a * A(r0[0]) + b, beta) + nap::act_value<ACT>(a * A(r0[1]) + b, beta)) +
                  (nap::act_value<ACT>(a * A(r1[0]) + b, beta) + nap::act_value<ACT>(a * A(r1[1]) + b, beta));
      op[j] = static_cast<T>(A(0.25) * s);
    } else {
      op[j] = static_cast<T>(nap::act_value<ACT>(a * A(xp[j]) + b, beta));
    }
  }
}

template <typename T, int ACT, bool POOL, bool NORM>
__global__ void backward_kernel(const T* __restrict__ gp, const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ bi, const T* __restrict__ mean, const T* __restrict__ rstd,
                                Geom g, int64_t C, at::opmath_type<T> beta, T* __restrict__ dx,
                                at::opmath_type<T>* __restrict__ pg, at::opmath_type<T>* __restrict__ pb) {
  using A = at::opmath_type<T>;
  __shared__ A shm[2 * cuda::kWarpSize];
  const int64_t p = blockIdx.x, M = g.in_size();
  const T* xp = x + p * M;
  const T* gpp = gp + p * g.out_size();
  T* dxp = dx == nullptr ? nullptr : dx + p * M;
  if (!NORM) {
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x)
      dxp[i] = static_cast<T>(spread_at<POOL, T, A>(gpp, g, i) * nap::act_d1<ACT>(A(xp[i]), beta));
    return;
  }
  const int64_t ch = p % C;
  const A gamma = w[ch], mu = mean[p], rs = rstd[p];
  const A a = gamma * rs, b = A(bi[ch]) - a * mu;
  A s[2] = {A(0), A(0)};
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A xi = xp[i];
    const A gi = spread_at<POOL, T, A>(gpp, g, i) * nap::act_d1<ACT>(a * xi + b, beta);
    s[0] += gi;
    s[1] += gi * ((xi - mu) * rs);
  }
  all_sum<A, 2>(s, shm);
  if (threadIdx.x == 0) {
    if (pb != nullptr) pb[p] = s[0];
    if (pg != nullptr) pg[p] = s[1];
  }
  if (dxp == nullptr) return;
  const A mg = s[0] / A(M), mgx = s[1] / A(M);
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A xi = xp[i];
    const A gi = spread_at<POOL, T, A>(gpp, g, i) * nap::act_d1<ACT>(a * xi + b, beta);
    dxp[i] = static_cast<T>(a * (gi - mg - ((xi - mu) * rs) * mgx));
  }
}

struct DoublePtrs {
  void* ggp;
  void* gx;
  void* pg;
  void* pb;
};

template <typename T, int ACT, bool POOL, bool NORM>
__global__ void double_backward_kernel(const T* __restrict__ u, const T* __restrict__ ug, const T* __restrict__ ub,
                                       const T* __restrict__ gp, const T* __restrict__ x, const T* __restrict__ w,
                                       const T* __restrict__ bi, const T* __restrict__ mean,
                                       const T* __restrict__ rstd, Geom g, int64_t C, at::opmath_type<T> beta,
                                       DoublePtrs o) {
  using A = at::opmath_type<T>;
  __shared__ A shm[5 * cuda::kWarpSize];
  const int64_t p = blockIdx.x, M = g.in_size(), Mo = g.out_size(), ch = p % C;
  const T* xp = x + p * M;
  const T* gpp = gp + p * Mo;
  const T* up = u == nullptr ? nullptr : u + p * M;
  T* ggp = o.ggp == nullptr ? nullptr : static_cast<T*>(o.ggp) + p * Mo;
  T* gx = o.gx == nullptr ? nullptr : static_cast<T*>(o.gx) + p * M;
  if (!NORM) {  // S = <u, gr act'(x)>
    if (ggp != nullptr) {
      for (int64_t j = threadIdx.x; j < Mo; j += blockDim.x) {
        A s = 0;
        if (up != nullptr) {
          if (POOL) {
            const int64_t oh = j / g.Wo, ow = j - oh * g.Wo, i0 = 2 * oh * g.W + 2 * ow;
            for (int k = 0; k < 4; ++k) {
              const int64_t i = i0 + (k & 1) + (k >> 1) * g.W;
              s += A(up[i]) * nap::act_d1<ACT>(A(xp[i]), beta);
            }
            s *= A(0.25);
          } else {
            s = A(up[j]) * nap::act_d1<ACT>(A(xp[j]), beta);
          }
        }
        ggp[j] = static_cast<T>(s);
      }
    }
    if (gx != nullptr) {
      for (int64_t i = threadIdx.x; i < M; i += blockDim.x)
        gx[i] = up == nullptr ? T(0)
                              : static_cast<T>(A(up[i]) * spread_at<POOL, T, A>(gpp, g, i) *
                                               nap::act_d2<ACT>(A(xp[i]), beta));
    }
    return;
  }
  const A gamma = w[ch], mu = mean[p], rs = rstd[p];
  const A a = gamma * rs, b = A(bi[ch]) - a * mu, Mt = A(M);
  const A ugc = ug == nullptr ? A(0) : A(ug[ch]), ubc = ub == nullptr ? A(0) : A(ub[ch]);
  // pass 1: the sums the projections need
  A s1[5] = {A(0), A(0), A(0), A(0), A(0)};  // su, suxh, sg, sgxh, sgu
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A xi = xp[i], xh = (xi - mu) * rs;
    const A gi = spread_at<POOL, T, A>(gpp, g, i) * nap::act_d1<ACT>(a * xi + b, beta);
    const A ui = up == nullptr ? A(0) : A(up[i]);
    s1[0] += ui;
    s1[1] += ui * xh;
    s1[2] += gi;
    s1[3] += gi * xh;
    s1[4] += gi * ui;
  }
  all_sum<A, 5>(s1, shm);
  const A mu_u = s1[0] / Mt, mu_uxh = s1[1] / Mt, sgxh = s1[3];
  const A sgpu = s1[4] - mu_u * s1[2] - mu_uxh * s1[3];  // sum g P(u)
  // pass 2: G (kept in gx), the sums of h and G
  A s2[4] = {A(0), A(0), A(0), A(0)};  // sh, shxh, sG, sGxh
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A xi = xp[i], xh = (xi - mu) * rs, y = a * xi + b;
    const A gri = spread_at<POOL, T, A>(gpp, g, i);
    const A gi = gri * nap::act_d1<ACT>(y, beta);
    const A ui = up == nullptr ? A(0) : A(up[i]);
    const A wv = a * (ui - mu_u - xh * mu_uxh) + ugc * xh + ubc;
    const A h = ACT == nap::kReLU ? A(0) : wv * gri * nap::act_d2<ACT>(y, beta);
    const A G = gamma * h - a * (ui * sgxh / Mt + mu_uxh * gi) + ugc * gi;
    if (gx != nullptr) gx[i] = static_cast<T>(G);
    s2[0] += h;
    s2[1] += h * xh;
    s2[2] += G;
    s2[3] += G * xh;
  }
  all_sum<A, 4>(s2, shm);
  if (threadIdx.x == 0) {
    if (o.pb != nullptr) static_cast<A*>(o.pb)[p] = s2[0];
    if (o.pg != nullptr) static_cast<A*>(o.pg)[p] = s2[1] + rs * sgpu;
  }
  if (ggp != nullptr) {  // d/d(gp) = pool(act'(y) w)
    for (int64_t j = threadIdx.x; j < Mo; j += blockDim.x) {
      const int64_t oh = POOL ? j / g.Wo : 0, ow = POOL ? j - oh * g.Wo : 0;
      const int64_t i0 = POOL ? 2 * oh * g.W + 2 * ow : j;
      A s = 0;
      const int n = POOL ? 4 : 1;
      for (int k = 0; k < n; ++k) {
        const int64_t i = i0 + (k & 1) + (k >> 1) * g.W;
        const A xi = xp[i], xh = (xi - mu) * rs;
        const A ui = up == nullptr ? A(0) : A(up[i]);
        s += nap::act_d1<ACT>(a * xi + b, beta) * (a * (ui - mu_u - xh * mu_uxh) + ugc * xh + ubc);
      }
      ggp[j] = static_cast<T>(s * nap::pool_weight<POOL, A>());
    }
  }
  if (gx == nullptr) return;
  // pass 3: d/d(x) = rstd P(G) - gamma sum(g P(u)) rstd^2 xh / M (each thread rereads the G it wrote)
  const A mG = s2[2] / Mt, mGxh = s2[3] / Mt, crs = gamma * sgpu * rs * rs / Mt;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const A xh = (A(xp[i]) - mu) * rs;
    gx[i] = static_cast<T>(rs * (A(gx[i]) - mG - xh * mGxh) - crs * xh);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// launches

#define DDFAST_NAP_LAUNCH(KERNEL, act, pool, norm, grid, block, stream, ...)                                      \
  do {                                                                                                            \
    if (act == nap::kReLU) {                                                                                      \
      if (pool && norm) KERNEL<scalar_t, nap::kReLU, true, true><<<grid, block, 0, stream>>>(__VA_ARGS__);        \
      else if (pool) KERNEL<scalar_t, nap::kReLU, true, false><<<grid, block, 0, stream>>>(__VA_ARGS__);          \
      else if (norm) KERNEL<scalar_t, nap::kReLU, false, true><<<grid, block, 0, stream>>>(__VA_ARGS__);          \
      else KERNEL<scalar_t, nap::kReLU, false, false><<<grid, block, 0, stream>>>(__VA_ARGS__);                   \
    } else {                                                                                                      \
      if (pool && norm) KERNEL<scalar_t, nap::kSoftplus, true, true><<<grid, block, 0, stream>>>(__VA_ARGS__);    \
      else if (pool) KERNEL<scalar_t, nap::kSoftplus, true, false><<<grid, block, 0, stream>>>(__VA_ARGS__);      \
      else if (norm) KERNEL<scalar_t, nap::kSoftplus, false, true><<<grid, block, 0, stream>>>(__VA_ARGS__);      \
      else KERNEL<scalar_t, nap::kSoftplus, false, false><<<grid, block, 0, stream>>>(__VA_ARGS__);               \
    }                                                                                                             \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                               \
  } while (0)

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nap_forward_cuda(const at::Tensor& x_,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias, int64_t act,
                                                                double beta, bool pool, double eps) {
  const nap_check::Sizes s = nap_check::forward_args(x_, weight, bias, act, beta, pool, eps);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.C, s.g.Ho, s.g.Wo}, x.options());
  at::Tensor mean = at::empty({s.norm ? s.N : 0, s.norm ? s.C : 0}, x.options());
  at::Tensor rstd = at::empty_like(mean);
  const int64_t P = s.N * s.C;
  if (P == 0) return {out, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    DDFAST_NAP_LAUNCH(forward_kernel, act, pool, s.norm, P, threads_for(s.g), stream, x.const_data_ptr<scalar_t>(),
                      opt_ptr<scalar_t>(w), opt_ptr<scalar_t>(bi), out.mutable_data_ptr<scalar_t>(),
                      s.norm ? mean.mutable_data_ptr<scalar_t>() : nullptr,
                      s.norm ? rstd.mutable_data_ptr<scalar_t>() : nullptr, s.g, s.C, static_cast<A>(eps),
                      static_cast<A>(beta));
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nap_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                 const c10::optional<at::Tensor>& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& mean_, const at::Tensor& rstd_,
                                                                 int64_t act, double beta, bool pool,
                                                                 std::array<bool, 3> mask) {
  const nap_check::Sizes s = nap_check::backward_args(grad_out, x_, weight, bias, mean_, rstd_, act, beta, pool);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), gp = grad_out.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  const int64_t P = s.N * s.C;
  const bool want_g = s.norm && mask[1], want_b = s.norm && mask[2];
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor dx = mask[0] ? at::empty_like(x) : unused_grad(x);
  at::Tensor pg = want_g ? at::empty({s.N, s.C}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor pb = want_b ? at::empty({s.N, s.C}, x.options().dtype(acc)) : at::Tensor();
  if (P > 0 && (mask[0] || want_g || want_b)) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      DDFAST_NAP_LAUNCH(backward_kernel, act, pool, s.norm, P, threads_for(s.g), stream,
                        gp.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(w),
                        opt_ptr<scalar_t>(bi), opt_ptr<scalar_t>(mean), opt_ptr<scalar_t>(rstd), s.g, s.C,
                        static_cast<A>(beta), mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                        want_g ? pg.mutable_data_ptr<A>() : nullptr, want_b ? pb.mutable_data_ptr<A>() : nullptr);
    });
  }
  at::Tensor dgamma = want_g ? pg.sum(0).to(x.scalar_type()) : unused_grad(x);
  at::Tensor dbeta = want_b ? pb.sum(0).to(x.scalar_type()) : unused_grad(x);
  return {dx, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nap_double_backward_cuda(
    const c10::optional<at::Tensor>& ggx_, const c10::optional<at::Tensor>& ggw_, const c10::optional<at::Tensor>& ggb_,
    const at::Tensor& grad_out, const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_, const at::Tensor& rstd_, int64_t act, double beta,
    bool pool, std::array<bool, 4> mask) {
  const nap_check::Sizes s = nap_check::backward_args(grad_out, x_, weight, bias, mean_, rstd_, act, beta, pool);
  nap_check::double_backward_args(ggx_, ggw_, ggb_, x_, s);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), gp = grad_out.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  const at::Tensor u = nap_check::given(ggx_) ? ggx_->contiguous() : at::Tensor();
  const at::Tensor ug = nap_check::given(ggw_) ? ggw_->contiguous() : at::Tensor();
  const at::Tensor ub = nap_check::given(ggb_) ? ggb_->contiguous() : at::Tensor();
  const int64_t P = s.N * s.C;
  const bool want_g = s.norm && mask[2], want_b = s.norm && mask[3];
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor ggp = mask[0] ? at::empty_like(gp) : unused_grad(x);
  at::Tensor gx = mask[1] ? at::empty_like(x) : unused_grad(x);
  at::Tensor pg = want_g ? at::empty({s.N, s.C}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor pb = want_b ? at::empty({s.N, s.C}, x.options().dtype(acc)) : at::Tensor();
  if (P > 0 && (mask[0] || mask[1] || want_g || want_b)) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_double_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      DoublePtrs o{mask[0] ? ggp.mutable_data_ptr<scalar_t>() : nullptr,
                   mask[1] ? gx.mutable_data_ptr<scalar_t>() : nullptr, want_g ? pg.mutable_data_ptr<A>() : nullptr,
                   want_b ? pb.mutable_data_ptr<A>() : nullptr};
      DDFAST_NAP_LAUNCH(double_backward_kernel, act, pool, s.norm, P, threads_for(s.g), stream, opt_ptr<scalar_t>(u),
                        opt_ptr<scalar_t>(ug), opt_ptr<scalar_t>(ub), gp.const_data_ptr<scalar_t>(),
                        x.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(w), opt_ptr<scalar_t>(bi),
                        opt_ptr<scalar_t>(mean), opt_ptr<scalar_t>(rstd), s.g, s.C, static_cast<A>(beta), o);
    });
  }
  at::Tensor ggamma = want_g ? pg.sum(0).to(x.scalar_type()) : unused_grad(x);
  at::Tensor gbeta = want_b ? pb.sum(0).to(x.scalar_type()) : unused_grad(x);
  return {ggp, gx, ggamma, gbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("norm_act_pool_forward", &nap_forward_cuda);
  m.impl("norm_act_pool_backward", &nap_backward_cuda);
  m.impl("norm_act_pool_double_backward", &nap_double_backward_cuda);
}

}  // namespace ddfast
