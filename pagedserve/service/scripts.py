"""The worker's Lua scripts: read once from ``lua/*.lua`` (shipped in the wheel) and run by SHA (EVALSHA).

``Scripts(r)`` registers every script on a client with redis-py's ``register_script``: the SHA is computed
locally, a direct call (``scripts.renew_leases(keys=..., args=..., client=...)``) loads the script on
``NOSCRIPT`` by itself. Pipelines send ``EVALSHA`` by hand (:meth:`Scripts.evalsha`) instead of passing the
Script object, which would cost a ``SCRIPT EXISTS`` round trip per pipeline; a ``NOSCRIPT`` reply (Redis
restarted, ``SCRIPT FLUSH``) is answered with :meth:`Scripts.load` and the op is sent again.

Every script starts with a ``#!lua`` shebang, so Redis 7 checks its flags before running it: without
``allow-oom`` it is refused whole under maxmemory instead of failing half way; without ``no-writes`` it is
refused whole on a read-only replica. ACL: ``EVALSHA`` and ``SCRIPT LOAD`` are needed, and each command a
script calls is checked against the user's ACL as if sent directly.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis

NAMES = ("finish", "dead_letter", "renew_leases", "refresh_name", "release_name", "forget_consumer", "repair_group_lag",
         "head_entry", "read_head", "answer_stored")
# The batch client's scripts (batch_client.py). Producers may run scripts (EVALSHA) but not load them: one that
# could would stall Redis with a script that never ends. So workers load these for them, at every (re)connect
# (connection.Connection.setup) and now and then while connected (batch_feeder.py: after a SCRIPT FLUSH).
PRODUCER_SCRIPTS = ("batch_create", "batch_cancel")


@cache
def source(name: str) -> str:
    """The text of ``lua/{name}.lua``, each ``--!include <lib>`` line replaced by ``lua/<lib>.lua`` (Redis scripts
    cannot load one another: what several share is written once and put into each)."""
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return "".join(source(line.split()[1]) if line.startswith("--!include ") else line
                   for line in text.splitlines(keepends=True))


class Scripts:
    """The registered scripts of one client (attributes named after the files)."""

    def __init__(self, r: redis.Redis) -> None:
        for name in NAMES:
            setattr(self, name, r.register_script(source(name)))

    def evalsha(self, pipe: redis.client.Pipeline, name: str, keys: list, args: list) -> None:
        """Queue ``EVALSHA`` of script ``name`` on a pipeline (one command, no ``SCRIPT EXISTS``)."""
        pipe.evalsha(getattr(self, name).sha, len(keys), *keys, *args)

    def load(self, r: redis.Redis) -> None:
        """``SCRIPT LOAD`` every script (after a ``NOSCRIPT`` reply)."""
        for name in NAMES:
            r.script_load(source(name))


def load_producer_scripts(r: redis.Redis) -> None:
    """``SCRIPT LOAD`` the batch client's scripts (a no-op for each one Redis has already)."""
    for name in PRODUCER_SCRIPTS:
        r.script_load(source(name))
