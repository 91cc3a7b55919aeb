// sample_stats / sample_stats_ema_ (TAD per-sample statistics): CPU kernel.
//
// Per row z = logits[i] (C entries) with label y:
//   pass 1 (reads the row from memory): m = max_k z_k, o = max_{k != y} z_k, NaN flag;
//   pass 2 (the row is now in L1/L2):    s = sum_k exp(z_k - m), first index of m (argmax, ties -> first);
//   loss = (m - z_y) + log s, confidence = exp(z_y - m) / s, margin = (exp(z_y - m) - exp(o - m)) / s.
// Both passes are `omp simd` reductions with an inlined polynomial exp (trust_math.h), compiled in AVX-512 /
// AVX2 / baseline clones. float16/bfloat16 rows are widened to float32 into a per-task buffer first.
// Accumulation: float32 (float64 for float64 logits); outputs in that dtype. Rows are independent, so the
// result does not depend on the thread count. A row with NaN, +inf or only -inf gets NaN statistics (the
// Python wrapper raises on them); a label outside [0, C) raises here.

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

// Statistics of one row held as acc_t with unit stride.
template <typename acc_t>
DDFAST_AI void row_stats(const acc_t* z, int64_t C, int64_t y, acc_t* loss, acc_t* conf, acc_t* margin,
                         int64_t* pred) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t pinf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t m = ninf, o = ninf;
  int32_t bad = 0;
#pragma omp simd reduction(max : m, o) reduction(| : bad)
  for (int64_t k = 0; k < C; ++k) {
    const acc_t v = z[k];
    m = v > m ? v : m;
    const acc_t vo = k == y ? ninf : v;
    o = vo > o ? vo : o;
    bad |= (v != v) ? 1 : 0;
  }
  if (bad || m == pinf || m == ninf) {
    // undefined loss: NaN statistics; prediction as torch.argmax (first NaN, else first maximum)
    int64_t p = 0;
    for (int64_t k = 0; k < C; ++k) {
      if (z[k] != z[k]) { p = k; break; }
    }
    if (!bad) {
      for (int64_t k = 0; k < C; ++k) {
        if (z[k] == m) { p = k; break; }
      }
    }
    *loss = qnan;
    *conf = qnan;
    *margin = qnan;
    *pred = p;
    return;
  }
  acc_t s = 0;
  int32_t idx = static_cast<int32_t>(C);
#pragma omp simd reduction(+ : s) reduction(min : idx)
  for (int64_t k = 0; k < C; ++k) {
    const acc_t v = z[k];
    s += exp_nonpos(v - m);
    const int32_t kk = static_cast<int32_t>(k);
    idx = (v == m && kk < idx) ? kk : idx;
  }
  const acc_t zy = z[y];
  const acc_t ey = exp_nonpos(zy - m);
  const acc_t eo = exp_nonpos(o - m);  // o == -inf (C == 1, or all others -inf) -> 0
  const acc_t inv = acc_t(1) / s;
  *loss = (m - zy) + log_ge1(s);
  *conf = ey * inv;
  *margin = (ey - eo) * inv;
  *pred = idx;
}

template <typename in_t, int kKind>  // kKind: 0 plain, 1 half bits, 2 bfloat16 bits
DDFAST_AI auto widen(in_t v) {
  if constexpr (kKind == 0) {
    return v;
  } else if constexpr (kKind == 1) {
    return half_bits_to_float(v);
  } else {
    return bf16_bits_to_float(v);
  }
}

// Rows [begin, end), one row at a time (C > kSmallC). Returns the first row whose label is out of range, or -1.
template <typename in_t, typename acc_t, int kKind>
DDFAST_AI int64_t rows_wide(const in_t* z, int64_t rs, int64_t C, const int64_t* y, int64_t ys, int64_t begin,
                            int64_t end, acc_t* loss, acc_t* conf, acc_t* margin, int64_t* pred, acc_t* buf) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t yi = y[i * ys];
    if (yi < 0 || yi >= C) return i;
    const in_t* row = z + i * rs;
    const acc_t* r;
    if constexpr (kKind == 0) {
      r = row;
    } else {
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) buf[k] = widen<in_t, kKind>(row[k]);
      r = buf;
    }
    row_stats<acc_t>(r, C, yi, loss + i, conf + i, margin + i, pred + i);
  }
  return -1;
}

// Rows [begin, end) for small C: kLanes rows at a time, transposed into buf [C][kLanes] so that every loop runs
// across rows (one SIMD lane per row) instead of along a row too short to vectorise.
constexpr int64_t kLanes = 16;
constexpr int64_t kSmallC = 48;

