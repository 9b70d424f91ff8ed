"""A local IPFS service: Kubo's RPC calls the node uses, a path gateway, and Pinata's upload.

One loopback URL serves all three, so a node can be pointed at it as ``ipfs_api_url``,
``ipfs_gateway`` and ``pinata_api_url`` at once. Blobs live in memory under the real CIDs
that ``blf.cid`` computes, so a client that checks CIDs sees what it would see on IPFS:

- ``POST /api/v0/add`` honours ``cid-version`` (default 0, like Kubo), ``raw-leaves``
  (default: true for CIDv1) and ``chunker=size-N`` (default 262144, at most 1 MiB, like
  Kubo). It stores single-chunk files only: a file larger than its chunk would be a tree on
  Kubo, whose CID is not the one a single block gets, so it is refused (400) rather than
  given a CID no real node would answer.
- ``POST /api/v0/cat`` and ``GET /ipfs/{cid}`` serve the bytes; errors have Kubo's shapes.
- ``POST /pinning/pinFileToIPFS`` wants ``Authorization: Bearer <pinata_jwt>`` (401 without).

An admin API under ``/admin`` lets a test make the service lie (``tamper``) and inspect it.
The node never imports this module; it only depends on ``blf.cid`` and ``blf.errors``.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from blf import cid as cids
from blf.devnet.server import DevnetError, LocalServer, install_error_handler
from blf.devnet.server import serve as serve_app
from blf.errors import UnverifiableCidError

__all__ = ["DEVNET_VERSION", "DevnetIpfs", "DevnetIpfsState", "KuboError", "create_app", "serve"]

DEVNET_VERSION = "devnet-0.1"
DEFAULT_CHUNKER = f"size-{cids.CHUNK_SIZE}"
_OCTETS = "application/octet-stream"


class KuboError(Exception):
    """An RPC refusal, answered as Kubo does: ``{"Message", "Code", "Type": "error"}``.
    Code 1 (a client error) goes with 400, code 0 (any other) with 500."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        body = {"Message": self.message, "Code": 1 if self.status < 500 else 0, "Type": "error"}
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True)
class Blob:
    cid: str
    data: bytes
    block_size: int  # what Kubo and Pinata report as the size: the stored block's bytes


class DevnetIpfsState:
    """The blobs, what a test told the service to lie about, and counters; all under a lock.

    ``adds`` counts HTTP uploads (RPC and Pinata) per CID; ``cats`` counts downloads per CID
    as requested (RPC and gateway, found or not). ``put`` seeds a blob without counting.
    """

    def __init__(self, *, pinata_jwt: str | None = None) -> None:
        self.pinata_jwt = pinata_jwt
        self.lock = threading.Lock()
        self.adds: Counter[str] = Counter()
        self.cats: Counter[str] = Counter()
        self._blobs: dict[tuple[int, bytes], Blob] = {}
        self._tampered: dict[tuple[int, bytes], bytes] = {}

    def put(self, data: bytes, *, cid_version: int = 1) -> str:
        """Store ``data`` as ``ipfs add`` would (CIDv1: raw block of up to 1 MiB; CIDv0: a
        single-chunk dag-pb file); returns its CID."""
        chunk = cids.MAX_BLOCK if cid_version == 1 else cids.CHUNK_SIZE
        blob = self.store(data, cid_version=cid_version, raw_leaves=cid_version == 1, chunk=chunk)
        return blob.cid

    def store(self, data: bytes, *, cid_version: int, raw_leaves: bool, chunk: int) -> Blob:
        """Store a single-chunk file; DevnetError(400) for one Kubo would have split."""
        if len(data) > chunk:
            raise DevnetError(
                400,
                f"devnet-ipfs stores single-chunk files only: {len(data)} bytes exceed the"
                f" chunk size of {chunk} (a real node would build a tree with another CID)",
            )
        blob = _make_blob(data, cid_version=cid_version, raw_leaves=raw_leaves)
        with self.lock:
            self._blobs[cids.parse(blob.cid).block_key] = blob
        return blob

    def has(self, cid: str) -> bool:
        key = _key(cid)
        with self.lock:
            return key is not None and key in self._blobs

    def count_add(self, cid: str) -> None:
        with self.lock:
            self.adds[cid] += 1

    def fetch(self, cid: str) -> bytes | None:
        """What a download of ``cid`` is served: tampered bytes first; None when unknown."""
        key = _key(cid)
        with self.lock:
            self.cats[cid] += 1
            if key is None:
                return None
            if key in self._tampered:
                return self._tampered[key]
            blob = self._blobs.get(key)
            return blob.data if blob else None

    def tamper(self, cid: str, data: bytes) -> None:
        """From now on serve ``data`` for ``cid``: a lying gateway."""
        key = _key(cid)
        if key is None:
            raise DevnetError(400, f"cannot tamper with {cid!r}: not a CID devnet-ipfs stores")
        with self.lock:
            self._tampered[key] = data

    def blobs(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"cid": b.cid, "size": len(b.data)} for b in self._blobs.values()]

    def reset(self) -> None:
        with self.lock:
            self._blobs.clear()
            self._tampered.clear()
            self.adds.clear()
            self.cats.clear()


