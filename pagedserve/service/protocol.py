"""The wire protocol: Redis names and a pydantic model for every message.

Over 400 lines on purpose: every message of the wire is here, so the published JSON Schemas have one source.

The models are the single source of truth for both validation and the published JSON Schemas
(``docs/schemas/*.json``, regenerated with ``python -m pagedserve.service.schemas docs/schemas``).

Invariants:
- every value on the wire is UTF-8 JSON (never pickle);
- a request that cannot be parsed or has no valid id is a dead letter; a request with a valid id but bad
  content gets an ``error`` event; the two are told apart by :func:`parse_request`;
- a request that parses can be answered: every limit that JSON or the engine cannot honour is checked at parse
  time, with an error naming the field: nesting depth, ``metadata`` size, integer size, non-finite numbers and
  lone surrogates anywhere in the body (safe_json.py), 64-bit integers in every typed field. So the ``metadata``
  echoed in the terminal event always serializes, and no value overflows the engine's integers.
  Ranges of the sampling parameters are the engine's own (``SamplingParams.validate``, at admission); the
  operator's per-request limits are settings (``max_samples_per_request`` ...), also checked at admission.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import math
import numbers
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema,
                      field_validator, model_serializer, model_validator)

from .safe_json import (  # noqa: F401  (the limits are part of this module's API)
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    first_problem,
    has_surrogate_escape,
    json_size,
    loads,
    metadata_or_empty,
    scan_too_deep,
)

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
ERROR_CODES = ("invalid_request", "prompt_too_long", "overloaded", "internal")
FINISH_REASONS = ("stop", "length", "cancelled", "deadline")

# Limits of a request body checked at parse time besides those of safe_json.py (the contract's "limits are
# checked before work starts").
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_ALLOWED_TOKEN_IDS = 1024
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 64, 256  # each step looks for every word at the end of each output
MAX_MESSAGES = 4096
# The engine's own limit (engine/sampling_params.py), checked here before a worker reads the entry; the engine is
# not imported at module level (the service loads it on first use), so the value is stated twice and a test holds
# the two equal.
MAX_CACHE_SALT_CHARS = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LOWEST_PRIORITY = 2**31 - 1  # the worst priority a request may have (lower values run first)
DEFAULT_PRIORITY = 0  # a request's that names none: interactive traffic; batch lines and background work go worse
MAX_DEADLINE_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# An entry giving body more often is not an honest mistake (one XADD with two requests): no body of it is read.
MAX_REPEATED_BODIES = 64
# 2001-09-09T01:46:40Z: a smaller deadline_ms is seconds or a duration, never a moment a request was sent before.
MIN_DEADLINE_MS = 1_000_000_000_000
# The stream fields besides ``body`` (traceparent and tracestate: W3C caps tracestate at 512 characters), names
# included. More is refused at once, so that an entry padded with other fields leaves the stream on its first read
# instead of being read again on every redelivery (max_message_bytes bounds the body alone).
MAX_OTHER_FIELDS_BYTES = 4096


def whole_number(value: Any) -> Any:
    """JSON has one number type: ``4.0`` is the integer 4 (JSON Schema says so, and Java or C# serializers write
    whole doubles that way). Other floats stay floats, for the strict check to refuse. From 2**53 on, floats skip
    whole numbers, so the float read may be a neighbour of the number written (123456789012345678.0 reads as
    123456789012345680): such a float is refused rather than run as a number nobody sent."""
    if isinstance(value, float) and value.is_integer():
        if abs(value) >= 2**53:
            raise ValueError(f"{value!r} is a whole number written as a float of magnitude 2**53 or more, where "
                             "floats skip whole numbers (it may not be the one written): write it as an integer")
        return int(value)
    return value


def whole_int(ge: int, le: int) -> Any:
    """An integer field in [ge, le] that takes whole floats (the bounds before the validator: so pydantic
    publishes them as JSON Schema's minimum and maximum)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(whole_number)]


Int64 = whole_int(INT64_MIN, INT64_MAX)


def _token_id_keys(value: Any) -> Any:
    """``logit_bias`` keys as JSON writes them, strings (OpenAI's format); a Python caller's integer keys (numpy's
    too) as those strings. Two keys of one token (``16`` and ``"16"``) are refused: which bias would it get?"""
    if not isinstance(value, dict):
        return value
    keys = {k: str(int(k)) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k for k in value}
    bad = next((k for k in keys.values() if not isinstance(k, str) or not _TOKEN_ID_KEY.fullmatch(k)), None)
    if bad is not None:
        raise ValueError(f"keys must be token ids, written as decimal integers without leading zeros (got "
                         f"{repr(bad)[:40]})")
    if len(set(keys.values())) < len(keys):
        twice = next(k for k in keys.values() if list(keys.values()).count(k) > 1)
        raise ValueError(f"gives token {twice} more than once")
    return {keys[k]: v for k, v in value.items()}


_TOKEN_ID_KEY = re.compile(r"0|[1-9][0-9]{0,9}")


def engine_logit_bias(bias: dict) -> dict:
    """``logit_bias`` with its keys as the engine's token ids: a key written as a token id (a decimal integer
    without leading zeros) as that int; any other left for the engine's check to refuse by name."""
    return {int(k) if isinstance(k, str) and _TOKEN_ID_KEY.fullmatch(k) else k: v for k, v in bias.items()}
# Token ids as JSON object keys, decimal digits, to numbers (the engine checks ranges and the vocabulary).
LogitBias = Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS_ENTRIES), BeforeValidator(_token_id_keys),
                      WithJsonSchema({"type": "object", "propertyNames": {"pattern": f"^({_TOKEN_ID_KEY.pattern})$"},
                                      "additionalProperties": {"type": "number"},
                                      "maxProperties": MAX_LOGIT_BIAS_ENTRIES})]


