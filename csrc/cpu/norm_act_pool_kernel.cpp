// The ConvNet block -- instance norm (affine) + activation + 2x2 average pooling -- forward, backward and double
// backward: CPU kernels. The maths is in ddfast/ops/convnet.py and csrc/norm_act_pool_math.h; per (image, channel)
// plane of M = H * W pixels, with gr the upstream gradient spread over the pooling windows (gp / 4 per pixel):
//
//   forward:          mu, rstd of x; y = a x + b with a = gamma rstd, b = beta - a mu; out = pool(act(y))
//   backward:         g = gr act'(y), xh = (x - mu) rstd; dbeta += sum g; dgamma += sum g xh;
//                     dx = gamma rstd (g - mean(g) - xh mean(g xh))
//   double backward:  upstream (u = d/d(dx), ug = d/d(dgamma), ub = d/d(dbeta));
//                     P(v) = v - mean(v) - xh mean(v xh); w = gamma rstd P(u) + ug xh + ub; h = w gr act''(y)
//                     d/d(gp)    = pool(act'(y) w)                (the adjoint of spreading: a 2x2 mean)
//                     d/d(beta)  += sum h
//                     d/d(gamma) += sum h xh + rstd sum g P(u)
//                     G = gamma h - gamma rstd (u sum(g xh) / M + mean(u xh) g) + ug g
//                     d/d(x)     = rstd P(G) - gamma sum(g P(u)) rstd^2 xh / M
//   without normalisation (weight = bias = None): y = x, dx = g, d/d(gp) = pool(act'(x) u), d/d(x) = u gr act''(x).
//
// Work items are planes (at::parallel_for over N * C); each uses per-thread scratch rows of M values, so every loop
// is a flat elementwise loop the compiler vectorises (target_clones: AVX-512 / AVX2 / baseline copies, picked at load
// time). Per-channel sums (dgamma, dbeta) are written per plane in double and reduced over the images in a fixed
// order, so results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "norm_act_pool_math.h"
#include "ops.h"
#include "cpu/trust_math.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DDFAST_NO_CPU_CLONES)
#define DDFAST_NAP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDFAST_NAP_CLONES
#endif

namespace ddfast {
namespace {

using nap::Geom;

// ---------------------------------------------------------------------------------------------------------------
// the activation on the CPU: the same functions as nap::act_* (csrc/norm_act_pool_math.h), with softplus written
// in libm-free arithmetic so that the `omp simd` loops below vectorise (a scalar exp/log1p call per pixel costs
// more than the whole rest of the block). With z = beta y and t = exp(-|z|) in (0, 1]:
//   softplus = (max(z, 0) + log1p(t)) / beta,   sigmoid(z) = z >= 0 ? 1 / (1 + t) : t / (1 + t),
//   sigmoid' = t / (1 + t)^2,
// and log1p(t) = log(u) t / (u - 1) with u = 1 + t rounded (exact to a few ulp even when t is below the rounding
// step of 1 + t, where it returns t). Same threshold as PyTorch: z > 20 gives y, 1 and 0.

template <int ACT, typename T>
C10_ALWAYS_INLINE T cpu_act_value(T y, T beta) {
  if (ACT == nap::kReLU) return y < T(0) ? T(0) : y;  // NaN passes through, as torch.relu
  const T z = y * beta;
  const T az = z < T(0) ? -z : z;
  const T t = trust_math::exp_nonpos(-az);
  const T u = T(1) + t;
  const T l1p = u == T(1) ? t : trust_math::log_ge1(u) * (t / (u - T(1)));
  const T sp = ((z > T(0) ? z : T(0)) + l1p) / beta;
  return z > T(nap::kSoftplusThreshold) || z != z ? y : sp;  // NaN passes through, as torch's softplus
}

template <int ACT, typename T>
C10_ALWAYS_INLINE T cpu_act_d1(T y, T beta) {
  if (ACT == nap::kReLU) return y > T(0) ? T(1) : T(0);
  const T z = y * beta;
  const T az = z < T(0) ? -z : z;
  const T t = trust_math::exp_nonpos(-az);
  const T s = (z >= T(0) ? T(1) : t) / (T(1) + t);
  return z > T(nap::kSoftplusThreshold) ? T(1) : s;
}

template <int ACT, typename T>
C10_ALWAYS_INLINE T cpu_act_d2(T y, T beta) {
  if (ACT == nap::kReLU) return T(0);
  const T z = y * beta;
  const T az = z < T(0) ? -z : z;
  const T t = trust_math::exp_nonpos(-az);
  const T v = T(1) + t;
  return z < T(nap::kSoftplusThreshold) ? beta * t / (v * v) : T(0);
}

// ---------------------------------------------------------------------------------------------------------------
// the planes (templates; instantiated per dtype inside target_clones wrappers)

// gr[i]: the upstream gradient reaching input pixel i (gp / 4 of its window, 0 outside the pooled region)
template <typename T, bool POOL>
C10_ALWAYS_INLINE void spread(const T* gp, const Geom& g, T* gr) {
  if (!POOL) {
    for (int64_t i = 0; i < g.in_size(); ++i) gr[i] = gp[i];
    return;
  }
  for (int64_t i = 0; i < g.in_size(); ++i) gr[i] = T(0);
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    T* r0 = gr + 2 * oh * g.W;
    T* r1 = r0 + g.W;
    const T* src = gp + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const T v = src[ow] * T(0.25);
      r0[2 * ow] = v;
      r0[2 * ow + 1] = v;
      r1[2 * ow] = v;
      r1[2 * ow + 1] = v;
    }
  }
}

