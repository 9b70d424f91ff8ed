"""Celery tasks: the periodic loops (``loops``), the job pipeline's control steps
(``jobs``) and its GPU step (``inference``)."""

from typing import Any


def short(job_id: str) -> str:
    """Job ids are opaque; logs show their first characters only."""
    return job_id[:8] + ("..." if len(job_id) > 8 else "")


def shown(job: Any) -> str:
    """What Flower and task events show for a job task's arguments: the job and role, not
    the sealed keys and continuation tokens the task carries."""
    return f"{{job: {short(job.job_id)}, role: {job.role}}}"
