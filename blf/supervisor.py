"""``blindference-node run``: the whole node on one machine, as one process group.

The supervisor holds the unlocked key and the embedded Redis, and runs its children:
beat, the control worker (the key reaches it by pipe), the inference worker, so
heartbeats and polls never queue behind a long job, and the key-free metrics endpoint.
Children run in sessions of their own and die with the supervisor, so a terminal's Ctrl+C
reaches only the supervisor, which stops them in order: beat and metrics first (no new
polls), then the workers, which finish their running jobs (up to ``shutdown_timeout_s``);
then a final heartbeat, then Redis. A second signal stops everything at once.

A stop requested before the node is up (the first heartbeat) ends the start where it is:
whatever had started is stopped, no heartbeat is sent, and `run` exits 0. The final
heartbeat follows only a first one: a node the ICL never heard from has nothing to sign
off.

Faults the node rides out:
  * The embedded Redis dies: it is restarted on the same socket from its append-only
    file (the queues and the journal survive), up to ``REDIS_RESTARTS`` times within
    ``REDIS_RESTART_WINDOW_S``; one more death stops the node (exit 1). The workers
    reconnect by themselves; a child that exits within ``RECOVERY_S`` of a restart (beat
    does: RedBeat gives up on its lock) is started again, once per restart.
  * The metrics child exits (its port is taken, say): one warning, and the node runs on
    without it.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import signal
import subprocess
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
from blf.node import Node
from blf.readiness import job_warnings
from blf.submission import drop_leases

__all__ = ["Supervisor"]

log = logging.getLogger("blf.node")

# The signals that stop `run` gracefully; `run` catches them from its first line on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# After a warm shutdown times out, Celery's cold shutdown gets this long before SIGKILL.
COLD_SHUTDOWN_GRACE_S = 10.0
# The final heartbeat is a courtesy: one quick retry, not the loop's patient policy.
FINAL_HEARTBEAT_RETRY = Retry(attempts=2, backoff=0.5, backoff_max=0.5)
WATCH_INTERVAL_S = 0.5
# The embedded Redis is restarted at most this many times within the window; one more
# death within it stops the node (something is wrong that restarts do not cure).
REDIS_RESTARTS = 5
REDIS_RESTART_WINDOW_S = 600.0
# A child that exits this soon after a Redis restart lost its connection: started again.
RECOVERY_S = 60.0
# Roles stopped with beat, before the workers: they run no jobs.
FIRST_TO_STOP = ("beat", "metrics")


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    # The Redis restart (its count) after which this child was started again, if any.
    restarted_for: int = 0
    # The last lines of its stderr, when captured (the metrics child's).
    errors: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=5))

    def alive(self) -> bool:
        return self.process.poll() is None

    def capture_stderr(self) -> None:
        """Keep the last lines the child writes to stderr (read in a thread, so a chatty
        child never blocks on a full pipe)."""
        stream = self.process.stderr
        assert stream is not None

        def read() -> None:
            for raw in stream:
                text = raw.decode("utf-8", "replace").strip()
                if text:
                    self.errors.append(text)

        threading.Thread(target=read, name=f"{self.role}-stderr", daemon=True).start()

    def reason(self) -> str:
        """Its exit status and, when it said why (click's ``Error: ...``), that."""
        said = [line for line in self.errors if line.startswith("Error: ")]
        why = f": {said[-1].removeprefix('Error: ')}" if said else ""
        return f"exited with {self.process.returncode}{why}"


@dataclass
class Supervisor:
    node: Node
    password: str = field(repr=False)
    children: list[Child] = field(default_factory=list)
    # Set by a stop signal (`run` hands over the event its first handler set).
    stop_requested: threading.Event = field(default_factory=threading.Event)
    _redis: EmbeddedRedis | None = None
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
        roles = ["control", "inference", "beat", "metrics"]
        if not self.node.settings.supported_model_ids:
            roles.remove("inference")
        for role in roles:
            if self.stop_requested.is_set():
                break
            self._spawn(role, broker)
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

    def _spawn(self, role: str, broker: str) -> Child:
        # Run-time overrides only: never written to config.json.
        env = child_env(
            BLF_CONFIG_PATH=str(self.node.config.path),
            BLF_BROKER_URL=broker,
            BLF_NODE_ADDRESS=self.node.address,
        )
        if role == "metrics":
            # Key-free: no password, nothing on stdin. Its stderr is read for the one line
            # that says why it stopped (a port in use), logged as one warning.
            process = spawn(
                [sys.executable, "-m", "blf", "metrics"], env=env, stderr=subprocess.PIPE
            )
            child = Child(role, process)
            child.capture_stderr()
            self.children.append(child)
            return child
        if role == "inference":
            command = [sys.executable, "-m", "workers.gpu"]  # the key-free entry point
        elif role == "beat":
            command = [sys.executable, "-m", "blf.scheduler"]  # beat without the CLI's imports
        else:
            command = [sys.executable, "-m", "blf", "worker", "--role", role]
        if role == "control":
            command.append("--password-stdin")
        process = spawn(command, env=env, stdin=subprocess.PIPE)
        child = Child(role, process)
        self.children.append(child)
        assert process.stdin is not None
        try:
            if role == "control":
                process.stdin.write(self.password.encode("utf-8") + b"\n")
            process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; _watch reports its exit status
        return child

    def _watch(self, broker: str) -> int:
        while not self.stop_requested.wait(WATCH_INTERVAL_S):
            if not self._redis_alive_or_restarted():
                return 1
            for child in list(self.children):
                if child.alive() or self.stop_requested.is_set():
                    continue
                if child.role == "metrics":
                    log.warning(
                        "Metrics not served: metrics %s; the node runs on without them",
                        child.reason(),
                    )
                    self.children.remove(child)
                elif self._lost_redis(child):
                    self.children.remove(child)
                    restarted = self._spawn(child.role, broker)
                    restarted.restarted_for = len(self._redis_restarts)
                    log.warning(
                        "%s exited with %s (it lost Redis); started it again",
                        child.role,
                        child.process.returncode,
                    )
                else:
                    log.error(
                        "%s exited with %s; stopping the node", child.role, child.process.returncode
                    )
                    return 1
        log.info("Shutting down: no new assignments; waiting for running jobs")
        self._stop_children()
        return 0

    def _lost_redis(self, child: Child) -> bool:
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
        """Beat (and metrics) first, so nothing new is scheduled; then the workers' warm
        shutdown (running tasks finish) within shutdown_timeout_s; then cold."""
        beat = [c for c in self.children if c.role in FIRST_TO_STOP]
        workers = [c for c in self.children if c.role not in FIRST_TO_STOP]
        for group, timeout in ((beat, COLD_SHUTDOWN_GRACE_S), (workers, None)):
            self._stop_group(group, timeout)
        self.children.clear()

    def _stop_group(self, group: list[Child], timeout: float | None) -> None:
        running = [c for c in group if c.alive()]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        budget = self.node.settings.shutdown_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + budget
        for child in running:
            try:
                child.process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s still busy after %ss: stopping it; unfinished jobs go back to the queue",
                    child.role,
                    budget,
                )
                self._cold_stop(child)

    @staticmethod
    def _cold_stop(child: Child) -> None:
        if child.alive():
            child.process.send_signal(signal.SIGQUIT)
        try:
            child.process.wait(COLD_SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            if not self.stop_requested.is_set():
                self.stop_requested.set()
                return
            # say, not log: a logging call in a signal handler can meet a write in progress.
            say(f"Second {signal.Signals(signum).name}: stopping at once", logging.WARNING)
            for child in self.children:
                if child.alive():
                    child.process.send_signal(signal.SIGQUIT)

        for signum in STOP_SIGNALS:
            signal.signal(signum, request_stop)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
