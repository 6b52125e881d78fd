// What gemmakit's AVX2 kernel files share (gemv_avx2.cpp: the decode products; screen_avx2.cpp: the passes on
// an integer grid): the shapes of their row blocks and tiles, the AVX-512 build's target and its register
// helper, the parallel walk over tiles, the check of int8 operands, and the rounding of x onto the integer grid
// (the int8 layers' and int4 products' x~).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "lanes_avx2.h"

namespace gemmakit_tiles {

// One row of x: kRows8 weight rows at a time (eight streams of cold rows in flight), and the blocks past the
// next one asked into L2 (gemv_avx2.cpp, rows8).
constexpr int kRows8 = 8, kPrefetchL2Blocks = 2;

// Several rows of x: tiles of up to kTileX rows of x by kTileW weight rows (gemv_avx2.cpp, tile), with rows
// kPrefetchL2 tiles on asked into L2.
constexpr int kTileX = 4, kTileW = 3, kPrefetchL2 = 3;

// The tiles in an AVX-512 build, taken where the CPU has AVX-512 with VNNI and ATen runs AVX-512 (the caller
// passes `wide`; gemv.unavailable decides): twice the lanes an FMA, and 32 vector registers hold a tile of 8
// rows of x by 3 weight rows, so a batch-8 step widens each weight once. Built for that target alone (function
// attributes), so the file still runs on AVX2-only CPUs.
#define GEMMAKIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
constexpr int kTileX512 = 8;

// A vector loaded once and used by several instructions: GCC otherwise folds the load into each of them as a
// memory operand, so a tile of J weight rows loaded every vector of x J times. With AVX-512's 32 registers
// the loads, not the multiply-adds, then bound the tiles (a 512-bit load is two 256-bit ones on Zen 4); the
// empty asm makes the value a register's, loaded once.
template <typename V>
GEMMAKIT_VNNI inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

inline bool avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// Walks an [m, n] product of weight w [n, k] in tiles, in parallel over groups of kTileW weight rows, calling
// fn(j0, cols, r0, rows, next) for weight rows j0.. and rows r0.. of x, up to tile_x rows of x a call. `next`
// is the following group's first weight row on a group's first pass (for its prefetches: x86 prefetches never
// fault, so the last group's may run past the weight's end), else null.
template <typename W, typename Fn>
inline void for_each_tile(const W* w, int64_t m, int64_t n, int64_t k, int64_t tile_x, Fn&& fn) {
  const int64_t bytes = k * kTileW * static_cast<int64_t>(sizeof(W));
  at::parallel_for(0, (n + kTileW - 1) / kTileW, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * kTileW, cols = std::min<int64_t>(kTileW, n - j0);
      for (int64_t r0 = 0; r0 < m; r0 += tile_x) {
        const char* next = r0 == 0 && j0 + kTileW < n ? reinterpret_cast<const char*>(w + (j0 + kTileW) * k)
                                                      : nullptr;
        fn(j0, cols, r0, std::min<int64_t>(tile_x, m - r0), next);
      }
    }
  });
}

// x [M, K] fp32 against int8 codes q [N, K] with a bf16 or fp32 scale per row (int8_gemv, int8_grid).
inline void check_int8_operands(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == x.size(1),
              "q: contiguous int8 [N, K]");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == q.size(0), "scales: [N]");
  TORCH_CHECK(scales.is_contiguous() && (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16),
              "scales: contiguous fp32 or bf16");
}

// The grid's top for x in int8_grid and int4_gemv, as gemv.screen_int8's: AMX's split of x~ into two signed
// bytes holds 14 bits.
constexpr int64_t kGridTop = 8191;

// One row of x onto the grid, as gemv.screen_int8 rounds it in torch ops (the same fp32 division and
// round-half-to-even, so the same x~): writes x16's row and returns its scale. A row holding NaN or inf gets a
// NaN scale (and zeros), so its outputs are NaN, as an fp32 product's would be. Vectorised: a step makes about a
// hundred of these calls, and a scalar division per input cost a batch step a visible share of its products.
inline float onto_grid(const float* x, int64_t k, float top, int16_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  __m256 peak = zero, poison = zero;  // poison: a sum of x * 0, NaN once any input is NaN or inf
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v));
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peak);
  float most = *std::max_element(lanes, lanes + 8), bad = gemmakit_lanes::hsum(poison);
  for (; i < k; ++i) {
    most = std::max(most, std::abs(x[i]));
    bad += x[i] * 0.0f;
  }
  if (std::isnan(bad)) return std::numeric_limits<float>::quiet_NaN();
  const float scale = std::max(most / top, 1e-30f);
  const __m256 s = _mm256_set1_ps(scale);
  for (i = 0; i + 8 <= k; i += 8) {  // |x / scale| <= top, so the narrowing packs never saturate
    const __m256i q = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
  }
  for (; i < k; ++i) out[i] = static_cast<int16_t>(std::nearbyint(x[i] / scale));
  return scale;
}

}  // namespace gemmakit_tiles