def asks_nothing(value: object) -> bool:
    """A message key's value that asks for nothing, as the openai SDK writes a reply's unused keys when it dumps
    one (``refusal: None``, ``annotations: []``): such a key is left out, whatever it is named."""
    return value is None or (isinstance(value, (list, dict)) and not value)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def as_text(value: object) -> str:
    """A Redis reply value as text: clients without ``decode_responses`` return bytes (invalid UTF-8 replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Keys:
    """Every Redis name of one deployment, derived from its prefix (default ``pagedserve``)."""

    prefix: str = "pagedserve"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        return f"{self.prefix}-workers"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def out(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    def events(self, request_id: str) -> str:
        """The request's events as a Redis stream (token events with ``seq``, then the terminal event): what a
        client reads from the last entry it saw, and what a worker taking the request over continues after."""
        return f"{self.prefix}:events:{request_id}"

    def cancelled(self, request_id: str) -> str:
        return f"{self.prefix}:cancelled:{request_id}"

    def running(self, request_id: str) -> str:
        """The claim of an id while one worker runs it: one run per id across workers (extra, not in §2)."""
        return f"{self.prefix}:running:{request_id}"

    def consumer_lease(self, consumer: str) -> str:
        """Liveness key of a consumer name: two live workers never share a name (extra, not in §2)."""
        return f"{self.prefix}:consumer:{consumer}"


# ------------------------------------------------------------------------------------------ request
_STRICT = ConfigDict(extra="forbid", strict=True)


def likely_meant(name: str, names: Any) -> str | None:
    """The one of ``names`` that ``name`` is likely a misspelling of, if any."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
    return close[0] if close else None


def refuse_misspelt(data: Any, model: type[BaseModel], what: str) -> None:
    """A key of ``data`` (a dict) that is none of ``model``'s fields (as the wire names them) but close to one:
    refused naming the one it likely means, where pydantic says only "Extra inputs are not permitted". ``what``:
    what the fields are."""
    if not isinstance(data, dict):
        return
    names = [f.alias or name for name, f in model.model_fields.items()]
    for name in data:
        if isinstance(name, str) and name not in names and (meant := likely_meant(name, names)):
            raise FieldValueError(name, f"not {what} (did you mean {meant}?)")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str = Field(min_length=1, max_length=64)
    # The schema shows both forms the validator below takes (the str type alone published only the string).
    content: Annotated[str, WithJsonSchema({
        "description": "A string, or OpenAI's list of text content parts (joined with newlines).",
        "anyOf": [{"type": "string"},
                  {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                              "required": ["type", "text"],
                                              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}],
    })]

    @model_validator(mode="before")
    @classmethod
    def _misspelt(cls, data: Any) -> Any:
        refuse_misspelt(data, cls, "a message field")
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        # OpenAI's content parts, text only, joined as vLLM's OpenAI server and LLM.chat join them: the chat
        # template is given a string either way.
        if not isinstance(value, list):
            return value
        joined = joined_text_parts(value)
        if isinstance(joined, tuple):
            index, key, why = joined
            raise ValueError(f"part {index}{'' if key is None else '.' + key}: {why}")
        return joined


TEXT_PART = '{"type": "text", "text": ...}'


def joined_text_parts(parts: list) -> str | tuple[int, str | None, str]:
    """OpenAI's text content parts as one string, joined with newlines as vLLM's OpenAI server and ``LLM.chat``
    join them; or, for the first part that is no text part, its index, the key beside a text part's own that it
    has (None: it is no text part at all) and why (a part carries ``type`` and ``text`` alone: a key beside them
    may ask for what the text alone does not give, and is never dropped)."""
    texts = []
    for i, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            return i, None, f"only text content parts ({TEXT_PART}) can run"
        extra = sorted(set(part) - {"type", "text"}, key=str)
        if extra:
            return i, str(extra[0]), f"not supported: a text part ({TEXT_PART}) carries its text alone"
        texts.append(part["text"])
    return "\n".join(texts)


def _structured_vllm_defaults_schema(schema: dict) -> None:
    """vLLM's structured-outputs fields at their defaults, which the wire takes and drops, in the published
    schema: a validator of it refused a dump of vLLM's dataclass that the worker runs."""
    from pagedserve.engine.structured_spec import VLLM_DEFAULTS

    for name, (default, why) in VLLM_DEFAULTS.items():
        schema["properties"][name] = {**({"type": "null"} if default is None else {"const": default}),
                                      "description": f"vLLM's field at its default (dropped): pagedserve {why}"}


