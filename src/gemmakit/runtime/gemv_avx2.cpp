// Decode-step products for x86 CPUs with AVX2 and FMA, int4 / int8 / fp32 / bf16 weights (runtime/gemv.py builds
// this file at run time, once per machine, and says why these kernels exist).
//
// Activations stay fp32 in int8_gemv, int4_gemv and float_gemv: the same sum as "dequantize the weight,
// multiply in fp32", only in another order, so swapping these in for torch's kernels changes rounding, never the
// maths. Two passes round x onto a 14-bit integer grid and sum exactly: the screen's (only bounds come of it, the
// tokens it picks are certified against exact logits) and int8_grid, the int8 layers' decode rows, which
// rounds x less than torch's int8 kernel, which takes x in bf16.
//
// int4: torch's own CPU packing (`_convert_weight_to_int4pack_for_cpu`) as the AVX2 build lays it out, checked
// by the caller (quantize_codes.cpu_int4_block_rows == 32): rows in blocks of 32, each block [K, 16] bytes, row
// i of the block in the low nibble of byte i and row 16 + i in the high one. So one 16-byte load holds input k
// of 32 output rows, and the kernel vectorises over rows: no horizontal sums, and each group's scales and
// zeros ([K/G, N, 2] bf16, (scale, zero) interleaved) are read as 32 contiguous pairs.
//   y[n] = sum_g scale[g,n] * sum_{k in g} q[n,k] x[k] + (zero[g,n] - 8 scale[g,n]) * sum_{k in g} x[k]
// int8: plain [N, K] codes with one scale per row (bf16 or fp32), vectorised along K: for one row of x eight
// weight rows at a time, so each load of x serves eight rows; for several, tiles of 3 weight rows by up to 4
// rows of x, so each widened code serves four rows of x and each load of x three weight rows.
// fp32 / bf16: the model's own weights in place, arranged as int8's.
// int8_screen: a head screen's pass, int8 codes against x on a 14-bit integer grid, exact int32 sums (AVX2: from
// 4 rows of x one weight row against all of them, and from 6 in blocks of 8 weight rows whose sums are folded
// and written together; an AVX-512 VNNI build, taken only where the CPU has it, runs those blocks from 2 rows,
// two weight rows a step), with the screen's bound added as each sum is written; from 4 rows on AVX-512 VNNI, x on
// an 8-bit grid through the same blocks on bytes (byte_pass). int8_grid: the 16-bit pass with no bound, x rounded
// here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "lanes_avx2.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // rows per block of torch's AVX2 int4 packing

inline __m256 bf16_pairs_low(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline __m256 bf16_pairs_high(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m256i bytes_to_lanes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// One row of x against the 32 rows of one block: y[0..32).
void int4_block(const float* x, const float* group_sums, const uint8_t* codes, const uint16_t* sz, int64_t n,
                int64_t k, int64_t group, float* y) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < k / group; ++g) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      // Each 8-byte half widens straight from memory to 32-bit lanes of one byte each: the low nibble is then
      // a mask away and the high one a shift away, with no byte shuffles.
      const __m256i a = bytes_to_lanes(codes + i * 16), b = bytes_to_lanes(codes + i * 16 + 8);
      const __m256 xi = _mm256_set1_ps(x[i]);
      acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, low)), xi, acc[0]);
      acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low)), xi, acc[1]);
      acc[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), xi, acc[2]);
      acc[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), xi, acc[3]);
    }
    const __m256 sx = _mm256_set1_ps(group_sums[g]), eight = _mm256_set1_ps(8.0f);
    const uint16_t* pairs = sz + (g * n) * 2;  // this block's 32 (scale, zero) pairs of group g
    for (int j = 0; j < 4; ++j) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + j * 16));
      const __m256 scale = bf16_pairs_low(p), zero = bf16_pairs_high(p);
      out[j] = _mm256_fmadd_ps(scale, acc[j], out[j]);
      out[j] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, scale, zero), sx, out[j]);
    }
  }
  for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + j * 8, out[j]);
}

// M (2..kInt4Rows) rows of x against one block: each code is widened to float once and serves every row. The
// block is taken 16 output rows at a time, the low and high nibbles of the same 8 bytes (rows 8h..8h+7 and
// 16+8h..16+8h+7), so one load feeds 2M multiply-adds and the 2M accumulators stay in registers; each group's
// partial sums are folded into y in memory (once per group, not per input). More rows of x take another pass
// over the block, by then in L1.
constexpr int kInt4Rows = 4;

template <int M>
void int4_block_rows(const float* x, const float* group_sums, const uint8_t* codes, const uint16_t* sz,
                     int64_t n, int64_t k, int64_t group, float* y) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  const __m256 eight = _mm256_set1_ps(8.0f);
  const int64_t groups = k / group;
  for (int h = 0; h < 2; ++h) {  // bytes 8h..8h+7 of each input: output rows 8h.. (low) and 16 + 8h.. (high)
    const uint8_t* slice = codes + h * 8;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[M][2];
      for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        const __m256i lanes = bytes_to_lanes(slice + i * 16);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, low));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(lanes, 4));
        for (int r = 0; r < M; ++r) {
          const __m256 xr = _mm256_broadcast_ss(x + r * k + i);
          acc[r][0] = _mm256_fmadd_ps(lo, xr, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(hi, xr, acc[r][1]);
        }
      }
      for (int half = 0; half < 2; ++half) {
        const int j = h + 2 * half;  // output rows 8j..8j+7
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + (g * n) * 2 + j * 16));
        const __m256 scale = bf16_pairs_low(p), offset = _mm256_fnmadd_ps(eight, scale, bf16_pairs_high(p));
        for (int r = 0; r < M; ++r) {
          float* out = y + r * n + j * 8;
          const __m256 before = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
          const __m256 part = _mm256_fmadd_ps(offset, _mm256_set1_ps(group_sums[r * groups + g]), before);
          _mm256_storeu_ps(out, _mm256_fmadd_ps(scale, acc[r][half], part));
        }
      }
    }
  }
}

using BlockRows = void (*)(const float*, const float*, const uint8_t*, const uint16_t*, int64_t, int64_t, int64_t,
                           float*);
constexpr BlockRows kBlockRows[kInt4Rows + 1] = {nullptr, int4_block, int4_block_rows<2>, int4_block_rows<3>,
                                                 int4_block_rows<4>};

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                     int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 [N, K/2]");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous(),
              "scales_and_zeros: contiguous bf16 [K/G, N, 2]");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == k && n % kBlock == 0 && group > 0 && group % 8 == 0 && k % group == 0,
              "int4 shapes");
  TORCH_CHECK(scales_and_zeros.size(0) == k / group && scales_and_zeros.size(1) == n, "scales_and_zeros shape");
  auto y = at::empty({m, n}, x.options());
  // Each group's sum of x (for the zero points), here rather than as a tensor op: a decode step makes over a
  // hundred of these calls, and a dispatched op per call costs more than the sums.
  std::vector<float> sums(m * (k / group));
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < m * (k / group); ++i) sums[i] = std::accumulate(xp + i * group, xp + (i + 1) * group, 0.0f);
  const float* sp = sums.data();
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const auto* zp = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < m; r += kInt4Rows) {  // rows of x in chunks of up to kInt4Rows
        const int64_t rows = std::min<int64_t>(kInt4Rows, m - r);
        kBlockRows[rows](xp + r * k, sp + r * (k / group), cp + b * kBlock * k / 2, zp + b * kBlock * 2, n, k,
                         group, yp + r * n + b * kBlock);
      }
  });
  return y;
}

