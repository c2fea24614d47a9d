// Scalar helpers shared by the C++ kernels of this folder, written as plain arithmetic on
// bits so that loops over them vectorise: bfloat16 loads and stores through the accumulation
// type, a row's inverse norm, and exp for float. Included by train_kernels.cpp and
// window_attention.cpp.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace retrolm_kernels {

// --- loads and stores that widen to / round from the accumulation type -------------------
// (bfloat16 through its bits, as plain integer arithmetic, so that loops over them vectorise)
inline float bf16_bits_to_float(uint16_t h) {  // bf16 bits are float's high half
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t float_to_bf16_bits(float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

template <typename acc_t>
inline acc_t load(const float* p, int64_t i) { return static_cast<acc_t>(p[i]); }
template <typename acc_t>
inline acc_t load(const double* p, int64_t i) { return static_cast<acc_t>(p[i]); }
template <typename acc_t>
inline acc_t load(const c10::BFloat16* p, int64_t i) {
  return static_cast<acc_t>(bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]));
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) {
  reinterpret_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
}

template <typename T> struct Acc { using type = float; };

// 1 / max(|x|, eps) of one row, negative where the clamp took eps (so a backward knows)
template <typename acc_t, typename T>
inline acc_t inv_norm(const T* xr, int64_t D, acc_t eps) {
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < D; c++) ss += load<acc_t>(xr, c) * load<acc_t>(xr, c);
  const acc_t norm = std::sqrt(ss), k = acc_t(1) / std::max(norm, eps);
  return norm > eps ? k : -k;
}
template <> struct Acc<double> { using type = double; };

// exp(x) for float in plain arithmetic, so that loops over it vectorise (std::exp does not
// without -ffast-math): x = k ln2 + r, |r| <= ln2 / 2, exp(r) by the degree-6 minimax
// polynomial of the Cephes library's expf (about 1 ulp), times 2^k built in the exponent
// bits; 0 below -87.3 (where float's normal range ends), a large finite value above 88.7.
// Written without branches around arithmetic (selects of computed values only): with
// -ftrapping-math, the default, gcc would not vectorise a branch that might trap.
inline float exp_f(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // k = round(x / ln2) by adding and taking away 1.5 * 2^23 (exact for |k| < 2^22)
  const float k = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const int32_t ki = static_cast<int32_t>(k);
  const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x < -87.3f ? 0.f : e;
}
inline double exp_f(double x) { return std::exp(x); }

}  // namespace retrolm_kernels
