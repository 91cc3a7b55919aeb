// anchor_distances (TAD inner loop: Mahalanobis / cosine to class anchors): CPU kernel.
//
//   Euclidean (precision None): one direct pass, per (row i, class c)  sum_d (f_id - a_cd)^2  and  sum_d f_id a_cd,
//     so no ||f||^2 - 2 f.a + ||a||^2 cancellation; memory bound (each feature row is read once, the anchors stay
//     in cache).
//   Mahalanobis (precision P): the O(N D^2) part is a GEMM (ATen / BLAS) on row blocks of the features centred on
//     the mean anchor m:  Y = (F - m) P,  Z = (A - m) P;  then the same direct pass computes
//     sum_d (y_id - z_cd)(f_id - a_cd) = (f_i - a_c)^T P (f_i - a_c)  exactly up to the rounding of Y and Z, whose
//     error scales with ||f - m|| (not with ||f||^2 as in the expanded form).
//   cosine = f.a / (max(||f||, eps) max(||a||, eps)) from the raw features. Distances are clamped at 0.
// Accumulation in the input dtype (float32 or float64), `omp simd` reductions in AVX-512 / AVX2 / baseline clones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/trust_math.h"
#include "ops.h"

namespace ddfast {
namespace {

// ||f||, floored at eps.
template <typename T>
DDFAST_AI T row_norm(const T* f, int64_t D, T eps) {
  T nf2 = 0;
#pragma omp simd reduction(+ : nf2)
  for (int64_t d = 0; d < D; ++d) nf2 += f[d] * f[d];
  const T nf = std::sqrt(nf2);
  return nf > eps ? nf : eps;
}

// Rows [b, e) of F (row stride fs); Y (row stride D, row 0 = F's row y0) only when P is given. Rows go in groups
// of kRows so that every anchor element loaded (from L2) serves kRows feature rows (from L1).
constexpr int64_t kRows = 4;

template <typename T, bool kHasP>
DDFAST_AI void rows_impl(const T* F, int64_t fs, const T* Y, int64_t y0, const T* A, const T* Z, const T* an,
                         int64_t C, int64_t D, int64_t b, int64_t e, T eps, T* maha, T* cosv) {
  for (int64_t i0 = b; i0 < e; i0 += kRows) {
    const int64_t nr = e - i0 < kRows ? e - i0 : kRows;
    const T* f[kRows];
    const T* y[kRows];
    T nf[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t i = i0 + (r < nr ? r : 0);  // padding rows repeat the first row; their results are dropped
      f[r] = F + i * fs;
      y[r] = kHasP ? Y + (i - y0) * D : nullptr;
      nf[r] = row_norm(f[r], D, eps);
    }
    const T *f0 = f[0], *f1 = f[1], *f2 = f[2], *f3 = f[3];
    const T *y0p = y[0], *y1p = y[1], *y2p = y[2], *y3p = y[3];
    for (int64_t c = 0; c < C; ++c) {
      const T* a = A + c * D;
      const T* z = kHasP ? Z + c * D : nullptr;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0, d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, d0, d1, d2, d3)
      for (int64_t d = 0; d < D; ++d) {
        const T ad = a[d];
        const T e0 = f0[d] - ad, e1 = f1[d] - ad, e2 = f2[d] - ad, e3 = f3[d] - ad;
        if constexpr (kHasP) {
          const T zd = z[d];
          s0 += (y0p[d] - zd) * e0;
          s1 += (y1p[d] - zd) * e1;
          s2 += (y2p[d] - zd) * e2;
          s3 += (y3p[d] - zd) * e3;
        } else {
          s0 += e0 * e0;
          s1 += e1 * e1;
          s2 += e2 * e2;
          s3 += e3 * e3;
        }
        d0 += f0[d] * ad;
        d1 += f1[d] * ad;
        d2 += f2[d] * ad;
        d3 += f3[d] * ad;
      }
      const T sv[kRows] = {s0, s1, s2, s3};
      const T dv[kRows] = {d0, d1, d2, d3};
      for (int64_t r = 0; r < nr; ++r) {
        maha[(i0 + r) * C + c] = sv[r] > T(0) ? sv[r] : T(0);
        cosv[(i0 + r) * C + c] = dv[r] / (nf[r] * an[c]);
      }
    }
  }
}

#define DDFAST_ANCHOR_ARGS(T)                                                                                    \
  const T *F, int64_t fs, const T *Y, int64_t y0, const T *A, const T *Z, const T *an, int64_t C, int64_t D, \
      int64_t b, int64_t e, T eps, T *maha, T *cosv
#define DDFAST_ANCHOR_PASS F, fs, Y, y0, A, Z, an, C, D, b, e, eps, maha, cosv

DDFAST_CPU_CLONES void rows_f32(DDFAST_ANCHOR_ARGS(float)) {
  if (Y != nullptr) rows_impl<float, true>(DDFAST_ANCHOR_PASS); else rows_impl<float, false>(DDFAST_ANCHOR_PASS);
}
DDFAST_CPU_CLONES void rows_f64(DDFAST_ANCHOR_ARGS(double)) {
  if (Y != nullptr) rows_impl<double, true>(DDFAST_ANCHOR_PASS); else rows_impl<double, false>(DDFAST_ANCHOR_PASS);
}
inline void rows(DDFAST_ANCHOR_ARGS(float)) { rows_f32(DDFAST_ANCHOR_PASS); }
inline void rows(DDFAST_ANCHOR_ARGS(double)) { rows_f64(DDFAST_ANCHOR_PASS); }

template <typename T>
void anchor_impl(const at::Tensor& features, const at::Tensor& anchors, const c10::optional<at::Tensor>& precision,
                 double eps_d, at::Tensor& maha, at::Tensor& cosv) {
  const int64_t N = features.size(0), D = features.size(1), C = anchors.size(0);
  const T eps = static_cast<T>(eps_d);
  const T* F = features.const_data_ptr<T>();
  const int64_t fs = features.stride(0);
  const T* A = anchors.const_data_ptr<T>();
  std::vector<T> an(C);
  for (int64_t c = 0; c < C; ++c) {
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += A[c * D + d] * A[c * D + d];
    const T n = std::sqrt(s);
    an[c] = n > eps ? n : eps;
  }
  T* mp = maha.mutable_data_ptr<T>();
  T* cp = cosv.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 15) / std::max<int64_t>(C * D, 1));
  if (!precision.has_value()) {
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      rows(F, fs, nullptr, 0, A, nullptr, an.data(), C, D, b, e, eps, mp, cp);
    });
    return;
  }
  const at::Tensor& P = *precision;
  const at::Tensor center = anchors.mean(0, /*keepdim=*/true);  // [1, D]
  const at::Tensor Zt = at::mm(anchors - center, P).contiguous();  // [C, D]
  const T* Z = Zt.const_data_ptr<T>();
  // row blocks of about 2^21 elements: the GEMM stays efficient, Y stays in the last-level cache
  const int64_t rb = std::max<int64_t>(64, (int64_t(1) << 21) / std::max<int64_t>(D, 1));
  for (int64_t r0 = 0; r0 < N; r0 += rb) {
    const int64_t r1 = std::min(N, r0 + rb);
    const at::Tensor Yt = at::mm(features.slice(0, r0, r1) - center, P).contiguous();  // [r1 - r0, D]
    const T* Y = Yt.const_data_ptr<T>();
    at::parallel_for(r0, r1, grain, [&](int64_t b, int64_t e) {
      rows(F, fs, Y, r0, A, Z, an.data(), C, D, b, e, eps, mp, cp);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_distances_cpu(const at::Tensor& features_in, const at::Tensor& anchors_in,
                                                        const c10::optional<at::Tensor>& precision, double eps) {
  trust::check_anchor_distances_args(features_in, anchors_in, precision, eps);
  const auto st = features_in.scalar_type();
  const at::Tensor features = rows_unit_stride(features_in);
  const at::Tensor anchors = anchors_in.contiguous();
  const int64_t N = features.size(0), C = anchors.size(0);
  auto maha = at::empty({N, C}, features.options());
  auto cosv = at::empty({N, C}, features.options());
  if (N == 0 || C == 0) return {maha, cosv};
  if (st == at::kFloat) {
    anchor_impl<float>(features, anchors, precision, eps, maha, cosv);
  } else {
    anchor_impl<double>(features, anchors, precision, eps, maha, cosv);
  }
  return {maha, cosv};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CPU, m) { m.impl("anchor_distances", &ddfast::anchor_distances_cpu); }
