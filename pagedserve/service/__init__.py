"""pagedserve service: the Redis-stream worker, producers (sync/async clients, Celery tasks) and the CLI.

The service knows nothing of KV blocks; the engine knows nothing of Redis.
"""

from .client import AsyncClient, Client, NoWorker, RedisUnreachable, RequestFailed, RequestGone, RequestTimedOut
from .protocol import DeadLetter, DoneEvent, ErrorEvent, GenerateRequest, Keys, TokenEvent
from .settings import Settings

__all__ = [
    "AsyncClient",
    "Client",
    "DeadLetter",
    "DoneEvent",
    "ErrorEvent",
    "GenerateRequest",
    "Keys",
    "NoWorker",
    "RedisUnreachable",
    "RequestFailed",
    "RequestGone",
    "RequestTimedOut",
    "Settings",
    "TokenEvent",
]
