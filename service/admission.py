"""Admission checks: turn a parsed request into what ``engine.add_request`` takes, or refuse it.

Every limit is checked here, before any work starts: sampling parameters (the engine's own validation, whose
messages name the field), sequences per request vs ``max_num_seqs``, chat template, token ids vs the
vocabulary, prompt length vs ``max_model_len``, and (load shedding) the time the entry waited in the stream vs
``max_queue_ms``. Refusals are :class:`InvalidRequestError` with the contract's error code.
"""

from __future__ import annotations

from typing import Any

from .protocol import GenerateRequest, InvalidRequestError

# No tokenizer turns more than this many characters into one token: a longer prompt cannot fit and is refused
# without tokenizing it (the engine checks the exact token count).
_MAX_CHARS_PER_TOKEN = 64


def prepare(req: GenerateRequest, engine: Any, max_num_seqs: int) -> tuple[str | list[int], Any]:
    """Returns ``(prompt, SamplingParams)`` for ``engine.add_request`` or raises :class:`InvalidRequestError`."""
    from engine import SamplingParams

    def refuse(code: str, message: str) -> InvalidRequestError:
        return InvalidRequestError(req.id, code, message, req.metadata)

    try:
        params = SamplingParams(**req.params.to_kwargs())
    except (ValueError, TypeError) as e:
        raise refuse("invalid_request", f"params.{e}") from None
    if params.num_samples > max_num_seqs:
        raise refuse("invalid_request", f"params: {params.num_samples} sequences exceed max_num_seqs {max_num_seqs}")
    max_len = engine.max_model_len
    if req.messages is not None:
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise refuse("invalid_request", "messages: the model has no chat template")
        try:
            prompt: str | list[int] = tok.apply_chat_template(
                [m.model_dump() for m in req.messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # a template may reject roles or orderings
            raise refuse("invalid_request", f"messages: {str(e)[:300]}") from None
    elif req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        vocab = engine.vocab_size
        bad = max(ids)
        if bad >= vocab:
            raise refuse("invalid_request", f"prompt_token_ids: {bad} is out of vocabulary (size {vocab})")
        if len(ids) + 1 > max_len:
            raise refuse("prompt_too_long", f"prompt has {len(ids)} tokens; max_model_len is {max_len}")
        prompt = list(ids)
    else:
        prompt = req.prompt or ""
        if len(prompt) > _MAX_CHARS_PER_TOKEN * max_len:
            raise refuse("prompt_too_long", f"prompt has {len(prompt)} characters; max_model_len is {max_len}")
    return prompt, params


def check_queue_wait(req: GenerateRequest, waited_s: float, max_queue_ms: int | None) -> None:
    """Load shedding: refuse with ``overloaded`` a request that waited in the stream longer than ``max_queue_ms``
    (None or 0: no limit).

    The wait runs from the entry's XADD (the time in its stream id) to its pick-up, redeliveries included: an
    entry reclaimed from a dead worker has waited all that time too. Past the limit its client has likely given
    up, and starting it would only make every later request wait longer. Checked after validation (a request
    that can never succeed says why instead) and after the cancelled-before-pick-up check.
    """
    waited_ms = waited_s * 1000
    if not max_queue_ms or waited_ms <= max_queue_ms:
        return
    raise InvalidRequestError(
        req.id,
        "overloaded",
        f"request waited {waited_ms:.0f} ms in the queue, more than the limit of {max_queue_ms} ms "
        "(PAGEDSERVE_MAX_QUEUE_MS): the service is overloaded, retry later with a new id "
        "(this id is answered with this error until its result expires)",
        req.metadata,
    )


def add_to_engine(engine: Any, req: GenerateRequest, prompt: str | list[int], params: Any, arrival: float) -> None:
    """``engine.add_request`` with the engine's refusals mapped to error codes."""
    from engine.errors import PromptTooLongError

    deadline = req.deadline_ms / 1000.0 if req.deadline_ms is not None else None
    try:
        engine.add_request(req.id, prompt, params, priority=req.priority, deadline=deadline, arrival_time=arrival)
    except PromptTooLongError as e:
        raise InvalidRequestError(req.id, "prompt_too_long", str(e), req.metadata) from None
    except ValueError as e:
        raise InvalidRequestError(req.id, "invalid_request", str(e), req.metadata) from None
