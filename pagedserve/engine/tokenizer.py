"""Loading a model's tokenizer, refused at start when it cannot turn text into tokens."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig

PROBE_TEXT = "Hello"


def _generic_config(model_dir: str | Path) -> PretrainedConfig | None:
    """config.json as transformers' generic config class, for AutoTokenizer, which reads only a few fields of it
    (model_type, tokenizer_class): left to itself it loads the file through the model type's own config class,
    whose import loads the library's whole model registry (seconds of every start). None where the file is
    missing or unreadable: AutoTokenizer then says what it makes of that itself."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        config = PretrainedConfig.from_dict(raw)  # from_pretrained would warn that the types differ
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    config.name_or_path = str(model_dir)  # as from_pretrained sets it: AutoTokenizer matches some names
    return config


def load_tokenizer(model_dir: str | Path):
    """The model directory's HF tokenizer. Raises ``ValueError`` naming the directory when there is none, or when it
    is empty (no vocabulary, or ``PROBE_TEXT`` encodes to nothing): every text prompt would then have no tokens, and
    a request with no tokens can never be scheduled."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, config=_generic_config(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # On one line, whole up to a bound: transformers' first line can end in "from one of:", its list below.
        said = " ".join(str(exc).split())
        said = (said[:400] + " ...") if len(said) > 400 else said or type(exc).__name__
        raise ValueError(f"model {str(model_dir)!r} has no usable tokenizer (tokenizer.json or "
                         f"tokenizer_config.json + vocabulary files): {said}") from exc
    if len(tokenizer) == 0 or not tokenizer.encode(PROBE_TEXT, add_special_tokens=False):
        raise ValueError(f"model {str(model_dir)!r} has an empty tokenizer: its vocabulary has {len(tokenizer)} "
                         f"tokens and {PROBE_TEXT!r} encodes to no tokens; add the model's tokenizer files")
    return tokenizer


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for: its longest vocabulary entry, added tokens
    included. A byte-level entry has a character per byte and a SentencePiece entry its own characters (a byte
    token such as ``<0x0A>`` more than the one it writes), so a text longer than this times a token count cannot
    encode to that few tokens. Code indentation and banner lines make long tokens: SmolLM2 has one of 81."""
    return max(1, max(map(len, tokenizer.get_vocab()), default=1))