// out[j] = mean of t over the 2x2 window of output j (or t itself without pooling)
template <typename T, bool POOL>
C10_ALWAYS_INLINE void gather(const T* t, const Geom& g, T* out) {
  if (!POOL) {
    for (int64_t i = 0; i < g.in_size(); ++i) out[i] = t[i];
    return;
  }
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* r0 = t + 2 * oh * g.W;
    const T* r1 = r0 + g.W;
    T* o = out + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow)
      o[ow] = T(0.25) * ((r0[2 * ow] + r0[2 * ow + 1]) + (r1[2 * ow] + r1[2 * ow + 1]));
  }
}

template <typename T>
C10_ALWAYS_INLINE void moments(const T* x, int64_t M, T eps, T& mu, T& rstd) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < M; ++i) s += x[i];
  mu = s / T(M);
  T v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < M; ++i) {
    const T d = x[i] - mu;
    v += d * d;
  }
  rstd = T(1) / std::sqrt(v / T(M) + eps);
}

template <typename T, int ACT, bool POOL, bool NORM>
C10_ALWAYS_INLINE void forward_plane(const T* x, T* out, T gamma, T bias, T eps, T beta, const Geom& g, T* mean,
                                     T* rstd, T* scratch) {
  T a = 1, b = 0;
  if (NORM) {
    T mu, rs;
    moments(x, g.in_size(), eps, mu, rs);
    *mean = mu;
    *rstd = rs;
    a = gamma * rs;
    b = bias - a * mu;
  }
  T* r = POOL ? scratch : out;
#pragma omp simd
  for (int64_t i = 0; i < g.in_size(); ++i) r[i] = cpu_act_value<ACT>(a * x[i] + b, beta);
  if (POOL) gather<T, true>(r, g, out);
}

template <typename T, int ACT, bool POOL, bool NORM>
C10_ALWAYS_INLINE void backward_plane(const T* gp, const T* x, T gamma, T bias, T mu, T rs, T beta, const Geom& g,
                                      T* dx, double* dgamma, double* dbeta, T* gr) {
  const int64_t M = g.in_size();
  spread<T, POOL>(gp, g, gr);
  if (!NORM) {
    if (dx != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < M; ++i) dx[i] = gr[i] * cpu_act_d1<ACT>(x[i], beta);
    }
    return;
  }
  const T a = gamma * rs, b = bias - a * mu;
  T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t i = 0; i < M; ++i) {
    const T gi = gr[i] * cpu_act_d1<ACT>(a * x[i] + b, beta);
    sg += gi;
    sgx += gi * ((x[i] - mu) * rs);
  }
  if (dbeta != nullptr) *dbeta = sg;
  if (dgamma != nullptr) *dgamma = sgx;
  if (dx == nullptr) return;
  const T c1 = gamma * rs, mg = sg / T(M), mgx = sgx / T(M);
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) {
    const T gi = gr[i] * cpu_act_d1<ACT>(a * x[i] + b, beta);
    dx[i] = c1 * (gi - mg - ((x[i] - mu) * rs) * mgx);
  }
}

struct DoubleOut {  // what one plane of the double backward writes (nullptr / unused when not asked for)
  void* ggp;
  void* gx;
  double* ggamma;
  double* gbeta;
};

template <typename T, int ACT, bool POOL, bool NORM>
C10_ALWAYS_INLINE void double_backward_plane(const T* u, T ug, T ub, const T* gp, const T* x, T gamma, T bias, T mu,
                                             T rs, T beta, const Geom& g, DoubleOut o, T* gr, T* t1, T* t2) {
  const int64_t M = g.in_size();
  T* ggp = static_cast<T*>(o.ggp);
  T* gx = static_cast<T*>(o.gx);
  if (NORM || gx != nullptr) spread<T, POOL>(gp, g, gr);  // without normalisation, d/d(gp) never reads gp
  if (!NORM) {  // S = <u, gr act'(x)>
    if (ggp != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < M; ++i) t1[i] = u == nullptr ? T(0) : u[i] * cpu_act_d1<ACT>(x[i], beta);
      gather<T, POOL>(t1, g, ggp);
    }
    if (gx != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < M; ++i) gx[i] = u == nullptr ? T(0) : u[i] * gr[i] * cpu_act_d2<ACT>(x[i], beta);
    }
    return;
  }
  const T a = gamma * rs, b = bias - a * mu, Mt = T(M);
  // pass 1: the sums the projections need
  T su = 0, suxh = 0, sg = 0, sgxh = 0, sgu = 0;
#pragma omp simd reduction(+ : su, suxh, sg, sgxh, sgu)
  for (int64_t i = 0; i < M; ++i) {
    const T xh = (x[i] - mu) * rs;
    const T gi = gr[i] * cpu_act_d1<ACT>(a * x[i] + b, beta);
    const T ui = u == nullptr ? T(0) : u[i];
    su += ui;
    suxh += ui * xh;
    sg += gi;
    sgxh += gi * xh;
    sgu += gi * ui;
  }
  const T mu_u = su / Mt, mu_uxh = suxh / Mt;
  const T sgpu = sgu - mu_u * sg - mu_uxh * sgxh;  // sum g P(u)
  const T c1 = gamma * rs;
  // pass 2: w, h, G (kept in t2), act'(y) w (kept in t1, pooled into d/d(gp)) and the sums of G and h
  T sh = 0, shxh = 0, sG = 0, sGxh = 0;
