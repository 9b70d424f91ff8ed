"""The IPFS client and the devnet IPFS service against a real IPFS implementation (js-ipfs).

Opt-in: set ``BLF_REAL_IPFS_DIR`` to a directory where ``scripts/real-ipfs/package.json``
was installed with ``npm install`` (see scripts/real-ipfs/README.md). Each test module run
starts one offline daemon on free loopback ports, in a fresh repository, and stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from blf import cid
from blf.devnet.ipfs import DevnetIpfs
from blf.errors import IpfsTransportError
from blf.ipfs import MAX_BLOB, IpfsClient
from tests.nodes import closed_port_url, short_tempdir, wait_until

# Read at import: the autouse fixture in conftest.py clears BLF_* before each test runs.
REAL_IPFS_DIR = os.environ.get("BLF_REAL_IPFS_DIR", "")
START = Path(__file__).resolve().parent.parent / "scripts" / "real-ipfs" / "start.sh"
HELLO = b"hello blindference"


def _skip_reason() -> str | None:
    if not REAL_IPFS_DIR:
        return "opt-in: set BLF_REAL_IPFS_DIR to an npm install of scripts/real-ipfs"
    if not (Path(REAL_IPFS_DIR) / "node_modules" / "ipfs" / "src" / "cli.js").is_file():
        return f"BLF_REAL_IPFS_DIR={REAL_IPFS_DIR} has no node_modules/ipfs (run npm install)"
    if shutil.which("node") is None:
        return "node is not on PATH"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@dataclass
class RealIpfs:
    api_url: str
    gateway_url: str


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def real_ipfs() -> Iterator[RealIpfs]:
    workdir = short_tempdir()
    api, gateway, rpc = (closed_port_url() for _ in range(3))
    log_path = workdir / "daemon.log"
    command = [str(START), REAL_IPFS_DIR, str(workdir / "repo"), _port(api), _port(gateway)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, _port(rpc)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"js-ipfs exited: {log_path.read_text()[-2000:]}")
            return "Daemon is ready" in log_path.read_text(errors="replace")

        wait_until(ready, timeout=60, what="js-ipfs daemon ready")
        yield RealIpfs(api_url=api, gateway_url=gateway)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


def _add(url: str, data: bytes, **params: str) -> str:
    files = {"file": ("blob", data, "application/octet-stream")}  # js-ipfs wants the type
    answer = requests.post(f"{url}/api/v0/add", params=params, files=files, timeout=30)
    answer.raise_for_status()
    return str(json.loads(answer.text.splitlines()[-1])["Hash"])


def test_add_and_cat_round_trip(real_ipfs: RealIpfs) -> None:
    with IpfsClient(api_url=real_ipfs.api_url, gateways=[], timeout=10) as kubo:
        assert kubo.add(HELLO) == "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"
        assert kubo.cat(cid.cid_v1_raw(HELLO)) == HELLO
    with IpfsClient(api_url=None, gateways=[real_ipfs.gateway_url], timeout=10) as gateway:
        assert gateway.cat(cid.cid_v1_raw(HELLO)) == HELLO


def test_a_full_block_stays_one_raw_block(real_ipfs: RealIpfs) -> None:
    # Past the default 256 KiB chunk: the client's chunker keeps it a single raw block.
    blob = os.urandom(MAX_BLOB)
    with IpfsClient(api_url=real_ipfs.api_url, gateways=[real_ipfs.gateway_url]) as client:
        assert client.add(blob) == cid.cid_v1_raw(blob)
        assert client.cat(cid.cid_v1_raw(blob)) == blob


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, cid.CHUNK_SIZE])
def test_local_cids_equal_the_real_ones(real_ipfs: RealIpfs, size: int) -> None:
    data = bytes([size % 251]) * size
    assert _add(real_ipfs.api_url, data) == cid.cid_v0(data)
    v1_dag_pb = {"cid-version": "1", "raw-leaves": "false", "cid-base": "base32"}
    assert _add(real_ipfs.api_url, data, **v1_dag_pb) == cid.cid_v1_dag_pb(data)
    v1_raw = {"cid-version": "1", "cid-base": "base32"}
    assert _add(real_ipfs.api_url, data, **v1_raw) == cid.cid_v1_raw(data)


@pytest.mark.parametrize(
    "params",
    [{}, {"cid-version": "1", "cid-base": "base32"}, {"cid-version": "1", "raw-leaves": "false"}],
)
def test_the_devnet_answers_the_same_cids(real_ipfs: RealIpfs, params: dict[str, str]) -> None:
    with DevnetIpfs() as devnet:
        for data in (HELLO, b"", os.urandom(cid.CHUNK_SIZE)):
            assert cid.parse(_add(devnet.url, data, **params)) == cid.parse(
                _add(real_ipfs.api_url, data, **params)
            )


def test_a_missing_cid_is_transient(real_ipfs: RealIpfs) -> None:
    missing = cid.cid_v1_raw(b"never added " + os.urandom(8))
    reader = IpfsClient(api_url=real_ipfs.api_url, gateways=[real_ipfs.gateway_url], timeout=2)
    with pytest.raises(IpfsTransportError):
        reader.cat(missing)
