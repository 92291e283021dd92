"""A send whose answer the network lost, a connection Redis closed: sent once more, or said to be maybe sent.

A held-out tester put a proxy between the clients and Redis that broke a connection after Redis had applied the
XADD and before its answer reached the client (a reset, a load balancer closing an idle link). ``stream()``
raised ``RedisUnreachable: cannot reach Redis`` at once, and ``submit()`` did too, without the id: the request
ran all the same, and a caller who believed the message and sent it again under a new id ran it twice. A command
on a broken connection is now made once more on a new one (the same id runs once), and an answer that never
comes says the request may have been sent, with its id; the waits go on as through an outage.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from service_fixtures import make_settings, running_worker
from tcp_proxy import TcpProxy

from pagedserve.service.protocol import Keys


@pytest.fixture
def proxy(redis_url):
    host_port, db = redis_url.split("//", 1)[1].split("/", 1)
    assert host_port.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"), redis_url
    p = TcpProxy(int(host_port.rsplit(":", 1)[1]))
    p.url = p.url.rsplit("/", 1)[0] + "/" + db
    yield p
    p.close()


def test_a_stream_whose_send_lost_its_answer_goes_on_and_runs_once(redis_url, prefix, proxy, shared_engine):
    from pagedserve.service.client import AsyncClient, Client

    keys = Keys(prefix)
    params = {"max_tokens": 6, "ignore_eos": True}
    with running_worker(make_settings(redis_url, prefix), shared_engine), redis.Redis.from_url(redis_url) as r:
        with Client(proxy.url, prefix=prefix) as c:
            c.r.ping()  # the connection the send goes out on is open before the proxy is armed
            proxy.close_next_answer.set()
            events = list(c.stream("x", id="sync-stream", params=params, timeout=60))

        async def stream_async() -> list:
            async with AsyncClient(proxy.url, prefix=prefix) as ac:
                await ac.r.ping()
                proxy.close_next_answer.set()
                return [ev async for ev in ac.stream("x", id="async-stream", params=params, timeout=60)]

        async_events = asyncio.run(stream_async())
        assert proxy.answers_closed == 2
        for rid, evs in (("sync-stream", events), ("async-stream", async_events)):
            done = evs[-1]
            assert done.type == "done" and len(done.outputs[0].token_ids) == 6, evs
            assert "".join(ev.text for ev in evs[:-1]) == done.outputs[0].text
            assert r.exists(keys.result(rid))
        # Each id was sent twice; the entry sent again may be read after the run's end reached the caller, and is
        # then answered from the stored result: both are acknowledged, neither runs a second time.
        deadline = time.monotonic() + 15
        while r.xpending(keys.requests, keys.group)["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.xpending(keys.requests, keys.group)["pending"] == 0
        assert r.xinfo_groups(keys.requests)[0]["entries-read"] == 4


def test_a_submit_whose_answer_was_lost_sends_again_or_says_it_may_have_been_sent(redis_url, prefix, proxy):
    """An answer lost to a broken connection: the send is made again (under the same id, which runs once) and the
    id returned. One that never comes (a Redis that hangs): ``RedisUnreachable`` saying the request may have been
    sent, with the id, where it said "cannot reach Redis" without it."""
    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import RedisUnreachable
    from pagedserve.service.protocol import parse_request

    keys = Keys(prefix)
    with Client(proxy.url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        c.r.ping()
        proxy.close_next_answer.set()
        assert c.submit("x", id="sync-submit") == "sync-submit"

        async def submit_async(**kw) -> str:
            async with AsyncClient(proxy.url, prefix=prefix, **kw) as ac:
                await ac.r.ping()
                proxy.close_next_answer.set()
                return await ac.submit("x", id="async-submit")

        assert asyncio.run(submit_async()) == "async-submit"
        assert proxy.answers_closed == 2
        ids = [parse_request(f[b"body"], 1 << 20).id for _, f in r.xrange(keys.requests)]
        assert ids == ["sync-submit"] * 2 + ["async-submit"] * 2, ids  # applied, lost, sent again

        with Client(proxy.url, prefix=prefix, socket_timeout=1) as slow:
            slow.r.ping()
            proxy.open.clear()  # Redis takes the send and its answer never comes back
            try:
                with pytest.raises(RedisUnreachable, match="may have been sent") as lost:
                    slow.submit("x", id="hung-submit")
            finally:
                proxy.open.set()
        assert lost.value.request_id == "hung-submit"
        # Nothing was sent where Redis could not be reached at all: that still says so.
        with Client("redis://127.0.0.1:1/0", prefix=prefix) as nowhere, \
                pytest.raises(RedisUnreachable, match="cannot reach") as unreached:
            nowhere.submit("x", id="never-sent")
        assert unreached.value.request_id is None


def test_a_connection_redis_closed_while_idle_is_opened_again(prefix):
    """Redis's idle ``timeout`` (common on managed Redis), a restart or ``CLIENT KILL`` closes a pooled connection:
    the next call of an ``AsyncClient`` failed ("Connection closed by server": redis-py's from_url retries
    nothing), and a submit then said its request may have been sent, though nothing was."""
    import time

    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.redis_server import LocalRedis

    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        r.config_set("timeout", 1)

        async def idle_then_use() -> list:
            async with AsyncClient(url, prefix=prefix) as ac:
                out = [await ac.submit("x", id="a1")]
                await asyncio.sleep(2.5)
                out.append(await ac.submit("x", id="a2"))
                await asyncio.sleep(2.5)
                out.append(await ac.result("a1"))
                return out

        assert asyncio.run(idle_then_use()) == ["a1", "a2", None]
        with Client(url, prefix=prefix) as c:
            c.submit("x", id="s1")
            time.sleep(2.5)
            assert c.submit("x", id="s2") == "s2"


def test_a_read_reset_mid_reply_is_made_again_and_a_small_reply_is_never_over_the_limit(redis_url, prefix, proxy,
                                                                                         shared_engine):
    """A load balancer resetting the connection in the middle of a reply (ECONNRESET; Redis's own close reads as
    "closed by server"): ``events(id)`` and ``stream(id, after=)`` raised "cannot reach Redis" at once, with Redis
    answering; two resets running made ``wait()`` and ``cancel()`` of a 9 kB result blame Redis's output buffer
    limit, which no reply under 16 KiB can be over (a connection's own reply buffer holds it)."""
    from pagedserve import AsyncClient, Client, RedisUnreachable, ReplyCut, ReplyOverLimit

    params = {"max_tokens": 1200, "ignore_eos": True}
    with running_worker(make_settings(redis_url, prefix), shared_engine), Client(proxy.url, prefix=prefix) as c:
        streamed = list(c.stream("x", id="long-one", params=params, timeout=120))
        whole = list(c.events("long-one", timeout=30))
        assert whole == streamed and len(whole) > 1
        proxy.reset_answers(5_000)
        assert list(c.events("long-one", timeout=30)) == whole
        proxy.reset_answers(5_000)
        assert list(c.stream("long-one", after=len(whole) // 2, timeout=30)) == whole[len(whole) // 2 + 1:]

        result_bytes = len(redis.Redis.from_url(redis_url).get(Keys(prefix).result("long-one")))
        assert 5_000 < result_bytes < 16 * 1024, result_bytes
        for call in (lambda: c.wait("long-one", timeout=30), lambda: c.result("long-one"),
                     lambda: c.cancel("long-one")):
            proxy.reset_answers(4_000, count=2)
            try:
                call()  # made again once more, or said as Redis not reached: never a reply over the limit
            except RedisUnreachable as e:
                assert not isinstance(e, ReplyOverLimit), e
        # A link that cuts every long reply: said at once, where a wait read the result again for ever (each
        # small reply between two cut reads counting as Redis back), and never as the output buffer limit.
        proxy.reset_answers(4_000, count=1_000_000)
        for call in (lambda: c.wait("long-one"), lambda: c.result("long-one"), lambda: c.cancel("long-one")):
            started = time.monotonic()
            with pytest.raises(ReplyCut, match="broke off mid-reply: too small to be over its output buffer limit"):
                call()
            assert time.monotonic() - started < 10

        async def cut_async() -> None:
            async with AsyncClient(proxy.url, prefix=prefix) as ac:
                for call in (lambda: ac.wait("long-one"), lambda: ac.result("long-one"),
                             lambda: ac.cancel("long-one")):
                    with pytest.raises(ReplyCut):
                        await asyncio.wait_for(call(), 10)

        asyncio.run(cut_async())
        proxy.stop_resets()

        async def async_events() -> list:
            async with AsyncClient(proxy.url, prefix=prefix) as ac:
                proxy.reset_answers(5_000)
                return [ev async for ev in ac.events("long-one", timeout=30)]

        assert asyncio.run(async_events()) == whole


def test_the_reply_buffer_holds_a_value_with_its_framing_and_the_replies_read_beside_it(prefix):
    """A result of 16,376 to 16,383 bytes read under a limit of 1 kB: its reply (``$16376\\r\\n`` and a CRLF
    more) overflows the connection's 16 KiB reply buffer, and Redis closes it over the limit; the client said a
    proxy cut it (ReplyCut), comparing the value alone with the buffer. A cancel reads the result beside another
    reply, in the same buffer. The largest value whose reply fits (16,374 bytes) is read."""
    from pagedserve import Client, ReplyOverLimit
    from pagedserve.service.protocol import CompletionResult, DoneEvent
    from pagedserve.service.redis_server import LocalRedis

    def stored(rid: str, size: int) -> bytes:
        done = DoneEvent(id=rid, outputs=[CompletionResult(index=0, text="", token_ids=[1], finish_reason="length")])
        empty = done.model_dump_json()
        done.outputs[0].text = "x" * (size - len(empty))
        raw = done.model_dump_json().encode()
        assert len(raw) == size
        return raw

    keys = Keys(prefix)
    with LocalRedis() as url, redis.Redis.from_url(url) as r:
        for size in (16_374, 16_375, 16_376, 16_383):
            r.set(keys.result(f"r{size}"), stored(f"r{size}", size))
        r.config_set("client-output-buffer-limit", "normal 1kb 1kb 0")
        with Client(url, prefix=prefix) as c:
            assert c.result("r16374").outputs[0].text.startswith("x")
            for size in (16_375, 16_376, 16_383):
                with pytest.raises(ReplyOverLimit, match=f"r{size} \\({size} bytes\\)"):
                    c.result(f"r{size}")
            with pytest.raises(ReplyOverLimit):
                c.cancel("r16374")  # its GET beside the EXISTS of the claim
