// Trajectory matching (MTT eq. 2) and TESLA's fused quantities: CPU kernels.
//
//   forward : one pass over (student, start, target) -> per-row num = ||s - t||^2, den = ||e - t||^2, loss = num/den
//   backward: one pass writing the requested gradients
//             ds = 2 g (s - t) / den,  de = -2 g L (e - t) / den,  dt = -(ds + de)
//   tesla   : one reduction pass over (start, target, grad_sum) -> den, num = ||e - a G - t||^2, dot = G.(e - a G - t)
//             and one pass writing v = -2 a (e - a G - t) / den.
//
// Work is split into (row, chunk) items of kChunk elements run by at::parallel_for; chunk partial sums are
// combined per row in a fixed order (in double), so results do not depend on the thread count. The inner loops are
// plain `omp simd` reductions the compiler vectorises. Accumulation: float32 (float64 for float64 inputs).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops.h"

namespace ddfast {
namespace {

constexpr int64_t kChunk = 1 << 14;        // elements per work item
constexpr int64_t kMinItemsPerTask = 4;    // at::parallel_for grain (items)

struct Rows {
  int64_t B, P, nchunks;
  int64_t items() const { return B * nchunks; }
};

inline Rows make_rows(const at::Tensor& x) {
  const int64_t B = x.size(0), P = x.size(1);
  return {B, P, P == 0 ? 0 : (P + kChunk - 1) / kChunk};
}

void raise_zero_den(const char* op, int64_t row) {
  TORCH_CHECK_VALUE(false, op, ": start and target are identical in batch row ", row,
                    " (||start - target||^2 == 0), so the normalised distance is undefined; "
                    "pass an expert segment whose start and target differ");
}

// ---------------------------------------------------------------------------------------------------------------
// forward

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& s, const at::Tensor& e, const at::Tensor& t, at::Tensor& loss, at::Tensor& num,
                  at::Tensor& den) {
  const Rows r = make_rows(s);
  std::vector<double> pnum(r.items()), pden(r.items());
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* ep = e.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t ss = s.stride(0), es = e.stride(0), ts = t.stride(0);
  at::parallel_for(0, r.items(), kMinItemsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / r.nchunks, lo = (it % r.nchunks) * kChunk;
      const int64_t len = std::min(kChunk, r.P - lo);
      const scalar_t* sr = sp + b * ss + lo;
      const scalar_t* er = ep + b * es + lo;
      const scalar_t* tr = tp + b * ts + lo;
      acc_t n0 = 0, d0 = 0;
#pragma omp simd reduction(+ : n0, d0)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t tt = static_cast<acc_t>(tr[i]);
        const acc_t a = static_cast<acc_t>(sr[i]) - tt;
        const acc_t c = static_cast<acc_t>(er[i]) - tt;
        n0 += a * a;
        d0 += c * c;
      }
      pnum[it] = n0;
      pden[it] = d0;
    }
  });
  scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
  acc_t* np = num.mutable_data_ptr<acc_t>();
  acc_t* dp = den.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < r.B; ++b) {
    double nb = 0, db = 0;
    for (int64_t k = 0; k < r.nchunks; ++k) {
      nb += pnum[b * r.nchunks + k];
      db += pden[b * r.nchunks + k];
    }
    const acc_t n = static_cast<acc_t>(nb), d = static_cast<acc_t>(db);
    if (d == acc_t(0)) raise_zero_den("trajectory_matching_loss", b);
    np[b] = n;
    dp[b] = d;
    lp[b] = static_cast<scalar_t>(n / d);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> traj_forward_cpu(const at::Tensor& student, const at::Tensor& start,
                                                                const at::Tensor& target) {
  const char* op = "trajectory_matching_loss";
  check_triplet(op, "student", student, "start", start, "target", target);
  const at::Tensor s = rows_unit_stride(student), e = rows_unit_stride(start), t = rows_unit_stride(target);
  const int64_t B = s.size(0);
  const auto acc = acc_type_of(s.scalar_type());
  at::Tensor loss = at::empty({B}, s.options());
  at::Tensor num = at::empty({B}, s.options().dtype(acc));
  at::Tensor den = at::empty({B}, s.options().dtype(acc));
  if (B == 0) return {loss, num, den};
  TORCH_CHECK_VALUE(s.size(1) > 0, op, ": the parameter dimension P is 0; the loss would be 0/0");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "trajectory_matching_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t, acc_t>(s, e, t, loss, num, den);
  });
  return {loss, num, den};
}

// ---------------------------------------------------------------------------------------------------------------
// backward

