"""``blindference-node run``: the whole node on one machine, as one process group.

The supervisor holds the unlocked key and the embedded Redis, and runs three children:
beat, the control worker (the key reaches it by pipe) and the inference worker, so
heartbeats and polls never queue behind a long job. Children run in sessions of their own
and die with the supervisor, so a terminal's Ctrl+C reaches only the supervisor, which
stops them in order: beat first (no new polls), then the workers, which finish their
running jobs (up to ``shutdown_timeout_s``); then a final heartbeat, then Redis.
A second signal stops everything at once.
"""

from __future__ import annotations

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
from blf.node import Node
from blf.readiness import job_warnings
from blf.submission import drop_leases

__all__ = ["Supervisor"]

log = logging.getLogger("blf.node")

# After a warm shutdown times out, Celery's cold shutdown gets this long before SIGKILL.
COLD_SHUTDOWN_GRACE_S = 10.0
# The final heartbeat is a courtesy: one quick retry, not the loop's patient policy.
FINAL_HEARTBEAT_RETRY = Retry(attempts=2, backoff=0.5, backoff_max=0.5)


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Supervisor:
    node: Node
    password: str = field(repr=False)
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _redis: EmbeddedRedis | None = None

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
        self._ensure_keys()
        broker = self._start_broker()
        if self.node.needs_attestation() and not self._stop.is_set():
            log.info("Certificate missing or expiring within 6 h: re-attesting")
            self.node.attest()
        self._announce()
        self._heartbeat("Heartbeat sent to ICL")
        roles = ["control", "inference", "beat"]
        if not self.node.settings.supported_model_ids:
            roles.remove("inference")
        for role in roles:
            if self._stop.is_set():
                break
            self._spawn(role, broker)
        code = self._watch()
        if code == 0:
            self._heartbeat("Final heartbeat sent to ICL", retry=FINAL_HEARTBEAT_RETRY)
            log.info("Node stopped")
        return code

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

    def _spawn(self, role: str, broker: str) -> None:
        # Run-time overrides only: never written to config.json.
        env = child_env(
            BLF_CONFIG_PATH=str(self.node.config.path),
            BLF_BROKER_URL=broker,
            BLF_NODE_ADDRESS=self.node.address,
        )
        if role == "inference":
            command = [sys.executable, "-m", "workers.gpu"]  # the key-free entry point
        else:
            command = [sys.executable, "-m", "blf"]
            command += ["beat"] if role == "beat" else ["worker", "--role", role]
        if role == "control":
            command.append("--password-stdin")
        process = spawn(command, env=env, stdin=subprocess.PIPE)
        self.children.append(Child(role, process))
        assert process.stdin is not None
        try:
            if role == "control":
                process.stdin.write(self.password.encode("utf-8") + b"\n")
            process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; _watch reports its exit status

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            for child in self.children:
                if not child.alive():
                    log.error(
                        "%s exited with %s; stopping the node", child.role, child.process.returncode
                    )
                    return 1
        log.info("Shutting down: no new assignments; waiting for running jobs")
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        """Beat first, so nothing new is scheduled; then the workers' warm shutdown (running
        tasks finish) within shutdown_timeout_s; then cold."""
        beat = [c for c in self.children if c.role == "beat"]
        workers = [c for c in self.children if c.role != "beat"]
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
            if not self._stop.is_set():
                self._stop.set()
                return
            log.warning("Second %s: stopping at once", signal.Signals(signum).name)
            for child in self.children:
                if child.alive():
                    child.process.send_signal(signal.SIGQUIT)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, request_stop)
