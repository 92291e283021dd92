"""``pagedserve bench offline --tensor-parallel-size N``: the same workload at one rank and at N ranks, the
throughput ratio, and the driver's communication per step (the step broadcast alone, and every collective:
broadcast, all-reduces and the logits gather), from the host's clock on rank 0.

On one CPU machine the ranks share its cores and its memory bandwidth, so the ratio says what the sharding
costs, not what N GPUs would gain; it is the per-step overhead that carries over.
"""

from __future__ import annotations

from pagedserve.bench.common import Workload, drive
from pagedserve.engine.sampling_params import SamplingParams


def _run(model_dir: str, w: Workload, device: str, dtype: str, size: int) -> dict:
    from pagedserve.engine import LLM

    llm = LLM(model=model_dir, device=device, dtype=dtype, tensor_parallel_size=size)
    try:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))  # warm-up
        runner = llm.engine.runner
        steps0 = llm.stats()["num_steps"]
        comm0 = runner.comm_seconds if size > 1 else 0.0
        send0 = runner.channel.seconds if size > 1 else 0.0
        result = drive(llm.engine, w.prompts, w.params, kv_stats=False)
        steps = llm.stats()["num_steps"] - steps0
        out = {"wall_s": result["wall_s"], "output_tokens": result["output_tokens"], "num_steps": steps,
               "step_ms": 1e3 * result["wall_s"] / max(1, steps), "outputs": result["outputs"]}
        if size > 1:
            out["comm_ms_per_step"] = 1e3 * (runner.comm_seconds - comm0) / max(1, steps)
            out["step_send_ms_per_step"] = 1e3 * (runner.channel.seconds - send0) / max(1, steps)
        return out
    finally:
        llm.close()


def tensor_parallel_section(model_dir: str, w: Workload, device: str, dtype: str, size: int) -> dict:
    one, many = _run(model_dir, w, device, dtype, 1), _run(model_dir, w, device, dtype, size)
    same = one.pop("outputs") == many.pop("outputs")
    return {"tensor_parallel_size": size, "tp1": one, f"tp{size}": many, "same_outputs": same,
            "throughput_ratio": (many["output_tokens"] / many["wall_s"]) / (one["output_tokens"] / one["wall_s"])}


def print_tensor_parallel(console, r: dict) -> None:
    size = r["tensor_parallel_size"]
    one, many = r["tp1"], r[f"tp{size}"]
    console.print(
        f"tensor parallel: TP={size} {many['output_tokens'] / many['wall_s']:.1f} tok/s vs TP=1 "
        f"{one['output_tokens'] / one['wall_s']:.1f} tok/s ({r['throughput_ratio']:.2f}x); step "
        f"{many['step_ms']:.2f} ms vs {one['step_ms']:.2f} ms; communication {many['comm_ms_per_step']:.2f} ms "
        f"per step (of which the step broadcast {many['step_send_ms_per_step']:.3f} ms); same outputs: "
        f"{r['same_outputs']}")
