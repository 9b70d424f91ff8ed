"""A job task whose worker is killed is redelivered, not lost; one that keeps killing its
workers is failed after `max_job_deliveries` instead of looping for ever."""

from __future__ import annotations

import redis

from blf.broker import EmbeddedRedis
from blf.journal import Journal
from tests.nodes import (
    GatedQuorum,
    NodeDir,
    NodeProcess,
    Processes,
    send_tasks,
    submit_job,
    wait_until,
)


def start_control_worker(processes: Processes, node: NodeDir, broker: str) -> NodeProcess:
    worker = processes.start(
        node,
        "worker",
        "--role",
        "control",
        BLF_BROKER_URL=broker,
        BLF_JOB_TIMEOUT_S="2",  # visibility timeout 4 s: redelivery comes quickly
        BLF_MAX_JOB_DELIVERIES="2",
    )
    worker.wait_for(r"ready\.")
    return worker


def test_killed_worker_job_is_redelivered_then_failed_after_max_deliveries(
    gated_quorum: GatedQuorum, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    gate, node, broker = gated_quorum.gate, gated_quorum.node, shared_redis.urls.celery
    first = start_control_worker(processes, node, broker)
    job_id = submit_job(gated_quorum.devnet.url)["jobId"]
    send_tasks(node, broker, "blf.tasks.loops.poll_assignments")

    wait_until(lambda: gate.arrivals == 1, what="first delivery mid-claim")
    first.kill()
    second = start_control_worker(processes, node, broker)
    wait_until(lambda: gate.arrivals == 2, what="redelivery after the worker died")
    second.kill()
    third = start_control_worker(processes, node, broker)
    third.wait_for("aborted after 2 deliveries")

    client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    record = Journal(client, node.address).get(job_id)
    assert record["state"] == "failed", record
    assert gate.arrivals == 2
