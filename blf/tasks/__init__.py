"""Celery tasks: the periodic loops (``loops``) and the job pipeline (``jobs``)."""


def short(job_id: str) -> str:
    """Job ids are opaque; logs show their first characters only."""
    return job_id[:8] + ("..." if len(job_id) > 8 else "")
