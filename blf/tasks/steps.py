"""What every control-side step of the job pipeline shares: its task options, how it
retries, and how it fails, so that no exception path leaves a claimed job unanswered and
unrecorded."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from blf import runtime
from blf.app import app, visibility_timeout
from blf.authority import ControlTask
from blf.payloads import JobTicket
from blf.tasks import short, shown

__all__ = [
    "RECORD_GRACE_S",
    "Done",
    "backoff",
    "fail",
    "job_task",
    "retry",
    "retry_or_fail",
    "seconds",
    "too_many_deliveries",
    "ttl",
]

log = logging.getLogger("blf.jobs")

RECORD_GRACE_S = 86400  # job marks and counters outlive the job's deadline by a day


class Done(Exception):
    """Ends a step early with a result (a recorded failure), without another retry."""


def job_task(**options: Any) -> Callable[[Callable[..., str]], Any]:
    """A pipeline step on the control queue: acknowledged once done (a dead worker's step
    is redelivered), retried by its own policy (``max_retries=None``: the deadline bounds
    it). Its body runs through ``guarded``."""
    defaults = {"bind": True, "acks_late": True, "reject_on_worker_lost": True}

    def decorate(body: Callable[..., str]) -> Any:
        return app.task(base=ControlTask, **{**defaults, "max_retries": None, **options})(
            guarded(body)
        )

    return decorate


def guarded(body: Callable[..., str]) -> Callable[..., str]:
    """Any exception a step did not plan for fails the job with its type, once, rather
    than ending the task unrecorded (Celery acknowledges a failed late-ack task)."""

    @functools.wraps(body)
    def run(task: Task, *args: Any, **kwargs: Any) -> str:
        try:
            return body(task, *args, **kwargs)
        except Done as done:
            return str(done)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            job = getattr(task.request, "blf_job", None)
            log.exception(
                "Job %s: unexpected error in %s", short(job.job_id) if job else "?", task.name
            )
            if job is None:
                raise
            return fail(
                job, f"internal error in {task.name.rsplit('.', 1)[-1]}: {type(exc).__name__}"
            )

    return run


def ttl(job: JobTicket) -> int:
    return max(job.deadline - int(time.time()), 0) + RECORD_GRACE_S


def fail(job: JobTicket, reason: str) -> str:
    log.error("Job %s: failed: %s", short(job.job_id), reason)
    runtime.journal().record_unless_final(job.job_id, "failed", reason=reason)
    return "failed"


def backoff(task: Task, cap: float = 30.0) -> float:
    # Countdowns stay well under the visibility timeout: kombu would otherwise redeliver a
    # message that a worker still holds waiting for its ETA.
    ceiling = min(cap, visibility_timeout(runtime.node().settings) / 4)
    return float(min(2 ** (task.request.retries + 1), ceiling))


def retry(task: Task, job: JobTicket, delay: float) -> NoReturn:
    # kwargsrepr again: a retry would otherwise show the sealed keys in events and Flower.
    raise task.retry(countdown=delay, kwargsrepr=shown(job))


def retry_or_fail(task: Task, job: JobTicket, what: str, exc: Exception) -> NoReturn:
    delay = backoff(task)
    if time.time() + delay >= job.deadline:
        fail(job, f"{what}: still failing at the deadline: {exc}")
        raise Done("failed")
    log.warning("Job %s: %s (%s); retrying in %.0fs", short(job.job_id), what, exc, delay)
    retry(task, job, delay)


def too_many_deliveries(task: Task, job: JobTicket, step: str) -> bool:
    """A message redelivered again and again kills its workers: fail it instead."""
    task.request.blf_job = job
    journal = runtime.journal()
    deliveries = journal.count_delivery(job.job_id, f"{step}.{task.request.retries}", ttl(job))
    if deliveries > runtime.node().settings.max_job_deliveries:
        log.error(
            "Job %s: aborted after %d deliveries (a worker died each time)",
            short(job.job_id),
            deliveries - 1,
        )
        fail(job, f"{step}: too many redeliveries")
        return True
    return False


def seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"
