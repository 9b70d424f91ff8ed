"""A local CoFHE that speaks the JSON-RPC form of protocol.md §3, on loopback.

It stands in for the threshold network so that a node's key handling can be run and tested
end to end. Values are kept in the clear in memory (there is no FHE here); what is faithful is
everything a node can observe: the permit check (EIP-712 signature, expiry, chain), the ACL on
each handle, the sealed answer, the JSON-RPC error shapes, and "busy" answers that a node must
ride out. The JSON-RPC form has no grant call, so an unsigned admin API under ``/admin`` lets a
test, the devnet ICL or a person store values and grant handles. The node never imports this
module: it talks to it over HTTP.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from blf.cofhe import BUSY_CODE, Permit, recover_permit_signer, seal
from blf.devnet.server import DevnetError, LocalServer, install_error_handler
from blf.devnet.server import serve as serve_app
from blf.errors import CofheError

__all__ = [
    "BAD_SIGNATURE",
    "NOT_ALLOWED",
    "PERMIT_EXPIRED",
    "UNKNOWN_HANDLE",
    "UTYPE_WIDTHS",
    "DevnetCofhe",
    "DevnetCofheState",
    "RpcError",
    "create_app",
    "serve",
]

# JSON-RPC error codes: the standard ones, and the devnet's answers to a bad decryption request.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
BAD_SIGNATURE = -32001
PERMIT_EXPIRED = -32002
NOT_ALLOWED = -32003
UNKNOWN_HANDLE = -32004

# Fhenix's utype numbers and the byte width a sealed value of that type has.
UTYPE_WIDTHS = {0: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 16, 7: 20, 8: 32}
UINT128 = 6


class RpcError(Exception):
    """A JSON-RPC error answer: ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- parsing helpers


