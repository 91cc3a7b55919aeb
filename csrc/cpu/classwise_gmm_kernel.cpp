// classwise_gmm (TAD / DivideMix-style per-class loss GMM): CPU kernel.
//
// Setup: one stable counting sort groups the values by class (xs: values in class order, in the accumulation
// dtype; idx: their original positions); each class's segment is cut into work items of at most kChunk values.
// EM iteration (all still-active classes at once, one at::parallel_for over the items):
//   E-step + sufficient statistics in one pass over an item, with the class's current parameters:
//     l_k = log w_k - log(2 pi var_k)/2 - (x - mu_k)^2 / (2 var_k),  t = exp(-|l_0 - l_1|),
//     r_max = 1 / (1 + t), r_min = t / (1 + t)  (responsibilities without cancellation),
//     S_k = sum r_k, M_k = sum r_k (x - mu_k), Q_k = sum r_k (x - mu_k)^2  (shifted by the current mean, so the
//     variance below does not cancel), LL = sum (max_k l_k + log(1 + t)) (log taken once per 64 values on the
//     product of the (1 + t)).
//   Item partials are combined per class in item order, in double (deterministic for any thread count), and the
//   M-step is scikit-learn's: n_k = S_k + 10 eps, mean = (M_k + mu_k S_k) / n_k,
//   var = (Q_k - 2 d M_k + d^2 S_k) / n_k + reg_covar with d = mean - mu_k, w_k = n_k / (n_0 + n_1).
//   A class stops after the iteration whose mean log-likelihood changed by less than tol (scikit-learn's rule).
// Finally the components are ordered by mean (ties, means within kTieSd standard deviations, keep their order)
// and one more pass writes each sample's posterior of component 0.
// Per-sample math is in the accumulation dtype (float32, float64 for float64 values); class parameters and
// sums in double. The inner loops are `omp simd` reductions in AVX-512 / AVX2 / baseline clones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/trust_math.h"
#include "ops.h"

namespace ddfast {
namespace {

using namespace trust_math;

constexpr int64_t kChunk = 4096;  // values per work item
constexpr int64_t kBlock = 64;    // values per log-likelihood product (each factor is in (1, 2])
constexpr double kLog2Pi = 1.8378770664093454836;
// Means closer than kTieSd standard deviations are a tie (the components are indistinguishable; rounding, not
// the data, would pick an order): tied components keep their EM order, on every backend.
constexpr double kTieSd = 1e-3;

template <typename T>
struct CompParams {  // one class's two components, in the form the E-step uses
  T mu0, mu1, a0, a1, h0, h1;  // a_k = log w_k - log(2 pi var_k)/2, h_k = 1 / (2 var_k)
};

// Sufficient statistics of x[0, n) -> out[7] = {S0, S1, M0, M1, Q0, Q1, LL}.
template <typename T>
DDFAST_AI void stats_impl(const T* x, int64_t n, CompParams<T> p, double* out) {
  double acc[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    T s0 = 0, s1 = 0, m0 = 0, m1 = 0, q0 = 0, q1 = 0, lm = 0, prod = 1;
#pragma omp simd reduction(+ : s0, s1, m0, m1, q0, q1, lm) reduction(* : prod)
    for (int64_t j = b; j < e; ++j) {
      const T xi = x[j];
      const T d0 = xi - p.mu0, d1 = xi - p.mu1;
      const T l0 = p.a0 - p.h0 * d0 * d0;
      const T l1 = p.a1 - p.h1 * d1 * d1;
      const T diff = l0 - l1;
      const bool first = diff >= T(0);
      const T t = exp_nonpos(first ? -diff : diff);
      const T inv = T(1) / (T(1) + t);
      const T r0 = first ? inv : t * inv;
      const T r1 = first ? t * inv : inv;
      s0 += r0;
      s1 += r1;
      m0 += r0 * d0;
      m1 += r1 * d1;
      q0 += r0 * d0 * d0;
      q1 += r1 * d1 * d1;
      lm += first ? l0 : l1;
      prod *= T(1) + t;
    }
    acc[0] += s0;
    acc[1] += s1;
    acc[2] += m0;
    acc[3] += m1;
    acc[4] += q0;
    acc[5] += q1;
    acc[6] += double(lm) + std::log(double(prod));
  }
  for (int k = 0; k < 7; ++k) out[k] = acc[k];
}

// Responsibility of component 0 for x[0, n) -> post[0, n).
template <typename T>
DDFAST_AI void posterior_impl(const T* x, int64_t n, CompParams<T> p, T* post) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T xi = x[j];
    const T d0 = xi - p.mu0, d1 = xi - p.mu1;
    const T diff = (p.a0 - p.h0 * d0 * d0) - (p.a1 - p.h1 * d1 * d1);
    const bool first = diff >= T(0);
    const T t = exp_nonpos(first ? -diff : diff);
    const T inv = T(1) / (T(1) + t);
    post[j] = first ? inv : t * inv;
  }
}

