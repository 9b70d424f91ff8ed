"""The job pipeline's first control-side steps (protocol.md section 2). Each step is a
small, restartable task on the control queue; the GPU step after them is
``blf.tasks.inference.run_inference`` on the model's queue, and ``blf.tasks.finish``
submits what it found:

    start_job ── claim ──► unlock_key ── CoFHE decrypt, seal ──► run_inference (GPU)
        ──► finish_job ── leader: CoFHE-encrypt Ko, commitment, result
                       └─ verifier: wait for the leader's CID, commitment, verdict

Every claimed job ends in a submitted result or verdict, or in a failure recorded with its
reason. Transient errors retry with backoff inside the job's deadline; permanent ones
fail the job once and submit nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from blf import crypto, runtime
from blf.app import app
from blf.authority import issue_continuation
from blf.errors import (
    BlfError,
    CofheTransportError,
    IclProtocolError,
    IclStatusError,
    IclTransportError,
)
from blf.names import model_queue, node_key
from blf.payloads import InferenceOrder, JobTicket
from blf.tasks import short, shown
from blf.tasks.steps import (
    backoff,
    fail,
    job_task,
    retry,
    retry_or_fail,
    seconds,
    too_many_deliveries,
    ttl,
)

__all__ = ["start_job", "unlock_key"]

log = logging.getLogger("blf.jobs")

CLAIM_RETRIES = 8
RUN_INFERENCE = "blf.tasks.inference.run_inference"


# --- 1. claim ----------------------------------------------------------------------------


@job_task(max_retries=CLAIM_RETRIES)
def start_job(self: Task, ticket: dict[str, Any]) -> str:
    job = JobTicket.model_validate(ticket)
    journal = runtime.journal()
    if too_many_deliveries(self, job, "claim"):
        return "failed"
    if time.time() > job.deadline:
        log.error("Job %s: aborted, deadline passed before it started", short(job.job_id))
        journal.record(job.job_id, "expired")
        return "expired"
    if self.request.retries == 0:
        log.info("Job %s: starting as %s", short(job.job_id), job.role)
        queued = time.time() - job.enqueued_at if job.enqueued_at else None
        journal.record_unless_final(
            job.job_id,
            "received",
            role=job.role,
            model_id=job.model_id,
            deadline=job.deadline,
            queue_s=seconds(queued),
            enqueued_at=job.enqueued_at,
        )
    try:
        return _claim(job)
    except (IclTransportError, IclProtocolError) as exc:
        # Repeating a claim for the same job id is the same claim, so retrying is safe.
        if self.request.retries >= CLAIM_RETRIES:
            return fail(job, f"claim: the ICL did not take it: {exc}")
        log.warning("Job %s: claim not confirmed (%s); retrying", short(job.job_id), exc)
        retry(self, job, backoff(self, cap=60.0))


def _claim(job: JobTicket) -> str:
    journal = runtime.journal()
    started = time.time()
    try:
        grant = runtime.icl().claim(job.job_id)
    except IclStatusError as exc:
        log.warning("Job %s: claim failed: %s", short(job.job_id), exc)
        journal.record(job.job_id, "claim-failed", reason=str(exc))
        return "claim-failed"
    claimed = job.model_copy(
        update={
            "kp_high_handle": grant.kp_high_handle or job.kp_high_handle,
            "kp_low_handle": grant.kp_low_handle or job.kp_low_handle,
        }
    )
    journal.record_unless_final(
        job.job_id,
        "claimed",
        kp_high_handle=claimed.kp_high_handle,
        kp_low_handle=claimed.kp_low_handle,
        claim_deadline=grant.claim_deadline,
        claim_s=seconds(time.time() - started),
    )
    log.info("Job %s: claimed", short(job.job_id))
    unlock_key.apply_async(kwargs={"ticket": claimed.model_dump()}, kwargsrepr=shown(job))
    return "claimed"


# --- 2. the prompt key -------------------------------------------------------------------


@job_task()
def unlock_key(self: Task, ticket: dict[str, Any]) -> str:
    """Decrypt the prompt key with CoFHE, seal it for the GPU side, dispatch the GPU work."""
    job = JobTicket.model_validate(ticket)
    if too_many_deliveries(self, job, "key"):
        return "failed"
    client = runtime.redis_client()
    dispatched = node_key(runtime.node().address, "dispatched", job.job_id)
    if client.exists(dispatched):
        return "dispatched"  # a redelivery of a step that had done its work
    if time.time() > job.deadline:
        return fail(job, "deadline passed before the prompt key was decrypted")
    if job.kp_high_handle is None or job.kp_low_handle is None:
        return fail(job, "prompt key: the ICL gave no key handles for this job")
    started = time.time()
    try:
        cluster_key = runtime.cluster_key()
        cofhe = runtime.cofhe()
        key = crypto.join_key(cofhe.decrypt(job.kp_high_handle), cofhe.decrypt(job.kp_low_handle))
    except CofheTransportError as exc:
        retry_or_fail(self, job, "prompt key: CoFHE unavailable", exc)
    except BlfError as exc:  # refused by CoFHE, halves that are no key, no cluster key
        return fail(job, f"prompt key: {exc}")
    key_s = time.time() - started
    _dispatch(job, crypto.seal(cluster_key, job.job_id, key))
    # Marked after the send: a crash in between sends the order twice (the submission
    # guard keeps the answer single), never zero times.
    client.set(dispatched, "1", ex=ttl(job))
    runtime.journal().record_unless_final(job.job_id, "inference", key_s=seconds(key_s))
    log.info("Job %s: prompt key decrypted; sent to %s workers", short(job.job_id), job.model_id)
    return "dispatched"


def _dispatch(job: JobTicket, sealed_key: str) -> None:
    address = runtime.node().address
    order = InferenceOrder(
        job_id=job.job_id,
        role=job.role,
        model_id=job.model_id,
        prompt_cid=job.prompt_cid,
        deadline=job.deadline,
        sealed_prompt_key=sealed_key,
        continuation=issue_continuation(runtime.redis_client(), address, job, "finish", ttl(job)),
        dispatched_at=time.time(),
    )
    app.send_task(
        RUN_INFERENCE,
        kwargs={"model_id": job.model_id, "order": order.model_dump()},
        queue=model_queue(address, job.model_id),
        kwargsrepr=shown(job),
        # Past its deadline nobody can use the answer: GPU workers drop the order unrun,
        # and the sweep records the job's failure.
        expires=max(job.deadline - time.time(), 1.0),
    )
