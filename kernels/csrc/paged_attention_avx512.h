// The inner step of the paged attention kernels on AVX-512 (paged_decode_attention.cpp,
// paged_prefill_attention.cpp): query rows that share one KV head over the tokens of one cache block, in
// sixteen-lane registers.
//
// What differs from the eight-lane path there, and why:
// * Scores are taken sixteen keys at a time. Each key's K row is loaded (and, from a bf16 cache, widened) once
//   into registers for the whole query group, and the sixteen dot products' lanes are summed by one reduction
//   tree: a horizontal sum per key would cost more than the dot product itself at head_dim 64.
// * bf16 rows are widened in registers as they are used (a zero-extend and a shift), not copied into an fp32
//   tile first.
// * P.V keeps up to four query heads' accumulator rows in registers while each V row is read once for them.
// The arithmetic is the fp32 arithmetic of the eight-lane path (bf16 values widen exactly); only the order of
// the dot products' sums differs.
#pragma once

#if defined(__AVX512F__)

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec8.h"

namespace avx512 {

// Head dims this path takes: whole registers, and a K row that fits in eight of them.
inline bool handles(int64_t head_dim) { return head_dim % 16 == 0 && head_dim <= 128; }

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __m512 exp16(__m512 x) { return (__m512)exp_lanes<vec16, ivec16>((vec16)x); }

inline __mmask16 first_lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// Lane i of the result = the sum of the sixteen lanes of a[i]. Each level adds pairs of registers after
// interleaving them, halving the registers and doubling the vectors each lane carries a part of.
inline __m512 sum_lanes16(const __m512* a) {
  __m512 pairs[8];  // lanes 0,2 of each 128-bit quarter hold parts of a[2i], lanes 1,3 of a[2i + 1]
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  __m512 quads[4];  // lane k of each quarter holds a part of a[4i + k]
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  __m512 octs[2];  // quarters 0,1 hold halves of quads[2i]'s sums, quarters 2,3 of quads[2i + 1]'s
  for (int i = 0; i < 2; ++i) {
    octs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(octs[0], octs[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g * scores_stride + j] = qf_g . k_j for the G query heads and the n keys (rows ``stride`` apart).
// ``part`` is scratch of 16 * G registers.
template <int DC, typename cache_t>
void block_scores(const float* qf, int64_t G, const cache_t* k, int64_t stride, int64_t n, float* scores,
                  int64_t scores_stride, __m512* part) {
  constexpr int64_t D = 16 * DC;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (jj >= count) {
        for (int64_t g = 0; g < G; ++g) part[g * 16 + jj] = _mm512_setzero_ps();
        continue;
      }
      const cache_t* row = k + (j0 + jj) * stride;
      __m512 kr[DC];
      for (int i = 0; i < DC; ++i) kr[i] = load16(row + 16 * i);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qg), kr[0]);
        for (int i = 1; i < DC; ++i) s = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * i), kr[i], s);
        part[g * 16 + jj] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      _mm512_mask_storeu_ps(scores + g * scores_stride + j0, first_lanes(count), sum_lanes16(part + g * 16));
    }
  }
}

// The online softmax's update for one query row over the block's scores s[0, n), of which the first ``valid``
// count (a causal row sees a prefix of the block): s becomes p = exp(s - m_new) there and 0 past it, m and l
// move on, and the returned alpha = exp(m_old - m_new) rescales the row's accumulator (0 on its first block,
// where m_old = -inf; 1 when the row sees none of the block).
inline float softmax_update(float* s, int64_t n, int64_t valid, float* m, float* l) {
  if (valid <= 0) {
    std::fill(s, s + n, 0.f);
    return 1.f;
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = minus_inf;
  for (int64_t j0 = 0; j0 < valid; j0 += 16) {
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, first_lanes(std::min<int64_t>(16, valid - j0)), s + j0));
  }
  const float m_new = std::max(*m, _mm512_reduce_max_ps(top));
  const float alpha = std::exp(*m - m_new);
  const __m512 shift = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const __mmask16 kept = first_lanes(std::clamp<int64_t>(valid - j0, 0, 16));
    const __m512 p = _mm512_maskz_mov_ps(kept, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(kept, s + j0), shift)));
    _mm512_mask_storeu_ps(s + j0, first_lanes(std::min<int64_t>(16, n - j0)), p);
    sum = _mm512_add_ps(sum, p);
  }
  *l = *l * alpha + _mm512_reduce_add_ps(sum);
  *m = m_new;
  return alpha;
}