// int8, fp32 and bf16 weights share one arrangement, vectorised along K; only widening 8 values to fp32
// differs (lanes_avx2.h: hsum, widen8, widen1).
using gemmakit_lanes::hsum;
using gemmakit_lanes::widen1;
using gemmakit_lanes::widen8;

// Rows [r, r + kRows8) of w against one row of x: that many dot products along K at once. Eight streams of
// weights in flight keep more of the memory's bandwidth busy than four (the rows come cold), and eight
// accumulators still fit the 16 vector registers.
constexpr int kRows8 = 8, kPrefetchL2Blocks = 2;  // blocks past the next one asked into L2 (rows8)

template <typename W>
void rows8(const float* x, const W* w, int64_t k, float* dots) {
  __m256 acc[kRows8];
  for (int j = 0; j < kRows8; ++j) acc[j] = _mm256_setzero_ps();
  int64_t i = 0;
  // Each step reads 8 values of 8 rows, sizeof(W) cache lines: as many lines of the next rows are asked for
  // early, which covers them by the end of these, and as many of the rows two blocks further on into L2, which
  // keeps requests leaving while a step waits on a late line (as the tiles do, below).
  const char* next = reinterpret_cast<const char*>(w + kRows8 * k);
  for (; i + 8 <= k; i += 8) {
    for (int l = 0; l < static_cast<int>(sizeof(W)); ++l) {
      _mm_prefetch(next + i * kRows8 * sizeof(W) + l * 64, _MM_HINT_T0);
      _mm_prefetch(next + kPrefetchL2Blocks * kRows8 * k * sizeof(W) + i * kRows8 * sizeof(W) + l * 64, _MM_HINT_T1);
    }
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int j = 0; j < kRows8; ++j) acc[j] = _mm256_fmadd_ps(widen8(w + j * k + i), xv, acc[j]);
  }
  for (int j = 0; j < kRows8; ++j) {
    float d = hsum(acc[j]);
    for (int64_t t = i; t < k; ++t) d += widen1(w[j * k + t]) * x[t];
    dots[j] = d;
  }
}

// Several rows of x: tiles of up to kTileX rows of x by kTileW weight rows, kTileX * kTileW accumulators. Each
// widened weight vector serves the tile's rows of x and each load of x its weight rows, so the multiply-adds,
// not the loads feeding them, bound the loop (one weight row against every row of x needed a load per
// multiply-add). 4 x 3 accumulators, 3 weight vectors and one of x fill the 16 vector registers; more rows of x
// take another pass over the same weight rows, by then in L1.
constexpr int kTileX = 4, kTileW = 3, kPrefetchL2 = 3;

template <typename W, int M, int J>
void tile(const float* x, const W* w, int64_t k, float* out, int64_t ldy, const char* next) {
  __m256 acc[M][J];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  // The next tile's weight rows (contiguous, kTileW * k values), asked for early a few lines a step: by the end
  // of this pass they are in cache (a pass at a few rows of x computes too little to hide their latency). The
  // rows kPrefetchL2 tiles further on are asked into L2 as well: while a step waits on a line that is late, no
  // new requests leave it, so with only the next tile in flight the many-row tiles streamed their weights well
  // below one-row steps' rate (docs/performance.md, "Prefetching for batch tiles (CPU A)").
  constexpr int kLines = (kTileW * 8 * static_cast<int>(sizeof(W)) + 63) / 64;
  for (; i + 8 <= k; i += 8) {
    if (next != nullptr)
      for (int l = 0; l < kLines; ++l) {
        _mm_prefetch(next + i * kTileW * sizeof(W) + l * 64, _MM_HINT_T0);
        _mm_prefetch(next + kPrefetchL2 * kTileW * k * sizeof(W) + i * kTileW * sizeof(W) + l * 64, _MM_HINT_T1);
      }
    __m256 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = widen8(w + j * k + i);
    for (int r = 0; r < M; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) {
      float d = hsum(acc[r][j]);
      for (int64_t t = i; t < k; ++t) d += widen1(w[j * k + t]) * x[r * k + t];
      out[r * ldy + j] = d;
    }
}

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

// The VNNI multiply-adds as asm: with the intrinsics GCC copied accumulators of a block into other registers
// at each step (the instruction overwrites its sum), and the blocks' loops over rows of x are unrolled by
// pragma, since an array of accumulators GCC does not unroll lives on the stack (a load and a store around
// every multiply-add). Both together leave the blocks' steps as loads, prefetches and multiply-adds. acc +=
// the sum of the four byte products (unsigned a, signed b) / the two 16-bit products of each lane.
GEMMAKIT_VNNI inline void dpbusd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}
GEMMAKIT_VNNI inline void dpwssd(__m512i& acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

bool avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

GEMMAKIT_VNNI inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
GEMMAKIT_VNNI inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
GEMMAKIT_VNNI inline __m512 widen16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

template <typename W, int M, int J>
GEMMAKIT_VNNI void tile512(const float* x, const W* w, int64_t k, float* out, int64_t ldy, const char* next) {
  __m512 acc[M][J];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  constexpr int kLines = (kTileW * 16 * static_cast<int>(sizeof(W)) + 63) / 64;  // and L2's, as in tile
  for (; i + 16 <= k; i += 16) {
    if (next != nullptr)
      for (int l = 0; l < kLines; ++l) {
        _mm_prefetch(next + i * kTileW * sizeof(W) + l * 64, _MM_HINT_T0);
        _mm_prefetch(next + kPrefetchL2 * kTileW * k * sizeof(W) + i * kTileW * sizeof(W) + l * 64, _MM_HINT_T1);
      }
    __m512 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = widen16(w + j * k + i);
    for (int r = 0; r < M; ++r) {
      const __m512 xv = in_register(_mm512_loadu_ps(x + r * k + i));
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(wv[j], xv, acc[r][j]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) {
      float d = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t t = i; t < k; ++t) d += widen1(w[j * k + t]) * x[r * k + t];
      out[r * ldy + j] = d;
    }
}

// bf16 weights against bf16 x where the CPU has AVX512_BF16 (a bf16 model's batch steps): one instruction
// multiplies 16 pairs of bf16 values, exactly, and adds both products to fp32 sums, so a 32-value step of a tile
// is one load per weight row and one multiply-add per accumulator, where widening each weight to fp32 first
// (tile512) took three instructions more per weight vector and twice the multiply-adds. At 8 rows a batch
// step's bf16 products took well over the time their bytes take; with half the instructions they come close
// to it (docs/performance.md, "bf16 pairs for batch steps"). The sums are the same fp32 sums of exact products,
// in another order; the instruction flushes denormal inputs to zero, which moves a sum by less than 2^-126 a
// term.
#define GEMMAKIT_BF16 __attribute__((target("avx512f,avx512bw,avx512vnni,avx512bf16")))

bool avx512_bf16() { return avx512_vnni() && __builtin_cpu_supports("avx512bf16"); }

template <int M, int J>
GEMMAKIT_BF16 void tile512_bf16(const uint16_t* x, const uint16_t* w, int64_t k, float* out, int64_t ldy,
                                const char* next) {
  __m512 acc[M][J];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  constexpr int kLines = (kTileW * 32 * 2 + 63) / 64;  // the next group's rows, and L2's, as in tile512
  for (; i + 32 <= k; i += 32) {
    if (next != nullptr)
      for (int l = 0; l < kLines; ++l) {
        _mm_prefetch(next + i * kTileW * 2 + l * 64, _MM_HINT_T0);
        _mm_prefetch(next + kPrefetchL2 * kTileW * k * 2 + i * kTileW * 2 + l * 64, _MM_HINT_T1);
      }
    __m512bh wv[J];
    for (int j = 0; j < J; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * k + i);
    for (int r = 0; r < M; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k + i);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) {
      float d = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t t = i; t < k; ++t) d += widen1(w[j * k + t]) * widen1(x[r * k + t]);
      out[r * ldy + j] = d;
    }
}

// tile<W, M, J> for M in 1..kTileX and J in 1..kTileW, as a table indexed [M - 1][J - 1]; tile512's likewise.
template <typename W>
using Tile = void (*)(const float*, const W*, int64_t, float*, int64_t, const char*);
template <typename W>
constexpr Tile<W> kFloatTiles[kTileX][kTileW] = {
    {tile<W, 1, 1>, tile<W, 1, 2>, tile<W, 1, 3>}, {tile<W, 2, 1>, tile<W, 2, 2>, tile<W, 2, 3>},
    {tile<W, 3, 1>, tile<W, 3, 2>, tile<W, 3, 3>}, {tile<W, 4, 1>, tile<W, 4, 2>, tile<W, 4, 3>}};
template <typename W>
constexpr Tile<W> kFloatTiles512[kTileX512][kTileW] = {
    {tile512<W, 1, 1>, tile512<W, 1, 2>, tile512<W, 1, 3>}, {tile512<W, 2, 1>, tile512<W, 2, 2>, tile512<W, 2, 3>},
    {tile512<W, 3, 1>, tile512<W, 3, 2>, tile512<W, 3, 3>}, {tile512<W, 4, 1>, tile512<W, 4, 2>, tile512<W, 4, 3>},
    {tile512<W, 5, 1>, tile512<W, 5, 2>, tile512<W, 5, 3>}, {tile512<W, 6, 1>, tile512<W, 6, 2>, tile512<W, 6, 3>},
    {tile512<W, 7, 1>, tile512<W, 7, 2>, tile512<W, 7, 3>}, {tile512<W, 8, 1>, tile512<W, 8, 2>, tile512<W, 8, 3>}};

using Bf16Tile = void (*)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, const char*);
constexpr Bf16Tile kBf16Tiles[kTileX512][kTileW] = {
    {tile512_bf16<1, 1>, tile512_bf16<1, 2>, tile512_bf16<1, 3>},
    {tile512_bf16<2, 1>, tile512_bf16<2, 2>, tile512_bf16<2, 3>},
    {tile512_bf16<3, 1>, tile512_bf16<3, 2>, tile512_bf16<3, 3>},
    {tile512_bf16<4, 1>, tile512_bf16<4, 2>, tile512_bf16<4, 3>},
    {tile512_bf16<5, 1>, tile512_bf16<5, 2>, tile512_bf16<5, 3>},
    {tile512_bf16<6, 1>, tile512_bf16<6, 2>, tile512_bf16<6, 3>},
    {tile512_bf16<7, 1>, tile512_bf16<7, 2>, tile512_bf16<7, 3>},
    {tile512_bf16<8, 1>, tile512_bf16<8, 2>, tile512_bf16<8, 3>}};

