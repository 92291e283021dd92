"""OpenAI's batch file format: input lines -> our requests, terminal events -> output lines.

Input line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``; the
body's fields map onto :class:`~pagedserve.service.protocol.GenerateRequest` (``messages`` / ``prompt``,
``max_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``, ``stop``, ``logprobs`` / ``top_logprobs``,
penalties, vLLM's extra sampling keys such as ``top_k``, ``response_format`` or vLLM's ``structured_outputs`` ->
structured outputs). A field we cannot honour is refused by name, never
dropped silently (a message's ``name`` or ``tool_calls`` too); ``model`` is echoed in the response, ``user``,
``store`` and ``metadata`` are accepted and change nothing, and a field set to null is not given.

Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` with a
``chat.completion`` or ``text_completion`` body (with ``usage``), an error body for a request the service
refused, or ``response: null`` and an ``error`` for a line that never ran (invalid, cancelled, expired).

Invariants: parsing is pure (no Redis, no engine); every refusal names the line's field (``body.max_tokens``);
an output line is built from the stored terminal event and the request's own metadata alone, so any worker (or
the client) can build it, and two builders of one line build the same content (``created`` aside).
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from pydantic import ValidationError

from .batch_keys import BATCH_PRIORITY, request_id
from .protocol import (DoneEvent, ErrorEvent, GenerateRequest, asks_nothing, engine_logit_bias, joined_text_parts,
                       likely_meant, too_large, whole_number)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID_CHARS = 512
# Body fields mapped one to one onto our sampling parameters.
_SAME_NAME = ("max_tokens", "temperature", "top_p", "n", "seed", "stop", "presence_penalty", "frequency_penalty",
              "logit_bias",
              # vLLM's sampling parameters beyond OpenAI's, which its OpenAI server and batch runner take in the body
              "top_k", "min_p", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
              "include_stop_str_in_output", "allowed_token_ids", "skip_special_tokens", "bad_words")
# Keys whose values, or whose lists' items, are integers: a whole float (3.0) is the integer, as on the wire.
_INTEGER_KEYS = {"max_tokens", "max_completion_tokens", "n", "seed", "top_k", "min_tokens", "best_of", "logprobs",
                 "top_logprobs"}
_INTEGER_LIST_KEYS = {"stop_token_ids", "allowed_token_ids", "prompt"}
_ACCEPTED = {"model", "user", "store", "metadata", "messages", "prompt", "max_completion_tokens", "logprobs",
             "top_logprobs", "response_format", "structured_outputs", "stream", "best_of", "echo", "cache_salt",
             *_SAME_NAME}
# vLLM's request fields (beyond its sampling options) at what pagedserve does, by url: a line dumped from vLLM's
# request model spells them out. Other values are refused.
_VLLM_REQUEST_DEFAULTS = {
    "/v1/chat/completions": {"add_generation_prompt": (True,), "continue_final_message": (False,), "echo": (False,),
                             "add_special_tokens": (False,), "priority": (0,), "length_penalty": (1.0,),
                             # logprob tokens as token_id:<id> (true) or as text (false), as vLLM writes them
                             "return_tokens_as_token_ids": (False, True),
                             # a line has no tools (they are refused), so no tool is called either way
                             "tool_choice": ("none", "auto"), "parallel_tool_calls": (False, True),
                             # no reasoning parser: the whole output is the message's content, as in vLLM without one
                             "include_reasoning": (True,)},
    "/v1/completions": {"add_special_tokens": (True,), "priority": (0,), "length_penalty": (1.0,),
                        "return_tokens_as_token_ids": (False, True)},
}
# vLLM's structured-output fields before structured_outputs (its servers no longer take them either).
_INSTEAD = {f"guided_{kind}": f"vLLM's older name: give structured_outputs {{\"{kind}\": ...}}"
                              + (" (or a JSON Schema as response_format)" if kind == "json" else "")
            for kind in ("json", "regex", "choice", "grammar")}
# Where SamplingParams' advice for an option it lacks names what a line cannot give either.
_LINE_INSTEAD = {"use_beam_search": "a batch line runs no beam search (a request from Client or Celery takes "
                                    "params.beam_width)"}
# The keys of an OpenAI batch input line.
_LINE_KEYS = {"custom_id", "method", "url", "body"}
# What a request's message carries (protocol.ChatMessage): a name, tool calls or audio would change what the model
# is asked, so they are refused, as the wire refuses them.
_MESSAGE_KEYS = {"role", "content"}
# OpenAI's limits on a request's metadata (the same as on a batch's).
_METADATA_RULE = "must be an object of at most 16 string values, keys up to 64 and values up to 512 characters"
_STATUS_OF_CODE = {"invalid_request": 400, "prompt_too_long": 400, "overloaded": 503, "internal": 500}
# A worker's refusal starts with the request field it is about (``params.temperature ...``, ``prompt has ...``);
# the error body's ``param`` names it as the line's body does.
_LEADING_FIELD = re.compile(r"(?:params\.)?([a-z_]+)\b")
_BODY_NAME = {"structured_outputs": "response_format", "messages": "messages", "prompt": "prompt",
              "prompt_token_ids": "prompt", "best_of": "best_of", **{name: name for name in _SAME_NAME}}


# The worker's and the engine's words for the structured outputs field, and the batch line's: a JSON Schema's
# refusal is about body.response_format.json_schema.schema. Longest first.
_STRUCTURED_NAMES = (("params.structured_outputs.json:", "body.response_format.json_schema.schema:"),
                     ("params.structured_outputs json_object ", "body.response_format "),
                     ("params.structured_outputs json ", "body.response_format.json_schema.schema "),
                     ("params.structured_outputs", "body.response_format"))
_RESPONSE_FORMAT_KEYS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _in_body_words(message: str, renamed: dict[str, str] | None = None) -> str:
    """``message`` as the batch line's body names its field: ``params.structured_outputs`` is about
    ``body.response_format`` (or ``body.structured_outputs`` where the line wrote that), and ``params.max_tokens``
    about ``body.max_completion_tokens`` where the line wrote that (``renamed``: wire name -> the key the line
    wrote)."""
    if (renamed or {}).get("structured_outputs") == "structured_outputs" and message.startswith(
            "params.structured_outputs"):
        return "body." + message.removeprefix("params.")
    for wire, body in _STRUCTURED_NAMES:
        if message.startswith(wire):
            return body + message[len(wire):]
    m = _LEADING_FIELD.match(message)
    if renamed is not None and m and message.startswith("params.") and m.group(1) in _BODY_NAME:
        return f"body.{renamed.get(m.group(1), _BODY_NAME[m.group(1)])}{message[m.end():]}"
    if message.startswith("prompt_token_ids"):  # a completions line's prompt of token ids, as the wire names it
        return f"body.prompt{message[len('prompt_token_ids'):]}"
    return message


def _renamed(md: dict) -> dict[str, str]:
    """The wire names the line wrote under another key, as :func:`to_request` left them in its metadata: a dict, or
    the ``"max_tokens=max_completion_tokens,..."`` text a submitter of 2026-12-02 wrote (its lines may be collected
    by a newer worker during a rolling update)."""
    renamed = md.get("renamed")
    if isinstance(renamed, str):
        return dict(pair.split("=", 1) for pair in renamed.split(",") if pair.count("=") == 1)
    return renamed if isinstance(renamed, dict) else {}


class LineError(ValueError):
    """A line that cannot run; the message names the field."""


class FileError(LineError):
    """A problem of the whole file: it is refused."""


class DuplicateCustomId(FileError):
    """Two lines share a custom_id: the whole file is refused (which line would its one output line answer?)."""


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One line of a batch file as submit stages it: a valid line's stream entry body, not its request object (a
    whole file of those took twenty times the file's size in memory)."""

    line_no: int  # 0-based, in the file
    custom_id: str | None
    url: str | None
    samples: int | None  # the sequences the line runs (n, best_of or beam_width); None: the line is invalid
    error: str | None = None
    body: str | None = None  # the request as its stream entry's body (what the size limit is checked on)


