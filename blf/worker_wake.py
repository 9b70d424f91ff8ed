"""A node worker's event loop wakes when there is something to do, not on a timer.

An idle Celery worker on Redis sits in BRPOP, which returns empty once per
``brpop_timeout`` (kombu's default 1 s: a wake-up, a round trip and some Python every
second, most of an idle worker's CPU). A message ends the BRPOP at once whatever its
timeout; what needs the short timeout is everything else the loop must notice, and here
each of those gets a wake-up of its own, through a pipe the loop reads:

* a stop: Celery's signal handlers only set a flag, which the loop reads when it next
  wakes. In a worker that is a process of its own, ``signal.set_wakeup_fd`` makes every
  signal write to the pipe; a worker embedded in `run` is woken by ``wake`` instead;
* a task that finished: a free slot lets the loop take the next message, which it does
  only once it wakes.

kombu's own once-a-second timer (for the binding tables of expiring queues) runs once
a minute instead, set again after each reconnection.

A stop needs one more thing: kombu reads the answer of the BRPOP in flight before it
closes the connection (it may carry a message), so that BRPOP must end too. A thread of
the worker asks Redis to end it (``CLIENT UNBLOCK``, Redis 5 and later) once a stop is
requested; the worker's connections carry a name of their own (``client_name``) for it
to find them by. Where that fails, the BRPOP ends on its own timeout.

So the node sets a long ``brpop_timeout`` (``IDLE_BRPOP_S``) without holding a warm
shutdown or a free slot that long.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from typing import Any

from celery import bootsteps
from celery.signals import task_postrun, worker_shutting_down

__all__ = [
    "IDLE_BRPOP_S",
    "UnblockAtShutdown",
    "WakeOnEvents",
    "connection_name",
    "stop_soon",
    "wake",
]

# Seconds an idle worker's BRPOP waits before it is sent again.
IDLE_BRPOP_S = 10
# How often, and how many times, a stopping worker asks Redis to end its BRPOP (again:
# the loop may send one more just after the first request).
UNBLOCK_EVERY_S = 0.25
UNBLOCK_TRIES = 40

# How often the binding tables of expiring queues (Celery's remote-control queues) are
# looked at: kombu's own sweep interval.
BINDING_CHECK_S = 60

# Set when this process's worker is asked to stop; read by its unblocking thread.
_stopping = threading.Event()
_binding_timer: Any = None

# The write end of the running worker's pipe (one worker per process in a node).
_write_fd: int | None = None


def wake() -> None:
    """End the current wait of this process's worker loop (safe from any thread and from
    a signal handler); nothing when no worker runs."""
    fd = _write_fd
    if fd is not None:
        with contextlib.suppress(OSError):  # a full pipe: a wake-up is pending anyway
            os.write(fd, b"\0")


def stop_soon() -> None:
    """For a stop just requested (the flag set): wake the loop, end its BRPOP."""
    wake()
    _stopping.set()


def connection_name() -> str:
    """A name for one worker's Redis connections (``CLIENT LIST`` shows it)."""
    return f"blf-worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@task_postrun.connect
def _slot_freed(**_: Any) -> None:
    wake()


def _slow_binding_refresh(consumer: Any, hub: Any) -> None:
    """kombu (5.7) wakes the loop every second to see whether an expiring queue's binding
    table is due a refresh; none is due for 20 minutes (its TTL is an hour at the least,
    refreshed at a third of it) and the sweep of stale tables runs once a minute. So the
    check runs once a minute instead. Called on the loop's first turn after each
    (re)connection, once kombu has set its own timer."""
    global _binding_timer
    transport = getattr(getattr(consumer, "connection", None), "transport", None)
    cycle = getattr(transport, "cycle", None)
    kombus = getattr(cycle, "_binding_expiry_tref", None)
    if cycle is None or kombus is None:
        return
    kombus.cancel()
    if _binding_timer is not None:
        _binding_timer.cancel()  # the one set before a reconnection
    _binding_timer = hub.call_repeatedly(BINDING_CHECK_S, cycle.maybe_refresh_binding_expiry)


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    # Sent from Celery's signal handler: only set the event; the thread does the I/O.
    _stopping.set()


def _unblock_until_stopped(redis_url: str, name: str, stopped: threading.Event) -> None:
    import redis

    _stopping.wait()
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        for _ in range(UNBLOCK_TRIES):
            for entry in client.client_list():
                if entry.get("name") == name and "b" in entry.get("flags", ""):
                    client.client_unblock(int(entry["id"]))
            if stopped.wait(UNBLOCK_EVERY_S):
                return
    except redis.RedisError:
        return  # an old Redis, or none: the BRPOP ends on its own timeout
    finally:
        client.close()


class WakeOnEvents(bootsteps.StartStopStep):
    """The worker step that owns the pipe (it needs the event loop, so the Hub first)."""

    requires = ("celery.worker.components:Hub",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self._fds: tuple[int, int] | None = None
        self._previous_wakeup: int | None = None
        self._stopped = threading.Event()

    def include_if(self, parent: Any) -> bool:
        return bool(parent.use_eventloop)

    def start(self, parent: Any) -> None:
        global _write_fd
        if self._fds is None:
            # Never closed: a task thread that reads ``_write_fd`` just before a stop must
            # not write into whatever file would take the number next.
            read, write = os.pipe()
            for fd in (read, write):
                os.set_blocking(fd, False)
            self._fds = (read, write)
        _write_fd = self._fds[1]
        if not getattr(parent, "embedded", False) and _in_main_thread():
            self._previous_wakeup = signal.set_wakeup_fd(self._fds[1], warn_on_full_buffer=False)
        self._start_unblocker(parent)

    def _start_unblocker(self, parent: Any) -> None:
        from blf.broker import broker_urls
        from blf.errors import BrokerError

        conf = parent.app.conf
        name = (conf.broker_transport_options or {}).get("client_name")
        try:
            url = broker_urls(conf.broker_url).redis
        except BrokerError:
            return
        if name:
            _stopping.clear()
            self._stopped.clear()
            threading.Thread(
                target=_unblock_until_stopped,
                args=(url, name, self._stopped),
                name="brpop-unblocker",
                daemon=True,
            ).start()

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        # Called each time the loop (re)starts, after a reconnection too: the loop then
        # has a new set of readers.
        if self._fds is not None:
            hub.add_reader(self._fds[0], _drain, self._fds[0])
        # The consumer's transport registers right after this: look on the first turn.
        hub.call_soon(_slow_binding_refresh, getattr(parent, "consumer", None), hub)

    def stop(self, parent: Any) -> None:
        global _write_fd
        _write_fd = None
        self._stopped.set()
        if self._previous_wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._previous_wakeup = None


class UnblockAtShutdown(bootsteps.StartStopStep):
    """The consumer step that asks for the BRPOP to end however the worker stops (a
    signal, an embedded stop, Flower's or `celery control`'s shutdown): it shuts down just
    before the consumer's connection, which reads the BRPOP's answer as it closes. (A
    reconnection stops the consumer's steps; only the final stop shuts them down.)"""

    requires = ("celery.worker.consumer.connection:Connection",)

    def shutdown(self, parent: Any) -> None:
        _stopping.set()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 512):
            pass


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
