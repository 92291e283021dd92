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
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from pagedserve.engine.errors import PromptTooLongError
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.engine.outputs import CompletionOutput, RequestOutput
    from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
