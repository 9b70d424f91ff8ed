"""What `run` starts, watches and stops, in one shape: child processes (the inference
worker, which must never share the key's process) and roles it hosts in threads of its
own (the control worker and beat: they work where the key already is, so three Python
processes, about 55 MiB each at the least, become one).

A role is ``alive`` until it ends; ``stop`` asks it to finish what it runs and take
nothing new; ``cold_stop`` ends it now (unfinished jobs go back to the queue); ``hurry``
is the second Ctrl+C; ``reason`` says how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery, signals
from celery.beat import Service

__all__ = [
    "BEAT_RETRY_S",
    "ChildProcess",
    "NodeBeatService",
    "Role",
    "ThreadRole",
    "Wakeups",
    "beat_role",
    "worker_role",
]

# A beat that lost Redis waits this long before it starts again.
BEAT_RETRY_S = 2.0

beat_log = logging.getLogger("celery.beat")


class Role(Protocol):
    role: str
    # The Redis restart (its count) after which this role was started again, if any.
    restarted_for: int

    def alive(self) -> bool: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float) -> bool: ...
    def cold_stop(self, grace: float) -> bool: ...
    def hurry(self) -> None: ...
    def reason(self) -> str: ...


@dataclass
class ChildProcess:
    role: str
    process: subprocess.Popen[bytes]
    restarted_for: int = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        try:
            self.process.wait(max(timeout, 0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def hurry(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGQUIT)  # Celery's cold shutdown

    def cold_stop(self, grace: float) -> bool:
        self.hurry()
        if not self.wait(grace):
            self.process.kill()
            self.process.wait()
        return True

    def reason(self) -> str:
        return f"exited with {self.process.returncode}"


class ThreadRole:
    """A role running ``body`` in a thread of this process: its return value is its exit
    status, an exception its failure (one line for the log, never a traceback)."""

    def __init__(
        self,
        role: str,
        body: Callable[[], int],
        *,
        on_stop: Callable[[], None],
        on_cold: Callable[[], None],
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.role = role
        self.restarted_for = 0
        self.returncode: int | None = None
        self._body, self._on_stop, self._on_cold = body, on_stop, on_cold
        self._on_exit = on_exit
        self._error = ""
        # Daemon: a role that ignores its cold stop must not hold the process's exit.
        self._thread = threading.Thread(target=self._main, name=role, daemon=True)

    def start(self) -> ThreadRole:
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self.returncode = self._body()
        except Exception as exc:  # the supervisor reports it and decides; no traceback
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            self._error = f"{type(exc).__name__}: {first}"
            self.returncode = 1
        finally:
            self._on_exit()

    def alive(self) -> bool:
        # returncode first: it is set before on_exit pokes the supervisor, which may look
        # while this thread is still finishing.
        return self.returncode is None and self._thread.is_alive()

    def stop(self) -> None:
        self._on_stop()

    def wait(self, timeout: float) -> bool:
        self._thread.join(max(timeout, 0))
        return not self._thread.is_alive()

    def hurry(self) -> None:
        self._on_cold()

    def cold_stop(self, grace: float) -> bool:
        self.hurry()
        return self.wait(grace)

    def reason(self) -> str:
        return f"exited with {self.returncode}" + (f": {self._error}" if self._error else "")


def worker_role(role: str, worker: Any, *, on_exit: Callable[[], None]) -> ThreadRole:
    """A Celery worker built with ``embedded=True`` (blf.app), in a thread. Stopping sets
    the flags Celery's own signal handlers set (warm: finish running tasks; cold: end)."""
    from celery.worker import state

    from blf.worker_wake import stop_soon

    def body() -> int:
        worker.start()
        return int(worker.exitcode or 0)

    def warm() -> None:
        state.should_stop = 0
        stop_soon()

    def cold() -> None:
        state.should_terminate = 1
        stop_soon()

    return ThreadRole(role, body, on_stop=warm, on_cold=cold, on_exit=on_exit)


