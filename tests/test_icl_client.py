"""The ICL client over real HTTP: against the devnet ICL, and against a tiny scripted server
for the answers the devnet never gives (5xx, garbage bodies)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from blf.attestation import DEFAULT_MOCK_KEY, mock_quote, runtime_hash
from blf.devnet.icl import DevnetIcl
from blf.errors import (
    IclProtocolError,
    IclStatusError,
    IclTransportError,
    NodeUnknownError,
)
from blf.icl import (
    Assignment,
    AttestationRequest,
    ClaimGrant,
    IclClient,
    LeaderResult,
    Retry,
    Verdict,
    parse_handle,
)
from tests.nodes import submit_job as submit_devnet_job

MODEL = "test-model"
HANDLE_HIGH = 0x1F
HANDLE_LOW = 0xDEADBEEF
OUTPUT_CID = "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"
C_GOOD = "aa" * 32
C_OTHER = "bb" * 32
C_THIRD = "cc" * 32


# --------------------------------------------------------------------------- helpers


class Recorder:
    """An injected ``sleep`` that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def client_for(url: str, account: LocalAccount | None = None, **options: Any) -> IclClient:
    options.setdefault("sleep", Recorder())
    return IclClient(url, account=account or Account.create(), **options)


def attest(client: IclClient, models: tuple[str, ...] = (MODEL,)) -> None:
    challenge = client.challenge()
    client.verify_attestation(
        AttestationRequest(
            node_address=client.address,
            backend_type="mock",
            quote=mock_quote(challenge.nonce, DEFAULT_MOCK_KEY),
            runtime_hash=runtime_hash(),
            challenge_id=challenge.challenge_id,
            supported_model_ids=list(models),
        )
    )


def leader_result(job_id: str, commitment: str) -> LeaderResult:
    encrypted = {"ctHash": "123", "securityZone": 0, "utype": 6, "signature": "0xabcd"}
    return LeaderResult.model_validate(
        {
            "jobId": job_id,
            "output_cid": OUTPUT_CID,
            "commitment_hash": commitment,
            "encrypted_output_key_high": "123",
            "encrypted_output_key_low": "456",
            "encrypted_output_key_inputs": {"high": encrypted, "low": encrypted},
        }
    )


def verdict(client: IclClient, job_id: str, commitment: str, word: str) -> Verdict:
    return Verdict(
        job_id=job_id,
        verifier_address=client.address,
        commitment_hash=commitment,
        verdict=word,  # type: ignore[arg-type]
        confidence=100,
    )


def submit_job(url: str) -> dict[str, Any]:
    return submit_devnet_job(url, MODEL, kpHighHandle=HANDLE_HIGH, kpLowHandle=HANDLE_LOW)


class TamperingSession(requests.Session):
    """Changes the body after the client signed it, as a man in the middle would."""

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        if data:
            kwargs["data"] = data.replace(b'"nodeAddress"', b' "nodeAddress"')
        return super().request(method, url, *args, **kwargs)


