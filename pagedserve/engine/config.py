"""Engine configuration: the contract's ``LLM(...)`` arguments, validated and resolved against the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREEMPTION_MODES = ("swap", "recompute", "auto")
# The scheduler's tables have a row per sequence slot, allocated up front: two billion slots asked for terabytes and
# failed deep in numpy, a million took a gigabyte for nothing. Far past what one engine batches.
MAX_NUM_SEQS_LIMIT = 65536


_DTYPE_SPELLINGS = {"half": "float16", "float": "float32", torch.float16: "float16", torch.float32: "float32",
                    torch.bfloat16: "bfloat16"}


@dataclass
class EngineConfig:
    """Everything the engine needs to know before it loads weights.

    ``None`` fields are resolved later: ``num_gpu_blocks`` from free memory, ``max_model_len`` from the model's
    config, ``max_num_batched_tokens`` from ``max_model_len``.
    """

    model: str | None = None
    block_size: int = 16
    num_gpu_blocks: int | None = None
    swap_space_gb: float = 4.0
    preemption_mode: str = "auto"
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int | None = 0  # None: unseeded (a random seed per engine)
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (debugging, A/B benchmarks)
    share_blocks: bool = True  # False: forks copy every block (the baseline block sharing is measured against)
    # Ranks the model is sharded over (one process each; on CUDA one GPU each, cuda:0 .. cuda:N-1 from the
    # driver's device on): engine/tensor_parallel.py.
    tensor_parallel_size: int = 1
    # Read a step's sampled tokens back while the next step runs (``LLMEngine.step``). None: on where the device
    # runs asynchronously to the host (CUDA, one process), off on the CPU, where it would only delay outputs.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")

        if not isinstance(self.block_size, int) or self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            fail("block_size", "must be a power of two in [1, 128]")
        if self.num_gpu_blocks is not None and (not isinstance(self.num_gpu_blocks, int) or self.num_gpu_blocks < 1):
            fail("num_gpu_blocks", "must be a positive integer or None")
        if isinstance(self.swap_space_gb, bool) or not isinstance(self.swap_space_gb, (int, float)) \
                or not math.isfinite(self.swap_space_gb) or self.swap_space_gb < 0:
            fail("swap_space_gb", "must be a finite number >= 0")
        if self.preemption_mode not in PREEMPTION_MODES:
            fail("preemption_mode", f"must be one of {PREEMPTION_MODES}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) \
                or not 1 <= self.max_num_seqs <= MAX_NUM_SEQS_LIMIT:
            fail("max_num_seqs", f"must be an integer in [1, {MAX_NUM_SEQS_LIMIT}]")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            fail("max_num_batched_tokens", "must be an integer >= 1 or None")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            fail("max_model_len", "must be an integer >= 2 or None")
        # vLLM's other spellings: its "half" and "float", and torch dtypes themselves
        self.dtype = _DTYPE_SPELLINGS.get(self.dtype, self.dtype) if isinstance(self.dtype, (str, torch.dtype)) \
            else self.dtype
        if self.dtype not in ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
            fail("dtype", "must be auto, float32, float16 or bfloat16 (or half, float, a torch dtype)")
        if not isinstance(self.enforce_eager, bool):
            fail("enforce_eager", "must be a bool")
        if not isinstance(self.share_blocks, bool):
            fail("share_blocks", "must be a bool")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            fail("async_scheduling", "must be a bool or None")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            fail("tensor_parallel_size", "must be an integer >= 1")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            fail("async_scheduling", "needs tensor_parallel_size 1: the ranks take every input token from the host")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            fail("seed", "must be an integer in [0, 2**63) or None")
        if not 0 < self.gpu_memory_utilization <= 1:
            fail("gpu_memory_utilization", "must be in (0, 1]")
        try:
            self.torch_device
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not usable: {exc}") from exc
        dev = self.torch_device
        if dev.type == "cuda":
            visible = torch.cuda.device_count()
            if (dev.index or 0) >= visible:
                seen = f"{visible} visible: cuda:0 to cuda:{visible - 1}" if visible else "none visible: use 'cpu' or 'auto'"
                fail("device", f"names a CUDA device this torch cannot see ({seen})")
            if (dev.index or 0) + self.tensor_parallel_size > visible:
                fail("tensor_parallel_size", f"needs one GPU per rank from {dev} on; {visible} visible")
        if dev.type not in ("cpu", "cuda") and self.tensor_parallel_size > 1:
            fail("tensor_parallel_size", f"> 1 needs a cpu or cuda device, not {dev.type}")

    def rank_device(self, rank: int) -> str:
        """The device of tensor-parallel rank ``rank``: the next GPU along from the driver's, or the CPU."""
        dev = self.torch_device
        return f"cuda:{(dev.index or 0) + rank}" if dev.type == "cuda" else str(dev)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        """``auto``: the checkpoint's half dtype on CUDA (bf16 if it is fp32), fp32 on CPU."""
        names = {
            "float32": torch.float32, "fp32": torch.float32,
            "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        }
        if self.dtype != "auto":
            return names[self.dtype]
        if self.torch_device.type != "cuda":
            return torch.float32
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def available_memory_bytes() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, lowered to what a cgroup (container) limit
    leaves and to what an address-space limit (``ulimit -v``: every mapping counts, the KV pool's included) leaves.
    None where none is known (not Linux)."""
    avail = _meminfo_and_cgroup()
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            left = max(0, soft - size)
            avail = left if avail is None else min(avail, left)
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    return avail


def _meminfo_and_cgroup() -> int | None:
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if limit != "max":
            left = max(0, int(limit) - current)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail
