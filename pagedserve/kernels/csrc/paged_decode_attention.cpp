// Paged decode attention on the CPU, reading K/V through the block table in place.
//
// One query token per sequence. Layouts are those of kernels/reference.py:
//   q, out              [S, Hq, D]               (fp32 or bf16; out has q's dtype)
//   k_cache, v_cache    [NB, BS, Hkv, D]         (fp32 or bf16, contiguous)
//   block_tables        [S, max_blocks] int32    (entries past a sequence's blocks are never read)
//   seq_lens            [S] int32                (0 = batch padding: that row's output is zeros)
//
// Work item = (sequence, KV heads, partition): every KV head of a sequence when there are at least as many
// sequences as threads (a block is then read front to back), else one KV head. The Hq / Hkv query heads of a
// KV head are computed together, so each K/V row is read from memory once and reused for the whole group
// (GQA). The softmax is the
// online one in fp32, updated once per cache block: scores of the block's tokens first, then one rescale of
// the running sum and accumulator, then the V rows. When there are fewer (sequence, KV head) items than
// threads, long contexts are cut into partitions of whole blocks; each partition keeps its own max, sum and
// accumulator and a second pass merges them (the split-K of flash decoding).
//
// Where the CPU has AVX-512, or AVX2 and FMA, and head_dim is a whole number of registers (16 or 8 lanes) up to
// 128, a block's step runs in those registers (paged_attention_block.h). Otherwise the inner loops run on fp32
// rows in eight-lane vectors
// (-O3 -march=native: AVX2 and FMA); a bf16 block's K/V rows are widened into an fp32 tile first (a shift
// per element), then the same loops run.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_ops.h"
#include "paged_attention_args.h"
#include "paged_attention_block.h"
#include "vec8.h"
#include "kernel_threads.h"

namespace {

// Shortest partition of a split context: below this the merge pass costs more than the extra thread saves.
constexpr int64_t kMinPartitionTokens = 256;
// How many blocks ahead of the one being computed its K/V rows are requested (one paid, two did not).
constexpr int64_t kPrefetchBlocks = 1;

// p[j] = exp(p[j] - top) for j < n; returns their sum.
inline float exp_shifted(float* p, int64_t n, float top) {
  vec8 sum8 = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const vec8 e = exp8(load8(p + j) - top);
    store8(p + j, e);
    sum8 += e;
  }
  float sum = hsum(sum8);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - top);
    sum += p[j];
  }
  return sum;
}

inline float dot(const float* a, const float* b, int64_t d) {
  vec8 s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
  }
  for (; i + 8 <= d; i += 8) s0 += load8(a + i) * load8(b + i);
  float sum = hsum(s0 + s1);
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[d0, d0 + 8R) = alpha * acc + sum_j p[j] * v_j[d0, d0 + 8R): the accumulator stays in R registers
// while the block's V rows stream past.
template <int R>
inline void pv_lanes(float* acc, float alpha, const float* p, const float* v, int64_t v_stride, int64_t n,
                     int64_t d0) {
  vec8 r[R];
  for (int k = 0; k < R; ++k) r[k] = load8(acc + d0 + 8 * k) * alpha;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vr = v + j * v_stride + d0;
    for (int k = 0; k < R; ++k) r[k] += pj * load8(vr + 8 * k);
  }
  for (int k = 0; k < R; ++k) store8(acc + d0 + 8 * k, r[k]);
}

inline void pv(float* acc, float alpha, const float* p, const float* v, int64_t v_stride, int64_t n, int64_t d) {
  int64_t d0 = 0;
  for (; d0 + 32 <= d; d0 += 32) pv_lanes<4>(acc, alpha, p, v, v_stride, n, d0);
  for (; d0 + 8 <= d; d0 += 8) pv_lanes<1>(acc, alpha, p, v, v_stride, n, d0);
  for (; d0 < d; ++d0) {  // a head_dim that is not a multiple of 8
    float a = acc[d0] * alpha;
    for (int64_t j = 0; j < n; ++j) a += p[j] * v[j * v_stride + d0];
    acc[d0] = a;
  }
}

// n rows of D cache elements, ``stride`` apart, as fp32 rows: in place for fp32 (row stride ``stride``),
// else widened into ``tile`` (row stride D; bf16 -> fp32 is a 16-bit shift).
inline const float* fp32_rows(const float* rows, int64_t, int64_t, int64_t, float*, int64_t* row_stride) {
  return rows;
}
inline const float* fp32_rows(const c10::BFloat16* rows, int64_t n, int64_t d, int64_t stride, float* tile,
                              int64_t* row_stride) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(rows + j * stride);
    uint32_t* dst = reinterpret_cast<uint32_t*>(tile + j * d);
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
  }
  *row_stride = d;
  return tile;
}

