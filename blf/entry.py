"""The ``blindference-node`` executable: a stop signal is caught before the CLI loads.

Importing the command line takes about a second (click, pydantic, eth-account); a SIGTERM
that systemd or an operator sends to ``run`` in that second used to kill it with status
143. ``run`` installs its own handler as its first step; this covers the time before it,
with the same answer: nothing has started yet, so the process ends at once with status 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

__all__ = ["STOPPED_EARLY", "main"]

# Set when a stop signal arrived before `run` took the signals over (Python may drop the
# SystemExit raised inside an import's callback; `run` checks this too).
STOPPED_EARLY = threading.Event()
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_before_start(signum: int, _frame: FrameType | None) -> None:
    if not STOPPED_EARLY.is_set():
        STOPPED_EARLY.set()
        from blf.logging import say  # stdlib only: cheap, and safe in a signal handler

        say(f"Stopped by {signal.Signals(signum).name} before the node started")
    raise SystemExit(0)


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, _stop_before_start)
    from blf.cli import main as cli_main

    cli_main()
