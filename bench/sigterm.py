"""SIGTERM at random moments of `blindference-node run`'s start: how many runs exit 0.

Starts a devnet ICL in-process and makes one attested node, times one full start (spawn
to the first assignment poll), then N times (default 20; ``N=50``): spawns `run`, waits a
random moment between 0 and 1.2 x that start time, sends SIGTERM, and records the exit
status and how far the start had got (the last start line in its log). Prints the counts
per status and per stage; ``SEED`` makes the moments repeatable.

Run with `.venv/bin/python bench/sigterm.py`. A SIGTERM that lands while the interpreter
itself is still starting, or importing the CLI, lands before `run` can install a handler:
it shows as 143 in the "no handler yet" stage.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blf.devnet.icl import DevnetIcl
from tests.nodes import NodeDir, NodeProcess, devnet_node, make_node, node_pids, wait_until

ROUNDS = int(os.environ.get("N", "20"))
SEED = int(os.environ.get("SEED", str(time.time_ns() % 10_000)))
# Start lines in the order `run` logs them; the last one seen names the stage.
STAGES = (
    ("Embedded Redis on", "broker up"),
    ("Daemon starting", "announced"),
    ("Heartbeat sent to ICL", "first heartbeat"),
    (r"control\..* ready", "control worker ready"),
)


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (its SigCgt mask, /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def stage_of(run: NodeProcess) -> str:
    """How far the start had got: no handler yet, then the last start line logged."""
    if not catches_sigterm(run.process.pid):
        return "no handler yet"
    reached = "handler installed"
    for pattern, name in STAGES:
        if run.lines(pattern):
            reached = name
    return reached


def settle(node: NodeDir) -> None:
    """Nothing of the last run may remain: the next one would find run.lock held."""
    wait_until(lambda: not node_pids(node.root), timeout=60, what="node processes to end")
    wait_until(lambda: not (node.root / "redis.sock").exists(), timeout=60, what="Redis")


def full_start(devnet: DevnetIcl, node: NodeDir) -> float:
    started = time.monotonic()
    run = NodeProcess(node, "run")
    try:
        wait_until(
            lambda: devnet_node(devnet.url, node.address).get("polls"), timeout=120, interval=0.01
        )
        return time.monotonic() - started
    finally:
        run.signal(signal.SIGTERM)
        run.wait(120)
        run.close()
        settle(node)


def one_round(node: NodeDir, delay: float) -> tuple[int, str]:
    run = NodeProcess(node, "run")
    try:
        time.sleep(delay)
        stage = stage_of(run)  # just before the signal: where it lands
        run.signal(signal.SIGTERM)
        return run.wait(120), stage
    finally:
        run.close()
        settle(node)


def main() -> None:
    for name in [n for n in os.environ if n.startswith("BLF_")]:
        del os.environ[name]
    rng = random.Random(SEED)
    with DevnetIcl() as devnet:
        node = make_node(devnet.url)
        try:
            up = full_start(devnet, node)
            print(f"full start (spawn -> first poll): {up:.2f} s; seed {SEED}")
            results = []
            for index in range(ROUNDS):
                delay = rng.uniform(0, 1.2 * up)
                code, stage = one_round(node, delay)
                results.append((code, stage))
                print(f"  {index + 1:3}: SIGTERM at {delay:5.2f} s ({stage:20}) -> exit {code}")
        finally:
            shutil.rmtree(node.root, ignore_errors=True)
    codes = collections.Counter(code for code, _ in results)
    print(
        f"exit 0: {codes.get(0, 0)}/{ROUNDS}, exit 143 (killed by SIGTERM): "
        f"{codes.get(-signal.SIGTERM, 0) + codes.get(143, 0)}/{ROUNDS}, other: "
        f"{sum(n for c, n in codes.items() if c not in (0, 143, -signal.SIGTERM))}/{ROUNDS}"
    )
    by_stage = collections.Counter((stage, code) for code, stage in results)
    for (stage, code), count in sorted(by_stage.items()):
        shown = 143 if code == -signal.SIGTERM else code
        print(f"  {stage:20} exit {shown:3}: {count}")


if __name__ == "__main__":
    main()
