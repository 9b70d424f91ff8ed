"""At most one submission per job, whatever is redelivered, retried or replayed.

Two Redis keys per job. The *mark* records that a send was attempted (``attempted``) and
whether it is known to have landed (``done``); it outlives the job. The *lease* is held
only while one task is sending, so two copies of a task never send at the same moment.

A send that fails ambiguously (timeout, reset, 5xx: the ICL may or may not have recorded
it) leaves the mark at ``attempted``. The next attempt never just sends again: it asks the
ICL (``settle``) and sends only when the ICL shows that nothing of ours landed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from blf.errors import IclStatusError
from blf.names import node_key

__all__ = ["LEASE_S", "Settled", "Submission", "Submitted", "drop_leases"]

LEASE_S = 60  # longer than one ICL call can take (connect 5 s + read 15 s, with margin)
T = TypeVar("T")


class Settled(enum.Enum):
    """What the ICL says about an earlier, ambiguous send."""

    LANDED = "landed"  # it has our submission
    ABSENT = "absent"  # it has nothing of ours: sending now is the first that lands
    CLOSED = "closed"  # the job is decided or expired: nothing to send any more
    UNKNOWN = "unknown"  # it cannot tell us: we do not risk a second submission


class Submitted(enum.Enum):
    SENT = "sent"
    ALREADY = "already"  # an earlier attempt sent it (known, or settled as landed)
    BUSY = "busy"  # another copy of this task is sending right now: try again shortly
    CLOSED = "closed"
    UNCONFIRMED = "unconfirmed"  # ambiguous and unknowable: not sent again


@dataclass
class Submission:
    client: redis.Redis
    address: str
    job_id: str
    ttl_s: int

    @property
    def _mark(self) -> str:
        return node_key(self.address, "submitted", self.job_id)

    @property
    def _lease(self) -> str:
        return node_key(self.address, "submit-lease", self.job_id)

    def done(self) -> bool:
        return self.client.get(self._mark) in ("done", b"done")

    def submit(self, send: Callable[[], T], settle: Callable[[], Settled]) -> Submitted:
        """Send once. Transport errors propagate (retry the task); a 4xx marks the job
        ``refused`` and propagates (never retried: the ICL said no)."""
        if not self.client.set(self._lease, "1", nx=True, ex=LEASE_S):
            return Submitted.BUSY
        try:
            return self._submit_holding_lease(send, settle)
        finally:
            self.client.delete(self._lease)

    def _submit_holding_lease(
        self, send: Callable[[], T], settle: Callable[[], Settled]
    ) -> Submitted:
        mark = self.client.get(self._mark)
        mark = mark.decode() if isinstance(mark, bytes) else mark
        if mark in ("done", "refused"):
            return Submitted.ALREADY
        if mark == "attempted":
            settled = settle()
            if settled is Settled.LANDED:
                self._set("done")
                return Submitted.ALREADY
            if settled is Settled.CLOSED:
                self._set("done")
                return Submitted.CLOSED
            if settled is Settled.UNKNOWN:
                return Submitted.UNCONFIRMED
        self._set("attempted")  # before the call: a crash mid-call leaves it ambiguous
        try:
            send()
        except IclStatusError:
            self._set("refused")
            raise
        self._set("done")
        return Submitted.SENT

    def _set(self, value: str) -> None:
        self.client.set(self._mark, value, ex=max(self.ttl_s, 1))


def drop_leases(client: redis.Redis, address: str) -> int:
    """Free every sending lease of the node. Only safe while none of its workers runs
    (``run`` calls it at start): a lease left by a killed worker would otherwise make the
    redelivered submission wait out ``LEASE_S``."""
    keys = list(client.scan_iter(match=node_key(address, "submit-lease", "*"), count=1000))
    return int(client.delete(*keys)) if keys else 0
