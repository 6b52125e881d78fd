// What gemmakit's AVX2 kernel files share (gemv_avx2.cpp: the decode products; screen_avx2.cpp: the passes on
// an integer grid): the shapes of their row blocks and tiles, the AVX-512 build's target and its register
// helper, the parallel walk over tiles, and the check of int8 operands.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

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

}  // namespace gemmakit_tiles
