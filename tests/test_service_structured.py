"""Structured outputs over the wire: real Redis, a real worker loop on the built-in model (CPU).

Invariants checked on Redis state: every id ends with exactly one stored terminal result; a refused spec is an
``invalid_request`` naming ``params.structured_outputs`` and an innocent request beside it ends ``done``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest

from pagedserve.service.client import Client
from pagedserve.service.protocol import DoneEvent, ErrorEvent, parse_request
from service_fixtures import make_settings, metric_samples, raw_submit, running_worker, wait_for
from structured_schemas import SCHEMAS

SCHEMA = SCHEMAS["sentiment"]


@pytest.fixture
def setup(redis_url, prefix, shared_engine):
    s = make_settings(redis_url, prefix)
    with running_worker(s, shared_engine) as w, Client(settings=s) as c:
        yield s, w, c


def _one_result(c: Client, rid: str):
    """The id's stored terminal event (exactly one key holds it)."""
    stored = c.result(rid)
    assert stored is not None, f"{rid} has no stored result"
    return stored


def test_round_trip_json_regex_choice(setup):
    s, w, c = setup
    specs = {
        "json": {"json": SCHEMA, "disable_any_whitespace": True},
        "json-text": {"json": json.dumps(SCHEMA)},
        "regex": {"regex": r"[a-z]{2,5}-[0-9]{2}"},
        "choice": {"choice": ["red", "green", "blue"]},
    }
    ids = {name: c.submit("Label this: great!", params={"max_tokens": 200, "temperature": 0.8, "seed": 5,
                                                          "structured_outputs": spec})
           for name, spec in specs.items()}
    free = c.submit("free text", params={"max_tokens": 8, "temperature": 0.0})
    for name, rid in ids.items():
        done = c.wait(rid, timeout=120)
        assert isinstance(done, DoneEvent), done
        assert isinstance(_one_result(c, rid), DoneEvent)
        out = done.outputs[0]
        assert out.finish_reason == "stop", (name, out.text)
        if name.startswith("json"):
            jsonschema.validate(json.loads(out.text), SCHEMA)
        elif name == "regex":
            assert re.fullmatch(specs["regex"]["regex"], out.text), out.text
        else:
            assert out.text in specs["choice"]["choice"]
    assert isinstance(c.wait(free, timeout=60), DoneEvent)
    wait_for(lambda: metric_samples(w, "pagedserve_structured_requests_total").get((("kind", "json"),), 0) >= 2,
             30, what="structured requests counted")
    assert metric_samples(w, "pagedserve_structured_mask_rows_total")[()] > 0


@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "object", "properties": {"a": {"type": "integr"}}}}, "params.structured_outputs json is not"),
    ({"regex": "(unclosed"}, "params.structured_outputs regex does not compile"),
    ({"grammar": "start: nowhere"}, "params.structured_outputs grammar does not compile"),
    ({"regex": "a", "choice": ["a"]}, "params.structured_outputs must set exactly one of"),
    ({"choice": "a,b"}, "params.structured_outputs.choice"),
    ({"jsn": {}}, "params.structured_outputs.jsn"),
    # one message of ours, not pydantic's two for the union's branches (dict[str,any], str)
    ({"json": False}, "params.structured_outputs.json: must be a JSON Schema object or its JSON text (got false)"),
    ({"json": [1, 2]}, "params.structured_outputs.json: must be a JSON Schema object or its JSON text (got an array)"),
    # compiles, then fails at its first mask: ended with the engine's error, still the request's own
    ({"regex": "[xy](a{1000}){1000}"}, "params.structured_outputs could not be followed while generating"),
])
def test_unusable_spec_is_invalid_request_naming_the_field(setup, spec, words):
    s, w, c = setup
    bad = raw_submit(s, {"max_tokens": 8, "structured_outputs": spec})
    innocent = c.submit("innocent", params={"max_tokens": 4, "temperature": 0.0})
    err = c.wait(bad, timeout=60)
    assert isinstance(err, ErrorEvent), err
    assert err.error.code == "invalid_request"
    assert err.error.message.startswith(words), err.error.message
    assert isinstance(_one_result(c, bad), ErrorEvent)
    assert isinstance(c.wait(innocent, timeout=60), DoneEvent)


