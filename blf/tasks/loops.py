"""The four periodic duties of protocol.md section 6, run by beat on the control queue.

Periodic tasks ack early and ignore results: a lost tick is replaced by the next one, and
each beat entry expires after one period so ticks never pile up behind a slow ICL.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_shutting_down
from redis.exceptions import LockError

from blf import runtime
from blf.app import app, node_key
from blf.errors import AttestationError, BlfError, ChainError, IclError, NodeUnknownError
from blf.icl import Assignment
from blf.tasks import short
from blf.tasks.jobs import JobTicket, start_job

__all__ = ["attestation_watchdog", "chain_heartbeat", "icl_heartbeat", "poll_assignments"]

log = logging.getLogger("blf.loops")

QUIET_LOG_S = 60
SEEN_GRACE_S = 86400  # a seen-mark outlives the job's deadline by a day
ATTEST_LOCK_S = 120

periodic = app.task(acks_late=False, ignore_result=True)

# Set when this worker begins a warm shutdown: a poll tick already fetched from the queue
# must not take on new jobs while the node is stopping.
_stopping = threading.Event()


@worker_shutting_down.connect
def _stop_polling(**_: Any) -> None:
    _stopping.set()


@periodic
def icl_heartbeat() -> None:
    try:
        runtime.icl().heartbeat()
    except IclError as exc:
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
    fresh = [a for a in assignments if _first_sighting(a)]
    redis = runtime.redis_client()
    quiet_key = node_key(app.conf.blf_address, "quiet")
    if not fresh:
        if redis.set(quiet_key, "1", nx=True, ex=QUIET_LOG_S):
            log.info("No assignments for last %ds", QUIET_LOG_S)
        return
    redis.set(quiet_key, "1", ex=QUIET_LOG_S)
    log.info("Received %d assignment(s)", len(fresh))
    for assignment in fresh:
        _enqueue(assignment)


def _fetch_assignments() -> list[Assignment]:
    icl = runtime.icl()
    try:
        return icl.assignments()
    except NodeUnknownError as exc:
        log.warning("%s", exc)
        if not reattest(stale_cert=runtime.node().settings.attestation_cert_hash):
            return []
        return icl.assignments()


def _first_sighting(assignment: Assignment) -> bool:
    """True exactly once per job id for this node, whatever pollers race or restart."""
    ttl = max(assignment.deadline - int(time.time()), 0) + SEEN_GRACE_S
    key = node_key(app.conf.blf_address, "seen", assignment.job_id)
    return bool(runtime.redis_client().set(key, assignment.role, nx=True, ex=ttl))


def _enqueue(assignment: Assignment) -> None:
    ticket = JobTicket.from_assignment(assignment)
    log.info("Spawning %s job %s", ticket.role, short(ticket.job_id))
    try:
        start_job.apply_async(kwargs={"ticket": ticket.model_dump()})
    except Exception:
        # Not enqueued: forget the sighting so the next poll tries again.
        runtime.redis_client().delete(node_key(app.conf.blf_address, "seen", ticket.job_id))
        raise


@periodic
def attestation_watchdog() -> None:
    node = runtime.node()
    node.reload()
    if node.needs_attestation():
        reattest()


def reattest(*, stale_cert: str | None = None) -> bool:
    """Re-attest under a per-node lock, so a watchdog and a poller never both do it.

    ``stale_cert`` is the certificate the ICL just refused: re-attest only if nobody
    replaced it meanwhile. Without it, re-attest only if the certificate is due.
    Returns whether the node holds a usable certificate afterwards.
    """
    node = runtime.node()
    lock = runtime.redis_client().lock(
        node_key(app.conf.blf_address, "attest-lock"),
        timeout=ATTEST_LOCK_S,
        blocking_timeout=ATTEST_LOCK_S,
    )
    try:
        with lock:
            node.reload()
            current = node.settings.attestation_cert_hash
            if stale_cert is not None and current != stale_cert:
                return True
            if stale_cert is None and not node.needs_attestation():
                return True
            node.attest(icl=runtime.icl())
    except (AttestationError, IclError, LockError) as exc:
        log.error("Attestation failed: %s", exc)
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
    try:
        outcome = node.chain().heartbeat_if_due(
            interval_s=int(settings.chain_heartbeat_interval_s),
            margin_s=int(settings.chain_heartbeat_check_s) * 2,
        )
    except ChainError as exc:
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
