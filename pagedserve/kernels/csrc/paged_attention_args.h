// What the paged attention ops (paged_decode_attention.cpp, paged_prefill_attention.cpp) check of their query,
// output and cache tensors, their dispatch over the dtypes they take, and the query's widening to fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

// q and out [rows, num_q_heads, head_dim] of one dtype; k_cache and v_cache [num_blocks, block_size,
// num_kv_heads, head_dim] of one dtype; all contiguous; query heads a multiple of the KV heads.
inline void check_query_and_cache(const char* op, const at::Tensor& out, const at::Tensor& q,
                                  const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), op, ": q and out must be [rows, num_q_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              op, ": k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              op, ": q, out, k_cache and v_cache must be contiguous");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), op, ": out must have q's dtype");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), op, ": k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2), op, ": k_cache head_dim differs from q's");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, op, ": num_q_heads must be a multiple of num_kv_heads");
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Calls run(q_tag, cache_tag) with a value of the query's and the cache's element type (float or
// c10::BFloat16): the callee takes them as ``auto`` and names the types with decltype.
template <typename Run>
void dispatch_query_and_cache(const char* op, const at::Tensor& q, const at::Tensor& k_cache, Run&& run) {
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  if (qt == at::kFloat && ct == at::kFloat) {
    run(float{}, float{});
  } else if (qt == at::kFloat && ct == at::kBFloat16) {
    run(float{}, c10::BFloat16{});
  } else if (qt == at::kBFloat16 && ct == at::kFloat) {
    run(c10::BFloat16{}, float{});
  } else if (qt == at::kBFloat16 && ct == at::kBFloat16) {
    run(c10::BFloat16{}, c10::BFloat16{});
  } else {
    TORCH_CHECK(false, op, " supports fp32 and bf16, got q ", qt, " and cache ", ct);
  }
}
