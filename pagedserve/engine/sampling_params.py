"""Per-request generation settings (the contract's ``SamplingParams``)."""

from __future__ import annotations

import copy
import enum
import functools
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pagedserve.engine.structured_spec import validate_structured_outputs

MAX_INT = 2**31 - 1  # integer fields stay machine-sized (token ids, counts, lengths)
MAX_SAMPLES = 1024  # n, best_of, beam_width; the engine also caps them at its max_num_seqs
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
# Inclusive bounds per numeric field (temperature, top_p and seed have their own rules in validate()).
LIMITS: dict[str, tuple[float, float]] = {
    "max_tokens": (1, MAX_INT),
    "top_k": (0, MAX_INT),
    "min_p": (0.0, 1.0),
    "n": (1, MAX_SAMPLES),
    "best_of": (1, MAX_SAMPLES),
    "beam_width": (0, MAX_SAMPLES),
    "length_penalty": (-10.0, 10.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 100.0),
    "logprobs": (0, 20),
}
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value, either way
# vLLM SamplingParams options this engine does not implement, and what to do instead: passing one is a TypeError
# naming it rather than Python's "unexpected keyword argument".
# vLLM's options this engine lacks: what to do instead, and vLLM's own defaults of each, which are what pagedserve
# does anyway (a script that spells them out, detokenize=True is common, runs unchanged; any other value
# is refused by name).
UNSUPPORTED_OPTIONS: dict[str, tuple[str, tuple]] = {
    "prompt_logprobs": ("leave it out", (None,)),
    "spaces_between_special_tokens": ("leave it out (the tokenizers' fast decoders, vLLM's too, put no spaces "
                                      "between special tokens)", (True,)),
    "truncate_prompt_tokens": ("leave it out and shorten the prompt", (None,)),
    "detokenize": ("leave it out (text is always decoded)", (True,)),
    "use_beam_search": ("use beam_width > 0 instead", (False,)),
    "guided_decoding": ("use structured_outputs instead (vLLM's newer name)", (None,)),
    "logits_processors": ("leave it out", (None, [])),
    "extra_args": ("leave it out", (None, {})),
    "flat_logprobs": ("leave it out", (False,)),
}


def short_repr(value: object) -> str:
    """``repr`` of a field value, cut so a hostile value (a 5000-digit integer) cannot flood the message."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr() of a huge int is slow, or refused
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # a huge int inside a container: Python refuses to write it
        return f"a {type(value).__name__} holding an integer too large to write"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def check_unicode(text: str, name: str) -> None:
    """ValueError naming ``name`` when ``text`` holds a lone surrogate (a JSON escape can write one, UTF-8 and
    the tokenizer cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate {text[e.start]!r} at character "
                         f"{e.start})") from None


MAX_CACHE_SALT_CHARS = 1024  # a request's cache_salt (the wire's limit too: service/protocol.py)


def check_cache_salt(cache_salt: object) -> None:
    """``cache_salt``: None, or a non-empty string of at most :data:`MAX_CACHE_SALT_CHARS` characters."""
    if cache_salt is None:
        return
    if not isinstance(cache_salt, str) or not cache_salt:
        raise ValueError(f"cache_salt must be a non-empty string (got {short_repr(cache_salt)})")
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt has {len(cache_salt)} characters, more than {MAX_CACHE_SALT_CHARS}")
    check_unicode(cache_salt, "cache_salt")


def plain_number(v: object) -> object:
    """``v`` as a Python int or float when it is another type's integer or real number (numpy scalars); booleans
    and everything else unchanged (the checks refuse them by name)."""
    if isinstance(v, (bool, int, float)) or not isinstance(v, numbers.Real):
        return v
    return int(v) if isinstance(v, numbers.Integral) else float(v)  # numpy's bool_ is no numbers.Real


