// Lane helpers shared by gemmakit's AVX2 kernels (gemv_avx2.cpp, attention_avx2.cpp): widening 8 stored values
// to fp32 lanes, one value to a float, and a horizontal sum. A bf16 value is the top half of an fp32 one, so it
// widens with a shift.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace gemmakit_lanes {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 widen8(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline float widen1(int8_t v) { return static_cast<float>(v); }
inline float widen1(float v) { return v; }
inline float widen1(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace gemmakit_lanes
