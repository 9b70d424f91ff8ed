"""Job states and timings in Redis, per node: what the node received, claimed, finished.

A job's record is a hash ``blf:<address>:job:<id>``; ``blf:<address>:jobs`` indexes them
by last update. Records expire after a week: the ICL, not us, is the system of record.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from blf.names import node_key

__all__ = ["Journal"]

RECORD_TTL_S = 7 * 86400


class Journal:
    def __init__(self, client: redis.Redis, address: str) -> None:
        self._redis = client
        self._address = address

    def _job_key(self, job_id: str) -> str:
        return node_key(self._address, "job", job_id)

    def record(self, job_id: str, state: str, **fields: Any) -> None:
        now = time.time()
        values = {k: str(v) for k, v in fields.items() if v is not None}
        values["state"] = state
        values["updated_at"] = f"{now:.3f}"
        values[f"{state}_at"] = f"{now:.3f}"
        with self._redis.pipeline() as pipe:
            pipe.hset(self._job_key(job_id), mapping=values)  # type: ignore[arg-type]  # invariant stub
            pipe.expire(self._job_key(job_id), RECORD_TTL_S)
            pipe.zadd(node_key(self._address, "jobs"), {job_id: now})
            pipe.execute()

    def get(self, job_id: str) -> dict[str, str]:
        return dict(self._redis.hgetall(self._job_key(job_id)))  # type: ignore[arg-type]

    def count_delivery(self, job_id: str, attempt: int, ttl_s: int) -> int:
        """How many times this attempt of the job has been delivered to a worker."""
        key = node_key(self._address, "deliveries", job_id, str(attempt))
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, ttl_s)
            count, _ = pipe.execute()
        return int(count)
