"""Taking over a request whose previous worker died mid-generation: what its events stream says was handed out.

A request's token events are appended to ``{prefix}:events:{id}`` (publisher.py). A worker that starts an id
whose events stream already holds token events (its owner died, lost its lease or gave it back) rebuilds each
output's tokens, text and logprobs from them (:func:`read_emitted`) and has the engine continue after them
(``add_request(..., resume=...)``), numbering its own events from the next ``seq``: the client sees one stream.

Invariants:
- an output's tokens are rebuilt from its events ``seq`` 0, 1, 2, ... in order, each ``seq`` taken once (an event
  appended twice after a broken flush is skipped);
- when they cannot be rebuilt (a gap in the ``seq`` numbers, an output the request does not have, beam search
  or ``best_of`` > ``n``), there is nothing to continue after: the request runs again from the start
  (:attr:`Emitted.resumable` is False);
- only the tokens of the body being run are continued: a token event written beside another ``body`` digest
  (another body sent under the same id, taken over in its stead) makes the request run from the start
  (:attr:`Emitted.other_body`). An event without one (a worker before the digest) counts as this body's;
- a run that does not continue numbers its events after every ``seq`` the stream holds for that output (a reader
  keeps the first event of a ``seq``), also past the entries read: a longer stream than the request could have
  written (another body's) is read no further, but its newest page says how far it went.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from .protocol import Keys, as_text, entry_time


PAGE = 1000  # events per XRANGE: a long stream neither blocks Redis nor arrives as one reply
# The fewest a read of a page that failed comes down to: Redis closes a connection whose reply outgrows its
# client-output-buffer-limit for normal clients, and a page of 1000 events with logprobs is a MiB.
MIN_PAGE = 16


def events_bound(samples: int, max_tokens: int | None) -> int:
    """About how many entries a request's events stream keeps (its XADD MAXLEN): one event per token of every
    sample, each output's text-only last event, and the terminal event. A stream longer than that is not the
    request's own."""
    return samples * ((max_tokens or 16) + 1) + 16


@dataclass
class Output:
    """What one output (``index``) had handed out: its tokens, the text of its deltas, their logprobs."""

    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the deltas, joined once: repeated += would be quadratic
    logprobs: list[dict[int, float]] | None = None
    next_seq: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass
class Emitted:
    """The token events found in a request's events stream, per output index."""

    outputs: dict[int, Output] = field(default_factory=dict)
    resumable: bool = True
    other_body: bool = False  # a token event of another body of this id: its tokens are not this body's to continue
    first_token_at: float | None = None  # time.time() of the first token event (its entry id): when the caller got it
    floor: int = 0  # the lowest seq a new event of any output may take (past the entries read: the stream's top + 1)

    @property
    def empty(self) -> bool:
        return not self.outputs

    def next_seq(self, outputs: int) -> dict[int, int]:
        """The ``seq`` the next token event of each of ``outputs`` outputs (and of any other found) takes."""
        return {i: max(self.outputs[i].next_seq if i in self.outputs else 0, self.floor)
                for i in sorted(set(range(outputs)) | set(self.outputs))}

    def resume_samples(self, params: Any) -> list | None:
        """One ``ResumeSample`` per sample of the engine's ``params``, or None if the run cannot be continued."""
        from pagedserve.engine.sequence import ResumeSample

        if not self.resumable or params.beam_width > 0 or params.num_samples != params.n:
            return None
        if any(i >= params.n for i in self.outputs):
            return None
        samples = []
        for i in range(params.n):
            o = self.outputs.get(i, Output())
            samples.append(ResumeSample(list(o.token_ids), o.text, o.logprobs))
        return samples


def received_from(samples: list, want_logprobs: bool) -> dict[int, Output]:
    """What a continued run's outputs start from, per output index (the worker adds each step's part to it):
    each sample's handed-out tokens, text and logprobs; a token whose logprobs were not kept has an empty entry,
    as the engine's own outputs give it."""
    received = {}
    for i, sample in enumerate(samples):
        logprobs = list(sample.logprobs) if sample.logprobs is not None else None
        if logprobs is None and want_logprobs:
            logprobs = [{} for _ in sample.token_ids]
        received[i] = Output(list(sample.token_ids), [sample.text] if sample.text else [], logprobs)
    return received