def _message_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts can be run
        joined = joined_text_parts(content)
        if isinstance(joined, tuple):
            index, key, why = joined
            raise LineError(f"{where}[{index}]{'' if key is None else '.' + key}: {why}")
        return joined
    raise LineError(f"{where}: must be a string or a list of text parts")


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LineError("body.messages: must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LineError(f"body.messages[{i}]: must be an object with a role")
        # Before the content: an assistant's tool_calls message has none, and the tool_calls are the reason.
        unknown = sorted(str(k) for k, v in m.items() if k not in _MESSAGE_KEYS and not asks_nothing(v))
        if unknown:
            meant = "" if "content" in m else likely_meant(unknown[0], ["content"])
            raise LineError(f"body.messages[{i}].{unknown[0]}: not supported ("
                            + (f"did you mean {meant}? " if meant else "") + "a message carries only role and content)")
        out.append({"role": m["role"], "content": _message_content(m.get("content"), f"body.messages[{i}].content")})
    return out


def _structured(fmt: Any) -> dict | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise LineError("body.response_format.type: must be text, json_object or json_schema")
    # Refused by name, never dropped: it may have been meant to constrain the output (a null is no request).
    unknown = sorted(str(k) for k, v in fmt.items() if k not in _RESPONSE_FORMAT_KEYS[fmt["type"]] and v is not None)
    if unknown:
        raise LineError(f"body.response_format.{unknown[0]}: not supported with type {fmt['type']}")
    if fmt["type"] == "json_object":
        return {"json_object": True}
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict):
            unknown = sorted(str(k) for k, v in spec.items() if k not in _JSON_SCHEMA_KEYS and v is not None)
            if unknown:
                raise LineError(f"body.response_format.json_schema.{unknown[0]}: not supported (known: "
                                f"{', '.join(sorted(_JSON_SCHEMA_KEYS))})")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise LineError("body.response_format.json_schema.schema: a JSON Schema object is required")
        # As OpenAI checks them: a file it would refuse is refused here too, not run with a surprise later.
        if not (isinstance(spec.get("name"), str) and _SCHEMA_NAME.fullmatch(spec["name"])):
            raise LineError("body.response_format.json_schema.name: required, 1 to 64 letters, digits, _ or -")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise LineError("body.response_format.json_schema.strict: must be true or false")
        if spec.get("description") is not None and not isinstance(spec["description"], str):
            raise LineError("body.response_format.json_schema.description: must be a string")
        return {"json": spec["schema"]}
    return None


