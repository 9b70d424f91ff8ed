"""What an idle `blindference-node run` costs on this machine: memory and CPU per process.

Starts a devnet ICL in-process (as bench/startup.py does), makes an attested node serving
one model with the mock backend in a temporary directory, starts `run`, waits for its
first assignment poll and then ``SETTLE_S`` more seconds, and measures its whole process
tree (`run` itself, which hosts the control worker, beat and the metrics endpoint in
threads; the inference worker and anything it started; the embedded redis-server):

  * RSS per process (``VmRSS`` in /proc/<pid>/status) and their sum, which counts pages
    shared between processes once per process (the figure the issue quotes); PSS
    (/proc/<pid>/smaps_rollup, shared pages divided among their users) alongside;
  * idle CPU, in % of one core, over ``WINDOW_S`` seconds, from the CPU time of every
    thread (/proc/<pid>/task/*/schedstat, in ns), per process and in total, and how often
    each process woke up (context switches, /proc/<pid>/task/*/status). The devnet ICL
    runs in this process, so its own work is not counted.

Run with `.venv/bin/python bench/tree.py` (``SETTLE_S=10 WINDOW_S=30`` by default; a
longer window evens out the 5 s poll). ``REDIS_HZ=1`` is a what-if: it sets the embedded
Redis's ``hz`` (10 by default) before measuring. Linux only: it reads /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blf.devnet.icl import DevnetIcl
from tests.nodes import NodeProcess, devnet_node, make_node, wait_until

SETTLE_S = float(os.environ.get("SETTLE_S", "10"))
WINDOW_S = float(os.environ.get("WINDOW_S", "30"))
REDIS_HZ = os.environ.get("REDIS_HZ", "")
TARGET_RSS_MIB = 200.0
TARGET_CPU_PERCENT = 0.5

# Figures quoted in the issue, for comparison with what this run measures.
BEFORE = "before (issue): tree RSS about 413 MiB, idle CPU 0.95 % of one core"
PUBLIC = "public node:    71 MiB RSS, 0.17 % CPU"
TARGET = (
    f"target:         tree RSS under {TARGET_RSS_MIB:.0f} MiB, "
    f"idle CPU under {TARGET_CPU_PERCENT} %"
)


@dataclass
class Proc:
    pid: int
    ppid: int
    role: str


@dataclass
class Row:
    proc: Proc
    rss_mib: float
    pss_mib: float
    cpu_percent: float
    wakeups: float  # per second
    threads: int


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def _cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads: nanoseconds from /proc/<pid>/task/*/schedstat
    (utime+stime in /proc/<pid>/stat count 10 ms ticks, too coarse for an idle process)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def _field(pid: int, path: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _switches(pid: int) -> int:
    """Context switches over all threads: how often the process woke up."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += _field(pid, f"task/{task}/status", "voluntary_ctxt_switches")
            total += _field(pid, f"task/{task}/status", "nonvoluntary_ctxt_switches")
    return total


def _role(pid: int, parent_role: str | None) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    line = " ".join(a.decode(errors="replace") for a in argv if a)
    if "redis-server" in line:
        return "redis-server"
    if "workers.gpu" in line:
        return "inference worker"
    if "--role control" in line or "--role=control" in line:
        return "control worker"
    if " beat" in line or "blf.scheduler" in line:
        return "beat"
    if " metrics" in line:
        return "metrics"
    if " run" in line and parent_role is None:
        return "run (control side)"
    return f"child of {parent_role}" if parent_role else line[:40]


def tree(root: int) -> list[Proc]:
    """``root`` and its descendants (children run in sessions of their own, but their
    parent is still the supervisor)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
            except (OSError, ValueError):
                continue
    found = [Proc(root, parents.get(root, 0), _role(root, None))]
    index = 0
    while index < len(found):
        current = found[index]
        for pid, ppid in sorted(parents.items()):
            if ppid == current.pid:
                found.append(Proc(pid, ppid, _role(pid, current.role)))
        index += 1
    return found


def measure(root: int) -> None:
    procs = tree(root)
    start = {p.pid: _cpu_seconds(p.pid) for p in procs}
    woken = {p.pid: _switches(p.pid) for p in procs}
    began = time.monotonic()
    time.sleep(WINDOW_S)  # the measured idle window (a benchmark, not a synchronisation)
    elapsed = time.monotonic() - began
    after = tree(root)
    if {p.pid for p in after} != set(start):
        print("note: the process set changed during the window", file=sys.stderr)
    rows = []
    for proc in procs:
        try:
            rows.append(
                Row(
                    proc,
                    rss_mib=_field(proc.pid, "status", "VmRSS") / 1024,
                    pss_mib=_field(proc.pid, "smaps_rollup", "Pss") / 1024,
                    cpu_percent=100.0 * (_cpu_seconds(proc.pid) - start[proc.pid]) / elapsed,
                    wakeups=(_switches(proc.pid) - woken[proc.pid]) / elapsed,
                    threads=_threads(proc.pid),
                )
            )
        except OSError:
            continue  # it exited
    print(
        f"{'process':18} {'pid':>7} {'RSS MiB':>8} {'PSS MiB':>8} {'CPU %':>6} "
        f"{'wakeups/s':>9} {'threads':>7}"
    )
    for r in rows:
        print(
            f"{r.proc.role:18} {r.proc.pid:7} {r.rss_mib:8.1f} {r.pss_mib:8.1f} "
            f"{r.cpu_percent:6.2f} {r.wakeups:9.1f} {r.threads:7}"
        )
    rss = sum(r.rss_mib for r in rows)
    cpu = sum(r.cpu_percent for r in rows)
    print(
        f"{'total':18} {len(rows):7} {rss:8.1f} {sum(r.pss_mib for r in rows):8.1f} "
        f"{cpu:6.2f} {sum(r.wakeups for r in rows):9.1f}"
    )
    print(f"(CPU over {elapsed:.0f} s idle, {SETTLE_S:.0f} s after the first poll)")
    met = {True: "met", False: "not met"}
    print(
        f"target: RSS {met[rss < TARGET_RSS_MIB]} ({rss:.0f} MiB), "
        f"CPU {met[cpu < TARGET_CPU_PERCENT]} ({cpu:.2f} %)"
    )


def _set_redis_hz(socket: Path, hz: str) -> None:
    import redis

    client = redis.Redis(unix_socket_path=str(socket))
    try:
        client.config_set("hz", hz)
    finally:
        client.close()
    print(f"what-if: the embedded Redis runs with hz {hz} (CONFIG SET)")


def main() -> None:
    print(BEFORE)
    print(PUBLIC)
    print(TARGET)
    for name in [n for n in os.environ if n.startswith("BLF_")]:
        del os.environ[name]
    with DevnetIcl() as devnet:
        node = make_node(devnet.url, model_backends={"test-model": "mock"})
        run = NodeProcess(node, "run")
        try:
            wait_until(
                lambda: devnet_node(devnet.url, node.address).get("polls"),
                timeout=120,
                what="the first assignment poll",
            )
            time.sleep(SETTLE_S)  # let start-up work (imports, first runs) finish
            if REDIS_HZ:
                _set_redis_hz(node.root / "redis.sock", REDIS_HZ)
            measure(run.process.pid)
            run.signal(signal.SIGTERM)
            run.wait(120)
        finally:
            run.close()
            shutil.rmtree(node.root, ignore_errors=True)


if __name__ == "__main__":
    main()
