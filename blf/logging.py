"""The log format of protocol.md section 6, for blf's lines and Celery's alike:

[2026-05-18T10:25:00] [INFO   ] [0xdDef3Cf5] Daemon starting ...

Celery's worker prints a few messages past logging, from its signal handlers
(``worker: Warm shutdown (MainProcess)``, the cold-shutdown and Ctrl+C notes): it writes
them with ``celery.apps.worker.safe_say`` straight to the terminal's file descriptor.
``configure_logging`` replaces that function with ``say``, which writes the same message
as a node-format line, and just as safely: one ``os.write``, no logging or stream lock (a
signal that lands while the main thread is inside a write would otherwise meet a
"reentrant call" error).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

__all__ = ["NodeFormatter", "configure_logging", "say", "warn_if_root"]

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


class _Sink:
    """Where ``say`` writes: the configured handler's formatter and file descriptor."""

    formatter = NodeFormatter("")
    stream: TextIO | None = None
    fd: int | None = None
    configured = False  # before configure_logging: every level, to stdout


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def say(message: str, level: int = logging.INFO, *, name: str = "blf.node") -> None:
    """Write ``message`` (each of its lines) in the node format where the log goes, with
    one ``os.write`` per line: safe inside a signal handler, unlike a logging call."""
    if _Sink.configured and not logging.getLogger(name).isEnabledFor(level):
        return
    for text in message.strip().splitlines():
        if not text.strip():
            continue
        record = logging.LogRecord(name, level, __file__, 0, text, None, None)
        line = _Sink.formatter.format(record) + "\n"
        fd = _Sink.fd if _Sink.configured else _fileno(sys.stdout)
        try:
            if fd is not None:
                os.write(fd, line.encode("utf-8", "replace"))
            else:  # a stream without a descriptor (a test's capture): not a signal's path
                stream = _Sink.stream or sys.stdout
                stream.write(line)
                stream.flush()
        except (OSError, ValueError, RuntimeError):
            return  # a message lost must never break the shutdown that said it


def _celery_say(msg: str, f: object = None) -> None:
    """``celery.apps.worker.safe_say``'s stand-in; ``f`` (its stream) is ignored: the
    node's lines all go where its log goes."""
    level = logging.INFO if "Warm shutdown" in msg else logging.WARNING
    say(msg, level, name="celery.worker")


def _route_celery_console() -> None:
    # Only once Celery's worker module is loaded (a worker imports it before Celery sends
    # setup_logging, which calls configure_logging): the node's other processes need not
    # import it.
    module = sys.modules.get("celery.apps.worker")
    if module is not None and getattr(module, "safe_say", None) is not _celery_say:
        module.safe_say = _celery_say  # type: ignore[attr-defined]


def configure_logging(address: str, level: str = "INFO") -> None:
    """Route every logger (root included, so Celery's too) to stdout in the node format,
    and the messages Celery's worker prints from its signal handlers too."""
    formatter = NodeFormatter(address)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    _Sink.formatter, _Sink.stream, _Sink.fd = formatter, sys.stdout, _fileno(sys.stdout)
    _Sink.configured = True
    _route_celery_console()
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