def _params(body: dict, chat: bool, written: dict[str, str]) -> dict:
    """The sampling parameters of ``body``; ``written`` gets the body key of each one named otherwise there."""
    params = {k: body[k] for k in _SAME_NAME if body.get(k) is not None}
    for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        if isinstance(params.get(k), int) and not isinstance(params[k], bool) and abs(params[k]) < 2**53:
            params[k] = float(params[k])  # JSON 1 is a valid temperature (a larger one is refused by its range)
    if body.get("max_completion_tokens") is not None:
        params["max_tokens"] = body["max_completion_tokens"]
        written["max_tokens"] = "max_completion_tokens"
    if chat:
        if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
            raise LineError("body.logprobs: must be true or false (top_logprobs says how many alternatives)")
        if body.get("logprobs"):
            params["logprobs"] = body.get("top_logprobs") or 0
            written["logprobs"] = "top_logprobs"
        elif body.get("top_logprobs") is not None and not (type(body["top_logprobs"]) is int
                                                            and body["top_logprobs"] == 0):  # vLLM's default: none
            raise LineError("body.top_logprobs: needs logprobs: true")
    elif body.get("logprobs") is not None:
        params["logprobs"] = body["logprobs"]
    if not chat and body.get("best_of") is not None:
        params["best_of"] = body["best_of"]
    if body.get("response_format") is not None:
        structured = _structured(body["response_format"])
        if structured is not None:
            params["structured_outputs"] = structured
    if body.get("structured_outputs") is not None:  # vLLM's: any kind (json, regex, choice, grammar, ...)
        if "structured_outputs" in params:
            raise LineError("body.structured_outputs: give it or response_format (json_object, json_schema), not "
                            "both")
        if not isinstance(body["structured_outputs"], dict):
            raise LineError('body.structured_outputs: must be an object, e.g. {"regex": "[0-9]+"}')
        params["structured_outputs"] = body["structured_outputs"]
        written["structured_outputs"] = "structured_outputs"
    return params