def _make_blob(data: bytes, *, cid_version: int, raw_leaves: bool) -> Blob:
    if raw_leaves:  # Kubo makes a single raw leaf a CIDv1 even when asked for CIDv0
        return Blob(cids.cid_v1_raw(data), data, len(data))
    block_size = len(cids.dag_pb_file_node(data))
    if cid_version == 0:
        return Blob(cids.cid_v0(data), data, block_size)
    return Blob(cids.cid_v1_dag_pb(data), data, block_size)


def _key(cid: str) -> tuple[int, bytes] | None:
    try:
        return cids.parse(cid).block_key
    except UnverifiableCidError:
        return None


def _chunk_size(chunker: str) -> int:
    size_text = chunker.removeprefix("size-")
    if size_text == chunker or not size_text.isdigit() or int(size_text) <= 0:
        raise KuboError(400, f"devnet-ipfs supports only size-N chunkers, not {chunker!r}")
    if int(size_text) > cids.MAX_BLOCK:
        raise KuboError(
            400, f"chunker parameters may not exceed the maximum chunk size of {cids.MAX_BLOCK}"
        )
    return int(size_text)


async def _uploaded_file(request: Request) -> tuple[str, bytes] | None:
    form = await request.form()
    part = form.get("file")
    if isinstance(part, UploadFile):
        return part.filename or "", await part.read()
    if isinstance(part, str):
        return "", part.encode("utf-8")
    return None


# --------------------------------------------------------------------------- the app


