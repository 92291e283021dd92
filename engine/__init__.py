"""pagedserve's offline engine: paged KV cache, continuous batching, preemption, prefix caching."""

from engine.errors import PromptTooLongError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "PromptTooLongError"]
