// Causal attention of a step's new tokens (prompts, prompt chunks, extensions after a cached prefix) over each
// sequence's paged K/V, read in place through the block table: the CPU path of reference.paged_attention.
//
//   q, out              [N, Hq, D]        packed rows; sequence s owns rows [cu_seqlens_q[s], cu_seqlens_q[s + 1])
//   k_cache, v_cache    [NB, BS, Hkv, D]  (fp32 or bf16, contiguous)
//   cu_seqlens_q        [S + 1] int32
//   seq_lens            [S] int32         each sequence's context, its new tokens included
//   block_tables        [S, max_blocks] int32
// A row r of sequence s is the token at position seq_lens[s] - (cu_seqlens_q[s + 1] - r) and sees the keys up
// to and including that position.
//
// Work item = (sequence, tile of consecutive tokens, KV head). The tile's tokens times the KV head's query heads
// are one set of about 32 query rows, held transposed so that the rows sit in the lanes of a register: a key's
// scores for all rows are fused multiply-adds along head_dim with no sum across lanes, every K/V row read serves
// all rows, and the online softmax (fp32) runs for 8 or 16 rows at once over spans of several blocks. A key past
// a row's causal limit (the diagonal) is masked per lane. The lane operations are block_step's
// (paged_attention_block.h), so AVX-512 and AVX2 compute the same thing in the same order.
//
// It needs AVX-512, or AVX2 and FMA: where both are missing (or head_dim is not a whole number of registers up
// to 128), prefill_attention_supported says no and the caller keeps the torch reference.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "paged_attention_args.h"
#include "paged_attention_block.h"
#include "kernel_threads.h"

