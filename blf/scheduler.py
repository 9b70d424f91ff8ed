"""Beat: its program (``NodeBeat``, and ``python -m blf.scheduler`` to run it alone) and its
scheduler, RedBeat (one beat per node, by a Redis lock) with two additions.

* On its first tick, which RedBeat only reaches once this beat holds the node's lock, it
  runs every duty once: an interval entry first fires one period after beat starts, so a
  beat restarted more often than a period would otherwise never run it. Every duty is
  idempotent, so a duty that RedBeat also finds overdue merely runs twice.
* A beat that loses its lock (the process was paused past the lock timeout, e.g. a laptop
  suspend) waits to take it back instead of dying: a dead embedded beat would leave a
  node that looks alive and neither polls nor heartbeats.

Beat imports no task module and so none of the operator-side code: about 52 MiB as
``python -m blf.scheduler``, against about 92 MiB when it was a worker's import graph
(bench/tree.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.apps.beat import Beat
from redbeat import RedBeatScheduler
from redis.exceptions import LockError

__all__ = ["NodeBeat", "NodeScheduler"]

log = logging.getLogger("blf.beat")


class NodeBeat(Beat):
    """Celery's beat program, without importing the app's task modules (``include``).

    Celery's own beat imports them as a worker would, for nothing: a task beat does not
    find registered goes out by name (``send_task``), with the same routing, options and
    signature, so beat needs none of the control side's code (the ICL client, the wallet,
    CoFHE), nor the memory it takes. It sends no ``task-sent`` events either: what it
    sends are the periodic duties, which send no task events of their own (blf.tasks.loops).
    """

    def init_loader(self) -> None:
        self.app.conf.task_send_sent_event = False
        self.app.finalize()


class NodeScheduler(RedBeatScheduler):
    _started = False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._started:
            self._started = True
            self._run_every_duty_once()
        try:
            delay: float = super().tick(*args, **kwargs)
        except LockError:
            log.warning("beat: lost the node's beat lock (was this process paused?); waiting")
            self.lock.acquire()  # blocks while another beat holds it: we become the standby
            log.info("beat: lock taken back")
            return 0.0
        return delay

    def _run_every_duty_once(self) -> None:
        for entry in self.app.conf.beat_schedule.values():
            self.app.send_task(entry["task"], **entry.get("options", {}))


def main() -> None:
    """``python -m blf.scheduler``: the node's beat, and nothing else.

    The same as ``blindference-node beat`` without the CLI, which imports every
    command's modules (the wallet, the ICL client, the chain's): beat needs the config,
    the node's Redis (``broker_url``) and the control key it signs with, nothing more.
    `run` can spawn this entry point for its beat child.
    """
    import sys

    from blf.app import app, configure, settings_with_address
    from blf.authority import install_node_control_key
    from blf.config import load_config
    from blf.errors import BlfError, ConfigError
    from blf.logging import configure_logging

    try:
        loaded = load_config()
        for warning in loaded.warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        if not loaded.settings.broker_url:
            raise ConfigError(
                f"{loaded.path}: field 'broker_url' is empty; beat joins an existing Redis "
                "(set BLF_BROKER_URL=redis://...)",
                field="broker_url",
            )
        settings = settings_with_address(loaded)
        configure(settings)
        install_node_control_key(loaded)
    except BlfError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    configure_logging(settings.node_address, settings.log_level)
    app.Beat(loglevel=settings.log_level, quiet=True).run()


if __name__ == "__main__":
    from blf import scheduler  # the module the app names, not a second copy as __main__

    scheduler.main()
