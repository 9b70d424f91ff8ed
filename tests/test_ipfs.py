"""The IPFS client against the devnet IPFS service over real HTTP, and the service itself."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from blf import cid
from blf.config import Settings
from blf.devnet.ipfs import DevnetIpfs
from blf.devnet.server import LocalServer
from blf.errors import (
    CidMismatchError,
    IpfsError,
    IpfsTransportError,
    NoUploadTargetError,
    UnverifiableCidError,
)
from blf.ipfs import MAX_BLOB, MAX_DOWNLOAD, IpfsClient
from tests.nodes import closed_port_url

HELLO = b"hello blindference"
HELLO_CID = "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"
JWT = "eyJhbGciOi.devnet-pinata-jwt.signature"
LIES = b"these are not the bytes you are looking for"


@pytest.fixture
def ipfs() -> Iterator[DevnetIpfs]:
    with DevnetIpfs(pinata_jwt=JWT) as service:
        yield service


@pytest.fixture
def other_ipfs() -> Iterator[DevnetIpfs]:
    with DevnetIpfs() as service:
        yield service


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A loopback port that accepts connections and never answers: a hung gateway."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def client(
    api_url: str | None = None,
    gateways: list[str] | None = None,
    *,
    pinata_jwt: str | None = None,
    pinata_api_url: str = "https://api.pinata.invalid",
) -> IpfsClient:
    return IpfsClient(
        api_url=api_url,
        gateways=gateways or [],
        pinata_jwt=pinata_jwt,
        pinata_api_url=pinata_api_url,
        timeout=5.0,
    )


# --- uploads ------------------------------------------------------------------------------


def test_add_then_cat_through_the_kubo_api(ipfs: DevnetIpfs) -> None:
    with client(api_url=ipfs.url) as kubo:
        assert kubo.can_upload and kubo.upload_target == f"kubo {ipfs.url}"
        assert kubo.add(HELLO) == HELLO_CID
        assert kubo.cat(HELLO_CID) == HELLO
    assert ipfs.state.adds[HELLO_CID] == 1
    assert ipfs.state.cats[HELLO_CID] == 1
    assert ipfs.state.blobs() == [{"cid": HELLO_CID, "size": len(HELLO)}]


def test_a_full_block_is_one_raw_cid(ipfs: DevnetIpfs) -> None:
    # Beyond Kubo's default 256 KiB chunk: the client asks for a single 1 MiB chunk.
    blob = bytes(range(256)) * (MAX_BLOB // 256)
    with client(api_url=ipfs.url) as kubo:
        assert kubo.add(blob) == cid.cid_v1_raw(blob)
        assert kubo.cat(cid.cid_v1_raw(blob)) == blob


def test_a_blob_over_one_block_is_refused_before_any_upload(ipfs: DevnetIpfs) -> None:
    with client(api_url=ipfs.url) as kubo, pytest.raises(IpfsError, match="exceed"):
        kubo.add(bytes(MAX_BLOB + 1))
    assert not ipfs.state.adds


def test_pinata_with_the_right_jwt(ipfs: DevnetIpfs) -> None:
    with client(pinata_jwt=JWT, pinata_api_url=ipfs.url) as pinata:
        assert pinata.upload_target == f"pinata {ipfs.url}"
        assert pinata.add(HELLO) == HELLO_CID
    assert ipfs.state.adds[HELLO_CID] == 1
    assert client(gateways=[ipfs.url]).cat(HELLO_CID) == HELLO


def test_pinata_with_a_wrong_jwt_is_refused_without_showing_it(ipfs: DevnetIpfs) -> None:
    wrong = "wrong-jwt-" + "x" * 30
    with client(pinata_jwt=wrong, pinata_api_url=ipfs.url) as pinata:
        assert wrong not in str(pinata.upload_target)
        with pytest.raises(IpfsError, match="401") as caught:
            pinata.add(HELLO)
    assert type(caught.value) is IpfsError  # a refusal: not worth retrying
    assert wrong not in str(caught.value)
    assert not ipfs.state.adds


def test_pinata_refuses_a_file_it_would_chunk(ipfs: DevnetIpfs) -> None:
    # Pinata chunks at 256 KiB: its CID would be a tree's, which blf cannot check.
    with (
        client(pinata_jwt=JWT, pinata_api_url=ipfs.url) as pinata,
        pytest.raises(IpfsError, match="400"),
    ):
        pinata.add(bytes(cid.CHUNK_SIZE + 1))


def test_kubo_is_preferred_over_pinata(ipfs: DevnetIpfs, other_ipfs: DevnetIpfs) -> None:
    with client(api_url=other_ipfs.url, pinata_jwt=JWT, pinata_api_url=ipfs.url) as both:
        assert both.upload_target == f"kubo {other_ipfs.url}"
        both.add(HELLO)
    assert other_ipfs.state.adds[HELLO_CID] == 1 and not ipfs.state.adds


def test_no_upload_target() -> None:
    with client(gateways=["https://gateway.example"]) as reader:
        assert not reader.can_upload and reader.upload_target is None
        with pytest.raises(NoUploadTargetError, match=r"set ipfs_api_url .* or pinata_jwt"):
            reader.add(HELLO)


def _fake_kubo(status: int, body: object) -> LocalServer:
    app = FastAPI()

    @app.post("/api/v0/add")
    def add() -> JSONResponse:
        return JSONResponse(body, status_code=status)

    return LocalServer(app)


def test_an_add_answer_with_another_cid_is_never_returned() -> None:
    answer = {"Name": "blob", "Hash": cid.cid_v0(HELLO), "Size": "26"}
    with _fake_kubo(200, answer) as liar, pytest.raises(IpfsError, match="hash to " + HELLO_CID):
        client(api_url=liar.url).add(HELLO)


def test_an_add_answer_without_a_cid_is_an_error() -> None:
    with _fake_kubo(200, {"Name": "blob"}) as odd, pytest.raises(IpfsError, match="no 'Hash'"):
        client(api_url=odd.url).add(HELLO)


def test_add_failures_transient_and_not() -> None:
    busy_answer = {"Message": "busy", "Code": 0, "Type": "error"}
    with (
        _fake_kubo(503, busy_answer) as busy,
        pytest.raises(IpfsTransportError, match=r"503.*busy"),
    ):
        client(api_url=busy.url).add(HELLO)
    with pytest.raises(IpfsTransportError, match="unreachable"):
        client(api_url=closed_port_url()).add(HELLO)


# --- downloads ----------------------------------------------------------------------------


def test_cat_through_a_gateway_only(ipfs: DevnetIpfs) -> None:
    blob_cid = ipfs.state.put(HELLO)
    with client(gateways=[ipfs.url + "/ipfs/"]) as reader:
        assert reader.sources == [f"gateway {ipfs.url}"]
        assert reader.cat(blob_cid) == HELLO
    assert ipfs.state.cats[blob_cid] == 1


def test_cat_of_a_cidv0(ipfs: DevnetIpfs) -> None:
    v0 = ipfs.state.put(HELLO, cid_version=0)
    assert v0 == cid.cid_v0(HELLO)
    assert client(api_url=ipfs.url).cat(v0) == HELLO


def test_kubo_without_the_blob_falls_back_to_a_gateway(
    ipfs: DevnetIpfs, other_ipfs: DevnetIpfs
) -> None:
    other_ipfs.state.put(HELLO)
    with client(api_url=ipfs.url, gateways=[other_ipfs.url]) as reader:
        assert reader.cat(HELLO_CID) == HELLO
    assert ipfs.state.cats[HELLO_CID] == 1


def test_a_lying_gateway_is_skipped_for_the_next(
    ipfs: DevnetIpfs, other_ipfs: DevnetIpfs, caplog: pytest.LogCaptureFixture
) -> None:
    for service in (ipfs, other_ipfs):
        service.state.put(HELLO)
    ipfs.state.tamper(HELLO_CID, LIES)
    caplog.set_level(logging.DEBUG, logger="blf.ipfs")
    with client(gateways=[ipfs.url, other_ipfs.url]) as reader:
        assert reader.cat(HELLO_CID) == HELLO
    assert ipfs.state.cats[HELLO_CID] == 1 and other_ipfs.state.cats[HELLO_CID] == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"gateway {ipfs.url}" in warnings[0].getMessage()
    assert LIES.decode() not in caplog.text and HELLO.decode() not in caplog.text


def test_only_lying_sources_is_a_permanent_mismatch(
    ipfs: DevnetIpfs, other_ipfs: DevnetIpfs
) -> None:
    ipfs.state.tamper(HELLO_CID, LIES)
    other_ipfs.state.tamper(HELLO_CID, HELLO + b"\n")
    with pytest.raises(CidMismatchError) as caught:
        client(api_url=ipfs.url, gateways=[other_ipfs.url]).cat(HELLO_CID)
    message = str(caught.value)
    assert f"kubo {ipfs.url}" in message and f"gateway {other_ipfs.url}" in message
    assert "\n" not in message


def test_unreachable_sources_only_is_transient() -> None:
    api, gateway = closed_port_url(), closed_port_url()
    with pytest.raises(IpfsTransportError) as caught:
        client(api_url=api, gateways=[gateway]).cat(HELLO_CID)
    message = str(caught.value)
    assert f"kubo {api}: unreachable" in message and f"gateway {gateway}: unreachable" in message
    assert "\n" not in message


def test_a_lie_and_an_unreachable_source_is_transient(ipfs: DevnetIpfs) -> None:
    # The unreachable one may yet serve the real bytes: worth retrying.
    ipfs.state.tamper(HELLO_CID, LIES)
    with pytest.raises(IpfsTransportError, match="bytes do not hash"):
        client(gateways=[ipfs.url, closed_port_url()]).cat(HELLO_CID)


def test_not_found_everywhere_is_transient(ipfs: DevnetIpfs) -> None:
    with pytest.raises(IpfsTransportError, match=r"HTTP 500.*not found.*HTTP 404"):
        client(api_url=ipfs.url, gateways=[ipfs.url]).cat(HELLO_CID)


def test_a_hung_gateway_times_out_and_the_next_serves(ipfs: DevnetIpfs, silent_url: str) -> None:
    ipfs.state.put(HELLO)
    reader = IpfsClient(api_url=None, gateways=[silent_url, ipfs.url], timeout=0.3)
    assert reader.cat(HELLO_CID) == HELLO
    with pytest.raises(IpfsTransportError, match=r"timed out \(\w*Timeout\)"):
        IpfsClient(api_url=None, gateways=[silent_url], timeout=0.3).cat(HELLO_CID)


def test_an_oversized_answer_is_cut_off(ipfs: DevnetIpfs, other_ipfs: DevnetIpfs) -> None:
    ipfs.state.tamper(HELLO_CID, bytes(MAX_DOWNLOAD + 1))
    other_ipfs.state.put(HELLO)
    assert client(gateways=[ipfs.url, other_ipfs.url]).cat(HELLO_CID) == HELLO
    with pytest.raises(IpfsError, match="cap") as caught:
        client(gateways=[ipfs.url]).cat(HELLO_CID)
    assert not isinstance(caught.value, IpfsTransportError)


def test_an_endless_answer_without_a_length_is_cut_off() -> None:
    app = FastAPI()

    @app.get("/ipfs/{cid}")
    def endless(cid: str) -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            for _ in range(64):  # 4 MiB, chunked: no Content-Length to refuse it early
                yield bytes(64 * 1024)

        return StreamingResponse(chunks())

    with LocalServer(app) as flood, pytest.raises(IpfsError, match="cap; cut off"):
        client(gateways=[flood.url]).cat(HELLO_CID)


def test_an_unverifiable_cid_is_refused_before_any_request(ipfs: DevnetIpfs) -> None:
    dag_cbor = "bafyreigbtj4x7ip5legnfznufuopl4sg4knzc2cof6duas4b3q2fy6swua"
    with pytest.raises(UnverifiableCidError, match="dag-cbor"):
        client(api_url=ipfs.url, gateways=[ipfs.url]).cat(dag_cbor)
    assert not ipfs.state.cats


def test_a_gateway_url_with_credentials_is_never_shown() -> None:
    secret = "hunter2-is-my-password"
    gateway = closed_port_url().replace("http://", f"http://user:{secret}@")
    with pytest.raises(IpfsTransportError) as caught:
        client(gateways=[gateway]).cat(HELLO_CID)
    assert secret not in str(caught.value)


def test_concurrent_cats_from_a_thread_pool(ipfs: DevnetIpfs) -> None:
    blobs = [f"blob {i}".encode() for i in range(16)]
    cids = [ipfs.state.put(blob) for blob in blobs]
    with client(api_url=ipfs.url, gateways=[ipfs.url]) as reader, ThreadPoolExecutor(8) as pool:
        assert list(pool.map(reader.cat, cids * 4)) == blobs * 4


def test_from_settings() -> None:
    settings = Settings(
        ipfs_api_url="http://127.0.0.1:5001/",
        ipfs_gateway="https://gw.example/",
        ipfs_gateway_fallbacks="https://fallback.example, https://gw.example",
        pinata_jwt="secret-jwt",
        ipfs_timeout_s=7,
    )
    with IpfsClient.from_settings(settings) as configured:
        assert configured.upload_target == "kubo http://127.0.0.1:5001"
        assert configured.sources == [
            "kubo http://127.0.0.1:5001",
            "gateway https://gw.example",
            "gateway https://fallback.example",
        ]
    pinata_only = IpfsClient.from_settings(Settings(pinata_jwt="secret-jwt"))
    assert pinata_only.upload_target == "pinata https://api.pinata.cloud"
    assert IpfsClient.from_settings(Settings()).upload_target is None


# --- the devnet service itself ------------------------------------------------------------


def _add(url: str, data: bytes, **params: str) -> requests.Response:
    files = {"file": ("prompt.bin", data)}
    return requests.post(f"{url}/api/v0/add", params=params, files=files, timeout=5)


def test_devnet_add_defaults_like_kubo(ipfs: DevnetIpfs) -> None:
    answer = _add(ipfs.url, HELLO).json()
    assert answer["Hash"] == cid.cid_v0(HELLO) and answer["Name"] == "prompt.bin"
    assert int(answer["Size"]) == len(cid.dag_pb_file_node(HELLO))
    assert _add(ipfs.url, HELLO, **{"cid-version": "1"}).json()["Hash"] == HELLO_CID
    dag_pb = _add(ipfs.url, HELLO, **{"cid-version": "1", "raw-leaves": "false"}).json()
    assert dag_pb["Hash"] == cid.cid_v1_dag_pb(HELLO)
    assert ipfs.state.adds[HELLO_CID] == 1


def test_devnet_add_refuses_what_kubo_would_chunk(ipfs: DevnetIpfs) -> None:
    over = bytes(cid.CHUNK_SIZE + 1)
    for params in ({}, {"cid-version": "1"}):
        refused = _add(ipfs.url, over, **params)
        assert refused.status_code == 400
        assert refused.json()["Type"] == "error" and "single-chunk" in refused.json()["Message"]
    chunker = {"cid-version": "1", "chunker": f"size-{cid.MAX_BLOCK}"}
    assert _add(ipfs.url, over, **chunker).json()["Hash"] == cid.cid_v1_raw(over)
    too_big = {"cid-version": "1", "chunker": f"size-{cid.MAX_BLOCK + 1}"}
    assert _add(ipfs.url, over, **too_big).status_code == 400
    assert _add(ipfs.url, HELLO, chunker="rabin").status_code == 400
    assert _add(ipfs.url, HELLO, **{"cid-version": "2"}).status_code == 400
    no_file = requests.post(f"{ipfs.url}/api/v0/add", timeout=5)
    assert no_file.status_code == 400 and no_file.json()["Code"] == 1


def test_devnet_errors_have_kubo_and_gateway_shapes(ipfs: DevnetIpfs) -> None:
    missing = requests.post(f"{ipfs.url}/api/v0/cat", params={"arg": HELLO_CID}, timeout=5)
    assert missing.status_code == 500
    assert missing.json()["Code"] == 0 and missing.json()["Type"] == "error"
    assert requests.get(f"{ipfs.url}/ipfs/{HELLO_CID}", timeout=5).status_code == 404
    assert requests.get(f"{ipfs.url}/nowhere", timeout=5).status_code == 404
    version = requests.post(f"{ipfs.url}/api/v0/version", timeout=5).json()
    assert version["Version"] == "devnet-0.1"


def test_devnet_cat_accepts_an_ipfs_path(ipfs: DevnetIpfs) -> None:
    ipfs.state.put(HELLO)
    answer = requests.post(f"{ipfs.url}/api/v0/cat", params={"arg": f"/ipfs/{HELLO_CID}"})
    assert answer.content == HELLO


def test_devnet_admin_tamper_and_blobs(ipfs: DevnetIpfs) -> None:
    ipfs.state.put(HELLO)
    tampered = requests.post(f"{ipfs.url}/admin/tamper/{HELLO_CID}", data=LIES, timeout=5)
    assert tampered.status_code == 200
    assert requests.get(f"{ipfs.url}/ipfs/{HELLO_CID}", timeout=5).content == LIES
    blobs = requests.get(f"{ipfs.url}/admin/blobs", timeout=5).json()
    assert blobs == {"blobs": [{"cid": HELLO_CID, "size": len(HELLO)}]}
    assert (
        requests.post(f"{ipfs.url}/admin/tamper/nonsense", data=b"", timeout=5).status_code == 400
    )


def test_devnet_pinata(ipfs: DevnetIpfs, other_ipfs: DevnetIpfs) -> None:
    url = f"{ipfs.url}/pinning/pinFileToIPFS"
    files = {"file": ("out.bin", HELLO)}
    auth = {"Authorization": f"Bearer {JWT}"}
    v0 = requests.post(url, files=files, headers=auth, timeout=5).json()
    assert v0["IpfsHash"] == cid.cid_v0(HELLO) and v0["isDuplicate"] is False
    v1 = requests.post(
        url, files=files, data={"pinataOptions": '{"cidVersion":1}'}, headers=auth, timeout=5
    ).json()
    assert v1["IpfsHash"] == HELLO_CID and v1["PinSize"] == len(HELLO) and v1["Timestamp"]
    again = requests.post(url, files=files, headers=auth, timeout=5).json()
    assert again["isDuplicate"] is True
    wrong = requests.post(url, files=files, headers={"Authorization": "Bearer no"}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"]["reason"] == "INVALID_CREDENTIALS"
    assert requests.post(url, files=files, timeout=5).status_code == 401
    # A service started without a JWT refuses every upload.
    disabled = requests.post(f"{other_ipfs.url}/pinning/pinFileToIPFS", files=files, headers=auth)
    assert disabled.status_code == 401


def test_devnet_is_importable_without_the_node() -> None:
    import subprocess
    import sys

    code = (
        "import sys, blf.devnet.ipfs; "
        "bad = [m for m in ('blf.ipfs', 'blf.config', 'blf.node') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
