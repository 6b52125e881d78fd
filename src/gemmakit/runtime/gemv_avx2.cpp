// Decode-step products for x86 CPUs with AVX2 and FMA, int4 / int8 / fp32 / bf16 weights (runtime/gemv.py builds
// this file at run time, once per machine, and says why these kernels exist).
//
// Activations stay fp32 in int8_gemv and float_gemv: the same sum as "dequantize the weight, multiply in
// fp32", only in another order, so swapping these in for torch's kernels changes rounding, never the maths.
// int4_gemv takes x rounded per row onto the int8 layers' 14-bit grid (x~, onto_grid in tiles_avx2.h) and sums
// exactly. The passes of int8 codes on that grid (the head screen's and the int8 layers' decode rows) are in
// screen_avx2.cpp; the tiles' shapes and the AVX-512 build's target are in tiles_avx2.h.
//
// int4: torch's own CPU packing (`_convert_weight_to_int4pack_for_cpu`) as the AVX2 build lays it out, checked
// by the caller (quantize_codes.cpu_int4_block_rows == 32): rows in blocks of 32, each block [K, 16] bytes, row
// i of the block in the low nibble of byte i and row 16 + i in the high one. So one 16-byte load holds input k
// of 32 output rows, and the kernel vectorises over rows: no horizontal sums, and each group's scales and
// zeros ([K/G, N, 2] bf16, (scale, zero) interleaved) are read as 32 contiguous pairs. With x~ = s * integers,
//   y[n] = s * sum_g (scale[g,n] * sum_{k in g} q[n,k] x~[k] + (zero[g,n] - 8 scale[g,n]) * sum_{k in g} x~[k])
// int8: plain [N, K] codes with one scale per row (bf16 or fp32), vectorised along K: for one row of x eight
// weight rows at a time, so each load of x serves eight rows; for several, tiles of 3 weight rows by up to 4
// rows of x, so each widened code serves four rows of x and each load of x three weight rows.
// fp32 / bf16: the model's own weights in place, arranged as int8's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "lanes_avx2.h"
#include "tiles_avx2.h"

#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using namespace gemmakit_tiles;

constexpr int64_t kBlock = 32;  // rows per block of torch's AVX2 int4 packing

inline __m256 bf16_pairs_low(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
inline __m256 bf16_pairs_high(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m256i bytes_to_lanes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// int4 products take each row of x on the int8 layers' 14-bit grid (onto_grid: x~ = s * integers, s per row)
// and sum each group's codes against it exactly, in chunks of up to kGridChunk inputs whose sums stay under 2^24
// (15 * 8191 * 128), so that a chunk's sum is the same integer whether it is added up in int32 or in fp32. Both
// kernels below fold each chunk into y in the same fp32 operations (fold), so a row of x gets the same bits
// alone or beside other rows.
constexpr int64_t kGridChunk = 128;
// How far ahead the one-row pass asks for the codes (bytes) and its group's scale pairs (blocks): each thread
// streams its blocks one after another, and with the hardware's prefetchers alone that stream, and the scales'
// one stream per group, ran short of the memory's speed.
constexpr int64_t kCodesAhead = 2048, kPairsAhead = 2;

// The fold of one chunk's sums into 8 outputs, in grid units (the row's step s multiplies each output once,
// at the end): + (zero - 8 scale) * (the group's sum of x~) at the group's first chunk, then + scale * sums.
// scale and offset (zero - 8 scale) come from the 8 rows' bf16 (scale, zero) pairs (scales_offsets).
inline __m256 fold(__m256 out, __m256 scale, __m256 offset, __m256 sums, float group_sum, bool first) {
  if (first) out = _mm256_fmadd_ps(offset, _mm256_set1_ps(group_sum), out);
  return _mm256_fmadd_ps(scale, sums, out);
}
inline void scales_offsets(const uint16_t* pairs, __m256& scale, __m256& offset) {
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs));
  scale = bf16_pairs_low(p);
  offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, bf16_pairs_high(p));
}