// acc_g[d0, d0 + 16 DC) = alpha_g acc_g + sum_j p_g[j] v_j[d0, d0 + 16 DC) for GG query heads (rows D apart):
// their accumulators stay in GG * DC registers while the n V rows stream past once.
template <int DC, int GG, typename cache_t>
void pv_tile(float* acc, int64_t D, const float* alpha, const float* p, int64_t p_stride, const cache_t* v,
             int64_t stride, int64_t n, int64_t d0) {
  __m512 r[GG][DC];
  for (int g = 0; g < GG; ++g) {
    const __m512 a = _mm512_set1_ps(alpha[g]);
    for (int i = 0; i < DC; ++i) r[g][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + d0 + 16 * i), a);
  }
  for (int64_t j = 0; j < n; ++j) {
    const cache_t* row = v + j * stride + d0;
    __m512 vr[DC];
    for (int i = 0; i < DC; ++i) vr[i] = load16(row + 16 * i);
    for (int g = 0; g < GG; ++g) {
      const __m512 pj = _mm512_set1_ps(p[g * p_stride + j]);
      for (int i = 0; i < DC; ++i) r[g][i] = _mm512_fmadd_ps(pj, vr[i], r[g][i]);
    }
  }
  for (int g = 0; g < GG; ++g) {
    for (int i = 0; i < DC; ++i) _mm512_storeu_ps(acc + g * D + d0 + 16 * i, r[g][i]);
  }
}

template <int GG, typename cache_t>
void pv_heads(float* acc, int64_t D, const float* alpha, const float* p, int64_t p_stride, const cache_t* v,
              int64_t stride, int64_t n) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv_tile<4, GG>(acc, D, alpha, p, p_stride, v, stride, n, d0);
  switch ((D - d0) / 16) {
    case 3: pv_tile<3, GG>(acc, D, alpha, p, p_stride, v, stride, n, d0); break;
    case 2: pv_tile<2, GG>(acc, D, alpha, p, p_stride, v, stride, n, d0); break;
    case 1: pv_tile<1, GG>(acc, D, alpha, p, p_stride, v, stride, n, d0); break;
    default: break;
  }
}

// G query rows ``qf`` (fp32, scaled; the query heads of one KV head, for one token or several) over n tokens
// of one block, K and V rows ``stride`` apart; the rows' running max ``m``, sum ``l`` and accumulator rows
// ``acc`` (D apart) as the callers keep them. ``valid``: how many of the n tokens each row sees (nullptr: all).
// Scratch: ``scores`` (G rows, ``scores_stride`` >= n apart), ``part`` (16 * G registers), ``alpha`` (G floats).
template <typename cache_t>
void attend_block(const float* qf, int64_t G, int64_t D, const cache_t* k, const cache_t* v, int64_t stride,
                  int64_t n, const int64_t* valid, float* scores, int64_t scores_stride, __m512* part,
                  float* alpha, float* m, float* l, float* acc) {
  switch (D / 16) {
    case 1: block_scores<1>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 2: block_scores<2>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 3: block_scores<3>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 4: block_scores<4>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 5: block_scores<5>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 6: block_scores<6>(qf, G, k, stride, n, scores, scores_stride, part); break;
    case 7: block_scores<7>(qf, G, k, stride, n, scores, scores_stride, part); break;
    default: block_scores<8>(qf, G, k, stride, n, scores, scores_stride, part); break;
  }
  for (int64_t g = 0; g < G; ++g) {
    alpha[g] = softmax_update(scores + g * scores_stride, n, valid ? valid[g] : n, m + g, l + g);
  }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    float* a = acc + g0 * D;
    const float* p = scores + g0 * scores_stride;
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: pv_heads<4>(a, D, alpha + g0, p, scores_stride, v, stride, n); break;
      case 3: pv_heads<3>(a, D, alpha + g0, p, scores_stride, v, stride, n); break;
      case 2: pv_heads<2>(a, D, alpha + g0, p, scores_stride, v, stride, n); break;
      default: pv_heads<1>(a, D, alpha + g0, p, scores_stride, v, stride, n); break;
    }
  }
}

}  // namespace avx512

#endif  // __AVX512F__
