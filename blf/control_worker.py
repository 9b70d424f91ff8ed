"""The control worker: the operator side's Celery worker (heartbeat, poller, claims, CoFHE,
submissions, the chain), built one way for `worker --role control`, a process of its own,
and for `run`, which hosts it in a thread of the process that already holds the key."""

from __future__ import annotations

import socket
from typing import Any

from blf.config import LoadedConfig
from blf.node import Node

__all__ = ["build_control_worker", "control_hostname"]


def control_hostname(address: str) -> str:
    return f"control.{address[:10]}@{socket.gethostname()}"


def build_control_worker(
    node: Node,
    loaded: LoadedConfig,
    *,
    broker_url: str,
    concurrency: int | None = None,
    with_beat: bool = False,
    embedded: bool = False,
) -> Any:
    """A Celery worker on the node's control queue, holding ``node`` (its unlocked key),
    signing what it publishes with the control key; not started yet. The app is configured
    for ``broker_url``, the Redis every process of the node shares."""
    from blf import runtime
    from blf.app import app, configure, control_queue
    from blf.authority import install_node_control_key

    settings = loaded.settings.model_copy(
        update={"node_address": node.address, "broker_url": broker_url}
    )
    runtime.install(node)
    configure(settings)
    install_node_control_key(loaded)
    return app.Worker(
        hostname=control_hostname(node.address),
        queues=[control_queue(node.address)],
        beat=with_beat,
        # Control tasks wait on HTTP, CoFHE and the chain: threads.
        pool="threads",
        concurrency=concurrency or settings.control_concurrency,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        quiet=True,
        embedded=embedded,
    )
