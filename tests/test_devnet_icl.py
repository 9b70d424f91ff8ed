"""The devnet ICL, driven over real HTTP the way a node drives the public one."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from blf.devnet.icl import DEFAULT_MOCK_ATTESTATION_KEY, DevnetIcl, create_app

MODEL = "qwen2.5-7b"
HANDLE_HIGH = 0x1F
HANDLE_LOW = 0xDEADBEEF
T0 = 1_750_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _sign(account: LocalAccount, text: str) -> str:
    signed = account.sign_message(encode_defunct(text=text))
    return "0x" + bytes(signed.signature).hex()


class Node:
    """A minimal node: signs like protocol.md §1 says, with the devnet's clock."""

    def __init__(self, url: str, clock: FakeClock, account: LocalAccount | None = None):
        self.url = url
        self.clock = clock
        self.account: LocalAccount = account or Account.create()
        self.address: str = self.account.address

    def headers(self, body_text: str, *, timestamp: str | None = None) -> dict[str, str]:
        ts = timestamp if timestamp is not None else str(int(self.clock()))
        return {
            "Content-Type": "application/json",
            "X-Node-Address": self.address,
            "X-Timestamp": ts,
            "X-Signature": _sign(self.account, body_text + ts),
        }

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(""), timeout=10)

    def post(self, path: str, payload: dict[str, Any]) -> requests.Response:
        body = json.dumps(payload)
        return requests.post(self.url + path, data=body, headers=self.headers(body), timeout=10)

    def attest(
        self, key: str = DEFAULT_MOCK_ATTESTATION_KEY, models: tuple[str, ...] = (MODEL,)
    ) -> requests.Response:
        challenge = self.get(f"/internal/challenge/{self.address}").json()
        nonce = bytes.fromhex(challenge["nonce"][2:])
        return self.post(
            "/internal/attestation/verify",
            {
                "nodeAddress": self.address,
                "backendType": "mock",
                "quote": hmac.new(key.encode(), nonce, hashlib.sha256).hexdigest(),
                "runtimeHash": hashlib.sha256(b"blf-test").hexdigest(),
                "challengeId": challenge["challengeId"],
                "supportedModelIds": list(models),
            },
        )

    def heartbeat(self) -> requests.Response:
        payload = {"nodeAddress": self.address, "timestamp": str(int(self.clock()))}
        return self.post("/internal/heartbeat", payload)

    def assignments(self) -> list[dict[str, Any]]:
        response = self.get(f"/internal/assignments/{self.address}")
        assert response.status_code == 200, response.text
        listed: list[dict[str, Any]] = response.json()["assignments"]
        return listed

    def claim(self, job_id: str) -> requests.Response:
        return self.post("/internal/task/claim", {"jobId": job_id, "nodeAddress": self.address})

    def result(self, job_id: str, commitment: str) -> requests.Response:
        inputs = {"ctHash": "123", "securityZone": 0, "utype": 6, "signature": "0xabcd"}
        return self.post(
            "/internal/task/result",
            {
                "jobId": job_id,
                "output_cid": "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu",
                "commitment_hash": commitment,
                "encrypted_output_key_high": "123",
                "encrypted_output_key_low": "456",
                "encrypted_output_key_inputs": {"high": inputs, "low": inputs},
            },
        )

    def verify(self, job_id: str, commitment: str, verdict: str = "CONFIRM") -> requests.Response:
        return self.post(
            "/internal/task/verify",
            {
                "jobId": job_id,
                "verifier_address": self.address,
                "commitment_hash": commitment,
                "verdict": verdict,
                "confidence": 100,
            },
        )


C_GOOD = "aa" * 32
C_OTHER = "bb" * 32
C_THIRD = "cc" * 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def server(clock: FakeClock) -> Iterator[DevnetIcl]:
    with DevnetIcl(clock=clock, mock_attestation_key=DEFAULT_MOCK_ATTESTATION_KEY) as icl:
        yield icl


@pytest.fixture
def icl(server: DevnetIcl, clock: FakeClock) -> DevnetIcl:
    # One server for the module, a fresh ICL memory and clock for every test.
    server.state.reset()
    clock.now = T0
    return server


def attested(icl: DevnetIcl, clock: FakeClock, count: int) -> list[Node]:
    nodes = [Node(icl.url, clock) for _ in range(count)]
    for node in nodes:
        assert node.attest().status_code == 200
    return nodes


