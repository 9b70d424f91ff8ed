"""The job pipeline's control-side tasks (protocol.md section 2). Each step is a small,
restartable task on the control queue; the GPU step between them is
``blf.tasks.inference.run_inference`` on the model's queue:

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
from typing import Any, NoReturn

from celery import Task
from pydantic import TypeAdapter, ValidationError

from blf import crypto, runtime
from blf.app import app, visibility_timeout
from blf.authority import ControlTask, Refused, issue_continuation, redeem_continuation
from blf.errors import (
    BlfError,
    CofheTransportError,
    IclStatusError,
    IclTransportError,
)
from blf.icl import EncryptedInput, EncryptedKeyInputs, JobStatus, LeaderResult, Verdict
from blf.names import model_queue
from blf.payloads import InferenceOrder, InferenceOutcome, InferenceResult, JobTicket
from blf.submission import Settled, Submission, Submitted
from blf.tasks import short, shown

__all__ = ["RECORD_GRACE_S", "finish_job", "start_job", "unlock_key"]

log = logging.getLogger("blf.jobs")

RECORD_GRACE_S = 86400  # job marks and counters outlive the job's deadline by a day
CLAIM_RETRIES = 8
RUN_INFERENCE = "blf.tasks.inference.run_inference"
OUTCOME = TypeAdapter(InferenceOutcome)


def job_task(**options: Any) -> Any:
    """A pipeline step: control queue, acknowledged once done (a dead worker's step is
    redelivered), retried by its own policy (``max_retries=None``: the deadline bounds it)."""
    defaults = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}
    return app.task(base=ControlTask, **{**defaults, "max_retries": None, **options})


def _ttl(job: JobTicket) -> int:
    return max(job.deadline - int(time.time()), 0) + RECORD_GRACE_S


def _fail(job: JobTicket, reason: str) -> str:
    log.error("Job %s: failed: %s", short(job.job_id), reason)
    runtime.journal().record(job.job_id, "failed", reason=reason)
    return "failed"


def _backoff(task: Task, cap: float = 30.0) -> float:
    # Countdowns stay well under the visibility timeout: kombu would otherwise redeliver a
    # message that a worker still holds waiting for its ETA.
    ceiling = min(cap, visibility_timeout(runtime.node().settings) / 4)
    return float(min(2 ** (task.request.retries + 1), ceiling))


def _retry_or_fail(task: Task, job: JobTicket, what: str, exc: Exception) -> NoReturn:
    delay = _backoff(task)
    if time.time() + delay >= job.deadline:
        _fail(job, f"{what}: still failing at the deadline: {exc}")
        raise _Done("failed")
    log.warning("Job %s: %s (%s); retrying in %.0fs", short(job.job_id), what, exc, delay)
    raise task.retry(countdown=delay)


class _Done(Exception):
    """Ends a task early with a result (a recorded failure), without another retry."""


def _too_many_deliveries(task: Task, job: JobTicket, step: str) -> bool:
    """A message redelivered again and again kills its workers: fail it instead."""
    journal = runtime.journal()
    deliveries = journal.count_delivery(job.job_id, f"{step}.{task.request.retries}", _ttl(job))
    if deliveries > runtime.node().settings.max_job_deliveries:
        log.error(
            "Job %s: aborted after %d deliveries (a worker died each time)",
            short(job.job_id),
            deliveries - 1,
        )
        journal.record(job.job_id, "failed", reason=f"{step}: too many redeliveries")
        return True
    return False


# --- 1. claim ----------------------------------------------------------------------------


@job_task(max_retries=CLAIM_RETRIES)
def start_job(self: Task, ticket: dict[str, Any]) -> str:
    job = JobTicket.model_validate(ticket)
    journal = runtime.journal()
    if _too_many_deliveries(self, job, "claim"):
        return "failed"
    if time.time() > job.deadline:
        log.error("Job %s: aborted, deadline passed before it started", short(job.job_id))
        journal.record(job.job_id, "expired")
        return "expired"
    if self.request.retries == 0:
        log.info("Job %s: starting as %s", short(job.job_id), job.role)
        queued = time.time() - job.enqueued_at if job.enqueued_at else None
        journal.record(
            job.job_id,
            "received",
            role=job.role,
            model_id=job.model_id,
            queue_s=_seconds(queued),
            enqueued_at=job.enqueued_at,
        )
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
    journal.record(
        job.job_id,
        "claimed",
        kp_high_handle=claimed.kp_high_handle,
        kp_low_handle=claimed.kp_low_handle,
        claim_deadline=grant.claim_deadline,
        claim_s=_seconds(time.time() - started),
    )
    log.info("Job %s: claimed", short(job.job_id))
    unlock_key.apply_async(kwargs={"ticket": claimed.model_dump()}, kwargsrepr=shown(job))
    return "claimed"


# --- 2. the prompt key -------------------------------------------------------------------


@job_task()
def unlock_key(self: Task, ticket: dict[str, Any]) -> str:
    """Decrypt the prompt key with CoFHE, seal it for the GPU side, dispatch the GPU work."""
    job = JobTicket.model_validate(ticket)
    if _too_many_deliveries(self, job, "key"):
        return "failed"
    try:
        return _unlock_and_dispatch(self, job)
    except _Done as done:
        return str(done)


def _unlock_and_dispatch(task: Task, job: JobTicket) -> str:
    if time.time() > job.deadline:
        return _fail(job, "deadline passed before the prompt key was decrypted")
    if job.kp_high_handle is None or job.kp_low_handle is None:
        return _fail(job, "prompt key: the ICL gave no key handles for this job")
    started = time.time()
    try:
        cofhe = runtime.cofhe()
        key = crypto.join_key(cofhe.decrypt(job.kp_high_handle), cofhe.decrypt(job.kp_low_handle))
    except CofheTransportError as exc:
        _retry_or_fail(task, job, "prompt key: CoFHE unavailable", exc)
    except BlfError as exc:  # refused by CoFHE, or halves that are no key
        return _fail(job, f"prompt key: {exc}")
    key_s = time.time() - started
    node = runtime.node()
    order = InferenceOrder(
        job_id=job.job_id,
        role=job.role,
        model_id=job.model_id,
        prompt_cid=job.prompt_cid,
        deadline=job.deadline,
        sealed_prompt_key=crypto.seal(runtime.cluster_key(), job.job_id, key),
        continuation=issue_continuation(
            runtime.redis_client(), node.address, job, "finish", _ttl(job)
        ),
        dispatched_at=time.time(),
    )
    app.send_task(
        RUN_INFERENCE,
        kwargs={"model_id": job.model_id, "order": order.model_dump()},
        queue=model_queue(node.address, job.model_id),
        kwargsrepr=shown(job),
    )
    runtime.journal().record(job.job_id, "inference", key_s=_seconds(key_s))
    log.info(
        "Job %s: prompt key decrypted; sent to the %s workers", short(job.job_id), job.model_id
    )
    return "dispatched"


# --- 3. after the GPU work: result or verdict ---------------------------------------------


@job_task(continuation_step="finish")
def finish_job(self: Task, continuation: str, outcome: dict[str, Any]) -> str:
    node = runtime.node()
    try:
        job = redeem_continuation(
            runtime.redis_client(), node.address, continuation, "finish", self.request.id
        )
    except Refused as exc:
        log.error("Refused %s (task %s): %s", self.name, self.request.id, exc)
        return "refused"
    if _too_many_deliveries(self, job, "finish"):
        return "failed"
    try:
        result = OUTCOME.validate_python(outcome)
    except ValidationError as exc:
        return _fail(job, f"the GPU worker's answer is invalid: {str(exc).splitlines()[0]}")
    if result.job_id != job.job_id:
        return _fail(job, "the GPU worker answered for another job")
    if not isinstance(result, InferenceResult):
        return _fail(job, result.reason)
    if self.request.retries == 0:
        _record_gpu_stages(job, result)
    try:
        if job.role == "leader":
            return _finish_leader(self, job, result)
        return _finish_verifier(self, job, result)
    except _Done as done:
        return str(done)


def _record_gpu_stages(job: JobTicket, result: InferenceResult) -> None:
    runtime.journal().record(
        job.job_id,
        "submitting",
        gpu_queue_s=_seconds(result.queue_s),
        download_s=_seconds(result.download_s),
        inference_s=_seconds(result.inference_s),
        upload_s=_seconds(result.upload_s) if job.role == "leader" else None,
        backend=result.backend,
        output_sha256=result.output_sha256,
    )


def _finish_leader(task: Task, job: JobTicket, result: InferenceResult) -> str:
    if result.output_cid is None or result.sealed_output_key is None:
        return _fail(job, "the GPU worker's leader answer has no output CID or key")
    guard = _guard(job)
    if guard.done():
        return "submitted"
    commitment = crypto.commitment(result.output_cid, result.output_sha256)
    started = time.time()
    inputs = _encrypt_output_key(task, job, result.sealed_output_key)
    output_key_s = time.time() - started
    body = LeaderResult(
        job_id=job.job_id,
        output_cid=result.output_cid,
        commitment_hash=commitment,
        encrypted_output_key_high=inputs.high.ct_hash,
        encrypted_output_key_low=inputs.low.ct_hash,
        encrypted_output_key_inputs=inputs,
    )
    icl = runtime.icl()
    outcome = _submit(
        task,
        job,
        guard,
        send=lambda: icl.submit_result(body),
        settle=lambda: _leader_settled(icl.job_status(job.job_id), commitment),
    )
    if outcome is Submitted.SENT:
        log.info("Job %s: result submitted (commitment %s)", short(job.job_id), commitment[:16])
    return _record_submission(
        job, outcome, commitment=commitment, output_key_s=_seconds(output_key_s)
    )


def _encrypt_output_key(task: Task, job: JobTicket, sealed: str) -> EncryptedKeyInputs:
    try:
        high, low = crypto.split_key(crypto.unseal(runtime.cluster_key(), job.job_id, sealed))
        cofhe = runtime.cofhe()
        halves = [cofhe.encrypt_uint128(high), cofhe.encrypt_uint128(low)]
    except CofheTransportError as exc:
        _retry_or_fail(task, job, "output key: CoFHE unavailable", exc)
    except BlfError as exc:
        _fail(job, f"output key: {exc}")
        raise _Done("failed") from exc
    wire = [
        EncryptedInput(
            ct_hash=str(h.ct_hash),
            security_zone=h.security_zone,
            utype=h.utype,
            signature=h.signature,
        )
        for h in halves
    ]
    return EncryptedKeyInputs(high=wire[0], low=wire[1])


def _leader_settled(status: JobStatus, commitment: str) -> Settled:
    if status.leader_commitment == commitment:
        return Settled.LANDED
    if status.status != "QUEUED":
        return Settled.CLOSED
    return Settled.ABSENT if status.output_cid is None else Settled.UNKNOWN


def _finish_verifier(task: Task, job: JobTicket, result: InferenceResult) -> str:
    guard = _guard(job)
    if guard.done():
        return "submitted"
    icl = runtime.icl()
    try:
        status = icl.job_status(job.job_id)
    except IclTransportError as exc:
        _retry_or_fail(task, job, "job status", exc)
    except IclStatusError as exc:
        return _fail(job, f"job status: {exc}")
    if status.output_cid is None or status.leader_commitment is None:
        return _wait_for_leader(task, job, status)
    ours = crypto.commitment(status.output_cid, result.output_sha256)
    verdict = "CONFIRM" if ours == status.leader_commitment else "REJECT"
    if verdict == "REJECT":
        log.warning(
            "Job %s: REJECT: our commitment %s differs from the leader's %s",
            short(job.job_id),
            ours,
            status.leader_commitment,
        )
    body = Verdict(
        job_id=job.job_id,
        verifier_address=runtime.node().address,
        commitment_hash=ours,
        verdict=verdict,
        confidence=100,
    )
    outcome = _submit(
        task,
        job,
        guard,
        send=lambda: icl.submit_verdict(body),
        settle=lambda: _verifier_settled(icl.job_status(job.job_id)),
    )
    if outcome is Submitted.SENT:
        log.info("Job %s: verdict %s submitted", short(job.job_id), verdict)
    return _record_submission(job, outcome, commitment=ours, verdict=verdict)


def _wait_for_leader(task: Task, job: JobTicket, status: JobStatus) -> str:
    if status.status != "QUEUED":
        log.info("Job %s: already %s; no verdict needed", short(job.job_id), status.status)
        runtime.journal().record(job.job_id, "closed", reason=f"job already {status.status}")
        return "closed"
    cap = runtime.node().settings.verifier_poll_max_s
    delay = min(0.5 * 2**task.request.retries, cap, visibility_timeout(runtime.node().settings) / 4)
    if time.time() + delay >= job.deadline:
        return _fail(job, "the leader posted no result before the deadline")
    log.debug("Job %s: waiting %.1fs for the leader's result", short(job.job_id), delay)
    raise task.retry(countdown=delay)


def _verifier_settled(status: JobStatus) -> Settled:
    if status.status != "QUEUED":
        return Settled.CLOSED
    mine = status.submitted_by(runtime.node().address)
    if mine is None:
        return Settled.UNKNOWN
    return Settled.LANDED if mine else Settled.ABSENT


def _guard(job: JobTicket) -> Submission:
    return Submission(runtime.redis_client(), runtime.node().address, job.job_id, _ttl(job))


def _submit(task: Task, job: JobTicket, guard: Submission, **calls: Any) -> Submitted:
    try:
        outcome = guard.submit(**calls)
    except IclTransportError as exc:
        _retry_or_fail(task, job, "submission not confirmed", exc)
    except IclStatusError as exc:
        _fail(job, f"the ICL refused the submission: {exc}")
        raise _Done("failed") from exc
    if outcome is Submitted.BUSY:
        raise task.retry(countdown=_backoff(task, cap=5.0))
    return outcome


def _record_submission(job: JobTicket, outcome: Submitted, **fields: Any) -> str:
    journal = runtime.journal()
    record = journal.get(job.job_id)
    enqueued = float(record.get("enqueued_at") or 0) or None
    submitted_at = float(record.get("submitting_at") or time.time())
    if outcome is Submitted.UNCONFIRMED:
        log.warning(
            "Job %s: an earlier submission may not have landed and the ICL cannot say;"
            " not sending again",
            short(job.job_id),
        )
        journal.record(job.job_id, "unconfirmed", **fields)
        return "unconfirmed"
    if outcome is Submitted.CLOSED:
        journal.record(job.job_id, "closed", reason="job decided before our submission", **fields)
        return "closed"
    journal.record(
        job.job_id,
        "submitted",
        submit_s=_seconds(time.time() - submitted_at),
        total_s=_seconds(time.time() - enqueued) if enqueued else None,
        **fields,
    )
    return "submitted"


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"
