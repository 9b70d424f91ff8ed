"""The GPU side as its own machine role: a worker with no keystore, no password and no
control key, only the cluster key and the node's Redis, serves a control worker's jobs;
and the control worker takes orders only from the control machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from blf import crypto
from blf.broker import EmbeddedRedis
from blf.capacity import live_workers
from blf.devnet.network import LocalNetwork
from blf.devnet.user import DevnetInfo, DevnetUser
from blf.inference.mock import mock_output
from blf.journal import Journal
from blf.payloads import JobTicket
from tests.nodes import (
    NodeDir,
    NodeProcess,
    Processes,
    make_node,
    send_tasks,
    short_tempdir,
    wait_until,
)
from tests.pipeline import Gate

MODEL = "demo-model"
BACKENDS = '{"demo-model": "mock"}'
OPERATOR_MODULES = ("blf.wallet", "blf.chain", "blf.cofhe", "blf.icl", "blf.node", "blf.runtime")


class Services:
    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        self.network = LocalNetwork(short_tempdir(), nodes=0)
        self.network.start(before=self._gates)
        self.user = DevnetUser(DevnetInfo.read(self.network.info_path))

    def _gates(self, network: LocalNetwork) -> None:
        self.gates["cat"] = Gate(network.ipfs.app, "/api/v0/cat", limit=1)

    def env(self) -> dict[str, str]:
        net = self.network
        return {
            "BLF_COFHE_MODE": "python",
            "BLF_COFHE_ENDPOINT": net.cofhe.url,
            "BLF_IPFS_API_URL": net.ipfs.url,
            "BLF_IPFS_GATEWAY": net.ipfs.url,
            "BLF_MODEL_BACKENDS": BACKENDS,
            "BLF_JOB_TIMEOUT_S": "2",  # visibility timeout 4 s: redelivery comes quickly
        }


@pytest.fixture
def services() -> Iterator[Services]:
    started = Services()
    try:
        yield started
    finally:
        for gate in started.gates.values():
            gate.release.set()
        started.network.stop()


def control_worker(
    processes: Processes,
    node: NodeDir,
    services: Services,
    broker: str,
    *,
    requires_worker: bool = True,
    beat: bool = True,
) -> NodeProcess:
    env = {
        **services.env(),
        "BLF_BROKER_URL": broker,
        "BLF_POLL_INTERVAL_S": "0.5",
        "BLF_CLAIM_REQUIRES_WORKER": "1" if requires_worker else "0",
    }
    args = ["--beat"] if beat else []
    worker = processes.start(node, "worker", "--role", "control", *args, **env)
    worker.wait_for(r"ready\.")
    return worker


class GpuMachine:
    """A directory with only a copy of the cluster key, and a worker started from it."""

    def __init__(self, node: NodeDir, services: Services, broker: str) -> None:
        self.root = short_tempdir()
        self.key = self.root / "cluster.key"
        shutil.copy(node.root / "cluster.key", self.key)
        os.chmod(self.key, 0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_") and k != "HOME"}
        self.env.update(services.env())
        self.env.update(
            HOME=str(self.root),
            PYTHONUNBUFFERED="1",
            BLF_BROKER_URL=broker,
            BLF_NODE_ADDRESS=node.address,
            BLF_SUPPORTED_MODEL_IDS=MODEL,
            BLF_CLUSTER_KEY_FILE=str(self.key),
        )
        self.logs: list[Path] = []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, workers: int = 1) -> subprocess.Popen[bytes]:
        log = self.root / f"gpu-{len(self.logs)}.log"
        self.logs.append(log)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.gpu", *args],
            cwd=self.root,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(
            lambda: log.read_text().count("ready.") >= workers, what="the GPU worker to be ready"
        )
        return self.process

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def test_gpu_worker_without_key_serves_jobs_and_a_killed_one_is_redelivered_once(
    services: Services, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    broker = shared_redis.urls.celery
    leader, *verifiers = (make_node(services.network.icl.url, models=MODEL) for _ in range(3))
    control_worker(processes, leader, services, broker)
    gpu = GpuMachine(leader, services, broker)
    first = gpu.start()
    environ = Path(f"/proc/{first.pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"BLF_KEY_PASSWORD=", b"BLF_PRIVATE_KEY="))]
    assert sorted(p.name for p in gpu.root.iterdir() if not p.name.endswith(".log")) == [
        "cluster.key"
    ]

    services.gates["cat"].hold_all()
    prompt = "Summarise the plot of Hamlet."
    key = crypto.new_key()
    quorum = [leader.address, *(v.address for v in verifiers)]
    job_id = services.user.submit_blob(
        crypto.encrypt_blob(key, prompt.encode()), key, MODEL, quorum=quorum
    )
    wait_until(lambda: services.gates["cat"].arrivals == 1, what="the GPU worker downloading")
    gpu.kill()  # mid-job: its message stays unacknowledged in Redis
    gpu.start()
    services.gates["cat"].release.set()

    record = wait_until(
        lambda: (r := services.network.icl.state.job_record(job_id))["result"] and r,
        what="the leader's result",
    )
    assert services.user.output(record) == mock_output(MODEL, prompt)
    assert record["resultPosts"] == 1
    assert "inference done" in gpu.logs[1].read_text()


def test_gpu_entry_point_imports_nothing_of_the_operator_side(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"node_address": "0x000000000000000000000000000000000000dEaD"}')
    code = (
        "import sys, workers.gpu\n"
        "from blf.app import app\n"
        "from blf.config import BackendSpec\n"
        "from blf.inference import Generation, backend_for\n"
        "from blf.tasks import inference\n"
        "app.conf.include = ['blf.tasks.inference']\n"
        "app.loader.import_default_modules()\n"
        "backend_for('m', {'m': BackendSpec(backend='mock')}).generate([Generation('m', 'p')])\n"
        f"print(sorted(m for m in {OPERATOR_MODULES!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
    env["BLF_CONFIG_PATH"] = str(config)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_control_worker_refuses_orders_not_from_the_control_machine(
    services: Services, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    broker = shared_redis.urls.celery
    node = make_node(services.network.icl.url, models=MODEL)
    # No beat: its own sweep at start must not be mistaken for a callback's.
    worker = control_worker(processes, node, services, broker, beat=False)
    ticket = JobTicket(
        job_id="f" * 64, role="leader", model_id=MODEL, prompt_cid="bafy", deadline=2**40
    )
    # What a GPU host sharing the Redis could send: unsigned, or with a made-up continuation.
    send_tasks(
        node,
        broker,
        "blf.tasks.jobs.start_job",
        kwargs={"ticket": ticket.model_dump()},
        signed=False,
    )
    send_tasks(
        node,
        broker,
        "blf.tasks.finish.finish_job",
        kwargs={"continuation": "0" * 64, "outcome": {"ok": False, "job_id": "x", "reason": "x"}},
        signed=False,
    )
    # Celery would publish a callback from the control worker itself, signed: a message
    # that brings one is refused, with the proof or without, and its callback never runs.
    # (The sweep is the callback here because its effect can be seen in the journal.)
    journal = Journal(
        redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True), node.address
    )
    journal.record("d" * 64, "inference", deadline=int(time.time()) - 3600)
    for signed in (False, True):
        send_tasks(
            node,
            broker,
            "blf.tasks.loops.icl_heartbeat",
            signed=signed,
            link="blf.tasks.loops.sweep_jobs",
        )
    worker.wait_for(r"Refused blf\.tasks\.jobs\.start_job .*not from the control machine")
    worker.wait_for(r"Refused blf\.tasks\.loops\.icl_heartbeat .*carries callbacks", count=2)
    worker.wait_for(r"Refused blf\.tasks\.finish\.finish_job .*unknown or expired continuation")
    assert "Job ffffffff...: starting" not in worker.output()
    # The same order, signed with the node's control key, is taken.
    send_tasks(node, broker, "blf.tasks.jobs.start_job", kwargs={"ticket": ticket.model_dump()})
    worker.wait_for(r"Job ffffffff\.\.\.: claim failed")  # sent after the refused ones
    assert journal.get("d" * 64)["state"] == "inference"  # no sweep ran as a callback


def test_the_sweeper_fails_jobs_left_unanswered_past_their_deadline(
    services: Services, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    broker = shared_redis.urls.celery
    node = make_node(services.network.icl.url, models=MODEL)
    worker = control_worker(processes, node, services, broker)
    journal = Journal(
        redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True), node.address
    )
    journal.record("a" * 64, "inference", deadline=int(time.time()) - 3600)  # order lost
    journal.record("b" * 64, "inference", deadline=int(time.time()) + 3600)  # still in time
    journal.record("c" * 64, "submitted", deadline=int(time.time()) - 3600)  # done
    send_tasks(node, broker, "blf.tasks.loops.sweep_jobs")
    worker.wait_for(r"Job aaaaaaaa\.\.\.: failed: no answer before the deadline")
    assert journal.get("a" * 64)["state"] == "failed"
    assert journal.get("b" * 64)["state"] == "inference"
    assert journal.get("c" * 64)["state"] == "submitted"


def test_a_model_without_backend_or_a_leader_without_upload_target_fails_the_job_once(
    services: Services, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    """Permanent failures on the GPU side reach the control side as a recorded reason;
    nothing is submitted and nothing is invented (no fallback model, no made-up CID)."""
    broker = shared_redis.urls.celery
    models = f"{MODEL},unserved"
    leader, *verifiers = (make_node(services.network.icl.url, models=models) for _ in range(3))
    # The GPU worker does not offer "unserved" for claims; claim anyway, as a control
    # machine whose GPU machines were configured differently would.
    control_worker(processes, leader, services, broker, requires_worker=False)
    gpu = GpuMachine(leader, services, broker)
    gpu.env.update(BLF_SUPPORTED_MODEL_IDS=models)
    del gpu.env["BLF_IPFS_API_URL"]  # downloads through the gateway; nowhere to upload
    gpu.start()
    journal = Journal(
        redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True), leader.address
    )
    quorum = [leader.address, *(v.address for v in verifiers)]
    reasons = {}
    for model in ("unserved", MODEL):
        key = crypto.new_key()
        job_id = services.user.submit_blob(
            crypto.encrypt_blob(key, b"Say nothing."), key, model, quorum=quorum
        )
        record = wait_until(
            lambda j=job_id: (r := journal.get(j)).get("state") == "failed" and r,
            what=f"the {model} job to fail",
        )
        reasons[model] = record["reason"]
        assert services.network.icl.state.job_record(job_id)["resultPosts"] == 0
    assert "no backend configured for model 'unserved'" in reasons["unserved"]
    assert "no IPFS upload target" in reasons[MODEL]


def test_a_job_no_live_worker_can_serve_is_not_claimed_until_one_is(
    services: Services, processes: Processes, shared_redis: EmbeddedRedis
) -> None:
    broker = shared_redis.urls.celery
    leader, *verifiers = (make_node(services.network.icl.url, models=MODEL) for _ in range(3))
    worker = control_worker(processes, leader, services, broker)
    key = crypto.new_key()
    quorum = [leader.address, *(v.address for v in verifiers)]
    job_id = services.user.submit_blob(
        crypto.encrypt_blob(key, b"Anyone there?"), key, MODEL, quorum=quorum
    )
    worker.wait_for(rf"Job {job_id[:8]}\.\.\.: not claimed: no live worker serves model {MODEL}")
    assert services.network.icl.state.job_record(job_id)["claims"][leader.address] == 0
    GpuMachine(leader, services, broker).start()
    record = wait_until(
        lambda: (r := services.network.icl.state.job_record(job_id))["result"] and r,
        what="the job, claimed once a worker serves its model",
    )
    assert record["claims"][leader.address] == 1 and record["resultPosts"] == 1


def test_one_gpu_worker_per_gpu_each_pinned_and_they_stop_together(
    services: Services, shared_redis: EmbeddedRedis
) -> None:
    node = make_node(services.network.icl.url, models=MODEL, attest=False)
    gpu = GpuMachine(node, services, shared_redis.urls.celery)
    parent = gpu.start("--gpus", "2", workers=2)
    client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    workers = wait_until(lambda: len(w := live_workers(client, node.address, MODEL)) == 2 and w)
    assert sorted(workers.values()) == [1, 1]  # each has its one slot free
    pinned = sorted(
        line.split(b"=", 1)[1]
        for pid in _children_of(parent.pid)
        for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if line.startswith(b"CUDA_VISIBLE_DEVICES=")
    )
    assert pinned == [b"0", b"1"]
    for pid in _children_of(parent.pid):  # numbered as nvidia-smi and NVML number them
        assert b"CUDA_DEVICE_ORDER=PCI_BUS_ID" in Path(f"/proc/{pid}/environ").read_bytes()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(60) == 0
    assert live_workers(client, node.address, MODEL) == {}  # both withdrew as they stopped


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
