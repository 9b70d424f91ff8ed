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

__all__ = ["LEAK_EXIT", "main", "start"]

LEAK_EXIT = 3  # stopped past gpu_memory_limit_mib


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
    servable = _servable(models, settings)
    _publish_capacity(settings.broker_url, settings.node_address, servable, hostname, context)
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
    if context.leaked:
        return LEAK_EXIT  # non-zero: systemd's Restart=on-failure and `run` restart it
    return int(worker.exitcode or 0)


def _servable(models: list[str], settings: Any) -> list[str]:
    """The models this worker offers to the poller: a model it has no backend for gets no
    claims (its queue is still consumed, so a job claimed anyway fails with the reason)."""
    import logging

    from blf.inference import unservable

    offered = []
    for model in models:
        problem = unservable(model, settings.model_backends)
        if problem:
            logging.getLogger("blf.inference").warning("Not offering %s: %s", model, problem)
        else:
            offered.append(model)
    return offered


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


def per_gpu(count: int, argv: list[str]) -> int:
    """``count`` workers, each seeing one GPU (``CUDA_VISIBLE_DEVICES``): one engine per
    GPU. They stop together: when one exits, or on SIGTERM/SIGINT, the others are asked to
    stop, and the exit status is the first non-zero one (so a supervisor restarts all)."""
    import signal
    import time

    from blf.children import spawn

    rest = _without_gpus(argv)
    children = []
    for index in range(count):
        # PCI order, so that index N is nvidia-smi's GPU N and NVML's (blf.gpu) too; CUDA's
        # own default order (fastest first) can differ on a host with mixed GPUs.
        env = {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            **os.environ,
            "CUDA_VISIBLE_DEVICES": str(index),
        }
        children.append(spawn([sys.executable, "-m", "workers.gpu", *rest], env=env, stdin=None))

    asked: set[int] = set()

    def stop(*_: Any) -> None:
        # Once each: a second SIGTERM makes Celery give up its running jobs (cold shutdown).
        for child in children:
            if child.poll() is None and child.pid not in asked:
                asked.add(child.pid)
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while any(child.poll() is None for child in children):
        if any(child.returncode is not None for child in children):
            stop()  # one is gone: the set stops, and its supervisor restarts it whole
        time.sleep(0.5)
    code = next((child.returncode for child in children if child.returncode), 0)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def _without_gpus(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            rest.append(arg)
    return rest


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
    parser.add_argument(
        "--gpus", type=int, default=None, help="one worker process per GPU, pinned to it"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()] or None
    if args.gpus and args.gpus > 1:
        sys.exit(per_gpu(args.gpus, argv if argv is not None else sys.argv[1:]))
    try:
        code = start(args.concurrency, models)
    except BlfError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, ConfigError) else 1
    sys.exit(code)


if __name__ == "__main__":
    main()
