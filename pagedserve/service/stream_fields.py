"""Stream entries as the worker reads them, with every value of a field name given more than once.

Redis keeps a stream entry's fields as a list, so one ``XADD`` may name ``body`` twice; redis-py turns the list
into a dict and keeps the last value. A worker reading through that dict would answer only the last body's id,
and the producer waiting on the other would never hear. The worker's client therefore parses the replies of
the three commands that hand it entries (``XREADGROUP``, ``XAUTOCLAIM``, ``XCLAIM``) itself: the same shapes
redis-py gives, with each entry's fields an :class:`EntryFields`, a dict (last value wins, as before) that also
holds, in ``repeated``, all the values of each name that occurs more than once. Admission refuses such an entry
for every id its bodies carry (admission.py).
"""

from __future__ import annotations

from typing import Any


class EntryFields(dict):
    """An entry's fields (name -> last value), plus ``repeated``: name -> every value, for names given twice or
    more, in the entry's order."""

    repeated: dict

    def __init__(self, pairs: list | None = None) -> None:
        super().__init__()
        self.repeated = {}
        pairs = pairs or []
        for name, value in zip(pairs[::2], pairs[1::2]):
            if name in self:
                self.repeated.setdefault(name, [self[name]]).append(value)
            self[name] = value


def repeated(fields: dict, name: bytes) -> list | None:
    """Every value of ``name`` in the entry when it is given more than once, else None."""
    return getattr(fields, "repeated", {}).get(name)


def _entries(response: Any) -> list:
    """``[[id, [name, value, ...]], ...]`` -> ``[(id, EntryFields), ...]``; a deleted entry's fields are None."""
    return [(e[0], None if e[1] is None else EntryFields(e[1])) for e in response or [] if e is not None]


def xreadgroup_reply(response: Any, **options: Any) -> list:
    """An ``XREADGROUP`` reply (a script's too) in redis-py's shape, ``[[stream, [(id, EntryFields), ...]], ...]``."""
    if not response:
        return []
    streams = response.items() if isinstance(response, dict) else response  # RESP3 map, RESP2 list of pairs
    return [[stream, _entries(entries)] for stream, entries in streams]


def _xclaim(response: Any, **options: Any) -> list:
    return response if options.get("parse_justid") else _entries(response)


def _xautoclaim(response: Any, **options: Any) -> list:
    if options.get("parse_justid"):
        return response[1]
    return [response[0], _entries(response[1]), *response[2:]]


def keep_repeated_fields(r: Any) -> None:
    """Make ``r`` (a redis-py client) hand out entries as :class:`EntryFields`, in redis-py's shapes."""
    r.set_response_callback("XREADGROUP", xreadgroup_reply)
    r.set_response_callback("XCLAIM", _xclaim)
    r.set_response_callback("XAUTOCLAIM", _xautoclaim)
