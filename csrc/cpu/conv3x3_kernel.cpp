// A 3x3 convolution with few input channels (stride 1, dilation 1, zero padding p, one group) -- the first layer of a
// ConvNet on grayscale or RGB images -- as three direct kernels: the forward, the input gradient and the weight
// gradient. The maths is in ddfast/ops/convnet.py (conv2d). With Ho = H + 2p - 2, Wo = W + 2p - 2:
//
//   forward:       y[n, o, i, j]  = b[o] + sum_{c, k, l} w[o, c, k, l] x[n, c, i + k - p, j + l - p]
//   input grad:    dx[n, c, h, v] = sum_{o, k, l} w[o, c, k, l] g[n, o, h + p - k, v + p - l]
//   weight grad:   dw[o, c, k, l] = sum_{n, i, j} g[n, o, i, j] x[n, c, i + k - p, j + l - p]
//
// (x, g taken as 0 outside their planes). General-purpose convolution libraries block over input channels, which a
// 1- or 3-channel input does not have. Here each plane is one flat vectorised pass with all nine taps (taps9), and
// the weight gradient nine dot products in one flat pass. Forward and
// input gradient are parallel over images; the weight gradient is parallel over output channels, each summing its
// images in a fixed order in double, so every result is independent of the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DDFAST_NO_CPU_CLONES)
#define DDFAST_CONV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDFAST_CONV_CLONES
#endif

namespace ddfast {
namespace {

struct ConvShape {
  int64_t N, C, O, H, W, Ho, Wo, p;
};

// Every kernel works on "grids": a plane stored with a row stride S wider than its valid width, so that the nine
// taps (k, l) of a 3x3 window are the constant offsets k S + l and a whole plane is one flat vectorised loop (the
// columns past the valid width compute values nobody reads, or multiply zeros).

// plane [H, W] into the middle of a zeroed grid [H + 2q, W + 2q] (plus one zero row of slack for the last taps)
template <typename T>
C10_ALWAYS_INLINE void pad_plane(const T* src, int64_t H, int64_t W, int64_t q, T* dst) {
  const int64_t S = W + 2 * q;
  for (int64_t i = 0; i < (H + 2 * q + 1) * S; ++i) dst[i] = T(0);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) dst[(i + q) * S + q + j] = src[i * W + j];
}

// acc[m] (+)= sum_t wt[t] src[m + off_t] over m < len, off_t = k S + l: all nine taps in one pass
template <typename T, bool ADD>
C10_ALWAYS_INLINE void taps9(T* acc, int64_t len, const T* src, int64_t S, const T* wt) {
  const T w0 = wt[0], w1 = wt[1], w2 = wt[2], w3 = wt[3], w4 = wt[4], w5 = wt[5], w6 = wt[6], w7 = wt[7], w8 = wt[8];
  const T* r0 = src;
  const T* r1 = src + S;
  const T* r2 = src + 2 * S;
#pragma omp simd
  for (int64_t m = 0; m < len; ++m) {
    const T v = w0 * r0[m] + w1 * r0[m + 1] + w2 * r0[m + 2] + w3 * r1[m] + w4 * r1[m + 1] + w5 * r1[m + 2] +
                w6 * r2[m] + w7 * r2[m + 1] + w8 * r2[m + 2];
    acc[m] = ADD ? acc[m] + v : v;
  }
}

// the first `cols` columns of a grid [rows, S] into a dense [rows, cols] plane (+ bias)
template <typename T>
C10_ALWAYS_INLINE void compact(const T* grid, int64_t rows, int64_t S, int64_t cols, T bias, T* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = grid + i * S;
    T* d = dst + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = a[j] + bias;
  }
}

// forward, images [n0, n1): x padded by p (grid stride S = W + 2p), each output plane one taps9 pass per channel
// on the grid (Ho rows of S), then compacted
template <typename T>
C10_ALWAYS_INLINE void forward_images(const ConvShape& s, int64_t n0, int64_t n1, const T* x, const T* w, const T* b,
                                      T* y, T* xp, T* grid) {
  const int64_t S = s.W + 2 * s.p, P = (s.H + 2 * s.p + 1) * S, len = s.Ho * S, Mo = s.Ho * s.Wo;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < s.C; ++c) pad_plane(x + (n * s.C + c) * s.H * s.W, s.H, s.W, s.p, xp + c * P);
    for (int64_t o = 0; o < s.O; ++o) {
      taps9<T, false>(grid, len, xp, S, w + o * s.C * 9);
      for (int64_t c = 1; c < s.C; ++c) taps9<T, true>(grid, len, xp + c * P, S, w + (o * s.C + c) * 9);
      compact(grid, s.Ho, S, s.Wo, b == nullptr ? T(0) : b[o], y + (n * s.O + o) * Mo);
    }
  }
}