# --------------------------------------------------------------------------- scripted server


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    """A real HTTP server answering from a script: ``(status, body)`` per request, the last
    entry repeating once the script runs out."""

    url: str = ""
    script: list[tuple[int, str]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def answer(self, *replies: tuple[int, str | dict[str, Any]]) -> None:
        self.script = [(s, b if isinstance(b, str) else json.dumps(b)) for s, b in replies]

    def next_reply(self) -> tuple[int, str]:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[Scripted]:
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.seen.append(Seen(self.command, self.path, dict(self.headers), body))
            status, text = state.next_reply()
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def scripted(scripted_server: Scripted) -> Scripted:
    # One server for the module; a fresh script and request log for every test.
    scripted_server.script = [(500, "no script")]
    scripted_server.seen = []
    return scripted_server


HEARTBEAT_OK = (200, {"status": "ok"})
UNAVAILABLE = (503, "busy")


# --------------------------------------------------------------------------- signatures


def test_requests_carry_the_signed_headers(scripted: Scripted) -> None:
    scripted.answer(HEARTBEAT_OK)
    account = Account.create()
    client = client_for(scripted.url, account, clock=lambda: 1_750_000_000.0)
    client.heartbeat()
    [seen] = scripted.seen
    assert seen.path == "/internal/heartbeat"
    assert seen.headers["X-Node-Address"] == account.address
    assert seen.headers["X-Timestamp"] == "1750000000"
    assert seen.headers["Content-Type"] == "application/json"
    message = seen.body.decode() + "1750000000"
    signer = Account.recover_message(
        encode_defunct(text=message), signature=seen.headers["X-Signature"]
    )
    assert signer == account.address
    assert json.loads(seen.body) == {"nodeAddress": account.address, "timestamp": "1750000000"}


def test_devnet_accepts_a_well_signed_client(devnet: DevnetIcl) -> None:
    client = client_for(devnet.url)
    challenge = client.challenge()
    assert challenge.nonce.startswith("0x") and challenge.challenge_id


def test_tampered_body_is_rejected_with_401(devnet: DevnetIcl) -> None:
    client = client_for(devnet.url, session=TamperingSession())
    with pytest.raises(IclStatusError) as caught:
        client.heartbeat()
    assert caught.value.status == 401
    assert "signature" in str(caught.value)
    assert "/internal/heartbeat" in caught.value.url


def test_stale_timestamp_is_rejected_with_401(devnet: DevnetIcl) -> None:
    sleep = Recorder()
    client = client_for(devnet.url, clock=lambda: time.time() - 600, sleep=sleep)
    with pytest.raises(IclStatusError) as caught:
        client.challenge()
    assert caught.value.status == 401
    assert "old" in str(caught.value)
    assert sleep.delays == []  # a 4xx is never retried


# --------------------------------------------------------------------------- retries


def test_idempotent_call_retries_5xx_then_succeeds(scripted: Scripted) -> None:
    scripted.answer(UNAVAILABLE, UNAVAILABLE, HEARTBEAT_OK)
    sleep = Recorder()
    retry = Retry(attempts=4, backoff=0.5, backoff_max=8.0, jitter=False)
    client = client_for(scripted.url, retry=retry, sleep=sleep)
    assert client.heartbeat().status == "ok"
    assert len(scripted.seen) == 3
    assert sleep.delays == [0.5, 1.0]
    # every attempt is signed afresh, and sends the very same body
    assert len({s.body for s in scripted.seen}) == 1


def test_backoff_grows_and_is_capped(scripted: Scripted) -> None:
    scripted.answer(UNAVAILABLE)
    sleep = Recorder()
    retry = Retry(attempts=6, backoff=1.0, backoff_max=3.0, jitter=False)
    client = client_for(scripted.url, retry=retry, sleep=sleep)
    with pytest.raises(IclTransportError) as caught:
        client.challenge()
    assert "503" in str(caught.value)
    assert len(scripted.seen) == 6
    assert sleep.delays == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_jittered_backoff_stays_within_its_cap(scripted: Scripted) -> None:
    scripted.answer(UNAVAILABLE)
    sleep = Recorder()
    retry = Retry(attempts=5, backoff=1.0, backoff_max=4.0)
    client = client_for(scripted.url, retry=retry, sleep=sleep)
    with pytest.raises(IclTransportError):
        client.challenge()
    caps = [1.0, 2.0, 4.0, 4.0]
    assert len(sleep.delays) == len(caps)
    assert all(cap / 2 <= d <= cap for d, cap in zip(sleep.delays, caps, strict=True))


def test_retry_value_defaults_and_equality() -> None:
    assert Retry() == Retry(attempts=4, backoff=0.5, backoff_max=8.0, jitter=True)
    assert "attempts=4" in repr(Retry())
    assert Retry(jitter=False).delay(10) == 8.0


@pytest.mark.parametrize("options", [{"attempts": 0}, {"backoff": -1.0}])
def test_retry_refuses_nonsense(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Retry(**options)


@pytest.mark.parametrize(
    ("call", "path"),
    [
        (lambda c: c.claim("ab" * 32), "/internal/task/claim"),
        (lambda c: c.submit_result(leader_result("ab" * 32, C_GOOD)), "/internal/task/result"),
        (
            lambda c: c.submit_verdict(verdict(c, "ab" * 32, C_GOOD, "CONFIRM")),
            "/internal/task/verify",
        ),
    ],
    ids=["claim", "result", "verdict"],
)
def test_state_changing_post_is_not_retried(scripted: Scripted, call: Any, path: str) -> None:
    scripted.answer(UNAVAILABLE, HEARTBEAT_OK)
    sleep = Recorder()
    client = client_for(scripted.url, sleep=sleep, retry=Retry(attempts=5, jitter=False))
    with pytest.raises(IclTransportError):
        call(client)
    assert [s.path for s in scripted.seen] == [path]
    assert sleep.delays == []


def test_connection_refused_is_a_transport_error_after_the_retries() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleep = Recorder()
    client = client_for(f"http://127.0.0.1:{port}", sleep=sleep, retry=Retry(attempts=3))
    with pytest.raises(IclTransportError) as caught:
        client.challenge()
    assert f"127.0.0.1:{port}/internal/challenge/" in str(caught.value)
    assert len(sleep.delays) == 2


# --------------------------------------------------------------------------- 4xx


def test_unknown_node_on_assignments_is_node_unknown(devnet: DevnetIcl) -> None:
    client = client_for(devnet.url)
    with pytest.raises(NodeUnknownError) as caught:
        client.assignments()
    assert caught.value.status == 404
    assert client.address in str(caught.value)


def test_assignments_after_icl_restart_is_node_unknown(devnet: DevnetIcl) -> None:
    client = client_for(devnet.url)
    attest(client)
    assert client.assignments() == []
    requests.post(devnet.url + "/admin/reset", timeout=10)
    with pytest.raises(NodeUnknownError):
        client.assignments()


@pytest.mark.parametrize("status", [401, 404])
def test_401_and_404_on_assignments_mean_node_unknown(scripted: Scripted, status: int) -> None:
    scripted.answer((status, {"detail": "who?"}))
    with pytest.raises(NodeUnknownError) as caught:
        client_for(scripted.url).assignments()
    assert caught.value.status == status


def test_400_is_a_status_error_and_not_retried(scripted: Scripted) -> None:
    scripted.answer((400, {"detail": "jobId: field required"}), HEARTBEAT_OK)
    sleep = Recorder()
    client = client_for(scripted.url, sleep=sleep, retry=Retry(attempts=5))
    with pytest.raises(IclStatusError) as caught:
        client.heartbeat()
    error = caught.value
    assert not isinstance(error, NodeUnknownError)
    assert error.status == 400
    assert str(error).count("\n") == 0
    assert "400" in str(error) and "jobId: field required" in str(error)
    assert error.url == scripted.url + "/internal/heartbeat"
    assert len(scripted.seen) == 1
    assert sleep.delays == []


def test_400_from_devnet_claim_outside_the_quorum(devnet: DevnetIcl) -> None:
    nodes = [client_for(devnet.url) for _ in range(4)]
    for node in nodes:
        attest(node)
    job = submit_job(devnet.url)
    [outsider] = [n for n in nodes if n.address not in (job["leader"], *job["verifiers"])]
    with pytest.raises(IclStatusError) as caught:
        outsider.claim(job["jobId"])
    assert caught.value.status == 400
    assert "not in the quorum" in str(caught.value)


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "body",
    ["<html>gateway</html>", "", json.dumps({"assignment": []}), json.dumps([1, 2])],
    ids=["html", "empty", "wrong-key", "list"],
)
def test_garbage_2xx_body_is_a_protocol_error(scripted: Scripted, body: str) -> None:
    scripted.answer((200, body))
    with pytest.raises(IclProtocolError) as caught:
        client_for(scripted.url).assignments()
    assert "/internal/assignments/" in str(caught.value)
    assert str(caught.value).count("\n") == 0


def test_assignment_with_a_bad_role_is_a_protocol_error(scripted: Scripted) -> None:
    bad = {
        "jobId": "j",
        "role": "boss",
        "modelId": MODEL,
        "promptCid": "c",
        "deadline": 1,
    }
    scripted.answer((200, {"assignments": [bad]}))
    with pytest.raises(IclProtocolError):
        client_for(scripted.url).assignments()


@pytest.mark.parametrize(
    ("raw", "value"),
    [(31, 31), ("31", 31), ("0x1f", 31), ("0X1F", 31), (" 0xdeadbeef ", 0xDEADBEEF), (None, None)],
)
def test_handles_parse_from_int_decimal_and_hex(raw: Any, value: int | None) -> None:
    assert parse_handle(raw) == value


@pytest.mark.parametrize("raw", [True, "nope", 1.5, "0xzz"])
def test_bad_handles_are_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        parse_handle(raw)


def test_assignment_and_grant_accept_every_handle_form() -> None:
    base = {"jobId": "j", "role": "leader", "modelId": MODEL, "promptCid": "c", "deadline": 1}
    hexed = Assignment.model_validate({**base, "kpHighHandle": "0x1f", "kpLowHandle": "31"})
    assert (hexed.kp_high_handle, hexed.kp_low_handle) == (31, 31)
    grant = ClaimGrant.model_validate({"kpHighHandle": 31, "kpLowHandle": "0x1F"})
    assert (grant.kp_high_handle, grant.kp_low_handle) == (31, 31)


# --------------------------------------------------------------------------- a whole job


def three_attested(url: str) -> dict[str, IclClient]:
    clients = [client_for(url) for _ in range(3)]
    for client in clients:
        attest(client)
    return {c.address: c for c in clients}


def test_three_node_job_is_accepted(devnet: DevnetIcl) -> None:
    nodes = three_attested(devnet.url)
    job = submit_job(devnet.url)
    job_id = job["jobId"]
    leader = nodes[job["leader"]]
    verifiers = [nodes[v] for v in job["verifiers"]]

    [assignment] = leader.assignments()
    assert (assignment.job_id, assignment.role, assignment.model_id) == (job_id, "leader", MODEL)
    assert (assignment.kp_high_handle, assignment.kp_low_handle) == (HANDLE_HIGH, HANDLE_LOW)
    assert all(v.assignments() == [] for v in verifiers)  # not before the leader's result

    grant = leader.claim(job_id)
    assert (grant.kp_high_handle, grant.kp_low_handle) == (HANDLE_HIGH, HANDLE_LOW)
    assert grant.output_key_granted is True
    assert leader.assignments() == []

    ack = leader.submit_result(leader_result(job_id, C_GOOD))
    assert ack.status == "leader_result_recorded" and ack.finalized is False
    status = leader.job_status(job_id)
    assert (status.output_cid, status.leader_commitment) == (OUTPUT_CID, C_GOOD)

    for verifier in verifiers:
        [seen] = verifier.assignments()
        assert (seen.job_id, seen.role) == (job_id, "verifier")
        assert verifier.claim(job_id).output_key_granted is False
    acks = [v.submit_verdict(verdict(v, job_id, C_GOOD, "CONFIRM")) for v in verifiers]
    assert (acks[0].status, acks[0].finalized) == ("committed", True)  # 2 of 3 agree
    assert acks[1].status == "verifier_verdict_recorded"

    final = verifiers[1].job_status(job_id)
    assert final.status == "ACCEPTED"
    assert final.failure_reason is None
    record = requests.get(f"{devnet.url}/admin/jobs/{job_id}", timeout=10).json()
    assert record["claims"] == dict.fromkeys(nodes, 1)


def test_three_different_commitments_are_rejected(devnet: DevnetIcl) -> None:
    nodes = three_attested(devnet.url)
    job = submit_job(devnet.url)
    job_id = job["jobId"]
    leader = nodes[job["leader"]]
    first, second = (nodes[v] for v in job["verifiers"])

    leader.claim(job_id)
    leader.submit_result(leader_result(job_id, C_GOOD))
    for verifier in (first, second):
        verifier.claim(job_id)
    assert first.submit_verdict(verdict(first, job_id, C_OTHER, "REJECT")).finalized is False
    last = second.submit_verdict(verdict(second, job_id, C_THIRD, "REJECT"))
    assert last.finalized is True

    status = leader.job_status(job_id)
    assert status.status == "REJECTED"
    assert status.failure_reason
