"""The default KV pool on the CPU: a share of the available memory, capped by what max_num_seqs sequences of
max_model_len tokens can use (no fixed size)."""

from __future__ import annotations

from pagedserve.engine import LLMEngine, model_runner
from pagedserve.engine.config import available_memory_bytes

TINY = "pagedserve-tiny-random"


def test_available_memory_is_read():
    avail = available_memory_bytes()
    assert avail is None or avail > 0


def test_pool_is_capped_by_max_num_seqs_full_length_sequences():
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=2, max_model_len=256, block_size=16, swap_space_gb=0)
    assert eng.stats()["num_gpu_blocks"] == 2 * 256 // 16


def test_pool_is_a_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: 40 << 20)
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=256, max_model_len=512, block_size=16, swap_space_gb=0)
    block_bytes = eng.runner.block_bytes
    expected = int((40 << 20) * model_runner.CPU_KV_MEMORY_FRACTION) // block_bytes
    assert 0 < expected < 256 * 512 // 16 and eng.stats()["num_gpu_blocks"] == expected
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: None)  # unknown: the fixed fallback
    eng = LLMEngine(model=TINY, device="cpu", max_num_seqs=256, max_model_len=512, block_size=16, swap_space_gb=0)
    assert eng.stats()["num_gpu_blocks"] == min(model_runner.CPU_KV_FALLBACK_BYTES // block_bytes, 256 * 512 // 16)