// Walks an [m, n] product of weight w [n, k] in tiles, in parallel over groups of kTileW weight rows, calling
// fn(j0, cols, r0, rows, next) for weight rows j0.. and rows r0.. of x, up to tile_x rows of x a call. `next`
// is the following group's first weight row on a group's first pass (for its prefetches: x86 prefetches never
// fault, so the last group's may run past the weight's end), else null.
template <typename W, typename Fn>
void for_each_tile(const W* w, int64_t m, int64_t n, int64_t k, int64_t tile_x, Fn&& fn) {
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

// y [m, n] = x [m, k] . (w [n, k] * scale(row))^T, fp32. One row of x: eight weight rows at a time (rows8,
// bound by memory in either build); several: tiles, kTileW weight rows at a time against every row of x.
template <typename W, typename Scale>
void gemv_into(const float* xp, const W* wp, int64_t m, int64_t n, int64_t k, float* yp, Scale scale,
               bool wide) {
  if (m == 0 || n == 0) return;  // the one-row path below would write a row that is not there
  if (m > 1) {
    const int64_t tile_x = wide ? kTileX512 : kTileX;
    for_each_tile(wp, m, n, k, tile_x, [&](int64_t j0, int64_t cols, int64_t r0, int64_t rows, const char* next) {
      float* out = yp + r0 * n + j0;
      (wide ? kFloatTiles512<W> : kFloatTiles<W>)[rows - 1][cols - 1](xp + r0 * k, wp + j0 * k, k, out, n, next);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) out[r * n + j] *= scale(j0 + j);
    });
    return;
  }
  const int64_t bytes = k * static_cast<int64_t>(sizeof(W));
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes * kRows8, 1));  // in row groups
  at::parallel_for(0, (n + kRows8 - 1) / kRows8, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * kRows8;
      if (row + kRows8 <= n) {
        rows8(xp, wp + row * k, k, yp + row);
      } else {
        for (int64_t j = row; j < n; ++j) tile<W, 1, 1>(xp, wp + j * k, k, yp + j, n, nullptr);
      }
      for (int64_t j = row; j < std::min<int64_t>(row + kRows8, n); ++j) yp[j] *= scale(j);
    }
  });
}

// x [M, K] fp32 against int8 codes q [N, K] with a bf16 or fp32 scale per row (int8_gemv, int8_grid).
void check_int8_operands(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == x.size(1),
              "q: contiguous int8 [N, K]");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == q.size(0), "scales: [N]");
  TORCH_CHECK(scales.is_contiguous() && (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16),
              "scales: contiguous fp32 or bf16");
}

// int8: one scale per row, bf16 or fp32; bf16 scales are read in place (a bf16 is the top half of an fp32),
// since converting them would be an op per call.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, bool wide) {
  check_int8_operands(x, q, scales);
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(!wide || avx512_vnni(), "int8_gemv: the AVX-512 pass asked on a CPU without AVX-512 VNNI");
  auto y = at::empty({m, n}, x.options());
  if (scales.scalar_type() == at::kBFloat16) {
    const auto* sv = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
    gemv_into(x.data_ptr<float>(), q.data_ptr<int8_t>(), m, n, k, y.data_ptr<float>(),
              [sv](int64_t row) { return widen1(sv[row]); }, wide);
  } else {
    const float* sv = scales.data_ptr<float>();
    gemv_into(x.data_ptr<float>(), q.data_ptr<int8_t>(), m, n, k, y.data_ptr<float>(),
              [sv](int64_t row) { return sv[row]; }, wide);
  }
  return y;
}

