// Every decoder layer of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) for one step, in one call.
//
// Layer by layer through Python, a step pays for each op its module call, its wrapper's checks, an output
// allocation and a dispatch: about ten ops a layer, which at decode batch sizes cost as much as a shallow layer's
// arithmetic (docs/benchmarks.md). Here the same kernels run in the same order on the same tensors straight from
// C++ (cpu_ops.h), so the results are the layer-by-layer ones bit for bit; what goes is the host work between
// them. The Python model (engine/models/llama.py) stays the definition: this loop mirrors DecoderLayer.forward.
//
// Per layer, ``layers`` holds kTensorsPerLayer entries (``None`` where the model has no such tensor):
//   input_layernorm, qkv_proj (+ bias), q_norm, k_norm, o_proj (+ bias), post_attention_layernorm,
//   gate_up_proj, down_proj, k_cache, v_cache
// Linear weights are in the ``panel`` ([N / 16, K, 16]) or ``amx`` ([N / 64, K / 32, 4, 16, 32]) layout
// (engine/cpu_linear.py).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu_ops.h"

namespace {

constexpr int64_t kTensorsPerLayer = 12;
constexpr int64_t kPanelCols = 16, kAmxGroupCols = 64;

at::Tensor apply_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (weight.dim() == 5) {
    at::Tensor out = at::empty({x.size(0), weight.size(0) * kAmxGroupCols}, x.options());
    cpu_ops::amx_linear(out, x.stride(1) == 1 ? x : x.contiguous(), weight, bias);
    return out;
  }
  TORCH_CHECK(weight.dim() == 3, "decoder_stack: linear weights must be in the panel or the amx layout");
  at::Tensor out = at::empty({x.size(0), weight.size(0) * kPanelCols}, x.options());
  cpu_ops::panel_linear(out, x.contiguous(), weight, bias);
  return out;
}

// ``x`` as rows of its last dimension, contiguous (a view where the layout allows), as the ops take them.
at::Tensor as_rows(const at::Tensor& x) {
  if (x.dim() == 2 && x.stride(1) == 1) return x;
  at::Tensor r = x.reshape({-1, x.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

at::Tensor apply_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  cpu_ops::rms_norm(as_rows(out), as_rows(x), weight, eps);
  return out;
}

// (normed x + residual, x + residual)
std::tuple<at::Tensor, at::Tensor> apply_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options()), summed = at::empty(x.sizes(), x.options());
  cpu_ops::add_rms_norm(out, summed, x, residual, weight, eps);
  return {out, summed};
}

// (c10::List hands out copies: a Tensor is a reference-counted handle, so these are cheap.)
at::Tensor required(const c10::List<std::optional<at::Tensor>>& layers, int64_t i, const char* what) {
  std::optional<at::Tensor> t = layers[i];
  TORCH_CHECK(t.has_value() && t->defined(), "decoder_stack: layer ", i / kTensorsPerLayer, " has no ", what);
  return *t;
}

std::optional<at::Tensor> optional_at(const c10::List<std::optional<at::Tensor>>& layers, int64_t i) {
  std::optional<at::Tensor> t = layers[i];
  return t.has_value() && t->defined() ? t : std::nullopt;
}

