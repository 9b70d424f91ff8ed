"""The README's first command, as a newcomer runs it: `devnet up` starts a whole local
network; `devnet submit --wait` acts as a user and reads the answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from blf.inference.mock import mock_output
from tests.nodes import short_tempdir, wait_until


def blf(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blf", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_devnet_up_then_submit_wait_json_shows_the_output() -> None:
    root = short_tempdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
    env["PYTHONUNBUFFERED"] = "1"
    log = root / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "blf", "devnet", "up", "--dir", str(root)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: "Devnet ready" in log.read_text() or up.poll() is not None, timeout=120)
        assert up.poll() is None, log.read_text()
        assert "blindference-node devnet submit" in log.read_text()
        assert "https://icl.blindference.xyz" in log.read_text()
        wait_until(lambda: "output, as the user decrypts it: MOCK_OUTPUT_" in log.read_text())

        done = blf(
            "devnet", "submit", "--dir", str(root), "--prompt", "Hi", "--wait", "--json", env=env
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["status"] == "ACCEPTED"
        assert answer["output"] == mock_output("demo-model", "Hi")

        shown = blf("devnet", "show", "--dir", str(root), answer["job_id"], env=env)
        assert shown.returncode == 0, shown.stderr
        assert f"Output   {answer['output']}" in shown.stdout
        wait_until(lambda: f"Job {answer['job_id'][:16]}...: ACCEPTED" in log.read_text())
        heartbeats = [line for line in log.read_text().splitlines() if "Heartbeat sent" in line]
        assert len({line.split("] [")[2] for line in heartbeats}) == 3  # three nodes beat

        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0, log.read_text()[-3000:]
        assert "Devnet stopped" in log.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_submit_without_a_devnet_says_to_start_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
    done = blf("devnet", "submit", "--dir", str(short_tempdir()), "--prompt", "x", env=env)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("Error: ") and "start `blindference-node devnet up` first" in line