namespace {

bool prefill_attention_supported(int64_t head_dim) {
#if defined(PAGEDSERVE_BLOCK_STEP)
  return block_step::handles(head_dim);
#else
  (void)head_dim;
  return false;
#endif
}

#if defined(PAGEDSERVE_BLOCK_STEP)

using block_step::Lanes;
using block_step::reg;
using block_step::W;

// Query rows per work item: a tile of consecutive tokens times the KV head's G query heads, about 32 rows (two
// AVX-512 or four AVX2 registers with the rows in lanes), so each K and V row read serves all of them.
constexpr int64_t kTileQueryRows = 32;
// Keys per online-softmax step: several blocks at once, so the per-row work of an update (max, rescale, sums)
// is spread over more keys than one small block holds.
constexpr int64_t kSpanKeys = 64;

struct Tile {
  int64_t seq, row_begin, row_end;
};

// Lanes of ``x`` where a < b, the others ``y``.
inline reg select_less(reg a, reg b, reg x, reg y) {
#if defined(__AVX512F__)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
#else
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
#endif
}

// st[j * rp + r] = kf_j . q_r for keys [0, n) and row registers [r0, r0 + RG): the query rows sit in lanes
// (qt[d * rp + r], transposed), so a key's score for W rows is one chain of fused multiply-adds along d and no
// lane is summed across: KG keys x RG registers of accumulators, one broadcast of a key element per key and d.
template <int KG, int RG>
void span_scores_tile(const float* qt, int64_t rp, const float* kf, int64_t D, int64_t j0, int64_t r0, float* st) {
  reg acc[KG][RG];
  for (int k = 0; k < KG; ++k) {
    for (int g = 0; g < RG; ++g) acc[k][g] = Lanes::zero();
  }
  for (int64_t d = 0; d < D; ++d) {
    reg qv[RG];
    for (int g = 0; g < RG; ++g) qv[g] = Lanes::load(qt + d * rp + r0 + g * W);
    for (int k = 0; k < KG; ++k) {
      const reg kv = Lanes::set1(kf[(j0 + k) * D + d]);
      for (int g = 0; g < RG; ++g) acc[k][g] = Lanes::fmadd(kv, qv[g], acc[k][g]);
    }
  }
  for (int k = 0; k < KG; ++k) {
    for (int g = 0; g < RG; ++g) Lanes::store(st + (j0 + k) * rp + r0 + g * W, acc[k][g]);
  }
}

#if defined(__AVX512F__)
constexpr int kScoreKeys = 4, kScoreRegs = 4;  // 16 accumulators, 4 query registers, a broadcast: 21 of 32
#else
constexpr int kScoreKeys = 2, kScoreRegs = 4;  // 8 accumulators, 4 query registers, a broadcast: 13 of 16
#endif

template <int KG>
void span_scores_keys(const float* qt, int64_t rp, const float* kf, int64_t D, int64_t j0, float* st) {
  const int64_t regs = rp / W;
  int64_t r = 0;
  for (; r + kScoreRegs <= regs; r += kScoreRegs) span_scores_tile<KG, kScoreRegs>(qt, rp, kf, D, j0, r * W, st);
  switch (regs - r) {
    case 3: span_scores_tile<KG, 3>(qt, rp, kf, D, j0, r * W, st); break;
    case 2: span_scores_tile<KG, 2>(qt, rp, kf, D, j0, r * W, st); break;
    case 1: span_scores_tile<KG, 1>(qt, rp, kf, D, j0, r * W, st); break;
    default: break;
  }
}

void span_scores(const float* qt, int64_t rp, const float* kf, int64_t D, int64_t n, float* st) {
  int64_t j = 0;
  for (; j + kScoreKeys <= n; j += kScoreKeys) span_scores_keys<kScoreKeys>(qt, rp, kf, D, j, st);
  for (; j < n; ++j) span_scores_keys<1>(qt, rp, kf, D, j, st);
}

// The online softmax over the span's n keys for every row at once (rows in lanes): key j counts for row r when
// j < seen[r] (the keys of the span the row's causal limit admits). st becomes p (0 where a key does not count),
// m and l move on, alpha = exp(m_old - m_new) (0 on a row's first keys, 1 where it sees none of the span).
void span_softmax(float* st, int64_t rp, int64_t n, const float* seen, float* m, float* l, float* alpha) {
  const reg minus_inf = Lanes::set1(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rp; r += W) {
    const reg limit = Lanes::load(seen + r);
    reg top = minus_inf;
    for (int64_t j = 0; j < n; ++j) {
      top = Lanes::max(top, select_less(Lanes::set1(static_cast<float>(j)), limit, Lanes::load(st + j * rp + r), minus_inf));
    }
    const reg m_old = Lanes::load(m + r), m_new = Lanes::max(m_old, top);
    // A row that has seen no key yet and none here keeps m = -inf: shift by 0 there so nothing turns NaN.
    const reg shift = select_less(minus_inf, m_new, m_new, Lanes::zero());
    reg sum = Lanes::zero();
    for (int64_t j = 0; j < n; ++j) {
      const reg p = select_less(Lanes::set1(static_cast<float>(j)), limit,
                                Lanes::exp(Lanes::sub(Lanes::load(st + j * rp + r), shift)), Lanes::zero());
      Lanes::store(st + j * rp + r, p);
      sum = Lanes::add(sum, p);
    }
    const reg a = Lanes::exp(Lanes::sub(m_old, shift));
    Lanes::store(alpha + r, a);
    Lanes::store(l + r, Lanes::fmadd(Lanes::load(l + r), a, sum));
    Lanes::store(m + r, m_new);
  }
}

// acc_r = alpha_r acc_r + sum_j p[j * rp + r] v_j for the tile's rows (acc rows D apart), kHeadsPerPass rows
// per pass of the span's V rows: block_step's pv pass with the probabilities transposed and the rows gathered.
template <typename cache_t>
void span_pv(float* acc, int64_t D, const float* alpha, const float* p, int64_t rows, int64_t rp,
             const cache_t* const* vrows, int64_t n) {
  using block_step::pv_rows;
  using Gathered = block_step::GatheredRows<cache_t>;
  constexpr int64_t GG = Lanes::kHeadsPerPass;
  int64_t r = 0;
  for (; r + GG <= rows; r += GG) pv_rows<GG>(acc + r * D, D, alpha + r, Gathered{vrows, p + r, rp}, n);
  for (; r < rows; ++r) pv_rows<1>(acc + r * D, D, alpha + r, Gathered{vrows, p + r, rp}, n);
}

template <typename q_t, typename cache_t>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale) {
  const int64_t num_seqs = seq_lens.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  const int64_t token_stride = Hkv * D, max_blocks = block_tables.size(1), table_stride = block_tables.stride(0);
  const q_t* q_ptr = q.data_ptr<q_t>();
  q_t* out_ptr = out.data_ptr<q_t>();
  const cache_t* k_ptr = k_cache.data_ptr<cache_t>();
  const cache_t* v_ptr = v_cache.data_ptr<cache_t>();
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const float fscale = static_cast<float>(scale);
  const int64_t tile_tokens = std::max<int64_t>(1, kTileQueryRows / G);
  const int64_t span_keys = std::max<int64_t>(1, kSpanKeys / BS) * BS;  // whole blocks

  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q must rise from 0 to q's row count");
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = cu[s], last = cu[s + 1];
    TORCH_CHECK(first <= last && last <= q.size(0), "cu_seqlens_q must rise from 0 to q's row count");
    TORCH_CHECK(last - first <= lens[s] && lens[s] <= max_blocks * BS, "seq_lens[", s, "] = ", lens[s],
                " must cover its ", last - first, " new tokens and fit its block table");
    for (int64_t r = first; r < last; r += tile_tokens) tiles.push_back({s, r, std::min(r + tile_tokens, last)});
  }
  TORCH_CHECK(cu[num_seqs] == q.size(0), "cu_seqlens_q must end at q's row count");

  // A lane takes items in turn (item i to lane i % lanes), not a contiguous range: a prompt's later tiles see
  // more keys and cost more, so a contiguous split hands one lane most of a long prompt's expensive end. Several
  // lanes per thread, so a thread that starts late still takes a share.
  const int64_t items = static_cast<int64_t>(tiles.size()) * Hkv;
  const int64_t lanes =
      std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads() * kernel_threads::kChunksPerThread));
  kernel_threads::parallel_for(0, lanes, 1, [&](int64_t first_lane, int64_t last_lane) {
    const int64_t max_rows = tile_tokens * G, rp = (max_rows + W - 1) / W * W;  // rows padded to whole registers
    std::vector<float> qt(D * rp), st(span_keys * rp), kf(span_keys * D), acc(rp * D), m(rp), l(rp), alpha(rp),
        seen(rp);
    std::vector<int64_t> context(rp);
    std::vector<const cache_t*> vrows(span_keys);
    auto attend_item = [&](int64_t item) {
      const Tile& t = tiles[item / Hkv];
      const int64_t kvh = item % Hkv, R = (t.row_end - t.row_begin) * G;
      const int64_t first_position = lens[t.seq] - (cu[t.seq + 1] - t.row_begin);
      const int32_t* table = tables + t.seq * table_stride;
      // Row i is token t.row_begin + i / G, query head kvh * G + i % G; rows past R repeat the last one, so
      // their lanes compute something finite that is never written out.
      for (int64_t i = 0; i < rp; ++i) {
        const int64_t row = std::min(i, R - 1);
        const q_t* src = q_ptr + ((t.row_begin + row / G) * Hq + kvh * G + row % G) * D;
        for (int64_t d = 0; d < D; ++d) qt[d * rp + i] = to_float(src[d]) * fscale;
        context[i] = first_position + row / G + 1;
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t end = context[R - 1];  // the tile's last token sees the most keys
      for (int64_t start = 0; start < end; start += span_keys) {
        const int64_t n = std::min(span_keys, end - start);
        for (int64_t j0 = 0; j0 < n; j0 += BS) {
          const int64_t block = table[(start + j0) / BS];
          TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables holds block id ", block, " outside [0, ",
                      num_blocks, ")");
          const int64_t base = block * BS * token_stride + kvh * D;
          for (int64_t j = j0; j < std::min(n, j0 + BS); ++j) {
            const cache_t* krow = k_ptr + base + (j - j0) * token_stride;
            for (int64_t d = 0; d < D; d += W) Lanes::store(kf.data() + j * D + d, Lanes::load(krow + d));
            vrows[j] = v_ptr + base + (j - j0) * token_stride;
          }
        }
        for (int64_t i = 0; i < rp; ++i) seen[i] = static_cast<float>(std::clamp<int64_t>(context[i] - start, 0, n));
        span_scores(qt.data(), rp, kf.data(), D, n, st.data());
        span_softmax(st.data(), rp, n, seen.data(), m.data(), l.data(), alpha.data());
        span_pv(acc.data(), D, alpha.data(), st.data(), R, rp, vrows.data(), n);
      }
      for (int64_t i = 0; i < R; ++i) {
        q_t* o = out_ptr + ((t.row_begin + i / G) * Hq + kvh * G + i % G) * D;
        const float inv = 1.f / l[i];  // every row sees at least its own token
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<q_t>(acc[i * D + d] * inv);
      }
    };
    for (int64_t lane = first_lane; lane < last_lane; ++lane) {
      for (int64_t item = lane; item < items; item += lanes) attend_item(item);
    }
  });
}

