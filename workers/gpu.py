"""The GPU worker: consumes a node's model queues on a machine without the operator key.

    python -m workers.gpu [--concurrency N]

It needs the node's Redis (``BLF_BROKER_URL``), the operator address
(``BLF_NODE_ADDRESS``), the models it serves (``BLF_SUPPORTED_MODEL_IDS``,
``BLF_MODEL_BACKENDS``) and the cluster key (``BLF_CLUSTER_KEY_FILE`` or
``BLF_CLUSTER_KEY``), from a config.json (``BLF_CONFIG_PATH``) or the environment alone.
It never needs, and never loads, the keystore or its password: nothing imported here
reaches the wallet, the chain, CoFHE or the ICL.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from blf.errors import BlfError, ConfigError

__all__ = ["main", "start"]


def start(concurrency: int | None = None, models: list[str] | None = None) -> int:
    from blf.app import app, configure
    from blf.logging import configure_logging, warn_if_root
    from blf.names import model_queue
    from blf.tasks import inference

    context = inference.load_context()
    settings = context.settings
    _require(settings.node_address, "node_address", "BLF_NODE_ADDRESS")
    _require(settings.broker_url, "broker_url", "BLF_BROKER_URL")
    models = models or settings.supported_model_ids or sorted(settings.model_backends)
    _require(models, "supported_model_ids", "BLF_SUPPORTED_MODEL_IDS")
    slots = concurrency or settings.inference_concurrency
    context.slots = slots
    configure(settings)
    # The GPU side runs only its own task module: the control tasks are never imported.
    app.conf.include = ["blf.tasks.inference"]
    inference.install(context)
    configure_logging(settings.node_address, settings.log_level)
    warn_if_root()
    hostname = f"gpu{os.getpid()}.{settings.node_address[:10]}@{socket.gethostname()}"
    _publish_capacity(settings.broker_url, settings.node_address, models, hostname, context)
    worker: Any = app.Worker(
        hostname=hostname,
        queues=[model_queue(settings.node_address, m) for m in models],
        # Threads: model engines (vLLM) start subprocesses of their own, which prefork's
        # daemonic children cannot, and one engine batches the concurrent requests.
        pool="threads",
        concurrency=slots,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        quiet=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


def _publish_capacity(
    broker: str, address: str, models: list[str], hostname: str, context: Any
) -> None:
    """From the moment the worker consumes until it starts to stop, the poller knows it
    serves these models (blf.capacity), and how many jobs it has room for."""
    import redis
    from celery.signals import worker_ready, worker_shutting_down

    from blf.broker import broker_urls
    from blf.capacity import CapacityPublisher

    client = redis.Redis.from_url(broker_urls(broker).redis)
    publisher = CapacityPublisher(client, address, models, hostname, context.free_slots)
    worker_ready.connect(lambda **_: publisher.start(), weak=False)
    worker_shutting_down.connect(lambda **_: publisher.stop(), weak=False)


def _require(value: Any, field: str, env: str) -> None:
    if not value:
        raise ConfigError(f"GPU worker: {field} is not set (config.json, or {env})", field=field)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workers.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--concurrency", type=int, default=None, help="parallel jobs")
    parser.add_argument(
        "--models", default=None, help="comma-separated model ids to serve (default: config)"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()] or None
    try:
        code = start(args.concurrency, models)
    except BlfError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, ConfigError) else 1
    sys.exit(code)


if __name__ == "__main__":
    main()
