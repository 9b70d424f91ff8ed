"""An ICL outage in the log: its first failure, a summary at most once a minute, its end.

The loop functions run here directly, in this process, against a devnet ICL that answers
500 while it is "down" and a real Redis; a settable clock stands in for the minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from blf import runtime
from blf.app import app
from blf.broker import EmbeddedRedis
from blf.chain import HeartbeatOutcome, TxResult
from blf.config import load_config
from blf.devnet.icl import DevnetIcl
from blf.icl import NO_RETRY
from blf.names import node_key
from blf.node import Node, open_node
from blf.tasks import loops
from tests.nodes import PASSWORD, make_node


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """What blf.loops logs, as (level, message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_lines:
            self.records.append((record.levelname, record.getMessage()))

    def outage(self) -> list[tuple[str, str]]:
        """The outage's lines only (not "No assignments ...", "Heartbeat sent ...")."""
        markers = ("failed:", "unreachable for", "reachable again")
        return [r for r in self.records if any(m in r[1] for m in markers)]

    def new(self, since: int) -> list[tuple[str, str]]:
        return self.outage()[since:]


@dataclass
class Loops:
    node: Node
    client: redis.Redis
    clock: Clock
    lines: Lines
    down: threading.Event


@pytest.fixture
def ready(monkeypatch: pytest.MonkeyPatch, shared_redis: EmbeddedRedis) -> Iterator[Loops]:
    devnet = DevnetIcl()
    down = threading.Event()

    @devnet.app.middleware("http")
    async def outage(request: Request, call_next: Callable[[Request], Any]) -> Any:
        if down.is_set() and request.url.path.startswith("/internal"):
            return PlainTextResponse("ICL down for the test", status_code=500)
        return await call_next(request)

    with devnet:
        made = make_node(devnet.url, rpc_url="http://127.0.0.1:9")
        node = open_node(load_config(made.config_path), password=PASSWORD)
        client = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
        icl = node.icl(retry=NO_RETRY)  # one request per call: the loops' own policy
        monkeypatch.setattr(runtime, "node", lambda: node)
        monkeypatch.setattr(runtime, "icl", lambda: icl)
        monkeypatch.setattr(runtime, "redis_client", lambda: client)
        monkeypatch.setitem(app.conf, "blf_address", node.address)
        monkeypatch.setattr(loops, "_stopping", threading.Event())
        clock = Clock()
        for outage_log in (loops.POLL_OUTAGE, loops.HEARTBEAT_OUTAGE):
            monkeypatch.setattr(outage_log, "clock", clock)
        lines = Lines()
        logger = logging.getLogger("blf.loops")
        logger.addHandler(lines)
        monkeypatch.setattr(logger, "level", logging.DEBUG)
        try:
            yield Loops(node, client, clock, lines, down)
        finally:
            logger.removeHandler(lines)
            icl.close()
            client.close()


def test_a_poll_outage_logs_its_start_a_summary_a_minute_and_its_end(ready: Loops) -> None:
    start = ready.clock.now
    ready.down.set()
    loops.poll_assignments()
    [(level, first)] = ready.lines.outage()
    assert level == "WARNING"
    assert first.startswith("Assignment poll failed: ")

    for tick in range(1, 12):  # every 5 s, up to 55 s in: nothing more
        ready.clock.now = start + 5 * tick
        loops.poll_assignments()
    assert ready.lines.new(1) == []

    ready.clock.now = start + 60
    loops.poll_assignments()
    [(level, summary)] = ready.lines.new(1)
    assert level == "WARNING"
    assert summary.startswith("ICL unreachable for 1m: 13 polls failed, last: ")

    for tick in range(13, 24):  # the next minute: quiet again
        ready.clock.now = start + 5 * tick
        loops.poll_assignments()
    assert ready.lines.new(2) == []
    ready.clock.now = start + 120
    loops.poll_assignments()
    [(_, summary)] = ready.lines.new(2)
    assert summary.startswith("ICL unreachable for 2m: 25 polls failed, last: ")

    ready.down.clear()
    ready.clock.now = start + 125
    loops.poll_assignments()
    assert ready.lines.new(3) == [("INFO", "ICL reachable again after 2m (25 polls failed)")]
    loops.poll_assignments()
    assert ready.lines.new(4) == []


def test_heartbeat_threads_and_processes_share_one_outage(ready: Loops) -> None:
    start = ready.clock.now
    ready.down.set()
    with ThreadPoolExecutor(max_workers=8) as pool:  # the control worker's pool, racing
        for done in [pool.submit(loops.icl_heartbeat) for _ in range(8)]:
            done.result()
    [(level, first)] = ready.lines.outage()
    assert level == "WARNING" and first.startswith("Heartbeat failed: ")

    # Another process of the node keeps no state of its own: it sees the same outage.
    elsewhere = loops.OutageLog(
        "heartbeat", first="Heartbeat failed: %s", call="heartbeat", clock=ready.clock
    )
    elsewhere.failed(RuntimeError("connection refused"))
    assert ready.lines.new(1) == []

    ready.clock.now = start + 61
    loops.icl_heartbeat()
    [(_, summary)] = ready.lines.new(1)
    assert summary.startswith("ICL unreachable for 1m: 10 heartbeats failed, last: ")

    ready.down.clear()
    ready.clock.now = start + 245
    elsewhere.succeeded()
    assert ready.lines.new(2) == [("INFO", "ICL reachable again after 4m (10 heartbeats failed)")]
    loops.icl_heartbeat()  # the outage is over: only the usual line
    assert ready.lines.new(3) == []
    assert ("INFO", "Heartbeat sent to ICL") in ready.lines.records


def test_a_single_failure_is_one_line_and_its_end_another(ready: Loops) -> None:
    ready.down.set()
    loops.icl_heartbeat()
    ready.down.clear()
    ready.clock.now += 7
    loops.icl_heartbeat()
    assert [line for _, line in ready.lines.outage()][1:] == [
        "ICL reachable again after 7s (1 heartbeat failed)"
    ]


def _noted(ready: Loops, kind: str) -> float:
    return float(ready.client.get(node_key(ready.node.address, "heartbeat", kind)) or 0)


def _between(before: float, value: float, after: float) -> bool:
    return round(before, 3) <= value <= round(after, 3)  # the note keeps milliseconds


def test_heartbeats_that_land_are_noted_for_the_metrics(
    ready: Loops, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = time.time()
    loops.icl_heartbeat()
    assert _between(before, _noted(ready, "icl"), time.time())

    class Chain:
        outcome = HeartbeatOutcome(status="skipped", seconds_until_due=99, last_heartbeat=1234)

        def heartbeat_if_due(self, **_: Any) -> HeartbeatOutcome:
            return self.outcome

    chain = Chain()
    monkeypatch.setattr(ready.node, "chain", lambda: chain)
    loops.chain_heartbeat()
    assert _noted(ready, "chain") == 1234.0  # not due: the chain's own lastHeartbeat

    tx = TxResult(
        tx_hash="0x" + "ab" * 32, nonce=1, block_number=7, gas_used=1, effective_gas_price=1
    )
    chain.outcome = HeartbeatOutcome(status="sent", tx=tx, last_heartbeat=1234)
    before = time.time()
    loops.chain_heartbeat()
    assert _between(before, _noted(ready, "chain"), time.time())
