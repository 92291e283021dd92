"""pagedserve: a message-queue-driven LLM inference service built on PagedAttention.

The public API in one place. ``pip install pagedserve`` is the producer side (``Client``, ``AsyncClient``, the
protocol models, Celery tasks, ``pagedserve submit``); ``pip install "pagedserve[worker]"`` adds the engine
(``LLM``, ``LLMEngine``) and the worker. Names are imported on first use, so a producer never loads torch.

The code lives in the subpackages ``pagedserve.engine`` (offline engine, knows nothing of Redis),
``pagedserve.kernels`` (paged-KV kernels), ``pagedserve.service`` (worker, clients, CLI; knows nothing of
blocks) and ``pagedserve.bench`` (benchmarks).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import TYPE_CHECKING

try:
    __version__ = importlib.metadata.version("pagedserve")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
# What the docs' "workers (clients) before <release>" compare with: the day, and that day's change if more than one
# changed what a worker, a client or the wire does. Changed with every such change, so an operator can tell the
# releases of a rolling update apart (``pagedserve --version``, the worker's ``worker_started`` line).
RELEASE = "2026-12-08.2"

_EXPORTS = {
    "LLM": "pagedserve.engine.llm",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "SamplingParams": "pagedserve.engine.sampling_params",
    "RequestOutputKind": "pagedserve.engine.sampling_params",
    "RequestOutput": "pagedserve.engine.outputs",
    "CompletionOutput": "pagedserve.engine.outputs",
    "PromptTooLongError": "pagedserve.engine.errors",
    "EngineDeadError": "pagedserve.engine.errors",
    "ResumeSample": "pagedserve.engine.sequence",
    "Client": "pagedserve.service.client",
    "AsyncClient": "pagedserve.service.client",
    "CancelOutcome": "pagedserve.service.client",
    "RequestFailed": "pagedserve.service.client",
    "RedisUnreachable": "pagedserve.service.client",
    "RedisBusy": "pagedserve.service.client",
    "ReplyOverLimit": "pagedserve.service.client",
    "ReplyCut": "pagedserve.service.client",
    "TooManyConnections": "pagedserve.service.client",
    "Event": "pagedserve.service.client",
    "Terminal": "pagedserve.service.client",
    "NoWorker": "pagedserve.service.client",
    "RequestGone": "pagedserve.service.client",
    "RequestTimedOut": "pagedserve.service.client",
    "BatchNotEnded": "pagedserve.service.batch_client",
    "BatchOutputLost": "pagedserve.service.batch_client",
    "BatchNotFound": "pagedserve.service.batch_client",
    "BatchMalformed": "pagedserve.service.batch_client",
    "GenerateRequest": "pagedserve.service.protocol",
    "TokenEvent": "pagedserve.service.protocol",
    "DoneEvent": "pagedserve.service.protocol",
    "ErrorEvent": "pagedserve.service.protocol",
    "DeadLetter": "pagedserve.service.protocol",
    "Keys": "pagedserve.service.protocol",
    "Settings": "pagedserve.service.settings",
}
# Spelt out, not list(_EXPORTS): a checker reads only a literal list, and without it `from pagedserve import *`
# imported nothing it could see (test_typed_api holds the two to the same names).
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "PromptTooLongError", "EngineDeadError", "ResumeSample", "Client", "AsyncClient", "CancelOutcome",
           "RequestFailed", "RedisUnreachable", "RedisBusy", "ReplyOverLimit", "ReplyCut", "TooManyConnections", "Event",
           "Terminal", "NoWorker", "RequestGone", "RequestTimedOut", "BatchNotEnded", "BatchOutputLost",
           "BatchNotFound", "BatchMalformed", "GenerateRequest", "TokenEvent", "DoneEvent", "ErrorEvent",
           "DeadLetter", "Keys", "Settings"]

if TYPE_CHECKING:  # what a type checker sees of the names above ("as": exported, not only imported here)
    from pagedserve.engine.errors import EngineDeadError as EngineDeadError
    from pagedserve.engine.errors import PromptTooLongError as PromptTooLongError
    from pagedserve.engine.llm import LLM as LLM
    from pagedserve.engine.llm_engine import LLMEngine as LLMEngine
    from pagedserve.engine.outputs import CompletionOutput as CompletionOutput
    from pagedserve.engine.outputs import RequestOutput as RequestOutput
    from pagedserve.engine.sampling_params import RequestOutputKind as RequestOutputKind
    from pagedserve.engine.sampling_params import SamplingParams as SamplingParams
    from pagedserve.engine.sequence import ResumeSample as ResumeSample
    from pagedserve.service.batch_client import BatchMalformed as BatchMalformed
    from pagedserve.service.batch_client import BatchNotEnded as BatchNotEnded
    from pagedserve.service.batch_client import BatchNotFound as BatchNotFound
    from pagedserve.service.batch_client import BatchOutputLost as BatchOutputLost
    from pagedserve.service.client import AsyncClient as AsyncClient
    from pagedserve.service.client import CancelOutcome as CancelOutcome
    from pagedserve.service.client import Client as Client
    from pagedserve.service.client import Event as Event
    from pagedserve.service.client import NoWorker as NoWorker
    from pagedserve.service.client import RedisBusy as RedisBusy
    from pagedserve.service.client import RedisUnreachable as RedisUnreachable
    from pagedserve.service.client import ReplyCut as ReplyCut
    from pagedserve.service.client import ReplyOverLimit as ReplyOverLimit
    from pagedserve.service.client import RequestFailed as RequestFailed
    from pagedserve.service.client import RequestGone as RequestGone
    from pagedserve.service.client import RequestTimedOut as RequestTimedOut
    from pagedserve.service.client import Terminal as Terminal
    from pagedserve.service.client import TooManyConnections as TooManyConnections
    from pagedserve.service.protocol import DeadLetter as DeadLetter
    from pagedserve.service.protocol import DoneEvent as DoneEvent
    from pagedserve.service.protocol import ErrorEvent as ErrorEvent
    from pagedserve.service.protocol import GenerateRequest as GenerateRequest
    from pagedserve.service.protocol import Keys as Keys
    from pagedserve.service.protocol import TokenEvent as TokenEvent
    from pagedserve.service.settings import Settings as Settings


def _lazy_exports(module: str, exports: dict[str, str]):
    """PEP 562 ``__getattr__`` and ``__dir__`` for ``module``: each name in ``exports`` (name -> defining module)
    is imported on first use and then kept in the module's namespace."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(exports[name]), name)
        except ModuleNotFoundError as e:  # the engine's packages come with the worker extra, not with the client
            if not exports[name].startswith("pagedserve.engine.") or (e.name or "").startswith("pagedserve"):
                raise
            raise ModuleNotFoundError(f"pagedserve.{name} needs the worker extra (missing: {e.name}): "
                                      'pip install "pagedserve[worker]"', name=e.name) from None
        setattr(sys.modules[module], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(exports))

    return __getattr__, __dir__


if not TYPE_CHECKING:  # a checker reads the names above, and a misspelt one is its error, not Any
    __getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
