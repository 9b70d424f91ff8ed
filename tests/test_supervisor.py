"""`run` as a supervisor: one per node directory, nothing outlives it, and a job left
unacknowledged by a dead run is picked up by the next one at once."""

from __future__ import annotations

import os
import signal

from blf.devnet.icl import DevnetIcl
from tests.nodes import (
    GatedQuorum,
    Processes,
    devnet_job,
    make_node,
    node_pids,
    short_tempdir,
    wait_until,
)

FAST = {"BLF_HEARTBEAT_INTERVAL_S": "1", "BLF_POLL_INTERVAL_S": "0.5"}


def test_a_second_run_on_the_same_directory_is_refused(
    devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(devnet.url, root=short_tempdir() / "node")  # init makes the directory
    assert node.root.stat().st_mode & 0o777 == 0o700  # the keystore's: nobody else's
    first = processes.start(node, "run")
    first.wait_for("Daemon starting")
    # The embedded Redis's files hold the queues and the journal: the operator's alone.
    for name in ("redis.aof", "redis.log"):
        wait_until(lambda n=name: (node.root / n).exists(), what=name)
        assert (node.root / name).stat().st_mode & 0o777 == 0o600, name
    second = processes.start(node, "run")
    assert second.wait() == 1
    assert f"Error: another `blindference-node run` is using {node.root}" in second.output()
    assert first.process.poll() is None
    first.signal(signal.SIGTERM)
    assert first.wait() == 0


def test_nothing_outlives_a_killed_supervisor(devnet: DevnetIcl, processes: Processes) -> None:
    node = make_node(devnet.url)
    run = processes.start(node, "run", **FAST)
    run.wait_for(r"control\..* ready")
    run.wait_for("beat: Acquired lock")
    assert len(node_pids(node.root)) >= 2  # run (control worker, beat), inference
    os.kill(run.process.pid, signal.SIGKILL)
    wait_until(lambda: not node_pids(node.root), what="children to follow the supervisor")
    wait_until(lambda: not (node.root / "redis.sock").exists(), what="Redis to stop")


def test_a_job_left_mid_claim_by_a_dead_run_is_requeued_by_the_next(
    gated_quorum: GatedQuorum, processes: Processes
) -> None:
    devnet, gate, node = gated_quorum.devnet, gated_quorum.gate, gated_quorum.node
    _run, job = gated_quorum.run_until_mid_claim(processes, **FAST)
    for pid in node_pids(node.root):  # power cut: every node process at once
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not (node.root / "redis.sock").exists(), what="Redis to stop")
    gate.release.set()
    again = processes.start(node, "run", **FAST)
    again.wait_for("Requeued 1 job message")
    again.wait_for("claimed")
    assert devnet_job(devnet.url, job["jobId"])["claims"][node.address] == 1
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


def test_a_job_still_running_past_the_shutdown_budget_is_left_to_the_next_run(
    gated_quorum: GatedQuorum, processes: Processes
) -> None:
    """The control worker is a thread of `run`, and a thread cannot be killed: when its
    claim is still held after shutdown_timeout_s, `run` stops without it (exit 0, Redis
    stopped, nothing left running) and the job's message goes to the next run."""
    devnet, gate, node = gated_quorum.devnet, gated_quorum.gate, gated_quorum.node
    run, job = gated_quorum.run_until_mid_claim(processes, **FAST, BLF_SHUTDOWN_TIMEOUT_S="1")
    run.signal(signal.SIGTERM)
    assert run.wait() == 0, run.output()
    (busy,) = run.lines("still busy")
    assert "control still busy after 1.0s: stopping it; unfinished jobs go back to the queue" in (
        busy
    )
    assert run.lines("Final heartbeat sent to ICL")
    wait_until(lambda: not node_pids(node.root), what="every process of the node to stop")
    assert not (node.root / "redis.sock").exists()
    gate.release.set()
    again = processes.start(node, "run", **FAST)
    again.wait_for("Requeued 1 job message")
    again.wait_for("claimed")
    assert devnet_job(devnet.url, job["jobId"])["claims"][node.address] >= 1
    again.signal(signal.SIGTERM)
    assert again.wait() == 0


def test_a_second_signal_stops_at_once_without_waiting_for_the_job(
    gated_quorum: GatedQuorum, processes: Processes
) -> None:
    node = gated_quorum.node
    run, _job = gated_quorum.run_until_mid_claim(processes, **FAST)  # shutdown budget 300 s
    run.signal(signal.SIGTERM)
    run.wait_for("Shutting down: no new assignments")
    run.signal(signal.SIGTERM)
    assert run.wait() == 0, run.output()
    assert run.lines(r"\[WARNING\] .* Second SIGTERM: stopping at once")
    assert not run.lines("still busy")  # asked to hurry: not a budget that ran out
    wait_until(lambda: not node_pids(node.root), what="every process of the node to stop")