class StructuredOutputsModel(BaseModel):
    """``params.structured_outputs``: the output must match a JSON Schema, any JSON object, a regex, one of a
    list of strings, or a grammar (Lark or GBNF); exactly one of those five, plus whitespace options for the
    JSON kinds (vLLM's names). Shapes are checked here; the rest (exactly one kind, whether it compiles) by the
    engine, answered ``invalid_request`` naming ``params.structured_outputs`` before the request runs.
    """

    # The wire name only: "json_schema" (the attribute's name) is an unknown key, as it is offline and in the
    # published JSON Schema of requests.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_structured_vllm_defaults_schema)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json",
                                                    description="A JSON Schema (object, or its JSON text).")
    json_object: bool | None = Field(None, description="true: any JSON object.")
    regex: str | None = Field(None, description="The whole output matches this regular expression.")
    choice: list[str] | None = Field(None, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="A Lark (or llama.cpp GBNF) grammar.")
    disable_any_whitespace: bool | None = Field(None, description="JSON kinds: compact JSON, no whitespace.")
    whitespace_pattern: str | None = Field(
        None, description="JSON kinds: a regex each run of whitespace between JSON tokens matches.")
    disable_additional_properties: bool | None = Field(
        None, description="json: an object that names its properties admits no others unless it says so (the "
                          "default, true; false: as JSON Schema reads it, any other key).")

    @model_validator(mode="before")
    @classmethod
    def _misspelt(cls, data: Any) -> Any:
        if isinstance(data, dict):  # vLLM's own fields at its defaults, as a dump of its dataclass spells them out
            from pagedserve.engine.structured_spec import without_vllm_defaults

            data = without_vllm_defaults(data)
        refuse_misspelt(data, cls, "a structured_outputs field")
        return data

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_shape(cls, value: Any) -> Any:
        # One message, not pydantic's one per branch of the union (``dict[str,any]``, ``str``).
        if value is None or isinstance(value, (dict, str)):
            return value
        if isinstance(value, type) and hasattr(value, "model_json_schema"):  # as OpenAI's response_format takes
            raise ValueError(f"must be a JSON Schema object or its JSON text (got the pydantic class "
                             f"{value.__name__}: pass {value.__name__}.model_json_schema())")
        if isinstance(value, bool):
            got = json.dumps(value)
        elif isinstance(value, (int, float)):
            got = "a number"
        elif isinstance(value, (list, tuple)):
            got = "an array"
        else:
            got = f"the class {value.__name__}" if isinstance(value, type) else f"a {type(value).__name__}"
        raise ValueError(f"must be a JSON Schema object or its JSON text (got {got})")

    @property
    def kind(self) -> str | None:
        """The kind asked for (the first one set; the engine refuses more than one)."""
        given = {"json": self.json_schema, "json_object": self.json_object, "regex": self.regex,
                 "choice": self.choice, "grammar": self.grammar}
        return next((k for k, v in given.items() if v is not None), None)

    @model_serializer(mode="wrap")
    def _wire_names(self, handler):  # "json" on the wire (a field named json would shadow BaseModel.json)
        data = handler(self)
        if "json_schema" in data:
            data["json"] = data.pop("json_schema")
        return data


def _vllm_defaults_schema(schema: dict) -> None:
    """The vLLM options the wire takes at vLLM's default (and drops), in the published schema: a validator of it
    refused ``spaces_between_special_tokens: true`` that the worker runs."""
    from pagedserve.engine.sampling_params import UNSUPPORTED_OPTIONS

    def one(default: Any) -> dict:
        if default is None:
            return {"type": "null"}
        if isinstance(default, dict):
            return {"type": "object", "maxProperties": 0}
        if isinstance(default, list):
            return {"type": "array", "maxItems": 0}
        return {"const": default}

    for name, (instead, defaults) in UNSUPPORTED_OPTIONS.items():
        shapes = [one(d) for d in defaults]
        schema["properties"][name] = {
            **(shapes[0] if len(shapes) == 1 else {"anyOf": shapes}),
            "description": f"vLLM's option at its default, what pagedserve does (dropped); any other value is "
                           f"refused: {instead}"}


