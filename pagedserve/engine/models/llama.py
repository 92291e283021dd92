"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flattened, unpadded batch of tokens.

Differences between the families are config switches: ``attention_bias`` / Qwen2's q/k/v bias, Qwen3's per-head
q/k RMSNorm, tied embeddings, GQA, ``head_dim`` that is not ``hidden_size / num_heads``.
Weights use HF names except for two fused projections (``qkv_proj``, ``gate_up_proj``); the loader fills them
from the HF shards.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagedserve.engine.context import get_context
from pagedserve.engine.parallel_layers import (SINGLE, ColumnParallelLinear, ParallelLMHead, Part, RowParallelLinear,
                                               TensorParallelGroup, VocabParallelEmbedding, check_divisible,
                                               gather_logits, use_linear)
from pagedserve.kernels import KernelOps

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add that precedes it (``forward(x, residual)``).

    The arithmetic is the kernel set's (``rms_norm`` / ``add_rms_norm``): fp32 inside, rounded where HF rounds.
    """

    def __init__(self, dim: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = self.ops
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def _rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    base = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if base is None:
        base = params.get("rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None) or params
    # In float32, as HF and vLLM compute it: the float64 table was more exact, and so up to 1.2e-4 off theirs near
    # position 8k, enough to move long-context logprobs past their noise.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope_type not in ("default", None):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (HF ``rotate_half``) with a precomputed cos/sin table.

    The table is computed on the CPU whatever the default device: it comes from the config, not the checkpoint,
    so a model built on the meta device keeps it real, and factory functions on the meta device would import
    torch's compiler stack (seconds of every worker's start)."""

    def __init__(self, config, head_dim: int, max_positions: int, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        inv_freq = _rope_inv_freq(config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary_embedding(positions, q, k, self.cos, self.sin)


class PagedAttention(nn.Module):
    """Rotates this step's q and k, writes its K/V into the paged cache, then attends through the block tables.

    The cache tensors are bound by the model runner after it sizes the pool (``k_cache``/``v_cache``). Kernel sets
    with ``rotary_write_kv`` rotate and write in one pass.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rotary: RotaryEmbedding) -> torch.Tensor:
        ctx = get_context()
        ops = self.ops
        if ops.rotary_write_kv is not None:
            q = ops.rotary_write_kv(positions, q, k, v, rotary.cos, rotary.sin, self.k_cache, self.v_cache,
                                    ctx.slot_mapping)
        else:
            q, k = rotary(positions, q, k)
            ops.write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.decode_only:
            return ops.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.seq_lens, ctx.block_tables, self.scale,
                                              plan=ctx.decode_plan)
        if ctx.num_decodes:  # the leading decodes by the decode kernel, as in a step without prompts
            d = ctx.num_decodes
            return torch.cat([
                ops.paged_decode_attention(q[:d], self.k_cache, self.v_cache, ctx.seq_lens[:d], ctx.block_tables[:d],
                                           self.scale, plan=ctx.decode_plan),
                ops.paged_attention(q[d:], self.k_cache, self.v_cache, ctx.prefill_cu_seqlens_q, ctx.seq_lens[d:],
                                    ctx.block_tables[d:], self.scale)])
        return ops.paged_attention(
            q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, ctx.seq_lens, ctx.block_tables, self.scale
        )


class Attention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them at ``tp.size == 1``).

    With fewer KV heads than ranks each rank holds the one KV head its query heads share (``check_divisible``
    guarantees the ranks split evenly over the KV heads).
    """

    def __init__(self, config, rotary: RotaryEmbedding, ops: KernelOps, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        total_kv = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.num_heads = total_heads // tp.size
        self.num_kv_heads = max(1, total_kv // tp.size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        o_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = o_bias or config.model_type == "qwen2"  # Qwen2 always has q/k/v bias, never o bias
        q_part = Part(self.head_dim, total_heads, tp.rank * self.num_heads, self.num_heads)
        kv_part = Part(self.head_dim, total_kv, tp.rank * total_kv // tp.size, self.num_kv_heads)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [q_part, kv_part, kv_part], bias=qkv_bias, tp=tp)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=o_bias, tp=tp)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(positions, q, k, v, self.rotary)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config, ops: KernelOps, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.ops = ops
        self.intermediate = config.intermediate_size // tp.size  # this rank's share
        part = Part(1, config.intermediate_size, tp.rank * self.intermediate, self.intermediate)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [part, part], bias=False, tp=tp)
        # SiLU-gated and without biases: load_config refuses a config.json asking for anything else.
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.gate_up_silu is not None:  # the activation applied before the projection is written
            return self.down_proj(self.ops.gate_up_silu(x, self.gate_up_proj.weight, self.gate_up_proj.matmul))
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, ops: KernelOps, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary, ops, tp)
        self.mlp = MLP(config, ops, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream)``; the next layer's norm adds them, as HF's layer would."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """The decoder; every layer calls the kernel set ``ops`` it was built with (``kernels.get_ops``).

    ``tp``: this process's rank among the tensor-parallel ranks; each holds its shard of every large weight
    (engine/parallel_layers.py) and ``compute_logits`` returns the full logits on rank 0 only.
    """

    def __init__(self, config, max_positions: int, ops: KernelOps, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__()
        self.ops = ops
        if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"model_type {config.model_type!r} is not supported")
        check_divisible(config, tp.size)
        self.config, self.tp = config, tp
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, max_positions, ops)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary, ops, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        if ops.linear is not None:
            use_linear(self, ops.linear)
        self._fused_layers: tuple | None = None  # the decoder_stack's arguments once fuse_layers() succeeded

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for the flattened tokens of one step."""
        h, residual = self.embed_tokens(input_ids), None
        if self._fused_layers is not None:
            out = self.ops.decoder_stack(h, positions, get_context(), *self._fused_layers)
            if out is not None:
                return out
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return self.norm(h, residual)[0]

    def fuse_layers(self) -> str | None:
        """From now on run every decoder layer of a step in one call to the kernel set's ``decoder_stack`` (the same
        kernels in the same order, without the host work between them); None when it will, else why not (the
        model then stays layer by layer). Call once the KV cache is bound to the attention layers.

        The stack takes each layer's tensors in DecoderLayer.forward's order, so a change to the layer must change
        both (tests/test_decoder_stack.py holds them equal)."""
        if self.ops.decoder_stack is None:
            return f"the {self.ops.name} kernel set has no decoder_stack"
        if self.tp.size > 1:
            return "tensor parallelism (the all-reduces run between a layer's ops)"
        tensors = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if any(lin.weight.dim() not in (3, 5) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                               mlp.down_proj)):
                return "a linear weight is in neither the panel nor the amx layout (engine/cpu_linear.py)"
            q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.qk_norm else (None, None)
            tensors += [layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, q_norm, k_norm,
                        attn.o_proj.weight, attn.o_proj.bias, layer.post_attention_layernorm.weight,
                        mlp.gate_up_proj.weight, mlp.down_proj.weight, attn.attn.k_cache, attn.attn.v_cache]
        first = self.layers[0].self_attn
        self._fused_layers = (tensors, self.norm.weight, first.rotary.cos.contiguous(), first.rotary.sin.contiguous(),
                              first.num_heads, first.num_kv_heads, first.head_dim, self.norm.eps, first.attn.scale)
        return None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits ``[n, vocab_size]``; on a rank other than 0, None (its slice went to rank 0)."""
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return gather_logits(hidden, weight, self.config.vocab_size, self.tp)

    def tied_logits_weight(self) -> torch.Tensor | None:
        """The input embedding where it doubles as the LM head, else None."""
        return self.embed_tokens.weight if self.tie_word_embeddings else None

    def untie_logits(self) -> ParallelLMHead:
        """Give the logits their own copy of the tied embedding (so it can take a matmul layout while the
        embedding keeps its lookup layout); the copy is the new ``lm_head``. Costs the embedding's memory again."""
        emb = self.embed_tokens
        with torch.device("meta"):  # no throw-away initialization of a vocabulary-sized weight
            head = ParallelLMHead(emb.embedding_dim, self.config.vocab_size, self.tp)
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        self.lm_head, self.tie_word_embeddings = head, False
        return head

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]