def submit_job(url: str, **overrides: Any) -> requests.Response:
    payload = {
        "modelId": MODEL,
        "promptCid": "bafyprompt",
        "kpHighHandle": HANDLE_HIGH,
        "kpLowHandle": HANDLE_LOW,
        "userAddress": Account.create().address,
        **overrides,
    }
    return requests.post(url + "/admin/jobs", json=payload, timeout=10)


def job_with_roles(icl: DevnetIcl, nodes: list[Node]) -> tuple[str, Node, list[Node]]:
    response = submit_job(icl.url)
    assert response.status_code == 200, response.text
    job = response.json()
    by_address = {n.address: n for n in nodes}
    return job["jobId"], by_address[job["leader"]], [by_address[v] for v in job["verifiers"]]


def admin_job(icl: DevnetIcl, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = requests.get(f"{icl.url}/admin/jobs/{job_id}", timeout=10).json()
    return record


def status_of(node: Node, job_id: str) -> dict[str, Any]:
    response = node.get(f"/internal/jobs/{job_id}/status")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    return status


# --------------------------------------------------------------------------- server


def test_port_zero_resolves_to_a_real_port(icl: DevnetIcl) -> None:
    assert icl.port != 0
    assert icl.url == f"http://127.0.0.1:{icl.port}"
    assert requests.get(icl.url + "/", timeout=10).status_code == 200


def test_stop_closes_the_port(clock: FakeClock) -> None:
    with DevnetIcl(clock=clock) as icl:
        url = icl.url
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/", timeout=10)


def test_mock_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_ATTESTATION_KEY", "from-env")
    assert create_app().state.devnet.mock_attestation_key == "from-env"
    monkeypatch.delenv("MOCK_ATTESTATION_KEY")
    assert create_app().state.devnet.mock_attestation_key == DEFAULT_MOCK_ATTESTATION_KEY
    assert create_app(mock_attestation_key="given").state.devnet.mock_attestation_key == "given"


# --------------------------------------------------------------------------- signatures


def test_signed_request_is_accepted(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    response = node.get(f"/internal/challenge/{node.address}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"challengeId", "nonce", "expiresAt"}
    assert body["nonce"].startswith("0x") and len(bytes.fromhex(body["nonce"][2:])) == 32
    assert body["expiresAt"] == int(T0) + 300


def test_tampered_body_is_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    signed_body = json.dumps({"nodeAddress": node.address, "timestamp": "1"})
    sent_body = json.dumps({"nodeAddress": node.address, "timestamp": "2"})
    response = requests.post(
        icl.url + "/internal/heartbeat", data=sent_body, headers=node.headers(signed_body)
    )
    assert response.status_code == 401
    assert "signature" in response.json()["detail"]


def test_reformatted_body_is_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    # Same JSON value, other bytes: the signature covers the text, not the parsed object.
    node = Node(icl.url, clock)
    payload = {"nodeAddress": node.address, "timestamp": "1"}
    signed = node.headers(json.dumps(payload, separators=(",", ":")))
    response = requests.post(
        icl.url + "/internal/heartbeat", data=json.dumps(payload), headers=signed
    )
    assert response.status_code == 401


@pytest.mark.parametrize("offset", [-301, 301])
def test_timestamp_outside_five_minutes_is_rejected(
    icl: DevnetIcl, clock: FakeClock, offset: int
) -> None:
    node = Node(icl.url, clock)
    stale = str(int(clock()) + offset)
    path = f"/internal/challenge/{node.address}"
    response = requests.get(icl.url + path, headers=node.headers("", timestamp=stale))
    assert response.status_code == 401
    assert "X-Timestamp" in response.json()["detail"]


def test_signature_from_another_key_is_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    headers = node.headers("")
    headers["X-Signature"] = _sign(Account.create(), headers["X-Timestamp"])
    response = requests.get(f"{icl.url}/internal/challenge/{node.address}", headers=headers)
    assert response.status_code == 401


@pytest.mark.parametrize("header", ["X-Node-Address", "X-Timestamp", "X-Signature"])
def test_missing_header_is_rejected(icl: DevnetIcl, clock: FakeClock, header: str) -> None:
    node = Node(icl.url, clock)
    headers = node.headers("")
    del headers[header]
    response = requests.get(f"{icl.url}/internal/challenge/{node.address}", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": f"missing header {header}"}


def test_signer_must_be_the_node_in_the_path(icl: DevnetIcl, clock: FakeClock) -> None:
    node, other = Node(icl.url, clock), Node(icl.url, clock)
    assert node.get(f"/internal/challenge/{other.address}").status_code == 401


def test_path_address_must_be_checksummed(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    response = node.get(f"/internal/challenge/{node.address.lower()}")
    assert response.status_code == 400
    assert "checksummed" in response.json()["detail"]


# --------------------------------------------------------------------------- attestation


def test_mock_attestation_registers_the_node(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    response = node.attest()
    assert response.status_code == 200, response.text
    cert = response.json()
    assert set(cert) == {"certHash", "expiry", "tier"}
    assert cert["certHash"].startswith("0x") and len(cert["certHash"]) == 66
    assert cert["expiry"] == int(T0) + 86400
    assert cert["tier"] == 0
    [record] = requests.get(icl.url + "/admin/nodes", timeout=10).json()["nodes"]
    assert record["address"] == node.address
    assert record["models"] == [MODEL]
    assert record["certHash"] == cert["certHash"]
    assert record["lastSeen"] == T0  # attestation counts as a heartbeat
    assert record["heartbeats"] == []


def test_mock_attestation_with_wrong_key_is_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    response = Node(icl.url, clock).attest(key="not-the-key")
    assert response.status_code == 401
    assert "MOCK_ATTESTATION_KEY" in response.json()["detail"]
    assert icl.state.nodes == {}


def test_challenge_is_single_use(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    challenge = node.get(f"/internal/challenge/{node.address}").json()
    nonce = bytes.fromhex(challenge["nonce"][2:])
    quote = hmac.new(DEFAULT_MOCK_ATTESTATION_KEY.encode(), nonce, hashlib.sha256).digest()
    payload = {
        "nodeAddress": node.address,
        "backendType": "mock",
        "quote": "0x" + quote.hex(),
        "runtimeHash": "0x" + "11" * 32,
        "challengeId": challenge["challengeId"],
        "supportedModelIds": [MODEL],
    }
    assert node.post("/internal/attestation/verify", payload).status_code == 200
    again = node.post("/internal/attestation/verify", payload)
    assert again.status_code == 401
    assert "already used" in again.json()["detail"]


def test_expired_challenge_is_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    challenge = node.get(f"/internal/challenge/{node.address}").json()
    clock.advance(301)
    nonce = bytes.fromhex(challenge["nonce"][2:])
    payload = {
        "nodeAddress": node.address,
        "backendType": "mock",
        "quote": hmac.new(DEFAULT_MOCK_ATTESTATION_KEY.encode(), nonce, hashlib.sha256).hexdigest(),
        "runtimeHash": "11" * 32,
        "challengeId": challenge["challengeId"],
        "supportedModelIds": [MODEL],
    }
    response = node.post("/internal/attestation/verify", payload)
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_unsupported_backend_is_a_bad_request(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    challenge = node.get(f"/internal/challenge/{node.address}").json()
    payload = {
        "nodeAddress": node.address,
        "backendType": "tpm",
        "quote": "00",
        "runtimeHash": "11" * 32,
        "challengeId": challenge["challengeId"],
        "supportedModelIds": [MODEL],
    }
    response = node.post("/internal/attestation/verify", payload)
    assert response.status_code == 400
    assert response.json() == {"detail": "backend tpm not supported by devnet"}


def test_malformed_body_is_a_bad_request(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    response = node.post("/internal/heartbeat", {"nodeAddress": node.address})
    assert response.status_code == 400
    assert "timestamp" in response.json()["detail"]


# --------------------------------------------------------------------------- liveness


def test_heartbeat_from_unknown_node_is_ok_but_not_recorded(
    icl: DevnetIcl, clock: FakeClock
) -> None:
    response = Node(icl.url, clock).heartbeat()
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert icl.state.nodes == {}


def test_heartbeats_of_a_known_node_are_recorded(icl: DevnetIcl, clock: FakeClock) -> None:
    [node] = attested(icl, clock, 1)
    clock.advance(60)
    assert node.heartbeat().json() == {"status": "ok"}
    clock.advance(60)
    node.heartbeat()
    assert icl.state.nodes[node.address].heartbeats == [T0 + 60, T0 + 120]


def test_assignments_for_unknown_node_is_404(icl: DevnetIcl, clock: FakeClock) -> None:
    node = Node(icl.url, clock)
    response = node.get(f"/internal/assignments/{node.address}")
    assert response.status_code == 404
    assert response.json() == {"detail": "node not registered"}


def test_reset_forgets_nodes_like_a_restart(icl: DevnetIcl, clock: FakeClock) -> None:
    [node] = attested(icl, clock, 1)
    assert node.assignments() == []
    requests.post(icl.url + "/admin/reset", timeout=10)
    assert node.get(f"/internal/assignments/{node.address}").status_code == 404


# --------------------------------------------------------------------------- jobs


def test_three_node_job_is_accepted(icl: DevnetIcl, clock: FakeClock) -> None:
    nodes = attested(icl, clock, 3)
    job_id, leader, verifiers = job_with_roles(icl, nodes)
    assert len(job_id) == 64 and job_id == job_id.lower()

    [assignment] = leader.assignments()
    assert assignment == {
        "jobId": job_id,
        "role": "leader",
        "modelId": MODEL,
        "promptCid": "bafyprompt",
        "deadline": int(T0) + 600,
        "insuranceOptIn": False,
        "userAddress": assignment["userAddress"],
        "kpHighHandle": "0x1f",
        "kpLowHandle": "0xdeadbeef",
    }
    assert all(v.assignments() == [] for v in verifiers)  # not before the leader's result

    grant = leader.claim(job_id).json()
    assert grant == {
        "kpHighHandle": HANDLE_HIGH,
        "kpLowHandle": HANDLE_LOW,
        "outputKeyGranted": True,
        "claimDeadline": int(T0) + 600,
    }
    assert leader.assignments() == []  # claimed: no longer listed

    answer = leader.result(job_id, C_GOOD.upper()).json()
    assert answer["status"] == "leader_result_recorded"
    assert answer["commitment_hash"] == C_GOOD
    assert answer["finalized"] is False
    assert status_of(leader, job_id)["leaderCommitment"] == C_GOOD

    for verifier in verifiers:
        [seen] = verifier.assignments()
        assert seen["role"] == "verifier"
        assert verifier.claim(job_id).json()["outputKeyGranted"] is False

    first = verifiers[0].verify(job_id, C_GOOD).json()
    assert first == {
        "status": "committed",
        "job_id": job_id,
        "task_id": first["task_id"],
        "verifier_address": verifiers[0].address,
        "finalized": True,
    }
    late = verifiers[1].verify(job_id, C_GOOD).json()
    assert late["status"] == "verifier_verdict_recorded"

    status = status_of(verifiers[1], job_id)
    assert status == {
        "jobId": job_id,
        "status": "ACCEPTED",
        "outputCid": "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu",
        "leaderCommitment": C_GOOD,
        "failureReason": None,
        "nodeAssignments": {
            "leader": leader.address,
            "verifiers": [v.address for v in verifiers],
            "submitted": [leader.address, *(v.address for v in verifiers)],
        },
    }
    record = admin_job(icl, job_id)
    assert record["claims"] == {n.address: 1 for n in (leader, *verifiers)}
    assert set(record["verdicts"]) == {v.address for v in verifiers}


def test_mismatching_commitments_are_rejected(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
    leader.result(job_id, C_GOOD)
    assert verifiers[0].verify(job_id, C_OTHER, "REJECT").json()["finalized"] is False
    last = verifiers[1].verify(job_id, C_THIRD, "REJECT").json()
    assert last["status"] == "committed" and last["finalized"] is True
    status = status_of(leader, job_id)
    assert status["status"] == "REJECTED"
    assert status["failureReason"]


def test_only_commitments_count_not_the_verdict_word(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
    leader.result(job_id, C_GOOD)
    verifiers[0].verify(job_id, C_GOOD, "REJECT")
    assert status_of(leader, job_id)["status"] == "ACCEPTED"


def test_verdict_before_the_result_is_counted(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
    early = verifiers[0].verify(job_id, C_GOOD).json()
    assert early["status"] == "verifier_verdict_recorded" and early["finalized"] is False
    assert status_of(leader, job_id)["status"] == "QUEUED"
    answer = leader.result(job_id, C_GOOD).json()
    assert answer["status"] == "committed" and answer["finalized"] is True
    assert status_of(leader, job_id)["status"] == "ACCEPTED"


def test_verdict_from_outside_the_quorum_is_400(icl: DevnetIcl, clock: FakeClock) -> None:
    nodes = attested(icl, clock, 4)
    job_id, leader, verifiers = job_with_roles(icl, nodes)
    [outsider] = [n for n in nodes if n not in (leader, *verifiers)]
    assert outsider.verify(job_id, C_GOOD).status_code == 400
    assert leader.verify(job_id, C_GOOD).status_code == 400
    assert outsider.claim(job_id).status_code == 400


def test_result_from_a_verifier_is_400(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, _leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
    response = verifiers[0].result(job_id, C_GOOD)
    assert response.status_code == 400
    assert "not the leader" in response.json()["detail"]


def test_verdict_for_another_address_is_401(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, _leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
    payload = {
        "jobId": job_id,
        "verifier_address": verifiers[1].address,
        "commitment_hash": C_GOOD,
        "verdict": "CONFIRM",
        "confidence": 100,
    }
    assert verifiers[0].post("/internal/task/verify", payload).status_code == 401


def test_repeated_claim_is_answered_and_counted(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, _verifiers = job_with_roles(icl, attested(icl, clock, 3))
    first, second = leader.claim(job_id), leader.claim(job_id)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert admin_job(icl, job_id)["claims"][leader.address] == 2


def test_unknown_job_is_404(icl: DevnetIcl, clock: FakeClock) -> None:
    [node] = attested(icl, clock, 1)
    assert node.claim("00" * 32).status_code == 404
    assert node.get(f"/internal/jobs/{'00' * 32}/status").status_code == 404


def test_fewer_than_three_live_nodes_is_409(icl: DevnetIcl, clock: FakeClock) -> None:
    attested(icl, clock, 2)
    response = submit_job(icl.url)
    assert response.status_code == 409
    assert "needs 3" in response.json()["detail"]


def test_silent_nodes_are_not_picked(icl: DevnetIcl, clock: FakeClock) -> None:
    nodes = attested(icl, clock, 3)
    clock.advance(301)  # past the liveness window; one node keeps heartbeating
    nodes[0].heartbeat()
    assert submit_job(icl.url).status_code == 409
    for node in nodes[1:]:
        node.heartbeat()
    assert submit_job(icl.url).status_code == 200


def test_nodes_without_the_model_are_not_picked(icl: DevnetIcl, clock: FakeClock) -> None:
    attested(icl, clock, 3)
    assert submit_job(icl.url, modelId="other-model").status_code == 409


def test_job_times_out_when_read_after_its_deadline(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, _verifiers = job_with_roles(icl, attested(icl, clock, 3))
    clock.advance(601)
    status = status_of(leader, job_id)
    assert status["status"] == "TIMEDOUT"
    assert leader.assignments() == []


def test_dispute_via_admin(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, _verifiers = job_with_roles(icl, attested(icl, clock, 3))
    response = requests.post(f"{icl.url}/admin/jobs/{job_id}/dispute", timeout=10)
    assert response.json()["status"] == "DISPUTED"
    assert status_of(leader, job_id)["status"] == "DISPUTED"


def test_admin_rejects_malformed_job_with_400(icl: DevnetIcl) -> None:
    response = requests.post(icl.url + "/admin/jobs", json={"modelId": MODEL}, timeout=10)
    assert response.status_code == 400
    assert "promptCid" in response.json()["detail"]


def test_polls_are_counted(icl: DevnetIcl, clock: FakeClock) -> None:
    job_id, leader, _verifiers = job_with_roles(icl, attested(icl, clock, 3))
    leader.assignments()
    leader.assignments()
    assert icl.state.nodes[leader.address].polls == 2
    assert admin_job(icl, job_id)["polls"][leader.address] == 2


# --------------------------------------------------------------------------- older ICL behaviours


def test_older_icl_lists_verifiers_at_once(clock: FakeClock) -> None:
    clock.now = T0
    with DevnetIcl(clock=clock, verifiers_wait_for_leader=False) as icl:
        job_id, _leader, verifiers = job_with_roles(icl, attested(icl, clock, 3))
        assert [a["jobId"] for a in verifiers[0].assignments()] == [job_id]


def test_icl_that_relists_claimed_jobs(clock: FakeClock) -> None:
    clock.now = T0
    with DevnetIcl(clock=clock, relist_claimed=True) as icl:
        job_id, leader, _verifiers = job_with_roles(icl, attested(icl, clock, 3))
        leader.claim(job_id)
        assert [a["jobId"] for a in leader.assignments()] == [job_id]
        leader.result(job_id, C_GOOD)
        assert leader.assignments() == []
