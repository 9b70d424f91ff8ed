"""How long `blindference-node run` takes to come up and to go down, on this machine.

Starts a devnet ICL in-process, makes an attested node in a temporary directory, then
times, from the moment `run` is spawned:
  * the first heartbeat the devnet records (the supervisor sends it before the workers),
  * the first assignment poll (the control worker and its beat are up),
and, from SIGTERM, the time until `run` has exited (workers drained, final heartbeat,
Redis stopped). Prints one line per measurement; run with `.venv/bin/python bench/startup.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blf.devnet.icl import DevnetIcl
from tests.nodes import NodeProcess, devnet_node, make_node, wait_until

ROUNDS = int(os.environ.get("ROUNDS", "3"))


def one_round(devnet: DevnetIcl) -> tuple[float, float, float]:
    node = make_node(devnet.url)
    try:
        start = time.monotonic()
        run = NodeProcess(node, "run")
        wait_until(lambda: devnet_node(devnet.url, node.address).get("heartbeats"), interval=0.01)
        heartbeat = time.monotonic() - start
        wait_until(lambda: devnet_node(devnet.url, node.address).get("polls"), interval=0.01)
        poll = time.monotonic() - start
        stop = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait(120) == 0, run.output()
        down = time.monotonic() - stop
        run.close()
    finally:
        shutil.rmtree(node.root, ignore_errors=True)
    return heartbeat, poll, down


def main() -> None:
    for name in [n for n in os.environ if n.startswith("BLF_")]:
        del os.environ[name]
    with DevnetIcl() as devnet:
        rounds = [one_round(devnet) for _ in range(ROUNDS)]
    labels = ("start -> first ICL heartbeat", "start -> first assignment poll", "SIGTERM -> exit 0")
    for label, values in zip(labels, zip(*rounds, strict=True), strict=True):
        print(
            f"{label:32} median {statistics.median(values):6.2f} s  (n={len(values)}, "
            f"min {min(values):.2f}, max {max(values):.2f})"
        )


if __name__ == "__main__":
    main()