template <typename scalar_t, typename acc_t, bool DS, bool DE, bool DT>
void backward_impl(const at::Tensor& g, const at::Tensor& s, const at::Tensor& e, const at::Tensor& t,
                   const at::Tensor& num, const at::Tensor& den, at::Tensor& ds, at::Tensor& de, at::Tensor& dt) {
  const Rows r = make_rows(s);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const acc_t* np = num.const_data_ptr<acc_t>();
  const acc_t* dp = den.const_data_ptr<acc_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const scalar_t* ep = e.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const int64_t ss = s.stride(0), es = e.stride(0), ts = t.stride(0), P = r.P;
  scalar_t* dsp = DS ? ds.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dep = DE ? de.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dtp = DT ? dt.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, r.items(), kMinItemsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / r.nchunks, lo = (it % r.nchunks) * kChunk;
      const int64_t len = std::min(kChunk, P - lo);
      const acc_t gb = static_cast<acc_t>(gp[b]), d = dp[b];
      const acc_t cs = acc_t(2) * gb / d;                    // d/ds coefficient
      const acc_t ce = -acc_t(2) * gb * (np[b] / d) / d;     // d/de coefficient (-2 g L / den)
      const scalar_t* sr = sp + b * ss + lo;
      const scalar_t* er = ep + b * es + lo;
      const scalar_t* tr = tp + b * ts + lo;
      scalar_t* dsr = DS ? dsp + b * P + lo : nullptr;
      scalar_t* der = DE ? dep + b * P + lo : nullptr;
      scalar_t* dtr = DT ? dtp + b * P + lo : nullptr;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const acc_t tt = static_cast<acc_t>(tr[i]);
        const acc_t gs = (DS || DT) ? cs * (static_cast<acc_t>(sr[i]) - tt) : acc_t(0);
        const acc_t ge = (DE || DT) ? ce * (static_cast<acc_t>(er[i]) - tt) : acc_t(0);
        if (DS) dsr[i] = static_cast<scalar_t>(gs);
        if (DE) der[i] = static_cast<scalar_t>(ge);
        if (DT) dtr[i] = static_cast<scalar_t>(-(gs + ge));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_dispatch(bool ms, bool me, bool mt, const at::Tensor& g, const at::Tensor& s, const at::Tensor& e,
                       const at::Tensor& t, const at::Tensor& num, const at::Tensor& den, at::Tensor& ds,
                       at::Tensor& de, at::Tensor& dt) {
  const int code = (ms ? 4 : 0) | (me ? 2 : 0) | (mt ? 1 : 0);
  switch (code) {
#define DDFAST_CASE(C, A, B_, D) \
  case C: backward_impl<scalar_t, acc_t, A, B_, D>(g, s, e, t, num, den, ds, de, dt); break;
    DDFAST_CASE(1, false, false, true)
    DDFAST_CASE(2, false, true, false)
    DDFAST_CASE(3, false, true, true)
    DDFAST_CASE(4, true, false, false)
    DDFAST_CASE(5, true, false, true)
    DDFAST_CASE(6, true, true, false)
    DDFAST_CASE(7, true, true, true)
#undef DDFAST_CASE
    default: break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> traj_backward_cpu(const at::Tensor& grad_loss,
                                                                 const at::Tensor& student, const at::Tensor& start,
                                                                 const at::Tensor& target, const at::Tensor& num,
                                                                 const at::Tensor& den,
                                                                 std::array<bool, 3> output_mask) {
  const char* op = "trajectory_matching_loss_backward";
  check_triplet(op, "student", student, "start", start, "target", target);
  const at::Tensor s = rows_unit_stride(student), e = rows_unit_stride(start), t = rows_unit_stride(target);
  const int64_t B = s.size(0);
  const auto acc = acc_type_of(s.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.numel() == B && num.numel() == B && den.numel() == B, op,
                    ": grad_loss, num and den must have B = ", B, " elements");
  const at::Tensor g = grad_loss.to(s.scalar_type()).contiguous();
  const at::Tensor n = num.to(acc).contiguous(), d = den.to(acc).contiguous();
  at::Tensor ds = output_mask[0] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor de = output_mask[1] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor dt = output_mask[2] ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  if (s.numel() == 0) return {ds, de, dt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "trajectory_matching_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_dispatch<scalar_t, acc_t>(output_mask[0], output_mask[1], output_mask[2], g, s, e, t, n, d, ds, de, dt);
  });
  return {ds, de, dt};
}

// ---------------------------------------------------------------------------------------------------------------
// TESLA

template <typename scalar_t, typename acc_t>
void tesla_impl(const at::Tensor& e, const at::Tensor& t, const at::Tensor& G, const at::Tensor& lr, at::Tensor& loss,
                at::Tensor& step, at::Tensor& grad_lr) {
  const Rows r = make_rows(e);
  const scalar_t* ep = e.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  const scalar_t* gp = G.const_data_ptr<scalar_t>();
  const acc_t* ap = lr.const_data_ptr<acc_t>();
  const int64_t es = e.stride(0), ts = t.stride(0), gs = G.stride(0), P = r.P;
  std::vector<double> pden(r.items()), pnum(r.items()), pdot(r.items());
  at::parallel_for(0, r.items(), kMinItemsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / r.nchunks, lo = (it % r.nchunks) * kChunk;
      const int64_t len = std::min(kChunk, P - lo);
      const scalar_t* er = ep + b * es + lo;
      const scalar_t* tr = tp + b * ts + lo;
      const scalar_t* gr = gp + b * gs + lo;
      const acc_t a = ap[b];
      acc_t d0 = 0, n0 = 0, p0 = 0;
#pragma omp simd reduction(+ : d0, n0, p0)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t et = static_cast<acc_t>(er[i]) - static_cast<acc_t>(tr[i]);
        const acc_t g = static_cast<acc_t>(gr[i]);
        const acc_t dd = et - a * g;
        d0 += et * et;
        n0 += dd * dd;
        p0 += g * dd;
      }
      pden[it] = d0;
      pnum[it] = n0;
      pdot[it] = p0;
    }
  });
  std::vector<acc_t> scale(r.B);
  scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
  scalar_t* glp = grad_lr.mutable_data_ptr<scalar_t>();
  for (int64_t b = 0; b < r.B; ++b) {
    double db = 0, nb = 0, pb = 0;
    for (int64_t k = 0; k < r.nchunks; ++k) {
      db += pden[b * r.nchunks + k];
      nb += pnum[b * r.nchunks + k];
      pb += pdot[b * r.nchunks + k];
    }
    const acc_t d = static_cast<acc_t>(db);
    if (d == acc_t(0)) raise_zero_den("tesla_quantities", b);
    lp[b] = static_cast<scalar_t>(static_cast<acc_t>(nb) / d);
    glp[b] = static_cast<scalar_t>(-acc_t(2) * static_cast<acc_t>(pb) / d);
    scale[b] = -acc_t(2) * ap[b] / d;
  }
  scalar_t* vp = step.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, r.items(), kMinItemsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / r.nchunks, lo = (it % r.nchunks) * kChunk;
      const int64_t len = std::min(kChunk, P - lo);
      const scalar_t* er = ep + b * es + lo;
      const scalar_t* tr = tp + b * ts + lo;
      const scalar_t* gr = gp + b * gs + lo;
      scalar_t* vr = vp + b * P + lo;
      const acc_t a = ap[b], c = scale[b];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const acc_t dd = static_cast<acc_t>(er[i]) - static_cast<acc_t>(tr[i]) - a * static_cast<acc_t>(gr[i]);
        vr[i] = static_cast<scalar_t>(c * dd);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tesla_cpu(const at::Tensor& start, const at::Tensor& target,
                                                         const at::Tensor& grad_sum, const at::Tensor& lr) {
  const char* op = "tesla_quantities";
  check_triplet(op, "start", start, "target", target, "grad_sum", grad_sum);
  const at::Tensor e = rows_unit_stride(start), t = rows_unit_stride(target), G = rows_unit_stride(grad_sum);
  const int64_t B = e.size(0);
  const auto acc = acc_type_of(e.scalar_type());
  TORCH_CHECK_VALUE(lr.numel() == B, op, ": lr must have B = ", B, " elements, got shape ", lr.sizes());
  TORCH_CHECK_VALUE(lr.device() == e.device(), op, ": lr is on ", lr.device(), " but start is on ", e.device());
  const at::Tensor a = lr.reshape({B}).to(acc).contiguous();
  at::Tensor loss = at::empty({B}, e.options());
  at::Tensor step = at::empty(e.sizes(), e.options());
  at::Tensor grad_lr = at::empty({B}, e.options());
  if (B == 0) return {loss, step, grad_lr};
  TORCH_CHECK_VALUE(e.size(1) > 0, op, ": the parameter dimension P is 0; the loss would be 0/0");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "tesla_quantities", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    tesla_impl<scalar_t, acc_t>(e, t, G, a, loss, step, grad_lr);
  });
  return {loss, step, grad_lr};
}

}  // namespace
}  // namespace ddfast

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("trajectory_matching_loss_forward", &ddfast::traj_forward_cpu);
  m.impl("trajectory_matching_loss_backward", &ddfast::traj_backward_cpu);
  m.impl("tesla_quantities", &ddfast::tesla_cpu);
}
