"""The Celery control plane with real parts: redis-server, Celery workers and beat as
subprocesses, the devnet ICL over HTTP. Intervals are shortened through BLF_* overrides."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest
import redis
import requests

from blf.broker import EmbeddedRedis
from blf.devnet.icl import DevnetIcl
from tests.nodes import (
    GatedQuorum,
    NodeDir,
    Processes,
    devnet_job,
    devnet_node,
    make_node,
    send_tasks,
    submit_job,
    wait_until,
)

POLL = "blf.tasks.loops.poll_assignments"
FAST = {
    "BLF_HEARTBEAT_INTERVAL_S": "1",
    "BLF_POLL_INTERVAL_S": "0.5",
    "BLF_WATCHDOG_INTERVAL_S": "1",
    "BLF_CHAIN_HEARTBEAT_CHECK_S": "1",
}


@pytest.fixture
def open_devnet() -> Iterator[DevnetIcl]:
    """Every role sees its assignment at once, and claimed jobs stay listed (as some
    coordinator versions do), so the node's de-duplication is what keeps claims single."""
    with DevnetIcl(verifiers_wait_for_leader=False, relist_claimed=True) as icl:
        yield icl


@pytest.fixture
def quorum(open_devnet: DevnetIcl) -> list[NodeDir]:
    """Three attested nodes: enough for the devnet to form a job's quorum."""
    return [make_node(open_devnet.url) for _ in range(3)]


def test_run_without_attestation_prints_the_exact_error(devnet: DevnetIcl) -> None:
    node = make_node(devnet.url, attest=False)
    result = node.invoke("run")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: No attestation found. Run `blindference-node attest` first."
    )


def test_two_embedded_nodes_each_fire_the_four_loops(
    devnet: DevnetIcl, processes: Processes
) -> None:
    """Two `run`s with different config paths side by side, each with its own Redis."""
    nodes = [make_node(devnet.url), make_node(devnet.url)]
    # A re-attest window longer than the certificate makes every watchdog tick re-attest.
    runs = [processes.start(node, "run", BLF_REATTEST_WITHIN_S="999999", **FAST) for node in nodes]
    for node, run in zip(nodes, runs, strict=True):
        run.wait_for(r"\[INFO   \] \[0x[0-9a-fA-F]{8}\] Daemon starting \.\.\.")
        record = lambda n=node: devnet_node(devnet.url, n.address)  # noqa: E731
        wait_until(lambda r=record: len(r()["heartbeats"]) >= 4, what="heartbeats")
        wait_until(lambda r=record: r()["polls"] >= 6, what="polls")
        wait_until(lambda r=record: r()["attestations"] >= 3, what="watchdog re-attests")
        run.wait_for("On-chain heartbeat disabled: no rpc_url configured")
        run.wait_for("No assignments for last 60s")
        for line in ("  Address : " + node.address, "  Tier    : 0", "  Models  : test-model"):
            assert run.lines(re.escape(line)), run.output()
        assert (node.root / "redis.sock").exists()
    runs[0].signal(signal.SIGTERM)
    runs[1].signal(signal.SIGINT)
    assert [run.wait() for run in runs] == [0, 0]
    assert not any((node.root / "redis.sock").exists() for node in nodes)