class SamplingParamsModel(BaseModel):
    """``SamplingParams`` fields as they travel on the wire; all optional (engine defaults apply).

    Shape and types are checked here; ranges by ``engine.SamplingParams.validate`` (whose messages name
    the field).
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_vllm_defaults_schema)
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    n: Int64 | None = None
    best_of: Int64 | None = None
    beam_width: Int64 | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[Int64] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool | None = None
    min_tokens: Int64 | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logprobs: Int64 | None = None
    logit_bias: LogitBias | None = None
    allowed_token_ids: list[Int64] | None = Field(None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)
    # A word is more than whitespace (the engine refuses a blank one; so does the published schema)
    bad_words: list[Annotated[str, Field(max_length=MAX_BAD_WORD_CHARS, pattern=r"\S")]] | None = Field(
        None, max_length=MAX_BAD_WORDS)
    structured_outputs: StructuredOutputsModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _vllm_defaults(cls, data: Any) -> Any:
        """vLLM's options pagedserve lacks, at vLLM's default (what pagedserve does: ``detokenize: true``),
        are dropped, as ``SamplingParams`` and batch lines drop them; at any other value refused by name. vLLM's
        ``guided_*`` fields point at ``structured_outputs``, and a misspelt field at the one it likely means
        (pydantic said "Extra inputs are not permitted")."""
        if isinstance(data, dict) and data.get("logit_bias") == {}:  # vLLM's default: no bias, as if left out
            data = {k: v for k, v in data.items() if k != "logit_bias"}
        if not isinstance(data, dict) or set(data) <= set(cls.model_fields):
            return data
        from pagedserve.engine.sampling_params import UNSUPPORTED_OPTIONS, is_vllm_default, vllm_default_words

        kept = dict(data)
        for name in [n for n in data if n in UNSUPPORTED_OPTIONS]:
            if not is_vllm_default(name, data[name]):
                raise FieldValueError(name, f"not supported: {UNSUPPORTED_OPTIONS[name][0]}; "
                                            f"{vllm_default_words(name, as_json=True)}")
            del kept[name]
        for name in [n for n in kept if isinstance(n, str) and n not in cls.model_fields]:
            if name.startswith("guided_"):
                raise FieldValueError(name, "not supported: give structured_outputs ({\"json\": schema}, "
                                            "{\"regex\": ...}, {\"choice\": [...]}, {\"grammar\": ...}), as "
                                            "vLLM's StructuredOutputsParams")
        refuse_misspelt(kept, cls, "a sampling parameter")
        return kept

    def to_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    @property
    def num_samples(self) -> int:
        """The sequences the request runs at once, as ``engine.SamplingParams.num_samples`` counts them:
        ``beam_width`` for beam search, else ``best_of`` (or ``n``)."""
        return self.beam_width or self.best_of or self.n or 1


def _one_prompt_schema(schema: dict) -> None:
    """What ``_one_prompt`` checks, in the published schema: exactly one prompt field, not empty."""
    props = schema["properties"]
    for name, limit in (("prompt", "minLength"), ("prompt_token_ids", "minItems"), ("messages", "minItems")):
        props[name]["anyOf"][0][limit] = 1
    schema["oneOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                       for name in ("prompt", "prompt_token_ids", "messages")]


class GenerateRequest(BaseModel):
    """The body of one ``XADD pagedserve:requests`` entry. ``id`` is the idempotency key."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_prompt_schema)
    # Python's re.search, which Python's JSON Schema validators use, lets $ match before a final newline: the
    # published schema says no newline too, so that it refuses what the worker refuses.
    id: str = Field(pattern=ID_PATTERN, json_schema_extra={"not": {"pattern": "\n"}})
    prompt: str | None = None
    prompt_token_ids: list[whole_int(0, INT64_MAX)] | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    params: SamplingParamsModel = Field(default_factory=SamplingParamsModel)
    stream: bool = True
    priority: whole_int(-(2**31), LOWEST_PRIORITY) = DEFAULT_PRIORITY
    deadline_ms: whole_int(MIN_DEADLINE_MS, MAX_DEADLINE_MS) | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _misspelt(cls, data: Any) -> Any:
        refuse_misspelt(data, cls, "a request field")
        return data

    @field_validator("deadline_ms", mode="before")
    @classmethod
    def _unix_ms(cls, value: Any) -> Any:
        # Seconds (time.time()) or a duration (5000) meant a deadline long past: an empty "deadline" result.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < MIN_DEADLINE_MS:
            raise ValueError(f"must be a unix time in milliseconds, e.g. int(time.time() * 1000) + 30000 for 30 s "
                             f"from now ({value!r} is before 2001-09-09: seconds, or a duration?)")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        given = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of prompt, prompt_token_ids, messages is required")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


# ------------------------------------------------------------------------------------------ events
# Readers ignore fields they do not know: the contract grows by adding fields, never renaming them.
_EVENT = ConfigDict(extra="ignore")

def too_large(req: GenerateRequest, size: int, limit: int) -> str:
    """Why a request of ``size`` bytes as a stream entry is refused, naming its largest part (the prompt or
    messages, metadata, params): a big ``metadata`` was blamed on a prompt of one byte."""
    parts = {"prompt": req.prompt, "prompt_token_ids": req.prompt_token_ids, "messages": req.messages,
             "metadata": req.metadata or None, "params": req.params}
    # As the entry holds them: UTF-8, not \u escapes (which made "é" six bytes: a part larger than the whole).
    sizes = {name: len(json.dumps(value, default=lambda m: m.model_dump(mode="json"), ensure_ascii=False,
                                  separators=(",", ":")).encode())
             for name, value in parts.items() if value is not None}
    largest = max(sizes, key=sizes.__getitem__)
    return (f"the request is {size} bytes as a stream entry, more than max_message_bytes {limit} "
            f"(PAGEDSERVE_MAX_MESSAGE_BYTES, the workers' limit), {sizes[largest]} of them in {largest}: shorten "
            f"it or raise the limit on both sides")


class TokenEvent(BaseModel):
    """One step's delta of one output sequence (``index``); deltas concatenate to the final text.

    ``seq`` numbers the token events of one output: 0, 1, 2, ... with no gap, across workers (a worker that takes
    a request over continues the numbering). It counts events, not tokens: one event carries every token the
    output gained in one engine step (one token, more at a resumed output's end or an early flush), or only
    text held back until the end. ``logprobs``: one object per token of ``token_ids``, when asked for."""

    model_config = _EVENT
    type: Literal["token"] = "token"
    id: str
    index: int
    token_ids: list[int]
    text: str
    seq: int | None = None  # None only from workers older than the events stream
    logprobs: list[dict[str, float]] | None = None


