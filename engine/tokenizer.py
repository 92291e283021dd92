"""Loading a model's tokenizer, refused at start when it cannot turn text into tokens."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

PROBE_TEXT = "Hello"


def load_tokenizer(model_dir: str | Path):
    """The model directory's HF tokenizer. Raises ``ValueError`` naming the directory when there is none, or when it
    is empty (no vocabulary, or ``PROBE_TEXT`` encodes to nothing): every text prompt would then have no tokens, and
    a request with no tokens can never be scheduled."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model {str(model_dir)!r} has no usable tokenizer (tokenizer.json or "
                         f"tokenizer_config.json + vocabulary files): {first_line}") from exc
    if len(tokenizer) == 0 or not tokenizer.encode(PROBE_TEXT, add_special_tokens=False):
        raise ValueError(f"model {str(model_dir)!r} has an empty tokenizer: its vocabulary has {len(tokenizer)} "
                         f"tokens and {PROBE_TEXT!r} encodes to no tokens; add the model's tokenizer files")
    return tokenizer