at::Tensor decoder_stack(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& slot_mapping,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                         bool decode_only, int64_t num_decodes, const at::Tensor& cos, const at::Tensor& sin,
                         const c10::List<std::optional<at::Tensor>>& layers, const at::Tensor& final_norm,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "decoder_stack: hidden must be a contiguous [T, hidden]");
  TORCH_CHECK(static_cast<int64_t>(layers.size()) % kTensorsPerLayer == 0,
              "decoder_stack: layers must hold ", kTensorsPerLayer, " entries per layer");
  const int64_t T = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t num_layers = static_cast<int64_t>(layers.size()) / kTensorsPerLayer;
  // A mixed step's leading decodes (one row each) go to the decode kernel, as in a step of decodes alone; the
  // prompts' rows after them to the prefill kernel, their cu_seqlens_q counted from their first row.
  const int64_t S = seq_lens.size(0), D = decode_only ? 0 : num_decodes;
  TORCH_CHECK(D >= 0 && D <= S && D <= T, "decoder_stack: num_decodes ", num_decodes, " out of range");
  const at::Tensor prefill_cu = D > 0 ? (cu_seqlens_q.narrow(0, D, S - D + 1) - D).contiguous() : cu_seqlens_q;
  at::Tensor h = hidden, residual;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const int64_t i = layer * kTensorsPerLayer;
    const at::Tensor input_norm = required(layers, i, "input_layernorm");
    at::Tensor x;
    if (!residual.defined()) {
      residual = h;
      x = apply_rms_norm(h, input_norm, eps);
    } else {
      std::tie(x, residual) = apply_add_rms_norm(h, residual, input_norm, eps);
    }
    // Attention.
    const at::Tensor qkv = apply_linear(x, required(layers, i + 1, "qkv_proj"), optional_at(layers, i + 2));
    at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
    const std::optional<at::Tensor> q_norm = optional_at(layers, i + 3), k_norm = optional_at(layers, i + 4);
    if (q_norm.has_value()) {
      TORCH_CHECK(k_norm.has_value(), "decoder_stack: layer ", layer, " has q_norm without k_norm");
      q = apply_rms_norm(q, *q_norm, eps);
      k = apply_rms_norm(k, *k_norm, eps);
    }
    cpu_ops::rotary_embedding(positions, q, k, cos, sin);
    const at::Tensor k_cache = required(layers, i + 10, "k_cache");
    const at::Tensor v_cache = required(layers, i + 11, "v_cache");
    cpu_ops::write_kv(k, v, k_cache, v_cache, slot_mapping);
    const at::Tensor q_rows = q.contiguous();
    at::Tensor attn = at::empty(q_rows.sizes(), q_rows.options());
    if (decode_only) {
      cpu_ops::paged_decode_attention(attn, q_rows, k_cache, v_cache, block_tables, seq_lens, scale, -1);
    } else if (D > 0) {
      cpu_ops::paged_decode_attention(attn.narrow(0, 0, D), q_rows.narrow(0, 0, D), k_cache, v_cache,
                                      block_tables.narrow(0, 0, D), seq_lens.narrow(0, 0, D), scale, -1);
      cpu_ops::paged_prefill_attention(attn.narrow(0, D, T - D), q_rows.narrow(0, D, T - D), k_cache, v_cache,
                                       prefill_cu, seq_lens.narrow(0, D, S - D), block_tables.narrow(0, D, S - D),
                                       scale);
    } else {
      cpu_ops::paged_prefill_attention(attn, q_rows, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale);
    }
    h = apply_linear(attn.view({T, q_size}), required(layers, i + 5, "o_proj"), optional_at(layers, i + 6));
    // MLP.
    std::tie(x, residual) = apply_add_rms_norm(h, residual, required(layers, i + 7, "post_attention_layernorm"), eps);
    const at::Tensor gate_up = apply_linear(x, required(layers, i + 8, "gate_up_proj"), std::nullopt);
    at::Tensor act = at::empty({T, gate_up.size(1) / 2}, gate_up.options());
    cpu_ops::silu_and_mul(act, gate_up);
    h = apply_linear(act, required(layers, i + 9, "down_proj"), std::nullopt);
  }
  if (!residual.defined()) return apply_rms_norm(h, final_norm, eps);  // no layers
  return std::get<0>(apply_add_rms_norm(h, residual, final_norm, eps));
}

}  // namespace

// A fragment: paged_decode_attention.cpp holds the namespace's TORCH_LIBRARY.
TORCH_LIBRARY_FRAGMENT(pagedserve_cpu, m) {
  m.def(
      "decoder_stack(Tensor hidden, Tensor positions, Tensor slot_mapping, Tensor cu_seqlens_q, Tensor seq_lens, "
      "Tensor block_tables, bool decode_only, int num_decodes, Tensor cos, Tensor sin, Tensor?[] layers, "
      "Tensor final_norm, "
      "int num_heads, int num_kv_heads, int head_dim, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedserve_cpu, CPU, m) { m.impl("decoder_stack", &decoder_stack); }