def _check_ranges(params: dict, written: dict[str, str]) -> None:
    """The engine's own range checks, so a bad value fails at submit. Their messages start with the engine's
    field name; the line's message names the body key that set it (``written``: top_logprobs for logprobs)."""
    from pagedserve.engine.sampling_params import SamplingParams

    if isinstance(params.get("logit_bias"), dict):  # JSON writes its token ids as strings (OpenAI's format)
        params = {**params, "logit_bias": engine_logit_bias(params["logit_bias"])}
    try:
        SamplingParams(**params)
    except (TypeError, ValueError) as e:
        message = str(e)
        if message.startswith("structured_outputs"):
            raise LineError(_in_body_words(f"params.{message}", written)) from None
        name, _, why = message.partition(" ")
        if name not in {f.name for f in fields(SamplingParams)}:
            raise LineError(f"body: {message}") from None
        if name == "seed" and isinstance(params["seed"], int) and params["seed"] < 0:
            # vLLM takes any integer; this engine's seeded draws take none below 0.
            why += ": negative seeds are not supported, give one in that range"
        raise LineError(f"body.{written.get(name, name)}: {why}") from None


def _metadata(value: Any) -> None:
    if not isinstance(value, dict) or len(value) > 16 or any(
            len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in value.items()):
        raise LineError(f"body.metadata: {_METADATA_RULE}")


def _where(loc: tuple) -> str:
    """A pydantic error location as the line names it: ``messages[0].role``."""
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")


def _whole_numbers(key: str, value: Any) -> Any:
    """``value`` of body ``key`` with whole floats as integers where the key takes integers (JSON has one number
    type, and the wire takes 3.0 as 3); a whole float of 2**53 or more is refused, as the wire refuses it."""
    try:
        if key in _INTEGER_KEYS:
            return whole_number(value)
        if key in _INTEGER_LIST_KEYS and isinstance(value, list):
            return [whole_number(v) for v in value]
    except ValueError as e:
        raise LineError(f"body.{key}: {e}") from None
    return value


def to_request(bid: str, index: int, line_no: int, custom_id: str, url: str, body: dict,
               expires_ms: int) -> GenerateRequest:
    """The request of one valid line; raises :class:`LineError` naming the field."""
    chat = url == "/v1/chat/completions"
    # A null asks for nothing: the key is not given (as the openai SDK means it), whether we support it or not.
    body = {k: _whole_numbers(k, v) for k, v in body.items() if v is not None}
    tokens_as_ids = body.get("return_tokens_as_token_ids") is True
    # Each url's own fields: echo and best_of are completions', top_logprobs chat's (a completions line says how
    # many alternatives in logprobs itself; its top_logprobs was ignored without a word).
    accepted = _ACCEPTED - {"echo", "best_of"} if chat else _ACCEPTED - {"top_logprobs"}
    unknown = sorted(set(body) - accepted)
    if unknown:
        from pagedserve.engine.sampling_params import UNSUPPORTED_OPTIONS, is_vllm_default, same_as_one_of

        # vLLM's own options that pagedserve lacks: their vLLM defaults are what pagedserve does (a line written
        # for vLLM's batch runner spells out detokenize: true), anything else is refused saying so.
        for name in [n for n in unknown if n in UNSUPPORTED_OPTIONS]:
            if not is_vllm_default(name, body[name]):
                raise LineError(f"body.{name}: not supported: "
                                f"{_LINE_INSTEAD.get(name, UNSUPPORTED_OPTIONS[name][0])}")
            del body[name]
            unknown.remove(name)
        taken = _VLLM_REQUEST_DEFAULTS[url]
        if isinstance(body.get("request_id"), str):  # vLLM's id for its logs: the line's custom_id names it here
            del body["request_id"]
            unknown.remove("request_id")
        for name in [n for n in unknown if n in taken]:
            if not same_as_one_of(body[name], taken[name]):
                said = " or ".join(json.dumps(v) for v in taken[name])
                got = json.dumps(body[name])
                raise LineError(f"body.{name}: only vLLM's default, {said}, is taken (got "
                                f"{got if len(got) <= 80 else got[:60] + '...'})")
            del body[name]
            unknown.remove(name)
    if unknown:
        name = unknown[0]
        meant = likely_meant(name, sorted(accepted | _VLLM_REQUEST_DEFAULTS[url].keys()))
        raise LineError(f"body.{name}: not supported" + (f": {_INSTEAD[name]}" if name in _INSTEAD else
                                                         f" (did you mean {meant}?)" if meant else ""))
    if body.get("stream"):
        raise LineError("body.stream: a batch line cannot stream")
    if body.get("echo"):
        raise LineError("body.echo: not supported")
    if "model" in body and not isinstance(body["model"], str):
        raise LineError("body.model: must be a string")
    # store and metadata are for OpenAI's stored completions: nothing is stored here, so they change nothing.
    if "store" in body and not isinstance(body["store"], bool):
        raise LineError("body.store: must be true or false")
    if "metadata" in body:
        _metadata(body["metadata"])
    req: dict[str, Any] = {}
    if "cache_salt" in body:  # vLLM's: the line's prompt shares cached blocks only with lines of the same salt
        req["cache_salt"] = body["cache_salt"]
    if chat:
        if "prompt" in body:
            raise LineError("body.prompt: use messages with /v1/chat/completions")
        req["messages"] = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if "messages" in body:
            raise LineError("body.messages: use prompt with /v1/completions")
        if isinstance(prompt, str) and prompt:
            req["prompt"] = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            req["prompt_token_ids"] = prompt
        else:
            raise LineError("body.prompt: must be a non-empty string or list of token ids (one prompt per line)")
    written: dict[str, str] = {}
    params = _params(body, chat, written)
    _check_ranges(params, written)
    metadata = {"batch_id": bid, "custom_id": custom_id, "url": url, "line": line_no,
                "model": body.get("model") or "pagedserve", "top_logprobs": params.get("logprobs") or 0}
    if written:  # so that a worker's refusal can name the key the line wrote (output_line)
        metadata["renamed"] = written
    if tokens_as_ids:
        metadata["tokens_as_ids"] = True
    try:
        return GenerateRequest.model_validate(
            {"id": request_id(bid, index), **req, "params": params, "stream": False, "priority": BATCH_PRIORITY,
             "deadline_ms": expires_ms, "metadata": metadata})
    except ValidationError as e:
        first = e.errors()[0]
        message = f"{_where(first['loc'])}: {first['msg'].removeprefix('Value error, ')}"
        if message.startswith(("params.", "prompt_token_ids")):  # the key the line wrote, not the wire's
            message = _in_body_words(message, written)
            raise LineError(f"body.{message.removeprefix('params.')}" if message.startswith("params.")
                            else message) from None
        raise LineError(f"body.{message}") from None