// Requests ``n`` rows of ``width`` cache elements, ``stride`` apart, into the cache ahead of their use: blocks
// of a sequence are scattered over the pool, so the hardware prefetcher, which follows addresses within a
// page, starts cold at every block.
template <typename T>
inline void prefetch_rows(const T* rows, int64_t n, int64_t width, int64_t stride) {
  for (int64_t j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(rows + j * stride);
    for (int64_t byte = 0; byte < width * static_cast<int64_t>(sizeof(T)); byte += 64) {
      __builtin_prefetch(row + byte, 0, 3);
    }
  }
}

struct Shape {
  int64_t num_seqs, num_q_heads, num_kv_heads, head_dim, group, block_size, num_blocks, max_blocks;
};

// Per-thread scratch of attend_range.
struct Scratch {
  std::vector<float> qf, scores, k_tile, v_tile, alpha;
#if defined(PAGEDSERVE_BLOCK_STEP)
  std::vector<block_step::reg> part;
#endif
  Scratch(const Shape& sh, int64_t kv_heads)
      : qf(kv_heads * sh.group * sh.head_dim), scores(sh.group * sh.block_size),
        k_tile(sh.block_size * sh.head_dim), v_tile(sh.block_size * sh.head_dim), alpha(sh.group)
#if defined(PAGEDSERVE_BLOCK_STEP)
        , part(block_step::W * sh.group)
#endif
  {}
};

// Attends the query heads of KV heads [kv_begin, kv_end) of one sequence over tokens [begin, end), block by
// block, every KV head of a block before the next block (a block's token rows are contiguous across heads).
// ``w.qf`` holds the query rows of those heads in fp32, already multiplied by the softmax scale. On return,
// for the g-th query head of KV head kv_begin + i, at o = i * heads_stride + g: ``m_all[o]``/``l_all[o]`` are
// its running max and sum of exp(score - max), and ``acc_all + o * D`` its unnormalised output row; an empty
// range leaves m = -inf, l = 0, acc = 0.
template <typename cache_t>
void attend_range(const Shape& sh, const cache_t* k_cache, const cache_t* v_cache, const int32_t* table,
                  int64_t kv_begin, int64_t kv_end, int64_t begin, int64_t end, Scratch& w, float* m_all,
                  float* l_all, float* acc_all, int64_t heads_stride) {
  const int64_t G = sh.group, D = sh.head_dim, BS = sh.block_size;
  const int64_t token_stride = sh.num_kv_heads * D;
  float* scores = w.scores.data();
  // The block step requests the next block's rows a row at a time as it computes (paged_attention_block.h);
  // the plain path asks for the whole block up front.
#if defined(PAGEDSERVE_BLOCK_STEP)
  const bool block_step_path = block_step::handles(D);
#else
  const bool block_step_path = false;
#endif
  for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
    const int64_t off = (kvh - kv_begin) * heads_stride;
    std::fill(m_all + off, m_all + off + G, -std::numeric_limits<float>::infinity());
    std::fill(l_all + off, l_all + off + G, 0.f);
    std::fill(acc_all + off * D, acc_all + (off + G) * D, 0.f);
  }
  for (int64_t start = begin; start < end;) {
    const int64_t block_idx = start / BS;
    const int64_t offset = start % BS;
    const int64_t n = std::min(BS - offset, end - start);  // tokens of this block in range
    const int64_t block = table[block_idx];
    TORCH_CHECK(block >= 0 && block < sh.num_blocks, "block_tables holds block id ", block, " outside [0, ",
                sh.num_blocks, ")");
    int64_t next = -1;  // blocks sit anywhere in the pool: a later one's rows are requested while this one runs
    if ((block_idx + kPrefetchBlocks) * BS < end) {
      const int64_t b = table[block_idx + kPrefetchBlocks];
      if (b >= 0 && b < sh.num_blocks) next = b;
    }
    if (next >= 0 && !block_step_path) {
      const int64_t rows = std::min(BS, end - (block_idx + kPrefetchBlocks) * BS);
      prefetch_rows(k_cache + next * BS * token_stride + kv_begin * D, rows, (kv_end - kv_begin) * D, token_stride);
      prefetch_rows(v_cache + next * BS * token_stride + kv_begin * D, rows, (kv_end - kv_begin) * D, token_stride);
    }
    for (int64_t kvh = kv_begin; kvh < kv_end; ++kvh) {
    const int64_t off = (kvh - kv_begin) * heads_stride;
    float* m = m_all + off;
    float* l = l_all + off;
    float* acc = acc_all + off * D;
    const float* qf = w.qf.data() + (kvh - kv_begin) * G * D;
    const int64_t base = (block * BS + offset) * token_stride + kvh * D;
#if defined(PAGEDSERVE_BLOCK_STEP)
    if (block_step_path) {
      const int64_t next_base = next * BS * token_stride + kvh * D;
      block_step::attend_block(qf, G, D, k_cache + base, v_cache + base, token_stride, n, scores, BS,
                               w.part.data(), w.alpha.data(), m, l, acc, next >= 0 ? k_cache + next_base : nullptr,
                               next >= 0 ? v_cache + next_base : nullptr);
      continue;
    }
#endif
    int64_t k_stride = token_stride, v_stride = token_stride;
    const float* k = fp32_rows(k_cache + base, n, D, token_stride, w.k_tile.data(), &k_stride);
    // scores[g * BS + j] = q_g . k_j  (each K row read once for the whole group)
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t g = 0; g < G; ++g) scores[g * BS + j] = dot(qf + g * D, k + j * k_stride, D);
    }
    const float* v = fp32_rows(v_cache + base, n, D, token_stride, w.v_tile.data(), &v_stride);
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores + g * BS;
      float block_max = sg[0];
      for (int64_t j = 1; j < n; ++j) block_max = std::max(block_max, sg[j]);
      const float m_new = std::max(m[g], block_max);
      const float alpha = std::exp(m[g] - m_new);  // 0 on the first block (m = -inf)
      const float sum = exp_shifted(sg, n, m_new);
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
      pv(acc + g * D, alpha, sg, v, v_stride, n, D);
    }
    }
    start += n;
  }
}

