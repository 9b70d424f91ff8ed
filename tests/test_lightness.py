"""Each process of the node imports only what it uses (bench/tree.py measures the cost).

web3 and its stack cost about 20 MiB and 0.3 s a process; eth_account (the operator key's
library) about 10 MiB and 1 s. A fresh interpreter does what each role does at start, and
reports which of them it loaded. tests/test_gpu_role.py checks the GPU side for blf's own
operator-side modules; this checks the libraries, and beat and the control side too.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import beat_schedule
from blf.app import control_queue
from blf.authority import MAC_HEADER, message_mac
from blf.broker import EmbeddedRedis
from blf.config import Settings
from blf.keyfiles import control_key
from tests.nodes import closed_port_url, make_node, wait_until

HEAVY = ("web3", "eth_account", "eth_keyfile", "py_ecc")
ADDRESS = "0x000000000000000000000000000000000000dEaD"

# What `python -m blf.scheduler` and `blindference-node beat` set up before beat runs, then
# beat's own loader step (Celery's would import every task module of the app).
BEAT = """
import beat_schedule
from blf.app import app, configure, settings_with_address
from blf.authority import install_control_key
from blf.config import load_config
import blf.scheduler
configure(settings_with_address(load_config()))
install_control_key(bytes(32))
beat = app.Beat(loglevel="INFO", quiet=True)
beat.init_loader()
assert "blf.tasks.loops.poll_assignments" not in app.tasks
"""

# What `python -m workers.gpu` loads before its worker consumes (see workers.gpu.start).
GPU = """
import workers.gpu
from blf.app import app
from blf.tasks import inference
app.conf.include = ["blf.tasks.inference"]
app.loader.import_default_modules()
app.Worker
from blf.capacity import CapacityPublisher
"""

# The control worker and the supervisor, on a node without rpc_url: no chain call, no web3.
CONTROL = """
import blf.cli
from blf.app import app
app.loader.import_default_modules()
import blf.runtime, blf.supervisor
app.Worker
"""


def imported(tmp_path: Path, code: str) -> list[str]:
    config = tmp_path / "config.json"
    config.write_text(f'{{"node_address": "{ADDRESS}", "broker_url": "redis://127.0.0.1:9/0"}}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
    env["BLF_CONFIG_PATH"] = str(config)
    report = f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    done = subprocess.run(
        [sys.executable, "-c", code + report],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    return list(eval(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(("role", "code"), [("beat", BEAT), ("gpu", GPU)])
def test_beat_and_the_gpu_worker_load_neither_web3_nor_the_key_library(
    tmp_path: Path, role: str, code: str
) -> None:
    assert imported(tmp_path, code) == [], role


def test_the_control_side_loads_web3_only_once_it_talks_to_the_chain(tmp_path: Path) -> None:
    loaded = imported(tmp_path, CONTROL)
    assert "web3" not in loaded
    assert "eth_account" in loaded  # it signs every ICL request: the key is used here
    client = (
        "from blf.chain import ChainClient\n"
        f"ChainClient('http://127.0.0.1:9', chain_id=1, registry_address='{ADDRESS}')\n"
    )
    assert "web3" in imported(tmp_path, CONTROL + client)  # what node.chain() builds


def test_the_beat_entry_point_sends_every_duty_signed(shared_redis: EmbeddedRedis) -> None:
    """`python -m blf.scheduler`, beat without the CLI: what it sends, the control worker
    accepts (the start-up run of each duty, signed with the node's control key)."""
    node = make_node(closed_port_url(), attest=False)
    env = node.process_env(BLF_BROKER_URL=shared_redis.urls.celery)
    log = (node.root / "beat.log").open("wb")
    beat = subprocess.Popen(
        [sys.executable, "-m", "blf.scheduler"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    address = node.address.lower()
    queue = f"blf:{address}:{control_queue(node.address)}"
    try:
        schedule = beat_schedule.build(Settings(node_address=node.address), "q")
        names = {entry["task"] for entry in schedule.values()}
        messages = wait_until(
            lambda: (m := client.lrange(queue, 0, -1)) and len(m) >= len(names) and m,
            what="beat's first run of every duty",
        )
        assert beat.poll() is None, (node.root / "beat.log").read_text()
    finally:
        beat.terminate()
        beat.wait(30)
        client.close()
        log.close()
    key = control_key(node.root / "control.key")
    seen = set()
    for raw in messages:
        message = json.loads(raw)
        headers = message["headers"]
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        mac = message_mac(key, headers["task"], headers["id"], args, kwargs)
        assert headers[MAC_HEADER] == mac
        seen.add(headers["task"])
    assert seen == names