#endif  // PAGEDSERVE_BLOCK_STEP

}  // namespace

// Entry points (cpu_ops.h).
namespace cpu_ops {

void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                             const at::Tensor& block_tables, double scale) {
  check_query_and_cache("paged_prefill_attention", out, q, k_cache, v_cache);
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.scalar_type() == at::kInt,
              "cu_seqlens_q, seq_lens and block_tables must be int32");
  TORCH_CHECK(cu_seqlens_q.is_contiguous() && seq_lens.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.stride(1) == 1,
              "cu_seqlens_q and seq_lens must be contiguous, block_tables [num_seqs, max_blocks] with contiguous rows");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) == seq_lens.size(0),
              "cu_seqlens_q needs one entry more than seq_lens, block_tables one row per sequence");
  TORCH_CHECK(prefill_attention_supported(q.size(2)),
              "paged_prefill_attention needs AVX-512 or AVX2 and FMA, and a head_dim that is a whole number of "
              "registers (16 or 8 lanes) up to 128");
#if defined(PAGEDSERVE_BLOCK_STEP)
  if (q.size(0) == 0) return;
  dispatch_query_and_cache("paged_prefill_attention", q, k_cache, [&](auto q_tag, auto cache_tag) {
    run<decltype(q_tag), decltype(cache_tag)>(out, q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale);
  });
#endif
}

}  // namespace cpu_ops

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
      "Tensor seq_lens, Tensor block_tables, float scale) -> ()");
  m.def("prefill_attention_supported(int head_dim) -> bool", &prefill_attention_supported);
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("paged_prefill_attention", &cpu_ops::paged_prefill_attention); }
