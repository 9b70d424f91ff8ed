"""``blindference-node run``: the whole node on one machine.

`run` holds the unlocked key and the embedded Redis. The control side runs in this one
process: the control worker and beat in threads, the metrics endpoint in the thread of
its server (each was a Python process of its own, about 55 MiB apiece; together they cost
one). The inference worker is a child process that never holds the key, and would be on
a GPU machine in a cluster. Children run in sessions of their own and die with `run`, so a
terminal's Ctrl+C reaches only `run`, which stops everything in order: beat and metrics
first (no new polls), then the workers, which finish their running jobs (up to
``shutdown_timeout_s``); then a final heartbeat, then Redis. A second signal stops
everything at once.

A stop requested before the node is up (the first heartbeat) ends the start where it is:
whatever had started is stopped, no heartbeat is sent, and `run` exits 0. The final
heartbeat follows only a first one: a node the ICL never heard from has nothing to sign
off.

Faults the node rides out:
  * The embedded Redis dies: it is restarted on the same socket from its append-only
    file (the queues and the journal survive), up to ``REDIS_RESTARTS`` times within
    ``REDIS_RESTART_WINDOW_S``; one more death stops the node (exit 1). The workers
    reconnect by themselves, and beat starts again by itself (blf.roles.beat_role), as
    it does when an operator's Redis blips; a role that still ends within ``RECOVERY_S``
    of a restart is started again, once per restart.
  * The metrics port is taken (or metrics_host refused): one warning, and the node runs
    on without the endpoint.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import redis

from blf.app import requeue_unacked
from blf.broker import EmbeddedRedis, broker_urls
from blf.chain import StakingClient, format_amount
from blf.children import child_env, spawn
from blf.errors import BlfError, BrokerError, CofheTransportError
from blf.icl import DEFAULT_RETRY, Retry
from blf.keyfiles import control_key, create_key_file
from blf.logging import say
from blf.metrics import MetricsServer
from blf.node import Node
from blf.readiness import job_warnings
from blf.roles import ChildProcess, Role, ThreadRole, Wakeups
from blf.submission import drop_leases

__all__ = ["Supervisor"]

log = logging.getLogger("blf.node")

# The signals that stop `run` gracefully; `run` catches them from its first line on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# After a warm shutdown times out, Celery's cold shutdown gets this long before SIGKILL.
COLD_SHUTDOWN_GRACE_S = 10.0
# The final heartbeat is a courtesy: one quick retry, not the loop's patient policy.
FINAL_HEARTBEAT_RETRY = Retry(attempts=2, backoff=0.5, backoff_max=0.5)
# Where a child's exit cannot be waited on (no pidfd), how often to look.
WATCH_FALLBACK_S = 0.5
# The embedded Redis is restarted at most this many times within the window; one more
# death within it stops the node (something is wrong that restarts do not cure).
REDIS_RESTARTS = 5
REDIS_RESTART_WINDOW_S = 600.0
# A child that exits this soon after a Redis restart lost its connection: started again.
RECOVERY_S = 60.0
# After a second signal, what a role gets for its cold stop before it is killed (or, for
# a thread, left behind).
HURRIED_GRACE_S = 1.0
# Stopped before the workers: it runs no jobs, and must send no new polls.
FIRST_TO_STOP = ("beat",)
# How long a stop waits for beat.
BEAT_STOP_S = 2.0
# How often a stop that waits on the workers checks for a second signal.
HURRY_CHECK_S = 0.2


@dataclass
class Supervisor:
    node: Node
    children: list[Role] = field(default_factory=list)
    # Set by a stop signal (`run` hands over the event its first handler set).
    stop_requested: threading.Event = field(default_factory=threading.Event)
    # Set by a second stop signal: stop at once.
    hurried: threading.Event = field(default_factory=threading.Event)
    # A role hosted in a thread did not end when stopped (a job still running in the
    # control worker's pool, say): `run` must leave by os._exit, or Python would wait for it.
    abandoned_threads: bool = False
    _wakeups: Wakeups = field(default_factory=lambda: Wakeups(WATCH_FALLBACK_S))
    _redis: EmbeddedRedis | None = None
    _metrics: MetricsServer | None = None
    # When the embedded Redis was restarted (monotonic seconds), newest last.
    _redis_restarts: list[float] = field(default_factory=list)

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            with self._exclusive():
                return self._run()
        finally:
            self._stop_children()
            if self._redis is not None:
                self._redis.stop()
            self._wakeups.close()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One `run` per node directory: two would share a Redis, a beat and a key."""
        path = self.node.directory / "run.lock"
        with path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BrokerError(
                    f"another `blindference-node run` is using {self.node.directory} "
                    f"(it holds {path})"
                ) from None
            yield

    def _run(self) -> int:
        if self._stopped_before_up():
            return 0
        self._ensure_keys()
        broker = self._start_broker()
        if self._stopped_before_up():
            return 0
        if self.node.needs_attestation():
            log.info("Certificate missing or expiring within 6 h: re-attesting")
            self.node.attest()
            if self._stopped_before_up():
                return 0
        self._announce()
        if self._stopped_before_up():
            return 0
        self._heartbeat("Heartbeat sent to ICL")  # from here on, a final one follows
        roles = ["control", "inference", "beat"]
        if not self.node.settings.supported_model_ids:
            roles.remove("inference")
        for role in roles:
            if self.stop_requested.is_set():
                break
            self._start(role, broker)
        if not self.stop_requested.is_set():
            self._serve_metrics()
        code = self._watch(broker)
        if code == 0:
            self._heartbeat("Final heartbeat sent to ICL", retry=FINAL_HEARTBEAT_RETRY)
            log.info("Node stopped")
        return code

    def _stopped_before_up(self) -> bool:
        """Whether a stop was requested during the start, before the first heartbeat:
        ``run`` then stops what it started (``run``'s finally) and sends no heartbeat."""
        if not self.stop_requested.is_set():
            return False
        log.info("Stopped before the node was up: no heartbeat sent")
        return True

    def _ensure_keys(self) -> None:
        """A directory made by the public node has neither key yet: make them here."""
        config = self.node.config
        cluster = config.beside(self.node.settings.cluster_key_file)
        if not cluster.exists() and not self.node.settings.cluster_key:
            create_key_file(cluster)
            log.info("Created the cluster key %s (copy it to GPU machines)", cluster)
        control_key(config.beside(self.node.settings.control_key_file))

    def _start_broker(self) -> str:
        configured = self.node.settings.broker_url
        if configured:
            return broker_urls(configured).celery
        self._redis = EmbeddedRedis(self.node.directory)
        urls = self._redis.start()
        # No worker of this node can be running (we hold run.lock and its only Redis), so
        # whatever is unacknowledged belonged to a worker that died: requeue it now rather
        # than after the visibility timeout.
        restored = requeue_unacked(
            self.node.settings.model_copy(update={"broker_url": urls.celery})
        )
        if restored:
            log.warning("Requeued %d job message(s) left unfinished by the last run", restored)
        client = redis.Redis.from_url(urls.redis)
        try:
            drop_leases(client, self.node.address)
        finally:
            client.close()
        return urls.celery

    def _announce(self) -> None:
        settings = self.node.settings
        log.info("Daemon starting ...")
        log.info("  Address : %s", self.node.address)
        log.info("  Tier    : %s", settings.tier)
        log.info("  Models  : %s", ", ".join(settings.supported_model_ids) or "(none)")
        log.info("  Cert    : expires in %ds", self.node.cert_seconds_left() or 0)
        log.info("  CoFHE   : %s", self._cofhe_line())
        for warning in job_warnings(settings):
            log.warning("%s", warning)
        self._warn_if_unstaked()

    def _cofhe_line(self) -> str:
        """The mode; in bridge mode, the SDK helper's handshake (a wrong chain stops the
        start: every job would fail; an unreachable one is said, and jobs retry)."""
        settings = self.node.settings
        if settings.effective_cofhe_mode != "bridge":
            return settings.effective_cofhe_mode
        from blf.cofhe_bridge import open_bridge

        bridge = open_bridge(settings, self.node.account, directory=self.node.directory)
        try:
            info = bridge.handshake()
        except CofheTransportError as exc:
            log.warning("CoFHE helper does not answer yet: %s", exc)
            return "bridge (helper not answering; jobs retry)"
        finally:
            bridge.close()
        return (
            f"bridge (@cofhe/sdk {info.sdk}, chain {info.chain_id}, helper answered in "
            f"{bridge.helper.last_start_s + info.started_in_s:.2f} s)"
        )

    def _warn_if_unstaked(self) -> None:
        """Say at start when the network wants a stake (its staking contract's MIN_STAKE is
        above 0) and this node has none active. Advisory: the node runs on either way."""
        settings = self.node.settings
        if not settings.rpc_url:
            return
        try:
            client = StakingClient(
                settings.rpc_url,
                chain_id=settings.chain_id,
                staking_address=settings.staking_address,
                timeout_s=5.0,  # one slow read must not hold up the start
            )
            minimum = client.min_stake()
            if minimum == 0 or client.is_active(self.node.address):
                return
            amount = format_amount(minimum, client.decimals())
        except Exception as exc:  # advisory: any failure is one line here, never a crash
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            log.warning("Could not check the BLIND stake: %s", first)
            return
        log.warning(
            "No active BLIND stake: BlindferenceStaking %s requires at least %s BLIND; "
            "stake with `blindference-node staking stake %s`",
            client.staking_address,
            amount,
            amount,
        )

    def _heartbeat(self, success: str, *, retry: Retry | None = None) -> None:
        try:
            with self.node.icl(retry=retry or DEFAULT_RETRY) as icl:
                icl.heartbeat()
        except BlfError as exc:
            log.warning("Heartbeat failed: %s", exc)
            return
        log.info(success)

    def _start(self, role: str, broker: str) -> Role:
        started: Role
        if role == "control":
            started = self._control_worker(broker)
        elif role == "beat":
            from blf.app import app
            from blf.roles import beat_role

            # The app the control worker configured.
            started = beat_role(app, on_exit=self._wakeups.poke).start()
        else:
            started = self._inference_worker(broker)
        self.children.append(started)
        return started

    def _control_worker(self, broker: str) -> ThreadRole:
        from blf.control_worker import build_control_worker
        from blf.logging import warn_if_root
        from blf.roles import worker_role

        warn_if_root()
        worker = build_control_worker(self.node, self.node.config, broker_url=broker, embedded=True)
        return worker_role("control", worker, on_exit=self._wakeups.poke).start()

    def _inference_worker(self, broker: str) -> ChildProcess:
        # The key-free entry point, in a process of its own: nothing of the key's reaches
        # it, neither the password (child_env) nor the memory of this process.
        env = child_env(
            BLF_CONFIG_PATH=str(self.node.config.path),
            BLF_BROKER_URL=broker,  # a run-time override only: never written to config.json
            BLF_NODE_ADDRESS=self.node.address,
        )
        return ChildProcess("inference", spawn([sys.executable, "-m", "workers.gpu"], env=env))

    def _serve_metrics(self) -> None:
        from blf.metrics import build_registry, serve

        try:
            self._metrics = serve(self.node.settings, registry=build_registry(self.node.config))
        except BlfError as exc:
            log.warning("Metrics not served: %s; the node runs on without them", exc)
            return
        log.info("Metrics on %s", self._metrics.url)

    def _watch(self, broker: str) -> int:
        """Sleeps until something happens (a signal, a role's end, Redis's exit): an idle
        node's supervisor does not wake up at all."""
        while not self.stop_requested.is_set():
            if not self._redis_alive_or_restarted():
                return 1
            for child in list(self.children):
                if child.alive() or self.stop_requested.is_set():
                    continue
                if self._lost_redis(child):
                    self.children.remove(child)
                    restarted = self._start(child.role, broker)
                    restarted.restarted_for = len(self._redis_restarts)
                    log.warning(
                        "%s %s (it lost Redis); started it again", child.role, child.reason()
                    )
                else:
                    log.error("%s %s; stopping the node", child.role, child.reason())
                    return 1
            self._wakeups.wait(self._watched_pids())
        log.info("Shutting down: no new assignments; waiting for running jobs")
        self._stop_children()
        return 0

    def _watched_pids(self) -> list[int]:
        pids = [c.pid for c in self.children if isinstance(c, ChildProcess) and c.alive()]
        redis_pid = self._redis.pid if self._redis is not None else None
        return pids + ([redis_pid] if redis_pid is not None else [])

    def _lost_redis(self, child: Role) -> bool:
        """Whether ``child`` exited for the Redis restart: soon after one, and not yet
        started again for it (a child that dies again was not cured by the restart)."""
        if not self._redis_restarts:
            return False
        recent = time.monotonic() - self._redis_restarts[-1] < RECOVERY_S
        return recent and child.restarted_for < len(self._redis_restarts)

    def _redis_alive_or_restarted(self) -> bool:
        """False when the embedded Redis died and may not (or cannot) be restarted."""
        server = self._redis
        if server is None:
            return True
        status = server.exit_status()
        if status is None:
            return True
        now = time.monotonic()
        recent = [t for t in self._redis_restarts if now - t < REDIS_RESTART_WINDOW_S]
        if len(recent) >= REDIS_RESTARTS:
            log.error(
                "Embedded Redis exited with %s, its %s death within %d min; stopping the node "
                "(see %s)",
                status,
                _ordinal(len(recent) + 1),
                REDIS_RESTART_WINDOW_S // 60,
                server.directory / "redis.log",
            )
            return False
        try:
            server.start()
        except BlfError as exc:
            log.error("Embedded Redis exited with %s and cannot be restarted: %s", status, exc)
            return False
        self._redis_restarts.append(now)
        log.warning(
            "Embedded Redis exited with %s; restarted it from its append-only file "
            "(restart %d of %d within %d min)",
            status,
            len(recent) + 1,
            REDIS_RESTARTS,
            REDIS_RESTART_WINDOW_S // 60,
        )
        return True

    def _stop_children(self) -> None:
        """Beat and metrics first, so nothing new is scheduled; then the workers' warm
        shutdown (running tasks finish) within shutdown_timeout_s; then cold."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        beat = [c for c in self.children if c.role in FIRST_TO_STOP and c.alive()]
        for child in beat:
            child.stop()
        for child in beat:
            # Beat holds no job, and RedBeat waiting on its lock or on Redis cannot be
            # interrupted: its thread (a daemon) is left to end with the process.
            if not child.wait(BEAT_STOP_S):
                log.info("beat is still waiting on Redis: stopping without it")
        self._stop_workers([c for c in self.children if c.role not in FIRST_TO_STOP])
        self.children.clear()

    def _stop_workers(self, group: list[Role]) -> None:
        running = [c for c in group if c.alive()]
        for child in running:
            child.stop()
        budget = self.node.settings.shutdown_timeout_s
        deadline = time.monotonic() + budget
        for child in running:
            if self._wait_unless_hurried(child, deadline):
                continue
            if not self.hurried.is_set():
                log.warning(
                    "%s still busy after %ss: stopping it; unfinished jobs go back to the queue",
                    child.role,
                    budget,
                )
            grace = HURRIED_GRACE_S if self.hurried.is_set() else COLD_SHUTDOWN_GRACE_S
            if not child.cold_stop(grace):
                self.abandoned_threads = True

    def _wait_unless_hurried(self, child: Role, deadline: float) -> bool:
        """Wait for ``child`` to end until ``deadline`` or a second signal."""
        while not self.hurried.is_set():
            left = deadline - time.monotonic()
            if child.wait(min(left, HURRY_CHECK_S)):
                return True
            if left <= 0:
                return False
        return not child.alive()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            if not self.stop_requested.is_set():
                self.stop_requested.set()
                self._wakeups.poke()
                return
            # say, not log: a logging call in a signal handler can meet a write in progress.
            # Only flags here: the main thread hurries the roles (_stop_workers), where a
            # lock an interrupted call holds cannot be taken again.
            say(f"Second {signal.Signals(signum).name}: stopping at once", logging.WARNING)
            self.hurried.set()
            self._wakeups.poke()

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)
        self._wakeups.on_signals()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
