"""Beat's scheduler: RedBeat (one beat per node, by a Redis lock) with two additions.

* On its first tick, which RedBeat only reaches once this beat holds the node's lock, it
  runs every duty once: an interval entry first fires one period after beat starts, so a
  beat restarted more often than a period would otherwise never run it. Every duty is
  idempotent, so a duty that RedBeat also finds overdue merely runs twice.
* A beat that loses its lock (the process was paused past the lock timeout, e.g. a laptop
  suspend) waits to take it back instead of dying: a dead embedded beat would leave a
  node that looks alive and neither polls nor heartbeats.
"""

from __future__ import annotations

import logging
from typing import Any

from redbeat import RedBeatScheduler
from redis.exceptions import LockError

__all__ = ["NodeScheduler"]

log = logging.getLogger("blf.beat")


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
