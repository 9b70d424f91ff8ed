"""`run` under the faults a real machine brings: a SIGTERM at any point of its start, the
embedded Redis dying under it, and the metrics port already taken; and every line
it prints, Celery's shutdown notes included, in the node's log format."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from blf.app import transport_options
from blf.broker import SOCKET_NAME, EmbeddedRedis
from blf.config import load_config
from blf.devnet.icl import DevnetIcl
from blf.names import model_queue
from tests.nodes import (
    NodeDir,
    NodeProcess,
    Processes,
    devnet_node,
    make_node,
    node_pids,
    send_tasks,
    short_tempdir,
    wait_until,
)

# Metrics on a free port: several nodes (and other tests) run on this machine at once.
FAST = {"BLF_HEARTBEAT_INTERVAL_S": "1", "BLF_POLL_INTERVAL_S": "0.5", "BLF_METRICS_PORT": "0"}
# protocol.md, log format: [time] [LEVEL  ] [first 10 characters of the address] message
LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\] \[(DEBUG|INFO|WARNING|ERROR|CRITICAL) *\] "
    r"\[0x[0-9a-fA-F]{8}\] .*\S"
)
METRICS_LINE = r"Metrics on (http://127\.0\.0\.1:\d+/metrics)"
FIRST_HEARTBEAT = r"\] Heartbeat sent to ICL"
FINAL_HEARTBEAT = "Final heartbeat sent to ICL"


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    (mask,) = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
    return bool(int(mask, 16) >> (signum - 1) & 1)


def redis_pid(root: Path) -> int | None:
    """The embedded redis-server of the node in ``root`` (it names its socket in its
    command line, which it rewrites to ``redis-server unixsocket:PATH``)."""
    socket_path = str(root / SOCKET_NAME).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"redis-server" in command and socket_path in command:
            return int(entry.name)
    return None


def exit_status(run: NodeProcess) -> int:
    try:
        return run.wait()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`run` did not exit:\n{run.output()[-6000:]}") from None


def stopped_cleanly(node: NodeDir, run: NodeProcess) -> None:
    assert exit_status(run) == 0, run.output()
    assert not node_pids(node.root), "a child outlived `run`"
    assert not (node.root / SOCKET_NAME).exists(), "Redis outlived `run`"


# --- SIGTERM during the start ---------------------------------------------------------


def test_sigterm_at_any_point_of_the_start_exits_0(devnet: DevnetIcl, processes: Processes) -> None:
    """From the moment `run` has a SIGTERM handler (its first line) to the workers being
    up, a SIGTERM stops it with status 0; the final heartbeat follows only a first one."""
    node = make_node(devnet.url)
    heartbeats = lambda: len(devnet_node(devnet.url, node.address).get("heartbeats", []))  # noqa: E731

    # 1. As soon as the handler is in: the CLI is still loading, nothing has started.
    before = heartbeats()
    run = processes.start(node, "run", **FAST)
    wait_until(lambda: catches(run.process.pid, signal.SIGTERM), what="the SIGTERM handler")
    run.signal(signal.SIGTERM)
    stopped_cleanly(node, run)
    assert run.lines("Stopped by SIGTERM before the node started"), run.output()
    assert heartbeats() == before, "a node stopped before its start sent a heartbeat"

    # 2-4. With the broker up, once announced, after the first heartbeat, workers up.
    for point in ("Embedded Redis on", "Daemon starting", FIRST_HEARTBEAT, r"control\..* ready"):
        run = processes.start(node, "run", **FAST)
        run.wait_for(point)
        run.signal(signal.SIGTERM)
        stopped_cleanly(node, run)
        first, final = run.lines(FIRST_HEARTBEAT), run.lines(FINAL_HEARTBEAT)
        assert bool(final) == bool(first), (point, run.output())
        if not first:
            assert run.lines("Stopped before the node was up: no heartbeat sent"), run.output()


def test_run_and_the_supervisor_stop_on_the_same_signals() -> None:
    from blf.cli.service import STOP_SIGNALS as early
    from blf.supervisor import STOP_SIGNALS as supervised

    assert early == supervised == (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# --- the log format, Celery's shutdown lines included --------------------------------------


def test_every_line_of_a_run_and_its_shutdown_is_in_the_node_format(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST)
    run.wait_for(r"control\..* ready")
    run.wait_for(r"gpu\S* ready")
    run.wait_for("beat: Acquired lock")
    run.wait_for(METRICS_LINE)
    run.signal(signal.SIGTERM)
    stopped_cleanly(node, run)
    lines = run.output().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), "\n".join(
        line for line in lines if not LOG_LINE.match(line)
    )
    # Celery prints this from its signal handler, past logging: the inference worker's (the
    # control worker is a thread of `run`, which keeps its own handlers).
    assert len(run.lines(r"\[INFO   \] \[0x\w{8}\] worker: Warm shutdown \(MainProcess\)")) == 1
    assert run.lines(FINAL_HEARTBEAT)


# --- the embedded Redis dies ---------------------------------------------------------------


def _queue_key(node: NodeDir, model: str) -> str:
    settings = load_config(node.config_path).settings
    return transport_options(settings)["global_keyprefix"] + model_queue(node.address, model)


def _polls(devnet: DevnetIcl, node: NodeDir) -> int:
    return int(devnet_node(devnet.url, node.address).get("polls", 0))


def _kill_redis(node: NodeDir, previous: int | None = None) -> int:
    pid = wait_until(
        lambda: (p := redis_pid(node.root)) != previous and p, what="the embedded redis-server"
    )
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_embedded_redis_is_restarted_and_the_node_runs_on(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST)
    run.wait_for(r"control\..* ready")
    run.wait_for("beat: Acquired lock")
    wait_until(lambda: _polls(devnet, node) >= 1, what="a first poll")
    # A job message no worker of this node takes (it serves test-model only): it must
    # still be queued after the restart, from the append-only file.
    urls = f"unix://{node.root / SOCKET_NAME}"
    send_tasks(
        node,
        f"redis+socket://{node.root / SOCKET_NAME}",
        "blf.tasks.inference.run_inference",
        kwargs={"model_id": "unserved-model", "order": {}},
    )
    client = redis.Redis.from_url(urls)
    key = _queue_key(node, "unserved-model")
    try:
        assert client.llen(key) == 1
    finally:
        client.close()

    _kill_redis(node)
    run.wait_for(r"\[WARNING\] .* Embedded Redis exited with -9; restarted it .*restart 1 of 5")
    restarted_at = _polls(devnet, node)
    wait_until(lambda: _polls(devnet, node) >= restarted_at + 3, what="polls after the restart")
    client = redis.Redis.from_url(urls)
    try:
        assert client.llen(key) == 1, "the queued message did not survive the restart"
    finally:
        client.close()
    assert run.process.poll() is None
    run.signal(signal.SIGTERM)
    stopped_cleanly(node, run)


def test_redis_dying_past_the_bound_stops_the_node_with_one_line(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST, BLF_SHUTDOWN_TIMEOUT_S="5")
    run.wait_for(r"control\..* ready")
    pid = None
    for restart in range(1, 6):
        pid = _kill_redis(node, pid)
        run.wait_for(f"restart {restart} of 5 within 10 min")
    _kill_redis(node, pid)
    assert exit_status(run) == 1, run.output()
    # One line says why (the workers' own "Cannot connect" lines are theirs).
    (reason,) = run.lines("stopping the node")
    assert reason == run.lines(r"\[ERROR  \] .* Embedded Redis")[0]
    assert "Embedded Redis exited with -9, its 6th death within 10 min; stopping the node" in (
        reason
    )
    assert len(run.lines(r"\[WARNING\] .* Embedded Redis exited")) == 5
    wait_until(lambda: not node_pids(node.root), what="the children to stop")


def test_an_operator_redis_that_blips_leaves_the_node_running(
    devnet: DevnetIcl, processes: Processes
) -> None:
    """With broker_url set, `run` does not own Redis and cannot restart it: when it comes
    back, the workers reconnect and beat starts again by itself."""
    node = make_node(devnet.url)
    server = EmbeddedRedis(short_tempdir())
    server.start()
    try:
        run = processes.start(node, "run", **FAST, BLF_BROKER_URL=server.urls.celery)
        run.wait_for("beat: Acquired lock")
        wait_until(lambda: _polls(devnet, node) >= 1, what="a first poll")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        run.wait_for(r"\[WARNING\] .* beat: lost Redis")
        server.start()  # the operator's Redis is back, on the same socket, from its AOF
        back_at = _polls(devnet, node)
        wait_until(lambda: _polls(devnet, node) >= back_at + 3, what="polls after Redis is back")
        assert run.process.poll() is None, run.output()
        run.signal(signal.SIGTERM)
        assert exit_status(run) == 0, run.output()
        assert not run.lines("stopping the node")
    finally:
        server.stop()


# --- the metrics endpoint ----------------------------------------------------------------------


def _samples(url: str) -> dict[str, float]:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if not sample.labels
    }


def test_run_serves_metrics(devnet: DevnetIcl, processes: Processes) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST)
    (line,) = run.wait_for(METRICS_LINE)
    assert LOG_LINE.match(line), line
    match = re.search(METRICS_LINE, line)
    assert match is not None
    url = match.group(1)
    samples = _samples(url)
    assert samples["blf_up"] == 1 and samples["blf_redis_up"] == 1
    assert samples["blf_certificate_seconds_left"] > 0
    run.signal(signal.SIGTERM)
    stopped_cleanly(node, run)
    with pytest.raises(requests.ConnectionError):  # stopped with the node
        requests.get(url, timeout=5)


def test_a_metrics_port_in_use_is_one_warning_and_the_node_runs_on(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = processes.start(node, "run", **{**FAST, "BLF_METRICS_PORT": str(port)})
        (warning,) = run.wait_for(r"Metrics not served")
        assert LOG_LINE.match(warning) and "[WARNING]" in warning
        assert f"Metrics not served: cannot serve metrics on 127.0.0.1:{port}" in warning
        polls = _polls(devnet, node)
        wait_until(lambda: _polls(devnet, node) > polls + 2, what="polls after the warning")
        assert run.process.poll() is None
        run.signal(signal.SIGTERM)
        stopped_cleanly(node, run)
    assert len(run.lines("Metrics not served")) == 1
    assert not run.lines(r"^Error: "), run.output()
