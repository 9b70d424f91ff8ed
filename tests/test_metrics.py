"""The metrics endpoint, scraped over HTTP, against a real Redis filled by the project's own
writers (the journal, capacity, Celery publishing), and the `metrics` command as a process."""

from __future__ import annotations

import re
import signal
import socket
import time
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from blf.broker import EmbeddedRedis
from blf.capacity import CapacityPublisher
from blf.config import Settings, load_config, update_config_file
from blf.devnet.icl import DevnetIcl
from blf.journal import FINAL_STATES, STAGES, Journal
from blf.metrics import MetricsServer, build_registry, is_loopback, note_heartbeat, serve
from tests.nodes import (
    NodeDir,
    Processes,
    error_line,
    make_node,
    send_tasks,
    short_tempdir,
    wait_until,
)

MODEL, IDLE = "demo-model", "idle-model"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def node(devnet: DevnetIcl) -> NodeDir:
    return make_node(devnet.url, models=f"{MODEL},{IDLE}")


def endpoint(
    node: NodeDir, broker: str, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> MetricsServer:
    monkeypatch.setenv("BLF_BROKER_URL", broker)
    loaded = load_config(node.config_path)
    registry = build_registry(loaded, **options)
    return serve(loaded.settings, registry=registry, port=0)


def test_a_scrape_reports_jobs_stages_queues_workers_heartbeats_and_the_certificate(
    node: NodeDir,
    client: redis.Redis,
    shared_redis: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = Journal(client, node.address)
    journal.record("a" * 64, "received", role="leader", model_id=MODEL, queue_s="0.020")
    journal.record("a" * 64, "submitted", key_s="0.3", inference_s="2.0", total_s="4.0")
    journal.record("b" * 64, "received", role="verifier", model_id=MODEL, queue_s="0.040")
    journal.record("b" * 64, "failed", reason="tampered")
    journal.record("c" * 64, "received", role="verifier", model_id=MODEL)
    CapacityPublisher(client, node.address, [MODEL], "gpu1@host", lambda: 2).publish()
    CapacityPublisher(client, node.address, [MODEL], "gpu2@host", lambda: 1).publish()
    broker = shared_redis.urls.celery
    # Published as the node publishes them, so the queues have kombu's own layout.
    send_tasks(node, broker, "blf.tasks.inference.run_inference", 3, kwargs={"model_id": MODEL})
    send_tasks(node, broker, "blf.tasks.loops.sweep_jobs")
    now = time.time()
    note_heartbeat(client, node.address, "icl", at=now - 30)
    note_heartbeat(client, node.address, "chain", at=now - 3600)

    with endpoint(node, broker, monkeypatch) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", server.url)
        samples = scrape(server.url)
        expiry = node.config()["attestation_expiry"]
        # Re-attesting rewrites config.json: the next scrape reads the new expiry.
        update_config_file(node.config_path, {"attestation_expiry": int(time.time()) + 100})
        after = scrape(server.url)

    assert value(samples, "blf_up") == 1 and value(samples, "blf_redis_up") == 1
    assert value(samples, "blf_scrape_errors_total", source="redis") == 0
    assert value(samples, "blf_journal_records") == 3
    assert value(samples, "blf_journal_jobs", role="leader", outcome="submitted") == 1
    assert value(samples, "blf_journal_jobs", role="verifier", outcome="failed") == 1
    for outcome in FINAL_STATES - {"submitted"}:  # every outcome is there, zeros included
        assert value(samples, "blf_journal_jobs", role="leader", outcome=outcome) == 0
    assert value(samples, "blf_jobs_in_progress", role="verifier") == 1
    assert value(samples, "blf_jobs_in_progress", role="leader") == 0
    # The journal counts each final state once, monotonically, beside the window.
    assert value(samples, "blf_jobs_total", role="leader", outcome="submitted") == 1
    assert value(samples, "blf_jobs_total", role="verifier", outcome="failed") == 1

    def bucket(stage: str, le: str) -> float:
        return value(samples, "blf_stage_seconds_bucket", stage=stage, le=le)

    assert bucket("inference", "1.0") == 0 and bucket("inference", "2.5") == 1
    assert bucket("queue", "0.025") == 1 and bucket("queue", "0.05") == 2
    assert bucket("queue", "+Inf") == 2 and bucket("upload", "+Inf") == 0
    assert value(samples, "blf_stage_seconds_gsum", stage="total") == 4.0
    assert value(samples, "blf_stage_seconds_gcount", stage="queue") == 2
    assert {s.removesuffix("_s") for s in STAGES} == {
        dict(labels)["stage"] for name, labels in samples if name == "blf_stage_seconds_gsum"
    }

    assert value(samples, "blf_queue_messages", model=MODEL) == 3
    assert value(samples, "blf_queue_messages", model=IDLE) == 0
    assert value(samples, "blf_control_queue_messages") == 1
    assert value(samples, "blf_workers", model=MODEL) == 2
    assert value(samples, "blf_free_slots", model=MODEL) == 3
    assert value(samples, "blf_workers", model=IDLE) == 0

    assert 30 <= value(samples, "blf_icl_heartbeat_age_seconds") < 90
    assert 3600 <= value(samples, "blf_chain_heartbeat_age_seconds") < 3660
    left = value(samples, "blf_certificate_seconds_left")
    assert expiry - time.time() - 60 < left <= expiry - now + 1
    assert 0 < value(after, "blf_certificate_seconds_left") <= 100


def test_every_family_has_help_text(
    node: NodeDir, shared_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with endpoint(node, shared_redis.urls.celery, monkeypatch) as server:
        text = requests.get(server.url, timeout=10).text
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("blf_") for f in families)
    assert all(f.documentation.strip() for f in families)


def test_the_journal_families_describe_a_bounded_window_and_the_counter_what_is_counted(
    node: NodeDir,
    client: redis.Redis,
    shared_redis: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = Journal(client, node.address)
    for job_id in ("a", "b", "c"):
        journal.record(job_id * 64, "submitted", role="leader", total_s="1.0")
    journal.record("a" * 64, "submitted", role="leader")  # a repeat is not counted again
    journal.record("d" * 64, "claimed", role="verifier")
    journal.record("d" * 64, "failed", reason="tampered blob")  # the role is the record's

    with endpoint(node, shared_redis.urls.celery, monkeypatch, journal_window=2) as server:
        samples = scrape(server.url)

    assert value(samples, "blf_journal_records") == 2
    assert value(samples, "blf_journal_jobs", role="verifier", outcome="failed") == 1
    assert value(samples, "blf_journal_jobs", role="leader", outcome="submitted") == 1
    assert value(samples, "blf_jobs_total", role="leader", outcome="submitted") == 3
    assert value(samples, "blf_jobs_total", role="verifier", outcome="failed") == 1


def test_a_redis_that_is_down_gives_a_scrape_that_says_so(
    node: NodeDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_dir = short_tempdir()
    own = EmbeddedRedis(server_dir)
    own.start()
    try:
        with endpoint(node, own.urls.celery, monkeypatch) as server:
            assert value(scrape(server.url), "blf_redis_up") == 1
            own.stop()
            down = scrape(server.url)  # 200, with what could be read
            again = scrape(server.url)
            own.start()
            back = scrape(server.url)
    finally:
        own.stop()

    assert value(down, "blf_redis_up") == 0 and value(down, "blf_up") == 0
    assert value(down, "blf_scrape_errors_total", source="redis") == 1
    assert value(again, "blf_scrape_errors_total", source="redis") == 2
    assert value(down, "blf_certificate_seconds_left") > 0  # config.json still read
    assert "blf_queue_messages" not in names(down)  # unknown, not zero
    assert value(back, "blf_redis_up") == 1 and value(back, "blf_up") == 1
    assert value(back, "blf_scrape_errors_total", source="redis") == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_metrics_command_serves_until_signalled_and_exits_0(
    node: NodeDir,
    shared_redis: EmbeddedRedis,
    processes: Processes,
    signum: signal.Signals,
) -> None:
    # A wrong password: the command must never open the keystore.
    run = processes.start(
        node,
        "metrics",
        "--port",
        "0",
        BLF_BROKER_URL=shared_redis.urls.celery,
        BLF_KEY_PASSWORD="wrong",
    )
    (line,) = run.wait_for(r"Metrics on http://127\.0\.0\.1:\d+/metrics")
    url = line[line.index("http://") :].strip()

    def answers() -> Samples | None:
        try:
            return scrape(url)
        except requests.ConnectionError:
            return None

    samples = wait_until(answers, what="the metrics port to answer")
    assert samples is not None and value(samples, "blf_redis_up") == 1
    run.signal(signum)
    assert run.wait(30) == 0
    assert len(run.lines("Metrics on")) == 1
    assert "Traceback" not in run.output()


def test_the_command_refuses_a_host_that_is_not_loopback(
    node: NodeDir, shared_redis: EmbeddedRedis
) -> None:
    env = {"BLF_BROKER_URL": shared_redis.urls.celery}
    result = node.invoke("metrics", "--host", "0.0.0.0", env=env)
    assert result.exit_code == 2
    assert "--allow-remote" in error_line(result)
    configured = node.invoke("metrics", env={**env, "BLF_METRICS_HOST": "0.0.0.0"})
    assert configured.exit_code == 2
    assert "not a loopback address" in error_line(configured)


def test_the_command_says_when_its_port_is_taken(
    node: NodeDir, shared_redis: EmbeddedRedis
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = node.invoke(
            "metrics", "--port", str(port), env={"BLF_BROKER_URL": shared_redis.urls.celery}
        )
    assert result.exit_code == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in error_line(result)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.1", "no-such-host.invalid"))


def test_the_defaults_are_loopback() -> None:
    settings = Settings()
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9464)
