"""Per-request generation settings (the contract's ``SamplingParams``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass
class SamplingParams:
    """How to generate one request's outputs. ``validate()`` runs on construction.

    Invalid values raise ``ValueError`` whose message starts with the field's name.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    best_of: int | None = None
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why} (got {getattr(self, name)!r})")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)  # type: ignore[arg-type]

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 = off)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            fail("best_of", "must be an integer >= n")
        if not is_int(self.beam_width) or self.beam_width < 0:
            fail("beam_width", "must be an integer >= 0 (0 = no beam search)")
        if self.beam_width > 0 and self.n > self.beam_width:
            fail("n", f"must be <= beam_width ({self.beam_width}) with beam search")
        if self.beam_width > 0 and self.best_of is not None:
            fail("best_of", "cannot be combined with beam search")
        if not is_num(self.length_penalty):
            fail("length_penalty", "must be a finite number")
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            fail("early_stopping", "must be true, false or 'never'")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a boolean")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            fail("seed", "must be an integer in [0, 2**63)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                fail(name, "must be in [-2, 2]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be a number > 0")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            fail("logprobs", "must be an integer in [0, 20]")

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """How many sequences the request runs: ``best_of`` (or ``n``), or ``beam_width`` for beam search."""
        if self.beam_width > 0:
            return self.beam_width
        return self.best_of if self.best_of is not None else self.n

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        """Build from a JSON object; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a sampling parameter")
        return cls(**data)