template <typename q_t, typename cache_t>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, const Shape& sh,
         int64_t partition_tokens, int64_t num_partitions) {
  const int64_t G = sh.group, D = sh.head_dim, Hkv = sh.num_kv_heads, P = num_partitions;
  const q_t* q_ptr = q.data_ptr<q_t>();
  q_t* out_ptr = out.data_ptr<q_t>();
  const cache_t* k_ptr = k_cache.data_ptr<cache_t>();
  const cache_t* v_ptr = v_cache.data_ptr<cache_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const float fscale = static_cast<float>(scale);

  // Partial results of every (sequence, KV head, partition), laid out [S, Hkv, P, G]: max and sum per
  // query head, and the accumulator row per query head when there is a merge pass.
  const int64_t partials = sh.num_seqs * Hkv * P;
  std::vector<float> part_m(partials * G), part_l(partials * G), part_acc(P > 1 ? partials * G * D : 0);
  // A work item is one partition of one sequence over a range of KV heads: all of them when sequences alone
  // keep every thread busy (each block is then read front to back once), else one.
  const int64_t heads_per_item = sh.num_seqs >= at::get_num_threads() ? Hkv : 1;
  const int64_t head_chunks = Hkv / heads_per_item;
  const int64_t items = sh.num_seqs * head_chunks * P;

  kernel_threads::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    Scratch w(sh, heads_per_item);
    std::vector<float> acc(heads_per_item * G * D);
    for (int64_t item = first; item < last; ++item) {
      const int64_t p = item % P, chunk = (item / P) % head_chunks, s = item / (P * head_chunks);
      const int64_t kv_begin = chunk * heads_per_item, kv_end = kv_begin + heads_per_item;
      const int64_t len = lens[s];
      const int64_t begin = std::min(len, p * partition_tokens);
      const int64_t end = std::min(len, begin + partition_tokens);
      const q_t* qs = q_ptr + (s * sh.num_q_heads + kv_begin * G) * D;
      for (int64_t i = 0; i < heads_per_item * G * D; ++i) w.qf[i] = to_float(qs[i]) * fscale;
      const int64_t first_partial = (s * Hkv + kv_begin) * P + p;  // heads of the item are P partials apart
      float* m = part_m.data() + first_partial * G;
      float* l = part_l.data() + first_partial * G;
      // Without a merge pass (P = 1) the accumulators are the item's own rows, else its partials'.
      float* a = P > 1 ? part_acc.data() + first_partial * G * D : acc.data();
      attend_range(sh, k_ptr, v_ptr, tables + s * table_stride, kv_begin, kv_end, begin, end, w, m, l, a,
                   P * G);
      if (P == 1) {  // no merge pass: normalise straight into out
        q_t* o = out_ptr + (s * sh.num_q_heads + kv_begin * G) * D;
        for (int64_t h = 0; h < heads_per_item * G; ++h) {
          const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // l = 0 only for an empty row: zeros
          for (int64_t i = 0; i < D; ++i) o[h * D + i] = static_cast<q_t>(a[h * D + i] * inv);
        }
      }
    }
  });
  if (P == 1) return;

  // Merge the partitions of each (sequence, KV head): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
  kernel_threads::parallel_for(0, sh.num_seqs * Hkv, 1, [&](int64_t first, int64_t last) {
    std::vector<float> total(D);
    for (int64_t sh_item = first; sh_item < last; ++sh_item) {
      const int64_t s = sh_item / Hkv, kvh = sh_item % Hkv;
      q_t* o = out_ptr + (s * sh.num_q_heads + kvh * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < P; ++p) top = std::max(top, part_m[(sh_item * P + p) * G + g]);
        std::fill(total.begin(), total.end(), 0.f);
        float denom = 0.f;
        if (top != -std::numeric_limits<float>::infinity()) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t idx = (sh_item * P + p) * G + g;
            if (part_l[idx] == 0.f) continue;  // an empty partition (past the sequence's end)
            const float w = std::exp(part_m[idx] - top);
            denom += w * part_l[idx];
            const float* a = part_acc.data() + idx * D;
            for (int64_t i = 0; i < D; ++i) total[i] += w * a[i];
          }
        }
        const float inv = denom > 0.f ? 1.f / denom : 0.f;
        for (int64_t i = 0; i < D; ++i) o[g * D + i] = static_cast<q_t>(total[i] * inv);
      }
    }
  });
}

}  // namespace

