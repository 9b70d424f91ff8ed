"""`jobs list` / `jobs show` read the node's journal; the payload models and start-up
checks refuse what they must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from pydantic import TypeAdapter, ValidationError

from blf.broker import EmbeddedRedis
from blf.config import build_settings
from blf.devnet.icl import DevnetIcl
from blf.errors import ConfigError
from blf.icl import JobStatus
from blf.journal import Journal
from blf.payloads import InferenceOutcome, InferenceResult
from blf.readiness import check_servable, job_warnings
from tests.nodes import error_line, make_node, status_rows

SHA = "ab" * 32


def test_jobs_list_and_show(devnet: DevnetIcl, shared_redis: EmbeddedRedis) -> None:
    node = make_node(devnet.url, attest=False)
    client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    journal = Journal(client, node.address)
    journal.record("a" * 64, "received", role="leader", model_id="demo-model", queue_s="0.010")
    journal.record("a" * 64, "submitted", key_s="0.020", total_s="1.250", commitment=SHA)
    journal.record("b" * 64, "failed", role="verifier", model_id="demo-model", reason="tampered")
    env = {"BLF_BROKER_URL": shared_redis.urls.celery}

    listed = node.invoke("jobs", "list", env=env)
    assert listed.exit_code == 0, listed.output
    rows = listed.stdout.splitlines()
    assert rows[0].split()[:4] == ["JOB", "ROLE", "MODEL", "STATE"]
    assert rows[1].split()[:4] == ["bbbbbbbbbbbbbbbb..", "verifier", "demo-model", "failed"]
    assert rows[2].split()[3:5] == ["submitted", "1.250s"]

    as_json = json.loads(node.invoke("jobs", "list", "--limit", "1", "--json", env=env).stdout)
    assert [j["job_id"] for j in as_json] == ["b" * 64]

    shown = node.invoke("jobs", "show", "a" * 64, env=env)
    assert shown.exit_code == 0
    assert "state    submitted" in shown.stdout
    assert "queue 0.010s  key 0.020s  total 1.250s" in shown.stdout
    record = json.loads(node.invoke("jobs", "show", "a" * 64, "--json", env=env).stdout)
    assert record["commitment"] == SHA

    missing = node.invoke("jobs", "show", "c" * 64, env=env)
    assert missing.exit_code == 1 and "not in this node's journal" in error_line(missing)


def test_jobs_without_a_running_node_says_what_to_start(devnet: DevnetIcl) -> None:
    node = make_node(devnet.url, attest=False)
    result = node.invoke("jobs", "list")
    assert result.exit_code == 2
    assert "start `blindference-node run` first" in error_line(result)


@pytest.mark.parametrize(
    "bad",
    [
        {"output_sha256": SHA.upper()},
        {"output_sha256": "ab"},
        {"sealed_output_key": "not hex"},
        {"prompt": "a plaintext field has no place here"},
    ],
)
def test_gpu_answers_are_validated(bad: dict[str, str]) -> None:
    answer = {"ok": True, "job_id": "j", "output_sha256": SHA, **bad}
    with pytest.raises(ValidationError):
        TypeAdapter(InferenceOutcome).validate_python(answer)


def test_gpu_answers_are_told_apart_by_ok() -> None:
    adapter = TypeAdapter(InferenceOutcome)
    assert isinstance(
        adapter.validate_python({"ok": True, "job_id": "j", "output_sha256": SHA}), InferenceResult
    )
    failure = adapter.validate_python({"ok": False, "job_id": "j", "reason": "no backend"})
    assert failure.ok is False


def test_status_says_who_submitted_only_when_the_icl_tells() -> None:
    devnet = JobStatus.model_validate(
        {
            "jobId": "j",
            "status": "QUEUED",
            "nodeAssignments": {"submitted": ["0x000000000000000000000000000000000000dEaD"]},
        }
    )
    assert devnet.submitted_by("0x000000000000000000000000000000000000dead") is True
    assert devnet.submitted_by("0x0000000000000000000000000000000000000001") is False
    public = JobStatus.model_validate({"jobId": "j", "status": "QUEUED", "nodeAssignments": {}})
    assert public.submitted_by("0x000000000000000000000000000000000000dEaD") is None


def test_run_refuses_modes_it_cannot_serve_and_warns_about_failing_jobs(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    with pytest.raises(ConfigError, match="available: python, bridge"):
        check_servable(build_settings({"cofhe_mode": "tachyon"}, path=path))
    with pytest.raises(ConfigError, match="'bridge' needs cofhe_endpoint"):
        check_servable(build_settings({"cofhe_mode": "bridge"}, path=path))
    check_servable(build_settings({}, path=path))  # unset: JSON-RPC, blf's default
    warnings = job_warnings(
        build_settings(
            {"supported_model_ids": ["m", "n"], "model_backends": {"m": "mock"}}, path=path
        )
    )
    assert [w.split(":")[0] for w in warnings] == [
        "no cofhe_endpoint",
        "no IPFS upload target (ipfs_api_url or pinata_jwt)",
        "no backend configured for n (model_backends)",
    ]
    assert job_warnings(build_settings({}, path=path)) == []  # serves nothing: nothing fails


def test_status_names_cofhe_and_ipfs(devnet: DevnetIcl) -> None:
    node = make_node(devnet.url, attest=False)
    env = {"BLF_COFHE_ENDPOINT": "http://127.0.0.1:9/rpc", "BLF_IPFS_API_URL": "http://u:p@h:5001"}
    rows = status_rows(node.invoke("status", env=env))
    assert rows["CoFHE"] == "python, http://127.0.0.1:9/rpc"
    assert rows["IPFS"].startswith("upload to http://h:5001; gateways https://node.lighthouse")
    bare = status_rows(node.invoke("status"))
    assert bare["CoFHE"] == "python, no cofhe_endpoint: jobs fail"
    assert bare["IPFS"].startswith("no upload target: leader jobs fail")


def test_init_makes_a_cluster_key_and_a_control_key_readable_by_the_owner_only(
    devnet: DevnetIcl,
) -> None:
    node = make_node(devnet.url, attest=False)
    keys = [node.root / "cluster.key", node.root / "control.key"]
    assert [oct(k.stat().st_mode & 0o777) for k in keys] == ["0o600", "0o600"]
    texts = [k.read_text().strip() for k in keys]
    assert all(len(t) == 64 and int(t, 16) >= 0 for t in texts) and texts[0] != texts[1]
    result = node.invoke("init", "--force", "--models", "m", "--icl", devnet.url)
    assert result.exit_code == 0, result.output
    assert [k.read_text().strip() for k in keys] != texts  # a new node, new keys
