"""The CPU's one-call decoder stack (kernels/csrc/decoder_stack.cpp) against the model run layer by layer.

Both run the same kernels on the same tensors, so their hidden states must be equal bit for bit: on every model
family, fp32 and bf16, for prompt, decode and mixed (chunked-prefill) steps. Greedy equality with HF transformers
through the engine (test_engine_hf.py, test_engine_bf16.py) then covers the stack too, as it is the default.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.engine import LLM, cpu_linear
from pagedserve.engine.context import StepContext, step_context
from pagedserve.kernels import cpu_extension

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="the C++ kernels did not build here")

BLOCK = 8
BLOCKS_PER_SEQ = 6


def _step(model, new_tokens: list[tuple[int, int]], vocab: int, seed: int):
    """Hidden states of one step, fused and layer by layer: ``new_tokens`` holds (tokens already cached, new
    tokens) per sequence; sequence i owns blocks ``[i * BLOCKS_PER_SEQ, (i + 1) * BLOCKS_PER_SEQ)``."""
    gen = torch.Generator().manual_seed(seed)
    positions, slots, cu, lens = [], [], [0], []
    for i, (cached, new) in enumerate(new_tokens):
        for p in range(cached, cached + new):
            positions.append(p)
            slots.append((i * BLOCKS_PER_SEQ + p // BLOCK) * BLOCK + p % BLOCK)
        cu.append(cu[-1] + new)
        lens.append(cached + new)
    tables = torch.arange(len(new_tokens) * BLOCKS_PER_SEQ, dtype=torch.int32).view(len(new_tokens), -1)
    ctx = StepContext(slot_mapping=torch.tensor(slots), cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                      seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                      decode_only=all(new == 1 for _, new in new_tokens))
    ids = torch.randint(0, vocab, (len(positions),), generator=gen)
    pos = torch.tensor(positions)
    fused = model._fused_layers
    with torch.inference_mode(), step_context(ctx):
        out_fused = model(ids, pos)
        model._fused_layers = None  # the same step again, layer by layer (it writes the same K/V again)
        try:
            out_layers = model(ids, pos)
        finally:
            model._fused_layers = fused
    return out_fused, out_layers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_stack_equals_the_layers_bit_for_bit(family, dtype, tiny_models, monkeypatch):
    if cpu_linear.layout_for(getattr(torch, dtype)) not in ("panel", "amx"):
        # oneDNN's bf16 layout (a build without AMX on a CPU with bf16 dot products) runs layer by layer; the
        # panels, which this build has, still run in the stack
        monkeypatch.setenv(cpu_linear.ENV_LINEAR, "panel")
    llm = LLM(model=tiny_models[family], device="cpu", dtype=dtype, block_size=BLOCK, num_gpu_blocks=64)
    model = llm.engine.runner.model
    assert model._fused_layers is not None, model.fuse_layers()
    vocab = model.config.vocab_size
    steps = [
        [(0, 5), (0, 17), (0, 1)],  # prompts: within a block, over two blocks, a single token
        [(5, 1), (17, 1), (1, 1)],  # decode
        [(6, 1), (18, 9), (2, 1)],  # a prompt chunk beside two decodes
        [(7, 1), (27, 1), (3, 1)],
    ]
    for seed, step in enumerate(steps):
        out_fused, out_layers = _step(model, step, vocab, seed)
        assert out_fused.dtype == getattr(torch, dtype)
        assert torch.isfinite(out_fused).all()
        assert torch.equal(out_fused, out_layers), f"step {seed}: {step}"
    llm.close()


def test_switch_and_layouts_it_does_not_take(tiny_models, monkeypatch):
    monkeypatch.setenv(cpu_extension.ENV_FUSED_LAYERS, "0")
    llm = LLM(model=tiny_models["qwen2"], device="cpu", block_size=BLOCK, num_gpu_blocks=16)
    assert llm.engine.runner.model._fused_layers is None
    llm.close()
    monkeypatch.delenv(cpu_extension.ENV_FUSED_LAYERS)
    monkeypatch.setenv("PAGEDSERVE_CPU_LINEAR", "column")  # a layout the stack does not multiply from
    llm = LLM(model=tiny_models["qwen2"], device="cpu", block_size=BLOCK, num_gpu_blocks=16)
    model = llm.engine.runner.model
    assert model._fused_layers is None
    assert "panel" in model.fuse_layers()
    llm.close()