// fp32 / bf16: the model's own weights (no copy); sums are fp32, and a bf16 output is rounded once at the end,
// as torch's bf16 product rounds it.
at::Tensor float_gemv(const at::Tensor& x, const at::Tensor& w, bool wide) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: contiguous fp32 or bf16 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) &&
              (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16), "w: contiguous fp32 or bf16 [N, K]");
  TORCH_CHECK(!wide || avx512_vnni(), "float_gemv: the AVX-512 pass asked on a CPU without AVX-512 VNNI");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  // bf16 x is widened and a bf16 out rounded here, in plain loops: a decode step makes over a hundred of these
  // calls, and two dispatched conversions per call cost more than the loops.
  const bool half = x.scalar_type() == at::kBFloat16;
  static const bool bf16_dot = avx512_bf16();
  // bf16 x by bf16 weights at several rows, on AVX512_BF16: the pairs are multiplied as they are (no widened x).
  const bool pairs = half && wide && m > 1 && w.scalar_type() == at::kBFloat16 && bf16_dot;
  std::vector<float> xbuf(half && !pairs ? m * k : 0), ybuf(half ? m * n : 0);
  if (half && !pairs) {
    const auto* xs = x.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < m * k; ++i) xbuf[i] = static_cast<float>(xs[i]);
  }
  auto y = at::empty({m, n}, x.options());
  float* yp = half ? ybuf.data() : y.data_ptr<float>();
  if (pairs) {
    const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const auto* ws = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    for_each_tile(ws, m, n, k, kTileX512, [&](int64_t j0, int64_t cols, int64_t r0, int64_t rows, const char* next) {
      kBf16Tiles[rows - 1][cols - 1](xs + r0 * k, ws + j0 * k, k, yp + r0 * n + j0, n, next);
    });
  } else {
    const float* xp = half ? xbuf.data() : x.data_ptr<float>();
    const auto one = [](int64_t) { return 1.0f; };
    if (w.scalar_type() == at::kFloat)
      gemv_into(xp, w.data_ptr<float>(), m, n, k, yp, one, wide);
    else
      gemv_into(xp, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), m, n, k, yp, one, wide);
  }
  if (half) {
    auto* ys = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < m * n; ++i) ys[i] = at::BFloat16(ybuf[i]);  // round to nearest even, as torch does
  }
  return y;
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// Screening products (runtime/screen.py): int8 codes against x rounded to 14-bit integers, summed exactly in
// int32 by multiply-add pairs of 16-bit lanes, twice the multiply-adds an instruction of fp32 FMA (a screen's
// many-row pass over the head is bound by them). The sums are exact while 127 * max|x16| * K < 2^31, which
// the caller keeps (gemv.screen_int8). out = float(sum) * x_scale[r] * scales[j].
// Several rows of x: tiles as the float kernels' (tile), int32 accumulators; a 16-bit vector holds 16 values.
// Unlike an FMA, a multiply-add of pairs needs a register for its result before the add: 4 x 3 accumulators
// no longer fit beside it, and the compiler kept seven of them on the stack (a store and a load each, every
// step). From 4 rows of x the pass takes one weight row against up to kScreenX rows of x instead (kScreenX + 3
// registers): the same multiply-adds, a load of x for each, and a widened code serving every row of x.
constexpr int kScreenX = 8;
// The grid's top for x in int8_grid, as gemv.screen_int8's: AMX's split of x~ into two signed bytes holds 14 bits.
constexpr int64_t kGridTop = 8191;
template <int M, int J>
void int16_tile(const int16_t* x, const int8_t* q, int64_t k, int32_t* dots, int64_t ldy, const char* next) {
  __m256i acc[M][J];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    if (next != nullptr) _mm_prefetch(next + i * kTileW, _MM_HINT_T0);
    __m256i w[J];
    for (int j = 0; j < J; ++j)
      w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * k + i)));
    for (int r = 0; r < M; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * k + i));
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(w[j], xv));
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) {
      int32_t d = hsum_i32(acc[r][j]);
      for (int64_t t = i; t < k; ++t) d += static_cast<int32_t>(q[j * k + t]) * x[r * k + t];
      dots[r * ldy + j] = d;
    }
}

// One row of x against kRows8 weight rows at once (rows r..r+7 of q): each load of x serves eight rows, and
// eight streams of cold codes are in flight, with the next block's rows asked into L1 and those two blocks on
// into L2, as in rows8.
void int16_rows8(const int16_t* x, const int8_t* q, int64_t k, int32_t* dots) {
  __m256i acc[kRows8];
  for (int j = 0; j < kRows8; ++j) acc[j] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const char* next = reinterpret_cast<const char*>(q + kRows8 * k) + i * kRows8;
    const char* later = next + kPrefetchL2Blocks * kRows8 * k;
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + 64, _MM_HINT_T0);
    _mm_prefetch(later, _MM_HINT_T1);
    _mm_prefetch(later + 64, _MM_HINT_T1);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    for (int j = 0; j < kRows8; ++j) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * k + i)));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(w, xv));
    }
  }
  for (int j = 0; j < kRows8; ++j) {
    int32_t d = hsum_i32(acc[j]);
    for (int64_t t = i; t < k; ++t) d += static_cast<int32_t>(q[j * k + t]) * x[t];
    dots[j] = d;
  }
}

// The same tiles with AVX-512 VNNI (`wide`, see tile512): one instruction multiplies and accumulates 32 pairs
// of 16-bit lanes where AVX2 takes two instructions for 16.
template <int M, int J>
GEMMAKIT_VNNI void int16_tile512(const int16_t* x, const int8_t* q, int64_t k, int32_t* dots, int64_t ldy,
                                 const char* next) {
  __m512i acc[M][J];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    if (next != nullptr) {  // the next tile's kTileW rows, 32 codes each a step: two lines
      _mm_prefetch(next + i * kTileW, _MM_HINT_T0);
      _mm_prefetch(next + i * kTileW + 64, _MM_HINT_T0);
    }
    __m512i w[J];
    for (int j = 0; j < J; ++j)
      w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * k + i)));
    for (int r = 0; r < M; ++r) {
      const __m512i xv = in_register(_mm512_loadu_si512(x + r * k + i));
      for (int j = 0; j < J; ++j) dpwssd(acc[r][j], w[j], xv);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < J; ++j) {
      int32_t d = _mm512_reduce_add_epi32(acc[r][j]);
      for (int64_t t = i; t < k; ++t) d += static_cast<int32_t>(q[j * k + t]) * x[r * k + t];
      dots[r * ldy + j] = d;
    }
}

// Where a pass's sums go: out[r, j] = sum * x_scale[r] * scale[j], plus, where the caller passes them, the
// screen's bound (runtime/screen.py): coef[r, 0] * norms[0, j] + coef[r, 1] * norms[1, j], per-row coefficients
// times per-token norms. Adding it here, as each sum is written, spares the caller passes over [M, N] floats,
// which in an eager 8-row step took as long as the pass itself.
struct ScreenOut {
  const float* xs;
  const float* ws;
  const float* coef;  // [M, 2], or null: no bound
  const float* norms;  // [2, N]
  float* y;
  int64_t n;

  float value(int64_t r, int64_t j, int32_t sum) const {
    const float v = static_cast<float>(sum) * xs[r] * ws[j];
    return coef == nullptr ? v : v + (coef[2 * r] * norms[j] + coef[2 * r + 1] * norms[n + j]);
  }
  void put(int64_t r, int64_t j, int32_t sum) const { y[r * n + j] = value(r, j, sum); }
  // Row r's sums for the eight tokens j0..j0+7 at once: value() on 8 lanes, one store.
  void put8(int64_t r, int64_t j0, __m256i sums) const {
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(xs[r])), _mm256_loadu_ps(ws + j0));
    if (coef != nullptr) {
      const __m256 second = _mm256_mul_ps(_mm256_set1_ps(coef[2 * r + 1]), _mm256_loadu_ps(norms + n + j0));
      v = _mm256_add_ps(v, _mm256_fmadd_ps(_mm256_set1_ps(coef[2 * r]), _mm256_loadu_ps(norms + j0), second));
    }
    _mm256_storeu_ps(y + r * n + j0, v);
  }
};

// Each of M rows of x has eight vectors of partial sums, one per weight row of a block (parts[j][r]): they fold
// into one vector of the eight sums (horizontal adds, a tree) that put8 scales and stores.
template <int M>
void fold8(const int32_t (*parts)[M][8], const ScreenOut& out, int64_t r0, int64_t j0) {
  for (int r = 0; r < M; ++r) {
    __m256i v[kRows8];
    for (int j = 0; j < kRows8; ++j) v[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(parts[j][r]));
    // hadd sums neighbours within each 128-bit half: two rounds leave, per half, one partial sum of each of
    // four rows j; the halves' partials then add across.
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    const __m256i low = _mm256_permute2x128_si256(a, b, 0x20), high = _mm256_permute2x128_si256(a, b, 0x31);
    out.put8(r0 + r, j0, _mm256_add_epi32(low, high));
  }
}

