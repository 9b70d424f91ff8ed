"""The job pipeline's last control-side step: after the GPU work, the leader's result or
a verifier's verdict, submitted at most once (``blf.submission``).

The step is commanded by the GPU side's one answer, through the continuation the control
side issued with the order (``blf.authority``); the job's details come from the control
side's own record, and the answer is a validated model trusted for nothing more than it
says: an output hash, and for a leader a CID and a sealed key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from pydantic import TypeAdapter, ValidationError

from blf import crypto, runtime
from blf.app import visibility_timeout
from blf.authority import Refused, redeem_continuation
from blf.errors import (
    BlfError,
    CofheTransportError,
    IclProtocolError,
    IclStatusError,
    IclTransportError,
)
from blf.icl import NO_RETRY, EncryptedInput, EncryptedKeyInputs, JobStatus, LeaderResult, Verdict
from blf.names import node_key
from blf.payloads import InferenceOutcome, InferenceResult, JobTicket
from blf.submission import Settled, Submission, Submitted
from blf.tasks import short
from blf.tasks.steps import (
    Done,
    backoff,
    fail,
    job_task,
    retry,
    retry_or_fail,
    seconds,
    too_many_deliveries,
    ttl,
)

__all__ = ["finish_job"]

log = logging.getLogger("blf.jobs")

OUTCOME = TypeAdapter(InferenceOutcome)


@job_task(continuation_step="finish")
def finish_job(self: Task, continuation: str, outcome: dict[str, Any]) -> str:
    node = runtime.node()
    try:
        job = redeem_continuation(
            runtime.redis_client(), node.address, continuation, "finish", self.request.id, outcome
        )
    except Refused as exc:
        log.error("Refused %s (task %s): %s", self.name, self.request.id, exc)
        return "refused"
    if too_many_deliveries(self, job, "finish"):
        return "failed"
    try:
        result = OUTCOME.validate_python(outcome)
    except ValidationError as exc:
        return fail(job, f"the GPU worker's answer is invalid: {exc.errors()[0]['msg']}")
    if result.job_id != job.job_id:
        return fail(job, "the GPU worker answered for another job")
    if not isinstance(result, InferenceResult):
        return fail(job, result.reason)
    guard = _guard(job)
    if guard.done():  # a redelivery after the submission landed
        return _record(job, Submitted.ALREADY)
    if self.request.retries == 0:
        _record_gpu_stages(job, result)
    if job.role == "leader":
        return _finish_leader(self, job, result)
    return _finish_verifier(self, job, result, guard)


def _record_gpu_stages(job: JobTicket, result: InferenceResult) -> None:
    runtime.journal().record_unless_final(
        job.job_id,
        "submitting",
        gpu_queue_s=seconds(result.queue_s),
        download_s=seconds(result.download_s),
        inference_s=seconds(result.inference_s),
        upload_s=seconds(result.upload_s) if job.role == "leader" else None,
        backend=result.backend,
        output_sha256=result.output_sha256,
    )


# --- leader --------------------------------------------------------------------------------


def _finish_leader(task: Task, job: JobTicket, result: InferenceResult) -> str:
    if result.output_cid is None or result.sealed_output_key is None:
        return fail(job, "the GPU worker's leader answer has no output CID or key")
    commitment = crypto.commitment(result.output_cid, result.output_sha256)
    started = time.time()
    inputs = _output_key_inputs(task, job, result.sealed_output_key)
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
        send=lambda: icl.submit_result(body),
        settle=lambda: _leader_settled(icl.job_status(job.job_id, retry=NO_RETRY), commitment),
    )
    if outcome is Submitted.SENT:
        log.info("Job %s: result submitted (commitment %s)", short(job.job_id), commitment[:16])
    return _record(job, outcome, commitment=commitment, output_key_s=seconds(output_key_s))


def _output_key_inputs(task: Task, job: JobTicket, sealed: str) -> EncryptedKeyInputs:
    """CoFHE-encrypt the output key's halves, once per job: a retried submission sends the
    same body. The cached inputs are ciphertext handles, not the key."""
    client = runtime.redis_client()
    cache = node_key(runtime.node().address, "output-key", job.job_id)
    cached = client.get(cache)
    if cached:
        return EncryptedKeyInputs.model_validate_json(cached)
    try:
        high, low = crypto.split_key(crypto.unseal(runtime.cluster_key(), job.job_id, sealed))
        cofhe = runtime.cofhe()
        halves = [cofhe.encrypt_uint128(high), cofhe.encrypt_uint128(low)]
    except CofheTransportError as exc:
        retry_or_fail(task, job, "output key: CoFHE unavailable", exc)
    except BlfError as exc:
        fail(job, f"output key: {exc}")
        raise Done("failed") from exc
    wire = [
        EncryptedInput(
            ct_hash=str(h.ct_hash),
            security_zone=h.security_zone,
            utype=h.utype,
            signature=h.signature,
        )
        for h in halves
    ]
    inputs = EncryptedKeyInputs(high=wire[0], low=wire[1])
    client.set(cache, inputs.model_dump_json(by_alias=True), ex=ttl(job))
    return inputs


def _leader_settled(status: JobStatus, commitment: str) -> Settled:
    if _hex(status.leader_commitment) == commitment:
        return Settled.LANDED
    if status.status != "QUEUED":
        return Settled.CLOSED
    return Settled.ABSENT if status.output_cid is None else Settled.UNKNOWN


# --- verifier ------------------------------------------------------------------------------


def _finish_verifier(task: Task, job: JobTicket, result: InferenceResult, guard: Submission) -> str:
    icl = runtime.icl()
    try:
        status = icl.job_status(job.job_id)
    except (IclTransportError, IclProtocolError) as exc:
        retry_or_fail(task, job, "job status", exc)
    except IclStatusError as exc:
        return fail(job, f"job status: {exc}")
    leaders = _hex(status.leader_commitment)
    if status.output_cid is None or leaders is None:
        return _wait_for_leader(task, job, status)
    ours = crypto.commitment(status.output_cid, result.output_sha256)
    verdict = "CONFIRM" if ours == leaders else "REJECT"
    if verdict == "REJECT":
        log.warning(
            "Job %s: REJECT: our commitment %s differs from the leader's %s",
            short(job.job_id),
            ours,
            leaders,
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
        send=lambda: icl.submit_verdict(body),
        settle=lambda: _verifier_settled(icl.job_status(job.job_id, retry=NO_RETRY)),
    )
    if outcome is Submitted.SENT:
        log.info("Job %s: verdict %s submitted", short(job.job_id), verdict)
    return _record(job, outcome, commitment=ours, verdict=verdict)


def _wait_for_leader(task: Task, job: JobTicket, status: JobStatus) -> str:
    """A countdown retry, not a sleep: the worker slot is free while the leader works."""
    if status.status != "QUEUED":
        log.info("Job %s: already %s; no verdict needed", short(job.job_id), status.status)
        runtime.journal().record(job.job_id, "closed", reason=f"job already {status.status}")
        return "closed"
    settings = runtime.node().settings
    delay = min(
        0.5 * 2**task.request.retries,
        settings.verifier_poll_max_s,
        visibility_timeout(settings) / 4,
    )
    if time.time() + delay >= job.deadline:
        return fail(job, "the leader posted no result before the deadline")
    log.debug("Job %s: waiting %.1fs for the leader's result", short(job.job_id), delay)
    retry(task, job, delay)


def _verifier_settled(status: JobStatus) -> Settled:
    mine = status.submitted_by(runtime.node().address)
    if mine:
        return Settled.LANDED
    if status.status != "QUEUED":
        return Settled.CLOSED
    return Settled.UNKNOWN if mine is None else Settled.ABSENT


# --- submitting once -----------------------------------------------------------------------


def _guard(job: JobTicket) -> Submission:
    return Submission(runtime.redis_client(), runtime.node().address, job.job_id, ttl(job))


def _submit(task: Task, job: JobTicket, **calls: Any) -> Submitted:
    try:
        outcome = _guard(job).submit(**calls)
    except (IclTransportError, IclProtocolError) as exc:  # a settle that could not tell
        retry_or_fail(task, job, "submission not confirmed", exc)
    except IclStatusError as exc:
        fail(job, f"the ICL refused the submission: {exc}")
        raise Done("failed") from exc
    if outcome is Submitted.BUSY:
        retry(task, job, backoff(task, cap=5.0))
    return outcome


def _record(job: JobTicket, outcome: Submitted, **fields: Any) -> str:
    journal = runtime.journal()
    if outcome is Submitted.REFUSED:
        return fail(job, "the ICL refused an earlier submission")
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
    record = journal.get(job.job_id)
    if record.get("state") == "submitted":
        return "submitted"
    enqueued = float(record.get("enqueued_at") or 0) or None
    finishing = float(record.get("submitting_at") or time.time())
    journal.record(
        job.job_id,
        "submitted",
        submit_s=seconds(time.time() - finishing),
        total_s=seconds(time.time() - enqueued) if enqueued else None,
        **fields,
    )
    return "submitted"


def _hex(value: str | None) -> str | None:
    """Commitments compare as lowercase hex without ``0x``, whatever the ICL sends."""
    return None if value is None else value.strip().lower().removeprefix("0x")
