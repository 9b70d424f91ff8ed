"""Test helpers: node directories made with the real CLI, node processes, and waiting.

Processes under test write their output to a file that the test reads while they run;
every wait polls a condition with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from celery import Celery
from click.testing import CliRunner, Result
from starlette.requests import Request

from blf.app import configure
from blf.authority import MAC_HEADER, message_mac
from blf.cli import cli
from blf.config import load_config
from blf.devnet.icl import DevnetIcl
from blf.keyfiles import control_key

PASSWORD = "correct horse battery staple"
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def short_tempdir() -> Path:
    # Unix socket paths are limited to ~104 bytes; pytest's tmp_path can exceed that.
    return Path(tempfile.mkdtemp(prefix="blf-", dir="/tmp"))


@dataclass
class NodeDir:
    """A node's directory and the environment that selects it."""

    root: Path
    address: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def env(self) -> dict[str, str]:
        return {
            "BLF_CONFIG_PATH": str(self.config_path),
            "BLF_KEY_PASSWORD": PASSWORD,
            # Control-plane tests run no GPU worker; the pipeline's tests turn this on.
            "BLF_CLAIM_REQUIRES_WORKER": "0",
            **self.extra_env,
        }

    def config(self) -> dict[str, Any]:
        return dict(json.loads(self.config_path.read_text()))

    def set_config(self, **fields: Any) -> None:
        data = self.config()
        data.update(fields)
        self.config_path.write_text(json.dumps(data, indent=2))

    def invoke(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """Run a CLI command in-process with this node selected."""
        merged = {"BLF_CONFIG_DIR": None, **self.env, **(env or {})}
        return CliRunner().invoke(cli, list(args), env=merged, catch_exceptions=False)

    def process_env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
        env.update(self.env)
        env.update(overrides)
        env["PYTHONUNBUFFERED"] = "1"
        return env


def make_node(
    icl_url: str,
    *,
    models: str = "test-model",
    root: Path | None = None,
    attest: bool = True,
    private_key: str | None = None,
    **config: Any,
) -> NodeDir:
    """A node made by the real `init` (importing ``private_key`` if given), then attested."""
    node = NodeDir(root or short_tempdir())
    imported = {"BLF_PRIVATE_KEY": private_key} if private_key else {}
    result = node.invoke("init", "--models", models, "--icl", icl_url, env=imported)
    assert result.exit_code == 0, result.output
    node.address = node.config()["node_address"]
    if config:
        node.set_config(**config)
    if attest:
        result = node.invoke("attest", "--mock")
        assert result.exit_code == 0, result.output
    return node


class ClaimGate:
    """Holds every claim request to a devnet ICL until released, counting arrivals, so a
    test can act (signal, kill) while a job task is provably mid-claim."""

    def __init__(self, devnet: DevnetIcl, *, hold_s: float = 60.0) -> None:
        self.arrivals = 0
        self.release = threading.Event()

        @devnet.app.middleware("http")
        async def hold(request: Request, call_next: Callable[[Request], Any]) -> Any:
            if request.url.path == "/internal/task/claim":
                self.arrivals += 1
                await asyncio.to_thread(self.release.wait, hold_s)
            return await call_next(request)


@dataclass
class GatedQuorum:
    """A devnet ICL that holds every claim until ``gate.release`` is set, three attested
    nodes (enough for a job), and ``node``, the one a test runs."""

    devnet: DevnetIcl
    gate: ClaimGate
    node: NodeDir

    def run_until_mid_claim(
        self, processes: Processes, **env: str
    ) -> tuple[NodeProcess, dict[str, Any]]:
        """Start `run`, give it a job, and return once its claim is held at the gate."""
        run = processes.start(self.node, "run", **env)
        run.wait_for("Daemon starting")
        job = submit_job(self.devnet.url)
        wait_until(lambda: self.gate.arrivals == 1, what="the claim to arrive")
        return run, job


class NodeProcess:
    """A ``blindference-node`` subprocess whose combined output goes to a log file."""

    def __init__(self, node: NodeDir, *args: str, **env: str) -> None:
        self.node = node
        self.log_path = node.root / f"{args[0]}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "blf", *args],
            env=node.process_env(**env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.output().splitlines() if re.search(pattern, line)]

    def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 60.0) -> list[str]:
        def seen() -> list[str]:
            if self.process.poll() is not None and len(self.lines(pattern)) < count:
                raise AssertionError(
                    f"process exited ({self.process.returncode}) before {pattern!r}:\n"
                    + self.output()[-4000:]
                )
            found = self.lines(pattern)
            return found if len(found) >= count else []

        return wait_until(seen, timeout=timeout, what=f"{count} x {pattern!r}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Kill the whole session (the node and anything it started)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


@dataclass
class Processes:
    """Starts node processes and kills whatever is left at the end of a test."""

    started: list[NodeProcess] = field(default_factory=list)

    def start(self, node: NodeDir, *args: str, **env: str) -> NodeProcess:
        proc = NodeProcess(node, *args, **env)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.close()
        # The workers `run` spawns have their own sessions; kill any left behind.
        for proc in self.started:
            _kill_descendants_of(proc.node.root)


def node_pids(root: Path) -> list[int]:
    """Live processes whose environment selects this node directory (`run`, its workers
    and beat; not redis-server, whose environment is scrubbed, and which dies with `run`)."""
    marker = f"BLF_CONFIG_PATH={root / 'config.json'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _kill_descendants_of(root: Path) -> None:
    for pid in node_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- one-line CLI results -----------------------------------------------------------------


def error_line(result: Result) -> str:
    """The command failed with exactly one ``Error: ...`` line and no traceback."""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert errors == lines[-1:], result.output
    return errors[0]


def status_rows(result: Result) -> dict[str, str]:
    """``status`` output as {name: value}."""
    rows = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(" ")
        rows[name] = value.strip()
    return rows


def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- the devnet ICL's admin API -------------------------------------------------------------

PROMPT_CID = "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"


def devnet_nodes(url: str) -> dict[str, dict[str, Any]]:
    nodes = requests.get(url + "/admin/nodes", timeout=10).json()["nodes"]
    return {n["address"]: n for n in nodes}


def devnet_node(url: str, address: str) -> dict[str, Any]:
    """The devnet's record of a node; empty while the devnet does not know it."""
    return devnet_nodes(url).get(address, {})


def devnet_job(url: str, job_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{url}/admin/jobs/{job_id}", timeout=10).json())


def submit_job(url: str, model: str = "test-model", **fields: Any) -> dict[str, Any]:
    body = {
        "modelId": model,
        "promptCid": PROMPT_CID,
        "kpHighHandle": 11,
        "kpLowHandle": 22,
        "userAddress": "0x000000000000000000000000000000000000dEaD",
        **fields,
    }
    answer = requests.post(url + "/admin/jobs", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def send_tasks(
    node: NodeDir,
    broker: str,
    name: str,
    count: int = 1,
    *,
    kwargs: dict[str, Any] | None = None,
    signed: bool = True,
    link: str | None = None,
) -> None:
    """Send tasks as the node's beat would (signed with its control key), through a Celery
    app of the test's own (the module-level app would keep a pool to whatever broker an
    earlier test used). ``signed=False`` sends what a GPU host could; ``link`` attaches a
    callback task (with the same kwargs), as a GPU host might try."""
    settings = load_config(node.config_path).settings.model_copy(update={"broker_url": broker})
    sender = configure(settings, target=Celery("blf-test", set_as_current=False))
    key = control_key(node.root / settings.control_key_file)
    try:
        for _ in range(count):
            task_id = uuid.uuid4().hex
            headers = {MAC_HEADER: message_mac(key, name, task_id, (), kwargs)} if signed else {}
            options: dict[str, Any] = {"headers": headers}
            if link:
                options["link"] = sender.signature(link, kwargs=kwargs, immutable=True)
            sender.send_task(name, kwargs=kwargs, task_id=task_id, **options)
    finally:
        sender.close()
