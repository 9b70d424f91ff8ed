"""Per-stage times of jobs on a local three-node network (the devnet, mock model).

    .venv/bin/python bench/pipeline.py [--jobs 10] [--poll 1.0]

Prints the p50 (and max) of each stage from the nodes' journals, the time from the poll
that saw a job to its submission (per role), and the user's wait from submission to the
final status. Nothing here is asserted: these are numbers to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import redis

from blf.devnet.network import LocalNetwork
from blf.devnet.user import DevnetInfo, DevnetUser
from blf.journal import STAGES, Journal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--poll", type=float, default=1.0, help="poll_interval_s of the nodes")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="blf-bench-", dir="/tmp"))
    network = LocalNetwork(
        root,
        env={"BLF_POLL_INTERVAL_S": str(args.poll)},
        output=lambda node: (root / f"{node.directory.name}.log").open("wb"),
    )
    started = time.monotonic()
    network.start()
    network.wait_ready()
    print(f"network of 3 nodes ready in {time.monotonic() - started:.1f} s")
    user = DevnetUser(DevnetInfo.read(network.info_path))
    waits, ids = [], []
    for index in range(args.jobs):
        t0 = time.monotonic()
        job_id = user.submit(f"benchmark prompt {index}", "demo-model")
        record = user.wait(job_id, 120)
        waits.append(time.monotonic() - t0)
        ids.append(job_id)
        assert record["status"] == "ACCEPTED", record
    time.sleep(2 * args.poll)  # the second verifier may still be answering
    by_role: dict[str, dict[str, list[float]]] = {"leader": {}, "verifier": {}}
    for node in network.members:
        client = redis.Redis(
            unix_socket_path=str(node.directory / "redis.sock"), decode_responses=True
        )
        journal = Journal(client, node.address)
        for job_id in ids:
            record = journal.get(job_id)
            if record.get("state") != "submitted":
                continue
            for stage in STAGES:
                if stage in record:
                    by_role[record["role"]].setdefault(stage, []).append(float(record[stage]))
    network.stop()
    print(
        f"user: submit -> final status, p50 {statistics.median(waits):.3f} s, "
        f"max {max(waits):.3f} s over {len(waits)} jobs (poll interval {args.poll} s)"
    )
    for role, stages in by_role.items():
        print(f"{role}:")
        for stage in STAGES:
            values = stages.get(stage)
            if values:
                print(
                    f"  {stage.removesuffix('_s'):<12} "
                    f"p50 {statistics.median(values) * 1000:8.1f} ms"
                    f"   max {max(values) * 1000:8.1f} ms   n={len(values)}"
                )
    print(json.dumps({"root": str(root)}))


if __name__ == "__main__":
    main()
