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
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from blf.errors import IclProtocolError, IclStatusError
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
    REFUSED = "refused"  # an earlier attempt was answered 4xx: never sent again


# Extend the lease only while it is still ours; free it only if it is still ours.
_KEEP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
        return self._state() == "done"

    def _state(self) -> str | None:
        value = self.client.get(self._mark)
        return value.decode() if isinstance(value, bytes) else value

    def submit(self, send: Callable[[], T], settle: Callable[[], Settled]) -> Submitted:
        """Send once. Transport errors propagate (retry the task); a 4xx marks the job
        ``refused`` and propagates (never retried: the ICL said no). ``settle`` must be
        quick (one try, bounded by its timeouts) so that the lease outlives it."""
        token = secrets.token_hex(16)
        if not self.client.set(self._lease, token, nx=True, ex=LEASE_S):
            return Submitted.BUSY
        try:
            return self._submit_holding_lease(token, send, settle)
        finally:
            self.client.eval(_DROP, 1, self._lease, token)

    def _submit_holding_lease(
        self, token: str, send: Callable[[], T], settle: Callable[[], Settled]
    ) -> Submitted:
        mark = self._state()
        if mark == "done":
            return Submitted.ALREADY
        if mark == "refused":
            return Submitted.REFUSED
        if mark == "attempted":
            settled = settle()
            if settled is not Settled.ABSENT:
                return self._settled(settled)
        # Renewed right before the call: a lease that lapsed while we asked the ICL may
        # now be another copy's, and then that copy sends, not us.
        if not self.client.eval(_KEEP, 1, self._lease, token, LEASE_S):
            return Submitted.BUSY
        self._set("attempted")  # before the call: a crash mid-call leaves it ambiguous
        try:
            send()
        except IclStatusError:
            self._set("refused")
            raise
        except IclProtocolError:
            pass  # the ICL answered 2xx: it took the submission, whatever its body says
        self._set("done")
        return Submitted.SENT

    def _settled(self, settled: Settled) -> Submitted:
        if settled is Settled.LANDED:
            self._set("done")
            return Submitted.ALREADY
        if settled is Settled.CLOSED:
            self._set("done")
            return Submitted.CLOSED
        return Submitted.UNCONFIRMED

    def _set(self, value: str) -> None:
        self.client.set(self._mark, value, ex=max(self.ttl_s, 1))


def drop_leases(client: redis.Redis, address: str) -> int:
    """Free every sending lease of the node. Only safe while none of its workers runs
    (``run`` calls it at start): a lease left by a killed worker would otherwise make the
    redelivered submission wait out ``LEASE_S``."""
    keys = list(client.scan_iter(match=node_key(address, "submit-lease", "*"), count=1000))
    return int(client.delete(*keys)) if keys else 0