// The AVX2 pass from kBlockFrom rows of x where AMX does not take them: eight weight rows a block, each against all M
// rows of x (one widened code serves them all, as in int16_tile<M, 1>), its M vectors of partial sums parked in
// L1; then each row of x's eight vectors fold into one vector of eight sums (horizontal adds, a tree) that put8
// scales and stores. At K = 640 a row's 40 steps of multiply-adds are few enough that folding and writing its
// sums one at a time weighed on the pass; with the tree, 6 to 8 rows of x outran both the AVX2 columns and the
// AVX-512 VNNI tiles on CPU A (Zen 4, whose 512-bit multiply-adds take two 256-bit halves), 2 to 4 did not, and 5
// came out either way (docs/performance.md, "The screen's pass at batch rows").
constexpr int kBlockFrom = 6;
template <int M>
void int16_block8(const int16_t* x, const int8_t* q, int64_t k, const ScreenOut& out, int64_t r0, int64_t j0) {
  alignas(32) int32_t parts[kRows8][M][8];
  for (int j = 0; j < kRows8; ++j) {
    const int8_t* row = q + j * k;
    __m256i acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      // The next block's row j, a line every four steps: its rows are as far ahead as this block is long.
      if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kRows8 * k + i), _MM_HINT_T0);
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      for (int r = 0; r < M; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * k + i));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w, xv));
      }
    }
    if (i < k) {  // K's tail past a multiple of 16 goes into lane 0
      for (int r = 0; r < M; ++r) {
        int32_t tail = 0;
        for (int64_t t = i; t < k; ++t) tail += static_cast<int32_t>(row[t]) * x[r * k + t];
        acc[r] = _mm256_add_epi32(acc[r], _mm256_setr_epi32(tail, 0, 0, 0, 0, 0, 0, 0));
      }
    }
    for (int r = 0; r < M; ++r) _mm256_store_si256(reinterpret_cast<__m256i*>(parts[j][r]), acc[r]);
  }
  fold8<M>(parts, out, r0, j0);
}

// The same block with AVX-512 VNNI (`wide`), from 2 rows of x: two weight rows at a time against every row of x,
// so each vector of x, loaded once into a register (in_register), serves two multiply-adds, and one instruction
// multiplies and accumulates 32 pairs. With one weight row a step (int16_block8) a load of x fed each multiply-add,
// and the loads, not the multiply-adds, bound the pass; with two the block outruns the VNNI tiles at 2 to 8 rows
// (docs/performance.md, "Loads of x in the AVX-512 tiles"). 2M accumulators, two weight vectors and one of x fit
// AVX-512's 32 registers.
template <int M>
GEMMAKIT_VNNI void int16_block8_512(const int16_t* x, const int16_t* xs, const int8_t* q, int64_t k,
                                   const ScreenOut& out, int64_t r0, int64_t j0) {
  alignas(32) int32_t parts[kRows8][M][8];
  const int64_t l2 = kPrefetchL2 * kRows8 * k;  // as far ahead as the tiles ask for lines into L2
  for (int j = 0; j < kRows8; j += 2) {
    const int8_t* row = q + j * k;
    __m512i a[M], b[M];
    #pragma GCC unroll 8
    for (int r = 0; r < M; ++r) a[r] = b[r] = _mm512_setzero_si512();
    int64_t i = 0;
    // The next block's same rows into L1 and those further on into L2, a line a row every step (each line is
    // asked twice; a branch to ask once cost more). The step is written out here: kept in a function taking the
    // accumulators by reference, with the asm multiply-adds, GCC kept them on the stack.
    for (; i + 32 <= k; i += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + kRows8 * k + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + (kRows8 + 1) * k + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + l2 + i), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(row + l2 + k + i), _MM_HINT_T1);
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + i)));
      #pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512i xv = in_register(_mm512_loadu_si512(xs + i * M + r * 32));
        dpwssd(a[r], w0, xv);
        dpwssd(b[r], w1, xv);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {  // 16 lanes to 8, then K's tail past a multiple of 32 into lane 0
      __m256i lo = _mm256_add_epi32(_mm512_castsi512_si256(a[r]), _mm512_extracti64x4_epi64(a[r], 1));
      __m256i hi = _mm256_add_epi32(_mm512_castsi512_si256(b[r]), _mm512_extracti64x4_epi64(b[r], 1));
      if (i < k) {
        int32_t t0 = 0, t1 = 0;
        for (int64_t t = i; t < k; ++t) {
          t0 += static_cast<int32_t>(row[t]) * x[r * k + t];
          t1 += static_cast<int32_t>(row[k + t]) * x[r * k + t];
        }
        lo = _mm256_add_epi32(lo, _mm256_setr_epi32(t0, 0, 0, 0, 0, 0, 0, 0));
        hi = _mm256_add_epi32(hi, _mm256_setr_epi32(t1, 0, 0, 0, 0, 0, 0, 0));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[j][r]), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[j + 1][r]), hi);
    }
  }
  fold8<M>(parts, out, r0, j0);
}

// The screen's pass with x on an 8-bit grid (gemv.screen_int8, bits = 8: a batch step's rows where the CPU has
// AVX-512 VNNI and no AMX). One instruction multiplies and accumulates 64 byte products where 16-bit pairs take
// 32, and the codes need no widening, so at 8 rows the pass is bound by reading the codes, where the 16-bit one
// was bound by its multiply-adds. The instruction takes unsigned bytes: x + 128 is, and each row of codes' own
// product with 128 (one more multiply-add a code vector, against one a row of x) comes off each lane's sum, so
// the sums are the same exact int32 sums of x and the codes (|x| <= 127: exact up to K = 2^16).
// The rows are cold, and the multiply-adds too few to hide their latency: lines are asked into L1 two blocks
// ahead and into L2 eight blocks ahead (the pass at 8 rows on CPU A went from the 16-bit pass's time to about
// that of reading the codes alone; docs/performance.md, "The screen's batch rows on bytes").
constexpr int64_t kBytesStep = 64, kBytesL1 = 2 * kRows8, kBytesL2 = 8 * kRows8;

// A block of eight weight rows against M rows of x, two weight rows at a time, folded and written as
// int16_block8_512's. x: the rows as signed bytes (for K's tail past a multiple of 64); xs: the same rows plus
// 128, laid out [K / 64][M][64].
template <int M>
GEMMAKIT_VNNI void byte_block8(const int8_t* x, const uint8_t* xs, const int8_t* q, int64_t k, const ScreenOut& out,
                               int64_t r0, int64_t j0) {
  alignas(32) int32_t parts[kRows8][M][8];
  for (int j = 0; j < kRows8; j += 2) {
    const int8_t* row = q + j * k;
    __m512i a[M], b[M], ca = _mm512_setzero_si512(), cb = _mm512_setzero_si512();
    #pragma GCC unroll 8
    for (int r = 0; r < M; ++r) a[r] = b[r] = _mm512_setzero_si512();
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(128));
    int64_t i = 0;
    for (; i + kBytesStep <= k; i += kBytesStep) {
      _mm_prefetch(reinterpret_cast<const char*>(row + kBytesL1 * k + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + (kBytesL1 + 1) * k + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + kBytesL2 * k + i), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(row + (kBytesL2 + 1) * k + i), _MM_HINT_T1);
      const __m512i w0 = in_register(_mm512_loadu_si512(row + i)), w1 = in_register(_mm512_loadu_si512(row + k + i));
      dpbusd(ca, offset, w0);  // what the offset adds to each row's sums
      dpbusd(cb, offset, w1);
      #pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512i xv = in_register(_mm512_loadu_si512(xs + i * M + r * kBytesStep));
        dpbusd(a[r], xv, w0);
        dpbusd(b[r], xv, w1);
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {  // less the offset's share, 16 lanes to 8, then K's tail into lane 0
      const __m512i da = _mm512_sub_epi32(a[r], ca), db = _mm512_sub_epi32(b[r], cb);
      __m256i lo = _mm256_add_epi32(_mm512_castsi512_si256(da), _mm512_extracti64x4_epi64(da, 1));
      __m256i hi = _mm256_add_epi32(_mm512_castsi512_si256(db), _mm512_extracti64x4_epi64(db, 1));
      if (i < k) {
        int32_t t0 = 0, t1 = 0;
        for (int64_t t = i; t < k; ++t) {
          t0 += static_cast<int32_t>(row[t]) * x[r * k + t];
          t1 += static_cast<int32_t>(row[k + t]) * x[r * k + t];
        }
        lo = _mm256_add_epi32(lo, _mm256_setr_epi32(t0, 0, 0, 0, 0, 0, 0, 0));
        hi = _mm256_add_epi32(hi, _mm256_setr_epi32(t1, 0, 0, 0, 0, 0, 0, 0));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[j][r]), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(parts[j + 1][r]), hi);
    }
  }
  fold8<M>(parts, out, r0, j0);
}