// input gradient, images [n0, n1): dx[h, v] = sum_o sum_{k',l'} w[o, c, 2-k', 2-l'] g[h + p - 2 + k', v + p - 2 + l'],
// the flipped kernel over g padded by q = 2 - p (p >= 2: g read in place, its grid starting at row / column p - 2)
template <typename T>
C10_ALWAYS_INLINE void input_grad_images(const ConvShape& s, int64_t n0, int64_t n1, const T* g, const T* w, T* dx,
                                         T* gpad, T* wf, T* grid) {
  const int64_t q = std::max<int64_t>(0, 2 - s.p), off = std::max<int64_t>(0, s.p - 2);
  const int64_t Mo = s.Ho * s.Wo, Mi = s.H * s.W;
  const int64_t S = s.Wo + 2 * q, P = q > 0 ? (s.Ho + 2 * q + 1) * S : Mo, len = s.H * S;
  for (int64_t o = 0; o < s.O; ++o)  // flipped taps: wf[o, c, t] = w[o, c, 8 - t]
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t t = 0; t < 9; ++t) wf[(o * s.C + c) * 9 + t] = w[(o * s.C + c) * 9 + 8 - t];
  for (int64_t n = n0; n < n1; ++n) {
    const T* base = g + n * s.O * Mo + off * S + off;
    if (q > 0) {
      for (int64_t o = 0; o < s.O; ++o) pad_plane(g + (n * s.O + o) * Mo, s.Ho, s.Wo, q, gpad + o * P);
      base = gpad;
    }
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t o = 0; o < s.O; ++o) {
        if (o == 0) {
          taps9<T, false>(grid, len, base, S, wf + c * 9);
        } else {
          taps9<T, true>(grid, len, base + o * P, S, wf + (o * s.C + c) * 9);
        }
      }
      compact(grid, s.H, S, s.W, T(0), dx + (n * s.C + c) * Mi);
    }
  }
}

// weight gradient for output channels [o0, o1): per image (in order) x padded by p (grid stride S = W + 2p) and each
// gradient plane spread onto the same stride (zeros past Wo), then nine dot products per (o, c) in one flat pass;
// each image's partial in T, the running sums in double
template <typename T>
C10_ALWAYS_INLINE void weight_grad_channels(const ConvShape& s, int64_t o0, int64_t o1, const T* g, const T* x,
                                            T* dw, T* xp, T* gg, double* acc) {
  const int64_t S = s.W + 2 * s.p, P = (s.H + 2 * s.p + 1) * S, len = s.Ho * S, Mo = s.Ho * s.Wo;
  for (int64_t i = 0; i < (o1 - o0) * s.C * 9; ++i) acc[i] = 0.0;
  for (int64_t i = 0; i < len; ++i) gg[i] = T(0);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) pad_plane(x + (n * s.C + c) * s.H * s.W, s.H, s.W, s.p, xp + c * P);
    for (int64_t o = o0; o < o1; ++o) {
      const T* go = g + (n * s.O + o) * Mo;
      for (int64_t i = 0; i < s.Ho; ++i)
        for (int64_t j = 0; j < s.Wo; ++j) gg[i * S + j] = go[i * s.Wo + j];
      for (int64_t c = 0; c < s.C; ++c) {
        const T* r0 = xp + c * P;
        const T* r1 = r0 + S;
        const T* r2 = r1 + S;
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, a8 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7, a8)
        for (int64_t m = 0; m < len; ++m) {
          const T gv = gg[m];
          a0 += gv * r0[m];
          a1 += gv * r0[m + 1];
          a2 += gv * r0[m + 2];
          a3 += gv * r1[m];
          a4 += gv * r1[m + 1];
          a5 += gv * r1[m + 2];
          a6 += gv * r2[m];
          a7 += gv * r2[m + 1];
          a8 += gv * r2[m + 2];
        }
        double* d = acc + ((o - o0) * s.C + c) * 9;
        d[0] += a0; d[1] += a1; d[2] += a2; d[3] += a3; d[4] += a4; d[5] += a5; d[6] += a6; d[7] += a7; d[8] += a8;
      }
    }
  }
  for (int64_t i = 0; i < (o1 - o0) * s.C * 9; ++i) dw[o0 * s.C * 9 + i] = static_cast<T>(acc[i]);
}

