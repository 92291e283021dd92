"""Huge-page-backed host tensors (engine/host_memory.py): ordinary tensors in every respect but their pages."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import pytest
import torch

from pagedserve.engine import host_memory
from pagedserve.engine.cpu_linear import in_layout, layout_of
from pagedserve.kernels import cpu_extension

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PAGEMAP = Path("/proc/self/pagemap")


def _kb_at(address: int, field: str = "AnonHugePages") -> int:
    """``field`` (kB) of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _resident_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s own pages that are in memory (/proc/self/pagemap's "present" bit, page by page).

    Exactly ``t``'s range: a mapping's Rss in smaps also counts whatever the kernel merged into that mapping, such as
    a neighbouring buffer of an earlier test with the same advice, written long ago."""
    page = mmap.PAGESIZE
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with PAGEMAP.open("rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    return sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries)) * page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("shape", [(3, 5), (64, 1024, 17), (2, 2, 300, 16, 4, 64)])
def test_empty_is_an_ordinary_contiguous_tensor(shape, dtype):
    t = host_memory.empty(shape, dtype)
    assert t.shape == torch.Size(shape) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    if t.numel() * t.element_size() >= host_memory.HUGE_PAGE:
        assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    values = torch.arange(t.numel()).reshape(shape).to(dtype)
    t.copy_(values)
    assert torch.equal(t, values)
    assert torch.equal(t.zero_(), torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("shape", [(3, 5), (64, 1024, 17)])
def test_zeros_are_zeros_and_a_large_buffer_is_not_written_until_used(shape):
    t = host_memory.zeros(shape, torch.bfloat16)
    assert t.shape == torch.Size(shape) and t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes >= host_memory.HUGE_PAGE and PAGEMAP.exists():
        assert _resident_bytes(t) < nbytes // 8, "the zeros were written"
    assert not t.any()
    t[-1] = 1
    assert t.sum().item() == t[-1].numel()


@pytest.mark.skipif(not PAGEMAP.exists(), reason="no /proc/self/pagemap here")
def test_an_engines_kv_pool_costs_no_memory_until_its_blocks_are_written(tiny_models):
    """A pool sized from the host's memory is gigabytes: writing its zeros at start took seconds and all of it
    at once. The mapping reads as zeros unwritten, and the blocks a request writes are what it comes to hold."""
    from pagedserve.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model=tiny_models["llama"], device="cpu", num_gpu_blocks=8192, max_num_seqs=4,
                       swap_space_gb=0.01)
    pool = engine.runner.kv_cache
    nbytes = pool.numel() * pool.element_size()
    assert nbytes >= 32 << 20
    assert _resident_bytes(pool) < nbytes // 8, "the pool was written at start"
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert _resident_bytes(pool) < nbytes // 2
    assert pool.abs().sum().item() > 0  # what the request wrote is there


def test_copy_of_keeps_values_and_gives_small_contiguous_tensors_back_as_they_are():
    w = torch.randn(3000, 700)
    assert torch.equal(host_memory.copy_of(w), w)
    transposed = host_memory.copy_of(w.t())
    assert transposed.is_contiguous() and torch.equal(transposed, w.t())
    small = torch.randn(16, 16)
    assert host_memory.copy_of(small) is small


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_a_large_buffer_is_backed_by_huge_pages_once_touched():
    t = host_memory.empty((8 << 20,), torch.float32).zero_()  # 32 MB: sixteen huge pages
    assert _kb_at(t.data_ptr()) >= 2048, "no huge page behind a buffer advised for them"


@pytest.mark.skipif(not cpu_extension.load(), reason="the CPU kernels did not build here")
def test_packed_weights_keep_their_values_and_layout():
    w = torch.randn(1024, 768)
    packed = in_layout(w, "panel")
    assert layout_of(packed) == "panel" and packed.data_ptr() % host_memory.HUGE_PAGE == 0
    assert torch.equal(cpu_extension.panel_unpack(packed), w)
    column = in_layout(w, "column")
    assert layout_of(column) == "column" and torch.equal(column, w)