// One row of x against the 32 rows of one block, with 16-bit multiply-adds: the 4-bit codes need no conversion
// to float, which bound the one-row pass by arithmetic short of the memory's speed. Inputs i and i + 1 are 32
// contiguous bytes; their qwords reordered put each 8 rows' bytes of both inputs in one 128-bit lane, where a
// byte shuffle interleaves them into 16-bit lanes (rows 0-3 | 8-11, and 4-7 | 12-15, a shuffle each) and the
// high nibble (rows 16..) is a shift away. One multiply-add against the pair (x~_i, x~_i+1) sums both inputs.
template <bool Split>
void int4_row(const int16_t* x16, float step, const float* group_sums, const uint8_t* codes, const uint16_t* sz,
              int64_t n, int64_t k, int64_t group, float* y) {
  const __m256i first = _mm256_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1,
                                         0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1);
  const __m256i second = _mm256_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1,
                                          4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1);
  const __m256i low = _mm256_set1_epi16(0x0F);
  const int64_t chunk = Split ? kGridChunk : group;  // a group of up to kGridChunk inputs: one chunk
  __m256 out[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < k / group; ++g) {
    const uint16_t* pairs = sz + (g * n) * 2;  // this block's 32 (scale, zero) pairs of group g
    const char* later = reinterpret_cast<const char*>(pairs + kPairsAhead * kBlock * 2);
    _mm_prefetch(later, _MM_HINT_T0);
    _mm_prefetch(later + 64, _MM_HINT_T0);
    for (int64_t c0 = g * group; c0 < (g + 1) * group; c0 += chunk) {
      __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
      for (int64_t i = c0; i < c0 + chunk; i += 2) {
        if ((i & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + i * 16) + kCodesAhead, _MM_HINT_T0);
        const __m256i v = _mm256_permute4x64_epi64(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * 16)), 0xD8);
        const __m256i a = _mm256_shuffle_epi8(v, first), b = _mm256_shuffle_epi8(v, second);
        const __m256i xv = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(x16 + i)));
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_and_si256(a, low), xv));
        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_and_si256(b, low), xv));
        acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_srli_epi16(a, 4), xv));
        acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_srli_epi16(b, 4), xv));
      }
      const __m256i rows[4] = {_mm256_permute2x128_si256(acc[0], acc[1], 0x20),  // rows 0-7
                               _mm256_permute2x128_si256(acc[0], acc[1], 0x31),  // 8-15
                               _mm256_permute2x128_si256(acc[2], acc[3], 0x20),  // 16-23
                               _mm256_permute2x128_si256(acc[2], acc[3], 0x31)};  // 24-31
      for (int j = 0; j < 4; ++j) {
        __m256 scale, offset;
        scales_offsets(pairs + j * 16, scale, offset);
        out[j] = fold(out[j], scale, offset, _mm256_cvtepi32_ps(rows[j]), group_sums[g],
                      !Split || c0 == g * group);
      }
    }
  }
  for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + j * 8, _mm256_mul_ps(out[j], _mm256_set1_ps(step)));
}

// M (2..kInt4Rows) rows of x against one block, x~ as fp32 integers: each code is widened to float once and
// serves every row. At several rows the multiply-adds bind the pass, and 16-bit ones did not help there: a
// batch step's products took about a third longer with them on CPU B (docs/performance.md, "int4 products on
// the grid"). A product of a code and x~ and the chunk's running sum are integers under 2^24, so these fp32
// sums are int4_row's exactly. The block is taken 16 output rows at a time, the low and high nibbles of the same
// 8 bytes (rows 8h..8h+7 and 16+8h..16+8h+7), so one load feeds 2M multiply-adds and the 2M accumulators stay
// in registers; each chunk is folded into y in memory. More rows of x take another pass over the block, by then
// in L1.
constexpr int kInt4Rows = 4;

