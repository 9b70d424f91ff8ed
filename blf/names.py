"""Names in Redis: the one place queue names and node keys are made.

Everything a node writes to Redis is namespaced by its address, so two nodes sharing one
Redis never see each other's queues, locks, schedule or job state. Both the Celery app
and the data modules (journal, marks) use these, so they live below both.
"""

from __future__ import annotations

__all__ = ["control_queue", "model_queue", "namespace", "node_key"]


def namespace(address: str) -> str:
    return f"blf.{address.lower()}"


def control_queue(address: str) -> str:
    return f"{namespace(address)}.control"


def model_queue(address: str, model_id: str) -> str:
    return f"{namespace(address)}.model.{model_id}"


def node_key(address: str, *parts: str) -> str:
    """A Redis key of this node's own, e.g. ``blf:0xabc…:seen:<job>``."""
    return ":".join(("blf", address.lower(), *parts))
