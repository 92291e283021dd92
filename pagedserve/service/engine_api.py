"""The engine as the service sees it: the README's Step API, and nothing more.

The worker drives :class:`pagedserve.engine.LLMEngine` through the names of :class:`EngineAPI` only, so the
service depends on a contract, not on the engine's internals (it knows nothing of blocks, schedulers or
runners). Nothing here imports ``pagedserve.engine``: a producer install has no torch, and the engine is loaded
on first use, inside the worker (``Worker.engine``).

Invariants:
- every ``engine.`` the service reads or calls is named here;
- ``add_request`` raises ``ValueError`` naming the field (``PromptTooLongError`` for a prompt that cannot fit)
  and queues nothing on error; ``abort_request`` frees the request's blocks before it returns;
- ``step()`` returns one ``RequestOutput`` per request that progressed; a request the engine failed alone comes
  back finished with ``error`` set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class EngineAPI(Protocol):
    """What the worker uses of ``LLMEngine`` (the README's "Step API")."""

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # a Hugging Face tokenizer: ``chat_template``, ``apply_chat_template``
    max_token_chars: int  # the most characters one token stands for: a longer text per token cannot fit
    max_seqs_per_request: tuple[int, str]  # (most sequences one request may run, the setting that bounds it)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: Any = None, *, priority: int = 0,
        deadline: float | None = None, arrival_time: float | None = None, resume: list | None = None,
        cache_salt: str | None = None,
    ) -> None: ...  # resume: per sample, what an interrupted run handed out (engine.sequence.ResumeSample)

    def check_in_vocab(self, token_ids: list[int], what: str) -> None: ...  # ValueError: an id past the model's

    def step(self) -> list[Any]: ...  # RequestOutput per request that progressed this step

    def abort_request(self, request_id: str, reason: str = "cancelled") -> Any: ...  # its final RequestOutput

    def has_unfinished_requests(self) -> bool: ...

    def check_alive(self) -> None: ...  # raises EngineDeadError when no step could run (checked when idle too)

    def structured_ready(self, params: Any) -> bool: ...  # add_request would not wait for a grammar compile

    def stats(self) -> Mapping[str, Any]: ...

    def close(self) -> None: ...  # release what outlives the engine (tensor-parallel rank processes)

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_free_gpu_blocks(self) -> int: ...  # free blocks of the device KV pool

    num_advanced: int  # requests moved on by a token, summed over steps (beams and unshown samples too): progress

    def kv_room(self, priority: int = 0) -> int: ...  # requests of ``priority`` the KV pool could start (preempting)

    def num_unstarted_worse_than(self, priority: int = 0) -> int: ...  # worse requests waiting, never scheduled