DDFAST_CPU_CLONES void stats_f32(const float* x, int64_t n, CompParams<float> p, double* out) {
  stats_impl<float>(x, n, p, out);
}
DDFAST_CPU_CLONES void stats_f64(const double* x, int64_t n, CompParams<double> p, double* out) {
  stats_impl<double>(x, n, p, out);
}
DDFAST_CPU_CLONES void posterior_f32(const float* x, int64_t n, CompParams<float> p, float* post) {
  posterior_impl<float>(x, n, p, post);
}
DDFAST_CPU_CLONES void posterior_f64(const double* x, int64_t n, CompParams<double> p, double* post) {
  posterior_impl<double>(x, n, p, post);
}

inline void stats(const float* x, int64_t n, CompParams<float> p, double* out) { stats_f32(x, n, p, out); }
inline void stats(const double* x, int64_t n, CompParams<double> p, double* out) { stats_f64(x, n, p, out); }
inline void posterior(const float* x, int64_t n, CompParams<float> p, float* post) { posterior_f32(x, n, p, post); }
inline void posterior(const double* x, int64_t n, CompParams<double> p, double* post) {
  posterior_f64(x, n, p, post);
}

struct Item {
  int64_t cls, begin, end;
};

template <typename T>
CompParams<T> comp_params(const double* w, const double* mu, const double* var) {
  CompParams<T> p;
  p.mu0 = T(mu[0]);
  p.mu1 = T(mu[1]);
  p.a0 = T(std::log(w[0]) - 0.5 * (kLog2Pi + std::log(var[0])));
  p.a1 = T(std::log(w[1]) - 0.5 * (kLog2Pi + std::log(var[1])));
  p.h0 = T(0.5 / var[0]);
  p.h1 = T(0.5 / var[1]);
  return p;
}

