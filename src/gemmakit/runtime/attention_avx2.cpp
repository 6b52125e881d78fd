// Decode attention on x86 CPUs: one query per row over a KV cache, for gemmakit's CPU decode steps.
//
// Why our own. In a decode step each (row, KV head) pair reads its keys and values once and does little with
// them: G query heads (those sharing the KV head) against S keys. Torch's fused SDPA kernel runs the two
// products as GEMMs of G rows, which on CPU ran at about half the memory's speed at a batch step's shapes, with
// bf16 caches slower still (docs/performance.md, "A decode attention kernel"). Here each key and value row is
// read once, in place (the cache's own strides and dtype), and multiplied against all G queries while it is in
// registers; a masked key is never read. Sums and the softmax are fp32 whatever the cache's dtype (fp32 or
// bf16), and a bf16 output is rounded once at the end.
//
// Threads take whole (row, KV head) pairs where there are enough of them; a narrower step (one row) splits
// each pair's keys into ranges instead, and the ranges' partial softmaxes are merged (their maxima, sums and
// weighted values rescaled to the largest maximum), as flash-decoding does.
#include "lanes_avx2.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kGroup = 4;           // queries scored together against each loaded key
constexpr int64_t kMinRange = 256;  // keys per range below which a pair is not split further

using gemmakit_lanes::hsum;
using gemmakit_lanes::widen1;
using gemmakit_lanes::widen8;

// What one task leaves for the merge: per query its scores' maximum, the sum of exp(score - max), and
// sum of exp(score - max) * v over its keys.
struct Partial {
  float* max;  // [G]
  float* sum;  // [G]
  float* out;  // [G][D]
};

// Scores of NG queries q [NG][D] (fp32) against the keys s0..s1-1 that the mask lets through, scaled, into
// scores[g * S + s - s0] (S = s1 - s0); masked keys get -inf and are not read.
template <int NG, typename T>
void score_keys(const float* q, const T* k, int64_t k_stride, const bool* mask, int64_t m_stride, int64_t D,
                int64_t s0, int64_t s1, float scale, float* scores, int64_t S) {
  for (int64_t s = s0; s < s1; ++s) {
    if (!mask[s * m_stride]) {
      for (int g = 0; g < NG; ++g) scores[g * S + s - s0] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const T* row = k + s * k_stride;
    __m256 acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 kv = widen8(row + d);
      for (int g = 0; g < NG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
    for (int g = 0; g < NG; ++g) {
      float x = hsum(acc[g]);
      for (int64_t t = d; t < D; ++t) x += q[g * D + t] * widen1(row[t]);
      scores[g * S + s - s0] = x * scale;
    }
  }
}

// For NG queries whose scores over s0..s1-1 are in `scores`: the partial softmax of the range (max, sum of
// exponentials) and its exponential-weighted sum of the value rows, into p (queries g0..g0+NG-1).
template <int NG, typename T>
void weigh_values(float* scores, const T* v, int64_t v_stride, int64_t D, int64_t s0, int64_t s1, int64_t S,
                  const Partial& p, int g0) {
  for (int g = 0; g < NG; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    float* row = scores + g * S;
    for (int64_t i = 0; i < S; ++i) m = std::max(m, row[i]);
    float total = 0.0f;
    if (m != -std::numeric_limits<float>::infinity())
      for (int64_t i = 0; i < S; ++i) total += row[i] = std::exp(row[i] - m);
    p.max[g0 + g] = m;
    p.sum[g0 + g] = total;
    std::fill(p.out + (g0 + g) * D, p.out + (g0 + g + 1) * D, 0.0f);
  }
  for (int64_t s = s0; s < s1; ++s) {
    float w[NG];
    bool any = false;
    for (int g = 0; g < NG; ++g) {
      w[g] = p.max[g0 + g] == -std::numeric_limits<float>::infinity() ? 0.0f : scores[g * S + s - s0];
      any |= w[g] != 0.0f;
    }
    if (!any) continue;  // masked (or weightless) keys: their value row is not read
    const T* row = v + s * v_stride;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 vv = widen8(row + d);
      for (int g = 0; g < NG; ++g) {
        float* o = p.out + (g0 + g) * D + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(w[g]), vv, _mm256_loadu_ps(o)));
      }
    }
    for (; d < D; ++d)
      for (int g = 0; g < NG; ++g) p.out[(g0 + g) * D + d] += w[g] * widen1(row[d]);
  }
}

template <int NG, typename T>
void range_of_group(const float* q, const T* k, int64_t k_stride, const T* v, int64_t v_stride, const bool* mask,
                    int64_t m_stride, int64_t D, int64_t s0, int64_t s1, float scale, float* scores, int64_t S,
                    const Partial& p, int g0) {
  score_keys<NG>(q, k, k_stride, mask, m_stride, D, s0, s1, scale, scores, S);
  weigh_values<NG>(scores, v, v_stride, D, s0, s1, S, p, g0);
}

