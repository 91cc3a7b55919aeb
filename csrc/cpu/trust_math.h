// Vectorisable scalar math for the trust-scoring CPU kernels (sample_stats, classwise_gmm, anchor_distances).
//
// Everything here is plain arithmetic on float/double (no libm calls, no ATen), marked always_inline, so that
// an `omp simd` loop calling it vectorises and so that it is inlined into each ISA clone of a hot loop
// (DDFAST_CPU_CLONES): the library is built for the baseline x86-64 ISA, and GCC/clang's target_clones emit
// AVX-512 / AVX2 / baseline copies of the hot loops, picked once at load time (ifunc). Nothing here is
// compiled with a wider ISA outside those clones, so no other code can pick up AVX instructions.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DDFAST_NO_CPU_CLONES)
#define DDFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDFAST_CPU_CLONES
#endif

#define DDFAST_AI __attribute__((always_inline)) inline

namespace ddfast {
namespace trust_math {

DDFAST_AI int32_t bits_of(float x) {
  int32_t i;
  __builtin_memcpy(&i, &x, 4);
  return i;
}
DDFAST_AI int64_t bits_of(double x) {
  int64_t i;
  __builtin_memcpy(&i, &x, 8);
  return i;
}
DDFAST_AI float float_of(int32_t i) {
  float x;
  __builtin_memcpy(&x, &i, 4);
  return x;
}
DDFAST_AI double double_of(int64_t i) {
  double x;
  __builtin_memcpy(&x, &i, 8);
  return x;
}

// exp(x) for x <= 0 (the only arguments the trust kernels need: z - max, -|l0 - l1|). Range reduction
// x = n ln2 + r, |r| <= ln2/2 (n by the round-to-nearest "magic number" addition), a Taylor polynomial for
// e^r (float: degree 7, truncation < 6e-9; double: degree 13, truncation < 5e-18) and 2^n built in the
// exponent bits. Relative error about 1 ulp (float) / 2 ulp (double). Arguments below the smallest normal
// result (-87 / -708, and -inf) give exactly 0; NaN gives NaN.
DDFAST_AI float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  float k = xc * 1.44269504088896341f + magic;
  const int32_t ki = bits_of(k);
  k -= magic;
  float r = xc - k * 0.693359375f;  // ln2 split in a short high part and a low correction
  r = r - k * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = float_of((ki - bits_of(magic) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

DDFAST_AI double exp_nonpos(double x) {
  const double xc = x < -708.0 ? -708.0 : x;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  double k = xc * 1.4426950408889634074 + magic;
  const int64_t ki = bits_of(k);
  k -= magic;
  double r = xc - k * 6.93147180369123816490e-01;
  r = r - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const double scale = double_of((ki - bits_of(magic) + 1023) << 52);
  return x < -708.0 ? 0.0 : p * scale;
}

// log(x) for finite x >= 1 (sums of exponentials whose largest term is 1). x = 2^e * q with q in
// [sqrt(1/2), sqrt(2)) taken from the exponent bits; log q = 2 atanh(t), t = (q - 1) / (q + 1), |t| < 0.172, by
// its odd series (float: to t^11, double: to t^23; truncation below 1e-9 / 1e-19 relative).
DDFAST_AI float log_ge1(float x) {
  const int32_t b = bits_of(x);
  int32_t e = ((b >> 23) & 0xff) - 127;
  int32_t mb = (b & 0x007fffff) | 0x3f800000;  // q in [1, 2)
  const bool hi = (b & 0x007fffff) > 0x3504f3;  // q > sqrt(2): use q / 2, e + 1
  mb = hi ? mb - 0x00800000 : mb;
  e = hi ? e + 1 : e;
  const float q = float_of(mb);
  const float t = (q - 1.0f) / (q + 1.0f);
  const float t2 = t * t;
  float p = 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return float(e) * 0.693147180559945309f + 2.0f * t * p;
}

DDFAST_AI double log_ge1(double x) {
  const int64_t b = bits_of(x);
  int64_t e = ((b >> 52) & 0x7ff) - 1023;
  const int64_t man = b & 0x000fffffffffffffLL;
  int64_t mb = man | 0x3ff0000000000000LL;
  const bool hi = man > 0x6a09e667f3bcdLL;  // q > sqrt(2)
  mb = hi ? mb - 0x0010000000000000LL : mb;
  e = hi ? e + 1 : e;
  const double q = double_of(mb);
  const double t = (q - 1.0) / (q + 1.0);
  const double t2 = t * t;
  double p = 1.0 / 23.0;
  p = p * t2 + 1.0 / 21.0;
  p = p * t2 + 1.0 / 19.0;
  p = p * t2 + 1.0 / 17.0;
  p = p * t2 + 1.0 / 15.0;
  p = p * t2 + 1.0 / 13.0;
  p = p * t2 + 1.0 / 11.0;
  p = p * t2 + 1.0 / 9.0;
  p = p * t2 + 1.0 / 7.0;
  p = p * t2 + 1.0 / 5.0;
  p = p * t2 + 1.0 / 3.0;
  p = p * t2 + 1.0;
  return double(e) * 0.69314718055994530942 + 2.0 * t * p;
}

// IEEE half / bfloat16 bits -> float (exact; subnormals, inf and NaN included), branch-free.
DDFAST_AI float half_bits_to_float(uint16_t h) {
  const int32_t sign = (int32_t(h) & 0x8000) << 16;
  const int32_t em = int32_t(h) & 0x7fff;
  // exponent+mantissa shifted into float position, rebiased by a multiplication with 2^112 (handles subnormals)
  float f = float_of(em << 13) * 5.192296858534828e33f;
  f = em >= 0x7c00 ? float_of((em << 13) | 0x7f800000) : f;  // inf / NaN
  return float_of(bits_of(f) | sign);
}
DDFAST_AI float bf16_bits_to_float(uint16_t h) { return float_of(int32_t(h) << 16); }

DDFAST_AI float abs_(float x) { return x < 0.0f ? -x : x; }
DDFAST_AI double abs_(double x) { return x < 0.0 ? -x : x; }

}  // namespace trust_math
}  // namespace ddfast
