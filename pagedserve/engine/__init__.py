"""pagedserve's offline engine: paged KV cache, continuous batching, preemption, prefix caching.

The public names are imported on first use, so that ``pagedserve.engine.sampling_params`` (which producers use
to validate requests) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve import _lazy_exports

_EXPORTS = {
    "LLM": "pagedserve.engine.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "SamplingParams": "pagedserve.engine.sampling_params",
    "RequestOutputKind": "pagedserve.engine.sampling_params",
    "RequestOutput": "pagedserve.engine.outputs",
    "CompletionOutput": "pagedserve.engine.outputs",
    "PromptTooLongError": "pagedserve.engine.errors",
}
# Spelt out, not list(_EXPORTS): a checker reads only a literal list (test_typed_api holds the two to the same names).
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "PromptTooLongError"]

if TYPE_CHECKING:  # what a type checker sees of the names above ("as": exported, not only imported here)
    from pagedserve.engine.errors import PromptTooLongError as PromptTooLongError
    from pagedserve.engine.llm import LLM as LLM
    from pagedserve.engine.llm_engine import LLMEngine as LLMEngine
    from pagedserve.engine.outputs import CompletionOutput as CompletionOutput
    from pagedserve.engine.outputs import RequestOutput as RequestOutput
    from pagedserve.engine.sampling_params import RequestOutputKind as RequestOutputKind
    from pagedserve.engine.sampling_params import SamplingParams as SamplingParams


if not TYPE_CHECKING:  # a checker reads the names above, and a misspelt one is its error, not Any
    __getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