#pragma omp simd reduction(+ : sh, shxh, sG, sGxh)
  for (int64_t i = 0; i < M; ++i) {
    const T xh = (x[i] - mu) * rs;
    const T y = a * x[i] + b;
    const T d1 = cpu_act_d1<ACT>(y, beta);
    const T gi = gr[i] * d1;
    const T ui = u == nullptr ? T(0) : u[i];
    const T w = c1 * (ui - mu_u - xh * mu_uxh) + ug * xh + ub;
    const T h = ACT == nap::kReLU ? T(0) : w * gr[i] * cpu_act_d2<ACT>(y, beta);
    const T G = gamma * h - c1 * (ui * sgxh / Mt + mu_uxh * gi) + ug * gi;
    t1[i] = d1 * w;
    t2[i] = G;
    sh += h;
    shxh += h * xh;
    sG += G;
    sGxh += G * xh;
  }
  if (ggp != nullptr) gather<T, POOL>(t1, g, ggp);
  if (o.gbeta != nullptr) *o.gbeta = sh;
  if (o.ggamma != nullptr) *o.ggamma = shxh + rs * sgpu;
  if (gx == nullptr) return;
  const T mG = sG / Mt, mGxh = sGxh / Mt, crs = gamma * sgpu * rs * rs / Mt;
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) {
    const T xh = (x[i] - mu) * rs;
    gx[i] = rs * (t2[i] - mG - xh * mGxh) - crs * xh;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dispatch over (activation, pooling, normalisation) and dtype, inside target_clones wrappers

struct Call {
  Geom g;
  int64_t C;
  int act;
  bool pool, norm;
};

#define DDFAST_NAP_SWITCH(call, FN, ...)                                                                 \
  do {                                                                                                   \
    const bool p_ = (call).pool, n_ = (call).norm;                                                       \
    if ((call).act == nap::kReLU) {                                                                      \
      if (p_ && n_) FN<T, nap::kReLU, true, true>(__VA_ARGS__);                                          \
      else if (p_) FN<T, nap::kReLU, true, false>(__VA_ARGS__);                                          \
      else if (n_) FN<T, nap::kReLU, false, true>(__VA_ARGS__);                                          \
      else FN<T, nap::kReLU, false, false>(__VA_ARGS__);                                                 \
    } else {                                                                                             \
      if (p_ && n_) FN<T, nap::kSoftplus, true, true>(__VA_ARGS__);                                      \
      else if (p_) FN<T, nap::kSoftplus, true, false>(__VA_ARGS__);                                      \
      else if (n_) FN<T, nap::kSoftplus, false, true>(__VA_ARGS__);                                     \
      else FN<T, nap::kSoftplus, false, false>(__VA_ARGS__);                                             \
    }                                                                                                    \
  } while (0)

template <typename T>
C10_ALWAYS_INLINE void forward_planes(const Call& c, int64_t p0, int64_t p1, const T* x, T* out, const T* w,
                                      const T* bi, T eps, T beta, T* mean, T* rstd, T* scratch) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t ch = p % c.C;
    DDFAST_NAP_SWITCH(c, forward_plane, x + p * c.g.in_size(), out + p * c.g.out_size(), c.norm ? w[ch] : T(1),
                      c.norm ? bi[ch] : T(0), eps, beta, c.g, c.norm ? mean + p : nullptr,
                      c.norm ? rstd + p : nullptr, scratch);
  }
}

template <typename T>
C10_ALWAYS_INLINE void backward_planes(const Call& c, int64_t p0, int64_t p1, const T* gp, const T* x, const T* w,
                                       const T* bi, const T* mean, const T* rstd, T beta, T* dx, double* dg, double* db,
                                       T* gr) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t ch = p % c.C;
    DDFAST_NAP_SWITCH(c, backward_plane, gp + p * c.g.out_size(), x + p * c.g.in_size(), c.norm ? w[ch] : T(1),
                      c.norm ? bi[ch] : T(0), c.norm ? mean[p] : T(0), c.norm ? rstd[p] : T(1), beta, c.g,
                      dx == nullptr ? nullptr : dx + p * c.g.in_size(), dg == nullptr ? nullptr : dg + p,
                      db == nullptr ? nullptr : db + p, gr);
  }
}

