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
// Work item = (sequence, tile of up to kTileRows consecutive rows, KV head). The tile's tokens times the KV
// head's query heads are one set of query rows for the block step (paged_attention_block.h): every K/V
// row read serves all of them, the way a GEMM tile reuses its operands. A block that a row sees only in part
// (the diagonal) is masked per row; the online softmax runs per row in fp32.
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

// Tokens per work item: 16 tokens of a 2-query-head group are 32 rows sharing each K/V row, enough to amortise
// its load, and a prompt of a few hundred tokens still splits into more items than threads.
constexpr int64_t kTileRows = 16;

struct Tile {
  int64_t seq, row_begin, row_end;
};

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

  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q must rise from 0 to q's row count");
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = cu[s], last = cu[s + 1];
    TORCH_CHECK(first <= last && last <= q.size(0), "cu_seqlens_q must rise from 0 to q's row count");
    TORCH_CHECK(last - first <= lens[s] && lens[s] <= max_blocks * BS, "seq_lens[", s, "] = ", lens[s],
                " must cover its ", last - first, " new tokens and fit its block table");
    for (int64_t r = first; r < last; r += kTileRows) tiles.push_back({s, r, std::min(r + kTileRows, last)});
  }
  TORCH_CHECK(cu[num_seqs] == q.size(0), "cu_seqlens_q must end at q's row count");

  // A lane takes items in turn (item i to lane i % lanes), not a contiguous range: a prompt's later tiles see
  // more keys and cost more, so a contiguous split hands one lane most of a long prompt's expensive end. Several
  // lanes per thread, so a thread that starts late still takes a share.
  const int64_t items = static_cast<int64_t>(tiles.size()) * Hkv;
  const int64_t lanes =
      std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads() * kernel_threads::kChunksPerThread));
  kernel_threads::parallel_for(0, lanes, 1, [&](int64_t first_lane, int64_t last_lane) {
    const int64_t max_rows = kTileRows * G;
    std::vector<float> qf(max_rows * D), scores(max_rows * BS), alpha(max_rows), m(max_rows), l(max_rows),
        acc(max_rows * D);
    std::vector<int64_t> context(max_rows), valid(max_rows);
    std::vector<block_step::reg> part(block_step::W * max_rows);
    auto attend_item = [&](int64_t item) {
      const Tile& t = tiles[item / Hkv];
      const int64_t kvh = item % Hkv, R = (t.row_end - t.row_begin) * G;
      const int64_t first_position = lens[t.seq] - (cu[t.seq + 1] - t.row_begin);
      const int32_t* table = tables + t.seq * table_stride;
      // Query rows in token-major order: row i is token t.row_begin + i / G, query head kvh * G + i % G.
      for (int64_t i = 0; i < R; ++i) {
        const q_t* src = q_ptr + ((t.row_begin + i / G) * Hq + kvh * G + i % G) * D;
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = to_float(src[d]) * fscale;
        context[i] = first_position + i / G + 1;
      }
      std::fill(m.begin(), m.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + R, 0.f);
      std::fill(acc.begin(), acc.begin() + R * D, 0.f);
      const int64_t end = context[R - 1];  // the tile's last token sees the most keys
      for (int64_t start = 0; start < end; start += BS) {
        const int64_t n = std::min(BS, end - start);
        const int64_t block = table[start / BS];
        TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables holds block id ", block, " outside [0, ",
                    num_blocks, ")");
        bool whole = true;  // every row sees the whole block: no mask
        for (int64_t i = 0; i < R; ++i) {
          valid[i] = std::clamp<int64_t>(context[i] - start, 0, n);
          whole = whole && valid[i] == n;
        }
        const int64_t base = block * BS * token_stride + kvh * D;
        block_step::attend_block(qf.data(), R, D, k_ptr + base, v_ptr + base, token_stride, n,
                                 whole ? nullptr : valid.data(), scores.data(), BS, part.data(), alpha.data(),
                                 m.data(), l.data(), acc.data());
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