// ISA clones, one overload per dtype (target_clones cannot be put on a template)
DDFAST_CONV_CLONES void fwd(const ConvShape& s, int64_t a, int64_t e, const float* x, const float* w,
                             const float* b, float* y, float* xp, float* grid) {
  forward_images(s, a, e, x, w, b, y, xp, grid);
}
DDFAST_CONV_CLONES void fwd(const ConvShape& s, int64_t a, int64_t e, const double* x, const double* w,
                             const double* b, double* y, double* xp, double* grid) {
  forward_images(s, a, e, x, w, b, y, xp, grid);
}
DDFAST_CONV_CLONES void gin(const ConvShape& s, int64_t a, int64_t e, const float* g, const float* w, float* dx,
                             float* gpad, float* wf, float* grid) {
  input_grad_images(s, a, e, g, w, dx, gpad, wf, grid);
}
DDFAST_CONV_CLONES void gin(const ConvShape& s, int64_t a, int64_t e, const double* g, const double* w, double* dx,
                             double* gpad, double* wf, double* grid) {
  input_grad_images(s, a, e, g, w, dx, gpad, wf, grid);
}
DDFAST_CONV_CLONES void gw(const ConvShape& s, int64_t a, int64_t e, const float* g, const float* x, float* dw,
                            float* xp, float* gg, double* acc) {
  weight_grad_channels(s, a, e, g, x, dw, xp, gg, acc);
}
DDFAST_CONV_CLONES void gw(const ConvShape& s, int64_t a, int64_t e, const double* g, const double* x, double* dw,
                            double* xp, double* gg, double* acc) {
  weight_grad_channels(s, a, e, g, x, dw, xp, gg, acc);
}

int64_t image_grain(const ConvShape& s) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.O * s.Ho * s.Wo * s.C * 9));
}

at::Tensor conv3x3_forward_cpu(const at::Tensor& x_, const at::Tensor& w_, const c10::optional<at::Tensor>& bias,
                               int64_t padding) {
  const conv3x3_check::Sizes z = conv3x3_check::forward_args(x_, w_, bias, padding);
  const ConvShape s{z.N, z.C, z.O, z.H, z.W, z.Ho, z.Wo, padding};
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const bool has_b = bias.has_value() && bias->defined();
  const at::Tensor b = has_b ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({s.N, s.O, s.Ho, s.Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv3x3_forward", [&] {
    const scalar_t* bp = has_b ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, s.N, image_grain(s), [&](int64_t a, int64_t e) {
      const int64_t S = s.W + 2 * s.p;
      std::vector<scalar_t> xp(s.C * (s.H + 2 * s.p + 1) * S), grid(s.Ho * S);
      fwd(s, a, e, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), bp, y.mutable_data_ptr<scalar_t>(),
          xp.data(), grid.data());
    });
  });
  return y;
}

at::Tensor conv3x3_input_grad_cpu(const at::Tensor& g_, const at::Tensor& w_, int64_t padding, int64_t height,
                                  int64_t width) {
  const conv3x3_check::Sizes z = conv3x3_check::input_grad_args(g_, w_, padding, height, width);
  const ConvShape s{z.N, z.C, z.O, z.H, z.W, z.Ho, z.Wo, padding};
  const at::Tensor g = g_.contiguous(), w = w_.contiguous();
  at::Tensor dx = at::empty({s.N, s.C, s.H, s.W}, g.options());
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv3x3_input_grad", [&] {
    at::parallel_for(0, s.N, image_grain(s), [&](int64_t a, int64_t e) {
      const int64_t q = std::max<int64_t>(0, 2 - s.p);
      const int64_t S = s.Wo + 2 * q;
      std::vector<scalar_t> gpad(q > 0 ? s.O * (s.Ho + 2 * q + 1) * S : 0), wf(s.O * s.C * 9), grid(s.H * S);
      gin(s, a, e, g.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
          gpad.data(), wf.data(), grid.data());
    });
  });
  return dx;
}

at::Tensor conv3x3_weight_grad_cpu(const at::Tensor& g_, const at::Tensor& x_, int64_t padding) {
  const conv3x3_check::Sizes z = conv3x3_check::weight_grad_args(g_, x_, padding);
  const ConvShape s{z.N, z.C, z.O, z.H, z.W, z.Ho, z.Wo, padding};
  const at::Tensor g = g_.contiguous(), x = x_.contiguous();
  at::Tensor dw = at::zeros({s.O, s.C, 3, 3}, g.options());
  if (s.N == 0 || dw.numel() == 0) return dw;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv3x3_weight_grad", [&] {
    at::parallel_for(0, s.O, 1, [&](int64_t a, int64_t e) {
      const int64_t S = s.W + 2 * s.p;
      std::vector<scalar_t> xp(s.C * (s.H + 2 * s.p + 1) * S), gg(s.Ho * S);
      std::vector<double> acc((e - a) * s.C * 9);
      gw(s, a, e, g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>(),
         xp.data(), gg.data(), acc.data());
    });
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("conv3x3_forward", &conv3x3_forward_cpu);
  m.impl("conv3x3_input_grad", &conv3x3_input_grad_cpu);
  m.impl("conv3x3_weight_grad", &conv3x3_weight_grad_cpu);
}

}  // namespace ddfast
