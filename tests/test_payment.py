"""The payment-service client, `jobs earnings` and the earnings column of `jobs list`,
against a local HTTP server speaking the public service's REST shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI

from blf.broker import EmbeddedRedis
from blf.devnet.payment import DevnetPayment
from blf.devnet.server import LocalServer
from blf.errors import PaymentProtocolError, PaymentStatusError, PaymentTransportError
from blf.journal import Journal
from blf.payment import PaymentClient
from tests.nodes import NodeDir, closed_port_url, error_line, make_node

ADDRESS = "0x" + "ab" * 20
JOB_A, JOB_B, JOB_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def payment() -> Iterator[DevnetPayment]:
    with DevnetPayment() as server:
        yield server


@pytest.fixture
def node(tmp_path: Path) -> NodeDir:
    return make_node("http://127.0.0.1:9", root=tmp_path / "node", attest=False)


def test_client_reads_jobs_and_earnings(payment: DevnetPayment) -> None:
    payment.add_job(ADDRESS, JOB_A, role="leader", amount=Decimal("0.1"))
    payment.add_job(ADDRESS, JOB_B, role="verifier", status="pending")
    payment.add_job(ADDRESS, JOB_C, role="verifier", amount=Decimal("0.2"))

    with PaymentClient(payment.url) as client:
        jobs = client.jobs(ADDRESS.upper().replace("0X", "0x"), limit=2)
        totals = client.earnings(ADDRESS)

    assert [j.job_id for j in jobs] == [JOB_C, JOB_B]  # newest first, limited
    assert jobs[0].amount_blind_earned == Decimal("0.2")
    assert jobs[1].amount_blind_earned is None and jobs[1].status == "pending"
    assert totals.total_blind_earned == Decimal("0.3")  # parsed as written, not as a float
    assert totals.jobs_count == 3


def test_client_errors_are_one_line_and_classified(payment: DevnetPayment) -> None:
    with pytest.raises(PaymentTransportError, match="unreachable") as caught:
        PaymentClient(closed_port_url()).earnings(ADDRESS)
    assert "\n" not in str(caught.value)

    payment.fail_with = 503
    with pytest.raises(PaymentTransportError, match="503"):
        PaymentClient(payment.url).earnings(ADDRESS)
    payment.fail_with = 404
    with pytest.raises(PaymentStatusError) as status:
        PaymentClient(payment.url).jobs(ADDRESS)
    assert status.value.status == 404


def test_an_answer_of_the_wrong_shape_is_a_protocol_error() -> None:
    app = FastAPI()

    @app.get("/v1/nodes/{address}/earnings")
    def earnings(address: str) -> dict[str, object]:
        return {"total": 1}

    with (
        LocalServer(app) as server,
        pytest.raises(PaymentProtocolError, match="total_blind_earned"),
    ):
        PaymentClient(server.url).earnings(ADDRESS)


def test_jobs_earnings_command(node: NodeDir, payment: DevnetPayment) -> None:
    payment.add_job(node.address, JOB_A, amount=Decimal("1.25"))
    payment.add_job(node.address, JOB_B, role="verifier", amount=None)
    env = {"BLF_PAYMENT_SERVICE_URL": payment.url}

    text = node.invoke("jobs", "earnings", env=env)
    assert text.exit_code == 0, text.output
    assert "Total   : 1.25 BLIND" in text.stdout and "Jobs    : 2" in text.stdout
    rows = text.stdout.splitlines()
    assert rows[-2].split() == ["bbbbbbbbbbbbbbbb..", "verifier", "completed", "-"]
    assert rows[-1].split() == ["aaaaaaaaaaaaaaaa..", "leader", "completed", "1.25"]

    body = json.loads(node.invoke("jobs", "earnings", "--json", env=env).stdout)
    assert body["total_blind_earned"] == "1.25" and body["jobs_count"] == 2
    assert [j["amount_blind_earned"] for j in body["jobs"]] == [None, "1.25"]


def test_jobs_earnings_unreachable_or_unconfigured_is_one_line(node: NodeDir) -> None:
    down = closed_port_url()
    result = node.invoke("jobs", "earnings", env={"BLF_PAYMENT_SERVICE_URL": down})
    assert result.exit_code == 1
    assert f"payment service {down} unreachable" in error_line(result)

    result = node.invoke("jobs", "earnings")
    assert result.exit_code == 1
    assert "no payment_service_url configured" in error_line(result)


def _journal(node: NodeDir, server: EmbeddedRedis) -> dict[str, str]:
    client = redis.Redis.from_url(server.urls.redis, decode_responses=True)
    journal = Journal(client, node.address)
    journal.record(JOB_A, "submitted", role="leader", model_id="demo-model", total_s="1.250")
    journal.record(JOB_B, "failed", role="verifier", model_id="demo-model", reason="tampered")
    return {"BLF_BROKER_URL": server.urls.celery}


def test_jobs_list_adds_earnings_when_the_service_answers(
    node: NodeDir, shared_redis: EmbeddedRedis, payment: DevnetPayment
) -> None:
    env = _journal(node, shared_redis)
    payment.add_job(node.address, JOB_A, amount=Decimal("2.5"))
    env["BLF_PAYMENT_SERVICE_URL"] = payment.url

    listed = node.invoke("jobs", "list", env=env)

    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[0].split()[:7] == ["JOB", "ROLE", "MODEL", "STATE", "TOTAL", "EARNED", "UPDATED"]
    assert rows[1].split()[:6] == [
        "bbbbbbbbbbbbbbbb..",
        "verifier",
        "demo-model",
        "failed",
        "-",
        "-",
    ]
    assert rows[2].split()[3:6] == ["submitted", "1.250s", "2.5"]
    assert "Earnings unavailable" not in listed.output

    records = json.loads(node.invoke("jobs", "list", "--json", env=env).stdout)
    assert {r["job_id"]: r["amount_blind_earned"] for r in records} == {JOB_A: "2.5", JOB_B: None}


def test_jobs_list_without_earnings_says_why(node: NodeDir, shared_redis: EmbeddedRedis) -> None:
    env = _journal(node, shared_redis)

    listed = node.invoke("jobs", "list", env=env)

    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["JOB", "ROLE", "MODEL", "STATE", "TOTAL", "UPDATED"]
    assert rows[2].split()[3:5] == ["submitted", "1.250s"]
    notes = [line for line in listed.stderr.splitlines() if "Earnings" in line]
    assert len(notes) == 1
    assert notes[0].startswith("Earnings unavailable: no payment_service_url configured")

    down = closed_port_url()
    listed = node.invoke("jobs", "list", env={**env, "BLF_PAYMENT_SERVICE_URL": down})
    assert listed.exit_code == 0
    assert f"Earnings unavailable: payment service {down} unreachable" in listed.stderr
    assert "EARNED" not in listed.stdout
