"""What GPU workers say about themselves, as the poller reads it, on a real Redis."""

from __future__ import annotations

import time

import redis

from blf.broker import EmbeddedRedis
from blf.capacity import CapacityPublisher, live_workers
from blf.devnet.icl import DevnetIcl
from tests.nodes import make_node

ADDRESS = "0x000000000000000000000000000000000000dEaD"


def test_a_worker_is_live_for_its_models_until_it_stops(client: redis.Redis) -> None:
    free = [3]
    publisher = CapacityPublisher(client, ADDRESS, ["a", "b"], "gpu1@host", lambda: free[0])
    publisher.publish()
    assert live_workers(client, ADDRESS, "a") == {"gpu1@host": 3}
    assert live_workers(client, ADDRESS, "b") == {"gpu1@host": 3}
    assert live_workers(client, ADDRESS, "c") == {}
    assert live_workers(client, "0x0000000000000000000000000000000000000001", "a") == {}
    free[0] = 1
    publisher.publish()
    assert live_workers(client, ADDRESS, "a") == {"gpu1@host": 1}
    publisher.stop()
    assert live_workers(client, ADDRESS, "a") == {}


def test_a_worker_that_went_silent_is_not_live(client: redis.Redis) -> None:
    client.zadd(f"blf:{ADDRESS.lower()}:workers:a", {"gone@host": time.time() - 1})
    client.hset(f"blf:{ADDRESS.lower()}:slots:a", "gone@host", 4)
    CapacityPublisher(client, ADDRESS, ["a"], "here@host", lambda: 2).publish()
    assert live_workers(client, ADDRESS, "a") == {"here@host": 2}


def test_status_shows_workers_per_model_and_warns_about_a_model_with_none(
    client: redis.Redis, shared_redis: EmbeddedRedis, devnet: DevnetIcl
) -> None:
    node = make_node(devnet.url, models="served,orphan", attest=False)
    CapacityPublisher(client, node.address, ["served"], "gpu1@host", lambda: 2).publish()
    result = node.invoke("status", env={"BLF_BROKER_URL": shared_redis.urls.celery})
    assert result.exit_code == 0, result.output
    workers = [line for line in result.stdout.splitlines() if line.startswith("Workers")]
    assert workers == [
        "Workers  served: 1 live, 2 free slot(s)",
        "Workers  orphan: 0 live, 0 free slot(s)",
    ]
    assert "no live worker serves orphan: its jobs are not claimed" in result.stderr
    stopped = node.invoke("status")  # no broker_url, no `run`: nothing to read
    assert "Workers  not checked: the node is not running" in stopped.stdout
