// The passes that round x onto an integer grid and sum int8 codes against it exactly, for x86 CPUs with AVX2
// (runtime/gemv.py builds this file with gemv_avx2.cpp, and says why): the head screen's (int8_screen; only
// bounds come of it, the tokens it picks are certified against exact logits, runtime/screen.py) and the int8
// layers' decode rows (int8_grid), which round x less than torch's int8 kernel, which takes x in bf16.
//
// int8_screen: a head screen's pass, int8 codes against x on a 14-bit integer grid, exact int32 sums (AVX2: from
// 4 rows of x one weight row against all of them, and from 6 in blocks of 8 weight rows whose sums are folded
// and written together; an AVX-512 VNNI build, taken only where the CPU has it, runs those blocks from 2 rows,
// two weight rows a step), with the screen's bound added as each sum is written; from 4 rows on AVX-512 VNNI, x on
// an 8-bit grid through the same blocks on bytes (byte_pass). int8_grid: the 16-bit pass with no bound, x rounded
// here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "lanes_avx2.h"
#include "tiles_avx2.h"

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
#include <vector>

namespace {

using namespace gemmakit_tiles;
using gemmakit_lanes::widen1;

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

// Two weight rows' 16-lane sums against one row of x (rows `row` and `row + k` of a block): folded to 8 lanes,
// K's tail from input i on (past the vector steps) added into lane 0, and parked in lo / hi for fold8.
template <typename X>
GEMMAKIT_VNNI __attribute__((always_inline)) inline void park_pair(__m512i a, __m512i b, const int8_t* row, int64_t k,
                                                                   int64_t i, const X* xr, int32_t* lo, int32_t* hi) {
  __m256i l = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
  __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
  if (i < k) {
    int32_t t0 = 0, t1 = 0;
    for (int64_t t = i; t < k; ++t) {
      t0 += static_cast<int32_t>(row[t]) * xr[t];
      t1 += static_cast<int32_t>(row[k + t]) * xr[t];
    }
    l = _mm256_add_epi32(l, _mm256_setr_epi32(t0, 0, 0, 0, 0, 0, 0, 0));
    h = _mm256_add_epi32(h, _mm256_setr_epi32(t1, 0, 0, 0, 0, 0, 0, 0));
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo), l);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi), h);
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
    for (int r = 0; r < M; ++r) park_pair(a[r], b[r], row, k, i, x + r * k, parts[j][r], parts[j + 1][r]);
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
    for (int r = 0; r < M; ++r)  // less the offset's share
      park_pair(_mm512_sub_epi32(a[r], ca), _mm512_sub_epi32(b[r], cb), row, k, i, x + r * k, parts[j][r],
                parts[j + 1][r]);
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

TORCH_LIBRARY_FRAGMENT(gemmakit_avx2, lib) {
  lib.def("int8_grid(Tensor x, Tensor q, Tensor scales, int isa) -> Tensor");
  lib.def("int8_screen(Tensor xq, Tensor x_scale, Tensor q, Tensor scales, int isa, Tensor coef, Tensor norms) -> "
          "Tensor");
  lib.def("amx_int8() -> bool", &amx_int8);
}

TORCH_LIBRARY_IMPL(gemmakit_avx2, CPU, lib) {
  lib.impl("int8_grid", &int8_grid);
  lib.impl("int8_screen", &int8_screen);
}
