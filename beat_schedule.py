"""The node's periodic duties: the one place the schedule lives (protocol.md section 6).

Every entry expires after one period, so a slow ICL drops a missed tick instead of
piling polls up. An interval entry first fires one period after beat starts, so a beat
restarted more often than a period would never run it: each duty therefore also runs once
whenever beat starts (see ``blf.app``), and the 10-day on-chain heartbeat is a frequent
"is it due?" check against the chain's own record of the last heartbeat.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blf.config import Settings

__all__ = ["build"]


def _entry(task: str, every_s: float, queue: str) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": timedelta(seconds=every_s),
        # Beat sends by name (it imports no task module), so it cannot know that the duties
        # ignore their results: said here, or it would wait on a result channel for each.
        "options": {"expires": every_s, "queue": queue, "ignore_result": True},
    }


def build(settings: Settings, queue: str) -> dict[str, dict[str, Any]]:
    chain_check_s = min(settings.chain_heartbeat_check_s, settings.chain_heartbeat_interval_s)
    return {
        "icl-heartbeat": _entry(
            "blf.tasks.loops.icl_heartbeat", settings.heartbeat_interval_s, queue
        ),
        "assignment-poller": _entry(
            "blf.tasks.loops.poll_assignments", settings.poll_interval_s, queue
        ),
        "attestation-watchdog": _entry(
            "blf.tasks.loops.attestation_watchdog", settings.watchdog_interval_s, queue
        ),
        "chain-heartbeat": _entry("blf.tasks.loops.chain_heartbeat", chain_check_s, queue),
        "job-sweeper": _entry("blf.tasks.loops.sweep_jobs", settings.sweep_interval_s, queue),
    }
