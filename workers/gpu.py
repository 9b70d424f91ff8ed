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
import socket
import sys
from typing import Any

from blf.errors import BlfError, ConfigError

__all__ = ["main", "start"]


def start(concurrency: int | None = None) -> int:
    from blf.app import app, configure
    from blf.logging import configure_logging, warn_if_root
    from blf.names import model_queue
    from blf.tasks import inference

    context = inference.load_context()
    settings = context.settings
    _require(settings.node_address, "node_address", "BLF_NODE_ADDRESS")
    _require(settings.broker_url, "broker_url", "BLF_BROKER_URL")
    models = settings.supported_model_ids or sorted(settings.model_backends)
    _require(models, "supported_model_ids", "BLF_SUPPORTED_MODEL_IDS")
    configure(settings)
    # The GPU side runs only its own task module: the control tasks are never imported.
    app.conf.include = ["blf.tasks.inference"]
    inference.install(context)
    configure_logging(settings.node_address, settings.log_level)
    warn_if_root()
    worker: Any = app.Worker(
        hostname=f"gpu.{settings.node_address[:10]}@{socket.gethostname()}",
        queues=[model_queue(settings.node_address, m) for m in models],
        # Threads: model engines (vLLM) start subprocesses of their own, which prefork's
        # daemonic children cannot, and one engine batches the concurrent requests.
        pool="threads",
        concurrency=concurrency or settings.inference_concurrency,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        quiet=True,
    )
    worker.start()
    return int(worker.exitcode or 0)


def _require(value: Any, field: str, env: str) -> None:
    if not value:
        raise ConfigError(f"GPU worker: {field} is not set (config.json, or {env})", field=field)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workers.gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--concurrency", type=int, default=None, help="parallel jobs")
    args = parser.parse_args(argv)
    try:
        code = start(args.concurrency)
    except BlfError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, ConfigError) else 1
    sys.exit(code)


if __name__ == "__main__":
    main()
