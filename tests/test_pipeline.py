"""The job pipeline end to end on a local network: three nodes (three identities, three
`run`s, each with its own Redis, beat, control and GPU workers) against the devnet ICL,
CoFHE and IPFS over HTTP. The user's side is the devnet user: it encrypts the prompt,
and decrypts the leader's output with its own CoFHE permit."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from blf import crypto
from blf.devnet.network import LocalNetwork, LocalNode
from blf.devnet.user import DevnetInfo, DevnetUser
from blf.inference.mock import mock_output
from blf.journal import FINAL_STATES
from tests.nodes import wait_until
from tests.pipeline import (
    Gate,
    job_record,
    journal,
    node_log,
    redis_contents,
    secrets_found,
    start_network,
    wait_state,
)

MODELS = "demo-model,one-off,skewed"


def backends(one_off: str = "", skewed: str = "") -> dict[str, str]:
    specs: dict[str, Any] = {"demo-model": "mock"}
    specs["one-off"] = {"backend": "mock", "suffix": one_off} if one_off else "mock"
    specs["skewed"] = {"backend": "mock", "suffix": skewed} if skewed else "mock"
    return {"BLF_MODEL_BACKENDS": json.dumps(specs)}


class Quorum:
    def __init__(self, network: LocalNetwork, verify_gate: Gate) -> None:
        self.network = network
        self.verify_gate = verify_gate
        self.user = DevnetUser(DevnetInfo.read(network.info_path))
        self.honest, self.odd, self.odder = network.members
        self.secrets: dict[str, bytes] = {}

    def submit(self, prompt: str, model: str = "demo-model") -> tuple[str, bytes]:
        key = crypto.new_key()
        blob = crypto.encrypt_blob(key, prompt.encode())
        order = [n.address for n in (self.honest, self.odd, self.odder)]
        return self.user.submit_blob(blob, key, model, quorum=order), key

    def wait(self, job_id: str) -> dict[str, Any]:
        return self.user.wait(job_id, 60)


@pytest.fixture(scope="module")
def quorum() -> Iterator[Quorum]:
    """node-1 is honest everywhere; node-3 disagrees on "one-off"; node-2 and node-3 each
    disagree, differently, on "skewed". node-1 leads every job here."""
    gates: list[Gate] = []

    def before(network: LocalNetwork) -> None:
        gates.append(Gate(network.icl.app, "/internal/task/verify"))

    network = start_network(
        node_env=[backends(), backends(skewed=" (2)"), backends(one_off=" (3)", skewed=" (3)")],
        before=before,
        BLF_SUPPORTED_MODEL_IDS=MODELS,
    )
    try:
        yield Quorum(network, gates[0])
    finally:
        gates[0].release.set()
        network.stop()


def test_three_nodes_take_a_job_to_accepted_and_the_user_reads_the_output(
    quorum: Quorum,
) -> None:
    prompt = "Translate  'hello'\u00a0to French."
    job_id, key = quorum.submit(prompt)
    record = quorum.wait(job_id)
    assert record["status"] == "ACCEPTED", record
    output = quorum.user.output(record)
    assert output == mock_output("demo-model", prompt)
    assert record["resultPosts"] == 1
    assert record["claims"][quorum.honest.address] == 1
    assert all(v["verdict"] == "CONFIRM" for v in record["verdicts"].values())
    leader = wait_state(quorum.honest, job_id, "submitted")
    assert leader["role"] == "leader"
    assert leader["commitment"] == crypto.commitment(
        record["outputCid"], crypto.output_hash(output)
    )
    for stage in ("queue_s", "claim_s", "key_s", "download_s", "inference_s", "upload_s"):
        assert float(leader[stage]) >= 0, stage
    assert "Mock backend answering for demo-model: not a model" in node_log(
        quorum.network, quorum.honest
    )
    result = record["result"]
    halves = [
        quorum.network.cofhe.state.value_of(int(result[f"encrypted_output_key_{h}"]))
        for h in ("high", "low")
    ]
    quorum.secrets |= _secrets("first", prompt, output, key, crypto.join_key(*halves))


def _scrape(network: LocalNetwork, node: LocalNode) -> dict[tuple[str, str], float]:
    """The node's /metrics (its `run` logged the address), as {(sample, labels): value}."""
    (url, *_) = re.findall(r"Metrics on (http://\S+/metrics)", node_log(network, node))[::-1]
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_after_a_job_each_node_s_metrics_count_it_by_role_with_its_stages(
    quorum: Quorum,
) -> None:
    job_id, _ = quorum.submit("Count the moons of Mars.")
    assert quorum.wait(job_id)["status"] == "ACCEPTED"
    wait_state(quorum.honest, job_id, "submitted")
    # The job is decided once two verdicts are in: the third verifier may be closed out,
    # or may not have claimed it at all. Every node with a final record is checked.
    finished = lambda: [  # noqa: E731
        (node, record)
        for node in (quorum.honest, quorum.odd, quorum.odder)
        if (record := journal(node).get(job_id)).get("state") in FINAL_STATES
    ]
    done = wait_until(lambda: len(finished()) >= 2 and finished(), what="a verifier to finish")
    for node, record in done:
        role, outcome = record["role"], record["state"]
        samples = _scrape(quorum.network, node)
        assert samples[("blf_up", "")] == 1 and samples[("blf_redis_up", "")] == 1
        assert samples[("blf_jobs_total", f"outcome={outcome},role={role}")] >= 1
        assert samples[("blf_journal_jobs", f"outcome={outcome},role={role}")] >= 1
        assert samples[("blf_jobs_in_progress", f"role={role}")] == 0
        assert samples[("blf_stage_seconds_gsum", "stage=total")] > 0
        uploads = samples[("blf_stage_seconds_gcount", "stage=upload")]
        if role == "leader":
            assert outcome == "submitted"
            # Every job it submitted went through inference and an upload.
            led = samples[("blf_journal_jobs", "outcome=submitted,role=leader")]
            assert samples[("blf_stage_seconds_gcount", "stage=inference")] >= led
            assert uploads >= led
        else:
            assert uploads == 0  # only a leader uploads
        assert samples[("blf_queue_messages", "model=demo-model")] == 0
        assert samples[("blf_control_queue_messages", "")] >= 0
        assert samples[("blf_workers", "model=demo-model")] == 1
        assert samples[("blf_free_slots", "model=demo-model")] >= 1
        assert 0 <= samples[("blf_icl_heartbeat_age_seconds", "")] < 60
        assert samples[("blf_certificate_seconds_left", "")] > 0


