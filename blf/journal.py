"""Job states and timings in Redis, per node: what the node received, claimed, finished.

A job's record is a hash ``blf:<address>:job:<id>``; ``blf:<address>:jobs`` indexes them
by last update. Records expire after a week: the ICL, not us, is the system of record.

A record holds the state, the time of each state (``<state>_at``) and the seconds spent in
each stage (``queue_s``, ``claim_s``, ``key_s``, ``gpu_queue_s``, ``download_s``,
``inference_s``, ``upload_s``, ``output_key_s``, ``submit_s``; ``total_s`` from the poll
that saw the job to its submission), plus ids, hashes and reasons: never a prompt, an
output or a key.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from blf.names import node_key

__all__ = ["FINAL_STATES", "STAGES", "Journal", "outcomes_key"]

RECORD_TTL_S = 7 * 86400
# States a job does not leave (a late submission may still turn "failed" into "submitted").
FINAL_STATES = frozenset(
    {"submitted", "failed", "expired", "claim-failed", "closed", "unconfirmed"}
)
STAGES = (  # seconds per stage, in the order a job passes them
    "queue_s",
    "claim_s",
    "key_s",
    "gpu_queue_s",
    "download_s",
    "inference_s",
    "upload_s",
    "output_key_s",
    "submit_s",
    "total_s",
)


def outcomes_key(address: str) -> str:
    """A hash of ``<role>:<final state>`` → jobs that ever reached it: monotonic, unlike the
    records themselves, which expire after a week (Prometheus counts need that)."""
    return node_key(address, "job-outcomes")


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
        key = self._job_key(job_id)
        final = state in FINAL_STATES
        with self._redis.pipeline() as pipe:
            if final:  # first arrival in this final state: counted once, whatever repeats
                pipe.hsetnx(key, f"counted_{state}", "1")
            pipe.hset(key, mapping=values)  # type: ignore[arg-type]  # invariant stub
            pipe.expire(key, RECORD_TTL_S)
            pipe.zadd(node_key(self._address, "jobs"), {job_id: now})
            pipe.hget(key, "role")
            replies = pipe.execute()
        if final and replies[0]:
            role = replies[-1] or "unknown"
            self._redis.hincrby(outcomes_key(self._address), f"{_text(role)}:{state}", 1)

    def record_unless_final(self, job_id: str, state: str, **fields: Any) -> bool:
        """``record``, unless the job already reached a final state (a redelivered step
        must not turn a submitted job back into a running or failed one)."""
        if self._redis.hget(self._job_key(job_id), "state") in FINAL_STATES:
            return False
        self.record(job_id, state, **fields)
        return True

    def get(self, job_id: str) -> dict[str, str]:
        return dict(self._redis.hgetall(self._job_key(job_id)))  # type: ignore[arg-type]

    def recent(self, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The ``limit`` most recently updated jobs, newest first (expired ones skipped)."""
        ids = self._redis.zrevrange(node_key(self._address, "jobs"), 0, max(limit, 1) - 1)
        found = [(str(job_id), self.get(str(job_id))) for job_id in ids]
        return [(job_id, record) for job_id, record in found if record]

    def count_delivery(self, job_id: str, attempt: str, ttl_s: int) -> int:
        """How many times this attempt (a step and its retry number) of the job has been
        delivered to a worker."""
        key = node_key(self._address, "deliveries", job_id, attempt)
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, ttl_s)
            count, _ = pipe.execute()
        return int(count)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
