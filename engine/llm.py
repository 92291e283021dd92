"""Offline API: ``LLM(model=...).generate(prompts, params)`` (the contract's section 1)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.sampling_params import SamplingParams


class LLM:
    """Batch generation over the step engine: all prompts are queued, then steps run until every one is done."""

    def __init__(self, model: str | None = None, block_size: int = 16, num_gpu_blocks: int | None = None,
                 swap_space_gb: float = 4.0, preemption_mode: str = "auto", enable_prefix_caching: bool = True,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
                 device: str = "auto", dtype: str = "auto", seed: int = 0, **kwargs) -> None:
        self.engine = LLMEngine(
            model, block_size=block_size, num_gpu_blocks=num_gpu_blocks, swap_space_gb=swap_space_gb,
            preemption_mode=preemption_mode, enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, device=device, dtype=dtype,
            seed=seed, **kwargs)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 show_progress: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in the prompts' order.

        Every prompt and parameter set is validated before any work starts.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"offline-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, show_progress)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        progress = None
        if show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            task = progress.add_task("generate", total=len(ids))
            progress.start()
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        if progress:
                            progress.advance(task)
        finally:
            if progress:
                progress.stop()
        return [finals[i] for i in ids]

    def stats(self) -> dict:
        return self.engine.stats()
