"""Offline API: ``LLM(model=...).generate(prompts, params)`` and ``.chat(messages, params)`` (the contract's section 1)."""

from __future__ import annotations

import json
import numbers
import threading
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, Union, cast

from pagedserve.engine.chat_content import as_parts, content_format
from pagedserve.engine.errors import EngineDeadError
from pagedserve.engine.llm_engine import EngineStats, LLMEngine, no_lora
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.prompt_inputs import is_token_ids, one_prompt
from pagedserve.engine.sampling_params import SamplingParams, check_unicode, final_only, same_as_one_of

if TYPE_CHECKING:  # loaded with the engine (llm_engine imports it after torch, whose absence is said first)
    from transformers import PreTrainedTokenizerBase

# One prompt as vLLM's LLM.generate takes it: text, token ids, or a dict ({"prompt": ...} or
# {"prompt_token_ids": ...}, with "cache_salt").
Prompt = Union[str, list[int], Mapping[str, Any]]


def _prompt_list(prompts) -> tuple[list, list[str | None]]:
    """``generate``'s prompts as a list of engine prompts, and each one's ``cache_salt`` (a vLLM prompt dict's, else
    None): one prompt (text, token ids, a vLLM prompt dict) or a list of them."""
    if isinstance(prompts, (str, Mapping)) or is_token_ids(prompts):
        prompts = [prompts]
    if isinstance(prompts, bytes) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a string, a list of token ids, a {{'prompt': ...}} or "
                         f"{{'prompt_token_ids': ...}} dict, or a list of those (got {type(prompts).__name__})")
    prompts = list(prompts)
    salts = [p.get("cache_salt") if isinstance(p, Mapping) else None for p in prompts]
    return [one_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)], salts


def _progress(method: str, show_progress: bool | None, use_tqdm) -> bool:
    """``show_progress``, or vLLM's name for it, ``use_tqdm`` (a bool, or a tqdm factory: shown as pagedserve's own
    progress bar). Both at once is a mistake, refused by name rather than one silently winning."""
    if show_progress is not None and use_tqdm is not None:
        raise TypeError(f"{method}() got both show_progress and use_tqdm (vLLM's name for show_progress): pass "
                        "one of them")
    return bool(use_tqdm if use_tqdm is not None else show_progress)


def _priorities(priority, num_prompts: int) -> list[int]:
    """vLLM's ``priority=``: one integer per prompt (lower runs first), checked before anything is queued."""
    if priority is None:
        return [0] * num_prompts
    if isinstance(priority, (str, bytes, Mapping)) or not isinstance(priority, Iterable):
        raise ValueError(f"priority must be a list of integers, one per prompt (got {type(priority).__name__})")
    priority = list(priority)
    if len(priority) != num_prompts:
        raise ValueError(f"priority has {len(priority)} entries for {num_prompts} prompts")
    for i, p in enumerate(priority):
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise ValueError(f"priority[{i}] must be an integer (got {p!r})")
    return [int(p) for p in priority]


# apply_chat_template's own arguments: a template variable of the same name would change how it renders or
# tokenizes, not reach the template.
_RENDER_ARGUMENTS = ("conversation", "messages", "chat_template", "tokenize", "add_generation_prompt",
                     "continue_final_message", "tools", "documents", "return_dict", "return_tensors", "padding",
                     "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask")


