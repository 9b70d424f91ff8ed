"""Jobs on a local three-node network (the devnet, mock model), measured.

    .venv/bin/python bench/pipeline.py [--jobs 10] [--poll 1.0]
    .venv/bin/python bench/pipeline.py --slots 1,2,4 [--burst 12] [--latency 0.2]
    .venv/bin/python bench/pipeline.py --real GGUF [--jobs 4]
    .venv/bin/python bench/pipeline.py --quick        # the burst table for 1 and 2 slots

The first form sends jobs one after another and prints the p50 (and max) of each stage
from the nodes' journals, the time from the poll that saw a job to its submission (per
role), and the user's wait from submission to the final status.

The second sends ``burst`` jobs at once to networks whose GPU workers have 1, 2, 4 slots,
with the mock taking ``latency`` seconds per call whatever the batch size (one batched
forward pass), and prints jobs/s and the p50/p95 of inference and total per slot count:
the pipeline's batching, apart from any model's speed.

The third runs a real model (llama.cpp, a GGUF file) on the same prompts twice: called
directly, and as jobs through the pipeline (each job runs on three nodes: the leader and
two verifiers, here on one machine), and prints both rates and their ratio.

Nothing here is asserted: these are numbers to compare before and after.
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
    parser.add_argument("--slots", default="", help="e.g. 1,2,4: the burst benchmark")
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--real", default="", help="a GGUF file: pipeline vs direct")
    parser.add_argument("--quick", action="store_true", help="a burst table in under 2 min")
    args = parser.parse_args()
    if args.quick:
        args.slots, args.burst, args.latency = "1,2", 12, 0.2
    if args.real:
        real(Path(args.real), args.jobs, args.poll)
        return
    if args.slots:
        print(f"{args.burst} jobs at once, mock at {args.latency}s per batch, poll {args.poll}s")
        for slots in (int(n) for n in args.slots.split(",")):
            burst(slots, args.burst, args.latency, args.poll)
        return
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


def burst(slots: int, jobs: int, latency: float, poll: float) -> None:
    root = Path(tempfile.mkdtemp(prefix="blf-bench-", dir="/tmp"))
    backends = json.dumps({"demo-model": {"backend": "mock", "batch_latency_s": latency}})
    network = LocalNetwork(
        root,
        env={
            "BLF_POLL_INTERVAL_S": str(poll),
            "BLF_INFERENCE_CONCURRENCY": str(slots),
            "BLF_MODEL_BACKENDS": backends,
        },
        output=lambda node: (root / f"{node.directory.name}.log").open("wb"),
    )
    network.start()
    try:
        network.wait_ready()
        time.sleep(1)  # the GPU workers' first capacity word
        user = DevnetUser(DevnetInfo.read(network.info_path))
        started = time.monotonic()
        ids = [user.submit(f"burst prompt {i}", "demo-model") for i in range(jobs)]
        for job_id in ids:
            user.wait(job_id, 300)
        elapsed = time.monotonic() - started
        stages: dict[str, list[float]] = {}
        for node in network.members:
            client = redis.Redis(
                unix_socket_path=str(node.directory / "redis.sock"), decode_responses=True
            )
            for job_id in ids:
                record = Journal(client, node.address).get(job_id)
                if record.get("state") == "submitted":
                    for stage in STAGES:
                        if stage in record:
                            stages.setdefault(stage, []).append(float(record[stage]))
    finally:
        network.stop()
    print(f"{slots} slot(s): {jobs / elapsed:.2f} jobs/s; per stage p50 / p95 (ms):")
    print(
        "   "
        + "  ".join(
            f"{s.removesuffix('_s')} {_pct(stages[s], 50)}/{_pct(stages[s], 95)}"
            for s in STAGES
            if s in stages
        )
    )


def real(gguf: Path, jobs: int, poll: float) -> None:
    from blf.config import BackendSpec
    from blf.inference import Generation, backend_for

    # One thread each: three nodes share this machine, and llama.cpp threads spin-wait, so
    # oversubscribed cores cost far more than their share.
    spec = {"backend": "llama_cpp", "model_path": str(gguf), "max_tokens": 32, "n_threads": 1}
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(jobs)]
    backend = backend_for("real", {"real": BackendSpec(**spec)})  # type: ignore[arg-type]
    backend.generate([Generation("real", "warm up")])
    started = time.monotonic()
    for prompt in prompts:
        backend.generate([Generation("real", prompt)])
    direct_rate = jobs / (time.monotonic() - started)
    del backend
    root = Path(tempfile.mkdtemp(prefix="blf-bench-", dir="/tmp"))
    network = LocalNetwork(
        root,
        model="real",
        env={"BLF_POLL_INTERVAL_S": str(poll), "BLF_MODEL_BACKENDS": json.dumps({"real": spec})},
        output=lambda node: (root / f"{node.directory.name}.log").open("wb"),
    )
    network.start()
    try:
        network.wait_ready()
        user = DevnetUser(DevnetInfo.read(network.info_path))
        user.wait(user.submit("warm up", "real"), 600)  # each node loads the model once
        started = time.monotonic()
        for prompt in prompts:
            record = user.wait(user.submit(prompt, "real"), 600)
            assert record["status"] == "ACCEPTED", record
        pipeline_rate = jobs / (time.monotonic() - started)
    finally:
        network.stop()
    print(f"real model {gguf.name}, {jobs} prompts, 32 tokens max, poll {poll}s")
    print(f"  direct   {direct_rate:6.2f} prompts/s")
    print(f"  pipeline {pipeline_rate:6.2f} jobs/s (three nodes compute each job)")
    print(f"  ratio    {pipeline_rate / direct_rate:6.2f}")


def _pct(values: list[float], percent: int) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, len(ordered) * percent // 100)] * 1000:.0f}"


if __name__ == "__main__":
    main()