def _int_value(value: Any) -> int:
    """An int, a decimal string or a ``0x`` hex string: JSON cannot carry 256-bit ints safely."""
    if isinstance(value, bool):
        raise ValueError("a number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            raise ValueError(f"{value!r} is not a decimal or 0x-hex integer") from None
    raise ValueError(f"{value!r} is not an integer")


def _address(value: Any) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise ValueError(f"{value!r} is not an Ethereum address")
    return to_checksum_address(value)


IntValue = Annotated[int, BeforeValidator(_int_value)]
Address = Annotated[str, BeforeValidator(_address)]


class StoreRequest(BaseModel):
    value: IntValue
    allowed: list[Address] = Field(default_factory=list)
    utype: int = UINT128


class GrantRequest(BaseModel):
    handle: IntValue
    addresses: list[Address]


class BusyRequest(BaseModel):
    count: int = Field(ge=0)


class RpcRequest(BaseModel):
    jsonrpc: str
    id: int | str | None = None
    method: str
    params: list[Any] = Field(default_factory=list)


# --------------------------------------------------------------------------- state


@dataclass
class _Ciphertext:
    value: int
    utype: int
    allowed: set[str] = field(default_factory=set)


class DevnetCofheState:
    """Every handle the devnet CoFHE knows, and what it saw; every method takes the lock.

    ``decrypt_calls`` counts decryptions answered per (handle, issuer); ``sealing_keys_seen``
    counts requests per permit sealing key (one key per permit); ``busy_left`` is how many
    more JSON-RPC calls get a "busy" answer.
    """

    def __init__(self, *, chain_id: int, clock: Callable[[], float]) -> None:
        self.chain_id = chain_id
        self.clock = clock
        self.lock = threading.Lock()
        self.busy_left = 0
        self.encrypt_calls = 0
        self.decrypt_calls: Counter[tuple[int, str]] = Counter()
        self.sealing_keys_seen: Counter[str] = Counter()
        self._handles: dict[int, _Ciphertext] = {}

    # admin -------------------------------------------------------------------------------

    def store(self, value: int, allowed: Iterable[str], utype: int = UINT128) -> int:
        """Keep ``value`` under a fresh random 256-bit handle readable by ``allowed``."""
        width = UTYPE_WIDTHS.get(utype)
        if width is None:
            raise DevnetError(400, f"unknown utype {utype} (known: {sorted(UTYPE_WIDTHS)})")
        if not 0 <= value < 2 ** (8 * width):
            raise DevnetError(400, f"value does not fit utype {utype} ({8 * width} bits)")
        addresses = {_address(a) for a in allowed}
        with self.lock:
            handle = self._fresh_handle()
            self._handles[handle] = _Ciphertext(value, utype, addresses)
        return handle

    def grant(self, handle: int, addresses: Iterable[str]) -> None:
        checked = {_address(a) for a in addresses}
        with self.lock:
            self._get(handle).allowed |= checked

    def value_of(self, handle: int) -> int:
        with self.lock:
            return self._get(handle).value

    def allowed(self, handle: int) -> set[str]:
        with self.lock:
            return set(self._get(handle).allowed)

    def set_busy(self, count: int) -> None:
        with self.lock:
            self.busy_left = count

    def handle_records(self) -> list[dict[str, Any]]:
        """Every handle with its type and ACL, without its value."""
        with self.lock:
            return [
                {
                    "handle": hex(handle),
                    "handleInt": str(handle),
                    "utype": ct.utype,
                    "allowed": sorted(ct.allowed),
                }
                for handle, ct in self._handles.items()
            ]

    # JSON-RPC ----------------------------------------------------------------------------

    def take_busy(self) -> bool:
        """True (and one fewer left) while the devnet pretends to be overloaded."""
        with self.lock:
            if self.busy_left <= 0:
                return False
            self.busy_left -= 1
            return True

    def decrypt_for_view(self, params: list[Any]) -> dict[str, Any]:
        handle, permit = _decrypt_params(params)
        issuer = self._check_permit(permit)
        with self.lock:
            self.sealing_keys_seen[permit.sealing_key] += 1
            ct = self._handles.get(handle)
            if ct is None:
                raise RpcError(UNKNOWN_HANDLE, f"unknown handle {hex(handle)}")
            if issuer not in ct.allowed:
                raise RpcError(
                    NOT_ALLOWED, f"{issuer} is not allowed to decrypt handle {hex(handle)}"
                )
            self.decrypt_calls[(handle, issuer)] += 1
            value, width = ct.value, UTYPE_WIDTHS[ct.utype]
        return {"sealedValue": seal(value, permit.sealing_key_bytes, width=width)}

    def encrypt(self, params: list[Any]) -> dict[str, Any]:
        value, issuer = _encrypt_params(params)
        with self.lock:
            self.encrypt_calls += 1
        try:
            handle = self.store(value, [issuer], UINT128)
        except DevnetError as exc:
            raise RpcError(INVALID_PARAMS, exc.detail) from None
        return {"handle": hex(handle)}

    # plumbing (callers hold the lock where it matters) ------------------------------------

    def _check_permit(self, permit: Permit) -> str:
        wire = permit.model_dump(by_alias=True)
        try:
            signer = recover_permit_signer(wire, chain_id=self.chain_id)
        except CofheError as exc:
            raise RpcError(BAD_SIGNATURE, f"invalid permit signature: {exc}") from None
        if signer != permit.issuer:
            raise RpcError(BAD_SIGNATURE, "invalid permit signature")
        if permit.expiration <= self.clock():
            raise RpcError(PERMIT_EXPIRED, "permit expired")
        return permit.issuer

    def _fresh_handle(self) -> int:
        while True:
            handle = secrets.randbits(256)
            if handle and handle not in self._handles:
                return handle

    def _get(self, handle: int) -> _Ciphertext:
        ct = self._handles.get(handle)
        if ct is None:
            raise DevnetError(404, f"unknown handle {hex(handle)}")
        return ct


def _decrypt_params(params: list[Any]) -> tuple[int, Permit]:
    if len(params) != 2:
        raise RpcError(INVALID_PARAMS, "cofhe_decryptForView takes [handle, permit]")
    try:
        handle = _int_value(params[0])
        permit = Permit.model_validate(params[1])
    except (ValueError, ValidationError) as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {_one_line(exc)}") from None
    return handle, permit


def _encrypt_params(params: list[Any]) -> tuple[int, str]:
    if len(params) != 3:
        raise RpcError(INVALID_PARAMS, "cofhe_encrypt takes [value, type, issuer]")
    if params[1] != "uint128":
        raise RpcError(INVALID_PARAMS, f"unsupported type {params[1]!r} (only 'uint128')")
    try:
        return _int_value(params[0]), _address(params[2])
    except ValueError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError | RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"{where}: {first['msg']}"
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------- the app


def create_app(*, chain_id: int = 421614, clock: Callable[[], float] = time.time) -> FastAPI:
    """Build the devnet CoFHE app; its state is ``app.state.cofhe`` (a DevnetCofheState)."""
    state = DevnetCofheState(chain_id=chain_id, clock=clock)
    app = FastAPI(title="Blindference devnet CoFHE")
    app.state.cofhe = state
    install_error_handler(app)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.add_api_route("/", _service_info(chain_id), methods=["GET"])
    app.add_api_route("/", _rpc_endpoint(state), methods=["POST"])
    app.include_router(_admin_router(state))
    return app


def _service_info(chain_id: int) -> Callable[[], dict[str, Any]]:
    def info() -> dict[str, Any]:
        return {
            "service": "blindference devnet cofhe",
            "protocol": "JSON-RPC 2.0 at POST /",
            "methods": sorted(_METHODS),
            "chainId": chain_id,
            "admin": "/admin",
        }

    return info


_METHODS: dict[str, Callable[[DevnetCofheState, list[Any]], dict[str, Any]]] = {
    "cofhe_decryptForView": DevnetCofheState.decrypt_for_view,
    "cofhe_encrypt": DevnetCofheState.encrypt,
}


def _rpc_endpoint(state: DevnetCofheState) -> Callable[[Request], Any]:
    async def rpc(request: Request) -> JSONResponse:
        # JSON-RPC servers answer every call with 200, errors included.
        request_id: int | str | None = None
        try:
            call = _parse_call(await request.body())
            request_id = call.id
            if state.take_busy():
                raise RpcError(BUSY_CODE, "busy, retry later")
            method = _METHODS.get(call.method)
            if method is None:
                raise RpcError(METHOD_NOT_FOUND, f"method {call.method!r} not found")
            result = method(state, call.params)
        except RpcError as exc:
            error = {"code": exc.code, "message": exc.message}
            return JSONResponse({"jsonrpc": "2.0", "id": request_id, "error": error})
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": result})

    return rpc


def _parse_call(raw: bytes) -> RpcRequest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RpcError(PARSE_ERROR, "parse error: body is not JSON") from None
    try:
        call = RpcRequest.model_validate(data)
    except ValidationError as exc:
        raise RpcError(INVALID_REQUEST, f"invalid request: {_one_line(exc)}") from None
    if call.jsonrpc != "2.0":
        raise RpcError(INVALID_REQUEST, "invalid request: jsonrpc must be '2.0'")
    return call


async def _validation_error_response(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI answers 422; the devnet ICL answers 400, and so does this service.
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _one_line(exc)}, status_code=400)


