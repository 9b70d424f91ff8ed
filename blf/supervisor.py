"""``blindference-node run``: the whole node on one machine, as one process group.

The supervisor holds the unlocked key and the embedded Redis, and runs two Celery
workers as child processes: the control worker (with beat embedded) and the inference
worker, so heartbeats and polls never queue behind a long job. Children get their own
session, so a terminal's Ctrl+C reaches only the supervisor, which then shuts down in
order: stop polling and consuming, let running jobs finish (bounded), send a final
heartbeat, stop Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from blf.broker import EmbeddedRedis, broker_urls
from blf.errors import BlfError
from blf.node import Node

__all__ = ["Supervisor"]

log = logging.getLogger("blf.node")

# After a warm shutdown times out, Celery's cold shutdown gets this long before SIGKILL.
COLD_SHUTDOWN_GRACE_S = 10.0


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Supervisor:
    node: Node
    password: str
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _redis: EmbeddedRedis | None = None

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            return self._run()
        finally:
            self._stop_children()
            if self._redis is not None:
                self._redis.stop()

    def _run(self) -> int:
        broker = self._start_broker()
        if self.node.needs_attestation():
            log.info("Certificate missing or expiring within 6 h: re-attesting")
            self.node.attest()
        self._announce()
        self._heartbeat("Heartbeat sent to ICL")
        self._spawn("control", broker, beat=True)
        if self.node.settings.supported_model_ids:
            self._spawn("inference", broker, beat=False)
        code = self._watch()
        if code == 0:
            self._heartbeat("Final heartbeat sent to ICL")
            log.info("Node stopped")
        return code

    def _start_broker(self) -> str:
        configured = self.node.settings.broker_url
        if configured:
            return broker_urls(configured).celery
        self._redis = EmbeddedRedis(self.node.directory)
        return self._redis.start().celery

    def _announce(self) -> None:
        settings = self.node.settings
        log.info("Daemon starting ...")
        log.info("  Address : %s", self.node.address)
        log.info("  Tier    : %s", settings.tier)
        log.info("  Models  : %s", ", ".join(settings.supported_model_ids) or "(none)")
        log.info("  Cert    : expires in %ds", self.node.cert_seconds_left() or 0)

    def _heartbeat(self, success: str) -> None:
        try:
            self.node.icl().heartbeat()
        except BlfError as exc:
            log.warning("Heartbeat failed: %s", exc)
            return
        log.info(success)

    def _spawn(self, role: str, broker: str, *, beat: bool) -> None:
        env = dict(os.environ)
        env["BLF_CONFIG_PATH"] = str(self.node.config.path)
        env["BLF_BROKER_URL"] = broker  # a run-time override: never written to config.json
        env.pop("BLF_KEY_PASSWORD", None)  # the control worker reads it from a pipe instead
        command = [sys.executable, "-m", "blf", "worker", "--role", role]
        if beat:
            command.append("--beat")
        if role == "control":
            command.append("--password-stdin")
        process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, start_new_session=True)
        assert process.stdin is not None
        if role == "control":
            process.stdin.write(self.password.encode("utf-8") + b"\n")
        process.stdin.close()
        self.children.append(Child(role, process))

    def _watch(self) -> int:
        while not self._stop.wait(0.5):
            for child in self.children:
                if not child.alive():
                    log.error(
                        "%s worker exited with %s; stopping the node",
                        child.role,
                        child.process.returncode,
                    )
                    return 1
        log.info("Shutting down: no new assignments; waiting for running jobs")
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        """Warm shutdown (finish running tasks) within shutdown_timeout_s, then cold."""
        running = [c for c in self.children if c.alive()]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.node.settings.shutdown_timeout_s
        for child in running:
            try:
                child.process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s worker still busy after %ss: stopping it; unfinished jobs go back "
                    "to the queue",
                    child.role,
                    self.node.settings.shutdown_timeout_s,
                )
                self._cold_stop(child)
        self.children.clear()

    @staticmethod
    def _cold_stop(child: Child) -> None:
        child.process.send_signal(signal.SIGQUIT)
        try:
            child.process.wait(COLD_SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            if self._stop.is_set():
                log.warning("Shutdown already in progress")
            self._stop.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