class CompletionResult(BaseModel):
    model_config = _EVENT
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "cancelled", "deadline"] | None
    cumulative_logprob: float | None = None
    logprobs: list[dict[str, float]] | None = None  # JSON object keys are the token ids as strings
    # vLLM's: the stop token id or stop string that ended a "stop" (None for EOS, a grammar's end, any other
    # ending; and from workers before 2026-12-07, which did not write it)
    stop_reason: int | str | None = None


class Usage(BaseModel):
    """Token counts of one request. ``completion_tokens``: the tokens of the outputs returned (with ``best_of``
    above ``n``, or beam search, not those of the samples or beams dropped: vLLM's server counts the same)."""
    model_config = _EVENT
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    # Always their sum (OpenAI's field); computed, so events of workers that did not write it have it too.
    total_tokens: int = 0

    @model_validator(mode="after")
    def _total(self) -> Usage:
        self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class RequestMetrics(BaseModel):
    model_config = _EVENT
    queued_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None


class DoneEvent(BaseModel):
    """Terminal event of a request that ran (also for ``cancelled`` and ``deadline`` endings)."""

    model_config = _EVENT
    type: Literal["done"] = "done"
    id: str
    outputs: list[CompletionResult]
    usage: Usage = Field(default_factory=Usage)
    metrics: RequestMetrics = Field(default_factory=RequestMetrics)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def text(self) -> str:
        """Text of the first output (convenience)."""
        return self.outputs[0].text if self.outputs else ""


class ErrorInfo(BaseModel):
    model_config = _EVENT
    code: Literal["invalid_request", "prompt_too_long", "overloaded", "internal"]
    message: str


class ErrorEvent(BaseModel):
    """Terminal event of a request that could not run."""

    model_config = _EVENT
    type: Literal["error"] = "error"
    id: str
    error: ErrorInfo
    metadata: dict[str, Any] = Field(default_factory=dict)