// The byte pass over every weight row: blocks of eight in parallel, up to kScreenX rows of x a block; the last
// N % 8 weight rows one sum at a time.
void byte_pass(const int8_t* xp, const int8_t* qp, int64_t m, int64_t n, int64_t k, const ScreenOut& out) {
  using Block = void (*)(const int8_t*, const uint8_t*, const int8_t*, int64_t, const ScreenOut&, int64_t, int64_t);
  static_assert(kScreenX == 8, "kBlocks lists byte_block8<1> to byte_block8<8>");
  static constexpr Block kBlocks[kScreenX] = {byte_block8<1>, byte_block8<2>, byte_block8<3>, byte_block8<4>,
                                              byte_block8<5>, byte_block8<6>, byte_block8<7>, byte_block8<8>};
  std::vector<uint8_t> steps(m * k);  // each group of up to kScreenX rows as [K / 64][rows][64], plus 128
  for (int64_t r0 = 0; r0 < m; r0 += kScreenX) {
    const int64_t rows = std::min<int64_t>(kScreenX, m - r0);
    for (int64_t i = 0; i + kBytesStep <= k; i += kBytesStep)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < kBytesStep; ++t)
          steps[r0 * k + i * rows + r * kBytesStep + t] = static_cast<uint8_t>(xp[(r0 + r) * k + i + t] + 128);
  }
  const int64_t blocks = n / kRows8;
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k * kRows8, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r0 = 0; r0 < m; r0 += kScreenX)
        kBlocks[std::min<int64_t>(kScreenX, m - r0) - 1](xp + r0 * k, steps.data() + r0 * k, qp + b * kRows8 * k, k,
                                                          out, r0, b * kRows8);
  });
  for (int64_t j = blocks * kRows8; j < n; ++j)
    for (int64_t r = 0; r < m; ++r) {
      int32_t d = 0;
      for (int64_t t = 0; t < k; ++t) d += static_cast<int32_t>(qp[j * k + t]) * xp[r * k + t];
      out.put(r, j, d);
    }
}

// The screen's pass on AMX, where the CPU has AMX-INT8 and Linux lets the process use its tiles: one tile
// instruction multiplies 16 rows of codes by 64 inputs by 16 columns. The columns are the rows of x split in
// two signed bytes, x~ = 128 h + l (h = x~ >> 7 in [-64, 63], l = x~ & 127), so 8 rows of x fill them and
// every sum stays exact in int32; the pass is then bound by reading the codes, not by multiply-adds. Codes are
// read in place ([N, K] rows are what a tile loads, 64 inputs a row); x's parts are laid out once a call in
// the order a B tile wants (four consecutive inputs of a column together).
#define GEMMAKIT_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512dq")))
constexpr int64_t kAmxRows = 16, kAmxInputs = 64, kAmxCols = 16, kAmxXRows = kAmxCols / 2;

// GCC's tile load / store intrinsics are asm statements that do not tell the compiler they read or write
// memory: without this between writing a buffer and loading it into a tile (or storing a tile and reading the
// buffer), -O3 may drop the writes or read before the store.
inline void tiles_see_memory() { asm volatile("" ::: "memory"); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_int8() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

// B tiles of x's parts, one per 64 inputs: [K / 4, 16 columns x 4 inputs]; column c < 8 is h of row c, c >= 8
// is l of row c - 8; rows of x past m are zero.
std::vector<int8_t> amx_parts(const int16_t* x, int64_t m, int64_t k) {
  std::vector<int8_t> parts(k * kAmxCols, 0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c = 0; c < kAmxCols; ++c) {
      const int64_t row = c % kAmxXRows;
      if (row >= m) continue;
      const int16_t v = x[row * k + i];
      parts[(i / 4) * kAmxCols * 4 + c * 4 + i % 4] = static_cast<int8_t>(c < kAmxXRows ? v >> 7 : v & 127);
    }
  return parts;
}

// y[r, row] for G blocks of 16 code rows from row0: tiles 0..G-1 accumulate, 4 and 5 take codes, 6 x's parts.
template <int G>
GEMMAKIT_AMX void amx_blocks(const int8_t* q, int64_t k, const int8_t* parts, int64_t row0, int64_t m,
                             const ScreenOut& out) {
  _tile_zero(0);
  if constexpr (G == 4) {
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int8_t* rows = q + row0 * k;
  tiles_see_memory();
  for (int64_t i = 0; i < k; i += kAmxInputs) {
    _tile_loadd(6, parts + i * kAmxCols, kAmxCols * 4);
    _tile_loadd(4, rows + i, k);
    _tile_dpbssd(0, 4, 6);
    if constexpr (G == 4) {
      _tile_loadd(5, rows + 16 * k + i, k);
      _tile_dpbssd(1, 5, 6);
      _tile_loadd(4, rows + 32 * k + i, k);
      _tile_dpbssd(2, 4, 6);
      _tile_loadd(5, rows + 48 * k + i, k);
      _tile_dpbssd(3, 5, 6);
    }
  }
  alignas(64) int32_t sums[4][kAmxRows * kAmxCols];
  _tile_stored(0, sums[0], kAmxCols * 4);
  if constexpr (G == 4) {
    _tile_stored(1, sums[1], kAmxCols * 4);
    _tile_stored(2, sums[2], kAmxCols * 4);
    _tile_stored(3, sums[3], kAmxCols * 4);
  }
  tiles_see_memory();
  // Row r of x's sums for the block's 16 code rows are column r (h) and column 8 + r (l) of the tile: gathered,
  // combined in double (128 h + l is exact there, then rounded once to fp32, as the other passes' int32 sum),
  // scaled and stored as 16 contiguous outputs.
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(kAmxCols));
  for (int g = 0; g < G; ++g) {
    const int64_t first = row0 + g * kAmxRows;
    const __m512 scales = _mm512_loadu_ps(out.ws + first);
    for (int64_t r = 0; r < m; ++r) {
      const __m512i h = _mm512_i32gather_epi32(column, sums[g] + r, 4);
      const __m512i l = _mm512_i32gather_epi32(column, sums[g] + kAmxXRows + r, 4);
      const __m512d scale = _mm512_set1_pd(128.0);
      const __m512d low = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)), scale,
                                          _mm512_cvtepi32_pd(_mm512_castsi512_si256(l)));
      const __m512d high = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)), scale,
                                           _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)));
      const __m512 sum = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(low)), _mm512_cvtpd_ps(high), 1);
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(out.xs[r])), scales);
      if (out.coef != nullptr)
        v = _mm512_add_ps(v, _mm512_fmadd_ps(_mm512_set1_ps(out.coef[2 * r]), _mm512_loadu_ps(out.norms + first),
                                             _mm512_mul_ps(_mm512_set1_ps(out.coef[2 * r + 1]),
                                                           _mm512_loadu_ps(out.norms + out.n + first))));
      _mm512_storeu_ps(out.y + r * out.n + first, v);
    }
  }
}

