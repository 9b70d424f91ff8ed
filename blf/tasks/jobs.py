"""The job pipeline's tasks. Milestone 1 claims the job and records it; decryption,
inference and submission are the next milestone, and until then nothing pretends to run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from celery import Task
from pydantic import BaseModel, ConfigDict

from blf import runtime
from blf.app import app
from blf.errors import IclStatusError, IclTransportError
from blf.icl import Assignment
from blf.tasks import short

__all__ = ["RECORD_GRACE_S", "JobTicket", "start_job"]

log = logging.getLogger("blf.jobs")

RECORD_GRACE_S = 86400  # job marks and counters outlive the job's deadline by a day
CLAIM_RETRIES = 8


class JobTicket(BaseModel):
    """What a job task carries: ids, CIDs and ciphertext handles, never a key."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    role: Literal["leader", "verifier"]
    model_id: str
    prompt_cid: str
    deadline: int
    user_address: str | None = None
    insurance_opt_in: bool = False
    kp_high_handle: int | None = None
    kp_low_handle: int | None = None

    @classmethod
    def from_assignment(cls, assignment: Assignment) -> JobTicket:
        return cls.model_validate(assignment.model_dump(include=set(cls.model_fields)))


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=CLAIM_RETRIES)
def start_job(self: Task, ticket: dict[str, Any]) -> str:
    job = JobTicket.model_validate(ticket)
    node, journal = runtime.node(), runtime.journal()
    ttl = max(job.deadline - int(time.time()), 0) + RECORD_GRACE_S
    # Counted per attempt: a retry is a new message, a redelivery the same one again.
    deliveries = journal.count_delivery(job.job_id, self.request.retries, ttl)
    if deliveries > node.settings.max_job_deliveries:
        log.error(
            "Job %s: aborted after %d deliveries (a worker died each time)",
            short(job.job_id),
            deliveries - 1,
        )
        journal.record(job.job_id, "failed", reason="too many redeliveries")
        return "failed"
    if time.time() > job.deadline:
        log.error("Job %s: aborted, deadline passed before it started", short(job.job_id))
        journal.record(job.job_id, "expired")
        return "expired"
    if self.request.retries == 0 and deliveries == 1:
        log.info("Job %s: starting as %s", short(job.job_id), job.role)
        journal.record(job.job_id, "received", role=job.role, model_id=job.model_id)
    try:
        return _claim(job)
    except IclTransportError as exc:
        # Repeating a claim for the same job id is the same claim, so retrying is safe.
        if self.request.retries >= CLAIM_RETRIES:
            log.error("Job %s: aborted, the ICL did not take the claim: %s", short(job.job_id), exc)
            journal.record(job.job_id, "failed", reason=f"claim: {exc}")
            return "failed"
        log.warning("Job %s: claim not confirmed (%s); retrying", short(job.job_id), exc)
        raise self.retry(countdown=min(2 ** (self.request.retries + 1), 60)) from exc


def _claim(job: JobTicket) -> str:
    journal = runtime.journal()
    try:
        grant = runtime.icl().claim(job.job_id)
    except IclStatusError as exc:
        log.warning("Job %s: claim failed: %s", short(job.job_id), exc)
        journal.record(job.job_id, "claim-failed", reason=str(exc))
        return "claim-failed"
    journal.record(
        job.job_id,
        "claimed",
        kp_high_handle=grant.kp_high_handle or job.kp_high_handle,
        kp_low_handle=grant.kp_low_handle or job.kp_low_handle,
        claim_deadline=grant.claim_deadline,
    )
    log.info("Job %s: claimed", short(job.job_id))
    log.info(
        "Job %s: recorded; this release has no inference pipeline, so it will not be answered",
        short(job.job_id),
    )
    return "claimed"
