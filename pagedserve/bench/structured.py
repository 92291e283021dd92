"""``pagedserve bench structured``: what structured outputs cost a batch.

A batch of ``num_requests`` chat requests, half constrained to a JSON Schema (record-extraction schemas, below),
half free. It runs twice, side by side in one process:

- constrained: the constrained half stops when its JSON is complete (EOS is forced), the free half runs
  ``max_tokens``;
- unconstrained: the same prompts, each constrained request replaced by a free one that generates exactly as
  many tokens as its constrained twin did (``ignore_eos``), so both runs carry the same batch, step by step,
  and the only difference is the grammar work (mask fill on the CPU, mask applied to the logits).

Reported: output tokens/s of both runs (best of ``repeats``, alternating; on a busy machine their ratio is noisy,
so the grammar's share of the constrained run is also computed from its own timings: mask rows filled plus one
bitmask application per step), the per-token mask time (one bitmask row
of one sequence) p50/p99 as the step loop saw it and replayed alone afterwards (the loop's figure includes
whatever else the machine was doing), compile time per schema cold and cached, the backend's name and version,
and how many constrained outputs ended with ``stop`` and validate (``jsonschema``, if installed).
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import torch
import typer

from pagedserve.bench.common import check_device, check_min, check_model, check_out, percentile, write_json
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.structured_spec import validate_structured_outputs


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


_STR = {"type": "string", "maxLength": 40}
# Records a backend would ask a model to fill (the test suite's 64 schemas are tests/structured_schemas.py).
BENCH_SCHEMAS = {
    "person": _obj({"name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "email": {"type": "string", "format": "email", "maxLength": 60}}, ["name", "age"]),
    "sentiment": _obj({"label": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125}}),
    "invoice": _obj({"number": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
                     "date": {"type": "string", "format": "date"},
                     "lines": {"type": "array", "minItems": 1, "maxItems": 4, "items": _obj({
                         "description": _STR, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                         "price": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.25}})}}),
    "event": _obj({"title": _STR, "start": {"type": "string", "format": "date-time"},
                   "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 4},
                   "online": {"type": "boolean"}}, ["title", "start"]),
    "product": _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": _STR,
                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
                     "in_stock": {"type": "boolean"}}),
    "address": _obj({"street": _STR, "city": _STR, "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
                     "country": {"enum": ["DE", "FR", "IT", "ES", "NL"]}}),
    "ticket": _obj({"priority": {"enum": ["low", "medium", "high"]}, "component": _STR,
                    "summary": {"type": "string", "maxLength": 80},
                    "duplicate_of": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}}),
    "server": _obj({"host": {"type": "string", "format": "hostname", "maxLength": 40},
                    "ip": {"type": "string", "format": "ipv4"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "status": {"enum": ["up", "down", "degraded"]}}),
}
TOPICS = ["the sea", "a city at night", "bread", "trains", "a mountain", "rain", "libraries", "bees"]


def _prompts(tokenizer, num_requests: int) -> tuple[list[list[int]], list[dict | None]]:
    """Chat prompts (token ids) and, per request, its ``structured_outputs`` (None: a free request)."""
    names = list(BENCH_SCHEMAS)
    prompts, specs = [], []
    for i in range(num_requests):
        if i % 2 == 0:
            name = names[(i // 2) % len(names)]
            schema = BENCH_SCHEMAS[name]
            text = (f"Invent a realistic {name} record and reply with JSON only, matching this schema: "
                    f"{json.dumps(schema)}")
            specs.append({"json": schema})
        else:
            text = f"Write a short paragraph about {TOPICS[(i // 2) % len(TOPICS)]}."
            specs.append(None)
        messages = [{"role": "user", "content": text}]
        if getattr(tokenizer, "chat_template", None):  # rendered, then tokenized without special tokens again
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text))
    return prompts, specs


def _run(engine, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    before = engine.structured.mask_rows
    steps_before = engine.num_steps
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{i}", p, sp)
    outputs: dict[str, object] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    wall = time.perf_counter() - start
    ordered = [outputs[f"bench-{i}"] for i in range(len(prompts))]
    new_rows = engine.structured.mask_rows - before  # the latest rows (the deque keeps 100000)
    masks = list(engine.structured.mask_seconds)[-new_rows:] if new_rows else []
    tokens = sum(len(o.outputs[0].token_ids) for o in ordered)
    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall, "outputs": ordered,
            "mask_rows": len(masks), "mask_s": masks, "steps": engine.num_steps - steps_before}


def _apply_seconds(engine, batch: int, rows: int, reps: int = 50) -> float:
    """Seconds one step spends applying a bitmask of ``rows`` rows to ``[batch, vocab]`` logits (median)."""
    from pagedserve.engine.structured import apply_token_bitmask

    words = (engine.structured.backend.vocab_size + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32)
    logits = torch.zeros((batch, engine.vocab_size), device=engine.runner.device)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        apply_token_bitmask(logits, bitmask, list(range(0, 2 * rows, 2)))
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return percentile(times, 50)


def _compile_times(engine, specs: list[dict]) -> dict:
    """Cold (first compile, on a fresh cache) and cached (the same spec again, plus a matcher) per schema."""
    from pagedserve.engine.structured import StructuredOutputs, default_backend

    fresh = StructuredOutputs(lambda: default_backend(engine.tokenizer, engine.vocab_size, engine.eos_token_ids))
    started = time.perf_counter()
    backend = fresh.backend  # wraps the tokenizer: once per engine, on the compile thread in service
    setup_s = time.perf_counter() - started
    cold, cached = {}, {}
    for name, spec in zip(BENCH_SCHEMAS, specs):
        started = time.perf_counter()
        fresh.compile(spec).matcher()
        cold[name] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        fresh.compile(spec).matcher()
        cached[name] = (time.perf_counter() - started) * 1e3
    fresh.close()
    return {"backend": backend.name, "backend_version": backend.version, "tokenizer_setup_s": setup_s,
            "compile_cold_ms": cold, "compile_cached_ms": cached}


def _replay_mask_times(engine, outputs: list, specs: list[dict | None]) -> list[float]:
    """Per-token mask time outside the step loop: each constrained output's tokens fed again to a fresh matcher,
    one bitmask row filled before each (what one sequence costs a step, without the loop's other work)."""
    backend = engine.structured.backend
    row = torch.empty((1, (backend.vocab_size + 31) // 32), dtype=torch.int32)
    seconds: list[float] = []
    for out, spec in zip(outputs, specs):
        if spec is None:
            continue
        matcher = engine.structured.new_matcher(validate_structured_outputs(spec))
        for token in out.outputs[0].token_ids:
            seconds += backend.fill_bitmasks([matcher], row)
            matcher.accept(token)
    return seconds


def structured_command(
    model: Annotated[str, typer.Option(help="A model name, HF model dir or .gguf file.")] = "smollm2",
    num_requests: Annotated[int, typer.Option(help="Requests in the batch, half of them constrained (>= 1).")] = 32,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request (>= 1).")] = 128,
    repeats: Annotated[int, typer.Option(help="Runs of each kind (>= 1; the best is reported).")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/structured.json",
) -> None:
    """Constrained (half the batch JSON-Schema-constrained) vs unconstrained tok/s, mask time, compile time."""
    # Options first (one line, exit 2), before the model loads and the schemas compile.
    check_min("--num-requests", num_requests, 1)
    check_min("--max-tokens", max_tokens, 1)
    check_min("--repeats", repeats, 1)
    check_device("--device", device)
    check_min("--threads", threads, 0, " (0: torch's default)")
    out = check_out("--out", out)
    model_dir = check_model("--model", model)
    if threads:
        torch.set_num_threads(threads)
    from pagedserve.bench.common import bench_console
    from rich.table import Table

    from pagedserve.engine import LLM

    console = bench_console()
    llm = LLM(model=model_dir, device=device, max_num_seqs=max(num_requests, 8))
    engine = llm.engine
    prompts, specs = _prompts(engine.tokenizer, num_requests)
    schema_specs = [validate_structured_outputs({"json": s}) for s in BENCH_SCHEMAS.values()]
    compile_figures = _compile_times(engine, schema_specs)
    for spec in schema_specs:  # compiled before timing: the runs measure the step loop alone
        engine.structured.compile(spec)
    llm.generate([prompts[0]], SamplingParams(max_tokens=4))  # warm-up
    constrained_params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=s) if s
                          else SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True) for s in specs]

    runs: dict[str, list[dict]] = {"constrained": [], "unconstrained": []}
    matched = None
    for _ in range(repeats):
        runs["constrained"].append(_run(engine, prompts, constrained_params))
        if matched is None:  # each constrained request's twin generates as many tokens, unconstrained
            lengths = [len(o.outputs[0].token_ids) for o in runs["constrained"][0]["outputs"]]
            matched = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        runs["unconstrained"].append(_run(engine, prompts, matched))
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    for r in runs["unconstrained"]:
        assert r["output_tokens"] == runs["constrained"][0]["output_tokens"], "the matched run differs in length"

    valid = 0
    finished_stop = 0
    for o, spec in zip(best["constrained"]["outputs"], specs):
        if spec is None:
            continue
        finished_stop += o.outputs[0].finish_reason == "stop"
        try:
            import jsonschema

            jsonschema.validate(json.loads(o.outputs[0].text), spec["json"])
            valid += 1
        except Exception:
            pass
    masks = [s for r in runs["constrained"] for s in r["mask_s"]]
    replay = _replay_mask_times(engine, best["constrained"]["outputs"], specs)
    # The grammar's share of the constrained run, from its own timings (steady where the machine is noisy):
    # every mask row filled, plus one bitmask application per step at the run's batch shape.
    constrained_rows = sum(s is not None for s in specs)
    apply_s = _apply_seconds(engine, num_requests, constrained_rows)
    c_run = best["constrained"]
    grammar_share = (sum(c_run["mask_s"]) + c_run["steps"] * apply_s) / c_run["wall_s"]
    cold, cached = compile_figures["compile_cold_ms"], compile_figures["compile_cached_ms"]
    c, u = best["constrained"], best["unconstrained"]
    results = {
        "model": str(model), "device": device, "num_requests": num_requests, "max_tokens": max_tokens,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "backend": compile_figures["backend"], "backend_version": compile_figures["backend_version"],
        "tokenizer_setup_s": compile_figures["tokenizer_setup_s"],
        "constrained_tokens_per_s": c["tokens_per_s"], "unconstrained_tokens_per_s": u["tokens_per_s"],
        "slowdown_pct": 100.0 * (1 - c["tokens_per_s"] / u["tokens_per_s"]),
        "output_tokens": c["output_tokens"], "constrained_wall_s": c["wall_s"], "unconstrained_wall_s": u["wall_s"],
        "mask_rows": len(masks),
        "mask_us_p50": (percentile(masks, 50) or 0) * 1e6, "mask_us_p99": (percentile(masks, 99) or 0) * 1e6,
        "apply_us_per_step": apply_s * 1e6, "grammar_share_pct": 100.0 * grammar_share,
        "mask_replay_us_p50": (percentile(replay, 50) or 0) * 1e6,
        "mask_replay_us_p99": (percentile(replay, 99) or 0) * 1e6,
        "compile_cold_ms": cold, "compile_cached_ms": cached,
        "compile_cold_ms_p50": percentile(list(cold.values()), 50), "compile_cold_ms_max": max(cold.values()),
        "compile_cached_ms_p50": percentile(list(cached.values()), 50),
        "constrained_requests": sum(s is not None for s in specs), "finished_stop": finished_stop,
        "valid_json": valid,
    }
    table = Table(title=f"bench structured: {results['backend']} {results['backend_version']}, {model} on {device}")
    table.add_column("figure")
    table.add_column("value", justify="right", overflow="fold")
    for label, value in (
        ("output tok/s, half constrained", f"{results['constrained_tokens_per_s']:.1f}"),
        ("output tok/s, same batch unconstrained", f"{results['unconstrained_tokens_per_s']:.1f}"),
        ("slowdown", f"{results['slowdown_pct']:.1f} %"),
        ("grammar work in the constrained run", f"{results['grammar_share_pct']:.1f} % (masks filled + "
                                                f"{results['apply_us_per_step']:.0f} us/step applied)"),
        ("mask per token p50 / p99, in the step loop", f"{results['mask_us_p50']:.1f} / "
                                                       f"{results['mask_us_p99']:.1f} us"),
        ("mask per token p50 / p99, replayed alone", f"{results['mask_replay_us_p50']:.1f} / "
                                                     f"{results['mask_replay_us_p99']:.1f} us"),
        ("compile per schema cold p50 / max", f"{results['compile_cold_ms_p50']:.2f} / "
                                              f"{results['compile_cold_ms_max']:.2f} ms"),
        ("compile per schema cached p50", f"{results['compile_cached_ms_p50']:.3f} ms"),
        ("tokenizer setup (once per engine)", f"{results['tokenizer_setup_s']:.2f} s"),
        ("constrained outputs: stop / valid JSON", f"{finished_stop} / {valid} of {results['constrained_requests']}"),
    ):
        table.add_row(label, value)
    console.print(table)
    write_json(out, results, console)
