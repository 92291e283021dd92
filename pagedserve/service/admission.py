"""Admission: from stream entries to requests running in the engine, or to their answer without running.

Over 400 lines on purpose: the steps below are one ordered pipeline (the first that matches wins), and the order is
the guarantee; split across modules it could no longer be read, or reviewed, top to bottom.

:meth:`Admission.admit` takes a batch of entries and, for each, in this order (the first matching step wins,
so a stored result always beats a later check, as the contract's "answered from it" requires):
1. parse it: unusable -> dead letter; a valid id with bad content -> a :class:`Refused` entry, answered
   ``error`` (``invalid_request``) in its turn at step 5, like any other refusal; an entry ID more than a day
   beyond the clock (stream_ids.py) -> refused the same way whatever its body, then dead-lettered (``future_id``),
   and the stream's last ID is set back once it is gone (:meth:`Admission.repair_stream_ids`); an honest entry
   that Redis' ``XADD *`` dragged after it (stream_ids.dragged) is not refused; one whose id runs or waits (here
   or at another worker) is only dead-lettered at once, the run answers the id;
2. delivered more than ``max_deliveries`` times -> dead letter;
3. its id already runs (or waits) here -> the entry is attached to it (acknowledged with it);
4. claim the id (claims.py): it already has a result -> answered from it (a redelivery or a resubmission is
   never run twice); another worker runs it -> the entry waits for that worker's result;
5. refused at parse time -> its ``error``; cancelled before pick-up -> ``done`` with finish_reason ``cancelled``;
6. every limit (:func:`prepare`, :func:`check_queue_wait`, :func:`add_to_engine`) -> ``error`` with the
   contract's code, else the request is added to the engine and joins the worker's running requests (running.py).

The claims and the cancelled flags take one round trip for the whole batch. Entries read together start by
``priority`` (lower first), then in stream order. Every limit is checked before any work starts: the operator's
per-request limits (``max_samples_per_request``, ``max_stop_strings``, ``max_stop_string_chars``,
``max_tokens_per_request``), sampling parameters (the engine's own validation, whose messages name the field),
sequences per request vs ``max_num_seqs`` and ``max_num_batched_tokens``, chat template, token ids vs the
vocabulary, prompt length vs ``max_model_len``, ``max_tokens`` vs what the prompt leaves of ``max_model_len``
(the engine's), and (load shedding) the time the entry waited in the stream vs ``max_queue_ms``. Refusals are
:class:`InvalidRequestError` with the contract's error code.

Isolation: a failure while handling one entry (a bug, a value no check foresaw) ends that entry alone, with an
``internal`` error (or a dead letter when it has no valid id), never the batch it was read with.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from opentelemetry.trace import SpanKind

from .batch_keys import is_batch_line
from .claims import RETRY_S, Claims
from .connection import Backoff, trace_scope
from .context import WorkerContext, WorkerPart
from .engine_api import EngineAPI
from .inflight import EntryIds, InFlight
from .outcomes import Outcomes
from .protocol import (DeadLetterError, GenerateRequest, InvalidRequestError, body_digest, check_other_fields,
                       engine_params, entry_time, params_field, parse_request, refuse_missing_body,
                       refuse_repeated_bodies)
from .reclaim import LeaseKeeper
from .redaction import redact
from .resume import MIN_PAGE, PAGE, events_bound, read_emitted, received_from
from .running import Running
from .settings import Settings
from .stream_fields import repeated
from .stream_ids import dragged, future_message, is_future, parse_id, repair_details
from .telemetry import request_logger, start_entry_span, trace_id_from_fields

EVENTS_FAILURE_SAY_S = 60.0  # a read of token events that keeps failing is said again at most this often
EVENTS_PAGE_KEPT_S = 600.0  # a smaller page is kept this long after the last failed read, then tried full again
# Far-future entry IDs this worker read (the latest ones): an entry of the same millisecond with a higher sequence
# was dragged there by Redis' XADD * (stream_ids.dragged).
_SEEN_FUTURE_IDS = 64


def check_request_limits(req: GenerateRequest, settings: Settings) -> None:
    """The operator's per-request limits (settings), so that one request cannot hold a worker: sequences per
    request, stop strings (each is checked against every new token of every sequence), ``max_tokens``, and the
    best priority (a better one preempts worse ones without limit)."""
    p = req.params

    def refuse(message: str) -> InvalidRequestError:
        return InvalidRequestError(req.id, "invalid_request", message, req.metadata)

    limit = settings.max_samples_per_request
    for name in ("n", "best_of", "beam_width"):
        value = getattr(p, name)
        if value is not None and value > limit:
            raise refuse(f"params.{name} must be at most {limit} (PAGEDSERVE_MAX_SAMPLES_PER_REQUEST), got {value}")
    stop = [p.stop] if isinstance(p.stop, str) else (p.stop or [])
    if len(stop) > settings.max_stop_strings:
        raise refuse(f"params.stop has {len(stop)} strings, more than {settings.max_stop_strings} allowed "
                     "(PAGEDSERVE_MAX_STOP_STRINGS)")
    longest = max((len(x) for x in stop), default=0)
    if longest > settings.max_stop_string_chars:
        raise refuse(f"params.stop has a string of {longest} characters, more than "
                     f"{settings.max_stop_string_chars} allowed (PAGEDSERVE_MAX_STOP_STRING_CHARS)")
    best = settings.min_priority
    if best is not None and req.priority < best:
        raise refuse(f"priority must be at least {best} (PAGEDSERVE_MIN_PRIORITY; lower runs first), got {req.priority}")
    cap = settings.max_tokens_per_request
    if cap is not None and p.max_tokens is not None and p.max_tokens > cap:
        raise refuse(f"params.max_tokens must be at most {cap} (PAGEDSERVE_MAX_TOKENS_PER_REQUEST), "
                     f"got {p.max_tokens}")


def _room(max_len: int) -> str:
    """The limit a prompt is refused by, as the engine says it: a prompt of max_model_len tokens does not fit (the
    first generated token needs a place)."""
    return f"max_model_len {max_len} leaves room for {max_len - 1} prompt tokens"


# A text this many characters per token of max_model_len long or longer is counted on a head of that size first:
# if the head alone holds twice the tokens max_model_len allows, the text cannot fit whatever the rest holds, and
# it is refused without tokenizing the rest on the worker's loop (a 600 kB prompt of a random-letter flood took
# the loop half a second each, delaying every other request's tokens).
HEAD_CHARS_PER_TOKEN = 8


def _head_tokens_past(tokenizer: Any, text: str, max_len: int) -> tuple[int, int] | None:
    """``(head characters, their tokens)`` where the head of ``text`` alone holds more than twice ``max_len``
    tokens (so the whole cannot fit: a cut changes the tokens of the word it falls in, not the count twice over),
    else None."""
    head = HEAD_CHARS_PER_TOKEN * max_len
    if len(text) <= head:
        return None
    count = len(tokenizer.encode(text[:head], add_special_tokens=False))
    return (head, count) if count > 2 * max_len else None


def prepare(req: GenerateRequest, engine: EngineAPI, settings: Settings) -> tuple[str | list[int], Any]:
    """Returns ``(prompt, SamplingParams)`` for ``engine.add_request`` or raises :class:`InvalidRequestError`."""

    def refuse(code: str, message: str) -> InvalidRequestError:
        return InvalidRequestError(req.id, code, message, req.metadata)

    check_request_limits(req, settings)
    try:
        params = engine_params(req.params, chat=req.messages is not None)
    except ValueError as e:
        raise refuse("invalid_request", str(e)) from None
    from pagedserve.engine.chat_content import as_parts, content_format
    from pagedserve.engine.sampling_params import RequestOutputKind

    # Each step's part only: the worker streams it and adds it up itself (results.add_deltas), so that no step
    # copies a long output again.
    params.output_kind = RequestOutputKind.DELTA
    cap = settings.max_tokens_per_request

    def default_max_tokens(value: int, bound: str) -> Any:
        """``params`` with the ``max_tokens`` the request left out; refused where its min_tokens asks for more."""
        if params.min_tokens > value:
            raise refuse("invalid_request", f"params.min_tokens {params.min_tokens} is more than the {value} tokens "
                                            f"{bound} (max_tokens not given)")
        return replace(params, max_tokens=value)

    if cap is not None and req.params.max_tokens is None and params.max_tokens is not None and params.max_tokens > cap:
        # A prompt's default (16) is a default like a chat's rest of the context: the operator's cap bounds both.
        params = default_max_tokens(cap, "PAGEDSERVE_MAX_TOKENS_PER_REQUEST allows")
    limit, setting = engine.max_seqs_per_request
    if params.num_samples > limit:
        raise refuse("invalid_request", f"params.{params.num_samples_field}: {params.num_samples} sequences exceed "
                                        f"{setting} {limit} (a request runs that many sequences at once)")
    max_len = engine.max_model_len
    if req.messages is not None:
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise refuse("invalid_request", "messages: the model has no chat template")
        messages = [m.model_dump() for m in req.messages]
        if content_format(tok.chat_template) == "openai":
            # The template loops over content parts (a string's would be its characters): each as one text part.
            messages = [{**m, "content": as_parts(m["content"])} for m in messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject roles or orderings
            raise refuse("invalid_request", f"messages: {str(e)[:300]}") from None
        if len(text) > engine.max_token_chars * max_len:  # cannot fit: refused without tokenizing it
            raise refuse("prompt_too_long", f"messages render to {len(text)} characters, more than max_model_len "
                                            f"{max_len} leaves room for")
        if (head := _head_tokens_past(tok, text, max_len)) is not None:
            raise refuse("prompt_too_long", f"messages render to {len(text)} characters, and the first {head[0]} "
                                            f"alone are {head[1]} tokens; {_room(max_len)}")
        # The template writes the special tokens it wants (a BOS, for Llama 3's): encoding adds none of its own.
        prompt: str | list[int] = tok.encode(text, add_special_tokens=False)
        if not prompt:
            raise refuse("invalid_request", "messages: the chat template renders to no tokens")
        try:
            engine.check_in_vocab(prompt, "messages: the chat template renders to")
        except ValueError as e:
            raise refuse("invalid_request", str(e)) from None
        if len(prompt) + 1 > max_len:
            raise refuse("prompt_too_long", f"messages render to {len(prompt)} tokens; {_room(max_len)}")
        if params.max_tokens is None:  # the rest of the context, within the operator's cap
            rest = max_len - len(prompt)
            params = (default_max_tokens(cap, "PAGEDSERVE_MAX_TOKENS_PER_REQUEST allows") if cap is not None
                      and cap < rest else default_max_tokens(rest, f"max_model_len {max_len} leaves after the "
                                                                   f"{len(prompt)}-token chat"))
    elif req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        vocab = engine.vocab_size
        bad = max(ids)
        if bad >= vocab:
            raise refuse("invalid_request", f"prompt_token_ids: {bad} is out of vocabulary (size {vocab})")
        if len(ids) + 1 > max_len:
            raise refuse("prompt_too_long", f"prompt_token_ids holds {len(ids)} tokens; {_room(max_len)}")
        prompt = list(ids)
    else:
        prompt = req.prompt or ""
        if len(prompt) > engine.max_token_chars * max_len:  # cannot fit (the engine counts the tokens of the rest)
            raise refuse("prompt_too_long", f"prompt is {len(prompt)} characters, more than max_model_len {max_len} "
                                            "leaves room for")
        if (head := _head_tokens_past(engine.tokenizer, prompt, max_len)) is not None:
            raise refuse("prompt_too_long", f"prompt is {len(prompt)} characters, and the first {head[0]} alone are "
                                            f"{head[1]} tokens; {_room(max_len)}")
    return prompt, params


def check_queue_wait(req: GenerateRequest, waited_s: float, max_queue_ms: int | None) -> None:
    """Load shedding: refuse with ``overloaded`` a request that waited in the stream longer than ``max_queue_ms``
    (None or 0: no limit).

    The wait runs from the entry's XADD (the time in its stream id) to its pick-up, redeliveries included: an
    entry reclaimed from a dead worker has waited all that time too. Past the limit its client has likely given
    up, and starting it would only make every later request wait longer. Checked after validation (a request
    that can never succeed says why instead) and after the cancelled-before-pick-up check; not for one taken
    over after a worker streamed tokens of it and died (it started: its client reads those tokens).

    A batch line is never shed: the feeder adds lines only while the worker has room, so what it waits is the
    admission of the lines fed with it, and no client waits on it; its limit is the batch's completion window.
    Nor is a request whose own ``deadline_ms`` passed while it waited: it ends ``deadline`` unrun, as documented,
    not with a "retry later" that no retry can honour.
    """
    waited_ms = waited_s * 1000
    if not max_queue_ms or waited_ms <= max_queue_ms or is_batch_line(req.id, req.metadata):
        return
    if req.deadline_ms is not None and req.deadline_ms <= time.time() * 1000:
        return
    raise InvalidRequestError(
        req.id,
        "overloaded",
        f"request waited {waited_ms:.0f} ms in the queue, more than the limit of {max_queue_ms} ms "
        "(PAGEDSERVE_MAX_QUEUE_MS): the service is overloaded, retry later with a new id "
        "(this id is answered with this error until its result expires)",
        req.metadata,
    )


def add_to_engine(
    engine: EngineAPI, req: GenerateRequest, prompt: str | list[int], params: Any, arrival: float,
    resume: list | None = None,
) -> str | None:
    """``engine.add_request`` with the engine's refusals mapped to error codes. ``resume``: continue after what
    an earlier run handed out; if the engine cannot, the request runs from the start, and the engine's reason is
    returned (tokens outside its vocabulary: another model ran it before)."""
    from pagedserve.engine.errors import PromptTooLongError

    deadline = req.deadline_ms / 1000.0 if req.deadline_ms is not None else None
    not_resumed = None
    try:
        if resume is not None:
            try:
                engine.add_request(req.id, prompt, params, priority=req.priority, deadline=deadline,
                                   arrival_time=arrival, resume=resume, cache_salt=req.cache_salt)
                return None
            except ValueError as e:
                not_resumed = str(e)
        engine.add_request(req.id, prompt, params, priority=req.priority, deadline=deadline, arrival_time=arrival,
                           cache_salt=req.cache_salt)
        return not_resumed
    except ValueError as e:  # the engine's messages name the field (max_tokens beyond the context: params.)
        message = params_field(str(e))
        if req.params.max_tokens is None and message.startswith("params.max_tokens "):
            message = _as_defaulted(message, params.max_tokens)
        too_long = isinstance(e, PromptTooLongError) and not message.startswith("params.")
        raise InvalidRequestError(req.id, "prompt_too_long" if too_long else "invalid_request", message,
                                  req.metadata) from None


def _as_defaulted(message: str, value: int) -> str:
    """A refusal of the ``max_tokens`` a request left out, saying where the value came from: naming a field as if
    the request had set it sent its writer looking for a value it never wrote."""
    from pagedserve.engine.sampling_params import SamplingParams

    source = ("a prompt's default, as in OpenAI's and vLLM's completions" if value == SamplingParams.max_tokens
              else "PAGEDSERVE_MAX_TOKENS_PER_REQUEST, the worker's cap")
    head = f"params.max_tokens {value} "
    if not message.startswith(head):
        return message
    return f"{head}(not given: {source}) {message[len(head):]}; give a smaller max_tokens"


@dataclass
class Refused:
    """An entry with a valid id whose content was refused at parse time. It goes through steps 3-4 like a
    request, so that it never answers for an id that runs, or has run, from another entry."""

    error: InvalidRequestError
    priority: int = 0
    # Delivered more than max_deliveries times: the id is answered and its entries go to the dead letters too
    # (Outcomes.poisoned), where an operator can look at what took the workers down.
    poison: bool = False
    # Its entry ID lies far in the future: the id is answered, then its entries go to the dead letters (future_id).
    future: bool = False

    @property
    def id(self) -> str:
        return self.error.request_id


@dataclass
class Compiling:
    """An entry whose grammar (structured outputs) compiles off the loop: it joins the engine once the compile
    is done, or is answered if the compile fails or times out. Every other check has passed."""

    request: GenerateRequest
    entry_ids: list[str]
    prompt: Any
    params: Any
    arrival: float
    span: Any
    log: Any
    resume: Any = None  # per sample, what an earlier run handed out (resume.py); None: from the start
    next_seq: dict = field(default_factory=dict)  # output index -> seq of its next token event
    first_token_at: float | None = None  # when an earlier run handed out its first token (resume.py)
    body: str = ""  # body_digest of the request: written beside its token events, and what it continues


@dataclass
class Waiting:
    """Entries of an id another worker runs: pending here until its result appears or its claim lapses."""

    request: GenerateRequest | Refused
    entry_ids: list[str]
    fields: dict
    deliveries: int
    # A run of this worker's, given up when another worker took its claim: that worker answers and counts it.
    given_up: bool = False
    log: Any = None  # the given-up run's request logger (its trace id), for the line that ends the wait


@dataclass(kw_only=True, eq=False)
class Admission(WorkerPart):
    """Entries -> running requests or answers, in the order the module docstring gives."""

    ctx: WorkerContext
    r: redis.Redis
    engine: Callable[[], EngineAPI]  # returns the engine (loaded on first use)
    running: Running  # the worker's running requests: a started request joins them
    claims: Claims
    outcomes: Outcomes
    leases: LeaseKeeper
    waiting: dict[str, Waiting] = field(default_factory=dict)
    compiling: dict[str, Compiling] = field(default_factory=dict)
    _next_retry: float = 0.0
    # The stream's last ID may lie far in the future: checked at start (a worker may have died between the dead
    # letter and the repair) and after each far-future entry, until it is clean (stream_ids.py).
    _repair_due: bool = True
    # Asked again while it waits or fails: 0.1 s, doubling up to 2 s.
    _repair_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, cap=2.0))
    _repair_error: str = ""  # the last error logged by the repair (each distinct one once)
    _future_ids: list[str] = field(default_factory=list)
    _events_page: int = PAGE  # events per read of a taken-over request's events stream (_events_read_failed)
    _events_failed_at: float = -math.inf
    _events_failure_said: float = -math.inf

    def admit(self, entries: list[tuple[str, dict, int]], redelivered: bool) -> None:
        """Validate entries and hand the good ones to the engine. Checks happen before any work starts."""
        parsed: list[tuple[str, GenerateRequest | Refused, dict, int]] = []
        for entry_id, _, _ in entries:
            self.leases.add(entry_id)  # held until its ack is flushed
        honest = self._dragged([entry_id for entry_id, _, _ in entries if is_future(entry_id)])
        for entry_id, fields, deliveries in entries:
            if redelivered:
                self.metrics.redeliveries.inc()
            try:
                reqs = self._parse(entry_id, fields, deliveries, entry_id in honest)
            except Exception as e:  # a bug in parsing: this entry alone goes to the dead letters
                self.log.exception("entry_handling_failed", entry_id=entry_id)
                self.outcomes.dead(entry_id, f"handling failed: {type(e).__name__}: {e}", _body(fields),
                                   deliveries, kind="handling_failed")
                continue
            parsed.extend((entry_id, req, fields, deliveries) for req in reqs)
        if not parsed:
            return
        # One round trip for every claim (with its "already answered?") and "cancelled before pick-up?".
        replies = self.claims.claim_all(self.r, [req.id for _, req, _, _ in parsed], self._flags)
        self.metrics.redis_ops.inc(3 * len(parsed))
        order = sorted(range(len(parsed)), key=lambda i: (parsed[i][1].priority, parsed[i][0]))  # then FIFO
        seen: set[str] = set()
        for i in order:
            entry_id, req, fields, deliveries = parsed[i]
            claim, (cancelled, has_events) = replies[i]
            try:
                self._decide(entry_id, req, fields, deliveries, claim, cancelled, seen, has_events)
            except Exception as e:
                self.outcomes.failed(req.id, [entry_id], "admission", e)

    def _dragged(self, future_ids: list[str]) -> set[str]:
        """Of this batch's far-future entry IDs, the honest ones Redis dragged after a planted one (stream_ids.py).
        Unknown (Redis did not answer): none, as before this check, so an honest one is refused rather than a
        planted one run."""
        if not future_ids:
            return set()
        ordered = sorted(future_ids, key=parse_id)
        try:
            found = dragged(self.r, self.keys, ordered, self._future_ids)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the loop handles those (the batch is read again)
        except redis.RedisError as e:
            self.log.warning("dragged_entry_check_failed", error=str(e)[:300])
            found = set()
        finally:
            self.metrics.redis_ops.inc(1 + len(future_ids))
        self._future_ids = (self._future_ids + ordered)[-_SEEN_FUTURE_IDS:]
        return found

    def _parse(self, entry_id: str, fields: dict, deliveries: int,
               dragged_here: bool = False) -> list[GenerateRequest | Refused]:
        """Steps 1-3: the entry's request, or none when it is dead-lettered or attached already. An entry that
        gives ``body`` more than once yields a refusal for each id of its bodies: every one is answered, and the
        entry goes with the first answer stored (the others are in the same flush)."""
        raw = _body(fields)
        bodies = repeated(fields, b"body")
        future = is_future(entry_id)
        if future:  # the stream's last ID is set back once such entries are gone
            self._repair_due = True
            self._repair_backoff.ok()
        # Whatever its body, a planted ID is the harm (XADD * fails or is dragged along until it is repaired); an
        # honest entry dragged after it runs (its wait in the queue reads as none: arrival is capped at now).
        future = future and not dragged_here
        try:
            check_other_fields(fields, raw)
            if bodies:
                reqs = [Refused(e) for e in refuse_repeated_bodies(bodies, self.settings.max_message_bytes)]
            elif raw is None:
                reqs = [Refused(refuse_missing_body(fields))]
            else:
                reqs = [parse_request(raw, self.settings.max_message_bytes)]
        except DeadLetterError as e:
            reason, kind = (f"{future_message(entry_id)}; its body: {e}", "future_id") if future else (str(e), e.kind)
            self.outcomes.dead(entry_id, reason, raw if e.body is None else e.body, deliveries, kind=kind,
                               trace_id=self._trace_id(fields, entry_id))
            return []
        except InvalidRequestError as e:
            reqs = [Refused(e)]
        if future:
            message = future_message(entry_id)
            reqs = [Refused(InvalidRequestError(req.id, "invalid_request", message, _metadata(req)), future=True)
                    for req in reqs]
        elif deliveries > self.settings.max_deliveries:
            # Its producer still waits on the id (a Celery task would even send it again): the id is answered,
            # through the claim like any answer, so that one running from another entry keeps its own.
            message = (f"max_deliveries: delivered {deliveries} times > {self.settings.max_deliveries}: every worker "
                       "that took it stopped, or failed an engine step with it and sent it back, before answering it "
                       "(a request that takes workers or steps down? their logs say why); not run again")
            reqs = [Refused(InvalidRequestError(req.id, "internal", message, _metadata(req)), poison=True)
                    for req in reqs]
        # A planted entry is never attached to a run: it would stay in the stream (and keep the stream's last ID
        # exhausted or ahead) for the whole run. _decide dead-letters it at once.
        fresh = [req for req in reqs if future or not self._attach(req.id, entry_id)]
        if len(fresh) < len(reqs):
            self.metrics.redeliveries.inc()
        return fresh

    def _holder(self, rid: str) -> Any:
        return self.running.table.get(rid) or self.waiting.get(rid) or self.compiling.get(rid)

    def _drop_future(self, req: Refused, entry_id: str, fields: dict, deliveries: int) -> None:
        """A far-future entry of an id that runs or waits (here or at another worker): dead-lettered now, which
        deletes it, without answering the id (its run does)."""
        self.outcomes.dead(entry_id, req.error.message, _body(fields), deliveries, req.id, kind="future_id",
                           trace_id=self._trace_id(fields, entry_id))

    def _attach(self, rid: str, entry_id: str) -> bool:
        """A second entry of an id that runs or waits here, or whose run ended here with its answer not stored yet
        (Redis refuses it for now; the claim is still this worker's, so claiming again would run the id twice): it
        is acknowledged with the first."""
        holder = self._holder(rid)
        if holder is None:
            # The claim is held until the answer is stored: only then can one be buffered (the look goes through
            # the publisher's whole buffer, which grows while Redis refuses writes).
            return self.claims.holds(rid) and self.outcomes.publisher.join_answer(rid, entry_id)
        holder.entry_ids.append(entry_id)  # EntryIds: a redelivered entry is not added twice
        return True

    def _flags(self, pipe: Any, rid: str) -> None:
        """Per id, with its claim: cancelled before pick-up? Token events already handed out (resume.py)?"""
        pipe.exists(self.keys.cancelled(rid))
        pipe.exists(self.keys.events(rid))

    def _decide(self, entry_id: str, req: GenerateRequest | Refused, fields: dict, deliveries: int, claim: Any,
                cancelled: Any, seen: set[str], has_events: Any = 0) -> None:
        """Steps 3-6 for one entry, given its claim reply and cancelled flag."""
        future = isinstance(req, Refused) and req.future
        if future and self._holder(req.id) is not None:
            self._drop_future(req, entry_id, fields, deliveries)
            return
        if self._attach(req.id, entry_id):  # duplicate id inside this batch, first one running or waiting
            self.metrics.redeliveries.inc()
            return
        if req.id in seen:  # duplicate id inside this batch, first one already answered: same answer
            self.outcomes.same_answer(entry_id)
            return
        kind, stored = self.claims.outcome(req.id, claim)
        if kind == "result":  # before any other check: a stored result is THE answer of this id
            self.outcomes.from_result(req.id, entry_id, stored, self._trace_id(fields, entry_id))
            return
        if kind == "held" and future and isinstance(claim, list) and claim:
            # Another worker holds the id: its run answers it, and the entry must not wait in the stream. A refused
            # claim (maxmemory, an ACL) says nothing of a run: the entry waits like any other, or no one answers.
            self._drop_future(req, entry_id, fields, deliveries)
            return
        if kind == "held":  # another worker runs it (or Redis refused the claim): wait for its result
            self.waiting[req.id] = Waiting(req, EntryIds([entry_id]), fields, deliveries)
            return
        if kind == "foreign":
            self._foreign_key(req, [entry_id], stored, fields, deliveries)
            return
        seen.add(req.id)
        self._start([entry_id], req, fields, deliveries, bool(cancelled), bool(has_events))

    def give_up_lost(self) -> None:
        """Stop the runs whose claim another worker holds now: they wait for its result."""
        for rid in self.claims.take_lost():
            f = self.running.give_up(rid, "claim lost")
            if f is not None:
                self.waiting[rid] = Waiting(f.request, EntryIds(f.entry_ids), {}, 0, given_up=True, log=f.log)

    def repair_stream_ids(self) -> None:
        """When due, set the request stream's last ID back if a far-future entry ID left it beyond the bound
        (stream_ids.py: one script, safe with several workers at once). While such an entry is still in the
        stream (its dead letter not flushed yet, a dragged entry not answered yet, or held by another worker), or
        while Redis refuses the script (read-only replica, a script still busy...), asked again, 0.1 s doubling to
        2 s; given up only when the ACL denies it (asked again after the next far-future entry)."""
        now = time.monotonic()
        if not self._repair_due or now < self._repair_backoff.next_try:
            return
        try:
            state, old, new = repair_details(self.r, self.keys)
        except redis.exceptions.NoPermissionError as e:  # only an operator mends it: asked after the next one
            self._repair_due = False
            self._repair_failed(e, "add +xinfo|stream +xinfo|groups +xrevrange +xsetid +xgroup|setid +evalsha to the "
                                   "worker's ACL (README \"Security\")")
            self._repair_error = ""  # said again if the next far-future entry finds it still denied
            return
        except redis.ResponseError as e:  # not (redis.ConnectionError, TimeoutError): the loop handles those
            self._repair_backoff.failed(now)
            self._repair_failed(e, _repair_advice(e))
            return
        finally:
            self.metrics.redis_ops.inc()
        self._repair_error = ""
        if state == "waiting":
            self._repair_backoff.failed(now)
            return
        self._repair_due = False
        if state == "repaired":
            self.log.warning("request_stream_id_repaired", stream=self.keys.requests, last_id=old, new_last_id=new,
                             note="a producer added an entry ID far in the future: XADD * works again")

    def _repair_failed(self, e: redis.ResponseError, action: str) -> None:
        """Logged once per distinct error (retried every 2 s, it would fill the log)."""
        error = str(e)[:300]
        if error != self._repair_error:
            self._repair_error = error
            self.log.error("request_stream_id_repair_failed", stream=self.keys.requests, error=error, action=action)

    def follow_claims(self) -> None:
        """Stop the runs whose claim another worker holds now (they wait for its result), then ask again for
        the waiting ids: answered by their owner -> acknowledged; owner gone (claim expired) -> started here.
        Also sets the stream's last ID back when a far-future entry ID left it there (:meth:`repair_stream_ids`)."""
        self.give_up_lost()
        self.repair_stream_ids()
        now = time.monotonic()
        if not self.waiting or now < self._next_retry:
            return
        self._next_retry = now + RETRY_S
        rids = list(self.waiting)
        replies = self.claims.claim_all(self.r, rids, self._flags)
        self.metrics.redis_ops.inc(3 * len(rids))
        for rid, (claim, (cancelled, has_events)) in zip(rids, replies):
            w = self.waiting[rid]
            try:
                kind, stored = self.claims.outcome(rid, claim)
                if kind == "held":
                    continue
                del self.waiting[rid]
                if kind == "result":
                    log = w.log or request_logger(self.log, rid, trace_id=self._trace_id(w.fields, w.entry_ids[0]))
                    self.outcomes.answered_elsewhere(rid, w.entry_ids, log, counted=not w.given_up)
                elif kind == "foreign":
                    self._foreign_key(w.request, w.entry_ids, stored, w.fields, w.deliveries)
                else:  # its owner died: take over
                    self._start(w.entry_ids, w.request, w.fields, w.deliveries, bool(cancelled), bool(has_events))
            except Exception as e:
                self.waiting.pop(rid, None)
                self.outcomes.failed(rid, w.entry_ids, "admission", e)

    def _foreign_key(self, req: GenerateRequest | Refused, entry_ids: list[str], key: bytes, fields: dict,
                     deliveries: int) -> None:
        """The id's claim or result key holds a value no worker wrote (another type): waiting on it would hold the
        entries, and room, for good. A bad claim key: the id is answered ``internal``, naming the key. A bad
        result key: no answer can be stored there, so the entries go to the dead letters."""
        key_text = key.decode("utf-8", "replace")
        if key_text == self.keys.result(req.id):
            self.outcomes.result_key_foreign(req.id, entry_ids, _body(fields), deliveries,
                                               self._trace_id(fields, entry_ids[0]))
            return
        what = f"{key_text} holds a value of another type (not written by a worker): delete it and send the request again"
        self.outcomes.error(req.id, entry_ids, "internal", what, _metadata(req),
                            trace_id=self._trace_id(fields, entry_ids[0]))

    def release_waiting(self) -> list[str]:
        """Shutdown: the waiting entries, for other workers to take over."""
        ids = [eid for w in self.waiting.values() for eid in w.entry_ids]
        self.waiting.clear()
        for job in self.compiling.values():
            ids += job.entry_ids
            job.span.end()
        self.compiling.clear()
        return ids

    def _start(self, entry_ids: list[str], req: GenerateRequest | Refused, fields: dict, deliveries: int,
               cancelled: bool, has_events: bool = False) -> None:
        if isinstance(req, Refused):
            e = req.error
            trace_id = self._trace_id(fields, entry_ids[0])
            span = self._refused_span(entry_ids[0], req.id, fields, deliveries)
            if req.poison:
                self.outcomes.poisoned(req.id, entry_ids, e.message, e.metadata, _body(fields), deliveries,
                                       trace_id, span)
                return
            if req.future:  # answered first (acknowledging nothing), then each entry to the dead letters
                self.outcomes.error(req.id, [], e.code, e.message, e.metadata, span, trace_id)
                for entry_id in entry_ids:
                    self.outcomes.dead(entry_id, e.message, _body(fields), deliveries, req.id, kind="future_id",
                                       trace_id=trace_id)
                return
            self.outcomes.error(req.id, entry_ids, e.code, e.message, e.metadata, span, trace_id)
            return
        now = time.time()
        entry_id = entry_ids[0]
        arrival = min(entry_time(entry_id), now)
        engine = self.engine()
        span = self._process_span(entry_id, req, fields, deliveries, arrival, engine.model_name)
        log = request_logger(self.log, req.id, span)
        try:
            prompt, params = prepare(req, engine, self.settings)  # every limit, before any work
            if cancelled:
                self._cancelled_before_start(req, entry_ids, fields, deliveries, arrival, prompt, params, span, log,
                                             has_events)
                return
            if not has_events:  # one that streamed tokens under a worker that died has started: never shed
                check_queue_wait(req, now - arrival, self.settings.max_queue_ms)
        except InvalidRequestError as e:
            self.outcomes.error(req.id, entry_ids, e.code, e.message, req.metadata, span)
            return
        except Exception as e:  # a check failed in an unexpected way: answer, keep serving
            log.exception("admission_failed")
            self.outcomes.failed(req.id, entry_ids, "admission", e, span)
            return
        job = Compiling(req, EntryIds(entry_ids), prompt, params, arrival, span, log, body=body_digest(req))
        if has_events:  # an earlier run handed out tokens: continue after them (resume.py)
            if time.monotonic() - self._events_failed_at >= EVENTS_PAGE_KEPT_S:  # one drop is no lasting limit
                self._events_page = PAGE
            try:
                emitted = read_emitted(self.r, self.keys, req.id, events_bound(params.num_samples, params.max_tokens),
                                       job.body, self._events_page)
            except (redis.ConnectionError, redis.TimeoutError) as e:  # asked again with the waiting ids
                self._events_read_failed(req.id, e)
                self.waiting[req.id] = Waiting(req, EntryIds(entry_ids), fields, deliveries)
                return
            job.resume, job.next_seq = emitted.resume_samples(params), emitted.next_seq(params.n)
            if emitted.other_body:
                log.warning("request_not_resumed", reason="its token events came from another body sent under this id",
                            note="this body runs from the start; its token events go on numbering after the other's, "
                                 "and its done is authoritative (send a changed request under a new id)")
            # Not before the request came: an event of an earlier request of this id, or written by hand, is older.
            job.first_token_at = None if emitted.first_token_at is None else max(emitted.first_token_at, arrival)
            log.info("request_resumed", outputs=len(emitted.outputs), continued=job.resume is not None,
                     tokens=sum(len(o.token_ids) for o in emitted.outputs.values()))  # unless the engine refuses it
        if not engine.structured_ready(params):  # its grammar compiles off the loop; it waits here meanwhile
            self.compiling[req.id] = job
            return
        self._enter(engine, job)
        log.debug("request_started", entry_id=entry_id, deliveries=deliveries, priority=req.priority)

    def _cancelled_before_start(self, req: GenerateRequest, entry_ids: list[str], fields: dict, deliveries: int,
                                arrival: float, prompt: str | list[int], params: Any, span: Any, log: Any,
                                has_events: bool) -> None:
        """Cancelled before this worker ran it: ``done``, cancelled. A request taken over from a worker that died
        mid-generation keeps what that worker streamed: its client has those tokens, and the done text is the
        streamed deltas joined."""
        handed_out, prompt_tokens = None, 0
        if has_events:
            try:
                handed_out = read_emitted(self.r, self.keys, req.id,
                                          events_bound(params.num_samples, params.max_tokens))
            except (redis.ConnectionError, redis.TimeoutError):  # asked again with the waiting ids
                self.waiting[req.id] = Waiting(req, EntryIds(entry_ids), fields, deliveries)
                return
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(self.engine().tokenizer.encode(prompt))
        self.outcomes.before_start(req, entry_ids, arrival, "cancelled", params, span, log, handed_out, prompt_tokens)

    def _enter(self, engine: Any, job: Compiling) -> None:
        """Add a checked request to the engine and the running table, or answer the engine's refusal."""
        req = job.request
        try:
            not_resumed = add_to_engine(engine, req, job.prompt, job.params, job.arrival, job.resume)
            if not_resumed is not None:  # what the stream handed out is not this engine's to continue
                job.log.warning("request_not_resumed", reason=not_resumed[:300],
                                note="it runs again from the start; its token events go on numbering after the "
                                     "earlier run's (tokens outside this model's vocabulary: another model ran it "
                                     "before, on this prefix?)")
            self.metrics.pickup.observe(max(0.0, time.time() - job.arrival))
        except InvalidRequestError as e:
            self.outcomes.error(req.id, job.entry_ids, e.code, e.message, req.metadata, job.span)
            return
        except Exception as e:  # the engine refused in an unexpected way: answer, keep serving
            job.log.exception("admission_failed")
            self.outcomes.failed(req.id, job.entry_ids, "admission", e, job.span)
            return
        self.running.start(InFlight(
            request=req,
            entry_ids=job.entry_ids,
            arrival=job.arrival,
            samples=job.params.num_samples,
            max_tokens=job.params.max_tokens,
            span=job.span,
            log=job.log,
            next_seq=dict(job.next_seq),
            first_token_at=job.first_token_at,
            received=(received_from(job.resume, job.params.logprobs is not None)
                      if job.resume is not None and not_resumed is None else {}),
            body=job.body,
        ))

    def unstarted(self) -> int:
        """Sequences this worker holds entries of but has not started: grammars compiling (``n`` each) and ids
        waiting for another worker's run (one each). They take room as running ones do, so that a worker never
        holds more pending entries than it has room for (intake.py)."""
        return sum(job.params.num_samples for job in self.compiling.values()) + len(self.waiting)

    def follow_compiles(self) -> None:
        """Start the entries whose grammar is compiled; answer those whose compile failed or timed out."""
        if not self.compiling:
            return
        engine = self.engine()
        for rid, job in list(self.compiling.items()):
            if engine.structured_ready(job.params):
                del self.compiling[rid]
                self._enter(engine, job)

    def cancel_compiling(self, rid: str) -> bool:
        """A cancel for an entry still compiling: answered ``cancelled`` here. False if none compiles."""
        job = self.compiling.pop(rid, None)
        if job is None:
            return False
        self.outcomes.before_start(job.request, job.entry_ids, job.arrival, "cancelled", job.params, job.span,
                                   job.log)
        return True

    def _consumer_span(self, entry_id: str, request_id: str, fields: dict, deliveries: int, arrival: float,
                       attributes: dict) -> Any:
        """An entry's CONSUMER span, child of the producer's (``traceparent`` in the entry; without one, in the
        entry's own trace, every delivery's span), started at the XADD so that the time in the stream shows in
        the trace. The entry id gives the XADD's millisecond, not when in it: the span starts at that
        millisecond's end (or now, if sooner), never before the producer's span, which began before the XADD (a
        trace viewer shows a child starting before its parent as clock skew)."""
        return start_entry_span(
            self.tracer,
            f"process {self.keys.requests}",
            fields, self._trace_scope, entry_id,
            kind=SpanKind.CONSUMER,
            start_time=int(min(arrival + 0.001, time.time()) * 1e9),
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": self.keys.requests,
                "messaging.consumer.group.name": self.keys.group,
                "messaging.message.id": entry_id,
                "messaging.message.delivery_count": deliveries,
                "pagedserve.request.id": request_id,
                "pagedserve.consumer": self.consumer,
                **attributes,
            },
        )

    def _events_read_failed(self, request_id: str, e: Exception) -> None:
        """A read of a taken-over request's token events broke off: counted, said (when its page shrinks, else at
        most every minute), and read again later in pages a quarter the size: a Redis whose output buffer limit
        for normal clients is under a page closes the connection at every try, and the request would wait for
        ever, unseen, while Redis is up. The full page is tried again ``EVENTS_PAGE_KEPT_S`` after the last failure
        (a drop in an outage is no lasting limit)."""
        self.metrics.redis_errors.inc()
        smaller = max(MIN_PAGE, self._events_page // 4)
        now = self._events_failed_at = time.monotonic()
        if smaller < self._events_page or now - self._events_failure_said >= EVENTS_FAILURE_SAY_S:
            self._events_failure_said = now
            self.log.warning("events_read_failed", request_id=request_id, error=redact(f"{type(e).__name__}: {e}"),
                             page=smaller, note="the request waits, read again in pages of this many events; where "
                             "Redis stays up, its client-output-buffer-limit for normal clients may be under a page")
        self._events_page = smaller

    def _trace_id(self, fields: dict, entry_id: str) -> str:
        """The trace id of an entry's log lines where no span of it is at hand: the one its spans take."""
        return trace_id_from_fields(fields, self._trace_scope, entry_id)

    @functools.cached_property
    def _trace_scope(self) -> str:
        """Where an untraced entry's trace id is derived within (``connection.trace_scope``): one for the worker."""
        return trace_scope(self.settings.redis_url, self.keys.requests)

    def _refused_span(self, entry_id: str, request_id: str, fields: dict, deliveries: int) -> Any:
        """The span of an entry answered without a run (refused at parse time, delivered too often): its
        producer's trace shows the answer (ended by :meth:`Outcomes.error` with its code)."""
        return self._consumer_span(entry_id, request_id, fields, deliveries,
                                   min(entry_time(entry_id), time.time()), {"gen_ai.system": "pagedserve"})

    def _process_span(
        self, entry_id: str, req: GenerateRequest, fields: dict, deliveries: int, arrival: float, model: str
    ) -> Any:
        """The request's CONSUMER span (:meth:`_consumer_span`) with what it asks of the model."""
        span = self._consumer_span(entry_id, req.id, fields, deliveries, arrival, {
            "gen_ai.system": "pagedserve",
            "gen_ai.operation.name": "chat" if req.messages is not None else "text_completion",
            "gen_ai.request.model": model,
        })
        p = req.params
        for attr, value in (
            ("gen_ai.request.max_tokens", p.max_tokens),
            ("gen_ai.request.temperature", p.temperature),
            ("gen_ai.request.top_p", p.top_p),
            ("gen_ai.request.top_k", p.top_k),
            ("gen_ai.request.seed", p.seed),
            ("gen_ai.request.choice.count", p.n),
            ("pagedserve.request.structured_outputs", p.structured_outputs.kind if p.structured_outputs else None),
        ):
            if value is not None:
                span.set_attribute(attr, value)
        return span


def _repair_advice(e: redis.ResponseError) -> str:
    """What the operator can do about a refused repair (retried meanwhile: XADD * works again once it is mended)."""
    text = str(e)
    if isinstance(e, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return "point PAGEDSERVE_REDIS_URL at the primary, not a read-only replica; retried every 2 s"
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return "raise maxmemory or free memory in Redis; retried every 2 s"
    if text.startswith("BUSY"):
        return "another script is running for long in Redis (SCRIPT KILL / FUNCTION KILL it); retried every 2 s"
    return "see the error; retried every 2 s"


def _metadata(req: GenerateRequest | Refused) -> dict:
    return req.metadata if isinstance(req, GenerateRequest) else req.error.metadata


def _body(fields: dict) -> bytes | None:
    raw = fields.get(b"body", fields.get("body"))
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
