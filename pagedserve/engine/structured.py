"""Structured outputs: sampling constrained to a JSON Schema, a regex, a list of choices or a grammar.

A request asks with ``SamplingParams(structured_outputs={...})`` (the field's rules:
``pagedserve.engine.structured_spec``). The pieces, each used by the engine in one place:

- :class:`StructuredOutputs`: one per engine. Compiles each distinct ``(kind, spec, whitespace)`` once on a small
  thread pool (never on the step loop), keeps the compiled grammars in an LRU cache bounded by an estimate of
  their memory, :data:`CACHE_BYTES` (failures too, so a bad schema sent again fails without compiling again),
  and refuses a compile whose own run takes longer than ``PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S`` (the time a
  spec waits behind other specs' compiles does not count: a slow spec must not fail a fast one). It hands out one
  :class:`Matcher` per sequence and fills the batch's token bitmask. A grammar whose masks cost more than
  ``PAGEDSERVE_STRUCTURED_MAX_MASK_MS`` of CPU per token is refused when it compiles (a mask of its start state is
  timed), or ends its request when that happens later in the output (three masks in a row): one request's grammar
  must not slow every other request's tokens.
- :func:`apply_token_bitmask`: sets the logits of disallowed tokens to ``-inf``, in place on the logits'
  device, before the sampler runs (so penalties, top-k/top-p/min-p and logprobs all see the constrained
  distribution).
- :func:`withhold`: ``min_tokens`` for a constrained row, on its bitmask: the stop tokens are held back only while
  the grammar allows another token (a complete output ends; the grammar's end wins over ``min_tokens``).

Invariants: a sequence's matcher has consumed exactly its output tokens (preemption keeps the output tokens,
so a recompute or a swap needs nothing; :meth:`Matcher.rebuild` replays tokens for a sequence whose matcher
must be made again); the mask always allows at least one token (a finished or failed matcher allows only EOS).

The backend is behind :class:`GrammarBackend`; the only one is llguidance
(``pagedserve.engine.structured_llguidance``), chosen over xgrammar by measurement (its docstring says why).
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import torch

from pagedserve.engine.device_copy import upload
from pagedserve.engine.engine_env import (  # noqa: F401 (its variables, read here, and named from here too)
    DEFAULT_COMPILE_TIMEOUT_S,
    DEFAULT_MAX_MASK_MS,
    MAX_MASK_ENV,
    TIMEOUT_ENV,
    compile_timeout_from_env,
    max_mask_ms_from_env,
)
from pagedserve.engine.structured_spec import KINDS, cache_key, kind_of, structured_error

# The compile cache's budget per engine, in bytes of its estimate of what its entries cost (a grammar's
# ``nbytes``, the backend's estimate, plus its key, which holds the spec's text). Bounded in bytes, not entries:
# one grammar of a large schema costs thousands of times what a small one does, and any producer may send such
# schemas. The size of vLLM's default for its own grammar cache (VLLM_XGRAMMAR_CACHE_MB).
CACHE_BYTES = 512 << 20
# A cached failure: its exception (without its traceback) and message, besides its key.
FAILURE_BYTES = 2048
# llguidance compiles a chain of rules (r0 -> r1 -> ...) recursively: some 3,000 of them, well inside
# MAX_SPEC_CHARS, overflow a default 8 MiB thread stack and kill the process (SIGSEGV, every request of the worker
# with it). The longest chain that limit admits, as Lark rules or JSON-schema $refs, compiles in 32 MiB; compile
# threads get twice that (address space: a page is only taken when touched).
COMPILE_STACK_BYTES = 64 << 20
_STACK_SIZE_LOCK = threading.Lock()  # threading.stack_size is process-wide: set it only around thread creation
# A compile past its timeout has had its requests refused, but llguidance cannot be interrupted: it keeps its
# thread until it ends. The pool has this many threads beyond its ``max_workers`` for such compiles, so that they
# do not keep the pool from starting the specs behind them. Bounded, since each still burns a core and holds
# memory: past the bound, the specs behind wait for one of them to end.
MAX_ABANDONED_COMPILES = 4


# ---------------------------------------------------------------------- the backend interface
class Matcher(Protocol):
    """One sequence's position in its grammar. Not thread-safe; the engine uses it from the step loop only."""

    # The kind its request is counted as at its first mask (set by StructuredOutputs.new_matcher; None after
    # that, and in forks): a request counts once it runs, not when it is added (a batch refused part-way, after
    # its first requests were added, runs none of them).
    uncounted: str | None

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (int32, CPU, contiguous; bit ``t % 32`` of word ``t // 32``).
        Raises ``GrammarFailed`` when the grammar can no longer be followed (its request then ends with it)."""

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (the next mask then raises)."""

    def is_terminated(self) -> bool:
        """True once EOS was accepted (the grammar was complete): the sequence is over."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    def rebuild(self, token_ids: list[int]) -> None:
        """Back to the start, then accept ``token_ids`` (a sequence's output so far)."""

    def fork(self) -> Matcher:
        """An independent copy in the same state (``n``/``best_of`` samples)."""


class CompiledGrammar(Protocol):
    def matcher(self) -> Matcher:
        """A new matcher at the grammar's start (cheap: compiled state is shared)."""


class GrammarBackend(Protocol):
    name: str
    version: str
    vocab_size: int  # bits per bitmask row
    # CPU milliseconds a mask may cost per token (set by StructuredOutputs before the first compile): a grammar
    # over it at its start is refused by compile; a matcher over it for several masks in a row raises GrammarFailed.
    max_mask_ms: float

    def compile(self, spec: dict) -> CompiledGrammar:
        """Compile a validated spec; raises ``ValueError`` starting with ``structured_outputs`` if it is unusable.
        Called on a worker thread."""

    def fill_bitmasks(self, matchers: list[Matcher], bitmask: torch.Tensor) -> list[float]:
        """Row ``i`` of ``bitmask`` for ``matchers[i]``; returns the seconds each row took (or their share)."""


def default_backend(tokenizer, vocab_size: int, eos_token_ids) -> GrammarBackend:
    from pagedserve.engine.structured_llguidance import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size, sorted(eos_token_ids))


def _key_bytes(key: tuple) -> int:
    """What a cache key holds: the spec's text (a schema's canonical JSON, a regex, a grammar) or choices."""
    return sum(sum(map(sys.getsizeof, part)) if isinstance(part, tuple) else sys.getsizeof(part) for part in key)


class _Entry:
    """One cache entry: the compile's future; when the compile started on a pool thread (None while it waits
    behind other compiles; its timeout runs from its start, for every request that shares it; a compile that
    finishes after its timeout serves the requests that come later); and the bytes it is charged (its key until
    the compile ends, then the grammar's estimate too)."""

    __slots__ = ("future", "started", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.future: Future | None = None  # set right after the compile is submitted, under StructuredOutputs._lock
        self.started: float | None = None
        self.nbytes = nbytes


class StructuredOutputs:
    """Per engine: compile and cache grammars off the step loop, make matchers, fill the batch bitmask.

    ``backend_factory`` builds the backend on first use, on the compile thread (wrapping a large tokenizer
    for llguidance takes up to a second, which an engine that never sees a structured request never pays).
    ``compile_timeout_s`` and ``max_mask_ms`` default to their settings in the environment. ``cache_bytes``:
    the compile cache's budget (:data:`CACHE_BYTES`); past it, the least recently used entries go (a compile
    still running or waiting is only dropped from the cache: the requests waiting for it still get it).

    ``max_workers``: compiles within their timeout that run at once; the others wait, first come first served,
    and their timeout starts when they do. A compile past its timeout no longer counts against ``max_workers``:
    it runs on to its end on one of :data:`MAX_ABANDONED_COMPILES` more threads.
    """

    def __init__(self, backend_factory, compile_timeout_s: float | None = None, max_workers: int = 2,
                 cache_bytes: int = CACHE_BYTES, max_mask_ms: float | None = None) -> None:
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self.compile_timeout_s = compile_timeout_from_env() if compile_timeout_s is None else compile_timeout_s
        self.max_mask_ms = max_mask_ms_from_env() if max_mask_ms is None else max_mask_ms
        self._max_live = max_workers
        self._pool = ThreadPoolExecutor(max_workers=max_workers + MAX_ABANDONED_COMPILES,
                                        thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._cache_budget = cache_bytes
        self.cache_bytes = 0  # what the entries in the cache are charged, together
        self._lock = threading.Lock()
        # Notified when a compile starts or ends and when a future is done (under _lock).
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Entry] = deque()  # submitted, not started: started in this order
        self._compiling: set[_Entry] = set()  # started, not ended (past their timeout or not)
        self._closed = False
        # Figures for stats() and the benchmark (the deques keep the latest, the totals everything).
        self.compile_seconds: deque[float] = deque(maxlen=10_000)  # each finished compile
        self.mask_seconds: deque[float] = deque(maxlen=100_000)  # each bitmask row (one token of one sequence)
        self.compile_seconds_total = 0.0
        self.mask_seconds_total = 0.0
        self.mask_rows = 0
        self.num_compiles = 0
        self.num_cache_hits = 0
        self.requests_by_kind: dict[str, int] = {}

    # ------------------------------------------------------------------ compiling
    @property
    def backend(self) -> GrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                backend = self._factory()
                backend.max_mask_ms = self.max_mask_ms
                self._backend = backend
            return self._backend

    def _compile(self, spec: dict) -> CompiledGrammar:
        started = time.perf_counter()
        try:
            return self.backend.compile(spec)
        except Exception as e:
            # The cache keeps a failure's exception: not its traceback, whose frames hold what the failed compile
            # built (a matcher of a large grammar is megabytes).
            failure = e.with_traceback(None)
            if failure.__suppress_context__:  # raised "from None": the exception it replaced holds frames too
                failure.__context__ = None
        finally:
            seconds = time.perf_counter() - started
            with self._lock:  # compiles finish on several threads
                self.compile_seconds.append(seconds)
                self.compile_seconds_total += seconds
        raise failure

    def _run(self, entry: _Entry, key: tuple, spec: dict) -> CompiledGrammar:
        """On a pool thread: wait for a turn (:meth:`_start`), compile, charge the entry what the grammar costs
        (the backend's estimate, ``nbytes``; a failure, :data:`FAILURE_BYTES`) and let the next one start. The
        charge comes before the future resolves, so whoever its result wakes sees the cache within its budget."""
        extra = FAILURE_BYTES
        try:
            self._start(entry)
            grammar = self._compile(spec)
            extra = int(getattr(grammar, "nbytes", 0))
            return grammar
        finally:
            with self._changed:
                if entry.started is None and entry in self._queue:  # never started (the backend failed)
                    self._queue.remove(entry)
                self._compiling.discard(entry)
                if self._cache.get(key) is entry:
                    entry.nbytes += extra
                    self.cache_bytes += extra
                    self._evict()
                self._changed.notify_all()

    def _start(self, entry: _Entry) -> None:
        """Wait until ``entry`` is the first submitted of those not started and fewer than ``max_workers``
        compiles are within their timeout, then stamp its start. A compile past its timeout leaves its turn to
        the next one here (the pool's extra threads run both). The backend is built first: its setup (the
        tokenizer's, about a second) is no grammar's and does not count against the first compile's timeout."""
        self.backend  # noqa: B018 (built here, off the clock)
        with self._changed:
            while True:
                if self._closed:
                    raise RuntimeError("the grammar compiler is closed (its engine was shut down)")
                while self._queue and self._queue[0].future.cancelled():  # cancelled: never runs
                    self._queue.popleft()
                now = time.monotonic()
                deadlines = [e.started + self.compile_timeout_s for e in self._compiling
                             if now - e.started < self.compile_timeout_s]
                full = len(deadlines) >= self._max_live
                if not full and self._queue[0] is entry:
                    break
                # Woken by a start, an end or a future done; when full, also when a compile passes its timeout.
                self._changed.wait(min(deadlines) - now if full else None)
            self._queue.popleft()
            entry.started = time.monotonic()
            self._compiling.add(entry)
            self._changed.notify_all()

    def _submit(self, entry: _Entry, key: tuple, spec: dict) -> Future:
        """The compile on the pool, whose threads (created inside ``submit``, when needed) get the deep stack."""
        with _STACK_SIZE_LOCK:
            previous = threading.stack_size(COMPILE_STACK_BYTES)
            try:
                return self._pool.submit(self._run, entry, key, spec)
            finally:
                threading.stack_size(previous)

    def compile_async(self, spec: dict) -> Future:
        """The future of ``spec``'s compiled grammar: shared with every earlier request for the same grammar."""
        return self._entry(spec).future

    def _entry(self, spec: dict) -> _Entry:
        """``spec``'s cache entry, its compile submitted if it was not cached (the entry is not necessarily
        cached any more when this returns: a budget too small evicts it; its compile goes on)."""
        key = cache_key(spec)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return entry
            self.num_compiles += 1
            entry = _Entry(_key_bytes(key))
            entry.future = self._submit(entry, key, spec)
            self._queue.append(entry)  # its thread reads the queue under this lock: only after this
            self._cache[key] = entry
            self.cache_bytes += entry.nbytes
            self._evict()
        # Outside the lock: a compile already over runs its callback here, at once. The callback holds neither
        # this object nor the entry (a future keeps its callbacks): no cycle keeps a dropped engine's grammars.
        notify = weakref.WeakMethod(self._notify)
        entry.future.add_done_callback(lambda _: (method := notify()) is not None and method())
        return entry

    def _notify(self) -> None:
        """A future is done (also one cancelled or failed before its compile started): compile() waits for the
        start or the end of a compile."""
        with self._changed:
            self._changed.notify_all()

    def _evict(self) -> None:
        """Drop the least recently used entries while the cache is over its budget (under ``_lock``). The
        newest entry stays even alone over it: it is the grammar its requests are waiting for."""
        while self.cache_bytes > self._cache_budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self.cache_bytes -= old.nbytes

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    def ready(self, spec: dict) -> bool:
        """Whether :meth:`compile` would return (or raise) now without waiting. Starts the compile if needed.

        A compile past its timeout (counted from its start) counts as ready: :meth:`compile` then raises the
        timeout error. One still waiting behind other compiles is not.
        """
        entry = self._entry(spec)
        if entry.future.done():
            return True
        started = entry.started
        return started is not None and time.monotonic() - started >= self.compile_timeout_s

    def compile(self, spec: dict) -> CompiledGrammar:
        """The compiled grammar: waits for the compile to start (behind other compiles; not counted against the
        timeout), then at most what is left of the compile timeout. Raises ``ValueError``."""
        entry = self._entry(spec)
        future = entry.future
        with self._changed:
            while entry.started is None and not future.done():
                self._changed.wait()
            started = entry.started
        left = self.compile_timeout_s - (time.monotonic() - started) if started is not None else 0.0
        try:
            return future.result(timeout=max(left, 0.0))
        except FutureTimeout:
            raise structured_error(f"did not compile within {self.compile_timeout_s:g} s ({TIMEOUT_ENV})") from None
        except ValueError:
            raise
        except Exception as e:  # a backend failure that is not the spec's fault still names the field
            raise structured_error(f"could not be compiled: {type(e).__name__}: {str(e)[:300]}") from None

    def new_matcher(self, spec: dict) -> Matcher:
        """A matcher for one request's first sequence (raises like :meth:`compile`)."""
        matcher = self.compile(spec).matcher()
        matcher.uncounted = kind_of(spec)
        return matcher

    # ------------------------------------------------------------------ masks
    def fill_bitmask(self, matchers: list[Matcher]) -> torch.Tensor:
        """The int32 bitmask ``[len(matchers), ceil(vocab/32)]`` on the CPU (pinned when CUDA is up)."""
        backend = self.backend
        words = (backend.vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32,
                              pin_memory=torch.cuda.is_available() and torch.cuda.is_initialized())
        for m in matchers:
            kind = getattr(m, "uncounted", None)
            if kind is not None:
                self.requests_by_kind[kind] = self.requests_by_kind.get(kind, 0) + 1
                m.uncounted = None
        seconds = backend.fill_bitmasks(matchers, bitmask)
        self.mask_seconds.extend(seconds)
        self.mask_seconds_total += sum(seconds)
        self.mask_rows += len(seconds)
        return bitmask

    def stats(self) -> dict:
        """Numbers for ``LLMEngine.stats()``: compiles (started, answered from the cache, seconds spent), the
        compile cache (entries, their estimated bytes, its budget), mask rows filled and their seconds, and
        requests per kind (``structured_requests_json``, ...)."""
        return {
            "structured_compiles": self.num_compiles,
            "structured_compile_cache_hits": self.num_cache_hits,
            "structured_cache_entries": len(self._cache),
            "structured_cache_bytes": self.cache_bytes,
            "structured_cache_budget_bytes": self._cache_budget,
            "structured_compile_seconds_total": self.compile_seconds_total,
            "structured_mask_seconds_total": self.mask_seconds_total,
            "structured_mask_rows": self.mask_rows,
            **{f"structured_requests_{kind}": self.requests_by_kind.get(kind, 0) for kind in KINDS},
        }

    def close(self) -> None:
        """Cancel the compiles not started (those waiting on a pool thread fail); those running end on their own."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` bool: bit ``j`` of byte ``b`` (unpacks a bitmask with one gather, on any device)."""
    table = _BIT_TABLES.get(device)
    if table is None:
        byte = torch.arange(256, dtype=torch.int32)
        table = ((byte.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)
        _BIT_TABLES[device] = table
    return table


def withhold(row: torch.Tensor, token_ids) -> None:
    """In place on one bitmask row (int32, CPU): disallow ``token_ids``, unless that would leave no token allowed.

    ``min_tokens`` for a constrained sequence: its stop tokens are held back only while the grammar allows
    another token. Where the grammar allows nothing else (it is complete and allows only EOS, or it needs a stop
    token next), the row is left as the grammar made it: holding them would leave nothing to draw, and the
    output is at the grammar's end, which wins over ``min_tokens``.
    """
    words = row.numel()
    saved = {}
    for t in token_ids:
        w, bit = divmod(t, 32)
        if w >= words:
            continue  # past the bitmask: never allowed anyway
        if w not in saved:
            saved[w] = int(row[w])
        keep = ~(1 << bit) & 0xFFFFFFFF
        row[w] = ((int(row[w]) & 0xFFFFFFFF & keep) ^ 0x80000000) - 0x80000000  # back to a signed int32
    if saved and not bool(row.any()):
        for w, value in saved.items():
            row[w] = value


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """In place: ``logits[rows[i], t] = -inf`` wherever bit ``t`` of ``bitmask[i]`` is 0.

    ``logits`` is ``[R, V]`` on any device; ``bitmask`` is int32 ``[len(rows), W]`` (CPU or the same device);
    ``rows`` defaults to every row. Columns past ``32 * W`` (a model vocabulary wider than the tokenizer's) are
    disallowed too. The bits are unpacked on the logits' device (little-endian words: byte ``k`` of word ``w``
    holds tokens ``32w + 8k`` to ``32w + 8k + 7``), and the logits are filled in place by one ``masked_fill_``:
    a handful of tensor ops per step whatever the batch, no copy of the logits.
    """
    n = bitmask.shape[0]
    if n == 0:
        return
    device = logits.device
    vocab = logits.shape[1]
    mask = bitmask.to(device, non_blocking=True).contiguous()
    allowed = _bit_table(device)[mask.view(torch.uint8).long()].view(n, -1)
    if allowed.shape[1] >= vocab:
        disallowed = ~allowed[:, :vocab]
    else:
        disallowed = torch.ones((n, vocab), dtype=torch.bool, device=device)
        disallowed[:, :allowed.shape[1]] = ~allowed
    if rows is not None and (len(rows) != logits.shape[0] or rows != list(range(len(rows)))):
        spread = torch.zeros(logits.shape, dtype=torch.bool, device=device)
        spread[upload([rows], torch.int64, device)[0]] = disallowed
        disallowed = spread
    with torch.inference_mode():  # the model runner's logits are inference tensors
        logits.masked_fill_(disallowed, float("-inf"))