def test_a_pydantic_class_or_a_number_for_the_json_schema_is_named_before_sending():
    """OpenAI's SDK takes a pydantic class as response_format: given here, json.dumps of it escaped as a bare
    TypeError naming no field (the message was built for every type, bools' JSON text included)."""
    import pydantic

    from pagedserve.service.client import build_request

    class Person(pydantic.BaseModel):
        name: str

    for value, got in ((Person, "got the pydantic class Person: pass Person.model_json_schema()"),
                       (5, "got a number"), (dict, "got the class dict")):
        with pytest.raises(ValueError) as e:
            build_request("Hi", params={"max_tokens": 4, "structured_outputs": {"json": value}})
        assert "params.structured_outputs.json" in str(e.value) and got in str(e.value), str(e.value)
    ok = build_request("Hi", params={"structured_outputs": {"json": Person.model_json_schema()}})
    assert ok.params.structured_outputs.kind == "json"


def test_wire_model_carries_the_field():
    req = parse_request(json.dumps({"id": "a", "prompt": "x", "params": {"structured_outputs": {
        "json": {"type": "object"}, "disable_any_whitespace": True}}}), 1 << 20)
    assert req.params.to_kwargs() == {"structured_outputs": {"json": {"type": "object"},
                                                             "disable_any_whitespace": True}}
    assert req.params.structured_outputs.kind == "json"  # the span attribute pagedserve.request.structured_outputs


