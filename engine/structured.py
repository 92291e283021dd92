"""Structured outputs: sampling constrained to a JSON Schema, a regex, a list of choices or a grammar.

A request asks with ``SamplingParams(structured_outputs={...})``: exactly one of ``json`` (a JSON Schema, as an
object or its JSON text), ``json_object`` (``True``: any JSON object), ``regex``, ``choice`` (a list of strings)
or ``grammar`` (Lark, or llama.cpp's GBNF), plus, for the two JSON kinds, ``disable_any_whitespace`` (compact
JSON) or ``whitespace_pattern`` (a regex for each run of whitespace). These are vLLM's names.

The pieces, each used by the engine in one place:

- :func:`validate_structured_outputs`: the field's rules, checked in ``SamplingParams.validate`` (no backend
  needed, so producers can check a request before sending it).
- :class:`StructuredOutputs`: one per engine. Compiles each distinct ``(kind, spec, whitespace)`` once on a small
  thread pool (never on the step loop), keeps the compiled grammars in an LRU cache (failures too, so a bad
  schema sent again fails without compiling again), and refuses a compile that takes longer than
  ``PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S``. It hands out one :class:`Matcher` per sequence and fills the
  batch's token bitmask.
- :func:`apply_token_bitmask`: sets the logits of disallowed tokens to ``-inf``, in place on the logits'
  device, before the sampler runs (so penalties, top-k/top-p/min-p and logprobs all see the constrained
  distribution).

Invariants: a sequence's matcher has consumed exactly its output tokens (preemption keeps the output tokens,
so a recompute or a swap needs nothing; :meth:`Matcher.rebuild` replays tokens for a sequence whose matcher
must be made again); the mask always allows at least one token (a finished or failed matcher allows only EOS).

The backend is behind :class:`GrammarBackend`; the only one is llguidance
(``pagedserve.engine.structured_llguidance``), chosen over xgrammar by measurement (its docstring says why).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
WHITESPACE_OPTIONS = ("disable_any_whitespace", "whitespace_pattern")
MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar (as text), or all choices together
MAX_CHOICES = 1024
TIMEOUT_ENV = "PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S"
DEFAULT_COMPILE_TIMEOUT_S = 10.0
CACHE_SIZE = 512  # compiled grammars kept per engine


def _fail(why: str) -> ValueError:
    return ValueError(f"structured_outputs {why}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"{name} must be a non-empty string (got {_short(value)})")
    if len(value) > MAX_SPEC_CHARS:
        raise _fail(f"{name} has {len(value)} characters, more than {MAX_SPEC_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{name} must be valid Unicode text (it has a lone surrogate)") from None
    return value


def validate_structured_outputs(value: object) -> dict | None:
    """The ``structured_outputs`` field, normalised: ``None``, or a new dict with one kind and its options.

    A ``json`` schema given as JSON text is parsed (so both forms share a cache entry); ``choice`` becomes a
    list. Raises ``ValueError`` whose message starts with ``structured_outputs``. Whether a schema, regex or
    grammar compiles is the backend's to say (:meth:`StructuredOutputs.compile`).
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(f"must be a dict with one of {', '.join(KINDS)} (got {_short(value)})")
    unknown = sorted(str(k) for k in value if k not in KINDS + WHITESPACE_OPTIONS)
    if unknown:
        raise _fail(f"has an unknown key {unknown[0]!r} (known: {', '.join(KINDS + WHITESPACE_OPTIONS)})")
    kinds = [k for k in KINDS if value.get(k) is not None]
    if len(kinds) != 1:
        raise _fail(f"must set exactly one of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    spec = value[kind]
    if kind == "json":
        if isinstance(spec, str):
            _check_text("json", spec)
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise _fail(f"json is not valid JSON text: {e}") from None
        if not isinstance(spec, dict):
            raise _fail(f"json must be a JSON Schema object or its JSON text (got {_short(spec)})")
        try:
            size = len(json.dumps(spec, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise _fail(f"json must hold JSON values only: {e}") from None
        if size > MAX_SPEC_CHARS:
            raise _fail(f"json has {size} characters, more than {MAX_SPEC_CHARS}")
    elif kind == "json_object":
        if spec is not True:
            raise _fail(f"json_object must be true (got {_short(spec)})")
    elif kind in ("regex", "grammar"):
        _check_text(kind, spec)
    else:  # choice
        if not isinstance(spec, (list, tuple)) or not spec:
            raise _fail(f"choice must be a non-empty list of strings (got {_short(spec)})")
        if len(spec) > MAX_CHOICES:
            raise _fail(f"choice has {len(spec)} entries, more than {MAX_CHOICES}")
        for c in spec:
            _check_text("choice", c)
        if sum(len(c) for c in spec) > MAX_SPEC_CHARS:
            raise _fail(f"choice has more than {MAX_SPEC_CHARS} characters in all")
        spec = list(spec)
    out: dict[str, Any] = {kind: spec}
    disable = value.get("disable_any_whitespace")
    pattern = value.get("whitespace_pattern")
    if disable is not None and not isinstance(disable, bool):
        raise _fail(f"disable_any_whitespace must be a boolean (got {_short(disable)})")
    if pattern is not None:
        _check_text("whitespace_pattern", pattern)
    if (disable or pattern is not None) and kind not in ("json", "json_object"):
        raise _fail(f"whitespace options apply to json and json_object only (got them with {kind})")
    if disable and pattern is not None:
        raise _fail("takes disable_any_whitespace or whitespace_pattern, not both")
    if disable:
        out["disable_any_whitespace"] = True
    if pattern is not None:
        out["whitespace_pattern"] = pattern
    return out


def kind_of(spec: dict) -> str:
    """The kind of a validated ``structured_outputs`` dict (``json``, ``regex``, ...)."""
    return next(k for k in KINDS if k in spec)


def cache_key(spec: dict) -> tuple:
    """What makes two validated specs compile to the same grammar."""
    kind = kind_of(spec)
    body = spec[kind]
    if kind == "json":
        body = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    elif kind == "choice":
        body = tuple(body)
    return kind, body, spec.get("disable_any_whitespace", False), spec.get("whitespace_pattern")


# ---------------------------------------------------------------------- the backend interface
class Matcher(Protocol):
    """One sequence's position in its grammar. Not thread-safe; the engine uses it from the step loop only."""

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (int32, CPU, contiguous; bit ``t % 32`` of word ``t // 32``)."""

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (the matcher then allows EOS only)."""

    def is_terminated(self) -> bool:
        """True once the grammar is complete and EOS was accepted, or nothing but EOS can follow."""

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

    def compile(self, spec: dict) -> CompiledGrammar:
        """Compile a validated spec; raises ``ValueError`` starting with ``structured_outputs`` if it is unusable.
        Called on a worker thread."""

    def fill_bitmasks(self, matchers: list[Matcher], bitmask: torch.Tensor) -> list[float]:
        """Row ``i`` of ``bitmask`` for ``matchers[i]``; returns the seconds each row took (or their share)."""


def default_backend(tokenizer, vocab_size: int, eos_token_ids) -> GrammarBackend:
    from pagedserve.engine.structured_llguidance import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, vocab_size, sorted(eos_token_ids))


def compile_timeout_from_env() -> float:
    """``PAGEDSERVE_STRUCTURED_COMPILE_TIMEOUT_S`` (seconds, > 0), else the default."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_COMPILE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0 (got {raw!r})")
    return value


class _Entry:
    """One cache entry: the compile's future and when it started (its timeout runs from then, for every
    request that shares it; a compile that finishes after its timeout serves the requests that come later)."""

    __slots__ = ("future", "started")

    def __init__(self, future: Future) -> None:
        self.future = future
        self.started = time.monotonic()


class StructuredOutputs:
    """Per engine: compile and cache grammars off the step loop, make matchers, fill the batch bitmask.

    ``backend_factory`` builds the backend on first use, on the compile thread (wrapping a large tokenizer
    for llguidance takes up to a second, which an engine that never sees a structured request never pays).
    """

    def __init__(self, backend_factory, compile_timeout_s: float | None = None, max_workers: int = 2,
                 cache_size: int = CACHE_SIZE) -> None:
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self.compile_timeout_s = compile_timeout_from_env() if compile_timeout_s is None else compile_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Figures for stats() and the benchmark.
        self.compile_seconds: deque[float] = deque(maxlen=10_000)  # each finished compile
        self.mask_seconds: deque[float] = deque(maxlen=100_000)  # each bitmask row (one token of one sequence)
        self.num_compiles = 0
        self.num_cache_hits = 0
        self.requests_by_kind: dict[str, int] = {}

    # ------------------------------------------------------------------ compiling
    @property
    def backend(self) -> GrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._factory()
            return self._backend

    def _compile(self, spec: dict) -> CompiledGrammar:
        started = time.perf_counter()
        try:
            return self.backend.compile(spec)
        finally:
            self.compile_seconds.append(time.perf_counter() - started)

    def compile_async(self, spec: dict) -> Future:
        """The future of ``spec``'s compiled grammar: shared with every earlier request for the same grammar."""
        key = cache_key(spec)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return entry.future
            self.num_compiles += 1
            entry = _Entry(self._pool.submit(self._compile, spec))
            self._cache[key] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return entry.future

    def ready(self, spec: dict) -> bool:
        """Whether :meth:`compile` would return (or raise) now without waiting. Starts the compile if needed.

        A compile past the timeout counts as ready: :meth:`compile` then raises the timeout error.
        """
        future = self.compile_async(spec)
        if future.done():
            return True
        with self._lock:
            entry = self._cache.get(cache_key(spec))
        return entry is not None and time.monotonic() - entry.started >= self.compile_timeout_s

    def compile(self, spec: dict) -> CompiledGrammar:
        """The compiled grammar, waiting at most what is left of the compile timeout. Raises ``ValueError``."""
        key = cache_key(spec)
        future = self.compile_async(spec)
        with self._lock:
            entry = self._cache.get(key)
        left = self.compile_timeout_s - (time.monotonic() - entry.started) if entry is not None else None
        try:
            return future.result(timeout=max(left, 0.0) if left is not None else self.compile_timeout_s)
        except FutureTimeout:
            raise _fail(f"did not compile within {self.compile_timeout_s:g} s ({TIMEOUT_ENV})") from None
        except ValueError:
            raise
        except Exception as e:  # a backend failure that is not the spec's fault still names the field
            raise _fail(f"could not be compiled: {type(e).__name__}: {str(e)[:300]}") from None

    def new_matcher(self, spec: dict) -> Matcher:
        """A matcher for one request's first sequence (raises like :meth:`compile`)."""
        matcher = self.compile(spec).matcher()
        kind = kind_of(spec)
        self.requests_by_kind[kind] = self.requests_by_kind.get(kind, 0) + 1
        return matcher

    # ------------------------------------------------------------------ masks
    def fill_bitmask(self, matchers: list[Matcher]) -> torch.Tensor:
        """The int32 bitmask ``[len(matchers), ceil(vocab/32)]`` on the CPU (pinned when CUDA is up)."""
        backend = self.backend
        words = (backend.vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32,
                              pin_memory=torch.cuda.is_available() and torch.cuda.is_initialized())
        self.mask_seconds.extend(backend.fill_bitmasks(matchers, bitmask))
        return bitmask

    def stats(self) -> dict:
        return {
            "structured_compiles": self.num_compiles,
            "structured_compile_cache_hits": self.num_cache_hits,
            "structured_compile_seconds_total": sum(self.compile_seconds),
            "structured_mask_seconds_total": sum(self.mask_seconds),
            "structured_mask_rows": len(self.mask_seconds),
            "structured_requests_by_kind": dict(self.requests_by_kind),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """In place: ``logits[rows[i], t] = -inf`` wherever bit ``t`` of ``bitmask[i]`` is 0.

    ``logits`` is ``[R, V]`` on any device; ``bitmask`` is int32 ``[len(rows), W]`` (CPU or the same device);
    ``rows`` defaults to every row. Columns past ``32 * W`` (a model vocabulary wider than the tokenizer's) are
    disallowed too. The bits are unpacked on the logits' device.
    """
    if bitmask.shape[0] == 0:
        return
    device = logits.device
    vocab = logits.shape[1]
    mask = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(mask.shape[0], -1).bool()
    width = min(vocab, allowed.shape[1])
    disallowed = torch.ones((mask.shape[0], vocab), dtype=torch.bool, device=device)
    disallowed[:, :width] = ~allowed[:, :width]
    if rows is None or (len(rows) == logits.shape[0] and rows == list(range(len(rows)))):
        logits.masked_fill_(disallowed, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.long, device=device)
        logits[index] = logits[index].masked_fill(disallowed, float("-inf"))
