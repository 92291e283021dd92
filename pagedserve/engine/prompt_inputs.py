"""A prompt as the engine takes it, from what vLLM's offline API and step API take: text, token ids (numpy's
included), or a ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` dict (vLLM's TextPrompt and TokensPrompt)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping

PROMPT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's TextPrompt and TokensPrompt
PROMPT_OPTIONS = ("cache_salt",)  # what else such a dict may hold (vLLM's names)


def is_token_ids(value) -> bool:
    return (not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable)
            and hasattr(value, "__len__") and len(value) > 0 and isinstance(value[0], numbers.Integral))


def one_prompt(value, name: str) -> str | list:
    """A prompt as the engine takes it: text, or a list of Python ints (numpy's included)."""
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in PROMPT_KEYS + PROMPT_OPTIONS)
        given = [k for k in PROMPT_KEYS if k in value]
        if unknown or len(given) != 1:
            raise ValueError(f"{name} must have exactly one of the keys {PROMPT_KEYS}"
                             + (f" (unsupported: {', '.join(unknown)})" if unknown else f" (got {given})"))
        inner = value[given[0]]
        if isinstance(inner, Mapping):  # a dict in a dict: its keys (a cache_salt) would be read by no one
            raise ValueError(f"{name}.{given[0]} must be a string or a list of token ids, not a dict")
        return one_prompt(inner, f"{name}.{given[0]}")
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a string, a list of token ids or a {{'prompt': ...}} or "
                         f"{{'prompt_token_ids': ...}} dict (got {type(value).__name__})")
    return [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in value]
