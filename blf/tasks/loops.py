"""The four periodic duties of protocol.md section 6, run by beat on the control queue.

Periodic tasks ack early and ignore results: a lost tick is replaced by the next one, and
each beat entry expires after one period so ticks never pile up behind a slow ICL. None
of them raises: a failure is logged and the next tick tries again.

An ICL outage is logged in three kinds of line, not one per tick (720 an hour for the
poller): its first failure, a summary at most once a minute while it lasts ("ICL
unreachable for 3m: 36 polls failed, last: ..."), and its end ("ICL reachable again
after 4m (48 polls failed)"). The outage's record lives in Redis, so the pool's threads,
and every control worker of the node, share one outage and one set of lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from celery.signals import worker_shutting_down
from redis.exceptions import LockError

from blf import runtime
from blf.app import app, node_key
from blf.authority import ControlTask
from blf.capacity import live_workers
from blf.errors import BlfError, NodeUnknownError
from blf.icl import NO_RETRY, Assignment
from blf.journal import FINAL_STATES
from blf.payloads import JobTicket
from blf.tasks import short, shown
from blf.tasks.jobs import start_job
from blf.tasks.steps import ttl

__all__ = [
    "OutageLog",
    "attestation_watchdog",
    "chain_heartbeat",
    "icl_heartbeat",
    "poll_assignments",
    "sweep_jobs",
]

log = logging.getLogger("blf.loops")

QUIET_LOG_S = 60
# A job is marked "enqueueing" this long before its publish is confirmed: if the worker
# dies in between, the mark lapses and a later poll enqueues the job after all.
PENDING_MARK_S = 60
ATTEST_LOCK_S = 120
REATTEST_BACKOFF_S = 60
CHAIN_LOCK_S = 300  # longer than a heartbeat transaction takes to be mined
SWEEP_GRACE_S = 60  # past a job's deadline, before the sweep calls it failed
SWEEP_SCAN = 1000  # most recently updated jobs the sweep looks at

# No task events: the ticks (over 800 an hour) would bury the jobs in Flower, and each
# costs the worker three publishes; the log, the journal and the metrics tell of them.
periodic = app.task(base=ControlTask, acks_late=False, ignore_result=True, send_events=False)

# Set when this worker begins a warm shutdown: a poll tick already fetched from the queue
# must not take on new jobs while the node is stopping.
_stopping = threading.Event()


@worker_shutting_down.connect
def _stop_polling(**_: Any) -> None:
    _stopping.set()


def _key(*parts: str) -> str:
    return node_key(app.conf.blf_address, *parts)


@contextmanager
def _exclusive(name: str, ttl_s: float) -> Iterator[bool]:
    """A per-node Redis lock, taken without waiting; yields whether we hold it."""
    lock = runtime.redis_client().lock(_key(name), timeout=ttl_s, blocking_timeout=0)
    acquired = bool(lock.acquire())
    try:
        yield acquired
    finally:
        if acquired:
            with suppress(LockError):  # it expired under us: nothing left to release
                lock.release()


# --- outages: one line when it starts, one a minute while it lasts, one when it ends -----

# Seconds between two summaries of one outage.
OUTAGE_SUMMARY_S = 60.0
# An outage record no failure has renewed for this long is over (the node was stopped
# meanwhile, say): the next failure starts a new outage instead of extending it.
OUTAGE_FORGET_S = 900

# KEYS[1]: the record. ARGV: now, OUTAGE_SUMMARY_S, OUTAGE_FORGET_S.
# Returns {what to log ("first", "summary" or ""), failures so far, since}.
_FAILED = """
local first = redis.call('HSETNX', KEYS[1], 'since', ARGV[1])
local count = redis.call('HINCRBY', KEYS[1], 'count', 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if first == 1 then
  redis.call('HSET', KEYS[1], 'logged', ARGV[1])
  return {'first', count, ARGV[1]}
end
local since = redis.call('HGET', KEYS[1], 'since')
local logged = tonumber(redis.call('HGET', KEYS[1], 'logged') or since)
if tonumber(ARGV[1]) - logged >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'logged', ARGV[1])
  return {'summary', count, since}
end
return {'', count, since}
"""

# KEYS[1]: the record. Returns {failures, since} of the outage it ends, or nothing.
_SUCCEEDED = """
local record = redis.call('HMGET', KEYS[1], 'count', 'since')
if not record[2] then return false end
redis.call('DEL', KEYS[1])
return record
"""


def _span(seconds: float) -> str:
    """``45s``, ``3m``, ``2h 5m``: an outage's length, as the summaries say it."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


