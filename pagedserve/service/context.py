"""What every part of one worker shares: :class:`WorkerContext`, made once by ``Worker.__init__``.

The parts (publisher, reclaimer, lease keeper, connection, claims, outcomes, running table, admission, intake)
each take the context instead of the same keyword arguments over and over; :class:`WorkerPart` gives them the
context's fields under their short names (``self.keys``, ``self.metrics``, ``self.log`` ...).

Invariants: the context is frozen (a part cannot change what the others see), and it holds only what does not
change over the worker's life: its settings, Redis names, consumer name and observability handles. State
(tables, buffers, connections) lives in the parts, each in one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from .protocol import Keys
from .settings import Settings

if TYPE_CHECKING:  # prometheus_client is the worker extra; producers import connection.py, which imports this
    from .metrics import WorkerMetrics


@dataclass(frozen=True, eq=False)
class WorkerContext:
    settings: Settings
    keys: Keys
    consumer: str  # this worker's consumer name in the group
    metrics: WorkerMetrics
    tracer: Any  # an OpenTelemetry tracer
    log: Any  # a structlog logger bound to the worker
    new_client: Callable[[], redis.Redis]  # a Redis client of its own (for a thread: lease and claim renewals)
    # Whether the loop is stuck (its /healthz fails: no turn, or work and no progress, for too long). The renewal
    # threads then let its entries' leases and its ids' claims lapse, so that other workers take its requests, as
    # they would if an orchestrator had restarted it: where none watches its health (compose, a VM), a wedged
    # worker would otherwise hold its requests for as long as it lives.
    loop_stuck: Callable[[], bool] = lambda: False


class WorkerPart:
    """A part of the worker: the context's fields under their short names."""

    ctx: WorkerContext

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def keys(self) -> Keys:
        return self.ctx.keys

    @property
    def consumer(self) -> str:
        return self.ctx.consumer

    @property
    def metrics(self) -> WorkerMetrics:
        return self.ctx.metrics

    @property
    def tracer(self) -> Any:
        return self.ctx.tracer

    @property
    def log(self) -> Any:
        return self.ctx.log