template <typename in_t, typename acc_t, int kKind>
DDFAST_AI int64_t rows_narrow(const in_t* z, int64_t rs, int64_t C, const int64_t* y, int64_t ys, int64_t begin,
                              int64_t end, acc_t* loss, acc_t* conf, acc_t* margin, int64_t* pred, acc_t* buf) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t pinf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t qnan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t i0 = begin; i0 < end; i0 += kLanes) {
    const int64_t nr = end - i0 < kLanes ? end - i0 : kLanes;
    int32_t yy[kLanes];
    for (int64_t r = 0; r < kLanes; ++r) {
      if (r < nr) {
        const int64_t yi = y[(i0 + r) * ys];
        if (yi < 0 || yi >= C) return i0 + r;
        yy[r] = static_cast<int32_t>(yi);
        const in_t* row = z + (i0 + r) * rs;
        for (int64_t k = 0; k < C; ++k) buf[k * kLanes + r] = widen<in_t, kKind>(row[k]);
      } else {  // padding lanes: a valid dummy row
        yy[r] = 0;
        for (int64_t k = 0; k < C; ++k) buf[k * kLanes + r] = acc_t(0);
      }
    }
    acc_t m[kLanes], o[kLanes], zy[kLanes], s[kLanes];
    int32_t am[kLanes], bad[kLanes];
#pragma omp simd
    for (int64_t r = 0; r < kLanes; ++r) {
      m[r] = ninf;
      o[r] = ninf;
      zy[r] = 0;
      s[r] = 0;
      am[r] = 0;
      bad[r] = 0;
    }
    for (int32_t k = 0; k < static_cast<int32_t>(C); ++k) {
      const acc_t* col = buf + k * kLanes;
#pragma omp simd
      for (int64_t r = 0; r < kLanes; ++r) {
        const acc_t v = col[r];
        const bool gt = v > m[r];  // strict: ties keep the first index
        am[r] = gt ? k : am[r];
        m[r] = gt ? v : m[r];
        const bool own = k == yy[r];
        zy[r] = own ? v : zy[r];
        o[r] = (!own && v > o[r]) ? v : o[r];
        bad[r] |= (v != v) ? 1 : 0;
      }
    }
    for (int64_t k = 0; k < C; ++k) {
      const acc_t* col = buf + k * kLanes;
#pragma omp simd
      for (int64_t r = 0; r < kLanes; ++r) s[r] += exp_nonpos(col[r] - m[r]);
    }
    acc_t lo[kLanes], co[kLanes], ma[kLanes];
#pragma omp simd
    for (int64_t r = 0; r < kLanes; ++r) {
      const bool ok = !bad[r] && m[r] != pinf && m[r] != ninf;
      const acc_t ss = ok ? s[r] : acc_t(1);
      const acc_t ey = exp_nonpos(ok ? zy[r] - m[r] : acc_t(0));
      const acc_t eo = exp_nonpos(ok ? o[r] - m[r] : acc_t(0));
      const acc_t inv = acc_t(1) / ss;
      lo[r] = ok ? (m[r] - zy[r]) + log_ge1(ss) : qnan;
      co[r] = ok ? ey * inv : qnan;
      ma[r] = ok ? (ey - eo) * inv : qnan;
    }
    for (int64_t r = 0; r < nr; ++r) {
      loss[i0 + r] = lo[r];
      conf[i0 + r] = co[r];
      margin[i0 + r] = ma[r];
      pred[i0 + r] = am[r];
      if (bad[r]) {  // as torch.argmax: the first NaN
        const in_t* row = z + (i0 + r) * rs;
        for (int64_t k = 0; k < C; ++k) {
          const acc_t v = widen<in_t, kKind>(row[k]);
          if (v != v) { pred[i0 + r] = k; break; }
        }
      }
    }
  }
  return -1;
}

template <typename in_t, typename acc_t, int kKind>
DDFAST_AI int64_t rows_impl(const in_t* z, int64_t rs, int64_t C, const int64_t* y, int64_t ys, int64_t begin,
                            int64_t end, acc_t* loss, acc_t* conf, acc_t* margin, int64_t* pred, acc_t* buf) {
  if (C <= kSmallC) return rows_narrow<in_t, acc_t, kKind>(z, rs, C, y, ys, begin, end, loss, conf, margin, pred, buf);
  return rows_wide<in_t, acc_t, kKind>(z, rs, C, y, ys, begin, end, loss, conf, margin, pred, buf);
}

#define DDFAST_ROWS_ARGS(in_t, acc_t)                                                                            \
  const in_t *z, int64_t rs, int64_t C, const int64_t *y, int64_t ys, int64_t begin, int64_t end, acc_t *loss, \
      acc_t *conf, acc_t *margin, int64_t *pred, acc_t *buf
#define DDFAST_ROWS_PASS z, rs, C, y, ys, begin, end, loss, conf, margin, pred, buf

