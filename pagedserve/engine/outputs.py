"""What the engine returns: one ``RequestOutput`` per request, one ``CompletionOutput`` per returned sequence,
and how they are built from a request's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.engine.detokenizer import decode_after_prompt
from pagedserve.engine.sampling_params import RequestOutputKind

DELTA, FINAL_ONLY = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY

if TYPE_CHECKING:
    from pagedserve.engine.sequence import Request


@dataclass(slots=True)
class CompletionOutput:
    """One output sequence of a request.

    ``delta_text``/``delta_token_ids`` are what this step added (their concatenation over the steps equals the
    final ``text``, never splitting a UTF-8 character). ``text``/``token_ids``/``logprobs`` hold everything so
    far, or under ``RequestOutputKind.DELTA`` only the step's part, as the delta fields do.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "deadline"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    # What ended a "stop", as vLLM's: the stop token id (int) or the stop string (str); None for EOS, a grammar's
    # end, a length limit, a cancel or a deadline. Offline only: the wire protocol does not carry it.
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """Whether this output has ended: a method, as vLLM's (``RequestOutput.finished`` is a field, as there)."""
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)  # arrival/first_scheduled/first_token/finished times
    # Set when the request ended because of its own failure (or could never be scheduled): a one-line message.
    # Such an output is final (``finished``) and has no ``outputs``; the other requests are unaffected.
    error: str | None = None
    # The error is the request's own parameters' doing, its message naming them (a grammar that cannot be
    # followed, rules that leave no token to draw): the producer's to mend, where another error is the engine's.
    error_from_params: bool = False
    # Times the scheduler took the request's KV room for others so far (swapped out or recomputed): what a slow
    # request's trace and log line show.
    num_preemptions: int = 0


def build_output(req: Request, final: bool, tokenizer, eos_token_ids: frozenset[int] | set[int] = frozenset(),
                 ) -> RequestOutput | None:
    """The request's output after a step, as its ``output_kind`` asks (``RequestOutputKind``), or None while
    nothing can be shown yet (beam search and ``best_of > n`` only know their outputs at the end, and
    ``FINAL_ONLY`` shows nothing before). ``eos_token_ids``: the engine's, which tell a beam ended by EOS
    (``stop_reason`` None) from one ended by a stop token id."""
    p = req.params
    kind = p.output_kind
    if kind is FINAL_ONLY and not final:
        return None
    if req.beam is not None:
        return _beam_output(req, tokenizer, eos_token_ids) if final else None
    hidden = p.best_of is not None and p.best_of > p.n
    if hidden and not final:
        return None
    seqs = req.seqs
    if hidden:
        seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:p.n]
    completions = []
    want_logprobs = p.logprobs is not None
    delta_only = kind is DELTA
    for rank, seq in enumerate(seqs):
        # Positional construction: every running sample builds one of these every step.
        detok, token_ids, reason = seq.detok, seq.token_ids, seq.finish_reason
        delta_text = detok.take_delta(final or reason is not None)
        num_prompt = seq.num_prompt_tokens
        emitted = num_prompt + seq.num_emitted_tokens
        seq.num_emitted_tokens = len(token_ids) - num_prompt
        delta_ids = token_ids[emitted:]
        if delta_only:  # no copy of what earlier steps handed out: a long output costs the same every step
            text, ids, logprobs = delta_text, delta_ids, seq.logprobs[emitted - num_prompt:] if want_logprobs else None
        else:
            text, ids = detok.text[:detok.emitted], token_ids[num_prompt:]
            logprobs = list(seq.logprobs) if want_logprobs else None
        completions.append(CompletionOutput(
            rank if hidden else seq.index,  # index
            text,  # text
            ids,  # token_ids
            reason,  # finish_reason
            seq.cumulative_logprob,  # cumulative_logprob
            logprobs,  # logprobs
            delta_text,  # delta_text
            delta_ids,  # delta_token_ids
            _stop_reason(token_ids, detok.stop_string, p, eos_token_ids) if reason == "stop" else None,  # stop_reason
        ))
    if final:
        _pad_to_n(completions, p.n, req.finish_reason, p.logprobs is not None)
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, final,
                         req.num_cached_tokens, dict(req.metrics), num_preemptions=req.num_preemptions)


def _stop_reason(token_ids: list[int], stop_string: str | None, p, eos_token_ids) -> int | str | None:
    """vLLM's ``stop_reason`` of an output that ended "stop": the stop string it was cut at, else the stop token id
    it ended on (EOS, which vLLM checks first, and a grammar's end give None)."""
    if stop_string is not None:
        return stop_string
    last = token_ids[-1] if token_ids else None
    if last in p.stop_token_ids and (p.ignore_eos or last not in eos_token_ids):
        return last
    return None


def _pad_to_n(completions: list[CompletionOutput], n: int, reason: str | None, logprobs: bool) -> None:
    """A request ended (cancel, deadline) before its prompt forked into its samples or beams still has ``n``
    outputs, as a caller reading ``outputs[i]`` for ``i < n`` expects: the missing ones are empty, with its reason."""
    reason = reason or (completions[0].finish_reason if completions else None)
    for index in range(len(completions), n):
        completions.append(CompletionOutput(index, "", [], reason, 0.0, [] if logprobs else None))


def _beam_output(req: Request, tokenizer, eos_token_ids: frozenset[int] | set[int]) -> RequestOutput:
    """The ``n`` best finished hypotheses; a search cut short (cancel, deadline) returns its live beams.

    A hypothesis that ended on EOS or a stop token id keeps the token in ``token_ids``, and its text only with
    ``include_stop_str_in_output``, as a sampled sequence does. Texts are decoded after the prompt, as a sampled
    sequence's are."""
    p = req.params
    skip_ids = set(tokenizer.all_special_ids)
    hyps = req.beam.best(p.n)
    reason = req.finish_reason
    want_logprobs = p.logprobs is not None
    completions = []
    if reason is None:
        for rank, h in enumerate(hyps):
            ended_on_token = h.hit_eos and h.token_ids
            shown = h.token_ids[:-1] if ended_on_token and not p.include_stop_str_in_output else h.token_ids
            text = decode_after_prompt(tokenizer, req.prompt_token_ids, shown, skip_ids, p.skip_special_tokens,
                                       req.prompt is not None)
            stop_reason = _stop_reason(h.token_ids, None, p, eos_token_ids) if ended_on_token else None
            completions.append(CompletionOutput(rank, text, h.token_ids, "stop" if h.hit_eos else "length",
                                                h.logprob, h.logprobs, delta_text=text, delta_token_ids=h.token_ids,
                                                stop_reason=stop_reason))
    else:
        for rank, seq in enumerate(req.seqs[:req.params.n]):
            ids = seq.output_token_ids
            text = decode_after_prompt(tokenizer, req.prompt_token_ids, ids, skip_ids, p.skip_special_tokens,
                                       req.prompt is not None)
            completions.append(CompletionOutput(rank, text, ids, reason, seq.cumulative_logprob,
                                                list(seq.logprobs) if want_logprobs else None,
                                                delta_text=text, delta_token_ids=ids))
        _pad_to_n(completions, req.params.n, reason, want_logprobs)
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, True,
                         req.num_cached_tokens, dict(req.metrics), num_preemptions=req.num_preemptions)


def error_output(req: Request, error: str, from_params: bool = False) -> RequestOutput:
    """The final output of a request ended by its own failure: no completions, the one-line ``error``."""
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [], True, req.num_cached_tokens,
                         dict(req.metrics), error=error, error_from_params=from_params,
                         num_preemptions=req.num_preemptions)