// Blocks [begin, end) of 16 code rows, on one thread (tile state is per thread: configured, then released).
GEMMAKIT_AMX void amx_range(const int8_t* q, int64_t k, const int8_t* parts, int64_t begin, int64_t end, int64_t m,
                            const ScreenOut& out) {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {  // 16 rows of 64 bytes each: int32 sums [16, 16], codes [16, 64], parts
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  tiles_see_memory();
  _tile_loadconfig(&cfg);
  int64_t b = begin;
  for (; b + 4 <= end; b += 4) amx_blocks<4>(q, k, parts, b * kAmxRows, m, out);
  for (; b < end; ++b) amx_blocks<1>(q, k, parts, b * kAmxRows, m, out);
  _tile_release();
}

// Rows [0, n / 16 * 16) of the screen's pass for up to 8 rows of x, K a multiple of 64; returns where it ended.
int64_t amx_screen(const int16_t* x, int64_t m, const int8_t* q, int64_t k, const ScreenOut& out) {
  const std::vector<int8_t> parts = amx_parts(x, m, k);
  const int64_t blocks = out.n / kAmxRows;
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    amx_range(q, k, parts.data(), begin, end, m, out);
  });
  return blocks * kAmxRows;
}

// The screen's pass over int16 x (with its scale per row in out.xs), any number of rows, written through `out`:
// the screen's (int8_screen) and the int8 layers' decode rows (int8_grid). isa: 0 the AVX2 pass, 1 AVX-512 VNNI
// tiles for several rows, 2 AMX for 2 to 8 rows where K is a multiple of 64 (the rest as 1).
void int16_pass(const int16_t* xp, const int8_t* qp, int64_t m, int64_t n, int64_t k, int64_t isa,
                const ScreenOut& out) {
  using Tile = void (*)(const int16_t*, const int8_t*, int64_t, int32_t*, int64_t, const char*);
  static constexpr Tile kTiles[kTileX - 1][kTileW] = {
      {int16_tile<1, 1>, int16_tile<1, 2>, int16_tile<1, 3>}, {int16_tile<2, 1>, int16_tile<2, 2>, int16_tile<2, 3>},
      {int16_tile<3, 1>, int16_tile<3, 2>, int16_tile<3, 3>}};
  // Columns serve kTileX to kScreenX rows of x; fewer take the tiles above.
  static_assert(kTileX == 4 && kScreenX == 8, "kColumns lists int16_tile<4, 1> to int16_tile<8, 1>");
  static constexpr Tile kColumns[kScreenX - kTileX + 1] = {int16_tile<4, 1>, int16_tile<5, 1>, int16_tile<6, 1>,
                                                           int16_tile<7, 1>, int16_tile<8, 1>};
  static constexpr Tile kTiles512[kTileX512][kTileW] = {
      {int16_tile512<1, 1>, int16_tile512<1, 2>, int16_tile512<1, 3>},
      {int16_tile512<2, 1>, int16_tile512<2, 2>, int16_tile512<2, 3>},
      {int16_tile512<3, 1>, int16_tile512<3, 2>, int16_tile512<3, 3>},
      {int16_tile512<4, 1>, int16_tile512<4, 2>, int16_tile512<4, 3>},
      {int16_tile512<5, 1>, int16_tile512<5, 2>, int16_tile512<5, 3>},
      {int16_tile512<6, 1>, int16_tile512<6, 2>, int16_tile512<6, 3>},
      {int16_tile512<7, 1>, int16_tile512<7, 2>, int16_tile512<7, 3>},
      {int16_tile512<8, 1>, int16_tile512<8, 2>, int16_tile512<8, 3>}};
  int64_t from = 0;  // rows of q before this are done
  // One row is bound by reading the codes on either path, and the AVX2 one reads them a little faster.
  if (isa == 2 && m > 1 && m <= kAmxXRows && k % kAmxInputs == 0) from = amx_screen(xp, m, qp, k, out);
  if (m == 1 && from == 0) {
    at::parallel_for(0, (n + kRows8 - 1) / kRows8, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k * kRows8, 1)),
                     [&](int64_t begin, int64_t end) {
      int32_t dots[kRows8];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = b * kRows8;
        if (row + kRows8 <= n) {
          int16_rows8(xp, qp + row * k, k, dots);
          for (int j = 0; j < kRows8; ++j) out.put(0, row + j, dots[j]);
        } else {
          for (int64_t j = row; j < n; ++j) {
            int16_tile<1, 1>(xp, qp + j * k, k, dots, 1, nullptr);
            out.put(0, j, dots[0]);
          }
        }
      }
    });
    return;
  }
  const bool wide = isa > 0;
  static_assert(kScreenX == kTileX512, "one tile of x rows on either path");
  // Rows r0.. of x (up to a tile's) against weight rows j0.. (up to kTileW): their sums, written.
  const auto tile = [&](int64_t j0, int64_t cols, int64_t r0, int64_t rows, const char* next) {
    int32_t dots[kTileX512 * kTileW];
    if (wide || rows < kTileX) {
      (wide ? kTiles512 : kTiles)[rows - 1][cols - 1](xp + r0 * k, qp + j0 * k, k, dots, kTileW, next);
    } else {  // the first column's pass prefetches the next tile's rows, as the tile's would
      for (int64_t j = 0; j < cols; ++j)
        kColumns[rows - kTileX](xp + r0 * k, qp + (j0 + j) * k, k, dots + j, kTileW, j == 0 ? next : nullptr);
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) out.put(r0 + r, j0 + j, dots[r * kTileW + j]);
  };
  const int64_t block_from = wide ? 2 : kBlockFrom;  // the wide block outruns the VNNI tiles from 2 rows
  if (m >= block_from) {  // whole blocks of eight weight rows (past AMX's); the last few take the tiles below
    using Block = void (*)(const int16_t*, const int8_t*, int64_t, const ScreenOut&, int64_t, int64_t);
    static_assert(kBlockFrom == 6 && kScreenX == 8, "kBlocks lists int16_block8<6> to int16_block8<8>");
    static constexpr Block kBlocks[kScreenX - kBlockFrom + 1] = {int16_block8<6>, int16_block8<7>, int16_block8<8>};
    using Block512 = void (*)(const int16_t*, const int16_t*, const int8_t*, int64_t, const ScreenOut&, int64_t,
                              int64_t);
    static constexpr Block512 kBlocks512[kScreenX] = {
        int16_block8_512<1>, int16_block8_512<2>, int16_block8_512<3>, int16_block8_512<4>,
        int16_block8_512<5>, int16_block8_512<6>, int16_block8_512<7>, int16_block8_512<8>};
    // x for the wide blocks, each group of up to kScreenX rows as [K / 32][rows][32]: a step's inputs of every
    // row together, at fixed offsets from one pointer (eight pointers into x cost the loop its registers).
    std::vector<int16_t> steps(wide ? m * k : 0);
    for (int64_t r0 = 0; wide && r0 < m; r0 += kScreenX) {
      const int64_t rows = std::min<int64_t>(kScreenX, m - r0);
      for (int64_t i = 0; i + 32 <= k; i += 32)
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(&steps[r0 * k + i * rows + r * 32], xp + (r0 + r) * k + i, 32 * sizeof(int16_t));
    }
    const int64_t blocks = (n - from) / kRows8;
    at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(k * kRows8, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t j0 = from + b * kRows8;
        for (int64_t r0 = 0; r0 < m; r0 += kScreenX) {
          const int64_t rows = std::min<int64_t>(kScreenX, m - r0);
          if (rows >= block_from && wide) {
            kBlocks512[rows - 1](xp + r0 * k, steps.data() + r0 * k, qp + j0 * k, k, out, r0, j0);
          } else if (rows >= block_from) {
            kBlocks[rows - kBlockFrom](xp + r0 * k, qp + j0 * k, k, out, r0, j0);
          } else {  // a batch past kScreenX rows: its last few rows of x against the block, as tiles
            for (int64_t j = 0; j < kRows8; j += kTileW)
              tile(j0 + j, std::min<int64_t>(kTileW, kRows8 - j), r0, rows, nullptr);
          }
        }
      }
    });
    from += blocks * kRows8;
    if (from == n) return;
  }
  for_each_tile(qp + from * k, m, n - from, k, kTileX512,
                [&](int64_t j0, int64_t cols, int64_t r0, int64_t rows, const char* next) {
    tile(from + j0, cols, r0, rows, next);
  });
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= 2, "isa is 0 (AVX2), 1 (AVX-512 VNNI) or 2 (AMX)");
  TORCH_CHECK(isa == 0 || avx512_vnni(), "an AVX-512 pass asked on a CPU without AVX-512 VNNI");
  TORCH_CHECK(isa < 2 || amx_int8(), "the AMX pass asked where AMX-INT8 tiles are not available");
}