def test_job_is_claimed_and_enqueued_once_with_racing_pollers(
    open_devnet: DevnetIcl, quorum: list[NodeDir], processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    node = quorum[0]
    broker = shared_redis.urls.celery
    workers = [
        processes.start(node, "worker", "--role", "control", BLF_BROKER_URL=broker)
        for _ in range(2)
    ]
    for worker in workers:
        worker.wait_for(r"ready\.")
    job = submit_job(open_devnet.url)
    # Many poll ticks at once, over two workers with four threads each: a race if any.
    send_tasks(node, broker, POLL, count=16)
    wait_until(lambda: devnet_job(open_devnet.url, job["jobId"])["claims"][node.address] >= 1)
    log_of = lambda: "".join(w.output() for w in workers)  # noqa: E731
    wait_until(lambda: "claimed" in log_of(), what="claim log")
    # Further polls still see the job listed; none may claim or enqueue it again.
    polls_before = devnet_job(open_devnet.url, job["jobId"])["polls"][node.address]
    send_tasks(node, broker, POLL, count=8)
    wait_until(
        lambda: (
            devnet_job(open_devnet.url, job["jobId"])["polls"][node.address] >= polls_before + 8
        ),
        what="more polls",
    )
    assert devnet_job(open_devnet.url, job["jobId"])["claims"][node.address] == 1
    text = log_of()
    assert text.count(f"job {job['jobId'][:8]}") == 1, text
    assert text.count("claimed") == 1, text


def test_second_beat_stays_idle_and_takes_over_after_kill(
    devnet: DevnetIcl, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    node = make_node(devnet.url)
    env = {"BLF_BROKER_URL": shared_redis.urls.celery, "BLF_LOG_LEVEL": "DEBUG", **FAST}
    processes.start(node, "worker", "--role", "control", **env).wait_for(r"ready\.")
    first = processes.start(node, "beat", **env)
    first.wait_for("beat: Acquired lock")
    first.wait_for("Sending due task icl-heartbeat")
    second = processes.start(node, "beat", **env)
    second.wait_for("beat: Acquiring lock")
    # While the first lives, the second sends nothing, however many ticks pass.
    first.wait_for("Sending due task icl-heartbeat", count=len(first.lines("icl-heartbeat")) + 3)
    assert not second.lines("Sending due task")
    first.signal(signal.SIGKILL)
    second.wait_for("beat: Acquired lock", timeout=60)
    second.wait_for("Sending due task icl-heartbeat")


def test_sigterm_waits_for_the_running_job_then_sends_a_final_heartbeat(
    gated_quorum: GatedQuorum, processes: Processes
) -> None:
    devnet, gate, node = gated_quorum.devnet, gated_quorum.gate, gated_quorum.node
    run, job = gated_quorum.run_until_mid_claim(processes, **FAST)
    run.signal(signal.SIGTERM)
    run.wait_for("Shutting down")
    released_at = time.time()
    gate.release.set()
    assert run.wait(60) == 0, run.output()
    assert devnet_job(devnet.url, job["jobId"])["claims"][node.address] == 1
    heartbeats = devnet_node(devnet.url, node.address)["heartbeats"]
    out = run.output()
    assert out.index("claimed") < out.index("Final heartbeat sent to ICL"), out
    assert any(beat >= released_at for beat in heartbeats), "no heartbeat after the job"
    assert "Embedded Redis stopped" in out


def test_forgotten_node_reattests_and_expired_cert_renews_at_start(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    node.set_config(attestation_expiry=int(time.time()) - 60)
    run = processes.start(node, "run", **FAST)
    run.wait_for("re-attesting")
    run.wait_for("Attested: tier 0")
    assert node.config()["attestation_expiry"] > time.time()
    wait_until(lambda: devnet_node(devnet.url, node.address)["polls"] >= 1, what="first poll")
    # The ICL restarts and forgets every node: the next poll gets 404 and must re-attest.
    requests.post(f"{devnet.url}/admin/reset", timeout=5).raise_for_status()
    run.wait_for("ICL does not know node")
    wait_until(lambda: devnet_node(devnet.url, node.address).get("polls", 0) >= 2, what="re-polls")
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


def test_heartbeat_failure_is_a_warning_not_a_crash(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST)
    run.wait_for("Daemon starting")
    devnet.stop()
    run.wait_for(r"\[WARNING\] .* Heartbeat failed: ICL unreachable")
    assert run.process.poll() is None
    run.signal(signal.SIGTERM)
    assert run.wait() == 0


def test_two_nodes_share_one_redis_without_crossing(
    devnet: DevnetIcl, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    a, b = make_node(devnet.url), make_node(devnet.url)
    env = {"BLF_BROKER_URL": shared_redis.urls.celery, **FAST}
    runs = [processes.start(node, "run", **env) for node in (a, b)]
    for node in (a, b):
        wait_until(lambda n=node: len(devnet_node(devnet.url, n.address)["heartbeats"]) >= 3)
        wait_until(lambda n=node: devnet_node(devnet.url, n.address)["polls"] >= 3)
    client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    keys = set(client.keys("*"))
    for node in (a, b):
        assert any(k.startswith(f"blf:{node.address.lower()}:") for k in keys), keys
    # Each worker only ever signs as its own node: a crossed queue would show the other.
    for run, other in ((runs[0], b), (runs[1], a)):
        assert other.address[:10] not in run.output()
    for run in runs:
        run.signal(signal.SIGTERM)
        assert run.wait() == 0


def test_flower_without_a_broker_says_what_to_start(devnet: DevnetIcl) -> None:
    node = make_node(devnet.url, attest=False)
    result = node.invoke("flower")
    assert result.exit_code == 2
    assert "start `blindference-node run` first, or set BLF_BROKER_URL" in result.output


def test_beat_runs_every_duty_once_when_it_starts(
    devnet: DevnetIcl, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    """Interval entries first fire one period after beat starts: a beat restarted more
    often than that must still run each duty, so each runs once at start."""
    node = make_node(devnet.url)
    hourly = {
        name: "3600"
        for name in (
            "BLF_HEARTBEAT_INTERVAL_S",
            "BLF_POLL_INTERVAL_S",
            "BLF_WATCHDOG_INTERVAL_S",
            "BLF_CHAIN_HEARTBEAT_CHECK_S",
        )
    }
    env = {"BLF_BROKER_URL": shared_redis.urls.celery, **hourly}
    worker = processes.start(node, "worker", "--role", "control", **env)
    worker.wait_for(r"ready\.")
    processes.start(node, "beat", **env)
    wait_until(lambda: devnet_node(devnet.url, node.address)["polls"] >= 1, what="a poll")
    wait_until(lambda: devnet_node(devnet.url, node.address)["heartbeats"], what="a heartbeat")
    worker.wait_for("On-chain heartbeat disabled")