def _entries(r: redis.Redis, key: str, limit: int, size: int):
    """The stream's (entry id, fields), ``size`` at a time; (None, None) after ``limit`` of them (the rest is not
    read)."""
    start, seen = "-", 0
    while True:
        page = r.xrange(key, min=start, count=size)
        for entry_id, fields in page:
            seen += 1
            if seen > limit:
                yield None, None
                return
            yield entry_id, fields
        if len(page) < size:
            return
        start = "(" + (page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0])


def read_emitted(r: redis.Redis, keys: Keys, request_id: str, limit: int, body: str | None = None,
                 page: int = PAGE) -> Emitted:
    """The token events already in ``request_id``'s events stream, read ``page`` at a time. A stream of more than
    ``limit`` entries (:func:`events_bound` of the request) was not written by runs of this request: it is not
    resumable, and the rest of it is not read. ``body``: the :func:`~.protocol.body_digest` of the request to be
    continued (None: any)."""
    emitted = Emitted()
    for entry_id, fields in _entries(r, keys.events(request_id), limit, page):
        if fields is None:
            emitted.resumable = False
            emitted.floor = _top_seq(r, keys.events(request_id), page) + 1
            break
        raw = fields.get(b"data", fields.get("data"))
        try:
            ev = json.loads(raw)
        except (TypeError, ValueError):
            emitted.resumable = False
            continue
        if not isinstance(ev, dict) or ev.get("type") != "token":
            continue
        written_for = fields.get(b"body", fields.get("body"))
        if body is not None and written_for is not None and as_text(written_for) != body:
            emitted.resumable, emitted.other_body = False, True
        index, seq = ev.get("index"), ev.get("seq")
        if not isinstance(index, int) or not isinstance(seq, int):
            emitted.resumable = False
            continue
        o = emitted.outputs.setdefault(index, Output())
        if seq < o.next_seq:
            continue  # appended twice (a flush that broke off was sent again)
        parts = _parts(ev)
        if seq > o.next_seq or parts is None:
            # A gap (events dropped or trimmed), or an event no worker wrote: the tokens are not all here.
            emitted.resumable = False
            o.next_seq = seq + 1
            continue
        if emitted.first_token_at is None:
            emitted.first_token_at = entry_time(entry_id)
        o.next_seq = seq + 1
        token_ids, text, logprobs = parts
        o.token_ids.extend(token_ids)
        o.texts.append(text)
        if logprobs is not None:
            if o.logprobs is None:
                o.logprobs = []
            o.logprobs.extend(logprobs)
    return emitted


def _top_seq(r: redis.Redis, key: str, page: int) -> int:
    """The highest ``seq`` among the newest token events of a stream (-1: none). Every step of a run writes one
    event per live output, so the output furthest on has its last event among the newest."""
    top = -1
    for _, fields in r.xrevrange(key, count=page):
        try:
            ev = json.loads(fields.get(b"data", fields.get("data")))
        except (TypeError, ValueError):
            continue
        if isinstance(ev, dict) and ev.get("type") == "token" and type(ev.get("seq")) is int:
            top = max(top, ev["seq"])
    return top


def _parts(ev: dict) -> tuple[list[int], str, list[dict[int, float]] | None] | None:
    """A token event's token ids, text and logprobs as a worker writes them; None for any other shape (written
    by hand or by something else), which no run can be continued after."""
    token_ids, text, logprobs = ev.get("token_ids") or [], ev.get("text") or "", ev.get("logprobs")
    if (not isinstance(token_ids, list) or not all(type(t) is int and t >= 0 for t in token_ids)
            or not isinstance(text, str)):
        return None
    if logprobs is not None:
        if not isinstance(logprobs, list) or not all(isinstance(d, dict) for d in logprobs):
            return None
        try:
            logprobs = [{int(k): float(v) for k, v in d.items()} for d in logprobs]
        except (TypeError, ValueError):
            return None
    return token_ids, text, logprobs
