"""The log format of protocol.md section 6, for blf's lines and Celery's alike:

[2026-05-18T10:25:00] [INFO   ] [0xdDef3Cf5] Daemon starting ...
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["NodeFormatter", "configure_logging", "warn_if_root"]

LOG_FORMAT = "[%(asctime)s] [%(levelname)-7s] [%(node)s] %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"

# Libraries whose INFO lines are per-request noise rather than node events.
_CHATTY = ("urllib3", "web3", "asyncio", "uvicorn.access", "httpx", "kombu", "amqp")
# Celery's per-task lines: every 5 s poll would log "received" and "succeeded".
_TICKS = ("celery.app.trace", "celery.worker.strategy")


class _NoTickSends(logging.Filter):
    """Drops beat's "Sending due task" lines (one per tick) below DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Scheduler: Sending due task")


class NodeFormatter(logging.Formatter):
    """Adds the first 10 characters of the node address to every record."""

    def __init__(self, address: str) -> None:
        super().__init__(LOG_FORMAT, DATE_FORMAT)
        self.node = (address or "-")[:10]

    def format(self, record: logging.LogRecord) -> str:
        record.node = self.node
        return super().format(record)


def configure_logging(address: str, level: str = "INFO") -> None:
    """Route every logger (root included, so Celery's too) to stdout in the node format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(NodeFormatter(address))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    debug = level.upper() == "DEBUG"
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
    for name in _TICKS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    beat = logging.getLogger("celery.beat")
    for old_filter in [f for f in beat.filters if isinstance(f, _NoTickSends)]:
        beat.removeFilter(old_filter)
    if not debug:
        beat.addFilter(_NoTickSends())


def warn_if_root() -> None:
    """One line for what Celery says in a multi-line banner per worker."""
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        logging.getLogger("blf.node").warning(
            "Running as root: prefer a dedicated user (see the systemd example in the README)"
        )