def test_a_verifier_with_another_output_answers_reject(quorum: Quorum) -> None:
    # node-2's verdict waits at the ICL until node-3's is in, so node-3 is not closed out
    # by an early decision.
    quorum.verify_gate.hold_from(quorum.odd.address)
    job_id, _ = quorum.submit("Name a colour.", "one-off")
    wait_until(lambda: quorum.odder.address in job_record(quorum.network, job_id)["verdicts"])
    record = job_record(quorum.network, job_id)
    verdict = record["verdicts"][quorum.odder.address]
    assert verdict["verdict"] == "REJECT"
    assert verdict["commitment_hash"] != record["leaderCommitment"]
    assert record["status"] == "QUEUED"
    quorum.verify_gate.release.set()
    assert quorum.wait(job_id)["status"] == "ACCEPTED"
    log = node_log(quorum.network, quorum.odder)
    assert f"REJECT: our commitment {verdict['commitment_hash']} differs from the leader's " in log
    assert wait_state(quorum.odder, job_id, "submitted")["verdict"] == "REJECT"


def test_two_verifiers_with_other_outputs_end_the_job_rejected(quorum: Quorum) -> None:
    job_id, _ = quorum.submit("Name a planet.", "skewed")
    record = quorum.wait(job_id)
    assert record["status"] == "REJECTED", record
    assert {v["verdict"] for v in record["verdicts"].values()} == {"REJECT"}
    assert len(record["verdicts"]) == 2


def test_a_tampered_prompt_blob_fails_the_job_and_submits_nothing(quorum: Quorum) -> None:
    key = crypto.new_key()
    blob = bytearray(crypto.encrypt_blob(key, b"What is 2 + 2?"))
    blob[-1] ^= 0x01  # a flipped ciphertext bit: a valid CID for altered bytes
    order = [n.address for n in (quorum.honest, quorum.odd, quorum.odder)]
    job_id = quorum.user.submit_blob(bytes(blob), key, "demo-model", quorum=order)
    failed = wait_state(quorum.honest, job_id, "failed")
    assert "AES-GCM authentication" in failed["reason"]
    record = job_record(quorum.network, job_id)
    assert record["result"] is None and record["resultPosts"] == 0 and record["verdicts"] == {}


def test_a_blob_that_does_not_match_its_cid_fails_the_job(quorum: Quorum) -> None:
    network, user = quorum.network, quorum.user
    key = crypto.new_key()
    cid = network.ipfs.state.put(crypto.encrypt_blob(key, b"Who wrote Hamlet?"))
    network.ipfs.state.tamper(cid, crypto.encrypt_blob(key, b"Who wrote Faust?"))
    high, low = (
        network.cofhe.state.store(h, [user.account.address]) for h in crypto.split_key(key)
    )
    body = {
        "modelId": "demo-model",
        "promptCid": cid,
        "kpHighHandle": high,
        "kpLowHandle": low,
        "userAddress": user.account.address,
        "quorum": [n.address for n in (quorum.honest, quorum.odd, quorum.odder)],
    }
    job_id = requests.post(network.icl.url + "/admin/jobs", json=body, timeout=10).json()["jobId"]
    failed = wait_state(quorum.honest, job_id, "failed")
    assert "do not hash to CID" in failed["reason"] and cid in failed["reason"], failed["reason"]
    assert job_record(network, job_id)["resultPosts"] == 0


def test_no_secret_is_left_anywhere_in_redis(quorum: Quorum) -> None:
    """Runs last: after every job above, each node's Redis (keys, values, decoded message
    bodies, and its append-only file) and its log hold neither prompt, output, nor key."""
    assert quorum.secrets, "the first test records what to look for"
    for node in quorum.network.members:
        contents = redis_contents(node)
        assert any(b"blf:" in c for c in contents)  # the scan does see the node's data
        assert secrets_found(contents, quorum.secrets) == [], node.directory.name
        # Nor does the node's log, at INFO (prompts and outputs are DEBUG-only).
        log = node_log(quorum.network, node).encode()
        assert b"Job " in log
        assert secrets_found([log], quorum.secrets) == [], node.directory.name
    jobs = journal(quorum.honest).recent(50)
    assert jobs and all("prompt" not in record for _, record in jobs)


def _secrets(tag: str, prompt: str, output: str, *keys: bytes) -> dict[str, bytes]:
    found = {f"{tag} prompt": prompt.encode(), f"{tag} output": output.encode()}
    for index, key in enumerate(keys):
        found[f"{tag} key {index} hex"] = key.hex().encode()
        found[f"{tag} key {index} bytes"] = key
        for half, value in zip(("high", "low"), crypto.split_key(key), strict=True):
            found[f"{tag} key {index} {half}"] = str(value).encode()
    return found