template <int M, bool Split>
void int4_rows(const float* x, const float* steps, const float* group_sums, const uint8_t* codes,
               const uint16_t* sz, int64_t n, int64_t k, int64_t group, float* y) {
  const __m256i low = _mm256_set1_epi32(0x0F);
  const int64_t groups = k / group, chunk = Split ? kGridChunk : group;
  for (int h = 0; h < 2; ++h) {  // bytes 8h..8h+7 of each input: output rows 8h.. (low) and 16 + 8h.. (high)
    const uint8_t* slice = codes + h * 8;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c0 = g * group; c0 < (g + 1) * group; c0 += chunk) {
        __m256 acc[M][2];
        for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t i = c0; i < c0 + chunk; ++i) {
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
          __m256 scale, offset;
          scales_offsets(sz + (g * n) * 2 + j * 16, scale, offset);
          for (int r = 0; r < M; ++r) {
            float* out = y + r * n + j * 8;
            _mm256_storeu_ps(out, fold(c0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out), scale, offset,
                                       acc[r][half], group_sums[r * groups + g],
                                       !Split || c0 == g * group));
          }
        }
      }
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < 4; ++j) {
      float* out = y + r * n + j * 8;
      _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_loadu_ps(out), _mm256_set1_ps(steps[r])));
    }
}

using BlockRows = void (*)(const float*, const float*, const float*, const uint8_t*, const uint16_t*, int64_t,
                           int64_t, int64_t, float*);
constexpr BlockRows kBlockRows[2][kInt4Rows + 1] = {
    {nullptr, nullptr, int4_rows<2, false>, int4_rows<3, false>, int4_rows<4, false>},
    {nullptr, nullptr, int4_rows<2, true>, int4_rows<3, true>, int4_rows<4, true>}};

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
  // Each row onto the grid, with each group's sum of x~ (for the zero points), here rather than as tensor ops:
  // a decode step makes over a hundred of these calls, and a dispatched op per call costs more than the loops.
  // Several rows also take x~ as fp32 (int4_rows).
  const int64_t groups = k / group;
  const bool split = group > kGridChunk;  // groups of 256 take two chunks (the kernels' Split)
  std::vector<int16_t> x16(m * k);
  std::vector<float> steps(m), wide(m > 1 ? m * k : 0);
  std::vector<float> sums(m * groups);  // integers under 2^24 (8191 * 256), exact in fp32
  for (int64_t r = 0; r < m; ++r) {
    steps[r] = onto_grid(x.data_ptr<float>() + r * k, k, kGridTop, x16.data() + r * k);
    for (int64_t g = 0; g < groups; ++g)
      sums[r * groups + g] = static_cast<float>(
          std::accumulate(x16.data() + r * k + g * group, x16.data() + r * k + (g + 1) * group, int32_t{0}));
  }
  for (int64_t i = 0; i < static_cast<int64_t>(wide.size()); ++i) wide[i] = x16[i];
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const auto* zp = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = cp + b * kBlock * k / 2;
      for (int64_t r = 0; r < m; r += kInt4Rows) {  // rows of x in chunks of up to kInt4Rows
        const int64_t rows = std::min<int64_t>(kInt4Rows, m - r);
        if (rows == 1)
          (split ? int4_row<true> : int4_row<false>)(x16.data() + r * k, steps[r], sums.data() + r * groups, block,
                                                     zp + b * kBlock * 2, n, k, group, yp + r * n + b * kBlock);
        else
          kBlockRows[split][rows](wide.data() + r * k, steps.data() + r, sums.data() + r * groups, block,
                                  zp + b * kBlock * 2, n, k, group, yp + r * n + b * kBlock);
      }
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
// accumulators still fit the 16 vector registers (kRows8, tiles_avx2.h).
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
// take another pass over the same weight rows, by then in L1 (kTileX, kTileW: tiles_avx2.h).
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

// The tiles' AVX-512 build (GEMMAKIT_VNNI, kTileX512: tiles_avx2.h says when it is taken).
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

}  // namespace

TORCH_LIBRARY(gemmakit_avx2, lib) {
  lib.def("int4_gemv(Tensor x, Tensor packed, Tensor scales_and_zeros, int group) -> Tensor");
  lib.def("int8_gemv(Tensor x, Tensor q, Tensor scales, bool wide) -> Tensor");
  lib.def("float_gemv(Tensor x, Tensor w, bool wide) -> Tensor");
  lib.def("avx512_vnni() -> bool", &avx512_vnni);
  lib.def("avx512_bf16() -> bool", &avx512_bf16);
}

TORCH_LIBRARY_IMPL(gemmakit_avx2, CPU, lib) {
  lib.impl("int4_gemv", &int4_gemv);
  lib.impl("int8_gemv", &int8_gemv);
  lib.impl("float_gemv", &float_gemv);
}
