"""The four periodic duties of protocol.md section 6, run by beat on the control queue.

Periodic tasks ack early and ignore results: a lost tick is replaced by the next one, and
each beat entry expires after one period so ticks never pile up behind a slow ICL. None
of them raises: a failure is logged and the next tick tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

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

periodic = app.task(base=ControlTask, acks_late=False, ignore_result=True)

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


@periodic
def icl_heartbeat() -> None:
    try:
        runtime.icl().heartbeat()
    except BlfError as exc:
        log.warning("Heartbeat failed: %s", exc)
        return
    log.info("Heartbeat sent to ICL")


@periodic
def poll_assignments() -> None:
    if _stopping.is_set():
        return
    try:
        assignments = _fetch_assignments()
    except BlfError as exc:
        log.warning("Assignment poll failed: %s", exc)
        return
    fresh = [a for a in assignments if _servable(a) and _mark_pending(a)]
    redis = runtime.redis_client()
    if not fresh:
        if redis.set(_key("quiet"), "1", nx=True, ex=QUIET_LOG_S):
            log.info("No assignments for last %ds", QUIET_LOG_S)
        return
    redis.set(_key("quiet"), "1", ex=QUIET_LOG_S)
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
    redis = runtime.redis_client()
    if redis.exists(_key("attest-failed")):
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
        redis.set(_key("attest-failed"), "1", ex=REATTEST_BACKOFF_S)
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
    else:
        log.debug("On-chain heartbeat not due for %ss", outcome.seconds_until_due)


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
