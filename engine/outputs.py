"""What the engine returns: one ``RequestOutput`` per request, one ``CompletionOutput`` per returned sequence."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One output sequence of a request.

    ``text``/``token_ids`` are cumulative; ``delta_text``/``delta_token_ids`` are what this step added (the
    service streams deltas; their concatenation equals ``text``, never splitting a UTF-8 character).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "deadline"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
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
