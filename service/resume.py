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
  (:attr:`Emitted.resumable` is False).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from .protocol import Keys


@dataclass
class Output:
    """What one output (``index``) had handed out: its tokens, the text of its deltas, their logprobs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    next_seq: int = 0


@dataclass
class Emitted:
    """The token events found in a request's events stream, per output index."""

    outputs: dict[int, Output] = field(default_factory=dict)
    resumable: bool = True

    @property
    def empty(self) -> bool:
        return not self.outputs

    def next_seq(self) -> dict[int, int]:
        """The ``seq`` each output's next token event takes."""
        return {i: o.next_seq for i, o in self.outputs.items()}

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


def read_emitted(r: redis.Redis, keys: Keys, request_id: str) -> Emitted:
    """The token events already in ``request_id``'s events stream (one XRANGE)."""
    emitted = Emitted()
    for _, fields in r.xrange(keys.events(request_id)):
        raw = fields.get(b"data", fields.get("data"))
        try:
            ev = json.loads(raw)
        except (TypeError, ValueError):
            emitted.resumable = False
            continue
        if not isinstance(ev, dict) or ev.get("type") != "token":
            continue
        index, seq = ev.get("index"), ev.get("seq")
        if not isinstance(index, int) or not isinstance(seq, int):
            emitted.resumable = False
            continue
        o = emitted.outputs.setdefault(index, Output())
        if seq < o.next_seq:
            continue  # appended twice (a flush that broke off was sent again)
        if seq > o.next_seq:
            emitted.resumable = False  # a gap: events were dropped (or trimmed), the tokens are not all here
            o.next_seq = seq + 1
            continue
        o.next_seq = seq + 1
        o.token_ids.extend(int(t) for t in ev.get("token_ids") or [])
        o.text += ev.get("text") or ""
        lp = ev.get("logprobs")
        if lp is not None:
            o.logprobs = (o.logprobs or []) + [{int(k): float(v) for k, v in d.items()} for d in lp]
    return emitted