def _utf8(data: bytes) -> bytes:
    """The file without its UTF-8 byte order mark; :class:`FileError` if it is not UTF-8 (checked whole, before
    it is split into lines: a UTF-16 file split on its newline bytes makes lines of half characters)."""
    why = None
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            why = f"it is {name}"
            break
    else:
        data = data.removeprefix(codecs.BOM_UTF8)
        if b"\0" in data:  # never in JSON text; UTF-16 without a byte order mark is full of them
            why = "it has NUL bytes: UTF-16?"
        else:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"byte {data[e.start]:#04x} on line {len((data[:e.start] + b'x').splitlines())}"
    if why:
        raise FileError(f"not UTF-8 text ({why}): a batch file must be UTF-8 JSONL, one request per line")
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_unicode(obj: Any) -> str | None:
    """Where a parsed line holds a string that is not valid Unicode, and why: a lone surrogate, which a JSON
    escape can write ("\\ud83d") but UTF-8, the stream entry's encoding, cannot. Document order; no recursion
    (a line may nest deeply)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as e:
                return f"{where}: not valid Unicode (a lone surrogate \\u{ord(value[e.start]):04x})"
        elif isinstance(value, list):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))
        elif isinstance(value, dict):
            items = []
            for key, v in value.items():
                name = key.encode("utf-8", "backslashreplace").decode()
                path = f"{where}.{name}" if where else name
                items += [(path, key), (path, v)]
            stack.extend(reversed(items))
    return None


def _stream_body(req: GenerateRequest, max_message_bytes: int | None) -> str:
    """The request as a worker reads it from the stream; :class:`LineError` when a worker would dead-letter it for
    its size before reading its id (no answer would ever come)."""
    try:
        body = req.model_dump_json(exclude_none=True)
    except ValueError as e:
        raise LineError(f"body: {e}") from None
    size = len(body.encode())
    if max_message_bytes is not None and size > max_message_bytes:
        raise LineError(too_large(req, size, max_message_bytes))
    return body


def parse_lines(bid: str, data: bytes, expires_ms: int, max_message_bytes: int | None = None) -> list[ParsedLine]:
    """Every non-blank line of a batch file, valid or not (in file order). Raises :class:`FileError` for a
    problem of the whole file (not UTF-8, no line a JSON object, :class:`DuplicateCustomId`). A valid line's request must fit in
    ``max_message_bytes`` as a stream entry (None: no limit)."""
    out: list[ParsedLine] = []
    seen: dict[str, int] = {}
    index = 0
    objects = 0  # lines that are JSON objects: none at all is another format (a JSON array, CSV, plain text)
    for line_no, raw in enumerate(_utf8(data).splitlines()):
        if not raw.strip():
            continue
        cid = url = None
        try:
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise LineError(f"not a JSON object: {e}") from None
            if not isinstance(obj, dict):
                raise LineError("not a JSON object")
            objects += 1
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS:
                misspelt = "" if "custom_id" in obj else next(
                    (f" (the line has {k!r}: did you mean custom_id?)" for k in obj
                     if likely_meant(str(k), ["custom_id"])), "")
                cid = cid if isinstance(cid, str) else None
                raise LineError(f"custom_id: a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters is "
                                f"required{misspelt}")
            if cid in seen:
                raise DuplicateCustomId(f"line {line_no + 1}: custom_id {cid!r} duplicates line {seen[cid] + 1}")
            seen[cid] = line_no
            # A key OpenAI's line format does not have would be dropped unsaid, as an unknown body field would be.
            unknown = sorted(str(k) for k, v in obj.items() if k not in _LINE_KEYS and v is not None)
            if unknown:
                meant = likely_meant(unknown[0], sorted(_LINE_KEYS))
                raise LineError(f"{unknown[0]}: not supported (" + (f"did you mean {meant}? " if meant else "")
                                + "a batch line carries only custom_id, method, url and body)")
            if _SURROGATE_ESCAPE.search(raw) and (bad := _not_unicode(obj)):
                raise LineError(bad)
            if obj.get("method", "POST") != "POST":
                raise LineError("method: must be POST")
            url = obj.get("url")
            if url not in ENDPOINTS:
                raise LineError(f"url: must be one of {', '.join(ENDPOINTS)}")
            if not isinstance(obj.get("body"), dict):
                raise LineError("body: must be a JSON object")
            req = to_request(bid, index, line_no, cid, url, obj["body"], expires_ms)
            out.append(ParsedLine(line_no, cid, url, req.params.num_samples,
                                  body=_stream_body(req, max_message_bytes)))
            index += 1
        except FileError:
            raise
        except LineError as e:
            out.append(ParsedLine(line_no, cid, url, None, f"line {line_no + 1}: {e}"))
    if out and not objects:
        raise FileError(f"not JSON Lines: no line is a JSON object ({out[0].error}); each line is one request "
                        '{"custom_id", "method", "url", "body"}')
    return out


# ------------------------------------------------------------------------------------------ output lines
def line_id(bid: str, line_no: int) -> str:
    return f"batch_req_{bid.removeprefix('batch_')}_{line_no}"


def error_line(bid: str, line_no: int, custom_id: str | None, code: str, message: str) -> dict:
    """A line that did not run (invalid, cancelled, expired, lost): no response, an error."""
    return {"id": line_id(bid, line_no), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


TokenText = Callable[[int], str]


def id_token(tid: int) -> str:
    """A token as vLLM's ``return_tokens_as_token_ids`` writes it: where the line asks for that, or where no
    tokenizer is at hand."""
    return f"token_id:{tid}"


def _token_bytes(token_text: TokenText, token: str) -> list[int] | None:
    # As vLLM writes them: the token's text as UTF-8 (a token holding part of a character reads U+FFFD);
    # none for an id.
    return None if token_text is id_token else list(token.encode("utf-8"))


# OpenAI's value for a token that could not be drawn ("-9999.0 is used to signify that the token is very unlikely");
# the wire's -1e30 (JSON has no -Infinity) would skew what a reader averages or exponentiates.
UNLIKELY_LOGPROB = -9999.0


def _openai_logprobs(lps: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{t: max(v, UNLIKELY_LOGPROB) for t, v in d.items()} for d in lps]


def _chat_logprobs(token_ids: list[int], lps: list[dict[str, float]] | None, k: int,
                   token_text: TokenText) -> dict | None:
    if lps is None:
        return None

    def entry(tid: int, logprob: float) -> dict:
        token = token_text(tid)
        return {"token": token, "logprob": logprob, "bytes": _token_bytes(token_text, token)}

    content = []
    for tid, d in zip(token_ids, _openai_logprobs(lps)):
        top = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        content.append({**entry(tid, d.get(str(tid), top[0][1] if top else 0.0)),
                        "top_logprobs": [entry(int(t), v) for t, v in top]})
    return {"content": content, "refusal": None}


def _completion_logprobs(token_ids: list[int], lps: list[dict[str, float]] | None, k: int,
                         token_text: TokenText) -> dict | None:
    """The legacy completions shape, as OpenAI and vLLM write it: each ``top_logprobs`` entry holds the ``k`` most
    likely tokens and the sampled one (up to k + 1), and ``text_offset[i]`` is the length of ``tokens[:i]`` joined
    (vLLM's rule: with ``token_id:<id>`` tokens, offsets into the joined tokens, not into the text). Two ids of
    one text (two byte tokens of one character) share one key, as in vLLM's dict."""
    if lps is None:
        return None
    lps = _openai_logprobs(lps)
    tokens = [token_text(t) for t in token_ids]
    top_logprobs = []
    for tid, d in zip(token_ids, lps):
        top = dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])
        if str(tid) in d:
            top.setdefault(str(tid), d[str(tid)])
        top_logprobs.append({token_text(int(t)): v for t, v in top.items()})
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": [d.get(str(t), 0.0) for t, d in zip(token_ids, lps)],
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _param(message: str, url: str, renamed: dict[str, str]) -> str | None:
    """The body field a worker's error message is about, or None."""
    m = _LEADING_FIELD.match(message)
    name = renamed.get(m.group(1), _BODY_NAME.get(m.group(1))) if m else None
    return "messages" if name == "prompt" and url == "/v1/chat/completions" else name


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def output_line(event: DoneEvent | ErrorEvent, md: dict, token_text: TokenText = id_token) -> tuple[int, dict, bool]:
    """(line number, output line, succeeded) of a request's terminal event. ``md`` is the metadata the request
    carried (echoed in its terminal event): the line's identity. ``token_text``: a logprob token's text (the
    deployment's tokenizer; one deployment serves one model), unless the line asked for ids."""
    if md.get("tokens_as_ids"):
        token_text = id_token
    top_logprobs = int(md.get("top_logprobs") or 0)
    bid, line_no, cid, url = md["batch_id"], int(md["line"]), md["custom_id"], md["url"]
    if isinstance(event, ErrorEvent):
        renamed, status = _renamed(md), _STATUS_OF_CODE.get(event.error.code, 500)
        # OpenAI's error body: its type is the class of error; ``code`` keeps the worker's own code.
        body = {"error": {"message": _in_body_words(event.error.message, renamed),
                          "type": "invalid_request_error" if status == 400 else "server_error",
                          "param": _param(event.error.message, url, renamed), "code": event.error.code}}
        return line_no, {"id": line_id(bid, line_no), "custom_id": cid,
                         "response": {"status_code": status, "request_id": event.id, "body": body},
                         "error": None}, False
    reasons = {o.finish_reason for o in event.outputs}
    if "cancelled" in reasons:
        return line_no, error_line(bid, line_no, cid, "batch_cancelled",
                                   "The batch was cancelled before this request finished."), False
    if "deadline" in reasons:
        return line_no, error_line(bid, line_no, cid, "batch_expired",
                                   "This request could not be executed before the completion window expired."), False
    u = event.usage
    # prompt_tokens_details.cached_tokens as OpenAI (and vLLM's server, asked for it) write it: from the prefix cache
    usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
             "total_tokens": u.prompt_tokens + u.completion_tokens,
             "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}
    created = int(time.time())
    model = md.get("model") or "pagedserve"
    if url == "/v1/chat/completions":
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "finish_reason": _finish(o.finish_reason), "stop_reason": o.stop_reason,
                    "logprobs": _chat_logprobs(o.token_ids, o.logprobs, top_logprobs, token_text)} for o in event.outputs]
        body = {"id": f"chatcmpl-{event.id}", "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage}
    else:
        choices = [{"index": o.index, "text": o.text, "finish_reason": _finish(o.finish_reason),
                    "stop_reason": o.stop_reason,
                    "logprobs": _completion_logprobs(o.token_ids, o.logprobs, top_logprobs, token_text)} for o in event.outputs]
        body = {"id": f"cmpl-{event.id}", "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage}
    return line_no, {"id": line_id(bid, line_no), "custom_id": cid,
                     "response": {"status_code": 200, "request_id": event.id, "body": body}, "error": None}, True