// Entry points (cpu_ops.h).
namespace cpu_ops {

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale, int64_t partition_tokens) {
  check_query_and_cache("paged_decode_attention", out, q, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1 && seq_lens.is_contiguous(),
              "block_tables must be [num_seqs, max_blocks] with contiguous rows");
  Shape sh;
  sh.num_seqs = q.size(0);
  sh.num_q_heads = q.size(1);
  sh.head_dim = q.size(2);
  sh.num_blocks = k_cache.size(0);
  sh.block_size = k_cache.size(1);
  sh.num_kv_heads = k_cache.size(2);
  sh.max_blocks = block_tables.size(1);
  TORCH_CHECK(seq_lens.size(0) == sh.num_seqs && block_tables.size(0) == sh.num_seqs,
              "seq_lens and block_tables need one row per sequence");
  sh.group = sh.num_q_heads / sh.num_kv_heads;
  if (sh.num_seqs == 0) return;

  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t s = 0; s < sh.num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= sh.max_blocks * sh.block_size, "seq_lens[", s, "] = ", lens[s],
                " does not fit its block table");
    max_len = std::max<int64_t>(max_len, lens[s]);
  }
  // partition_tokens: 0 = one partition per sequence; > 0 = that many tokens (rounded up to whole blocks);
  // < 0 = chosen here: split only when the (sequence, KV head) items cannot keep every thread busy, into
  // partitions long enough that the merge stays cheap next to the attention itself.
  if (partition_tokens < 0) {
    const int64_t work = sh.num_seqs * sh.num_kv_heads;
    const int64_t threads = at::get_num_threads();
    partition_tokens = 0;
    if (work < threads && max_len >= 2 * kMinPartitionTokens) {
      const int64_t wanted = (threads + work - 1) / work;
      partition_tokens = std::max<int64_t>(kMinPartitionTokens, (max_len + wanted - 1) / wanted);
    }
  }
  int64_t part = max_len > 0 ? max_len : 1;
  if (partition_tokens > 0 && partition_tokens < max_len) {
    part = (partition_tokens + sh.block_size - 1) / sh.block_size * sh.block_size;
  }
  const int64_t num_partitions = std::max<int64_t>(1, (max_len + part - 1) / part);

  dispatch_query_and_cache("paged_decode_attention", q, k_cache, [&](auto q_tag, auto cache_tag) {
    run<decltype(q_tag), decltype(cache_tag)>(out, q, k_cache, v_cache, block_tables, seq_lens, scale, sh, part,
                                              num_partitions);
  });
}

}  // namespace cpu_ops

TORCH_LIBRARY(pagedserve_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int partition_tokens) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("paged_decode_attention", &cpu_ops::paged_decode_attention); }