template <typename T>
C10_ALWAYS_INLINE void double_backward_planes(const Call& c, int64_t p0, int64_t p1, const T* u, const T* ug,
                                              const T* ub, const T* gp, const T* x, const T* w, const T* bi,
                                              const T* mean, const T* rstd, T beta, T* ggp, T* gx, double* ggm,
                                              double* gbt, T* gr, T* t1, T* t2) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t ch = p % c.C;
    DoubleOut o{ggp == nullptr ? nullptr : ggp + p * c.g.out_size(), gx == nullptr ? nullptr : gx + p * c.g.in_size(),
                ggm == nullptr ? nullptr : ggm + p, gbt == nullptr ? nullptr : gbt + p};
    DDFAST_NAP_SWITCH(c, double_backward_plane, u == nullptr ? nullptr : u + p * c.g.in_size(),
                      ug == nullptr ? T(0) : ug[ch], ub == nullptr ? T(0) : ub[ch], gp + p * c.g.out_size(),
                      x + p * c.g.in_size(), c.norm ? w[ch] : T(1), c.norm ? bi[ch] : T(0),
                      c.norm ? mean[p] : T(0), c.norm ? rstd[p] : T(1), beta, c.g, o, gr, t1, t2);
  }
}

#define DDFAST_NAP_CLONE(NAME, T, PARAMS, ARGS) \
  DDFAST_NAP_CLONES void NAME##_##T PARAMS { NAME<T> ARGS; }

#define FWD_PARAMS(T) \
  (const Call& c, int64_t p0, int64_t p1, const T* x, T* out, const T* w, const T* bi, T eps, T beta, T* mean, \
   T* rstd, T* scratch)
#define FWD_ARGS (c, p0, p1, x, out, w, bi, eps, beta, mean, rstd, scratch)
DDFAST_NAP_CLONE(forward_planes, float, FWD_PARAMS(float), FWD_ARGS)
DDFAST_NAP_CLONE(forward_planes, double, FWD_PARAMS(double), FWD_ARGS)

#define BWD_PARAMS(T)                                                                                       \
  (const Call& c, int64_t p0, int64_t p1, const T* gp, const T* x, const T* w, const T* bi, const T* mean, \
   const T* rstd, T beta, T* dx, double* dg, double* db, T* gr)
#define BWD_ARGS (c, p0, p1, gp, x, w, bi, mean, rstd, beta, dx, dg, db, gr)
DDFAST_NAP_CLONE(backward_planes, float, BWD_PARAMS(float), BWD_ARGS)
DDFAST_NAP_CLONE(backward_planes, double, BWD_PARAMS(double), BWD_ARGS)

#define DBL_PARAMS(T)                                                                                            \
  (const Call& c, int64_t p0, int64_t p1, const T* u, const T* ug, const T* ub, const T* gp, const T* x,        \
   const T* w, const T* bi, const T* mean, const T* rstd, T beta, T* ggp, T* gx, double* ggm, double* gbt, T* gr, \
   T* t1, T* t2)
#define DBL_ARGS (c, p0, p1, u, ug, ub, gp, x, w, bi, mean, rstd, beta, ggp, gx, ggm, gbt, gr, t1, t2)
DDFAST_NAP_CLONE(double_backward_planes, float, DBL_PARAMS(float), DBL_ARGS)
DDFAST_NAP_CLONE(double_backward_planes, double, DBL_PARAMS(double), DBL_ARGS)

inline void run_forward(const Call& c, int64_t a, int64_t b, const float* x, float* out, const float* w,
                        const float* bi, float eps, float beta, float* mean, float* rstd, float* s) {
  forward_planes_float(c, a, b, x, out, w, bi, eps, beta, mean, rstd, s);
}
inline void run_forward(const Call& c, int64_t a, int64_t b, const double* x, double* out, const double* w,
                        const double* bi, double eps, double beta, double* mean, double* rstd, double* s) {
  forward_planes_double(c, a, b, x, out, w, bi, eps, beta, mean, rstd, s);
}
inline void run_backward(const Call& c, int64_t a, int64_t b, const float* gp, const float* x, const float* w,
                         const float* bi, const float* mean, const float* rstd, float beta, float* dx, double* dg,
                         double* db, float* gr) {
  backward_planes_float(c, a, b, gp, x, w, bi, mean, rstd, beta, dx, dg, db, gr);
}
inline void run_backward(const Call& c, int64_t a, int64_t b, const double* gp, const double* x, const double* w,
                         const double* bi, const double* mean, const double* rstd, double beta, double* dx,
                         double* dg, double* db, double* gr) {
  backward_planes_double(c, a, b, gp, x, w, bi, mean, rstd, beta, dx, dg, db, gr);
}
template <typename T>
inline void run_double_backward(const Call& c, int64_t a, int64_t b, const T* u, const T* ug, const T* ub,
                                const T* gp, const T* x, const T* w, const T* bi, const T* mean, const T* rstd, T beta,
                                T* ggp, T* gx, double* ggm, double* gbt, T* gr, T* t1, T* t2) {
  if constexpr (std::is_same_v<T, float>) {
    double_backward_planes_float(c, a, b, u, ug, ub, gp, x, w, bi, mean, rstd, beta, ggp, gx, ggm, gbt, gr, t1, t2);
  } else {
    double_backward_planes_double(c, a, b, u, ug, ub, gp, x, w, bi, mean, rstd, beta, ggp, gx, ggm, gbt, gr, t1, t2);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// op entry points

int64_t grain_for(const Geom& g) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.in_size())); }

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nap_forward_cpu(const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
                                                               const c10::optional<at::Tensor>& bias, int64_t act,
                                                               double beta, bool pool, double eps) {
  const nap_check::Sizes s = nap_check::forward_args(x_, weight, bias, act, beta, pool, eps);
  const at::Tensor x = x_.contiguous();
  at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.C, s.g.Ho, s.g.Wo}, x.options());
  at::Tensor mean = at::empty({s.norm ? s.N : 0, s.norm ? s.C : 0}, x.options());
  at::Tensor rstd = at::empty_like(mean);
  if (s.N * s.C == 0) return {out, mean, rstd};
  const Call c{s.g, s.C, static_cast<int>(act), pool, s.norm};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t* wp = s.norm ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = s.norm ? bi.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = s.norm ? mean.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* rp = s.norm ? rstd.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, s.N * s.C, grain_for(s.g), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> scratch(pool ? s.g.in_size() : 1);
      run_forward(c, p0, p1, xp, op, wp, bp, static_cast<scalar_t>(eps), static_cast<scalar_t>(beta), mp, rp,
                  scratch.data());
    });
  });
  return {out, mean, rstd};
}

