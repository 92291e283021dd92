"""The step-level engine: add requests, run steps, get outputs. ``LLM`` (pagedserve.engine.llm) drives it offline; the
service drives it from Redis. It knows nothing of either.

Over 400 lines on purpose: ``step()`` is where every request's failure is caught and kept its own (sampling, beam
scoring, structured-output masks, detokenization, stop checks); the pieces it calls live in their own modules
(scheduler, sampler, beam_search, structured, outputs), and what remains is the one place that orders them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, cast

import torch
from transformers import PreTrainedTokenizerBase

from pagedserve.engine.beam_search import BeamState
from pagedserve.engine.block_manager import BlockManager, salted_root
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.cpu_threads import guard_forks
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.errors import EngineDeadError, NothingToDraw, PromptTooLongError
from pagedserve.engine.loader import load_config, read_generation_eos
from pagedserve.engine.model_source import resolve_model
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.outputs import RequestOutput, build_output, error_output
from pagedserve.engine.prompt_inputs import one_prompt
from pagedserve.engine.device_copy import upload
from pagedserve.engine.sampler import (Drawn, LogitShaping, SampleResult, Sampler, apply_penalties, bad_words_token_ids,
                                      hold_tokens)
from pagedserve.engine.sampling_params import SamplingParams, check_cache_salt, check_unicode, short_repr
from pagedserve.engine.scheduler import PreemptionCost, Scheduler
from pagedserve.engine.sequence import Request, ResumeSample, Sequence
from pagedserve.engine.structured import StructuredOutputs, apply_token_bitmask, default_backend, withhold
from pagedserve.engine.structured_spec import GrammarFailed
from pagedserve.engine.tokenizer import load_tokenizer, longest_token_chars
from pagedserve.kernels import get_ops

MAX_REQUEST_ID_LEN = 256
MAX_ERROR_LEN = 300
# A request's own failures that are documented outcomes, not faults (a grammar that cannot be followed further):
# its end is logged as one warning line (``_fail``), without a traceback. Anything else keeps its traceback.
EXPECTED_FAILURES = (GrammarFailed, NothingToDraw)
log = logging.getLogger(__name__)
STEP_FAILED = ("an engine step failed while this request's KV cache was being moved (swap or copy-on-write): its "
               "cache can no longer be trusted; send the request again")


class EngineStats(TypedDict):
    """What ``LLMEngine.stats()`` (and ``LLM.stats()``) returns: the README's keys, each always present. Counts are
    ints, shares and seconds floats."""

    num_gpu_blocks: int
    num_free_gpu_blocks: int
    peak_used_gpu_blocks: int
    num_cpu_blocks: int
    num_free_cpu_blocks: int
    num_preemptions: int
    num_swap_preemptions: int
    num_recompute_preemptions: int
    num_swapped_recomputed: int
    num_swapped_out_blocks: int
    prefix_cache_hit_tokens: int
    num_running: int
    num_waiting: int
    num_steps: int
    tensor_parallel_size: int
    tensor_parallel_comm_seconds: float
    block_size: int
    kv_cache_usage: float
    kv_utilization: float
    num_running_seqs: int
    # StructuredOutputs.stats(): one structured_requests_<kind> per kind of structured_spec.KINDS
    structured_compiles: int
    structured_compile_cache_hits: int
    structured_cache_entries: int
    structured_cache_bytes: int
    structured_cache_budget_bytes: int
    structured_compile_seconds_total: float
    structured_mask_seconds_total: float
    structured_mask_rows: int
    structured_requests_json: int
    structured_requests_json_object: int
    structured_requests_regex: int
    structured_requests_choice: int
    structured_requests_grammar: int


@dataclasses.dataclass
class DrawnStep:
    """A step's sampled tokens not yet read: ``tokens`` on the device (row ``Sequence.pending_row`` is that
    sequence's), and what was drawn for each (request, sequence) pair, in parts of one batch or one request."""

    tokens: torch.Tensor
    parts: list[tuple[list[tuple[Request, Sequence]], Drawn]]


def _one_line(text: str) -> str:
    """An error message on one line, cut to ``MAX_ERROR_LEN`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_LEN else text[:MAX_ERROR_LEN - 3] + "..."


# The requests that failed in a step: (request, one-line message, whether its own parameters failed), by id.
Failures = dict[str, tuple[Request, str, bool]]


def _note_failure(req: Request, failed: Failures, stage: str, exc: Exception) -> None:
    """Mark ``req`` failed at ``stage`` by ``exc``: it ends alone at the end of the step (``LLMEngine._guard``)."""
    expected = isinstance(exc, EXPECTED_FAILURES)
    if not expected:  # an expected one is logged once, by _fail, as a line naming the request and why
        log.exception("request %s: %s failed; ending this request alone", req.request_id, stage,
                      extra={"request_id": req.request_id})
    # A request whose own parameters failed (its message names the field) is told so as it is.
    why = str(exc) if expected else f"{stage} failed: {type(exc).__name__}: {exc}"
    failed[req.request_id] = (req, _one_line(why), expected)


def _wall_time(value, name: str) -> float | None:
    """``value`` as seconds on ``time.time()``'s clock (a ``deadline`` or an ``arrival_time``), checked: a string
    or a nan let in was compared at every step, and the whole batch failed there."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be None or a finite number of seconds on time.time()'s clock (unix time), got "
                         f"{short_repr(value)}")
    return float(value)