def _submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    """``pagedserve submit`` in a subprocess (its stdout is the output alone)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDSERVE_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pagedserve.service.cli", "submit", *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_submit_options(redis_url, prefix, shared_engine, tmp_path):
    s = make_settings(redis_url, prefix)
    env = {"PAGEDSERVE_REDIS_URL": redis_url, "PAGEDSERVE_PREFIX": prefix}
    # A top-level string: no whitespace around it (submit writes control characters such as \r as escapes, so
    # a whitespace-padded object would not parse back; the Client test above covers objects).
    schema = SCHEMAS["enum_string"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    with running_worker(s, shared_engine):
        res = _submit(env, "Label it", "--max-tokens", "300", "--temperature", "0", "--json-schema",
                      str(schema_file), "--no-stream")
        assert res.returncode == 0, res.stderr
        jsonschema.validate(json.loads(res.stdout), schema)
        res = _submit(env, "Pick", "--choice", "yes,no", "--no-stream")
        assert res.returncode == 0 and res.stdout.strip() in ("yes", "no"), res.stdout + res.stderr
        res = _submit(env, "Code", "--regex", "[A-Z]{3}", "--max-tokens", "8")  # streamed
        assert res.returncode == 0 and re.fullmatch("[A-Z]{3}", res.stdout.strip()), res.stdout + res.stderr
        # the worker's refusal of the schema names the option, as the client's refusals do
        unusable = tmp_path / "unusable.json"
        unusable.write_text(json.dumps({"type": "array", "uniqueItems": True}))
        res = _submit(env, "x", "--json-schema", str(unusable), "--max-tokens", "8")
        assert res.returncode == 1 and res.stderr.startswith(
            "invalid_request: --json-schema is not a usable JSON Schema: Unimplemented keys"), res.stderr
    res = _submit(env, "x", "--choice", "a,b", "--regex", "a")
    assert res.returncode == 2 and "give one of --json-schema, --choice, --regex" in res.stderr, res.stderr
    (tmp_path / "bad.json").write_text("{not json")
    res = _submit(env, "x", "--json-schema", str(tmp_path / "bad.json"))
    assert res.returncode == 2 and "--json-schema" in res.stderr, res.stderr


def test_an_object_of_too_many_optional_properties_is_refused_before_any_token(setup):
    """llguidance fails on it only once the output is inside the object: refused before the request runs, so
    no token event (a lone ``{``) is streamed ahead of the error."""
    s, w, c = setup
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)},
              "additionalProperties": False}
    events = list(c.stream("JSON:", params={"max_tokens": 16, "temperature": 0.0,
                                            "structured_outputs": {"json": schema}}, timeout=60))
    assert [e.type for e in events] == ["error"], events
    err = events[0]
    assert err.error.code == "invalid_request"
    assert err.error.message.startswith(
        "params.structured_outputs json is not a usable JSON Schema: the object at / has 600 optional properties "
        "and none required, more than llguidance can follow (at most 500)"), err.error.message


# ---------------------------------------------------------------------- batch lines: response_format
def _batch(*formats) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": "x"}], "response_format": f}})
                     for i, f in enumerate(formats)).encode()


def test_batch_response_format_unknown_keys_are_refused_by_name():
    from pagedserve.service.batch_format import parse_lines

    schema = {"type": "object"}
    lines = parse_lines("batch_x", _batch(
        {"type": "json_object", "foo": 1},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "stirct": True}},
        {"type": "text", "json_schema": {"name": "a", "schema": schema}},
        {"type": "json_schema", "json_schema": {"name": "a", "description": "d", "schema": schema, "strict": True}},
        {"type": "json_object", "json_schema": None},  # a client's model dumped with its empty fields
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"a": {}}} |
                                                {"$defs": {"d": {"type": "integer"}}}}},
    ), expires_ms=2**40)
    assert [ln.error for ln in lines] == [
        "line 1: body.response_format.foo: not supported with type json_object",
        "line 2: body.response_format.json_schema.stirct: not supported (known: description, name, schema, strict)",
        "line 3: body.response_format.json_schema: not supported with type text",
        None, None, None]


def test_batch_json_schema_name_and_strict_are_checked_as_openai_does():
    """OpenAI refuses a json_schema without a usable name, or a strict that is not a boolean; a line it would
    refuse is refused here too, by field. A strict that is false still constrains the output (the docs say so)."""
    from pagedserve.service.batch_format import parse_lines

    schema = {"type": "object"}
    lines = parse_lines("batch_x", _batch(
        {"type": "json_schema", "json_schema": {"schema": schema}},
        {"type": "json_schema", "json_schema": {"name": 5, "schema": schema}},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": schema}},
        {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": schema}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": "yes"}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "description": 3}},
        {"type": "json_schema", "json_schema": {"name": "Order_summary-2", "schema": schema, "strict": False}},
    ), expires_ms=2**40)
    name_rule = "body.response_format.json_schema.name: required, 1 to 64 letters, digits, _ or -"
    assert [ln.error for ln in lines] == [
        f"line 1: {name_rule}", f"line 2: {name_rule}", f"line 3: {name_rule}", f"line 4: {name_rule}",
        "line 5: body.response_format.json_schema.strict: must be true or false",
        "line 6: body.response_format.json_schema.description: must be a string",
        None]


def test_batch_refusals_of_a_schema_name_the_body_field():
    from pagedserve.engine.structured_spec import MAX_SPEC_DEPTH
    from pagedserve.service.batch_format import output_line, parse_lines

    deep: dict = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    (line,) = parse_lines("batch_x", _batch({"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}),
                          expires_ms=2**40)
    assert line.error == ("line 1: body.response_format.json_schema.schema nests deeper than "
                          f"{MAX_SPEC_DEPTH} levels"), line.error
    md = {"batch_id": "batch_x", "line": 3, "custom_id": "c3", "url": "/v1/chat/completions"}
    worker_says = "params.structured_outputs json is not a usable JSON Schema: Unimplemented keys: [\"uniqueItems\"]"
    _, out, ok = output_line(ErrorEvent(id="r", error={"code": "invalid_request", "message": worker_says}), md)
    error = out["response"]["body"]["error"]
    assert not ok and error["param"] == "response_format"
    assert error["message"] == ("body.response_format.json_schema.schema is not a usable JSON Schema: "
                                "Unimplemented keys: [\"uniqueItems\"]")
    following = "params.structured_outputs could not be followed while generating: lexer error"
    _, out, _ = output_line(ErrorEvent(id="r", error={"code": "invalid_request", "message": following}), md)
    assert out["response"]["body"]["error"]["message"] == (
        "body.response_format could not be followed while generating: lexer error")


def test_batch_lines_take_vllms_structured_outputs_of_every_kind(redis_url, prefix, r, shared_engine):
    """A batch file written for vLLM's batch runner says its constraints as structured_outputs (json, regex,
    choice, grammar): it was refused pointing at response_format, which has no regex, choice or grammar. Each kind
    is followed; a refusal by the worker names body.structured_outputs; a line with it and response_format, and
    vLLM's older guided_* names, are refused by name at submit."""
    from openai.types.chat import ChatCompletion

    from pagedserve.service.batch_client import batch_results, submit_batch, wait_batch

    def line(cid: str, **body) -> dict:
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": [{"role": "user", "content": "Label this: great!"}],
                         "max_tokens": 120, "temperature": 0.8, "seed": 3, **body}}

    grammar = 'start: "yes" | "no"'
    lines = [line("json", structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}),
             line("regex", structured_outputs={"regex": r"[a-z]{2,5}-[0-9]{2}"}),
             line("choice", structured_outputs={"choice": ["red", "green", "blue"]}),
             line("grammar", structured_outputs={"grammar": grammar}),
             line("bad-regex", structured_outputs={"regex": "[0-9"}),  # compiled by the worker
             line("both", structured_outputs={"regex": "a"}, response_format={"type": "json_object"}),
             line("guided", guided_regex="a+"),
             line("misspelt", structured_outputs={"json_schema": SCHEMA})]
    bid = submit_batch(r, prefix, "".join(json.dumps(ln) + "\n" for ln in lines).encode())
    with running_worker(make_settings(redis_url, prefix), shared_engine):
        assert wait_batch(r, prefix, bid, timeout=180, poll_s=0.1)["status"] == "completed"
    out = {o["custom_id"]: o for o in batch_results(r, prefix, bid)}
    text = {cid: ChatCompletion.model_validate(out[cid]["response"]["body"]).choices[0].message.content
            for cid in ("json", "regex", "choice", "grammar")}
    jsonschema.validate(json.loads(text["json"]), SCHEMA)
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", text["regex"]), text
    assert text["choice"] in ("red", "green", "blue") and text["grammar"] in ("yes", "no"), text
    refused = out["bad-regex"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "structured_outputs", refused
    assert refused["body"]["error"]["message"].startswith("body.structured_outputs"), refused
    said = {cid: out[cid]["error"]["message"] for cid in ("both", "guided", "misspelt")}
    assert said["both"].endswith("body.structured_outputs: give it or response_format (json_object, json_schema), "
                                 "not both"), said
    assert 'body.guided_regex: not supported: vLLM\'s older name: give structured_outputs {"regex": ...}' in \
        said["guided"], said
    assert "body.structured_outputs has an unknown key 'json_schema'" in said["misspelt"], said


def test_structured_outputs_dumped_from_vllm_are_taken_at_its_defaults():
    """A structured_outputs dict dumped from vLLM's StructuredOutputsParams spells out disable_fallback: false,
    structural_tag: null (and its private _backend fields) and disable_additional_properties: false beside a
    regex: each was refused as an unknown key or as json-only, offline, on the wire and in a batch line. vLLM's
    defaults are taken; any other value of its own fields is refused saying why."""
    from pagedserve.engine.sampling_params import SamplingParams
    from pagedserve.service.batch_format import LineError, to_request

    dumped = {"json": None, "regex": "[0-9]+", "choice": None, "grammar": None, "json_object": None,
              "disable_fallback": False, "disable_any_whitespace": False, "disable_additional_properties": False,
              "whitespace_pattern": None, "structural_tag": None, "_backend": None, "_backend_was_auto": False}
    assert SamplingParams(structured_outputs=dumped).structured_outputs == {"regex": "[0-9]+"}
    from pagedserve.service.protocol import engine_params

    wire = parse_request(json.dumps({"id": "d", "prompt": "x", "params": {"structured_outputs": dumped}}).encode(),
                         1 << 20)
    assert engine_params(wire.params).structured_outputs == {"regex": "[0-9]+"}
    body = {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": dumped}
    line = to_request("batch_x", 0, 1, "c", "/v1/chat/completions", body, 2**40)
    assert line.params.structured_outputs.regex == "[0-9]+"
    with pytest.raises(ValueError, match="^structured_outputs disable_fallback is vLLM's, taken only at its "
                                         r"default \(false\)"):
        SamplingParams(structured_outputs={**dumped, "disable_fallback": True})
    with pytest.raises(LineError, match=r"^body.structured_outputs structural_tag is vLLM's, taken only at its "
                                        r"default \(null\)"):
        to_request("batch_x", 0, 1, "c", "/v1/chat/completions",
                   {**body, "structured_outputs": {**dumped, "structural_tag": "<tool>"}}, 2**40)
    with pytest.raises(ValueError, match="disable_additional_properties applies to json only"):
        SamplingParams(structured_outputs={"regex": "a", "disable_additional_properties": True})
