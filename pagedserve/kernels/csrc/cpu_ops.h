// The entry points of the CPU kernels that other kernels call directly (decoder_stack.cpp runs a whole layer
// stack through them without a trip through Python and the dispatcher per op). Each is also registered as a
// torch op under pagedserve_cpu:: by the file that defines it, with the same arguments and checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace cpu_ops {

// cpu_fused_ops.cpp
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x, const at::Tensor& residual,
                  const at::Tensor& weight, double eps);
void rotary_embedding(const at::Tensor& positions, at::Tensor q, at::Tensor k, const at::Tensor& cos,
                      const at::Tensor& sin);
void silu_and_mul(at::Tensor out, const at::Tensor& x);
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping);
// panel_linear.cpp, amx_linear.cpp
void panel_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
void amx_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);
// paged_decode_attention.cpp, paged_prefill_attention.cpp
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            int64_t partition_tokens);
void paged_prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                             double scale);

}  // namespace cpu_ops
