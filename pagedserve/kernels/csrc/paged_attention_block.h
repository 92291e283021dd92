// The inner step of the paged decode attention kernel (paged_decode_attention.cpp): query rows that share one KV
// head over the tokens of one cache block, in the widest registers the CPU has: sixteen lanes with AVX-512, eight
// with AVX2 and FMA. One implementation over a small set of lane operations (``Lanes``, which the prefill kernel
// uses too), so both widths compute the same thing in the same order.
//
// What differs from the plain eight-lane path in paged_decode_attention.cpp, and why:
// * Scores are taken W keys at a time (W = the lanes of a register). Each key's K row is loaded (and, from a bf16
//   cache, widened) once into registers for the whole query group, and the W dot products' lanes are summed by
//   one reduction tree: a horizontal sum per key would cost more than the dot product itself at head_dim 64.
// * bf16 rows are widened in registers as they are used (a zero-extend and a shift), not copied into an fp32
//   tile first.
// * P.V keeps several query heads' accumulator rows in registers while each V row is read once for them.
// The arithmetic is the fp32 arithmetic of the plain path (bf16 values widen exactly); only the order of the dot
// products' sums differs.
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PAGEDSERVE_BLOCK_STEP 1

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec8.h"

namespace block_step {

#if defined(__AVX512F__)

struct Lanes {
  static constexpr int W = 16;
  // P.V: accumulators of up to kHeadsPerPass heads x kPvRegs registers, plus the V row: 20 of 32 registers.
  static constexpr int kHeadsPerPass = 4;
  static constexpr int kPvRegs = 4;
  using reg = __m512;
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg exp(reg x) { return (reg)exp_lanes<vec16, ivec16>((vec16)x); }
  static __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }
  // Lanes [0, count) of v to p; count in [0, W].
  static void store_first(float* p, int64_t count, reg v) { _mm512_mask_storeu_ps(p, first(count), v); }
  // Lanes [0, count) from p, the rest ``fill``.
  static reg load_first(const float* p, int64_t count, reg fill) { return _mm512_mask_loadu_ps(fill, first(count), p); }
  // Lanes [0, count) of v, the rest 0.
  static reg keep_first(int64_t count, reg v) { return _mm512_maskz_mov_ps(first(count), v); }
  static float reduce_max(reg v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(reg v) { return _mm512_reduce_add_ps(v); }
  // Lane i of the result = the sum of the sixteen lanes of a[i]. Each level adds pairs of registers after
  // interleaving them, halving the registers and doubling the vectors each lane carries a part of.
  static reg sum_lanes(const reg* a) {
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
};

#else  // AVX2 and FMA

struct Lanes {
  static constexpr int W = 8;
  // P.V: 2 heads x 4 registers of accumulators, the V row and a broadcast: 13 of 16 registers.
  static constexpr int kHeadsPerPass = 2;
  static constexpr int kPvRegs = 4;
  using reg = __m256;
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg exp(reg x) { return (reg)exp_lanes<vec8, ivec8>((vec8)x); }
  static __m256i first(int64_t count) {  // all ones in lanes [0, count)
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static void store_first(float* p, int64_t count, reg v) {
    if (count >= W) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, first(count), v);
  }
  static reg load_first(const float* p, int64_t count, reg fill) {
    if (count >= W) return _mm256_loadu_ps(p);
    const __m256i m = first(count);
    return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static reg keep_first(int64_t count, reg v) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(count))); }
  static float reduce_max(reg v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static float reduce_add(reg v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  // Lane i of the result = the sum of the eight lanes of a[i], by the same interleave-and-add levels as AVX-512's.
  static reg sum_lanes(const reg* a) {
    __m256 pairs[4];  // lanes 0,2 of each 128-bit half hold parts of a[2i], lanes 1,3 of a[2i + 1]
    for (int i = 0; i < 4; ++i) {
      pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    }
    __m256 quads[2];  // lane k of each half holds a part of a[4i + k]
    for (int i = 0; i < 2; ++i) {
      const __m256d x = _mm256_castps_pd(pairs[2 * i]), y = _mm256_castps_pd(pairs[2 * i + 1]);
      quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20), _mm256_permute2f128_ps(quads[0], quads[1], 0x31));
  }
};

#endif

using reg = Lanes::reg;
constexpr int W = Lanes::W;
// Registers of a K row: head_dim up to 128.
constexpr int kMaxRowRegs = 128 / W;

// Asks for the cache lines of ``bytes`` bytes at p (nothing for a null p): a later block's row, requested while
// this block's row is computed, so the requests spread over the arithmetic instead of filling the line-fill
// buffers in one burst that stalls it.
inline void prefetch_span(const void* p, int64_t bytes) {
  if (p == nullptr) return;
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// Head dims this path takes: whole registers, up to 128.
inline bool handles(int64_t head_dim) { return head_dim % W == 0 && head_dim <= 128; }

// scores[g * scores_stride + j] = qf_g . k_j for the G query heads and the n keys (rows ``stride`` apart).
// ``part`` is scratch of W * G registers.
template <int DC, typename cache_t>
void block_scores(const float* qf, int64_t G, const cache_t* k, int64_t stride, int64_t n, float* scores,
                  int64_t scores_stride, reg* part, const cache_t* pf) {
  constexpr int64_t D = W * DC;
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t count = std::min<int64_t>(W, n - j0);
    for (int64_t jj = 0; jj < W; ++jj) {
      if (jj >= count) {
        for (int64_t g = 0; g < G; ++g) part[g * W + jj] = Lanes::zero();
        continue;
      }
      const cache_t* row = k + (j0 + jj) * stride;
      if (pf != nullptr) prefetch_span(pf + (j0 + jj) * stride, D * sizeof(cache_t));
      reg kr[DC];
      for (int i = 0; i < DC; ++i) kr[i] = Lanes::load(row + W * i);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        reg s = Lanes::mul(Lanes::load(qg), kr[0]);
        for (int i = 1; i < DC; ++i) s = Lanes::fmadd(Lanes::load(qg + W * i), kr[i], s);
        part[g * W + jj] = s;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      Lanes::store_first(scores + g * scores_stride + j0, count, Lanes::sum_lanes(part + g * W));
    }
  }
}

// The online softmax's update for one query row over the block's scores s[0, n) (n >= 1): s becomes
// p = exp(s - m_new), m and l move on, and the returned alpha = exp(m_old - m_new) rescales the row's
// accumulator (0 on its first block, where m_old = -inf).
inline float softmax_update(float* s, int64_t n, float* m, float* l) {
  const reg minus_inf = Lanes::set1(-std::numeric_limits<float>::infinity());
  reg top = minus_inf;
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    top = Lanes::max(top, Lanes::load_first(s + j0, std::min<int64_t>(W, n - j0), minus_inf));
  }
  const float m_new = std::max(*m, Lanes::reduce_max(top));
  const float alpha = std::exp(*m - m_new);
  const reg shift = Lanes::set1(m_new);
  reg sum = Lanes::zero();
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t kept = std::min<int64_t>(W, n - j0);
    const reg p = Lanes::keep_first(kept, Lanes::exp(Lanes::sub(Lanes::load_first(s + j0, kept, Lanes::zero()), shift)));
    Lanes::store_first(s + j0, kept, p);
    sum = Lanes::add(sum, p);
  }
  *l = *l * alpha + Lanes::reduce_add(sum);
  *m = m_new;
  return alpha;
}

