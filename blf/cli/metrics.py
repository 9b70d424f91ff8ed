"""``metrics``: the node's Prometheus endpoint, served until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import click

log = logging.getLogger("blf.metrics")


def register(cli: click.Group) -> None:
    cli.add_command(metrics)


@click.command()
@click.option("--host", default=None, help="Address to listen on [metrics_host: 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to listen on [metrics_port: 9464]; 0 takes a free one.",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Accept a host that is not loopback (the endpoint has no authentication).",
)
def metrics(host: str | None, port: int | None, allow_remote: bool) -> None:
    """Serve Prometheus metrics at http://HOST:PORT/metrics until SIGTERM or SIGINT.

    Jobs and seconds per stage from the journal, queue depths, live GPU workers and free
    slots per model, heartbeat ages and the certificate's time left, read at each scrape
    from the node's Redis (broker_url, or the embedded Redis of a running `run`) and
    config.json. Needs no password: the key is never opened.
    """
    from blf.app import settings_with_address
    from blf.cli.common import load_with_warnings
    from blf.logging import configure_logging
    from blf.metrics import build_registry, serve
    from blf.roles import Wakeups

    loaded = load_with_warnings()
    settings = settings_with_address(loaded)
    configure_logging(settings.node_address, settings.log_level)
    stop = threading.Event()
    # The main thread sleeps on a pipe that every signal writes to, whichever thread the
    # kernel hands it to (a server thread, say): see Wakeups.on_signals.
    wakeups = Wakeups(fallback_s=1.0)

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Before the port opens: a signal sent once it answers must find the handler.
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    wakeups.on_signals()
    try:
        registry = build_registry(loaded)
        with serve(
            settings, registry=registry, host=host, port=port, allow_remote=allow_remote
        ) as server:
            log.info("Metrics on %s", server.url)
            while not stop.is_set():
                wakeups.wait(())
    finally:
        wakeups.close()
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