class RequestOutputKind(enum.IntEnum):
    """What a request's outputs hold while it runs (vLLM's values and names).

    ``CUMULATIVE``: every step's output holds everything generated so far (and the step's delta).
    ``DELTA``: only what the step added (``text``/``token_ids``/``logprobs`` equal the delta fields); a caller
    that streams needs nothing more, and no step copies a long output again.
    ``FINAL_ONLY``: nothing until the request ends, then one whole output (what ``LLM.generate`` returns).
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to generate one request's outputs. ``validate()`` runs on construction.

    Invalid values raise ``ValueError`` whose message starts with the field's name.
    """

    max_tokens: int | None = 16  # None: to the end of the context (max_model_len less the prompt), as vLLM's
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
    # No EOS (unless ignore_eos), stop token or stop string ends a sample before it has this many tokens (vLLM's)
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # the text ends with the stop string that ended it
    skip_special_tokens: bool = True  # the text leaves special tokens out (vLLM's); False: their text is in it
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    # Added to the logits of these token ids before penalties and sampling (OpenAI's and vLLM's): -100 bans a
    # token in effect, 100 all but forces it. The reported logprobs stay the model's.
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be drawn (vLLM's): the others' logits are -inf before bias and penalties.
    allowed_token_ids: list[int] | None = None
    # Words never generated (vLLM's): a word's last token is held back where the output ends with the rest of it.
    bad_words: list[str] | None = None
    # {"json": schema} | {"json_object": True} | {"regex": ...} | {"choice": [...]} | {"grammar": ...}
    # (rules: pagedserve.engine.structured_spec)
    structured_outputs: dict[str, Any] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # bad_words as token ids, each way a word encodes (vLLM's name): set by LLMEngine.add_request, which has the
    # tokenizer, so that no step of the engine's encodes them. No field: asdict, replace, from_dict and the
    # clients' wire body never carry it.
    _bad_words_token_ids: ClassVar[list[list[int]] | None] = None

    if TYPE_CHECKING:
        # The constructor as it runs (the generated one, wrapped by _refuse_unsupported_options below), which
        # the fields' own types do not describe: keyword arguments only; vLLM's spellings of stop and
        # stop_token_ids (one string, a tuple, None), which _normalize turns into the lists the fields hold;
        # and vLLM's options this engine lacks, typed as the defaults that are all it takes (an empty
        # bad_words, ...; a non-empty one is refused when it runs). Kept in step with the fields and
        # UNSUPPORTED_OPTIONS by tests/test_unsupported_options.py.
        def __init__(
            self, *, max_tokens: int | None = 16, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
            min_p: float = 0.0, n: int = 1, best_of: int | None = None, beam_width: int = 0,
            length_penalty: float = 1.0, early_stopping: bool | str = False,
            stop: str | list[str] | tuple[str, ...] | None = None,
            stop_token_ids: list[int] | tuple[int, ...] | None = None, ignore_eos: bool = False,
            min_tokens: int = 0, include_stop_str_in_output: bool = False, skip_special_tokens: bool = True,
            seed: int | None = None,
            presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
            logprobs: int | None = None, logit_bias: Mapping[int, float] | None = None,
            allowed_token_ids: list[int] | tuple[int, ...] | None = None,
            bad_words: list[str] | tuple[str, ...] | None = None, structured_outputs: dict[str, Any] | None = None,
            output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
            prompt_logprobs: None = None, spaces_between_special_tokens: Literal[True] = True,
            truncate_prompt_tokens: None = None, detokenize: Literal[True] = True,
            use_beam_search: Literal[False] = False, guided_decoding: None = None,
            logits_processors: list[Callable[..., Any]] | None = None, extra_args: Mapping[str, Any] | None = None,
            flat_logprobs: Literal[False] = False,
        ) -> None: ...

    def __post_init__(self) -> None:
        self.validate()

    def _normalize(self) -> None:
        """vLLM's spellings of the defaults, in place: ``stop`` / ``stop_token_ids`` None (empty) or a tuple (a
        list), ``stop`` one string (a list of it), ``top_k`` -1 (vLLM's "no top-k": 0 here), a temperature between
        0 and 0.01 as 0.01 (vLLM's floor, which it too raises such a temperature to); and numbers of
        other numeric types (numpy's ``int64``, ``float32``) as Python ints and floats, which the checks and the
        wire's JSON take."""
        for name in (*LIMITS, "temperature", "top_p", "seed", "min_tokens"):
            setattr(self, name, plain_number(getattr(self, name)))
        if isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = [plain_number(t) for t in self.stop_token_ids]
        if isinstance(self.allowed_token_ids, (list, tuple)):  # copies: read once per request (sampler.LogitShaping)
            self.allowed_token_ids = [plain_number(t) for t in self.allowed_token_ids]
        if isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(self.bad_words) or None
        if isinstance(self.logit_bias, Mapping):  # a copy: the caller's dict is not changed, nor shared
            self.logit_bias = {plain_number(k): plain_number(v) for k, v in self.logit_bias.items()} or None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (str, tuple)):
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k == -1:
            self.top_k = 0
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE  # as vLLM: below it logits / t overflow; an OpenAI client may send it

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field against the bounds the engine honours (``LIMITS`` and the rules below).

        The bounds keep every per-request computation finite: integers stay machine-sized (``top_k`` or
        ``max_tokens`` near 2**100 overflow a tensor), ``length_penalty`` keeps ``length ** penalty`` inside a
        double for any length up to ``MAX_INT`` (beam scores divide by it), and a temperature of at least 0.01
        keeps ``logits / temperature`` finite (vLLM's floor). vLLM's spellings of the defaults are converted
        first (``_normalize``).
        """
        self._normalize()

        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why} (got {short_repr(getattr(self, name))})")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:  # an int of any size (isfinite would overflow converting it to a float)
            return is_int(v) or isinstance(v, float) and math.isfinite(v)

        def in_range(name: str, integer: bool = False) -> None:
            lo, hi = LIMITS[name]
            value = getattr(self, name)
            if not (is_int(value) if integer else is_num(value)) or not lo <= value <= hi:
                fail(name, f"must be {'an integer' if integer else 'a number'} in [{lo}, {hi}]")

        if self.max_tokens is not None:  # None: as many as max_model_len leaves after the prompt (vLLM's)
            in_range("max_tokens", integer=True)
        if not is_num(self.temperature) or not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature
                                                <= MAX_TEMPERATURE):
            fail("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        lo, hi = LIMITS["top_k"]
        if not is_int(self.top_k) or not lo <= self.top_k <= hi:
            fail("top_k", f"must be an integer in [{lo}, {hi}], or -1 (as 0: no top-k)")
        in_range("min_p")
        in_range("n", integer=True)
        if self.best_of is not None:
            in_range("best_of", integer=True)
            if self.best_of < self.n:
                fail("best_of", "must be an integer >= n")
        in_range("beam_width", integer=True)
        if self.beam_width > 0 and self.n > self.beam_width:
            fail("n", f"must be <= beam_width ({self.beam_width}) with beam search")
        if self.beam_width > 0 and self.best_of is not None:
            fail("best_of", "cannot be combined with beam search")
        in_range("length_penalty")
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            fail("early_stopping", "must be true, false or 'never'")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if self.stop and self.beam_width > 0:  # beams end on token ids (as in vLLM), never on decoded text
            fail("stop", "cannot be combined with beam search (beam_width > 0): use stop_token_ids")
        for s in self.stop:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                fail("stop", "must be valid Unicode text (a lone surrogate cannot be generated)")
        if not isinstance(self.stop_token_ids, list) or not all(
                is_int(t) and 0 <= t <= MAX_INT for t in self.stop_token_ids):
            fail("stop_token_ids", f"must be a list of integers in [0, {MAX_INT}]")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a boolean")
        most = MAX_INT if self.max_tokens is None else self.max_tokens
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= most:
            fail("min_tokens", f"must be an integer in [0, max_tokens] ({self.max_tokens})")
        if not isinstance(self.include_stop_str_in_output, bool):
            fail("include_stop_str_in_output", "must be a boolean")
        if not isinstance(self.skip_special_tokens, bool):
            fail("skip_special_tokens", "must be a boolean")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            fail("seed", "must be an integer in [0, 2**63)")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            in_range(name)
        if self.logprobs is not None:
            in_range("logprobs", integer=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", f"must map token ids (integers in [0, {MAX_INT}]) to numbers in "
                                   f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
            for k, v in self.logit_bias.items():  # the first bad entry named: a list of 1024 cut in the message hid it
                if not (is_int(k) and 0 <= k <= MAX_INT):
                    raise ValueError(f"logit_bias has key {short_repr(k)}, not a token id (an integer in "
                                     f"[0, {MAX_INT}])")
                if not (is_num(v) and -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS):
                    raise ValueError(f"logit_bias gives token {k} {short_repr(v)}, not a number in "
                                     f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids or not all(
                    is_int(t) and 0 <= t <= MAX_INT for t in self.allowed_token_ids):
                fail("allowed_token_ids", f"must be a non-empty list of integers in [0, {MAX_INT}]")
            if self.beam_width > 0:
                fail("allowed_token_ids", "cannot be combined with beam search (beam_width > 0)")
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list) or not all(isinstance(w, str) and w.strip()
                                                                for w in self.bad_words):
                fail("bad_words", "must be a list of words (strings with more than whitespace)")
            for w in self.bad_words:
                check_unicode(w, "bad_words")
        self.structured_outputs = validate_structured_outputs(self.structured_outputs)
        if self.structured_outputs is not None and self.beam_width > 0:
            fail("structured_outputs", "cannot be combined with beam search (beam_width > 0): sample with n or "
                                      "best_of instead")
        if self.structured_outputs is not None and self.allowed_token_ids is not None:
            fail("allowed_token_ids", "cannot be combined with structured_outputs: the grammar says which tokens "
                                      "may come")
        if is_int(self.output_kind) and self.output_kind in tuple(RequestOutputKind):
            self.output_kind = RequestOutputKind(self.output_kind)
        else:
            fail("output_kind", "must be a RequestOutputKind: CUMULATIVE, DELTA or FINAL_ONLY")

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
    def num_samples_field(self) -> str:
        """The field that sets ``num_samples``, for error messages."""
        if self.beam_width > 0:
            return "beam_width"
        return "best_of" if self.best_of is not None else "n"

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @property
    def shapes_logits(self) -> bool:
        """Whether the logits are changed before drawing: bias, allowed tokens or penalties."""
        return (self.needs_penalties or bool(self.logit_bias) or self.allowed_token_ids is not None
                or self.bad_words is not None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON object; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a sampling parameter")
        return cls(**data)

    def clone(self) -> SamplingParams:
        """A deep copy, as vLLM's ``SamplingParams.clone()``: changing the copy's lists (``stop``, the
        ``structured_outputs`` spec) leaves these as they are."""
        return copy.deepcopy(self)


def final_only(params: list) -> list:
    """``params`` for a caller that reads only each request's final output (``LLM.generate``): every
    ``SamplingParams`` as a ``FINAL_ONLY`` copy (the caller's own are not changed), one copy per distinct object;
    other entries as they are, for the engine to refuse."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if isinstance(p, SamplingParams) and id(p) not in copies:
            copies[id(p)] = (p if p.output_kind is RequestOutputKind.FINAL_ONLY
                             else replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
    return [copies.get(id(p), p) for p in params]


def same_as_one_of(value: object, choices: tuple) -> bool:
    """Whether ``value`` is one of ``choices``: a number by its value (``0.0`` is ``0``: vLLM's float options
    default to an int), a mapping by its items (an empty one is ``{}``), anything else of its type too (``1`` is
    not ``True``: a bool option takes a bool)."""
    return any(_same(value, c) for c in choices)


def _same(value: object, choice: object) -> bool:
    if isinstance(value, bool) or isinstance(choice, bool):
        return type(value) is type(choice) and value == choice
    if isinstance(choice, numbers.Real) and isinstance(value, numbers.Real):  # numpy's numbers too
        return value == choice
    if isinstance(choice, dict) and isinstance(value, Mapping):
        return dict(value) == choice
    return type(value) is type(choice) and value == choice


def is_vllm_default(name: str, value: object) -> bool:
    """Whether ``value`` of unsupported option ``name`` is vLLM's default, which changes nothing here."""
    return same_as_one_of(value, UNSUPPORTED_OPTIONS[name][1])


def vllm_default_words(name: str, as_json: bool = False) -> str:
    """What a refusal of unsupported option ``name`` says is taken instead (in JSON's spelling for the wire)."""
    taken = " or ".join(json.dumps(d) if as_json else repr(d) for d in UNSUPPORTED_OPTIONS[name][1])
    return f"vLLM's default, {taken}, is taken as what pagedserve does"


def _unsupported(name: str) -> str:
    return f"SamplingParams option {name} is not supported by pagedserve: {UNSUPPORTED_OPTIONS[name][0]}; " \
           f"{vllm_default_words(name)}"


def _refuse_unsupported_options(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if args:  # vLLM's first positional field is n, this class's max_tokens: one would be read as the other
            raise TypeError("SamplingParams takes keyword arguments only, e.g. SamplingParams(max_tokens=16)")
        for name, value in list(kwargs.items()):
            if name in UNSUPPORTED_OPTIONS:
                if not is_vllm_default(name, value):
                    raise TypeError(_unsupported(name))
                del kwargs[name]
        init(self, **kwargs)
    return __init__


def _refuse_unknown_attributes(self: SamplingParams, name: str, value: object) -> None:
    """Setting an option after construction, as vLLM code does (``sp.logit_bias = ...``), is checked as the
    constructor checks it: an option this engine lacks, or a misspelt one, was stored and ignored."""
    if name not in _FIELD_NAMES and name != "_bad_words_token_ids":
        if name in UNSUPPORTED_OPTIONS:
            if is_vllm_default(name, value):
                return
            raise AttributeError(_unsupported(name))
        raise AttributeError(f"SamplingParams has no option {name!r}")
    object.__setattr__(self, name, value)


_FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))
SamplingParams.__init__ = _refuse_unsupported_options(SamplingParams.__init__)
SamplingParams.__setattr__ = _refuse_unknown_attributes