// Where a pv pass finds its operands, for pv_rows: ``row(j)`` is key j's V row, ``p(g, j)`` query row g's
// probability for key j, ``prefetch(j, d0, bytes)`` asks for what the next pass will read in its place.
// The rows of one block, ``stride`` apart, with G probability rows ``p_stride`` apart (the decode step's layout):
template <typename cache_t>
struct BlockRows {
  using cache_type = cache_t;
  const cache_t* v;
  int64_t stride;
  const float* probs;
  int64_t p_stride;
  const cache_t* pf;  // the same rows of the block to come next (null: nothing requested)
  const cache_t* row(int64_t j) const { return v + j * stride; }
  float p(int g, int64_t j) const { return probs[g * p_stride + j]; }
  void prefetch(int64_t j, int64_t d0, int64_t bytes) const {
    if (pf != nullptr) prefetch_span(pf + j * stride + d0, bytes);
  }
};

// Rows gathered from several blocks, with the probabilities transposed (key j's for every query row together,
// ``rp`` apart: the prefill span's layout, rows in lanes).
template <typename cache_t>
struct GatheredRows {
  using cache_type = cache_t;
  const cache_t* const* rows;
  const float* probs;
  int64_t rp;
  const cache_t* row(int64_t j) const { return rows[j]; }
  float p(int g, int64_t j) const { return probs[j * rp + g]; }
  void prefetch(int64_t, int64_t, int64_t) const {}
};