def no_lora(method: str, lora_request: object) -> None:
    """vLLM's ``lora_request=``: None (its default, which scripts pass along) is taken; an adapter is refused."""
    if lora_request is not None:
        raise ValueError(f"{method}() lora_request: pagedserve serves the model's own weights, no LoRA adapter; "
                         "merge the adapter into the weights (peft's merge_and_unload) and load that, or pass None")


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **kwargs)
        if self.config.tensor_parallel_size > 1:
            from pagedserve.engine.tensor_parallel import exit_if_made_by_a_rank

            exit_if_made_by_a_rank()  # before anything loads: a rank ran a script without a __main__ guard
        self._closed = False
        guard_forks()  # a child forked once the model's ops ran would hang in its first one
        model_dir = resolve_model(model)  # None, a model name, an HF directory or a .gguf file
        self.model_dir = model_dir
        self.model_name = str(model_dir).rstrip("/").split("/")[-1]
        hf_config = load_config(model_dir)
        self.hf_config = hf_config
        self.max_model_len = self._resolve_max_model_len(hf_config)
        self._max_model_len_source = ""  # why max_model_len is lower than asked, for the errors that quote it
        self.max_num_batched_tokens = self.config.max_num_batched_tokens or max(2048, self.config.max_num_seqs)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(model_dir)
        self.max_token_chars = longest_token_chars(self.tokenizer)
        self.vocab_size: int = hf_config.vocab_size
        if len(self.tokenizer) > self.vocab_size:
            log.warning("the tokenizer has %d tokens, more than the model's vocabulary of %d (config.json vocab_size): "
                        "a prompt that uses the tokens beyond it is refused", len(self.tokenizer), self.vocab_size)
        # generation_config.json's EOS ids, as transformers' generate takes them (config.json's only without that
        # file), and the tokenizer's, as vLLM adds it: config.json's id beside a generation config that lists
        # others, or none, ended outputs transformers runs on.
        generation_eos = read_generation_eos(model_dir)
        eos = set(generation_eos or ())
        for source in ((getattr(hf_config, "eos_token_id", None) if generation_eos is None else None),
                       self.tokenizer.eos_token_id):
            if source is not None:
                eos.update([source] if isinstance(source, int) else source)
        self.eos_token_ids = eos
        self.special_ids = set(self.tokenizer.all_special_ids)

        self.seed = self.config.seed if self.config.seed is not None else secrets.randbits(63)
        torch.manual_seed(self.seed)
        if self.config.tensor_parallel_size > 1:
            from pagedserve.engine.parallel_layers import check_divisible
            from pagedserve.engine.tensor_parallel import TensorParallelRunner

            check_divisible(hf_config, self.config.tensor_parallel_size)  # refused before any process starts
            self.runner = TensorParallelRunner(self.config, model_dir, hf_config, self.max_model_len,
                                               self.max_num_batched_tokens)
        else:
            self.runner = ModelRunner(self.config, model_dir, hf_config, self.max_model_len,
                                      self.max_num_batched_tokens)
        self.block_manager = BlockManager(self.runner.num_gpu_blocks, self.runner.num_cpu_blocks,
                                          self.config.block_size, self.config.enable_prefix_caching,
                                          self.config.share_blocks)
        on_gpu = self.runner.device.type == "cuda"
        cost = PreemptionCost(
            flops_per_token=2.0 * self.runner.num_params,
            flops_per_s=2e14 if on_gpu else 1e11,
            block_bytes=self.runner.block_bytes,
            swap_bytes_per_s=2e10 if on_gpu else 5e9,
        )
        try:
            self._fit_max_model_len()
        except ValueError:
            self.runner.close()  # tensor-parallel ranks must not outlive an engine that failed to start
            raise
        if self.config.preemption_mode == "swap" and self.block_manager.cpu.num_blocks == 0:
            log.warning("preemption_mode swap with no CPU swap pool (swap_space_gb 0): every preemption "
                        "recomputes; give swap_space_gb room to swap")
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.max_num_batched_tokens,
                                   self.config.preemption_mode, cost)
        self.sampler = Sampler(self.seed, get_ops(self.runner.device).argmax_logsumexp)
        self._shape_beams = LogitShaping()  # its own: each call keeps only the params it was given
        auto = self.config.tensor_parallel_size == 1 and self.runner.device.type == "cuda"
        self.async_scheduling = self.config.async_scheduling if self.config.async_scheduling is not None else auto
        # Grammars compile on their own threads; the backend (a tokenizer wrap) is built for the first one. The
        # factory holds what it needs, not the engine: a cycle through it would keep a dropped engine's KV pool
        # until the garbage collector happens by.
        self.structured = StructuredOutputs(
            functools.partial(default_backend, self.tokenizer, self.vocab_size, self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self._owner: dict[int, Request] = {}  # seq_id -> request, for every live sequence
        # Requests in the engine with min_tokens (the per-step masking pass runs only while there is one), with
        # several samples (a prompt's last step forks them) and with a deadline (each step looks for those past
        # it): every step's check for them costs nothing while there are none (``_count``).
        self._holding_stops = 0
        self._multi_sample = 0
        self._with_deadline = 0
        self._ready: list[RequestOutput] = []  # resumed requests that had already ended: out at the next step
        self._in_flight: DrawnStep | None = None  # the last step's tokens, read during this one (async_scheduling)
        self._untrusted: list[Request] = []  # in a step that failed while moving blocks: ended at the next step
        self.num_steps = 0
        # Requests moved on by a token, summed over steps: beams and best_of's unshown samples too, whose outputs
        # wait for their end (a caller judging progress by outputs alone would see none for their whole run).
        self.num_advanced = 0

    def _resolve_max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        why = f"max_position_embeddings {limit}"
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) is not False and window < limit:
            # Sliding-window attention is not implemented; cap the context where full attention is exact.
            limit, why = window, (f"its sliding_window {window}: the engine attends over whole contexts, which "
                                  f"equals the window's attention up to that length only")
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len {wanted} exceeds the model's limit {limit} ({why})")
        return wanted or limit

    def _fit_max_model_len(self) -> None:
        """A sequence must fit the device pool on its own, or it could never finish: an explicit ``max_model_len``
        beyond the pool is an error, a derived one is lowered to it."""
        capacity = self.block_manager.gpu.num_blocks * self.config.block_size
        if capacity < 2:  # else an engine that refuses every request would start (and a worker read ready)
            raise ValueError(
                f"num_gpu_blocks {self.block_manager.gpu.num_blocks} x block_size {self.config.block_size} holds "
                f"{capacity} token, fewer than the 2 a request needs (a prompt token and one to generate): give the "
                "pool more blocks (num_gpu_blocks, gpu_memory_utilization) or a larger block_size")
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
        self._max_model_len_source = (f" (the KV pool's capacity: num_gpu_blocks {self.block_manager.gpu.num_blocks} "
                                      f"x block_size {self.config.block_size})")

    # ------------------------------------------------------------------ requests
    @property
    def max_seqs_per_request(self) -> tuple[int, str]:
        """The most sequences one request may run, and the setting that bounds it. A request's forked sequences
        (samples, beams) step together, a token each: they need as many sequence slots (``max_num_seqs``) and as
        many tokens of one step's budget (``max_num_batched_tokens``); a wider group would never step again."""
        if self.max_num_batched_tokens < self.config.max_num_seqs:
            return self.max_num_batched_tokens, "max_num_batched_tokens"
        return self.config.max_num_seqs, "max_num_seqs"

    def add_request(self, request_id: str, prompt: str | list[int] | tuple[int, ...] | Mapping[str, Any],
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    lora_request: object = None, *, priority: int = 0, deadline: float | None = None,
                    resume: list[ResumeSample] | None = None, cache_salt: str | None = None) -> None:
        """Validate and queue a request. Raises ``ValueError`` naming the field; nothing is queued on error.

        ``prompt``: text, token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}`` dict (which may
        carry the ``cache_salt``). ``resume``: one :class:`ResumeSample` per sample, what an interrupted run of this
        request had handed out; generation continues after it (``_resume``). ``cache_salt`` (vLLM's): the request's
        prompt shares cached blocks only with requests of the same salt (one per tenant keeps tenants' prefixes
        apart). ``arrival_time`` and ``lora_request`` (which must be None: no adapters are served) take vLLM's
        places, so its positional calls run unchanged."""
        self._check_open()
        no_lora("add_request", lora_request)
        if isinstance(prompt, Mapping):
            if cache_salt is not None and prompt.get("cache_salt") is not None:
                raise ValueError("cache_salt is given twice: as an argument and in the prompt dict; give one")
            if prompt.get("cache_salt") is not None:  # {"cache_salt": None} is no salt of its own: the argument's holds
                cache_salt = prompt["cache_salt"]
            prompt = one_prompt(prompt, "prompt")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams (got {type(params).__name__}); "
                             "a dict of fields converts with SamplingParams.from_dict")
        params.validate()
        if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(f"request_id must be a non-empty string of at most {MAX_REQUEST_ID_LEN} characters")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
            raise ValueError("priority must be an integer")
        priority = int(priority)
        check_cache_salt(cache_salt)
        deadline, arrival_time = _wall_time(deadline, "deadline"), _wall_time(arrival_time, "arrival_time")
        limit, setting = self.max_seqs_per_request
        if params.num_samples > limit:
            raise ValueError(f"{params.num_samples_field} must be at most {setting} ({limit}): the request runs "
                             f"that many sequences at once, a token each per step (got {params.num_samples})")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            check_unicode(prompt, "prompt")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
            if not token_ids:
                raise ValueError("prompt encodes to no tokens")
            self.check_in_vocab(token_ids, "prompt encodes to")
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, list(prompt)
            if not token_ids:
                raise ValueError("prompt_token_ids must not be empty")
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"prompt_token_ids contains {short_repr(t)}, not a token id in "
                                     f"[0, {self.vocab_size})")
            token_ids = [int(t) for t in token_ids]  # numpy's integers too, as LLM.generate takes them
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if len(token_ids) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens; max_model_len {self.max_model_len}{self._max_model_len_source} "
                f"leaves room for {self.max_model_len - 1} prompt tokens")
        if params.max_tokens is None:  # the rest of the context, for this prompt (the caller's object may be shared)
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(token_ids))
        if len(token_ids) + params.max_tokens > self.max_model_len:
            room = self.max_model_len - len(token_ids)
            raise ValueError(
                f"max_tokens {params.max_tokens} is more than the {room} token{'s' * (room != 1)} that "
                f"max_model_len {self.max_model_len}{self._max_model_len_source} leaves after the "
                f"{len(token_ids)}-token prompt")
        if params.beam_width > 0 and params.max_tokens > 1:
            # The beams step in lockstep (they never take turns, as samples do): the step after the prompt's (which
            # draws the first tokens: all a max_tokens of 1 asks for) needs the beams forked. A pool smaller than
            # that ended the group after one token with "length", which read as a real length stop.
            blocks = self.block_manager.gpu.num_blocks
            need = self.block_manager.blocks_for_forks(len(token_ids), params.beam_width)
            if need > blocks:
                raise ValueError(f"beam_width {params.beam_width} needs at least {need} KV blocks for its second "
                                 f"token after this {len(token_ids)}-token prompt (one per beam beside the prompt's "
                                 f"shared ones); the KV pool has {blocks} (num_gpu_blocks): give a smaller beam_width")
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = sorted({t for t in ids if t >= self.vocab_size})
            if outside:
                more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
                raise ValueError(f"{name} holds token id {outside[0]}{more}, outside the vocabulary of "
                                 f"{self.vocab_size}")
        if params.bad_words is not None:  # encoded here, once, not in a step every request waits for
            each = bad_words_token_ids(
                params.bad_words, lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"])
            outside = next((word for word, ways in zip(params.bad_words, each)
                            if any(t >= self.vocab_size for ids in ways for t in ids)), None)
            if outside is not None:
                raise ValueError(f"bad_words has {outside!r}, whose tokens are outside the model's vocabulary of "
                                 f"{self.vocab_size}")
            params._bad_words_token_ids = [ids for ways in each for ids in ways]  # type: ignore[misc]
            banned = {ids[0] for ids in params._bad_words_token_ids if len(ids) == 1}
            if params.allowed_token_ids is not None and set(params.allowed_token_ids) <= banned:
                raise ValueError("allowed_token_ids are all bad_words (words of one token): no token could be drawn")
        else:  # a params object reused without them: none of an earlier request's
            params._bad_words_token_ids = None  # type: ignore[misc]
        if params.min_tokens:
            held = {t for t in self._stops_held(params, None) if t < self.vocab_size}
            if params.allowed_token_ids is not None and set(params.allowed_token_ids) <= held:
                raise ValueError(f"allowed_token_ids are all stop tokens or EOS, held back while min_tokens "
                                 f"{params.min_tokens} is not reached: no token could be drawn")
            if len(held) >= self.vocab_size:
                raise ValueError(f"stop_token_ids with EOS hold back all {self.vocab_size} tokens of the vocabulary "
                                 f"while min_tokens {params.min_tokens} is not reached: no token could be drawn")
        if resume is not None:
            self._check_resume(resume, params, len(token_ids))
        # Compiles the grammar unless it is cached (waiting at most the compile timeout): call
        # structured_ready() first to keep a loop from waiting.
        matcher = self.structured.new_matcher(params.structured_outputs) if params.structured_outputs else None
        req = Request(request_id, text, token_ids, params, priority, deadline, arrival_time)
        req.seqs[0].matcher = matcher
        req.seqs[0].cache_root = salted_root(cache_salt)
        if params.beam_width > 0:
            req.beam = BeamState(params.beam_width, params)
        self._init_seq(req, req.seqs[0])
        if resume is not None:
            self._resume(req, resume)  # may still refuse the request: nothing refers to it before this returns
        for seq in req.seqs:
            self._owner[seq.seq_id] = req
        if self._ready:  # an ending kept for the next step belongs to an earlier request of this id, gone now
            self._ready = [out for out in self._ready if out.request_id != request_id]
        self.requests[request_id] = req
        self._count(req, 1)
        if all(s.finished for s in req.seqs):  # resumed after its last token: only its ending is left to hand out
            self._ready.append(self._finish(req))
            return
        self.scheduler.add(req)

    def _check_resume(self, resume: list[ResumeSample], params: SamplingParams, num_prompt_tokens: int) -> None:
        if params.beam_width > 0 or params.num_samples != params.n:
            raise ValueError("resume: beam search and best_of > n cannot resume (they hand out nothing before "
                             "the end); run them again instead")
        if not isinstance(resume, (list, tuple)) or len(resume) != params.n or \
                not all(isinstance(r, ResumeSample) for r in resume):
            raise ValueError(f"resume must be a list of {params.n} ResumeSample, one per sample")
        for i, r in enumerate(resume):
            for t in r.token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"resume[{i}].token_ids contains {short_repr(t)}, not a token id in "
                                     f"[0, {self.vocab_size})")
            if len(r.token_ids) > params.max_tokens or num_prompt_tokens + len(r.token_ids) > self.max_model_len:
                raise ValueError(f"resume[{i}].token_ids has {len(r.token_ids)} tokens, more than max_tokens "
                                 "or max_model_len allow")
            if r.logprobs is not None and (
                    not isinstance(r.logprobs, (list, tuple)) or len(r.logprobs) != len(r.token_ids)
                    or not all(isinstance(top, dict) and t in top for t, top in zip(r.token_ids, r.logprobs))):
                raise ValueError(f"resume[{i}].logprobs must hold one dict per token of resume[{i}].token_ids, each "
                                 "with that token's logprob (or be None: not kept)")

    def _resume(self, req: Request, resume: list[ResumeSample]) -> None:
        """Give each sample its already handed-out tokens, as if this engine had sampled them: they go through
        the same stop checks, detokenizer and grammar, so the request continues (or ends) exactly where the
        interrupted run was. The tokens are prefilled like a recompute preemption's. Logprobs that were not
        kept leave ``cumulative_logprob`` unknown (NaN)."""
        first = req.seqs[0]
        for i in range(1, req.params.n):  # forked now: every sample has outputs of its own to prefill
            child = first.fork(i)
            self._init_seq(req, child)
            req.seqs.append(child)
        for seq, done in zip(req.seqs, resume):
            for k, tok in enumerate(done.token_ids):
                if seq.finished:
                    raise ValueError(f"resume[{seq.index}].token_ids go on after token {k - 1}, which ended the "
                                     f"sample ({seq.finish_reason}): {len(done.token_ids) - k} more follow it")
                top = done.logprobs[k] if done.logprobs is not None else None  # one per token (_check_resume)
                chosen = top[tok] if top is not None else float("nan")
                if not self._append_token(req, seq, SampleResult(tok, chosen, dict(top) if top else {})):
                    raise ValueError(f"resume[{seq.index}].token_ids: token {k} ({tok}) is not one "
                                     "structured_outputs allows there")
            seq.num_emitted_tokens = seq.num_output_tokens
            detok = seq.detok
            if done.text is None:  # what build_output would have released after the last of these tokens
                detok.take_delta(final=seq.finished)
            else:
                if seq.finished and len(done.text) > len(detok.text):
                    detok.flush()  # the interrupted run had released the held-back end too
                if not detok.text.startswith(done.text):
                    log.warning("request %s: resumed text of sample %d differs from its tokens' text",
                                req.request_id, seq.index, extra={"request_id": req.request_id})
                detok.emitted = min(len(done.text), len(detok.text))

    def structured_ready(self, params: SamplingParams) -> bool:
        """Whether ``add_request`` with ``params`` would start without waiting for a grammar to compile (it
        starts the compile, off the step loop, if needed). Always true without ``structured_outputs``."""
        return params.structured_outputs is None or self.structured.ready(params.structured_outputs)

    def _init_seq(self, req: Request, seq: Sequence) -> None:
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.stop, self.special_ids,
                                               req.params.include_stop_str_in_output, req.prompt_token_ids,
                                               skip_special_tokens=req.params.skip_special_tokens,
                                               prompt_is_text=req.prompt is not None)
        Sampler.seed_sequence(seq, req.params, self.runner.device)

    def abort_request(self, request_id: str | Iterable[str], reason: str = "cancelled") -> RequestOutput | None:
        """End a request now (cancel / deadline): its blocks are freed before this returns, and its last output is
        returned (None for an id not running). Several ids, as vLLM takes them (a list, a tuple, a set): each is
        ended, and None is returned."""
        if not isinstance(request_id, str):
            try:
                ids = list(request_id)
            except TypeError:
                raise TypeError(f"request_id must be a str or an iterable of str (got {type(request_id).__name__})"
                                ) from None
            if not all(isinstance(i, str) for i in ids):
                raise TypeError("request_id: every id of the iterable must be a str")
            for one in ids:
                self.abort_request(one, reason)
            return None
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = reason
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = reason
        return self._finish(req)

    def close(self) -> None:
        """Release what outlives the object: the grammar compile threads and the tensor-parallel rank processes.
        A closed engine is done: ``add_request`` and ``step`` raise ``EngineDeadError`` (a single-process one ran
        on without its compile threads, and a structured request failed with the executor's bare RuntimeError)."""
        self._closed = True
        self.structured.close()
        self.runner.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: the engine takes no request and runs no step any more."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineDeadError("this LLMEngine was closed (close()): make a new one")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._ready)

    def check_in_vocab(self, token_ids: list[int], what: str) -> None:
        """Refuse token ids the tokenizer wrote beyond the model's embedding (a tokenizer with more tokens than
        config.json's ``vocab_size``): the embedding lookup would fail the whole step, or, sharded under tensor
        parallelism, read zeros for them."""
        top = max(token_ids)
        if top >= self.vocab_size:
            raise ValueError(f"{what} token {top}, beyond the model's vocabulary of {self.vocab_size} (config.json "
                             f"vocab_size); its tokenizer has {len(self.tokenizer)} tokens: model and tokenizer do "
                             "not match")

    def check_alive(self) -> None:
        """Raise ``EngineDeadError`` if the engine can run no further step (a tensor-parallel rank died), also
        while it has nothing to do: a service checks it when idle, so it does not wait for work to find out."""
        self.runner.check_alive()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.swapped)

    @property
    def num_free_gpu_blocks(self) -> int:
        """Free blocks of the device KV pool (O(1), unlike :meth:`stats`)."""
        return self.block_manager.num_free_gpu_blocks

    def kv_room(self, priority: int = 0) -> int:
        """How many more requests of ``priority`` the device KV pool could start, at a block each: the free blocks
        plus those held by running requests of strictly worse priority (the scheduler preempts them for it), less
        one per queued request (waiting or preempted) not worse than it, as those start first. With no request
        worse than ``priority`` it is ``num_free_gpu_blocks`` less those queued. An upper bound where blocks are
        shared. O(running requests)."""
        sch = self.scheduler
        return (self.block_manager.num_free_gpu_blocks + sch.num_blocks_worse_than(priority)
                - sch.num_queued_not_worse(priority))

    def num_unstarted_worse_than(self, priority: int = 0) -> int:
        """Waiting requests of strictly worse priority than ``priority`` that have never been scheduled: added,
        then kept waiting by work at least as good (a preempted one has run and is not counted)."""
        return sum("first_scheduled_time" not in r.metrics for r in self.scheduler.waiting_worse_than(priority))

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that ended or produced text.

        A failure attributable to one request (its sampling, beam scoring, detokenization, stop checks or output)
        ends that request alone: it is freed and returns a final output whose ``error`` says what failed, and the
        other requests of the step go on as if it had not been there. A request the scheduler can never start
        ends the same way.

        With ``async_scheduling`` a step's sampled tokens stay on the device until the next step's forward is
        queued: they are its input there, and the host reads them (stop checks, text, outputs) while the device
        runs it, so the device does not wait for that host work. Outputs then come one step later, and a
        sequence that ends on a token has computed one more, which is dropped. Without it the tokens are read
        in the step that drew them. Either way a request gets the same tokens.
        """
        self._check_open()
        now = time.time()
        outputs, self._ready = self._ready, []
        untrusted, self._untrusted = self._untrusted, []
        outputs += [self._fail(req, STEP_FAILED) for req in untrusted if self.requests.get(req.request_id) is req]
        if self._with_deadline:
            outputs += [self.abort_request(r.request_id, "deadline")
                        for r in list(self.requests.values()) if r.deadline is not None and now >= r.deadline]
        sched = self.scheduler.schedule()
        outputs.extend(self._end_at_capacity(req) for req in sched.capacity_bound)
        outputs.extend(self._fail(req, why) for req, why in sched.unschedulable)
        in_flight, self._in_flight = self._in_flight, None
        if sched.empty:
            if in_flight is not None:
                outputs += self._read_back(in_flight)
            return outputs
        self.num_steps += 1
        for item in sched.scheduled:
            item.request.metrics.setdefault("first_scheduled_time", now)
        try:
            logits, sample_seqs = self.runner.execute(sched, in_flight.tokens if in_flight is not None else None)
        except BaseException:
            self._in_flight = in_flight  # still to be read, and still the input of sequences' next tokens
            self._ready = outputs  # endings decided before the failure still reach the caller, next step
            if sched.swap_out or sched.swap_in or sched.copies:
                # Blocks were to move (swap, copy-on-write) in this step, and whether they did is unknown: the KV
                # of the requests it held cannot be trusted. A caller that goes on stepping without ending them
                # (the service and LLM.generate end them) gets an error for each, not wrong tokens.
                self._untrusted = [item.request for item in sched.scheduled] + list(sched.preempted)
            raise
        for item in sched.scheduled:
            for seq, n in item.seqs:
                seq.num_computed_tokens += n
        if in_flight is not None:
            outputs += self._read_back(in_flight)
        for item in sched.scheduled:  # after the read-back: a block its token just completed is published now
            for seq, _ in item.seqs:
                self.block_manager.register_full_blocks(seq)
        failed: Failures = {}  # ended at the end of the step
        progressed: dict[str, Request] = {}  # beam requests that took a step
        sample_rows, owners = [], []
        for row, seq in enumerate(sample_seqs):
            req = self._owner.get(seq.seq_id)
            if req is None or seq.finished:
                continue  # ended by the token just read back (or meanwhile): this row was one too many
            if req.beam is None:
                sample_rows.append(row)
                owners.append(req)
                continue
            req.pending_logits[seq.seq_id] = logits[row]
            if len(req.pending_logits) == len(req.seqs):
                if self._guard(req, failed, "beam search", self._beam_step, req):
                    progressed[req.request_id] = req
        if len(sample_rows) != len(sample_seqs):
            sample_seqs = [sample_seqs[r] for r in sample_rows]
            logits = logits[self._index(sample_rows)] if sample_rows else logits
        drawn = None
        if sample_seqs:
            rows, seqs, owners = self._expand_forks(sample_seqs, owners, failed)
            if len(rows) != len(sample_seqs):
                logits = logits[self._index(rows)]
            self._constrain(logits, seqs, owners, failed)
            drawn = self._draw(logits, seqs, owners, failed)
        self._emit_progressed(progressed, failed, outputs)
        if drawn is not None:
            if self.async_scheduling:
                for pairs, _ in drawn.parts:
                    for _, seq in pairs:
                        seq.num_pending = 1
                self._in_flight = drawn
            else:
                outputs += self._read_back(drawn)
        return outputs

    def _index(self, rows: list[int]) -> torch.Tensor:
        return upload([rows], torch.int64, self.runner.device)[0]

    def _guard(self, req: Request, failed: Failures, stage: str, fn, *args) -> bool:
        """Run ``fn(*args)`` for ``req`` unless it already failed this step; a raise marks it failed instead of
        failing the step. Returns whether it ran and succeeded."""
        if req.request_id in failed:
            return False
        try:
            fn(*args)
            return True
        except Exception as exc:
            _note_failure(req, failed, stage, exc)
            return False

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], owners: list[Request],
              failed: Failures) -> DrawnStep | None:
        """One token per row, batched, on the device; if the batch raises, each request is drawn alone so that
        only the culprit fails (greedy and seeded rows draw the same tokens either way). Each drawn sequence's
        row in the step's tokens is its ``pending_row``; with async scheduling its token stays pending
        (``Sequence.num_pending``) until :meth:`_read_back`."""
        held = self._held(seqs, owners)
        parts: list[tuple[list[tuple[Request, Sequence]], Drawn]] = []
        try:
            parts.append((list(zip(owners, seqs)), self.sampler.draw(logits, seqs, [r.params for r in owners], held)))
        except Exception:
            log.warning("batched sampling failed; sampling request by request to find the culprit")
            by_request: dict[str, list[int]] = {}
            for row, req in enumerate(owners):
                by_request.setdefault(req.request_id, []).append(row)
            for rows in by_request.values():
                req = owners[rows[0]]

                def draw_alone(rows=rows, req=req):
                    alone = self.sampler.draw(logits[self._index(rows)], [seqs[r] for r in rows],
                                              [req.params] * len(rows),
                                              [held[r] for r in rows] if held is not None else None)
                    parts.append(([(req, seqs[r]) for r in rows], alone))

                self._guard(req, failed, "sampling", draw_alone)
        if not parts:
            return None
        row = 0
        for pairs, _ in parts:
            for _, seq in pairs:
                seq.pending_row = row
                row += 1
        tokens = parts[0][1].tokens if len(parts) == 1 else torch.cat([d.tokens for _, d in parts])
        return DrawnStep(tokens, parts)

    def _read_back(self, drawn: DrawnStep) -> list[RequestOutput]:
        """A step's drawn tokens, read from the device: each is appended to its sequence (stop checks, text), and
        the requests it moved on give their outputs. A request that ended since it was drawn is passed over."""
        for pairs, _ in drawn.parts:
            for _, seq in pairs:
                seq.num_pending = 0  # its only one: this step's draw comes after this read
        failed: Failures = {}
        progressed: dict[str, Request] = {}
        requests = self.requests
        for pairs, part in drawn.parts:
            for (req, seq), res in zip(pairs, part.results()):
                rid = req.request_id
                if requests.get(rid) is not req or seq.finish_reason is not None or rid in failed:
                    continue
                try:  # _guard's work, inline: it runs for every sequence every step
                    self._append_token(req, seq, res)
                except Exception as exc:
                    _note_failure(req, failed, "stop check or detokenization", exc)
                    continue
                progressed[rid] = req
        outputs: list[RequestOutput] = []
        self._emit_progressed(progressed, failed, outputs)
        return outputs

    def _emit_progressed(self, progressed: dict[str, Request], failed: Failures,
                         outputs: list[RequestOutput]) -> None:
        """The outputs of the requests a step moved on, then the endings of those that failed in it."""
        now = time.time()
        self.num_advanced += len(progressed)
        for req in progressed.values():
            if req.request_id not in failed:
                try:  # _guard's work, inline, as in _read_back
                    self._emit(req, now, outputs)
                except Exception as exc:
                    _note_failure(req, failed, "output", exc)
        outputs.extend(self._fail(req, why, own) for req, why, own in failed.values())

    def _held(self, seqs: list[Sequence], owners: list[Request]) -> list[list[int]] | None:
        """Per row, the tokens ``min_tokens`` holds back now (applied by the sampler after the raw logprobs, as
        HF's min_new_tokens processor); None when no row holds any. A constrained row holds them on its grammar's
        mask instead (:meth:`_constrain`)."""
        if not self._holding_stops:
            return None
        held = [[] if seq.matcher is not None else self._stops_held(req.params, seq) for seq, req in zip(seqs, owners)]
        return held if any(held) else None

    def _stops_held(self, p: SamplingParams, seq: Sequence | None) -> list[int]:
        """The tokens ``min_tokens`` holds back from ``seq`` now (None: before its first token): its stop token
        ids and EOS while it is short of ``min_tokens``, else none. EOS even with ``ignore_eos``, as vLLM's
        min-tokens processor and HF's min_new_tokens hold it: ``ignore_eos`` says EOS does not end the output, not
        that it may be drawn early (its text shows where special tokens are kept)."""
        if p.min_tokens <= (seq.num_output_tokens if seq is not None else 0):
            return []
        return sorted(set(p.stop_token_ids) | self.eos_token_ids)

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence], owners: list[Request],
                   failed: Failures) -> None:
        """Structured outputs: in place, each constrained row keeps only the tokens its grammar allows next
        (filled on the CPU while a CUDA device may still run the forward, applied on the logits' device).

        ``min_tokens`` of a constrained row is applied here, on its mask, rather than by the sampler (:meth:`_held`): its
        stop tokens are held back only while the grammar allows another token, so an output at the grammar's
        end ends there (holding EOS as well would leave the row nothing to draw)."""
        rows = [r for r, s in enumerate(seqs) if s.matcher is not None and owners[r].request_id not in failed]
        if not rows:
            return

        def mask(rows: list[int]) -> None:
            bitmask = self.structured.fill_bitmask([seqs[r].matcher for r in rows])
            if self._holding_stops:
                for i, r in enumerate(rows):
                    held = self._stops_held(owners[r].params, seqs[r])
                    if held:
                        withhold(bitmask[i], held)
            apply_token_bitmask(logits, bitmask, rows)

        try:
            mask(rows)
        except Exception as exc:  # mask request by request, so that only the culprit fails
            log.log(logging.DEBUG if isinstance(exc, EXPECTED_FAILURES) else logging.WARNING,
                    "batched grammar masks failed (%s); masking request by request to find the culprit",
                    type(exc).__name__)
            for r in rows:
                self._guard(owners[r], failed, "grammar mask", mask, [r])

    def _emit(self, req: Request, now: float, outputs: list[RequestOutput]) -> None:
        """After a token: finish ``req`` if it is done, else free its finished sequences and add its delta."""
        if "first_token_time" not in req.metrics:
            req.metrics["first_token_time"] = now
        seqs = req.seqs
        if req.beam is not None:
            done = req.beam.done
        elif len(seqs) == 1:  # the common case, without all()'s generator
            done = seqs[0].finish_reason is not None
        else:
            done = all(s.finish_reason is not None for s in seqs)
        if done:
            outputs.append(self._finish(req))
            return
        if len(seqs) > 1 or req.beam is not None:  # a lone sample is finished only with its request, above
            for seq in seqs:
                if seq.finished and seq.block_table:
                    self.scheduler.free_seq(req, seq)
        out = build_output(req, False, self.tokenizer, self.eos_token_ids)
        if out is not None:
            outputs.append(out)

    def _fail(self, req: Request, error: str, own: bool = False) -> RequestOutput:
        """End ``req`` with ``error``, whatever state it was left in: every block it holds is freed. Idempotent.
        ``own``: its own parameters failed (``RequestOutput.error_from_params``)."""
        log.warning("request %s ended with an error: %s", req.request_id, error, extra={"request_id": req.request_id})
        req.pending_logits.clear()
        self._release(req)
        return error_output(req, error, own)

    def _count(self, req: Request, sign: int) -> None:
        """``req`` enters (1) or leaves (-1) the engine's counts of requests that need a per-step pass."""
        self._holding_stops += sign * bool(req.params.min_tokens)
        self._multi_sample += sign * (req.params.num_samples > 1)
        self._with_deadline += sign * (req.deadline is not None)

    def _release(self, req: Request) -> None:
        """``req`` leaves the engine: its blocks, its place in the scheduler and its sequences' owner entries."""
        self.scheduler.release(req)
        req.metrics["finished_time"] = time.time()
        if self.requests.pop(req.request_id, None) is not None:
            self._count(req, -1)
        for seq in req.seqs:
            self._owner.pop(seq.seq_id, None)

    def _expand_forks(self, sample_seqs: list[Sequence], owners: list[Request], failed: Failures,
                      ) -> tuple[list[int], list[Sequence], list[Request]]:
        """Fork each prompt that just finished prefill into its samples, which all read the prompt's logits row.

        Returns, per sequence to sample, its row in ``logits``, the sequence and its request (none for a request
        that failed).
        """
        if not failed and (not self._multi_sample or all(req.forked for req in owners)):  # all but a prompt's last
            return list(range(len(sample_seqs))), sample_seqs, owners
        rows, seqs, reqs = [], [], []
        for row, (seq, req) in enumerate(zip(sample_seqs, owners)):
            group = [seq]
            if not req.forked and not self._guard(req, failed, "fork", self._fork_samples, req, seq, group):
                continue
            if req.request_id in failed:
                continue
            rows.extend([row] * len(group))
            seqs.extend(group)
            reqs.extend([req] * len(group))
        return rows, seqs, reqs

    def _fork_samples(self, req: Request, seq: Sequence, group: list[Sequence]) -> None:
        for i in range(1, req.params.num_samples):
            child = seq.fork(i)
            self._init_seq(req, child)
            self.block_manager.fork(seq, child)
            req.seqs.append(child)  # right after its blocks, so that ending the request frees them
            self._owner[child.seq_id] = req
            group.append(child)

    def _beam_step(self, req: Request) -> None:
        """Advance a beam request once every live beam has its logits: fork the chosen beams, drop the rest.

        Everything that can fail runs before the first block changes hands, so a failure leaves the block tables
        as they were (and ending the request frees them all)."""
        p = req.params
        beams = req.seqs
        rows = torch.stack([req.pending_logits.pop(s.seq_id) for s in beams])
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        scores = logprobs
        held = [self._stops_held(p, b) for b in beams] if p.min_tokens else []
        if p.shapes_logits or any(held):  # on the log-probs, where HF's beam search applies its logits processors
            scores = logprobs.clone()
            if p.shapes_logits:
                self._shape_beams(scores, [p] * len(beams), beams)
                apply_penalties(scores, beams, [p] * len(beams))
            if any(held):
                hold_tokens(scores, held)
        entry = history = None
        if p.logprobs is not None:  # of the raw distribution, as sampling reports them
            top_vals, top_ids = logprobs.topk(p.logprobs, dim=-1) if p.logprobs else (logprobs[:, :0],) * 2
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()

            def entry(parent: int, token: int) -> dict[int, float]:
                return {**dict(zip(top_ids[parent], top_vals[parent])), token: logprobs[parent, token].item()}

            def history(parent: int, token: int) -> list[dict[int, float]]:
                return [*beams[parent].logprobs, entry(parent, token)]
        first = beams[0]
        max_len_hit = (first.num_output_tokens + 1 >= p.max_tokens or first.num_tokens + 1 >= self.max_model_len)
        chosen = req.beam.select(scores, [s.output_token_ids for s in beams], self.eos_token_ids, max_len_hit,
                                 history)
        children = []
        for i, (parent_index, token, score) in enumerate(chosen):
            child = beams[parent_index].fork(i)
            child.token_ids.append(token)
            child.cumulative_logprob = score
            if entry is not None:
                child.logprobs.append(entry(parent_index, token))
            children.append((beams[parent_index], child))
        for parent, child in children:
            self.block_manager.fork(parent, child)
            self._owner[child.seq_id] = req
        for beam in beams:
            self.block_manager.free(beam)
            self._owner.pop(beam.seq_id, None)
        req.seqs = [child for _, child in children] if not req.beam.done else beams

    def _append_token(self, req: Request, seq: Sequence, res) -> bool:
        """Add a sampled (or resumed) token and its ending, if it ends the sample; False if the sequence's grammar
        does not allow it (never for a token drawn under its mask)."""
        p = req.params
        if res.excluded:
            raise NothingToDraw(f"nothing could be drawn for output token {seq.num_output_tokens + 1}: "
                                "allowed_token_ids, bad_words, min_tokens and structured_outputs together left "
                                "every token out")
        tok = res.token_id
        token_ids = seq.token_ids
        token_ids.append(tok)
        num_output = len(token_ids) - seq.num_prompt_tokens
        seq.cumulative_logprob += res.logprob
        if p.logprobs is not None:
            seq.logprobs.append(res.top_logprobs)
        matcher = seq.matcher
        allowed = matcher.accept(tok) if matcher is not None else True
        eos = not p.ignore_eos and tok in self.eos_token_ids
        if eos or tok in p.stop_token_ids:
            # Ended by a token, as vLLM's check_stop (EOS first). Its text (none for a special token) is kept only
            # with include_stop_str_in_output, as vLLM V1's detokenizer does, and no stop string is looked for in it.
            seq.finish_reason = "stop"
            if p.include_stop_str_in_output:
                seq.detok.add(tok, check_stop=False)
        elif matcher is not None and matcher.is_terminated():  # the grammar's end, even with ignore_eos
            seq.finish_reason = "stop"
        elif seq.detok.add(tok, check_stop=num_output > p.min_tokens) is not None:
            seq.finish_reason = "stop"
        if seq.finish_reason is None and (num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        return allowed

    def _end_at_capacity(self, req: Request) -> RequestOutput:
        """End a group that has the whole device pool and still cannot take a step, as a length limit would:
        the pool is its length limit (``Scheduler`` docstring)."""
        log.warning("request %s: its %d sequences outgrew the KV pool of %d blocks; ending with finish_reason "
                    "'length'", req.request_id, req.num_unfinished_seqs, self.block_manager.gpu.num_blocks,
                    extra={"request_id": req.request_id})
        if req.beam is not None:
            req.beam.finish_at_length([s.output_token_ids for s in req.seqs],
                                      [s.logprobs if req.params.logprobs is not None else None for s in req.seqs])
        for seq in req.unfinished_seqs():
            seq.finish_reason = "length"
        return self._finish(req)

    def _finish(self, req: Request) -> RequestOutput:
        self._release(req)
        for seq in req.seqs:
            # A sequence that ended on a token ("stop" not at a stop string: there flush has nothing left) looks
            # for no stop string in its held-back end, as vLLM checks none on the step a stop token ends.
            if seq.detok.flush(check_stop=seq.finish_reason != "stop") is not None and seq.finish_reason == "length":
                seq.finish_reason = "stop"  # the held-back end completed a stop string
        return build_output(req, True, self.tokenizer, self.eos_token_ids)

    # ------------------------------------------------------------------ stats
    def _kv_utilization(self) -> tuple[float, int]:
        """Share of allocated device KV slots that hold a live token (shared blocks counted once; 1.0 when
        nothing is allocated), and the number of running sequences. Every block of a sequence but the one its
        next token goes to is full, so only that last block's fill is counted token by token."""
        bs = self.block_manager.block_size
        full: set[int] = set()
        partial: dict[int, int] = {}
        num_seqs = 0
        for req in self.scheduler.running:
            for seq in req.unfinished_seqs():
                num_seqs += 1
                num_full, rest = divmod(seq.num_computed_tokens, bs)
                table = seq.block_table
                full.update(table[:num_full])
                if rest and num_full < len(table) and rest > partial.get(table[num_full], 0):
                    partial[table[num_full]] = rest
        live = bs * len(full) + sum(n for block_id, n in partial.items() if block_id not in full)
        used = self.block_manager.num_used_gpu_blocks
        return (live / (used * bs) if used else 1.0), num_seqs

    def stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        kv_utilization, num_running_seqs = self._kv_utilization()
        # A cast: the structured keys come from StructuredOutputs.stats(), a plain dict (test_typed_api holds the
        # keys and value types to EngineStats').
        return cast(EngineStats, {
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
            "prefix_cache_hit_tokens": sch.prefix_hit_tokens,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_steps": self.num_steps,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            # host seconds rank 0 spent in collectives and step broadcasts (0 at one rank)
            "tensor_parallel_comm_seconds": getattr(self.runner, "comm_seconds", 0.0),
            "block_size": bm.block_size,
            "kv_cache_usage": bm.num_used_gpu_blocks / bm.gpu.num_blocks,
            "kv_utilization": kv_utilization,
            "num_running_seqs": num_running_seqs,
            **self.structured.stats(),
        })