DDFAST_CPU_CLONES int64_t rows_f32(DDFAST_ROWS_ARGS(float, float)) {
  return rows_impl<float, float, 0>(DDFAST_ROWS_PASS);
}
DDFAST_CPU_CLONES int64_t rows_f64(DDFAST_ROWS_ARGS(double, double)) {
  return rows_impl<double, double, 0>(DDFAST_ROWS_PASS);
}
DDFAST_CPU_CLONES int64_t rows_f16(DDFAST_ROWS_ARGS(uint16_t, float)) {
  return rows_impl<uint16_t, float, 1>(DDFAST_ROWS_PASS);
}
DDFAST_CPU_CLONES int64_t rows_bf16(DDFAST_ROWS_ARGS(uint16_t, float)) {
  return rows_impl<uint16_t, float, 2>(DDFAST_ROWS_PASS);
}

template <typename in_t, typename acc_t>
void run(int64_t (*rows)(DDFAST_ROWS_ARGS(in_t, acc_t)), const at::Tensor& logits, const at::Tensor& labels,
         at::Tensor& loss, at::Tensor& conf, at::Tensor& margin, at::Tensor& pred, const at::Tensor* ema,
         double momentum) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const in_t* zp = reinterpret_cast<const in_t*>(logits.const_data_ptr());
  const int64_t rs = logits.stride(0);
  const int64_t* yp = labels.const_data_ptr<int64_t>();
  const int64_t ys = labels.stride(0);
  acc_t* lp = loss.mutable_data_ptr<acc_t>();
  acc_t* cp = conf.mutable_data_ptr<acc_t>();
  acc_t* mp = margin.mutable_data_ptr<acc_t>();
  int64_t* pp = pred.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(C <= kSmallC ? C * kLanes : (std::is_same<in_t, acc_t>::value ? 0 : C));
    const int64_t bad = rows(zp, rs, C, yp, ys, begin, end, lp, cp, mp, pp, buf.data());
    TORCH_CHECK_VALUE(bad < 0, "sample_stats: labels must lie in [0, ", C, "); labels[", bad, "] = ", yp[bad * ys]);
    if (ema != nullptr) {
      const int64_t es = ema->stride(0);
      AT_DISPATCH_FLOATING_TYPES(ema->scalar_type(), "sample_stats_ema_", [&] {
        scalar_t* ep = ema->mutable_data_ptr<scalar_t>();
        const scalar_t mo = static_cast<scalar_t>(momentum), mn = static_cast<scalar_t>(1.0 - momentum);
        for (int64_t i = begin; i < end; ++i) {
          ep[i * es] = mo * ep[i * es] + mn * static_cast<scalar_t>(lp[i]);
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> impl(const at::Tensor& logits_in, const at::Tensor& labels,
                                                                 const at::Tensor* ema, double momentum) {
  const at::Tensor logits = rows_unit_stride(logits_in);
  const int64_t N = logits.size(0);
  const auto acc = acc_type_of(logits.scalar_type());
  auto loss = at::empty({N}, logits.options().dtype(acc));
  auto conf = at::empty_like(loss);
  auto margin = at::empty_like(loss);
  auto pred = at::empty({N}, logits.options().dtype(at::kLong));
  if (N == 0) return {loss, conf, margin, pred};
  switch (logits.scalar_type()) {
    case at::kFloat: run<float, float>(rows_f32, logits, labels, loss, conf, margin, pred, ema, momentum); break;
    case at::kDouble: run<double, double>(rows_f64, logits, labels, loss, conf, margin, pred, ema, momentum); break;
    case at::kHalf: run<uint16_t, float>(rows_f16, logits, labels, loss, conf, margin, pred, ema, momentum); break;
    case at::kBFloat16: run<uint16_t, float>(rows_bf16, logits, labels, loss, conf, margin, pred, ema, momentum); break;
    default: TORCH_CHECK_TYPE(false, "sample_stats: unsupported dtype ", logits.scalar_type());
  }
  return {loss, conf, margin, pred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_stats_cpu(const at::Tensor& logits,
                                                                             const at::Tensor& labels) {
  trust::check_sample_stats_args("sample_stats", logits, labels, nullptr, 0.0);
  return impl(logits, labels, nullptr, 0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_stats_ema_cpu(const at::Tensor& logits,
                                                                                 const at::Tensor& labels,
                                                                                 at::Tensor& ema, double momentum) {
  trust::check_sample_stats_args("sample_stats_ema_", logits, labels, &ema, momentum);
  return impl(logits, labels, &ema, momentum);
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("sample_stats", &ddfast::sample_stats_cpu);
  m.impl("sample_stats_ema_", &ddfast::sample_stats_ema_cpu);
}