// acc_g[d0, d0 + W DC) = alpha_g acc_g + sum_j p(g, j) v_j[d0, d0 + W DC) for GG query rows (accumulators D
// apart): their accumulators stay in GG * DC registers while the n V rows stream past once.
template <int DC, int GG, typename Rows>
void pv_tile(float* acc, int64_t D, const float* alpha, const Rows& rows, int64_t n, int64_t d0) {
  reg r[GG][DC];
  for (int g = 0; g < GG; ++g) {
    const reg a = Lanes::set1(alpha[g]);
    for (int i = 0; i < DC; ++i) r[g][i] = Lanes::mul(Lanes::load(acc + g * D + d0 + W * i), a);
  }
  for (int64_t j = 0; j < n; ++j) {
    const typename Rows::cache_type* row = rows.row(j) + d0;
    rows.prefetch(j, d0, W * DC * sizeof(typename Rows::cache_type));
    reg vr[DC];
    for (int i = 0; i < DC; ++i) vr[i] = Lanes::load(row + W * i);
    for (int g = 0; g < GG; ++g) {
      const reg pj = Lanes::set1(rows.p(g, j));
      for (int i = 0; i < DC; ++i) r[g][i] = Lanes::fmadd(pj, vr[i], r[g][i]);
    }
  }
  for (int g = 0; g < GG; ++g) {
    for (int i = 0; i < DC; ++i) Lanes::store(acc + g * D + d0 + W * i, r[g][i]);
  }
}

// pv_tile over the whole head_dim: full chunks of kPvRegs registers, then the 1-3 registers left.
template <int GG, typename Rows>
void pv_rows(float* acc, int64_t D, const float* alpha, const Rows& rows, int64_t n) {
  constexpr int64_t kChunk = W * Lanes::kPvRegs;
  int64_t d0 = 0;
  for (; d0 + kChunk <= D; d0 += kChunk) pv_tile<Lanes::kPvRegs, GG>(acc, D, alpha, rows, n, d0);
  switch ((D - d0) / W) {  // fewer than kPvRegs (= 4) registers left
    case 3: pv_tile<3, GG>(acc, D, alpha, rows, n, d0); break;
    case 2: pv_tile<2, GG>(acc, D, alpha, rows, n, d0); break;
    case 1: pv_tile<1, GG>(acc, D, alpha, rows, n, d0); break;
    default: break;
  }
}

// block_scores for a K row of ``chunks`` registers (1 .. kMaxRowRegs), as a compile-time count.
template <int DC = 1, typename cache_t>
void block_scores_for(int64_t chunks, const float* qf, int64_t G, const cache_t* k, int64_t stride, int64_t n,
                      float* scores, int64_t scores_stride, reg* part, const cache_t* pf) {
  if constexpr (DC < kMaxRowRegs) {
    if (chunks > DC) {
      block_scores_for<DC + 1>(chunks, qf, G, k, stride, n, scores, scores_stride, part, pf);
      return;
    }
  }
  block_scores<DC>(qf, G, k, stride, n, scores, scores_stride, part, pf);
}

// G query rows ``qf`` (fp32, scaled; the query heads of one KV head, for one token or several) over n tokens
// of one block, K and V rows ``stride`` apart, every row seeing all n; the rows' running max ``m``, sum ``l``
// and accumulator rows ``acc`` (D apart) as the callers keep them.
// Scratch: ``scores`` (G rows, ``scores_stride`` >= n apart), ``part`` (W * G registers), ``alpha`` (G floats).
// ``pf_k``/``pf_v``: where the same rows of the block to come next sit, requested row by row as these are
// computed (null: nothing requested).
template <typename cache_t>
void attend_block(const float* qf, int64_t G, int64_t D, const cache_t* k, const cache_t* v, int64_t stride,
                  int64_t n, float* scores, int64_t scores_stride, reg* part,
                  float* alpha, float* m, float* l, float* acc, const cache_t* pf_k = nullptr,
                  const cache_t* pf_v = nullptr) {
  block_scores_for(D / W, qf, G, k, stride, n, scores, scores_stride, part, pf_k);
  for (int64_t g = 0; g < G; ++g) {
    alpha[g] = softmax_update(scores + g * scores_stride, n, m + g, l + g);
  }
  for (int64_t g0 = 0; g0 < G; g0 += Lanes::kHeadsPerPass) {
    float* a = acc + g0 * D;
    const BlockRows<cache_t> rows{v, stride, scores + g0 * scores_stride, scores_stride, g0 == 0 ? pf_v : nullptr};
    switch (std::min<int64_t>(Lanes::kHeadsPerPass, G - g0)) {
      case 4: if constexpr (Lanes::kHeadsPerPass >= 4) pv_rows<4>(a, D, alpha + g0, rows, n); break;
      case 3: if constexpr (Lanes::kHeadsPerPass >= 3) pv_rows<3>(a, D, alpha + g0, rows, n); break;
      case 2: pv_rows<2>(a, D, alpha + g0, rows, n); break;
      default: pv_rows<1>(a, D, alpha + g0, rows, n); break;
    }
  }
}

}  // namespace block_step

#endif  // AVX-512, or AVX2 and FMA