class OutageLog:
    """The log of one kind of ICL call (the poll, the heartbeat) while it keeps failing.

    ``failed`` logs the first failure of an outage as a WARNING (``first``, with the
    error), then at most one summary per ``OUTAGE_SUMMARY_S``; ``succeeded`` logs the end
    of an outage, if there was one. Each is one atomic Redis script on the node's record,
    so threads and processes racing on the same outage log each line once. Without Redis
    every failure is logged, as before.
    """

    def __init__(
        self, name: str, *, first: str, call: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = name
        self.first = first  # the first failure's line, with %s for the error
        self.call = call  # what failed: "poll", "heartbeat"
        self.clock = clock

    def _calls(self, count: int) -> str:
        return f"{count} {self.call}{'' if count == 1 else 's'}"

    def _run(self, script: str, *args: Any) -> Any:
        # EVALSHA: the script's text crosses the socket only the first time.
        run = runtime.redis_client().register_script(script)
        return run(keys=[_key("outage", self.name)], args=args)

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        try:
            kind, count, since = self._run(_FAILED, repr(now), OUTAGE_SUMMARY_S, OUTAGE_FORGET_S)
        except redis.RedisError:
            log.warning(self.first, exc)
            return
        if kind == "first":
            log.warning(self.first, exc)
        elif kind == "summary":
            log.warning(
                "ICL unreachable for %s: %s failed, last: %s",
                _span(now - float(since)),
                self._calls(int(count)),
                exc,
            )

    def succeeded(self) -> None:
        try:
            ended = self._run(_SUCCEEDED)
        except redis.RedisError:
            return
        if ended:
            count, since = ended
            log.info(
                "ICL reachable again after %s (%s failed)",
                _span(self.clock() - float(since)),
                self._calls(int(count)),
            )


HEARTBEAT_OUTAGE = OutageLog("heartbeat", first="Heartbeat failed: %s", call="heartbeat")
POLL_OUTAGE = OutageLog("poll", first="Assignment poll failed: %s", call="poll")


@periodic
def icl_heartbeat() -> None:
    try:
        runtime.icl().heartbeat()
    except BlfError as exc:
        HEARTBEAT_OUTAGE.failed(exc)
        return
    HEARTBEAT_OUTAGE.succeeded()
    log.info("Heartbeat sent to ICL")
    _note_heartbeat("icl")


def _note_heartbeat(kind: str, at: float | None = None) -> None:
    """For the metrics endpoint's heartbeat ages; a Redis blip costs only the note."""
    from blf.metrics import note_heartbeat  # with prometheus_client: only when needed

    with suppress(redis.RedisError):
        note_heartbeat(runtime.redis_client(), runtime.node().address, kind, at=at)


@periodic
def poll_assignments() -> None:
    if _stopping.is_set():
        return
    try:
        assignments = _fetch_assignments()
    except BlfError as exc:
        POLL_OUTAGE.failed(exc)
        return
    POLL_OUTAGE.succeeded()
    fresh = [a for a in assignments if _servable(a) and _mark_pending(a)]
    client = runtime.redis_client()
    if not fresh:
        if client.set(_key("quiet"), "1", nx=True, ex=QUIET_LOG_S):
            log.info("No assignments for last %ds", QUIET_LOG_S)
        return
    client.set(_key("quiet"), "1", ex=QUIET_LOG_S)
    log.info("Received %d assignment(s)", len(fresh))
    for assignment in fresh:
        _enqueue(assignment)


def _fetch_assignments() -> list[Assignment]:
    # No retries: the next tick is seconds away, and retrying would only hold a thread.
    icl = runtime.icl()
    try:
        return icl.assignments(retry=NO_RETRY)
    except NodeUnknownError as exc:
        log.warning("%s", exc)
        if not reattest(stale_cert=runtime.node().settings.attestation_cert_hash):
            return []
        return icl.assignments(retry=NO_RETRY)


def _servable(assignment: Assignment) -> bool:
    """A job is claimed only when a live worker serves its model: a claimed job nobody
    answers costs the operator. An unservable one is left listed, for a later poll."""
    settings = runtime.node().settings
    if not settings.claim_requires_worker:
        return True
    client = runtime.redis_client()
    if live_workers(client, runtime.node().address, assignment.model_id):
        return True
    if client.set(_key("unservable", assignment.job_id), "1", nx=True, ex=QUIET_LOG_S):
        log.warning(
            "Job %s: not claimed: no live worker serves model %s",
            short(assignment.job_id),
            assignment.model_id,
        )
    return False


def _mark_pending(assignment: Assignment) -> bool:
    """True exactly once per job id for this node, whatever pollers race or restart."""
    key = _key("seen", assignment.job_id)
    return bool(runtime.redis_client().set(key, "pending", nx=True, ex=PENDING_MARK_S))


def _enqueue(assignment: Assignment) -> None:
    fields = assignment.model_dump(include=set(JobTicket.model_fields))
    ticket = JobTicket.model_validate({**fields, "enqueued_at": time.time()})
    log.info("Spawning %s job %s", ticket.role, short(ticket.job_id))
    key = _key("seen", ticket.job_id)
    try:
        start_job.apply_async(kwargs={"ticket": ticket.model_dump()}, kwargsrepr=shown(ticket))
    except Exception as exc:  # kombu raises many kinds; the job must not be lost to any
        runtime.redis_client().delete(key)  # the next poll tries again
        log.warning("Job %s: not queued (%s); the next poll retries", short(ticket.job_id), exc)
        return
    runtime.redis_client().set(key, ticket.role, ex=ttl(ticket))


@periodic
def attestation_watchdog() -> None:
    try:
        node = runtime.node()
        node.reload()
        due = node.needs_attestation()
    except BlfError as exc:
        log.error("Attestation watchdog: %s", exc)
        return
    if due:
        reattest()


def reattest(*, stale_cert: str | None = None) -> bool:
    """Re-attest under a per-node lock, so a watchdog and a poller never both do it.

    ``stale_cert`` is the certificate the ICL just refused: re-attest only if nobody
    replaced it meanwhile. Without it, re-attest only if the certificate is due. After a
    failure, attempts pause for a minute rather than hit the ICL on every 5 s poll.
    Returns whether the node holds a usable certificate afterwards.
    """
    client = runtime.redis_client()
    if client.exists(_key("attest-failed")):
        return False
    node = runtime.node()
    try:
        with _exclusive("attest-lock", ATTEST_LOCK_S) as mine:
            if not mine:
                return False  # another task is attesting right now
            node.reload()
            if stale_cert is not None and node.settings.attestation_cert_hash != stale_cert:
                return True
            if stale_cert is None and not node.needs_attestation():
                return True
            node.attest(icl=runtime.icl())
    except BlfError as exc:
        log.error("Attestation failed: %s", exc)
        client.set(_key("attest-failed"), "1", ex=REATTEST_BACKOFF_S)
        return False
    return True


_chain_disabled_logged = False


@periodic
def chain_heartbeat() -> None:
    global _chain_disabled_logged
    node = runtime.node()
    settings = node.settings
    if not settings.rpc_url:
        if not _chain_disabled_logged:
            log.info("On-chain heartbeat disabled: no rpc_url configured")
            _chain_disabled_logged = True
        return
    # Two overlapping checks would both read the old lastHeartbeat and both pay for one.
    with _exclusive("chain-lock", CHAIN_LOCK_S) as mine:
        if not mine:
            log.debug("On-chain heartbeat check already running")
            return
        try:
            outcome = node.chain().heartbeat_if_due(
                interval_s=int(settings.chain_heartbeat_interval_s),
                margin_s=int(settings.chain_heartbeat_check_s) * 2,
            )
        except BlfError as exc:
            log.warning("On-chain heartbeat failed: %s", exc)
            return
    if outcome.status == "not_registered":
        log.warning(
            "On-chain heartbeat skipped: %s is not registered in NodeRegistry; "
            "register with `blindference-node attest --mock --register-on-chain`",
            node.address,
        )
    elif outcome.status == "sent":
        log.info("On-chain heartbeat sent (tx %s)", outcome.tx_hash)
        _note_heartbeat("chain", at=time.time())
    else:
        log.debug("On-chain heartbeat not due for %ss", outcome.seconds_until_due)
        if outcome.last_heartbeat is not None:
            _note_heartbeat("chain", at=outcome.last_heartbeat)


@periodic
def sweep_jobs() -> None:
    """Record the failure of every job still unfinished past its deadline: its answer was
    lost on the way (an order that expired unrun, a GPU worker gone for good), and a
    claimed job must not stay "in progress" in the journal for ever."""
    journal = runtime.journal()
    now = time.time()
    for job_id, record in journal.recent(SWEEP_SCAN):
        deadline = float(record.get("deadline") or 0)
        state = record.get("state", "")
        if state in FINAL_STATES or not deadline or now < deadline + SWEEP_GRACE_S:
            continue
        reason = f"no answer before the deadline (it was at {state!r})"
        if journal.record_unless_final(job_id, "failed", reason=reason):
            log.error("Job %s: failed: %s", short(job_id), reason)