Event = Annotated[Union[TokenEvent, DoneEvent, ErrorEvent], Field(discriminator="type")]
TerminalEvent = Annotated[Union[DoneEvent, ErrorEvent], Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[TokenEvent | DoneEvent | ErrorEvent] = TypeAdapter(Event)
TERMINAL_ADAPTER: TypeAdapter[DoneEvent | ErrorEvent] = TypeAdapter(TerminalEvent)


def parse_event(raw: str | bytes) -> TokenEvent | DoneEvent | ErrorEvent:
    return EVENT_ADAPTER.validate_json(raw)


def parse_terminal(raw: str | bytes) -> DoneEvent | ErrorEvent:
    return TERMINAL_ADAPTER.validate_json(raw)


_DECIMAL_FIELD = {"type": "string", "pattern": "^[0-9]+$"}


class DeadLetter(BaseModel):
    """One entry of ``pagedserve:dead`` (stream fields, all strings on the wire)."""

    model_config = ConfigDict(extra="forbid")
    reason: str
    body: str  # the original body (raw bytes on the wire; truncated to 64 KiB for oversize messages)
    # The reason's short code, as pagedserve_queue_dead_letters_total{reason} counts it (missing_body, invalid_json,
    # max_deliveries...): what an operator filters on, the reason being free text. Empty from older workers.
    kind: str = ""
    entry_id: str  # the stream entry id in pagedserve:requests
    id: str = ""  # the request id, when one could be read
    consumer: str = ""
    # Numbers, written as stream fields: decimal strings on the wire, which is what the schema describes.
    deliveries: Annotated[int, WithJsonSchema(_DECIMAL_FIELD)] = Field(0, json_schema_extra={"default": "0"})
    time_ms: Annotated[int, WithJsonSchema(_DECIMAL_FIELD)] = Field(0, json_schema_extra={"default": "0"})

    def to_fields(self, raw_body: bytes | None = None) -> dict[str, str | bytes]:
        fields: dict[str, str | bytes] = {k: str(v) for k, v in self.model_dump().items()}
        if raw_body is not None:
            fields["body"] = raw_body  # binary-safe: keep the original bytes, even invalid UTF-8
        return fields

    @classmethod
    def from_fields(cls, fields: dict) -> DeadLetter:
        data = {as_text(k): as_text(v) for k, v in fields.items()}
        return cls(
            reason=data.get("reason", ""),
            body=data.get("body", ""),
            kind=data.get("kind", ""),
            entry_id=data.get("entry_id", ""),
            id=data.get("id", ""),
            consumer=data.get("consumer", ""),
            deliveries=int(data.get("deliveries", "0") or 0),
            time_ms=int(data.get("time_ms", "0") or 0),
        )


# ------------------------------------------------------------------------------------------ parsing
class DeadLetterError(Exception):
    """The entry is unusable and carries no valid id: it goes to the dead-letter stream with this reason.

    ``kind`` is a short stable code (metric label): missing_body, too_large, invalid_utf8, invalid_json,
    not_object, invalid_id.
    """

    def __init__(self, message: str, kind: str = "unparseable", body: bytes | None = None):
        super().__init__(message)
        self.kind = kind
        self.body = body  # what the dead letter keeps when the entry's body field is not it (missing_body)


class InvalidRequestError(Exception):
    """The entry has a valid id but is refused (bad content, too long, overloaded): the client gets an ``error``
    event with ``code``."""

    def __init__(self, request_id: str, code: str, message: str, metadata: dict | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.code = code
        self.message = message
        self.metadata = metadata or {}


def wire_body(req: GenerateRequest) -> str:
    """The body a producer sends: only the fields the request gives (an absent field and a null mean the same to a
    worker). Spelling out every field as null had every request refused by a worker older than the newest field
    (``Extra inputs are not permitted``), however little it asked for: producers could not be upgraded first."""
    return req.model_dump_json(exclude_none=True)


def params_field(message: str) -> str:
    """An engine message that starts with a sampling field's name, as the wire names it (``params.top_k ...``)."""
    from pagedserve.engine.sampling_params import SamplingParams

    name = message.split(" ", 1)[0].rstrip(":")
    return f"params.{message}" if name in {f.name for f in fields(SamplingParams)} else message


def engine_params(params: SamplingParamsModel, *, chat: bool = False) -> Any:
    """The engine's ``SamplingParams`` of these wire values, through its own range checks (plain Python: a
    producer runs them without torch, so a value no worker would take fails where it is built). Raises
    ``ValueError`` naming the field as the wire names it. The operator's limits (settings) are the worker's.

    Without ``max_tokens`` a chat request (``messages``) runs to the end of the context, as OpenAI's and vLLM's
    chat completions do (``max_tokens`` None here: the worker knows the prompt's length); a prompt keeps the
    ``SamplingParams`` default of 16, as their completions do."""
    from pagedserve.engine.sampling_params import SamplingParams

    kwargs = params.to_kwargs()
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = engine_logit_bias(kwargs["logit_bias"])
    if chat:
        kwargs.setdefault("max_tokens", None)
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(params_field(str(e))) from None


def body_digest(req: GenerateRequest) -> str:
    """What makes two requests of one id generate alike (prompt and params; not priority, deadline, metadata or
    streaming), as 16 hex digits. A worker writes it beside each token event: a worker taking the id over
    continues only the tokens of the body it runs (two bodies sent under one id: a retry that changed them)."""
    body = req.model_dump(mode="json", include={"prompt", "prompt_token_ids", "messages", "params"},
                          exclude_none=True)
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class FieldValueError(ValueError):
    """A model validator's refusal of one field of the object it checks: named in the error's place, as pydantic
    names a field validator's (``params.detokenize: ...``, not ``params: detokenize ...``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        if isinstance(field_error := e.get("ctx", {}).get("error"), FieldValueError):
            loc = f"{loc}.{field_error.field}" if loc else field_error.field
        # A validator's own message names the field already; pydantic prefixes it with "Value error, ".
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        if e["type"] == "model_type":  # pydantic's words name a class of ours ("... or instance of ChatMessage")
            msg = f"must be a JSON object (got {_json_type(e.get('input'))})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _json_type(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}"
    if isinstance(value, (list, tuple)):
        return "an array"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else "a number"
    return f"a {type(value).__name__}"


def refusal_message(err: ValueError) -> str:
    """What a producer says of a request it refuses to send: pydantic's errors as ``field: message``, else the
    message (which names the field)."""
    return format_validation_error(err) if isinstance(err, ValidationError) else str(err)


_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')


def leading_id(raw: bytes) -> str | None:
    """The id of a body too large (or too broken) to parse, when it is the body's first key and its only top-level
    ``id`` key: what clients write (``model_dump_json`` puts ``id`` first; a byte order mark before it is skipped,
    as the parse does). A byte search where ``"id"`` occurs once and nothing is escaped; else the top-level keys
    are read without parsing the values (:func:`_scanned_keys`), since an escape could spell another ``id`` key and
    ``"id"`` may occur nested or inside a string. Bytes that are not UTF-8 are read as U+FFFD there: they can stand
    only inside strings (every JSON mark is ASCII), which is where the body is broken."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    m = _LEADING_ID.match(raw[:256])
    if m is None:
        return None
    if raw.count(b'"id"') != 1 or b"\\u" in raw:
        keys = _scanned_keys(raw.decode("utf-8", errors="replace"))
        if keys is None or keys.count("id") != 1:
            return None
    return m.group(1).decode("ascii")


_JSON_MARK = re.compile(r'["{}\[\],]')
# The rest of a JSON string after its opening quote, read as escapes and other characters up to its closing quote.
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)


# The most strings the key scan reads (a few microseconds each): a request has far fewer (4096 messages are
# 16384), and a body of millions of tiny strings would hold a worker's loop for seconds. Past it, no id is taken
# (a dead letter).
MAX_SCANNED_STRINGS = 50_000


def _scanned_keys(text: str) -> list[str] | None:
    """The top-level keys of the JSON object ``text`` starts with, in order with duplicates, read without building
    its values: strings are skipped by a regular expression (escapes and all), keys alone decoded, containers
    counted. Linear in ``text``, for bodies too large or too broken to parse: nothing here costs more for coming
    later in the text (the json module's errors count the lines before them, which made a body of many broken
    strings quadratic). A broken body is read as far as it goes: a key that does not decode (a bad escape, a raw
    control character) is no key any parser reads; a string that never closes ends the body (cut off). None past
    :data:`MAX_SCANNED_STRINGS` strings."""
    keys: list[str] = []
    depth, expect_key, pos, strings = 0, False, 0, 0
    while (m := _JSON_MARK.search(text, pos)) is not None:
        mark, at = m.group(), m.start()
        if mark == '"':
            strings += 1
            if strings > MAX_SCANNED_STRINGS:
                return None
            rest = _STRING_REST.match(text, at + 1)
            if rest is None:
                break
            pos = rest.end()
            if depth == 1 and expect_key:
                try:
                    keys.append(json.loads(text[at:pos]))
                except ValueError:
                    pass
            expect_key = False
            continue
        if mark in "{[":
            depth += 1
            expect_key = mark == "{" and depth == 1
        elif mark in "}]":
            depth -= 1
            if depth <= 0:
                break
        else:  # a comma: the next top-level string is a key again
            expect_key = depth == 1
        pos = at + 1
    return keys


def entry_time(entry_id: str | bytes) -> float:
    """Unix time (s) at which Redis accepted a stream entry (its id's millisecond part)."""
    try:
        return int(as_text(entry_id).split("-", 1)[0]) / 1000.0
    except ValueError:
        return time.time()


def check_other_fields(fields: dict, raw_body: bytes | None) -> None:
    """Refuse an entry whose fields besides ``body`` hold more than :data:`MAX_OTHER_FIELDS_BYTES`: answered when
    the body's leading id can be read without parsing it (as for a body too large), else a dead letter."""
    every = getattr(fields, "repeated", {})  # a name given more than once counts each time (stream_fields.py)
    size = sum(len(k) + len(v) for k, last in fields.items() if k not in (b"body", "body") and isinstance(k, (bytes, str))
               for v in every.get(k, [last]) if isinstance(v, (bytes, str)))
    if size <= MAX_OTHER_FIELDS_BYTES:
        return
    message = (f"the entry's fields besides body hold {size} bytes, more than {MAX_OTHER_FIELDS_BYTES} "
               "(traceparent and tracestate are all the worker reads)")
    request_id = leading_id(raw_body) if raw_body is not None else None
    if request_id is not None:
        raise InvalidRequestError(request_id, "invalid_request", message)
    raise DeadLetterError(message, "too_large")


def refuse_missing_body(fields: dict) -> InvalidRequestError:
    """An entry without a ``body`` field (a producer that wrote ``data``, as the events stream names it): the id of
    a request found in one of its other fields is answered, since its producer waits on it; else
    :class:`DeadLetterError` naming the fields found and keeping the first one's value for the operator."""
    others: dict[str, bytes] = {}
    for key, value in fields.items():
        name = as_text(key)
        if name not in ("traceparent", "tracestate") and isinstance(value, (bytes, str)):
            others[name] = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    for name, value in others.items():
        request_id = _answerable_id(value, MAX_OTHER_FIELDS_BYTES)
        if request_id is not None:
            return InvalidRequestError(request_id, "invalid_request", "the entry has no body field: the request "
                                       f"JSON goes in 'body', not {name[:40]!r}")
    names = ", ".join(repr(n[:40]) for n in list(others)[:8])
    raise DeadLetterError(f"missing 'body' field (the entry's fields: {names or 'none but trace context'})",
                          "missing_body", next(iter(others.values()), None))


def refuse_repeated_bodies(bodies: list[bytes], max_bytes: int) -> list[InvalidRequestError]:
    """An entry that gives ``body`` more than once (one ``XADD`` with two requests): each id its bodies carry is
    refused, since its producer waits on it; an entry none of whose bodies has an id is a dead letter, and so is
    one with more than :data:`MAX_REPEATED_BODIES` bodies or more than ``max_bytes`` in all, before any is
    parsed: a small entry of many bodies would cost a parse each, on every delivery."""
    message = f"the entry gives the body field {len(bodies)} times: send one request per entry"
    size = sum(len(b) for b in bodies)
    if len(bodies) > MAX_REPEATED_BODIES or size > max_bytes:
        raise DeadLetterError(f"{message} (more than {MAX_REPEATED_BODIES}, or {size} bytes > max_message_bytes "
                              f"{max_bytes}: none was read)", "repeated_body")
    ids = dict.fromkeys(i for i in (_answerable_id(body, max_bytes) for body in bodies) if i is not None)
    if not ids:
        raise DeadLetterError(message, "repeated_body")
    return [InvalidRequestError(request_id, "invalid_request", message) for request_id in ids]


def _answerable_id(body: bytes, max_bytes: int) -> str | None:
    """The id a body would be answered under (a valid request, or one refused with its id), else None."""
    try:
        return parse_request(body, max_bytes).id
    except InvalidRequestError as e:
        return e.request_id
    except DeadLetterError:
        return None


def oversized_metadata(metadata: dict) -> str | None:
    """What is wrong with ``metadata``'s size (it is echoed in every terminal event), or None."""
    size = json_size(metadata)
    return f"metadata: {size} bytes as JSON, more than {MAX_METADATA_BYTES} allowed" if size > MAX_METADATA_BYTES else None


def parse_request(body: bytes | str | None, max_bytes: int) -> GenerateRequest:
    """Parse one stream entry body. Raises :class:`DeadLetterError` or :class:`InvalidRequestError`.

    Order matters: size and encoding are checked before any JSON parsing so a hostile entry costs O(limit); the
    id is read before the content is judged, so that every refusal of a body with a valid id is answered.
    """
    if body is None:
        raise DeadLetterError("missing 'body' field", "missing_body")
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if len(raw) > max_bytes:
        message = f"message too large: {len(raw)} bytes > max_message_bytes {max_bytes}"
        request_id = leading_id(raw)
        if request_id is not None:  # its producer waits on this id: answer it, without parsing the rest
            raise InvalidRequestError(request_id, "invalid_request", f"body: {message}")
        raise DeadLetterError(message, "too_large")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (.NET writes one): JSON may skip it
    except UnicodeDecodeError as e:
        message = f"body is not valid UTF-8: {e.reason} at byte {e.start}"
        request_id = leading_id(raw)
        if request_id is not None:  # its producer waits on this id (a prompt cut mid-character, say): answer it
            raise InvalidRequestError(request_id, "invalid_request", message) from None
        raise DeadLetterError(message, "invalid_utf8") from None
    try:
        data = loads(text)
    except RecursionError:
        request_id, field = scan_too_deep(text)
        if not valid_id(request_id):
            raise DeadLetterError(f"body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels",
                                  "invalid_json") from None
        raise InvalidRequestError(request_id, "invalid_request",
                                  f"{field}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        message = f"body is not valid JSON: {str(e)[:200]}"
        request_id = leading_id(text.encode())
        if request_id is not None:  # its producer waits on this id (a body with trailing bytes, a cut-off one)
            raise InvalidRequestError(request_id, "invalid_request", message) from None
        raise DeadLetterError(message, "invalid_json") from None
    if not isinstance(data, dict):
        raise DeadLetterError(f"body must be a JSON object, got {type(data).__name__}", "not_object")
    request_id = data.get("id")
    if not valid_id(request_id):
        raise DeadLetterError("missing or invalid 'id' (1-128 chars of [A-Za-z0-9_.:-])", "invalid_id")
    if (text.count('"id"') > 1 or "\\u" in text) and _top_level_keys(text).count("id") > 1:  # "\u0069d" too
        # JSON parsers disagree on which one counts (Python's the last, others the first): no answer can be sure
        # to reach the producer's id, so no id is taken.
        raise DeadLetterError("duplicate 'id' key: which one is the request's id is ambiguous", "invalid_id")
    problem = first_problem(data, check_unicode=has_surrogate_escape(text))
    if problem is not None:
        raise InvalidRequestError(request_id, "invalid_request", problem, metadata_or_empty(data))
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        if (too_big := oversized_metadata(metadata)) is not None:
            raise InvalidRequestError(request_id, "invalid_request", too_big)
    else:
        metadata = {}
    try:
        return GenerateRequest.model_validate(data, strict=True)
    except ValidationError as e:
        raise InvalidRequestError(request_id, "invalid_request", format_validation_error(e), metadata) from None


def _top_level_keys(text: str) -> list[str]:
    """The keys of the JSON object ``text`` (which :func:`loads` parsed), in order with duplicates: a second pass,
    only made when ``"id"`` occurs twice in the text or a key may be escaped (``\\u``)."""
    outermost: list[str] = []

    def keys(pairs: list) -> None:
        outermost[:] = [k for k, _ in pairs]  # objects are decoded innermost first: the last one is the body

    json.JSONDecoder(object_pairs_hook=keys, parse_int=str, parse_constant=str).decode(text)
    return outermost


# ------------------------------------------------------------------------------------------ schemas
SCHEMA_MODELS: dict[str, Any] = {
    "request": GenerateRequest,
    "token-event": TokenEvent,
    "done-event": DoneEvent,
    "error-event": ErrorEvent,
    "event": EVENT_ADAPTER,
    "dead-letter": DeadLetter,
}


def json_schemas() -> dict[str, dict]:
    """JSON Schema (draft 2020-12, as pydantic emits it) of every message, keyed by file stem."""
    out = {}
    for name, model in SCHEMA_MODELS.items():
        schema = model.json_schema() if hasattr(model, "json_schema") else model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{name}.schema.json", **schema}
        out[name] = _without_discriminators(schema)
    return out


def _without_discriminators(schema: Any) -> Any:
    """``schema`` less pydantic's OpenAPI ``discriminator`` beside a ``oneOf``: no JSON Schema keyword, a strict
    validator (ajv's default) refused to compile the schema for it; the ``oneOf`` says the same."""
    if isinstance(schema, list):
        return [_without_discriminators(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: _without_discriminators(v) for k, v in schema.items() if not (k == "discriminator" and "oneOf" in schema)}


def write_schemas(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in json_schemas().items():
        p = directory / f"{name}.schema.json"
        p.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        paths.append(p)
    return paths

