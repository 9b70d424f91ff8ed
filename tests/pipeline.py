"""Helpers for the job pipeline's end-to-end tests: a local network, gates that hold a
request at a devnet service until the test lets it go, and readers of a node's Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI
from starlette.requests import Request

from blf.devnet.network import LocalNetwork, LocalNode
from blf.journal import Journal
from tests.nodes import short_tempdir, wait_until

FAST = {"BLF_POLL_INTERVAL_S": "0.5", "BLF_HEARTBEAT_INTERVAL_S": "5"}


class Gate:
    """Holds requests to ``path`` that ``select`` picks (none until a test sets it) until
    ``release`` is set; ``arrivals`` counts those held, ``limit`` caps how many."""

    def __init__(
        self, app: FastAPI, path: str, *, limit: int = 1_000_000, after: bool = False
    ) -> None:
        """``after=True`` lets the service handle the request and holds only its answer."""
        self.arrivals = 0
        self.limit = limit
        self.release = threading.Event()
        self.select: Callable[[Request], bool] = lambda _request: False

        @app.middleware("http")
        async def hold(request: Request, call_next: Callable[[Request], Any]) -> Any:
            held = request.url.path == path and self.arrivals < self.limit and self.select(request)
            if held and not after:
                self.arrivals += 1
                await asyncio.to_thread(self.release.wait, 120)
            response = await call_next(request)
            if held and after:
                self.arrivals += 1
                await asyncio.to_thread(self.release.wait, 120)
            return response

    def hold_from(self, address: str) -> None:
        self.select = lambda request: request.headers.get("X-Node-Address") == address

    def hold_all(self) -> None:
        self.select = lambda _request: True


def start_network(
    nodes: int = 3,
    *,
    node_env: list[dict[str, str]] | None = None,
    before: Callable[[LocalNetwork], None] | None = None,
    **env: str,
) -> LocalNetwork:
    root = short_tempdir()
    network = LocalNetwork(
        root,
        nodes=nodes,
        node_env=node_env or [],
        env={**FAST, **env},
        output=lambda node: (root / f"{node.directory.name}.log").open("wb"),
    )
    try:
        network.start(before=before)
        network.wait_ready()
    except BaseException:
        network.stop()
        raise
    return network


def node_log(network: LocalNetwork, node: LocalNode) -> str:
    return (network.directory / f"{node.directory.name}.log").read_text(errors="replace")


def journal(node: LocalNode) -> Journal:
    client = redis.Redis(unix_socket_path=str(node.directory / "redis.sock"), decode_responses=True)
    return Journal(client, node.address)


def wait_state(node: LocalNode, job_id: str, *states: str, timeout: float = 60) -> dict[str, str]:
    return wait_until(
        lambda: (r := journal(node).get(job_id)).get("state") in states and r,
        timeout=timeout,
        what=f"job {job_id[:8]} in {states} on {node.directory.name}",
    )


def by_address(network: LocalNetwork) -> dict[str, LocalNode]:
    return {n.address: n for n in network.members}


# --- what a node left in Redis ---------------------------------------------------------------

_BODY = re.compile(rb'"body": ?"([A-Za-z0-9+/=]{8,})"')


def _decoded(text: bytes) -> Iterator[bytes]:
    """The bytes, and every base64 message body inside them (kombu encodes bodies)."""
    yield text
    for match in _BODY.finditer(text):
        try:
            yield base64.b64decode(match.group(1))
        except ValueError:
            continue


def redis_contents(node: LocalNode) -> list[bytes]:
    """Every key and value in the node's Redis, decoded bodies included, plus its AOF."""
    client = redis.Redis(unix_socket_path=str(node.directory / "redis.sock"))
    found: list[bytes] = []
    for key in client.scan_iter(count=1000):
        found.append(key)
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"list":
            values = list(client.lrange(key, 0, -1))
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            values = []
        for value in values:
            found.extend(_decoded(value))
    for aof in node.directory.glob("**/*.aof*"):
        if aof.is_file():
            found.extend(_decoded(aof.read_bytes()))
    return found


def secrets_found(contents: list[bytes], secrets: dict[str, bytes]) -> list[str]:
    return [name for name, secret in secrets.items() if any(secret in c for c in contents)]


def job_record(network: LocalNetwork, job_id: str) -> dict[str, Any]:
    return network.icl.state.job_record(job_id)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))
