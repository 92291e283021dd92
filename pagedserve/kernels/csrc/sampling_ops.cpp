// What the sampler (engine/sampler.py) needs of every row of the logits each step: the greedy token, and the
// log-softmax's normaliser, from which the chosen token's logprob follows without writing a [rows, vocab]
// log-softmax. torch.argmax on the CPU runs several times slower than a plain max over the same row (the
// vocabulary is 49k wide on SmolLM2); here one vector pass finds the max and its first index, and one more sums
// exp(x - max).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec8.h"
#include "kernel_threads.h"

namespace {

// The widest fp32 vectors the CPU has: a sixteen-lane GCC vector on AVX2 alone is lowered piece by piece for the
// selects and conversions below, which ran at a third of torch's max + logsumexp.
#if defined(__AVX512F__)
typedef vec16 vecf;
typedef ivec16 veci;
#else
typedef vec8 vecf;
typedef ivec8 veci;
#endif
constexpr int kLanes = sizeof(vecf) / sizeof(float);

// Row r: tokens[r] = the index of its largest value (the first of equal ones; a NaN counts as the largest, as in
// torch.argmax) and lse[r] = log(sum_i exp(x_i)) (NaN where the row holds a NaN).
void argmax_logsumexp(const at::Tensor& logits, at::Tensor tokens, at::Tensor lse) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be [rows, vocab] float32 with contiguous rows");
  const int64_t R = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(V > 0, "logits need at least one column");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous() && tokens.numel() == R,
              "tokens must be int64 with one entry per row");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == R,
              "lse must be float32 with one entry per row");
  const float* base = logits.data_ptr<float>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* out = lse.data_ptr<float>();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  kernel_threads::parallel_for(0, R, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* x = base + r * stride;
      // Per lane: its largest value and where it was first seen (a strict > keeps the first of equal ones).
      vecf top = vecf{} - kInf;
      veci at = {}, nan = {};
      int64_t i = 0;
      for (; i + kLanes <= V; i += kLanes) {
        const vecf v = load_lanes<vecf>(x + i);
        const veci above = v > top;
        top = above ? v : top;
        at = above ? veci{} + static_cast<int32_t>(i) : at;
        nan |= v != v;
      }
      float m = -kInf;
      int64_t best = 0;
      bool has_nan = false;
      if (i > 0) {
        for (int k = 0; k < kLanes; ++k) m = std::max(m, top[k]);
        best = V;
        for (int k = 0; k < kLanes; ++k) {
          if (top[k] == m) best = std::min<int64_t>(best, at[k] + k);
          has_nan = has_nan || nan[k] != 0;
        }
      }
      for (; i < V; ++i) {  // the tail comes after every vector lane: only a larger value wins
        if (x[i] > m) {
          m = x[i];
          best = i;
        }
        has_nan = has_nan || std::isnan(x[i]);
      }
      if (has_nan) {
        best = 0;
        while (!std::isnan(x[best])) ++best;
        tok[r] = best;
        out[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      tok[r] = best;
      vecf sum = {};
      i = 0;
      for (; i + kLanes <= V; i += kLanes) sum += exp_lanes<vecf, veci>(load_lanes<vecf>(x + i) - m);
      float total = 0.f;
      for (int k = 0; k < kLanes; ++k) total += sum[k];
      for (; i < V; ++i) total += std::exp(x[i] - m);
      out[r] = m + std::log(total);
    }
  });
}

}  // namespace

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def("argmax_logsumexp(Tensor logits, Tensor(a!) tokens, Tensor(b!) lse) -> ()");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("argmax_logsumexp", &argmax_logsumexp); }