def _template_variables(tools: object, chat_template_kwargs: object) -> dict[str, Any]:
    """The extra variables of the chat template: ``tools`` and ``chat_template_kwargs``, checked."""
    extra: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, Seq) or isinstance(tools, (str, bytes)) or not all(
                isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of dicts (function schemas, as OpenAI's tools)")
        extra["tools"] = list(tools)
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, dict) or not all(isinstance(k, str) for k in chat_template_kwargs):
            raise ValueError("chat_template_kwargs must be a dict of template variables by name")
        taken = sorted(k for k in chat_template_kwargs if k in _RENDER_ARGUMENTS)
        if taken:
            raise ValueError(f"chat_template_kwargs: {', '.join(taken)} is an argument of the rendering, not a "
                             "template variable: pass it as chat()'s own argument where it has one")
        extra.update(chat_template_kwargs)
    return extra


def _text_parts(parts: list, where: str) -> list[str]:
    """The texts of ``[{"type": "text", "text": ...}, ...]``; any other kind of part is refused by its place."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}] must be a text part {{'type': 'text', 'text': ...}} (no other kind runs)")
        texts.append(part["text"])
    return texts


def _tool_calls(calls, where: str) -> list:
    """OpenAI's ``tool_calls`` with each ``function.arguments`` JSON text read into its value, as vLLM passes them to
    the chat template (tool-use templates write ``arguments | tojson``: a string there came out encoded twice)."""
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                value = json.loads(arguments)
            except ValueError as e:
                raise ValueError(f"{where}[{j}].function.arguments is not JSON text: {e}") from None
            call = {**call, "function": {**function, "arguments": value}}
        out.append(call)
    return out


def _vllm_engine_args(model: str | None, kwargs: dict, swap_space_gb: float) -> float:
    """vLLM's names for the engine's arguments, taken in place (``kwargs`` is changed); the swap space to use.
    ``swap_space`` is vLLM's ``swap_space_gb``; ``tokenizer`` may only name the model's own (its directory holds
    it); ``trust_remote_code`` is a permission and nothing here runs a checkpoint's code. Any other name the
    engine does not take is a ``TypeError`` that lists the ones it does (not ``EngineConfig``'s own error)."""
    from pagedserve.engine.config import EngineConfig

    if "swap_space" in kwargs:
        swap_space_gb = kwargs.pop("swap_space")
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is not None and tokenizer != model:
        raise TypeError("LLM() loads the tokenizer from the model directory: tokenizer= may only name the model")
    if not isinstance(kwargs.pop("trust_remote_code", False), bool):
        raise TypeError("LLM() trust_remote_code must be true or false")
    for name in [n for n in kwargs if n in _VLLM_DEFAULTS]:  # what pagedserve does anyway, spelled out
        value, defaults = kwargs.pop(name), _VLLM_DEFAULTS[name]
        if not same_as_one_of(value, defaults):
            shown = " or ".join(repr(d) for d in defaults)
            raise TypeError(f"LLM() {name}={value!r} is not supported by pagedserve: it takes vLLM's {shown} only "
                            "(what pagedserve does); leave it out")
    known = set(EngineConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        taken = sorted(known | {"swap_space", "tokenizer", "trust_remote_code"})
        raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}; it takes: {', '.join(taken)}")
    return swap_space_gb


# vLLM's LLM() arguments pagedserve has no setting for, at the values that ask for what it does anyway (a script
# written for vLLM often spells them out): taken and dropped; any other value is refused by name.
_VLLM_DEFAULTS: dict[str, tuple] = {
    "disable_log_stats": (True, False),  # logging only
    "tokenizer_mode": ("auto",),
    "revision": (None,),
    "tokenizer_revision": (None,),
    "quantization": (None,),
    "kv_cache_dtype": ("auto",),
    "load_format": ("auto",),
    "enable_chunked_prefill": (None, True),  # prefill is chunked (max_num_batched_tokens)
    "pipeline_parallel_size": (1,),
    "cpu_offload_gb": (0,),
    "enable_lora": (False,),
    "hf_overrides": (None, {}),  # a mapping, or a function of the config: empty, it overrides nothing
    "compilation_config": (None, {}),  # {}: a CompilationConfig of its defaults, as None
}

_VLLM_ONLY = {
    "beam_search": "pass SamplingParams(beam_width=..., n=...) to generate (n beams come back; beam_width is the "
                   "search's width)",
    "llm_engine": "llm.engine is the step engine (add_request, step, abort_request; README, Step API)",
    "get_default_sampling_params": "SamplingParams() holds the defaults (the model's generation_config is not read)",
    "set_tokenizer": "load the model with the tokenizer files beside its weights",
    "reset_prefix_cache": "the prefix cache evicts by itself; a new LLM starts empty",
    "encode": "pagedserve generates text only",
    "embed": "pagedserve generates text only",
    "classify": "pagedserve generates text only",
    "score": "pagedserve generates text only",
}


class LLM:
    """Batch generation over the step engine: all prompts are queued, then steps run until every one is done.

    Calls from several threads run one after another, each its own batch (a lock): the engine under it is stepped
    by one thread at a time. A batch that callers share is the service's (a worker batches what they send)."""

    def __init__(self, model: str | None = None, block_size: int = 16, num_gpu_blocks: int | None = None,
                 swap_space_gb: float = 4.0, preemption_mode: str = "auto", enable_prefix_caching: bool = True,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
                 device: str = "auto", dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
                 **kwargs: Any) -> None:
        swap_space_gb = _vllm_engine_args(model, kwargs, swap_space_gb)
        self.engine = LLMEngine(
            model, block_size=block_size, num_gpu_blocks=num_gpu_blocks, swap_space_gb=swap_space_gb,
            preemption_mode=preemption_mode, enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, device=device, dtype=dtype,
            seed=seed, tensor_parallel_size=tensor_parallel_size, **kwargs)
        self._counter = 0
        # One call at a time: a call steps the engine until the engine has nothing left, so two at once ran each
        # other's requests and corrupted the scheduler (held-out testing: most such runs hung for good).
        self._one_call = threading.Lock()

    def close(self) -> None:
        """Stop the grammar compile threads and the tensor-parallel rank processes, if any, now (both also stop
        when the engine is dropped, and when this process exits). Every later ``generate`` or ``chat`` raises
        ``EngineDeadError``, whatever ``tensor_parallel_size``: a closed LLM is done, make a new one."""
        self.engine.close()

    def _check_open(self) -> None:
        # One answer for every engine: a tensor-parallel one could no longer step (its ranks are gone), and a
        # single-process one would run on without its grammar compile threads.
        if self.engine.closed:
            raise EngineDeadError("this LLM was closed (close()): make a new one")

    if not TYPE_CHECKING:  # a checker that saw it would take any name, a misspelt method too, as an attribute
        def __getattr__(self, name: str):
            """vLLM's ``LLM`` methods this one lacks: an ``AttributeError`` that says what to use, not a bare one."""
            hint = _VLLM_ONLY.get(name)
            if hint is None:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            raise AttributeError(f"LLM.{name} is vLLM's, not pagedserve's: {hint}")

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (``llm.tokenizer``), by vLLM's name for it."""
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 show_progress: bool | None = None, *, use_tqdm: object = None, lora_request: object = None,
                 priority: Seq[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in the prompts' order.

        Every prompt and parameter set is validated before any work starts. ``show_progress`` (or vLLM's
        ``use_tqdm``; default off) shows a progress bar. ``priority``: as in vLLM, one integer per prompt; lower
        runs first (default 0 for all). ``lora_request`` must be None (no adapters are served).
        """
        self._check_open()
        show_progress = _progress("generate", show_progress, use_tqdm)
        no_lora("generate", lora_request)
        prompts, salts = _prompt_list(prompts)
        priorities = _priorities(priority, len(prompts))
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            if isinstance(sampling_params, (Mapping, str, bytes)) or not isinstance(sampling_params, Iterable):
                raise ValueError(f"sampling_params must be a SamplingParams or a list of them, one per prompt (got "
                                 f"{type(sampling_params).__name__}); a dict of fields converts with "
                                 "SamplingParams.from_dict")
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):  # None among them ran that prompt on the defaults, unsaid
                    raise ValueError(f"sampling_params[{i}] must be a SamplingParams (got {type(p).__name__}); "
                                     "a dict of fields converts with SamplingParams.from_dict")
        # Only the final outputs are returned (as vLLM's LLM does): no step builds an output before a request ends.
        params = final_only(params)
        with self._one_call:
            self._check_open()  # closed while this call waited for another's end
            return self._queue_and_run(prompts, params, priorities, salts, show_progress)

    def _queue_and_run(self, prompts: list, params: list[SamplingParams], priorities: list[int],
                       salts: list[str | None], show_progress: bool) -> list[RequestOutput]:
        ids = []
        try:
            for i, (prompt, p, prio, salt) in enumerate(zip(prompts, params, priorities, salts)):
                rid = f"offline-{self._counter}"
                self._counter += 1
                try:
                    self.engine.add_request(rid, prompt, p, priority=prio, cache_salt=salt)
                except ValueError as e:  # which of the batch's prompts, when there are several
                    if len(prompts) > 1 and e.args and isinstance(e.args[0], str):
                        e.args = (f"prompts[{i}]: {e.args[0]}", *e.args[1:])
                    raise
                ids.append(rid)
        except BaseException:  # a bad prompt, or Ctrl-C: the batch is not queued, in part or at all
            self._abort(ids)
            raise
        return self._run(ids, show_progress)

    def _abort(self, ids: list[str]) -> None:
        """Drop what is left of ``ids`` (a call interrupted, or refused part-way): nothing of it runs later."""
        for rid in ids:
            self.engine.abort_request(rid)

    def chat(self, messages: Seq[Mapping[str, Any]] | Seq[Seq[Mapping[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: Seq[Mapping[str, Any]] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, show_progress: bool | None = None,
             use_tqdm: object = None, lora_request: object = None) -> list[RequestOutput]:
        """Reply to one conversation (``[{"role": ..., "content": ...}, ...]``) or a list of them, as vLLM's
        ``LLM.chat``: each is rendered with the model's chat template (or ``chat_template``), tokenized without
        adding special tokens again (the template writes them), and generated like a prompt. One output per
        conversation, in order; ``output.prompt`` is the rendered text. ``use_tqdm`` is ``show_progress``.
        ``tools`` (function schemas) and ``chat_template_kwargs`` (``{"enable_thinking": False}`` for Qwen3) reach
        the template as its variables, as in vLLM; the output is text either way (no tool-call parsing).
        """
        self._check_open()
        show_progress = _progress("chat", show_progress, use_tqdm)
        no_lora("chat", lora_request)
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Seq) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts "
                             "(one conversation) or a list of such lists")
        if isinstance(messages[0], dict):
            conversations, names = [messages], ["messages"]
        else:
            conversations = list(messages)
            names = [f"messages[{i}]" for i in range(len(conversations))]
        extra = _template_variables(tools, chat_template_kwargs)
        texts = [self._render_chat(conv, name, chat_template, add_generation_prompt, continue_final_message, extra)
                 for conv, name in zip(conversations, names)]
        prompts = [self.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        for name, ids in zip(names, prompts):
            if not ids:
                raise ValueError(f"{name}: the chat template renders to no tokens")
        outputs = self.generate(prompts, sampling_params, show_progress)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def _render_chat(self, conversation, name: str, chat_template: str | None, add_generation_prompt: bool,
                     continue_final_message: bool, extra: dict[str, Any]) -> str:
        if isinstance(conversation, (str, bytes, dict)) or not isinstance(conversation, Seq) or not conversation:
            raise ValueError(f"{name} must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
        template = chat_template if chat_template is not None else getattr(self.tokenizer, "chat_template", None)
        parts_wanted = content_format(template) == "openai"
        messages = []
        for i, message in enumerate(conversation):
            if not isinstance(message, dict):
                raise ValueError(f"{name}[{i}] must be a dict with 'role' and 'content'")
            texts = None
            if isinstance(message.get("content"), list):  # OpenAI's content parts: text ones, joined as vLLM joins them
                texts = _text_parts(message["content"], f"{name}[{i}].content")
                message = {**message, "content": "\n".join(texts)}
            if message.get("tool_calls") is not None:
                message = {**message, "tool_calls": _tool_calls(message["tool_calls"], f"{name}[{i}].tool_calls")}
                if message.get("content") is None:
                    # An assistant turn that only calls tools: OpenAI's history carries content None, which vLLM
                    # renders as "" (a template that writes message['content'] failed on the missing value), and
                    # as no parts at all for a template that loops over them.
                    message = {**message, "content": ""}
                    texts = []
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    kinds = "a string or a list of text parts" if key == "content" else "a string"
                    raise ValueError(f"{name}[{i}].{key} must be {kinds}")
                check_unicode(message[key], f"{name}[{i}].{key}")
            if parts_wanted:  # the template loops over parts: the parts as given, a string as one
                content = message["content"] if texts is None else [{"type": "text", "text": t} for t in texts]
                message = {**message, "content": as_parts(content)}
            messages.append(message)
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.engine.model_name!r} has no chat template: pass chat_template=..., "
                             f"or use generate() with a plain prompt")
        try:
            # tokenize=False: the rendered text (its return type also covers token ids and encodings)
            return cast(str, self.tokenizer.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **extra))
        except Exception as e:  # the template's own raise_exception(), or a Jinja error in it
            raise ValueError(f"{name}: the chat template failed: {e}") from None

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
        except BaseException:
            # Ctrl-C (or a failed step) part-way: a step cut short can leave a sequence whose last position is
            # computed with no token sampled, which no later step would ever advance. The batch is dropped.
            self._abort(ids)
            raise
        finally:
            if progress:
                progress.stop()
        return [finals[i] for i in ids]

    def stats(self) -> EngineStats:
        return self.engine.stats()