def create_app(*, pinata_jwt: str | None = None) -> FastAPI:
    """Build the service; its state is ``app.state.ipfs`` (a DevnetIpfsState).

    With ``pinata_jwt`` None, the Pinata endpoint refuses every request (401).
    """
    state = DevnetIpfsState(pinata_jwt=pinata_jwt)
    app = FastAPI(title="Blindference devnet IPFS")
    app.state.ipfs = state
    install_error_handler(app)
    app.add_exception_handler(KuboError, _kubo_error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.include_router(_rpc_router(state))
    app.include_router(_gateway_router(state))
    app.include_router(_pinata_router(state))
    app.include_router(_admin_router(state))
    return app


async def _kubo_error_response(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KuboError)
    return exc.response()


async def _validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    message = "invalid request: " + "; ".join(parts)
    if request.url.path.startswith("/api/v0/"):
        return KuboError(400, message).response()
    return JSONResponse({"detail": message}, status_code=400)


def _rpc_router(state: DevnetIpfsState) -> APIRouter:
    router = APIRouter(prefix="/api/v0")

    @router.post("/add")
    async def add(
        request: Request,
        cid_version: Annotated[int, Query(alias="cid-version")] = 0,
        raw_leaves: Annotated[bool | None, Query(alias="raw-leaves")] = None,
        chunker: str = DEFAULT_CHUNKER,
    ) -> JSONResponse:
        if cid_version not in (0, 1):
            raise KuboError(400, f"unknown CID version: {cid_version}")
        chunk = _chunk_size(chunker)
        uploaded = await _uploaded_file(request)
        if uploaded is None:
            raise KuboError(400, "file argument 'path' is required")
        name, data = uploaded
        leaves = raw_leaves if raw_leaves is not None else cid_version == 1
        try:
            blob = state.store(data, cid_version=cid_version, raw_leaves=leaves, chunk=chunk)
        except DevnetError as exc:
            raise KuboError(exc.status, exc.detail) from None
        state.count_add(blob.cid)
        return JSONResponse(
            {"Name": name or blob.cid, "Hash": blob.cid, "Size": str(blob.block_size)}
        )

    @router.post("/cat")
    def cat(arg: str | None = None) -> Response:
        if not arg:
            raise KuboError(400, 'argument "ipfs-path" is required')
        cid = arg.removeprefix("/ipfs/").strip("/")
        data = state.fetch(cid)
        if data is None:
            raise KuboError(
                500, f"block was not found locally (offline): ipld: could not find {cid}"
            )
        return Response(data, media_type="text/plain")

    @router.post("/version")
    def version() -> dict[str, str]:
        return {"Version": DEVNET_VERSION, "Commit": "", "Repo": "0", "System": "devnet"}

    return router


def _gateway_router(state: DevnetIpfsState) -> APIRouter:
    router = APIRouter()

    @router.get("/ipfs/{cid}")
    def gateway(cid: str) -> Response:
        data = state.fetch(cid)
        if data is None:
            return PlainTextResponse(f"ipfs cat /ipfs/{cid}: not found\n", status_code=404)
        return Response(data, media_type=_OCTETS, headers={"X-Ipfs-Path": f"/ipfs/{cid}"})

    return router


def _pinata_router(state: DevnetIpfsState) -> APIRouter:
    router = APIRouter(prefix="/pinning")

    @router.post("/pinFileToIPFS")
    async def pin_file(request: Request) -> JSONResponse:
        expected = f"Bearer {state.pinata_jwt}" if state.pinata_jwt else None
        if expected is None or request.headers.get("Authorization") != expected:
            return _pinata_error(401, "INVALID_CREDENTIALS", "Invalid/expired credentials.")
        uploaded = await _uploaded_file(request)
        if uploaded is None:
            return _pinata_error(400, "INVALID_REQUEST", "no file was sent in field 'file'")
        cid_version = _pinata_cid_version((await request.form()).get("pinataOptions"))
        if cid_version is None:
            return _pinata_error(400, "INVALID_REQUEST", "pinataOptions.cidVersion: 0 or 1")
        data, raw_leaves = uploaded[1], cid_version == 1
        duplicate = state.has(_make_blob(data, cid_version=cid_version, raw_leaves=raw_leaves).cid)
        try:  # Pinata chunks like Kubo's default: a single-chunk file is at most 256 KiB
            blob = state.store(
                data, cid_version=cid_version, raw_leaves=raw_leaves, chunk=cids.CHUNK_SIZE
            )
        except DevnetError as exc:
            return _pinata_error(exc.status, "INVALID_REQUEST", exc.detail)
        state.count_add(blob.cid)
        answer = {
            "IpfsHash": blob.cid,
            "PinSize": blob.block_size,
            "Timestamp": _now(),
            "isDuplicate": duplicate,
        }
        return JSONResponse(answer)

    return router


def _pinata_cid_version(options: Any) -> int | None:
    if options is None:
        return 0
    try:
        version = json.loads(options).get("cidVersion", 0) if isinstance(options, str) else None
    except (ValueError, AttributeError):
        return None
    return version if version in (0, 1) else None


def _pinata_error(status: int, reason: str, details: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "details": details}}, status_code=status)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _admin_router(state: DevnetIpfsState) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.post("/tamper/{cid}")
    async def tamper(cid: str, request: Request) -> dict[str, Any]:
        data = await request.body()
        state.tamper(cid, data)
        return {"cid": cid, "size": len(data)}

    @router.get("/blobs")
    def blobs() -> dict[str, Any]:
        return {"blobs": state.blobs()}

    @router.post("/reset")
    def reset() -> dict[str, str]:
        state.reset()
        return {"status": "ok"}

    return router


# --------------------------------------------------------------------------- running it


class DevnetIpfs(LocalServer):
    """The devnet IPFS service on a background thread: ``with DevnetIpfs() as ipfs:``;
    ``ipfs.url`` is at once the RPC API, the gateway and the Pinata API."""

    name = "devnet-ipfs"

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, pinata_jwt: str | None = None
    ) -> None:
        super().__init__(create_app(pinata_jwt=pinata_jwt), host, port)
        self.state: DevnetIpfsState = self.app.state.ipfs


def serve(host: str, port: int, *, pinata_jwt: str | None = None, log_level: str = "info") -> None:
    """Run the service in the foreground until interrupted."""
    pinata = "Pinata emulation on" if pinata_jwt else "Pinata emulation off"
    banner = f"Devnet IPFS (RPC API, gateway; {pinata})"
    serve_app(create_app(pinata_jwt=pinata_jwt), host, port, banner=banner, log_level=log_level)
