"""The step-level engine: add requests, run steps, get outputs. ``LLM`` (pagedserve.engine.llm) drives it offline; the
service drives it from Redis. It knows nothing of either.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoTokenizer

from pagedserve.engine.beam_search import BeamState
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.builtin_model import ensure_builtin_model
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.errors import PromptTooLongError
from pagedserve.engine.loader import load_config, read_generation_eos
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import PreemptionCost, Scheduler
from pagedserve.engine.sequence import Request, Sequence

MAX_REQUEST_ID_LEN = 256
log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        share_blocks = kwargs.pop("share_blocks", True)
        self.config = EngineConfig(model=model, **kwargs)
        model_dir = model or ensure_builtin_model()
        self.model_dir = model_dir
        self.model_name = str(model_dir).rstrip("/").split("/")[-1]
        hf_config = load_config(model_dir)
        self.hf_config = hf_config
        self.max_model_len = self._resolve_max_model_len(hf_config)
        self.max_num_batched_tokens = self.config.max_num_batched_tokens or max(2048, self.config.max_num_seqs)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = hf_config.vocab_size
        eos = set(read_generation_eos(model_dir))
        for source in (getattr(hf_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if source is not None:
                eos.update([source] if isinstance(source, int) else source)
        self.eos_token_ids = eos
        self.special_ids = set(self.tokenizer.all_special_ids)

        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, model_dir, hf_config, self.max_model_len, self.max_num_batched_tokens)
        self.block_manager = BlockManager(self.runner.num_gpu_blocks, self.runner.num_cpu_blocks,
                                          self.config.block_size, self.config.enable_prefix_caching, share_blocks)
        on_gpu = self.runner.device.type == "cuda"
        cost = PreemptionCost(
            flops_per_token=2.0 * self.runner.num_params,
            flops_per_s=2e14 if on_gpu else 1e11,
            block_bytes=self.runner.block_bytes,
            swap_bytes_per_s=2e10 if on_gpu else 5e9,
        )
        self._fit_max_model_len()
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.max_num_batched_tokens,
                                   self.config.preemption_mode, cost)
        self.sampler = Sampler(self.config.seed)
        self.requests: dict[str, Request] = {}
        self._owner: dict[int, Request] = {}  # seq_id -> request, for every live sequence
        self.num_steps = 0
        self.track_kv_utilization = False  # benchmarks turn it on; costs O(blocks) per step
        self._kv_util_sum = 0.0
        self._used_blocks_sum = 0

    def _resolve_max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) is not False:
            # Sliding-window attention is not implemented; cap the context where full attention is exact.
            limit = min(limit, window)
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len {wanted} exceeds the model's limit {limit}")
        return wanted or limit

    def _fit_max_model_len(self) -> None:
        """A sequence must fit the device pool on its own, or it could never finish: an explicit ``max_model_len``
        beyond the pool is an error, a derived one is lowered to it."""
        capacity = self.block_manager.gpu.num_blocks * self.config.block_size
        if self.max_model_len <= capacity:
            return
        if self.config.max_model_len is not None:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV pool's {capacity} tokens (num_gpu_blocks "
                f"{self.block_manager.gpu.num_blocks} x block_size {self.config.block_size}); lower max_model_len "
                f"or give the pool more blocks (num_gpu_blocks, gpu_memory_utilization)")
        log.warning("max_model_len lowered from %d to the KV pool's capacity of %d tokens",
                    self.max_model_len, capacity)
        self.max_model_len = capacity

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    priority: int = 0, deadline: float | None = None, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Raises ``ValueError`` naming the field; nothing is queued on error."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        params.validate()
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_LEN} characters")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError("priority must be an integer")
        if params.num_samples > self.config.max_num_seqs:
            field = "beam_width" if params.beam_width > 0 else ("best_of" if params.best_of is not None else "n")
            raise ValueError(f"{field} must be at most max_num_seqs ({self.config.max_num_seqs}): the request runs "
                             f"that many sequences at once (got {params.num_samples})")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, list(prompt)
            if not token_ids:
                raise ValueError("prompt_token_ids must not be empty")
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt_token_ids contains {t!r}, not a token id in [0, {self.vocab_size})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if len(token_ids) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; max_model_len {self.max_model_len} leaves room for "
                f"{self.max_model_len - 1} prompt tokens")
        req = Request(request_id, text, token_ids, params, priority, deadline, arrival_time)
        if params.beam_width > 0:
            req.beam = BeamState(params.beam_width, params)
        self._init_seq(req, req.seqs[0])
        self._owner[req.seqs[0].seq_id] = req
        self.requests[request_id] = req
        self.scheduler.add(req)

    def _init_seq(self, req: Request, seq: Sequence) -> None:
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.stop, self.special_ids)
        Sampler.seed_sequence(seq, req.params, self.runner.device)

    def abort_request(self, request_id: str, reason: str = "cancelled") -> RequestOutput | None:
        """End a request now (cancel / deadline): its blocks are freed before this returns."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = reason
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = reason
        return self._finish(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.swapped)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that ended or produced text this step."""
        now = time.time()
        outputs = [self.abort_request(r.request_id, "deadline")
                   for r in list(self.requests.values()) if r.deadline is not None and now >= r.deadline]
        sched = self.scheduler.schedule()
        outputs.extend(self._end_at_capacity(req) for req in sched.capacity_bound)
        if sched.empty:
            return outputs
        self.num_steps += 1
        for item in sched.scheduled:
            item.request.metrics.setdefault("first_scheduled_time", now)
        logits, sample_seqs = self.runner.execute(sched)
        for item in sched.scheduled:
            for seq, n in item.seqs:
                seq.num_computed_tokens += n
                self.block_manager.register_full_blocks(seq)
        if self.track_kv_utilization:
            self._kv_util_sum += self._kv_utilization()
            self._used_blocks_sum += self.block_manager.num_used_gpu_blocks
        progressed: dict[str, Request] = {}
        sample_rows = []
        for row, seq in enumerate(sample_seqs):
            req = self._owner[seq.seq_id]
            if req.beam is None:
                sample_rows.append(row)
                continue
            req.pending_logits[seq.seq_id] = logits[row]
            if len(req.pending_logits) == len(req.seqs):
                self._beam_step(req)
                progressed[req.request_id] = req
        if len(sample_rows) != len(sample_seqs):
            sample_seqs = [sample_seqs[r] for r in sample_rows]
            logits = logits[torch.tensor(sample_rows, dtype=torch.long, device=logits.device)] if sample_rows else logits
        if sample_seqs:
            rows, seqs = self._expand_forks(sample_seqs)
            if len(rows) != len(sample_seqs):
                logits = logits[torch.tensor(rows, device=logits.device)]
            owners = [self._owner[s.seq_id] for s in seqs]
            results = self.sampler(logits, seqs, [r.params for r in owners])
            for req, seq, res in zip(owners, seqs, results):
                self._append_token(req, seq, res)
                progressed[req.request_id] = req
        now = time.time()
        for req in progressed.values():
            req.metrics.setdefault("first_token_time", now)
            if (req.beam.done if req.beam else all(s.finished for s in req.seqs)):
                outputs.append(self._finish(req))
                continue
            for seq in req.seqs:
                if seq.finished and seq.block_table:
                    self.block_manager.free(seq)
            out = self._make_output(req, final=False)
            if out is not None:
                outputs.append(out)
        return outputs

    def _expand_forks(self, sample_seqs: list[Sequence]) -> tuple[list[int], list[Sequence]]:
        """Fork each prompt that just finished prefill into its samples, which all read the prompt's logits row.

        Returns, per sequence to sample, its row in ``logits`` and the sequence.
        """
        rows, seqs = [], []
        for row, seq in enumerate(sample_seqs):
            req = self._owner[seq.seq_id]
            group = [seq]
            if not req.forked:
                for i in range(1, req.params.num_samples):
                    child = seq.fork(i)
                    self.block_manager.fork(seq, child)
                    self._init_seq(req, child)
                    req.seqs.append(child)
                    self._owner[child.seq_id] = req
                    group.append(child)
            rows.extend([row] * len(group))
            seqs.extend(group)
        return rows, seqs

    def _beam_step(self, req: Request) -> None:
        """Advance a beam request once every live beam has its logits: fork the chosen beams, drop the rest."""
        beams = req.seqs
        rows = torch.stack([req.pending_logits.pop(s.seq_id) for s in beams])
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        first = beams[0]
        max_len_hit = (first.num_output_tokens + 1 >= req.params.max_tokens
                       or first.num_tokens + 1 >= self.max_model_len)
        chosen = req.beam.select(logprobs, [s.output_token_ids for s in beams], self.eos_token_ids, max_len_hit)
        children = []
        for i, (parent_index, token, score) in enumerate(chosen):
            parent = beams[parent_index]
            child = parent.fork(i)
            self.block_manager.fork(parent, child)
            child.token_ids.append(token)
            child.cumulative_logprob = score
            self._owner[child.seq_id] = req
            children.append(child)
        for beam in beams:
            self.block_manager.free(beam)
            self._owner.pop(beam.seq_id, None)
        req.seqs = children if not req.beam.done else beams

    def _append_token(self, req: Request, seq: Sequence, res) -> None:
        p = req.params
        tok = res.token_id
        seq.token_ids.append(tok)
        seq.cumulative_logprob += res.logprob
        if p.logprobs is not None:
            seq.logprobs.append(res.top_logprobs)
        if not p.ignore_eos and tok in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif seq.detok.add(tok) is not None:
            seq.finish_reason = "stop"
        if seq.finish_reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"

    def _end_at_capacity(self, req: Request) -> RequestOutput:
        """End a group that has the whole device pool and still cannot take a step, as a length limit would:
        the pool is its length limit (``Scheduler`` docstring)."""
        log.warning("request %s: its %d sequences outgrew the KV pool of %d blocks; ending with finish_reason "
                    "'length'", req.request_id, req.num_unfinished_seqs, self.block_manager.gpu.num_blocks)
        if req.beam is not None:
            req.beam.finish_at_length([s.output_token_ids for s in req.seqs])
        for seq in req.unfinished_seqs():
            seq.finish_reason = "length"
        return self._finish(req)

    def _finish(self, req: Request) -> RequestOutput:
        self.scheduler.release(req)
        req.metrics["finished_time"] = time.time()
        del self.requests[req.request_id]
        for seq in req.seqs:
            self._owner.pop(seq.seq_id, None)
            seq.detok.flush()
        return self._make_output(req, final=True)

    def _make_output(self, req: Request, final: bool) -> RequestOutput | None:
        p = req.params
        if req.beam is not None:
            return self._beam_output(req) if final else None
        hidden = p.best_of is not None and p.best_of > p.n
        if hidden and not final:
            return None  # best_of > n: which samples are returned is known only at the end
        seqs = req.seqs
        if hidden:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:p.n]
        completions = []
        for rank, seq in enumerate(seqs):
            delta_text = seq.detok.take_delta(final=final or seq.finished)
            emitted = seq.num_prompt_tokens + seq.num_emitted_tokens
            seq.num_emitted_tokens = seq.num_output_tokens
            completions.append(CompletionOutput(
                index=rank if hidden else seq.index,
                text=seq.detok.text[:seq.detok.emitted],
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if p.logprobs is not None else None,
                delta_text=delta_text,
                delta_token_ids=seq.token_ids[emitted:],
            ))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, final,
                             req.num_cached_tokens, dict(req.metrics))

    def _beam_output(self, req: Request) -> RequestOutput:
        """The ``n`` best finished hypotheses; a search cut short (cancel, deadline) returns its live beams."""
        hyps = req.beam.best(req.params.n)
        reason = req.finish_reason
        completions = []
        if reason is None:
            for rank, h in enumerate(hyps):
                text = self.tokenizer.decode(h.token_ids, skip_special_tokens=True)
                completions.append(CompletionOutput(rank, text, h.token_ids, "stop" if h.hit_eos else "length",
                                                    h.logprob, delta_text=text, delta_token_ids=h.token_ids))
        else:
            for rank, seq in enumerate(req.seqs[:req.params.n]):
                ids = seq.output_token_ids
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(CompletionOutput(rank, text, ids, reason, seq.cumulative_logprob,
                                                    delta_text=text, delta_token_ids=ids))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions, True,
                             req.num_cached_tokens, dict(req.metrics))

    # ------------------------------------------------------------------ stats
    def _kv_utilization(self) -> float:
        """Share of allocated device KV slots that hold a live token (shared blocks counted once)."""
        bs = self.block_manager.block_size
        filled: dict[int, int] = {}
        for req in self.scheduler.running:
            for seq in req.unfinished_seqs():
                for i, block_id in enumerate(seq.block_table):
                    n = min(bs, seq.num_computed_tokens - i * bs)
                    if n > filled.get(block_id, 0):
                        filled[block_id] = n
        used = self.block_manager.num_used_gpu_blocks
        return sum(filled.values()) / (used * bs) if used else 1.0

    def stats(self) -> dict:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_gpu_blocks": bm.gpu.num_blocks,
            "num_free_gpu_blocks": bm.num_free_gpu_blocks,
            "peak_used_gpu_blocks": bm.peak_used,
            "num_cpu_blocks": bm.cpu.num_blocks,
            "num_free_cpu_blocks": bm.cpu.num_free,
            "num_preemptions": sch.num_preemptions,
            "num_swap_preemptions": sch.num_swapped,
            "num_recompute_preemptions": sch.num_recomputed,
            "num_swapped_recomputed": sch.num_swapped_recomputed,
            "num_swapped_out_blocks": bm.num_swapped_out_blocks,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_steps": self.num_steps,
            "block_size": bm.block_size,
            "kv_cache_usage": bm.num_used_gpu_blocks / bm.gpu.num_blocks,
            "mean_kv_utilization": (self._kv_util_sum / self.num_steps) if self.num_steps else 0.0,
            "mean_used_gpu_blocks": (self._used_blocks_sum / self.num_steps) if self.num_steps else 0.0,
        }