// One task: queries of one (row, KV head) pair over keys s0..s1-1, kGroup queries at a time.
template <typename T>
void range_task(const float* q, int64_t G, const T* k, int64_t k_stride, const T* v, int64_t v_stride,
                const bool* mask, int64_t m_stride, int64_t D, int64_t s0, int64_t s1, float scale,
                const Partial& p) {
  const int64_t S = s1 - s0;
  std::vector<float> scores(static_cast<size_t>(std::min<int64_t>(G, kGroup)) * S);
  float* base = scores.data();
  for (int64_t g0 = 0; g0 < G; g0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, G - g0));
    const float* qg = q + g0 * D;
    const int gi = static_cast<int>(g0);
    switch (n) {
      case 4: range_of_group<4>(qg, k, k_stride, v, v_stride, mask, m_stride, D, s0, s1, scale, base, S, p, gi); break;
      case 3: range_of_group<3>(qg, k, k_stride, v, v_stride, mask, m_stride, D, s0, s1, scale, base, S, p, gi); break;
      case 2: range_of_group<2>(qg, k, k_stride, v, v_stride, mask, m_stride, D, s0, s1, scale, base, S, p, gi); break;
      default: range_of_group<1>(qg, k, k_stride, v, v_stride, mask, m_stride, D, s0, s1, scale, base, S, p, gi);
    }
  }
}

template <typename T>
void attend_all(const float* q, const T* k, const T* v, const bool* mask, int64_t B, int64_t Hk, int64_t G,
                int64_t S, int64_t D, const int64_t* ks, const int64_t* vs, const int64_t* ms, float scale,
                float* out) {
  const int64_t pairs = B * Hk, threads = at::get_num_threads();
  const int64_t ranges = pairs >= threads ? 1 : std::max<int64_t>(1, std::min((threads + pairs - 1) / pairs,
                                                                                S / kMinRange));
  const int64_t per = (S + ranges - 1) / ranges, tasks = pairs * ranges;
  std::vector<float> maxs(tasks * G), sums(tasks * G), outs(tasks * G * D);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pair = t / ranges, r = t % ranges, b = pair / Hk, h = pair % Hk;
      const int64_t s0 = r * per, s1 = std::min(S, s0 + per);
      const Partial p{maxs.data() + t * G, sums.data() + t * G, outs.data() + t * G * D};
      if (s0 >= s1) {
        std::fill(p.max, p.max + G, -std::numeric_limits<float>::infinity());
        std::fill(p.sum, p.sum + G, 0.0f);
        std::fill(p.out, p.out + G * D, 0.0f);
        continue;
      }
      range_task(q + (b * Hk + h) * G * D, G, k + b * ks[0] + h * ks[1], ks[2], v + b * vs[0] + h * vs[1], vs[2],
                 mask + b * ms[0], ms[1], D, s0, s1, scale, p);
    }
  });
  // Merge each pair's ranges: rescale each to the largest maximum, then normalise (a query with every key
  // masked gets zeros, not NaN).
  for (int64_t pair = 0; pair < pairs; ++pair)
    for (int64_t g = 0; g < G; ++g) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < ranges; ++r) m = std::max(m, maxs[(pair * ranges + r) * G + g]);
      float* o = out + (pair * G + g) * D;
      std::fill(o, o + D, 0.0f);
      if (m == -std::numeric_limits<float>::infinity()) continue;
      float total = 0.0f;
      for (int64_t r = 0; r < ranges; ++r) {
        const int64_t t = pair * ranges + r;
        if (maxs[t * G + g] == -std::numeric_limits<float>::infinity()) continue;
        const float c = std::exp(maxs[t * G + g] - m);
        total += c * sums[t * G + g];
        const float* part = outs.data() + (t * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += c * part[d];
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
}

// q [B, Hq, 1, D]; k, v [B, Hk, S, D] with unit stride along D (a narrowed cache is fine); mask [B, 1, 1, S]
// bool. Returns [B, Hq, 1, D] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "q: [B, Hq, 1, D]");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "k, v: [B, Hk, S, D] alike, matching q");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "q's heads must be a multiple of k's");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "k, v: fp32 or bf16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v: unit stride along D");
  TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(0) == k.size(0) &&
              mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == k.size(2), "mask: bool [B, 1, 1, S]");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q: fp32 or bf16");
  const int64_t B = k.size(0), Hk = k.size(1), S = k.size(2), D = k.size(3), G = q.size(1) / Hk;
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  auto out32 = at::empty({B, q.size(1), 1, D}, q32.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t ms[2] = {mask.stride(0), mask.stride(3)};
  const float sc = static_cast<float>(scale);
  if (k.scalar_type() == at::kFloat)
    attend_all(q32.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), mask.data_ptr<bool>(), B, Hk, G, S,
               D, ks, vs, ms, sc, out32.data_ptr<float>());
  else
    attend_all(q32.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>()),
               reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()), mask.data_ptr<bool>(), B, Hk, G, S, D,
               ks, vs, ms, sc, out32.data_ptr<float>());
  return q.scalar_type() == at::kFloat ? out32 : out32.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gemmakit_avx2, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemmakit_avx2, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
