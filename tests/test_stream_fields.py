"""The worker's own parse of the replies that hand it stream entries (service/stream_fields.py), against
redis-py's on a real Redis, in both protocols: the same shapes and values, plus every value of a repeated name."""

from __future__ import annotations

import pytest
import redis

from pagedserve.service.stream_fields import EntryFields, keep_repeated_fields, repeated


@pytest.mark.parametrize("protocol", [2, 3])
def test_same_shapes_as_redis_py_and_repeats_kept(redis_url, prefix, protocol):
    ours = redis.Redis.from_url(redis_url, protocol=protocol)
    theirs = redis.Redis.from_url(redis_url, protocol=protocol)
    keep_repeated_fields(ours)
    stream, group = f"{prefix}:s", "g"
    ours.xgroup_create(stream, group, id="0", mkstream=True)
    plain = ours.xadd(stream, {"body": "one", "traceparent": "t"})
    twice = ours.execute_command("XADD", stream, "*", "body", "a", "x", "1", "body", "b", "x", "2", "body", "c")
    gone = ours.xadd(stream, {"body": "deleted later"})

    read = ours.xreadgroup(group, "c1", {stream: ">"}, count=10)
    assert read[0][0] == stream.encode()
    entries = read[0][1]
    assert [e for e, _ in entries] == [plain, twice, gone]
    assert all(isinstance(f, EntryFields) for _, f in entries)
    assert entries[0][1] == {b"body": b"one", b"traceparent": b"t"} and repeated(entries[0][1], b"body") is None
    assert entries[1][1] == {b"body": b"c", b"x": b"2"}  # the last value wins, as in redis-py's dict
    assert repeated(entries[1][1], b"body") == [b"a", b"b", b"c"]
    assert repeated(entries[1][1], b"x") == [b"1", b"2"]
    assert repeated({b"body": b"plain dict"}, b"body") is None

    ours.xdel(stream, gone)
    # XCLAIM and XAUTOCLAIM: the same answer as redis-py's parse (deleted entries left out), JUSTID too.
    claimed = ours.xclaim(stream, group, "c2", 0, [plain, twice, gone])
    expected = [e for e in theirs.xclaim(stream, group, "c3", 0, [plain, twice]) if e[0] is not None]
    assert [(e, dict(f)) for e, f in claimed] == expected
    assert ours.xclaim(stream, group, "c2", 0, [plain], justid=True) == [plain]
    cursor, auto, *rest = ours.xautoclaim(stream, group, "c4", 0, start_id="0-0", count=10)
    t_cursor, t_auto, *t_rest = theirs.xautoclaim(stream, group, "c5", 0, start_id="0-0", count=10)
    assert (cursor, [(e, dict(f)) for e, f in auto], rest) == (t_cursor, t_auto, t_rest)
    assert repeated(dict(auto)[twice], b"body") == [b"a", b"b", b"c"]
    assert ours.xautoclaim(stream, group, "c4", 0, start_id="0-0", justid=True) == [plain, twice]
    assert ours.xreadgroup(group, "c1", {stream: ">"}, count=10, block=None) == []
    ours.close()
    theirs.close()
