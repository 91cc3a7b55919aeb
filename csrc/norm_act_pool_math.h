// The ConvNet block's pointwise maths, shared by the CPU and CUDA kernels of norm_act_pool
// (csrc/{cpu,cuda}/norm_act_pool_kernel.*).
//
// Block:  y = gamma * (x - mu) * rstd + beta   (instance norm with affine; y = x without normalisation)
//         r = act(y)                            (ReLU, or softplus with sharpness beta and threshold 20)
//         p = mean of each 2x2 window of r      (average pooling, stride 2, floor; or p = r without pooling)
//
// An activation is given by its value a(y), first derivative a'(y) and second derivative a''(y). They follow
// PyTorch's own definitions (aten/src/ATen/native: Activation.cpp, FunctionsManual.cpp) so that the fused op and
// the composite of torch.nn modules agree to rounding:
//   ReLU:      a = max(y, 0)       a' = [y > 0]             a'' = 0
//   softplus:  z = beta * y;  a = z > 20 ? y : log1p(exp(z)) / beta;  a' = z > 20 ? 1 : e / (e + 1), e = exp(z);
//              a'' = z < 20 ? beta * s * (1 - s) : 0, s = sigmoid(z)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace ddfast {
namespace nap {

enum Act : int { kReLU = 0, kSoftplus = 1 };
constexpr double kSoftplusThreshold = 20.0;

template <int ACT, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T act_value(T y, T beta) {
  if (ACT == kReLU) return y < T(0) ? T(0) : y;  // NaN passes through, as torch.relu
  const T z = y * beta;
  return z > T(kSoftplusThreshold) ? y : ::log1p(::exp(z)) / beta;
}

template <int ACT, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T act_d1(T y, T beta) {
  if (ACT == kReLU) return y > T(0) ? T(1) : T(0);
  const T z = y * beta;
  if (z > T(kSoftplusThreshold)) return T(1);
  const T e = ::exp(z);
  return e / (e + T(1));
}

template <int ACT, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T act_d2(T y, T beta) {
  if (ACT == kReLU) return T(0);
  const T z = y * beta;
  if (!(z < T(kSoftplusThreshold))) return T(0);
  const T s = T(1) / (T(1) + ::exp(-z));
  return beta * s * (T(1) - s);
}

// Geometry of one (image, channel) plane: H x W inputs, Ho x Wo outputs (Ho = H / 2 with pooling, else H).
// With pooling, inputs outside the pooled region (the last row / column of an odd size) reach no output.
struct Geom {
  int64_t H, W, Ho, Wo;
  C10_HOST_DEVICE int64_t in_size() const { return H * W; }
  C10_HOST_DEVICE int64_t out_size() const { return Ho * Wo; }
};

// The output index that input i feeds (-1: none), and the weight of that link (1/4 with pooling, 1 without).
template <bool POOL>
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t out_index(const Geom& g, int64_t i) {
  if (!POOL) return i;
  const int64_t h = i / g.W, w = i - h * g.W;
  const int64_t oh = h >> 1, ow = w >> 1;
  return (oh < g.Ho && ow < g.Wo) ? oh * g.Wo + ow : -1;
}

template <bool POOL, typename T>
C10_HOST_DEVICE constexpr T pool_weight() {
  return POOL ? T(0.25) : T(1);
}

}  // namespace nap
}  // namespace ddfast