class NodeBeatService(Service):
    """Celery's beat service for a thread: the wait between ticks ends as soon as it is
    told to stop (Celery's own sleeps out its interval, up to ``beat_max_loop_interval``,
    which would hold every stop of the node that long). No remote control, as in beat's
    program by default."""

    def start(self, embedded_process: bool = False) -> None:
        beat_log.info("beat: Starting...")
        # Built before beat_init: the scheduler's module connects RedBeat's lock to it.
        scheduler = self.scheduler
        signals.beat_init.send(sender=self)
        try:
            while not self._is_shutdown.is_set():
                interval = scheduler.tick()
                if interval and interval > 0.0:
                    self._is_shutdown.wait(interval)
                    if scheduler.should_sync():
                        scheduler._do_sync()
        finally:
            self.sync()  # RedBeat's close: frees the node's beat lock


def beat_role(app: Celery, *, on_exit: Callable[[], None]) -> ThreadRole:
    """Beat in a thread. The duties it sends carry no ``task-sent`` events (the node's
    beat never sent them: ticks would fill Flower), so neither does the rest of this
    process: the workers' own events still show every task.

    A beat that loses Redis (a restart, an operator's Redis that blips) starts again
    after ``BEAT_RETRY_S``, as the workers reconnect by themselves: a warning per try, and
    the node keeps its loops. A stop cannot interrupt RedBeat while it waits for its lock
    or for Redis; beat holds no job, so `run` does not wait for it long (its thread is a
    daemon)."""
    import redis
    from kombu.exceptions import OperationalError

    app.conf.task_send_sent_event = False
    stopping = threading.Event()
    current: list[NodeBeatService] = []

    def body() -> int:
        while not stopping.is_set():
            current[:] = [NodeBeatService(app, scheduler_cls=app.conf.beat_scheduler)]
            try:
                current[0].start()
            except (redis.RedisError, OperationalError, OSError) as exc:
                if stopping.is_set():
                    break
                first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
                beat_log.warning(
                    "beat: lost Redis (%s); starting again in %ss", first, BEAT_RETRY_S
                )
                stopping.wait(BEAT_RETRY_S)
                continue
            break
        return 0

    def stop() -> None:
        stopping.set()
        for service in current:
            service._is_shutdown.set()

    return ThreadRole("beat", body, on_stop=stop, on_cold=stop, on_exit=on_exit)


class Wakeups:
    """What the supervisor sleeps on between events, with no timer to wake it when
    nothing happens: a ``poke`` (from a signal handler, or a thread role that ended) or
    the exit of a child process (its pidfd, Linux 5.3 and later; where there is none,
    the wait ends after ``fallback_s`` to look again)."""

    def __init__(self, fallback_s: float) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._fallback_s = fallback_s
        self._previous_wakeup: int | None = None

    def on_signals(self) -> None:
        """End the wait on every signal this process handles (main thread only). A signal
        is delivered to whichever thread the kernel picks; Python runs its handler in the
        main thread only once that thread runs again, and one asleep in ``select`` would
        not: the kernel-level handler's write to the pipe wakes it."""
        self._previous_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def poke(self) -> None:
        """Safe from a signal handler and from any thread: one write to a pipe."""
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            os.write(self._write, b"\0")

    def wait(self, pids: Iterable[int]) -> None:
        """Until a poke or the exit of one of ``pids`` (a zombie counts: it is ready)."""
        opened: list[int] = []
        timeout: float | None = None
        try:
            for pid in pids:
                try:
                    opened.append(os.pidfd_open(pid))
                except (AttributeError, OSError):  # no pidfd here, or it is gone already
                    timeout = self._fallback_s
            readable, _, _ = select.select([self._read, *opened], [], [], timeout)
            if self._read in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._read, 64):
                        pass
        finally:
            for fd in opened:
                os.close(fd)

    def close(self) -> None:
        if self._previous_wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._previous_wakeup = None
        os.close(self._read)
        os.close(self._write)
