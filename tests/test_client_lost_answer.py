"""A send whose answer the network lost: the request is in the stream, and the client must not say it was not sent.

A held-out tester put a proxy between the clients and Redis that broke a connection after Redis had applied the
XADD and before its answer reached the client (a reset, a load balancer closing an idle link). ``stream()``
raised ``RedisUnreachable: cannot reach Redis`` at once, and ``submit()`` did too, without the id: the request
ran all the same, and a caller who believed the message and sent it again under a new id ran it twice. Only an
answer that timed out counted as lost; a connection broken while the answer was read now counts too: the waits go
on (sending again under the same id, which runs once) and ``submit`` says the request may have been sent, with
its id.
"""

from __future__ import annotations

import asyncio

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
        assert r.xpending(keys.requests, keys.group)["pending"] == 0  # both entries of each id answered by one run


def test_a_submit_whose_answer_was_lost_says_it_may_have_been_sent_and_names_the_id(redis_url, prefix, proxy):
    from pagedserve.service.client import AsyncClient, Client
    from pagedserve.service.client_core import RedisUnreachable

    keys = Keys(prefix)
    with Client(proxy.url, prefix=prefix) as c, redis.Redis.from_url(redis_url) as r:
        c.r.ping()
        proxy.close_next_answer.set()
        with pytest.raises(RedisUnreachable, match="may have been sent") as lost:
            c.submit("x", id="sync-submit")
        assert lost.value.request_id == "sync-submit"

        async def submit_async() -> None:
            async with AsyncClient(proxy.url, prefix=prefix) as ac:
                await ac.r.ping()
                proxy.close_next_answer.set()
                await ac.submit("x", id="async-submit")

        with pytest.raises(RedisUnreachable, match="may have been sent") as lost:
            asyncio.run(submit_async())
        assert lost.value.request_id == "async-submit"
        sent = [fields for _, fields in r.xrange(keys.requests)]
        assert len(sent) == 2, "the sends were applied; their answers were what was lost"
        # Nothing was sent where Redis could not be reached at all: that still says so.
        with Client("redis://127.0.0.1:1/0", prefix=prefix) as nowhere, \
                pytest.raises(RedisUnreachable, match="cannot reach") as unreached:
            nowhere.submit("x", id="never-sent")
        assert unreached.value.request_id is None