def _admin_router(state: DevnetCofheState) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.post("/store")
    def store(req: StoreRequest) -> dict[str, Any]:
        handle = state.store(req.value, req.allowed, req.utype)
        return {"handle": hex(handle), "handleInt": str(handle)}

    @router.post("/grant")
    def grant(req: GrantRequest) -> dict[str, Any]:
        state.grant(req.handle, req.addresses)
        return {"handle": hex(req.handle), "allowed": sorted(state.allowed(req.handle))}

    @router.post("/busy")
    def busy(req: BusyRequest) -> dict[str, Any]:
        state.set_busy(req.count)
        return {"busyLeft": req.count}

    @router.get("/handles")
    def handles() -> dict[str, Any]:
        return {"handles": state.handle_records()}

    return router


# --------------------------------------------------------------------------- running it


class DevnetCofhe(LocalServer):
    """The devnet CoFHE on a background thread: ``with DevnetCofhe() as c: c.url``."""

    name = "devnet-cofhe"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chain_id: int = 421614,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(create_app(chain_id=chain_id, clock=clock), host, port)
        self.state: DevnetCofheState = self.app.state.cofhe


def serve(host: str, port: int, *, chain_id: int = 421614, log_level: str = "info") -> None:
    """Run the devnet CoFHE in the foreground until interrupted."""
    banner = f"Devnet CoFHE (chain id {chain_id})"
    serve_app(create_app(chain_id=chain_id), host, port, banner=banner, log_level=log_level)
