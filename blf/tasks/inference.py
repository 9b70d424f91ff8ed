"""The GPU side of a job: download the prompt blob, decrypt it, run the model, and for a
leader encrypt the output with a fresh key and upload it. Runs on the model's queue, on
any machine that holds the cluster key.

It answers the control side with small validated values only (the output's hash, and for
a leader the output CID and its key sealed with the cluster key), sent as the one
``finish_job`` message its order's continuation allows. This module and what it imports
never touch the operator key: no wallet, chain, CoFHE or ICL (a test checks).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.exceptions import Reject

from blf import crypto, keyfiles
from blf.app import app, visibility_timeout
from blf.config import Settings, load_settings_or_environment
from blf.errors import BlfError, CryptoError, InferenceError, IpfsTransportError
from blf.gpu import memory_used_mib
from blf.inference import Generation, backend_for
from blf.inference.batcher import Batcher
from blf.ipfs import IpfsClient
from blf.payloads import InferenceFailure, InferenceOrder, InferenceResult
from blf.tasks import short, shown

__all__ = ["GpuContext", "install", "run_inference"]

log = logging.getLogger("blf.inference")

FINISH_JOB = "blf.tasks.finish.finish_job"
TRANSIENT = (IpfsTransportError,)


@dataclass
class GpuContext:
    settings: Settings
    cluster_key: bytes
    ipfs: IpfsClient
    batchers: dict[str, Batcher] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: int = 1
    active: int = 0
    leaked: bool = False  # set once past gpu_memory_limit_mib: the worker is stopping

    def free_slots(self) -> int:
        return self.slots - self.active

    def busy(self, delta: int) -> None:
        with self.lock:
            self.active += delta

    def batcher(self, model_id: str) -> Batcher:
        """One backend per model and worker process, built on first use in this process
        (never in a parent before a fork), batching this worker's concurrent jobs."""
        with self.lock:
            if model_id not in self.batchers:
                backend = backend_for(model_id, self.settings.model_backends)
                self.batchers[model_id] = Batcher(
                    backend, max_batch=self.slots, busy=lambda: self.active
                )
            return self.batchers[model_id]


_context: GpuContext | None = None


def install(context: GpuContext) -> None:
    global _context
    _context = context


def load_context() -> GpuContext:
    """From config.json when there is one (``run``, a GPU machine with a file), else from
    BLF_* variables alone (a GPU machine configured by its environment)."""
    settings, directory = load_settings_or_environment()
    key = keyfiles.cluster_key(settings, directory)
    return GpuContext(settings=settings, cluster_key=key, ipfs=IpfsClient.from_settings(settings))


def _ctx() -> GpuContext:
    global _context
    if _context is None:
        _context = load_context()
    return _context


@app.task(
    bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None, ignore_result=True
)
def run_inference(self: Task, model_id: str, order: dict[str, Any]) -> str:
    job = InferenceOrder.model_validate(order)
    ctx = _ctx()
    ctx.busy(+1)
    try:
        return _serve(self, job)
    finally:
        ctx.busy(-1)
        _check_memory(ctx)


def _check_memory(ctx: GpuContext) -> None:
    """Past the limit, stop taking jobs and exit (warm: running jobs finish), so that the
    worker's supervisor starts a fresh one. Celery's own memory limits are prefork-only
    and measure host memory, not the GPU's."""
    limit = ctx.settings.gpu_memory_limit_mib
    used = memory_used_mib() if limit else None
    if limit is None or used is None or used <= limit or ctx.leaked:
        return
    ctx.leaked = True
    log.warning(
        "GPU memory at %d MiB, past gpu_memory_limit_mib=%d: stopping this worker so that "
        "its supervisor restarts it",
        used,
        limit,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def _serve(self: Task, job: InferenceOrder) -> str:
    started = time.time()
    try:
        answer: InferenceResult | InferenceFailure = _run(job, queue_s=started - job.dispatched_at)
    except TRANSIENT as exc:
        delay = _backoff(self)
        if time.time() + delay < job.deadline:
            log.warning("Job %s: %s; retrying in %.0fs", short(job.job_id), exc, delay)
            raise self.retry(countdown=delay, kwargsrepr=shown(job)) from exc
        answer = InferenceFailure(job_id=job.job_id, reason=f"still failing at the deadline: {exc}")
    except BlfError as exc:  # our own errors: their one line names no prompt or output
        answer = InferenceFailure(job_id=job.job_id, reason=str(exc)[:500])
    except Exception as exc:
        # A backend's own error may quote the prompt: the reason is its type alone, and the
        # traceback goes to DEBUG, where prompts may be logged anyway.
        log.debug("Job %s: inference raised", short(job.job_id), exc_info=True)
        answer = InferenceFailure(
            job_id=job.job_id, reason=f"inference failed: {type(exc).__name__}"
        )
    if isinstance(answer, InferenceFailure):
        log.error("Job %s: inference failed: %s", short(job.job_id), answer.reason)
    _answer(job, answer)
    return "ok" if answer.ok else "failed"


def _answer(job: InferenceOrder, answer: InferenceResult | InferenceFailure) -> None:
    try:
        app.send_task(
            FINISH_JOB,
            kwargs={"continuation": job.continuation, "outcome": answer.model_dump()},
            kwargsrepr=shown(job),
        )
    except Exception as exc:  # kombu raises many kinds; the answer must not be lost to any
        log.warning("Job %s: answer not sent (%s); the order goes back", short(job.job_id), exc)
        raise Reject(requeue=True) from exc


def _backoff(task: Task) -> float:
    visibility = visibility_timeout(_ctx().settings)
    return float(min(2 ** (task.request.retries + 1), 30, visibility / 4))


def _run(job: InferenceOrder, *, queue_s: float) -> InferenceResult:
    if time.time() > job.deadline:
        raise InferenceError("deadline passed before inference started")
    ctx = _ctx()
    batcher = ctx.batcher(job.model_id)  # before any download: an unknown model fails here
    t0 = time.time()
    blob = ctx.ipfs.cat(job.prompt_cid)
    t1 = time.time()
    key = crypto.unseal(ctx.cluster_key, job.job_id, job.sealed_prompt_key)
    prompt = _text(crypto.decrypt_blob(key, blob), "prompt")
    log.debug("Job %s: prompt %r", short(job.job_id), prompt)
    output = batcher.generate(
        Generation(model_id=job.model_id, prompt=prompt), timeout_s=job.deadline - time.time()
    )
    t2 = time.time()
    log.debug("Job %s: output %r", short(job.job_id), output)
    result = InferenceResult(
        job_id=job.job_id,
        output_sha256=crypto.output_hash(output),
        backend=batcher.backend.describe(),
        queue_s=queue_s,
        download_s=t1 - t0,
        inference_s=t2 - t1,
    )
    if job.role == "leader":
        result = _publish_output(ctx, job, output, result)
    log.info("Job %s: inference done (%s)", short(job.job_id), batcher.backend.name)
    return result


def _publish_output(
    ctx: GpuContext, job: InferenceOrder, output: str, result: InferenceResult
) -> InferenceResult:
    started = time.time()
    output_key = crypto.new_key()
    cid = ctx.ipfs.add(crypto.encrypt_blob(output_key, output.encode("utf-8")))
    return result.model_copy(
        update={
            "output_cid": cid,
            "sealed_output_key": crypto.seal(ctx.cluster_key, job.job_id, output_key),
            "upload_s": time.time() - started,
        }
    )


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CryptoError(f"the decrypted {what} is not UTF-8 text") from None
