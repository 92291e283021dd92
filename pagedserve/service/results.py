"""Engine outputs -> wire events (the engine's ``RequestOutput`` never leaves the worker)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .protocol import FINISH_REASONS, CompletionResult, DoneEvent, RequestMetrics, Usage
from .resume import Output


def finish_reason(reason: str | None) -> str:
    """The contract's finish reasons only; an engine-internal reason (e.g. an abort reason) reads as cancelled."""
    return reason if reason in FINISH_REASONS else "cancelled"


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _logprobs(lp: Any) -> list[dict[str, float]] | None:
    if lp is None:
        return None
    # JSON has no -inf: a token with probability 0 reads as -1e30
    return [{str(k): (v if math.isfinite(v) else -1e30) for k, v in (d or {}).items()} for d in lp]


def token_payloads(out: Any, next_seq: dict[int, int]) -> list[bytes]:
    """This step's token events as wire JSON (hot path: one per sequence per step, so no model validation;
    the shape is :class:`TokenEvent`'s, checked by the tests through ``parse_event``). ``next_seq`` (output index
    -> its next ``seq``) is advanced for every event made."""
    rid = out.request_id
    events = []
    for c in out.outputs:
        if not (c.delta_token_ids or c.delta_text):
            continue
        seq = next_seq.get(c.index, 0)
        next_seq[c.index] = seq + 1
        ev = {"type": "token", "id": rid, "index": c.index, "token_ids": list(c.delta_token_ids),
              "text": c.delta_text, "seq": seq}
        if c.logprobs is not None:  # asked for: a worker taking the request over needs them back
            ev["logprobs"] = _logprobs(c.logprobs[len(c.logprobs) - len(c.delta_token_ids):])
        events.append(json.dumps(ev, separators=(",", ":")).encode())
    return events


def add_deltas(received: dict[int, Output], out: Any) -> None:
    """Add a step's output to what each of the request's outputs has received so far. The worker asks the engine
    for ``DELTA`` outputs (admission.prepare): each holds only what its step added, so that no step copies a
    long output again, and the whole output is assembled here once (:func:`whole_output`)."""
    for c in out.outputs:
        got = received.get(c.index)
        if got is None:
            got = received[c.index] = Output(logprobs=None if c.logprobs is None else [])
        got.token_ids += c.token_ids
        if c.text:
            got.texts.append(c.text)
        if c.logprobs is not None:
            if got.logprobs is None:
                got.logprobs = []
            got.logprobs += c.logprobs


def whole_output(out: Any, received: dict[int, Output]) -> Any:
    """A request's last output (``DELTA``) with each output's text, token ids and logprobs as all its steps, and
    the run it resumed, added them up: what :func:`done_event` stores."""
    outputs = []
    for c in out.outputs:
        got = received[c.index]  # add_deltas(received, out) came first
        outputs.append(dataclasses.replace(c, text=got.text, token_ids=got.token_ids, logprobs=got.logprobs))
    return dataclasses.replace(out, outputs=outputs)


def _ms(a: float | None, b: float | None) -> float | None:
    return round((b - a) * 1000, 3) if a is not None and b is not None else None


def run_times(out: Any, first_token_at: float | None = None) -> dict:
    """The engine's timestamps of a request's run (``first_scheduled_time``, ``first_token_time``, ...). With
    ``first_token_at``, when an earlier run of the request (a worker that died or handed it back) gave the caller
    its first token: the request's first token and scheduling are then that run's, not this one's."""
    m = dict(getattr(out, "metrics", None) or {}) if out is not None else {}
    if first_token_at is not None:
        for k in ("first_scheduled_time", "first_token_time"):
            m[k] = min(first_token_at, m.get(k, first_token_at))
    return m


def done_event(rid: str, out: Any, arrival: float, finished: float, metadata: dict, reason: str | None = None,
               times: dict | None = None) -> DoneEvent:
    """The terminal ``done`` event of a request; latencies are measured from the entry's enqueue time, to the
    run's ``times`` (:func:`run_times`; by default the engine's own)."""
    m = run_times(out) if times is None else times
    outputs = [
        CompletionResult(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            finish_reason=finish_reason(c.finish_reason or reason),
            cumulative_logprob=_finite(c.cumulative_logprob),
            logprobs=_logprobs(c.logprobs),
            stop_reason=getattr(c, "stop_reason", None),  # the engine's, set on a "stop" alone
        )
        for c in (out.outputs if out is not None else [])
    ]
    return DoneEvent(
        id=rid,
        outputs=outputs,
        usage=Usage(
            prompt_tokens=len(out.prompt_token_ids) if out is not None else 0,
            completion_tokens=sum(len(c.token_ids) for c in outputs),
            cached_prompt_tokens=getattr(out, "num_cached_tokens", 0) or 0,
        ),
        metrics=RequestMetrics(
            queued_ms=_ms(arrival, m.get("first_scheduled_time")),
            ttft_ms=_ms(arrival, m.get("first_token_time")),
            e2e_ms=_ms(arrival, m.get("finished_time") or finished),
        ),
        metadata=metadata,
    )


def _handed_out_sum(o: Any) -> float | None:
    """The cumulative logprob of what an earlier run handed out: 0.0 for nothing (as the engine sums no token),
    the chosen tokens' logprobs summed where their events carried them, else None (not known)."""
    if o is None or not o.token_ids:
        return 0.0
    if o.logprobs is None or len(o.logprobs) != len(o.token_ids):
        return None
    chosen = [d.get(t) for d, t in zip(o.logprobs, o.token_ids)]
    return _finite(sum(chosen)) if None not in chosen else None


def done_before_start(rid: str, n: int, reason: str, e2e_ms: float, metadata: dict, handed_out: Any = None,
                      prompt_tokens: int = 0) -> DoneEvent:
    """A request that ended before reaching the engine (cancelled before pick-up): empty outputs, or, for one
    taken over from a worker that died mid-generation, what its events stream says that worker handed out
    (``handed_out``: resume.py's ``Emitted``), so that the done text is still the streamed deltas joined."""
    got = handed_out.outputs if handed_out is not None else {}
    outputs = []
    for i in range(max(1, n)):  # an index past n (a best_of sample) is not one of the request's outputs
        o = got.get(i)
        outputs.append(CompletionResult(
            index=i, text=o.text if o else "", token_ids=list(o.token_ids) if o else [], finish_reason=reason,
            cumulative_logprob=_handed_out_sum(o), logprobs=_logprobs(o.logprobs) if o else None))
    return DoneEvent(
        id=rid,
        outputs=outputs,
        usage=Usage(prompt_tokens=prompt_tokens if got else 0,
                    completion_tokens=sum(len(o.token_ids) for o in outputs)),
        metrics=RequestMetrics(e2e_ms=round(e2e_ms, 3)),
        metadata=metadata,
    )
