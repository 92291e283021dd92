"""``/readyz`` over a slow link to Redis (a TCP proxy that delays every chunk each way, a real redis-server).

Each probe opened a connection of its own: the connect, redis-py's handshake (``CLIENT SETINFO``, twice) and the
PING, each given one second. Over a link whose round trip neared a second the probe failed (``"redis": false``,
503) while the worker, whose commands have seconds, served; over a shorter one it answered, after several round
trips. The probe's PING now runs on a connection kept between probes.
"""

from __future__ import annotations

from service_fixtures import make_settings
from tcp_proxy import TcpProxy

from pagedserve.service.redis_server import LocalRedis


def test_readiness_holds_over_a_link_with_a_round_trip_near_a_second(prefix):
    from pagedserve.service.worker import Worker

    with LocalRedis() as url:
        link = TcpProxy(int(url.rsplit(":", 1)[1].split("/")[0]), delay=0.6)
        worker = Worker(make_settings(link.url, prefix))  # not run: only its readiness is asked
        try:
            answers = [worker._ready()[1]["redis"] for _ in range(3)]
            assert answers == [True, True, True], answers
        finally:
            worker._ready_ping.close()
            link.close()
