"""Which workers serve which models right now, and how many jobs they could take.

GPU workers publish it (every few seconds, with a short expiry); the poller reads it and
claims an assignment only when a live worker serves the job's model, because a claimed job
that no one answers costs the operator. Per model, a sorted set holds each worker's name
scored by when its word expires, and a hash its free slots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from blf.names import node_key

__all__ = ["HEARTBEAT_S", "TTL_S", "CapacityPublisher", "live_workers"]

log = logging.getLogger("blf.capacity")

TTL_S = 15.0  # a worker silent this long is gone
HEARTBEAT_S = 5.0


def _workers_key(address: str, model: str) -> str:
    return node_key(address, "workers", model)


def _slots_key(address: str, model: str) -> str:
    return node_key(address, "slots", model)


def live_workers(client: redis.Redis, address: str, model: str) -> dict[str, int]:
    """Live workers serving ``model``, with their free slots."""
    names: list[Any] = list(  # members only (no scores asked for)
        client.zrangebyscore(_workers_key(address, model), time.time(), "+inf")
    )
    if not names:
        return {}
    slots = client.hmget(_slots_key(address, model), names)
    return {
        (n.decode() if isinstance(n, bytes) else str(n)): int(s or 0)
        for n, s in zip(names, slots, strict=True)
    }


class CapacityPublisher:
    """A GPU worker's word, repeated every ``HEARTBEAT_S`` until ``stop``."""

    def __init__(
        self,
        client: redis.Redis,
        address: str,
        models: list[str],
        worker: str,
        free_slots: Callable[[], int],
    ) -> None:
        self.client = client
        self.address = address
        self.models = models
        self.worker = worker
        self.free_slots = free_slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="blf-capacity", daemon=True)

    def start(self) -> CapacityPublisher:
        self.publish()
        self._thread.start()
        return self

    def publish(self) -> None:
        expires = time.time() + TTL_S
        free = max(self.free_slots(), 0)
        with self.client.pipeline() as pipe:
            for model in self.models:
                pipe.zadd(_workers_key(self.address, model), {self.worker: expires})
                pipe.zremrangebyscore(_workers_key(self.address, model), "-inf", time.time())
                pipe.hset(_slots_key(self.address, model), self.worker, free)
                pipe.expire(_workers_key(self.address, model), int(TTL_S * 4))
                pipe.expire(_slots_key(self.address, model), int(TTL_S * 4))
            pipe.execute()

    def stop(self) -> None:
        """Withdraw at once: a stopping worker must not be counted on for new claims."""
        self._stop.set()
        try:
            with self.client.pipeline() as pipe:
                for model in self.models:
                    pipe.zrem(_workers_key(self.address, model), self.worker)
                    pipe.hdel(_slots_key(self.address, model), self.worker)
                pipe.execute()
        except redis.RedisError as exc:
            log.debug("capacity withdrawal failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.publish()
            except redis.RedisError as exc:  # Redis blips; the next beat tries again
                log.warning("Could not publish this worker's capacity: %s", exc)
