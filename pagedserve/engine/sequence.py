"""Sequences (one token stream each) and requests (the group of sequences one prompt produces)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from enum import Enum

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()


class RequestStatus(Enum):
    WAITING = "waiting"  # not started, or preempted by recompute (KV gone)
    RUNNING = "running"  # has KV blocks on the device
    SWAPPED = "swapped"  # preempted by swap (KV in the CPU pool)
    FINISHED = "finished"


class Sequence:
    """One token stream: prompt + generated tokens, its block table and its detokenizer state.

    Invariants: ``0 <= num_computed_tokens <= num_tokens``; the block table covers at least
    ``num_computed_tokens`` tokens while the request is running; only the table's end ever changes
    (blocks are appended, or the last block is replaced by its copy-on-write copy); a block table list is only
    ever appended to: any other change assigns a new list (the runner's ``BlockTableRows`` relies on it).

    ``num_tokens`` counts ``num_pending`` tokens beyond ``token_ids``: sampled on the device, not read back yet
    (the engine reads a step's tokens while the next step runs). At most one, always the last; its value lives
    in row ``pending_row`` of the in-flight step's token tensor, which is where the next step's input takes it
    from. Everything that reads token values (outputs, stop checks, prefix-cache hashes) sees ``token_ids``.
    """

    def __init__(self, token_ids: list[int], num_prompt_tokens: int, index: int = 0) -> None:
        self.seq_id = next(_seq_counter)
        self.index = index  # position in the request's outputs
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_registered_blocks = 0  # leading full blocks published in the prefix cache (their hashes below)
        # Chain hashes of the first full blocks of ``token_ids``, memoized: tokens are only ever appended.
        self.token_block_hashes: list[bytes] = []
        self.cache_root: bytes | None = None  # the parent hash of its first block: its request's cache_salt
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.private_copy_pending = False  # forked with sharing off: copy shared blocks at the next allocate
        self.num_emitted_tokens = 0  # output tokens already handed out in a RequestOutput
        self.seed_key: int | None = None  # seeded requests: this sample's key of counter-based draws (sampler.py)
        self.detok: IncrementalDetokenizer | None = None
        self.matcher = None  # structured outputs: its grammar matcher, which has consumed the output tokens
        self.num_pending = 0
        self.pending_row = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fork(self, index: int) -> Sequence:
        """A copy sharing nothing mutable; the block manager makes the block table shared."""
        child = Sequence(list(self.token_ids), self.num_prompt_tokens, index)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_registered_blocks = self.num_registered_blocks
        child.token_block_hashes = list(self.token_block_hashes)
        child.cache_root = self.cache_root
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = list(self.logprobs)
        if self.detok is not None:
            child.detok = self.detok.copy()
        if self.matcher is not None:
            child.matcher = self.matcher.fork()
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table})")


@dataclass
class ResumeSample:
    """What one sample of a request had already handed out before it was interrupted elsewhere (a worker that
    died mid-generation): its output tokens, the text its deltas added up to, and their logprobs when they were
    asked for. ``LLMEngine.add_request(..., resume=[...])`` continues after them, as a recompute preemption
    would: the tokens are prefilled again and count against ``max_tokens`` and the stop conditions.

    ``text`` None: the text the engine's own detokenizer would have released by then."""

    token_ids: list[int]
    text: str | None = None
    logprobs: list[dict[int, float]] | None = None


class Request:
    """A prompt and its sequences: one for plain sampling, ``n``/``best_of`` after the prompt forks, or beams.

    Scheduling order is ``(priority, arrival_time, order)``: lower priority values first, ties first-come.
    """

    _order = itertools.count()

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int = 0, deadline: float | None = None, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.priority = priority
        self.deadline = deadline
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.order = next(self._order)
        # Scheduling order; fixed at arrival (sorting every step reads it for every running request).
        self.sort_key = (priority, self.arrival_time, self.order)
        self.status = RequestStatus.WAITING
        self.seqs: list[Sequence] = [Sequence(list(prompt_token_ids), len(prompt_token_ids))]
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # request-level end: "cancelled" / "deadline"
        self.metrics: dict[str, float] = {"arrival_time": self.arrival_time}
        self.beam = None  # BeamState for beam search (pagedserve.engine.beam_search)
        self.pending_logits: dict[int, object] = {}  # seq_id -> logits row, until every beam has one
        # Total tokens when last preempted while it was the only running request (see Scheduler._preempt).
        self.tokens_at_lone_preemption: int | None = None

    @property
    def forked(self) -> bool:
        """Whether the prompt has already been split into its ``num_samples`` sequences."""
        return len(self.seqs) > 1 or self.params.num_samples == 1

    @property
    def num_tokens(self) -> int:
        """Tokens over all the request's sequences: grows with every sampled token, never on a restart."""
        return sum(s.num_tokens for s in self.seqs)

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def num_unfinished_seqs(self) -> int:
        return sum(1 for s in self.seqs if not s.finished)

    @property
    def max_seqs(self) -> int:
        """Sequences this request occupies, or will once forked (what ``max_num_seqs`` is charged)."""
        return self.num_unfinished_seqs if self.forked else self.params.num_samples

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