template <typename T>
void gmm_impl(const at::Tensor& values, const at::Tensor& labels, int64_t C, int64_t num_iters, double tol,
              double reg_covar, const at::Tensor& w_init, const at::Tensor& mu_init, const at::Tensor& var_init,
              at::Tensor& post_out, at::Tensor& w_out, at::Tensor& mu_out, at::Tensor& var_out, at::Tensor& n_iter_out) {
  const int64_t N = values.size(0);
  const T* vp = values.const_data_ptr<T>();
  const int64_t vs = values.stride(0);
  const int64_t* yp = labels.const_data_ptr<int64_t>();
  const int64_t ys = labels.stride(0);

  // ---- counting sort by class (stable), labels checked on the way
  std::vector<int64_t> count(C, 0), offset(C + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t c = yp[i * ys];
    TORCH_CHECK_VALUE(c >= 0 && c < C, "classwise_gmm: labels must lie in [0, ", C, "); labels[", i, "] = ", c);
    ++count[c];
  }
  for (int64_t c = 0; c < C; ++c) offset[c + 1] = offset[c] + count[c];
  std::vector<T> xs(N);
  std::vector<int64_t> idx(N);
  {
    std::vector<int64_t> pos(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t q = pos[yp[i * ys]]++;
      xs[q] = vp[i * vs];
      idx[q] = i;
    }
  }

  // ---- parameters (double), class state
  auto wi = w_init.to(at::kDouble).contiguous(), mi = mu_init.to(at::kDouble).contiguous(),
       vi = var_init.to(at::kDouble).contiguous();
  std::vector<double> w(wi.const_data_ptr<double>(), wi.const_data_ptr<double>() + 2 * C);
  std::vector<double> mu(mi.const_data_ptr<double>(), mi.const_data_ptr<double>() + 2 * C);
  std::vector<double> var(vi.const_data_ptr<double>(), vi.const_data_ptr<double>() + 2 * C);
  std::vector<char> active(C);
  std::vector<double> ll_prev(C, -std::numeric_limits<double>::infinity());
  int64_t* n_iter = n_iter_out.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    active[c] = count[c] >= 2 && num_iters > 0;
    n_iter[c] = 0;
  }
  const double eps10 = 10.0 * double(std::numeric_limits<T>::epsilon());

  // ---- work items: every class's segment cut into chunks
  std::vector<Item> items;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = offset[c]; b < offset[c + 1]; b += kChunk) {
      items.push_back({c, b, std::min(b + kChunk, offset[c + 1])});
    }
  }
  std::vector<double> part(items.size() * 7);
  std::vector<CompParams<T>> cp(C);
  std::vector<Item> work;
  work.reserve(items.size());

  for (int64_t it = 0; it < num_iters; ++it) {
    work.clear();
    for (const Item& x : items) {
      if (active[x.cls]) work.push_back(x);
    }
    if (work.empty()) break;
    for (int64_t c = 0; c < C; ++c) {
      if (active[c]) cp[c] = comp_params<T>(&w[2 * c], &mu[2 * c], &var[2 * c]);
    }
    at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const Item& x = work[k];
        stats(xs.data() + x.begin, x.end - x.begin, cp[x.cls], &part[7 * k]);
      }
    });
    // combine in item order (items of a class are consecutive), M-step, convergence
    std::vector<double> tot(7);
    for (size_t k = 0; k < work.size();) {
      const int64_t c = work[k].cls;
      std::fill(tot.begin(), tot.end(), 0.0);
      for (; k < work.size() && work[k].cls == c; ++k) {
        for (int j = 0; j < 7; ++j) tot[j] += part[7 * k + j];
      }
      const double nk0 = tot[0] + eps10, nk1 = tot[1] + eps10;
      const double m0 = (tot[2] + mu[2 * c] * tot[0]) / nk0;
      const double m1 = (tot[3] + mu[2 * c + 1] * tot[1]) / nk1;
      const double d0 = m0 - mu[2 * c], d1 = m1 - mu[2 * c + 1];
      const double v0 = std::max(0.0, tot[4] - 2.0 * d0 * tot[2] + d0 * d0 * tot[0]) / nk0 + reg_covar;
      const double v1 = std::max(0.0, tot[5] - 2.0 * d1 * tot[3] + d1 * d1 * tot[1]) / nk1 + reg_covar;
      w[2 * c] = nk0 / (nk0 + nk1);
      w[2 * c + 1] = nk1 / (nk0 + nk1);
      mu[2 * c] = m0;
      mu[2 * c + 1] = m1;
      var[2 * c] = v0;
      var[2 * c + 1] = v1;
      ++n_iter[c];
      const double ll = tot[6] / double(count[c]);
      if (std::abs(ll - ll_prev[c]) < tol) active[c] = 0;
      ll_prev[c] = ll;
    }
  }

  // ---- order the components by mean, write the parameters
  T* wo = w_out.mutable_data_ptr<T>();
  T* mo = mu_out.mutable_data_ptr<T>();
  T* vo = var_out.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    if (mu[2 * c + 1] < mu[2 * c] - kTieSd * std::sqrt(std::max(var[2 * c], var[2 * c + 1]))) {
      std::swap(w[2 * c], w[2 * c + 1]);
      std::swap(mu[2 * c], mu[2 * c + 1]);
      std::swap(var[2 * c], var[2 * c + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      wo[2 * c + k] = T(w[2 * c + k]);
      mo[2 * c + k] = T(mu[2 * c + k]);
      vo[2 * c + k] = T(var[2 * c + k]);
    }
    cp[c] = comp_params<T>(&w[2 * c], &mu[2 * c], &var[2 * c]);
  }

  // ---- final E-step: posterior of the low-mean component, scattered back to the input order
  T* po = post_out.mutable_data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(kChunk);
    for (int64_t k = b; k < e; ++k) {
      const Item& x = items[k];
      const int64_t n = x.end - x.begin;
      posterior(xs.data() + x.begin, n, cp[x.cls], buf.data());
      for (int64_t j = 0; j < n; ++j) po[idx[x.begin + j]] = buf[j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> classwise_gmm_cpu(
    const at::Tensor& values, const at::Tensor& labels, int64_t num_classes, int64_t num_iters, double tol,
    double reg_covar, const at::Tensor& init_weights, const at::Tensor& init_means, const at::Tensor& init_variances) {
  trust::check_classwise_gmm_args(values, labels, num_classes, num_iters, tol, reg_covar, init_weights, init_means,
                                  init_variances);
  const int64_t N = values.size(0), C = num_classes;
  auto post = at::empty({N}, values.options());
  auto w = at::empty({C, 2}, values.options());
  auto mu = at::empty({C, 2}, values.options());
  auto var = at::empty({C, 2}, values.options());
  auto n_iter = at::empty({C}, values.options().dtype(at::kLong));
  if (values.scalar_type() == at::kFloat) {
    gmm_impl<float>(values, labels, C, num_iters, tol, reg_covar, init_weights, init_means, init_variances, post, w,
                    mu, var, n_iter);
  } else {
    gmm_impl<double>(values, labels, C, num_iters, tol, reg_covar, init_weights, init_means, init_variances, post, w,
                     mu, var, n_iter);
  }
  return {post, w, mu, var, n_iter};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CPU, m) { m.impl("classwise_gmm", &ddfast::classwise_gmm_cpu); }