// x: the rows rounded onto the screen's grid, int16 (14 bits: the 16-bit passes, by isa) or int8 (8 bits: the
// byte pass, which needs AVX-512 VNNI), with a scale per row; out as ScreenOut says.
at::Tensor int8_screen(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& q,
                       const at::Tensor& scales, int64_t isa, const at::Tensor& coef, const at::Tensor& norms) {
  const bool bytes = xq.scalar_type() == at::kChar;
  TORCH_CHECK(xq.dim() == 2 && (bytes || xq.scalar_type() == at::kShort) && xq.is_contiguous(),
              "xq: contiguous int16 or int8 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == xq.size(1),
              "q: contiguous int8 [N, K]");
  const int64_t m = xq.size(0), k = xq.size(1), n = q.size(0);
  TORCH_CHECK(x_scale.dim() == 1 && x_scale.size(0) == m && x_scale.scalar_type() == at::kFloat &&
              x_scale.is_contiguous(), "x_scale: contiguous fp32 [M]");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales: contiguous fp32 [N]");
  check_isa(isa);
  TORCH_CHECK(!bytes || (isa >= 1 && k <= (int64_t{1} << 16)),
              "int8 x takes the byte pass: AVX-512 VNNI (isa 1 or 2) and K up to 2^16, where its sums are exact");
  const bool bound = coef.numel() > 0;
  TORCH_CHECK(!bound || (coef.dim() == 2 && coef.size(0) == m && coef.size(1) == 2 &&
                         coef.scalar_type() == at::kFloat && coef.is_contiguous()),
              "coef: contiguous fp32 [M, 2], or empty for no bound");
  TORCH_CHECK(!bound || (norms.dim() == 2 && norms.size(0) == 2 && norms.size(1) == n &&
                         norms.scalar_type() == at::kFloat && norms.is_contiguous()), "norms: contiguous fp32 [2, N]");
  auto y = at::empty({m, n}, xq.options().dtype(at::kFloat));
  const ScreenOut out{x_scale.data_ptr<float>(), scales.data_ptr<float>(), bound ? coef.data_ptr<float>() : nullptr,
                      bound ? norms.data_ptr<float>() : nullptr, y.data_ptr<float>(), n};
  if (bytes)
    byte_pass(xq.data_ptr<int8_t>(), q.data_ptr<int8_t>(), m, n, k, out);
  else
    int16_pass(xq.data_ptr<int16_t>(), q.data_ptr<int8_t>(), m, n, k, isa, out);
  return y;
}

// One row of x onto the grid, as gemv.screen_int8 rounds it in torch ops (the same fp32 division and
// round-half-to-even, so the same x~): writes x16's row and returns its scale. A row holding NaN or inf gets a
// NaN scale (and zeros), so its outputs are NaN, as an fp32 product's would be. Vectorised: a step makes about a
// hundred of these calls, and a scalar division per input cost a batch step a visible share of its products.
float onto_grid(const float* x, int64_t k, float top, int16_t* out) {
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
  float most = *std::max_element(lanes, lanes + 8), bad = hsum(poison);
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

// The int8 layers' decode rows (gemv.int8_grid): each row of x rounded onto the screen's integer grid, as wide
// as keeps the int32 sums exact (the top of the grid `top` = min(8191, (2^31 - 1) / (127 K)), AMX's split of x
// into two signed bytes included), then the screen's pass with no bound. A batch step's rows are then bound by
// 16-bit multiply-adds, twice an fp32 FMA's products, where widening every code to fp32 bound them; and as the
// sums are exact, a row's products do not depend on the pass or on the rows beside it. Rounding x keeps 14 bits
// of the row's largest value where a bf16 keeps 8 of each value: on the 270M's activations it moves a product
// several times less than bf16 x (torch's int8 kernel's) on average, a little more in a row with a far larger
// outlier (benchmarks/int8_grid.py).
at::Tensor int8_grid(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t isa) {
  check_int8_operands(x, q, scales);
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(k > 0 && k <= (int64_t{1} << 20), "int8_grid: K must be 1 to 2^20");
  check_isa(isa);
  const float top = static_cast<float>(std::min<int64_t>(kGridTop, INT32_MAX / (127 * k)));
  std::vector<int16_t> x16(m * k);
  std::vector<float> xs(m);
  for (int64_t r = 0; r < m; ++r) xs[r] = onto_grid(x.data_ptr<float>() + r * k, k, top, x16.data() + r * k);
  std::vector<float> widened(scales.scalar_type() == at::kBFloat16 ? n : 0);
  const float* ws = scales.scalar_type() == at::kFloat ? scales.data_ptr<float>() : widened.data();
  if (!widened.empty()) {
    const auto* sv = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < n; ++j) widened[j] = widen1(sv[j]);
  }
  auto y = at::empty({m, n}, x.options());
  int16_pass(x16.data(), q.data_ptr<int8_t>(), m, n, k, isa, ScreenOut{xs.data(), ws, nullptr, nullptr,
                                                                       y.data_ptr<float>(), n});
  return y;
}

}  // namespace

TORCH_LIBRARY(gemmakit_avx2, lib) {
  lib.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_and_zeros, int group) -> Tensor");
  lib.def("int8_gemv(Tensor x, Tensor q, Tensor scales, bool wide) -> Tensor");
  lib.def("int8_grid(Tensor x, Tensor q, Tensor scales, int isa) -> Tensor");
  lib.def("float_gemv(Tensor x, Tensor w, bool wide) -> Tensor");
  lib.def("int8_screen(Tensor xq, Tensor x_scale, Tensor q, Tensor scales, int isa, Tensor coef, Tensor norms) -> "
          "Tensor");
  lib.def("avx512_vnni() -> bool", &avx512_vnni);
  lib.def("avx512_bf16() -> bool", &avx512_bf16);
  lib.def("amx_int8() -> bool", &amx_int8);
}

TORCH_LIBRARY_IMPL(gemmakit_avx2, CPU, lib) {
  lib.impl("int4_gemv", &int4_gemv);
  lib.impl("int8_gemv", &int8_gemv);
  lib.impl("int8_grid", &int8_grid);
  lib.impl("float_gemv", &float_gemv);
  lib.impl("int8_screen", &int8_screen);
}
