"""`blindference-node flower` for real: loopback by default, a login required anywhere
else, and, behind the login, the node's worker and its tasks, shown by job and role."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from blf.broker import EmbeddedRedis
from blf.devnet.icl import DevnetIcl
from tests.nodes import (
    PROMPT_CID,
    Processes,
    error_line,
    make_node,
    submit_job,
    wait_until,
)

LOGIN = ("admin", "flower-test-password")
FAST = {"BLF_HEARTBEAT_INTERVAL_S": "1", "BLF_POLL_INTERVAL_S": "0.5"}
START_S = 90.0  # Flower, a worker and its beat starting at once on two cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, auth: tuple[str, str] | None = None) -> requests.Response | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", auth=auth, timeout=5)
    except requests.RequestException:
        return None


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_flower_beyond_loopback_without_a_login_is_refused(
    devnet: DevnetIcl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused in-process: a command that passed its checks would exec Flower here."""
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    node = make_node(devnet.url)
    broker = {"BLF_BROKER_URL": "redis://127.0.0.1:1/0"}  # never reached: refused before
    result = node.invoke("flower", "--address", "0.0.0.0", env=broker)
    assert result.exit_code == 1
    line = error_line(result)
    assert "open to the network without a login" in line and "FLOWER_BASIC_AUTH" in line
    for bad in ("admin", "admin:", ":secret-password"):
        result = node.invoke("flower", "--address", "0.0.0.0", "--basic-auth", bad, env=broker)
        assert result.exit_code == 1
        line = error_line(result)
        assert "must be user:password" in line
        assert "secret-password" not in line  # a login is never echoed


def test_flower_listens_on_loopback_by_default(
    devnet: DevnetIcl, shared_redis: EmbeddedRedis, processes: Processes
) -> None:
    node = make_node(devnet.url)
    port = free_port()
    flower = processes.start(
        node, "flower", "--port", str(port), BLF_BROKER_URL=shared_redis.urls.celery
    )
    wait_until(lambda: get(port, "/workers") is not None, timeout=START_S, what="Flower")
    assert flower.process.poll() is None
    assert listening_addresses(port) == {"127.0.0.1"}
    answer = get(port, "/workers")
    assert answer is not None and answer.status_code == 200


def _tasks(port: int) -> dict[str, dict[str, Any]]:
    answer = get(port, "/api/tasks", auth=LOGIN)
    return dict(answer.json()) if answer is not None and answer.status_code == 200 else {}


def _finished_start_job(port: int) -> dict[str, Any]:
    """The first start_job Flower shows as finished; empty while there is none."""
    for task in _tasks(port).values():
        if task.get("name") == "blf.tasks.jobs.start_job" and task.get("state") == "SUCCESS":
            return task
    return {}


@pytest.fixture
def open_devnet() -> Iterator[DevnetIcl]:
    """Every role sees its assignment at once: the node under test need not lead."""
    with DevnetIcl(verifiers_wait_for_leader=False) as icl:
        yield icl


def test_flower_beyond_loopback_shows_the_worker_and_its_tasks_behind_a_login(
    open_devnet: DevnetIcl, shared_redis: EmbeddedRedis, processes: Processes
) -> None:
    devnet = open_devnet
    node, *_verifiers = (make_node(devnet.url) for _ in range(3))  # a job needs a quorum
    broker = shared_redis.urls.celery
    port = free_port()
    processes.start(
        node,
        "flower",
        "--address",
        "0.0.0.0",
        "--port",
        str(port),
        BLF_BROKER_URL=broker,
        FLOWER_BASIC_AUTH=":".join(LOGIN),
    )
    wait_until(lambda: get(port, "/api/workers") is not None, timeout=START_S, what="Flower")
    for path in ("/api/workers", "/api/tasks", "/workers"):
        answer = get(port, path)
        assert answer is not None and answer.status_code == 401, path
        wrong = get(port, path, auth=("admin", "wrong"))
        assert wrong is not None and wrong.status_code == 401, path

    worker = processes.start(
        node, "worker", "--role", "control", "--beat", BLF_BROKER_URL=broker, **FAST
    )
    worker.wait_for(r"control\..* ready", timeout=START_S)
    hostname = f"control.{node.address[:10]}@"

    def listed() -> bool:
        answer = get(port, "/api/workers?refresh=1", auth=LOGIN)
        return answer is not None and any(name.startswith(hostname) for name in answer.json())

    wait_until(listed, timeout=START_S, what="the worker in /api/workers")

    job = submit_job(devnet.url)
    task = wait_until(lambda: _finished_start_job(port), timeout=START_S, what="start_job")
    short = job["jobId"][:8] + "..."
    assert task["kwargs"] in (
        f"{{job: {short}, role: leader}}",
        f"{{job: {short}, role: verifier}}",
    )
    assert task["worker"].startswith(hostname)
    # Whatever Flower shows of any task: no prompt CID, sealed key or continuation token.
    shown = json.dumps(_tasks(port))
    assert PROMPT_CID not in shown
    assert "sealed" not in shown and "continuation" not in shown