// per-channel sum over the images of per-plane partials [N, C] (double), in a fixed order, cast to x's dtype
at::Tensor channel_sums(const std::vector<double>& part, int64_t N, int64_t C, const at::TensorOptions& opt) {
  at::Tensor acc = at::zeros({C}, opt.dtype(at::kDouble));
  double* a = acc.mutable_data_ptr<double>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) a[c] += part[n * C + c];
  return acc.to(opt.dtype());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nap_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& mean_, const at::Tensor& rstd_,
                                                                int64_t act, double beta, bool pool,
                                                                std::array<bool, 3> mask) {
  const nap_check::Sizes s = nap_check::backward_args(grad_out, x_, weight, bias, mean_, rstd_, act, beta, pool);
  const at::Tensor x = x_.contiguous(), gp = grad_out.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  at::Tensor dx = mask[0] ? at::empty_like(x) : unused_grad(x);
  at::Tensor dgamma = unused_grad(x), dbeta = unused_grad(x);
  const int64_t P = s.N * s.C;
  if (P == 0) {
    if (mask[1] && s.norm) dgamma = at::zeros({s.C}, x.options());
    if (mask[2] && s.norm) dbeta = at::zeros({s.C}, x.options());
    return {dx, dgamma, dbeta};
  }
  const Call c{s.g, s.C, static_cast<int>(act), pool, s.norm};
  const bool want_g = s.norm && mask[1], want_b = s.norm && mask[2];
  std::vector<double> pg(want_g ? P : 0), pb(want_b ? P : 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_backward", [&] {
    const scalar_t* wp = s.norm ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = s.norm ? bi.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = s.norm ? mean.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = s.norm ? rstd.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, P, grain_for(s.g), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> gr(s.g.in_size());
      run_backward(c, p0, p1, gp.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wp, bp, mp, rp,
                   static_cast<scalar_t>(beta), dxp, want_g ? pg.data() : nullptr, want_b ? pb.data() : nullptr,
                   gr.data());
    });
  });
  if (want_g) dgamma = channel_sums(pg, s.N, s.C, x.options());
  if (want_b) dbeta = channel_sums(pb, s.N, s.C, x.options());
  return {dx, dgamma, dbeta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nap_double_backward_cpu(
    const c10::optional<at::Tensor>& ggx_, const c10::optional<at::Tensor>& ggw_, const c10::optional<at::Tensor>& ggb_,
    const at::Tensor& grad_out, const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_, const at::Tensor& rstd_, int64_t act, double beta,
    bool pool, std::array<bool, 4> mask) {
  const nap_check::Sizes s = nap_check::backward_args(grad_out, x_, weight, bias, mean_, rstd_, act, beta, pool);
  nap_check::double_backward_args(ggx_, ggw_, ggb_, x_, s);
  const at::Tensor x = x_.contiguous(), gp = grad_out.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor w = s.norm ? weight->contiguous() : at::Tensor(), bi = s.norm ? bias->contiguous() : at::Tensor();
  const at::Tensor u = (ggx_.has_value() && ggx_->defined()) ? ggx_->contiguous() : at::Tensor();
  const at::Tensor ug = (ggw_.has_value() && ggw_->defined()) ? ggw_->contiguous() : at::Tensor();
  const at::Tensor ub = (ggb_.has_value() && ggb_->defined()) ? ggb_->contiguous() : at::Tensor();
  at::Tensor ggp = mask[0] ? at::empty_like(gp) : unused_grad(x);
  at::Tensor gx = mask[1] ? at::empty_like(x) : unused_grad(x);
  at::Tensor ggamma = unused_grad(x), gbeta = unused_grad(x);
  const int64_t P = s.N * s.C;
  const bool want_g = s.norm && mask[2], want_b = s.norm && mask[3];
  if (P == 0) {
    if (want_g) ggamma = at::zeros({s.C}, x.options());
    if (want_b) gbeta = at::zeros({s.C}, x.options());
    return {ggp, gx, ggamma, gbeta};
  }
  const Call c{s.g, s.C, static_cast<int>(act), pool, s.norm};
  std::vector<double> pg(want_g ? P : 0), pb(want_b ? P : 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_pool_double_backward", [&] {
    const scalar_t* wp = s.norm ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = s.norm ? bi.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = s.norm ? mean.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = s.norm ? rstd.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* up = u.defined() ? u.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ugp = ug.defined() ? ug.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ubp = ub.defined() ? ub.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ggpp = mask[0] ? ggp.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = mask[1] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, P, grain_for(s.g), [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> gr(s.g.in_size()), t1(s.g.in_size()), t2(s.g.in_size());
      run_double_backward<scalar_t>(c, p0, p1, up, ugp, ubp, gp.const_data_ptr<scalar_t>(),
                                    x.const_data_ptr<scalar_t>(), wp, bp, mp, rp, static_cast<scalar_t>(beta), ggpp,
                                    gxp, want_g ? pg.data() : nullptr, want_b ? pb.data() : nullptr, gr.data(),
                                    t1.data(), t2.data());
    });
  });
  if (want_g) ggamma = channel_sums(pg, s.N, s.C, x.options());
  if (want_b) gbeta = channel_sums(pb, s.N, s.C, x.options());
  return {ggp, gx, ggamma, gbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("norm_act_pool_forward", &nap_forward_cpu);
  m.impl("norm_act_pool_backward", &nap_backward_cpu);
  m.impl("norm_act_pool_double_backward", &nap_double_backward_cpu);
}

}  // namespace ddfast
