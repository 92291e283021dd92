"""``pagedserve bench host-work``: the engine's own work per sequence per decode step, by output kind and length.

The model's forward and LM head cost nothing (:func:`.decode_roofline.zero_cost_model`), and neither does the
sampler's pass over the vocabulary (:func:`zero_cost_greedy_pass`), so a timed step is the engine alone:
scheduling, inputs, the sampler's bookkeeping, stop checks, the detokenizer and the outputs. This is the part of a
decode step that no GPU makes faster (it must stay under the device's time for the step to be the device's). The
greedy token is one with text (``text``: a byte of the bench model's byte tokenizer) or an id its tokenizer has
none for (``no-text``: as most ids a random model samples, and as a model's invalid UTF-8 reads). Every
measurement runs in its own process, the contenders alternating round by round so that a change in the machine's
load touches all alike; the medians are reported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Annotated

import typer

from pagedserve.bench.common import (
    BENCH_MODELS,
    bench_model_dir,
    check_choices,
    check_min,
    check_out,
    die_with_parent,
    parse_ints,
    usage_error,
    write_json,
)

KINDS = ("CUMULATIVE", "DELTA", "FINAL_ONLY")
TOKENS = {"text": 97, "no-text": 300}  # in the 26m bench model: byte "a"; an id past its 259-token tokenizer
# Token shaping each request asks for: a logit_bias of 300 entries, 1,000 allowed_token_ids, or both (the greedy
# token kept first: the bias lowers the others, the allowed ids hold it).
SHAPINGS = {"none": (0, 0), "bias": (300, 0), "allowed": (0, 1000), "both": (300, 1000)}
PROMPT_TOKENS = 64
TIMED_STEPS = 32
RUN_TIMEOUT_S = 600


def zero_cost_greedy_pass(eng, token: int) -> None:
    """The sampler's greedy pass over every row's logits (argmax and log-sum-exp across the vocabulary) as kept
    results: ``token`` for every row (the zero-cost logits' greedy token) and log-sum-exp 0 (not theirs: it only
    shifts the logprobs reported, which nothing timed reads). On a GPU that pass is a kernel on the device; run
    on the CPU it would be timed as the engine's own work (about a fifth of a step at the bench model's 4,096-token
    vocabulary). For greedy requests without penalties only, as :func:`measure` makes them (nothing then writes to
    the tokens returned)."""
    import torch

    tokens = torch.zeros(0, dtype=torch.int64)
    lse = torch.zeros(0)

    def greedy_pass(logits):
        nonlocal tokens, lse
        rows = logits.shape[0]
        if tokens.shape[0] < rows:
            tokens, lse = torch.full((rows,), token, dtype=torch.int64), torch.zeros(rows)
        return tokens[:rows], lse[:rows]

    eng.sampler.argmax_logsumexp = greedy_pass


def measure(model_dir: str, batch: int, output_tokens: int, kind: str, token: int, logprobs: int | None = None,
            steps: int = TIMED_STEPS, shaping: str = "none") -> dict:
    """``batch`` greedy requests of ``PROMPT_TOKENS`` prompt tokens stepped until each has ``output_tokens``
    outputs, then ``steps`` steps timed: µs a sequence a step. ``shaping``: a :data:`SHAPINGS` name."""
    from pagedserve.bench.decode_roofline import zero_cost_model
    from pagedserve.engine import LLMEngine, SamplingParams
    from pagedserve.engine.sampling_params import RequestOutputKind

    max_tokens = output_tokens + steps + 8
    blocks_per_seq = -(-(PROMPT_TOKENS + max_tokens) // 16)
    eng = LLMEngine(model_dir, device="cpu", dtype="float32", num_gpu_blocks=batch * blocks_per_seq + 8,
                    max_num_seqs=batch, swap_space_gb=0.01, max_num_batched_tokens=max(2048, batch * PROMPT_TOKENS))
    zero_cost_model(eng.runner, token)
    zero_cost_greedy_pass(eng, token)
    biased, allowed = SHAPINGS[shaping]
    others = [t for t in range(eng.vocab_size) if t != token]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                            output_kind=RequestOutputKind[kind],
                            logit_bias={t: -1.0 for t in others[:biased]} or None,
                            allowed_token_ids=[token, *others[:allowed - 1]] if allowed else None)
    for i in range(batch):
        eng.add_request(str(i), [100 + (i + j) % 150 for j in range(PROMPT_TOKENS)], params)
    seqs = [eng.requests[str(i)].seqs[0] for i in range(batch)]
    while min(s.num_output_tokens for s in seqs) < output_tokens:
        eng.step()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    seconds = time.perf_counter() - start
    pure = all(s.num_output_tokens >= output_tokens + steps - 1 for s in seqs)  # none preempted or ended
    pure &= all(s.token_ids[-1] == token for s in seqs)  # the kept greedy pass decoded what the logits say
    return {"us_per_seq": seconds / steps / batch * 1e6, "pure_decode": pure}


def run_once(job: dict) -> dict:
    """:func:`measure` in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "pagedserve.bench.host_work", json.dumps(job)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, preexec_fn=die_with_parent)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"a host-work run failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def host_work_command(
    batch: Annotated[int, typer.Option(help="Sequences decoding together.")] = 256,
    output_tokens: Annotated[str, typer.Option(
        help="Output lengths at which the steps are timed, comma-separated.")] = "40,1000",
    kinds: Annotated[str, typer.Option(help=f"Output kinds, comma-separated ({', '.join(KINDS)}).")] = ",".join(KINDS),
    tokens: Annotated[str, typer.Option(help=f"Greedy tokens: {', '.join(TOKENS)}.")] = ",".join(TOKENS),
    logprobs: Annotated[int, typer.Option(help="Top logprobs per token (-1: none).")] = -1,
    shaping: Annotated[str, typer.Option(
        help=f"Token shaping, comma-separated ({', '.join(SHAPINGS)}): logit_bias of 300 entries, 1,000 "
             "allowed_token_ids, both.")] = "none",
    rounds: Annotated[int, typer.Option(help="Alternating rounds (each contender once per round).")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads in each run.")] = 1,
    out: Annotated[str, typer.Option(help="Where to write the JSON results.")] = ".bench/host_work.json",
) -> None:
    """The engine's own work per sequence per decode step (zero-cost model, CPU): by output kind and length (see docs/benchmarks.md)."""  # noqa: E501
    check_min("--batch", batch, 1)
    longest = BENCH_MODELS["26m"][0]["max_position_embeddings"] - PROMPT_TOKENS - TIMED_STEPS - 8
    lengths = parse_ints(output_tokens, option="--output-tokens")
    if max(lengths) > longest:
        usage_error(f"--output-tokens {max(lengths)} is more than the bench model's context leaves ({longest})")
    kind_list = check_choices("--kinds", kinds, KINDS)
    token_list = check_choices("--tokens", tokens, TOKENS)
    shaping_list = check_choices("--shaping", shaping, SHAPINGS)
    check_min("--logprobs", logprobs, -1, " (-1: none)")
    from pagedserve.engine.sampling_params import LIMITS

    if logprobs > (most := LIMITS["logprobs"][1]):  # refused here, not by SamplingParams inside the first run
        usage_error(f"--logprobs must be at most {most:g} (the engine's limit), got {logprobs}")
    check_min("--rounds", rounds, 1)
    check_min("--threads", threads, 1)
    out = check_out("--out", out)
    from pagedserve.bench.common import bench_console
    from rich.table import Table

    console = bench_console()
    model_dir = bench_model_dir(size="26m")
    runs: dict[tuple, list[float]] = {}
    pure = True
    for round_ in range(rounds):
        for length in lengths:
            for token in token_list:
                for shaped in shaping_list if round_ % 2 == 0 else shaping_list[::-1]:
                    for kind in kind_list if round_ % 2 == 0 else kind_list[::-1]:
                        job = {"model_dir": model_dir, "batch": batch, "output_tokens": length, "kind": kind,
                               "token": TOKENS[token], "logprobs": None if logprobs < 0 else logprobs,
                               "threads": threads, "shaping": shaped}
                        r = run_once(job)
                        runs.setdefault((length, token, shaped, kind), []).append(r["us_per_seq"])
                        pure &= r["pure_decode"]
                        console.print(f"round {round_ + 1}: {length} tokens, {token}, {shaped}, {kind}: "
                                      f"{r['us_per_seq']:.2f} µs/seq")
    rows = [{"output_tokens": length, "token": token, "shaping": shaped, "kind": kind,
             "us_per_seq_median": statistics.median(v), "us_per_seq_runs": v}
            for (length, token, shaped, kind), v in runs.items()]
    table = Table(title=f"host work per sequence per decode step: batch {batch}, {rounds} rounds, medians (µs)")
    for col in ("output tokens", "token", "shaping", *kind_list):
        table.add_column(col, justify="right")
    for length in lengths:
        for token in token_list:
            for shaped in shaping_list:
                table.add_row(str(length), token, shaped,
                              *(f"{statistics.median(runs[(length, token, shaped, k)]):.2f}" for k in kind_list))
    console.print(table)
    if not pure:
        console.print("* a timed step did not decode every sequence (preemption or an ending)")
    write_json(out, {"batch": batch, "rounds": rounds, "threads": threads, "logprobs": job["logprobs"],
                     "prompt_tokens": PROMPT_TOKENS, "timed_steps": TIMED_STEPS, "pure_decode": pure, "rows": rows},
               console)


if __name__ == "__main__":  # one measurement, for run_once: a JSON job in, a JSON line out
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(job.pop("threads"))
    print(json.dumps(measure(**job)))
