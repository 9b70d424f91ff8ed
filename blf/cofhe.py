"""The node's CoFHE client: threshold decryption and encryption over JSON-RPC (protocol.md §3).

A node decrypts a job's key handles with a self-issued *permit*: an EIP-712 signature by the
node over a fresh X25519 public key (the sealing key). CoFHE answers with the value sealed to
that key, so the plaintext never crosses the wire in the clear. A permit lives seven days and
is reused until an hour before it expires; making one is cheap, but each new permit is a new
key a network may have to look up, and a pool of workers should not mint one per call.

Failures split the way the task layer needs them: ``CofheTransportError`` (unreachable,
timeout, 5xx, garbage, "busy") is retried inside the job's deadline; ``CofheRefusedError``
(no permit, handle not granted) fails the job once. Neither message ever carries a plaintext
value or a key; plaintext values are logged at DEBUG only.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import requests
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blf.config import COFHE_MODES, Settings
from blf.errors import CofheError, CofheRefusedError, CofheTransportError
from blf.redact import display_url

__all__ = [
    "BUSY_CODE",
    "PERMIT_TYPES",
    "SEAL_INFO",
    "UINT128_MAX",
    "Cofhe",
    "EncryptedValue",
    "HeldPermit",
    "JsonRpcCofhe",
    "Permit",
    "make_permit",
    "open_cofhe",
    "permit_typed_data",
    "recover_permit_signer",
    "seal",
    "unseal",
]

log = logging.getLogger(__name__)

UINT128_MAX = 2**128 - 1
BUSY_CODE = -32005  # JSON-RPC "limit exceeded": the network is overloaded, try again later
SEAL_INFO = b"CoFHE seal"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
PERMIT_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Permit": [
        {"name": "issuer", "type": "address"},
        {"name": "expiration", "type": "uint256"},
        {"name": "sealingKey", "type": "bytes32"},
    ],
}

_KEY_LEN = 32
_IV_LEN = 12
_TAG_LEN = 16


# --- values and the interface ------------------------------------------------------------


class EncryptedValue(BaseModel):
    """A CoFHE ciphertext reference, shaped like the contracts' ``InEuint128`` input."""

    model_config = ConfigDict(frozen=True)

    ct_hash: int
    security_zone: int = 0
    utype: int = 6  # uint128
    signature: str = "0x"


@runtime_checkable
class Cofhe(Protocol):
    """What the task layer needs of CoFHE: the JSON-RPC client and the SDK bridge."""

    mode: str

    def decrypt(self, handle: int) -> int: ...

    def encrypt_uint128(self, value: int) -> EncryptedValue: ...

    def close(self) -> None: ...


# --- permits -----------------------------------------------------------------------------


class Permit(BaseModel):
    """The wire form of a permit; validating it is the devnet's and the tests' business."""

    model_config = ConfigDict(populate_by_name=True, frozen=True)

    issuer: str
    expiration: int = Field(ge=0, lt=2**256)
    sealing_key: str = Field(alias="sealingKey")
    signature: str

    @field_validator("issuer")
    @classmethod
    def _address(cls, value: str) -> str:
        if not is_address(value):
            raise ValueError(f"{value!r} is not an Ethereum address")
        return to_checksum_address(value)

    @field_validator("sealing_key")
    @classmethod
    def _bytes32(cls, value: str) -> str:
        # eth-account right-pads a short bytes32 silently, so the length is checked here.
        try:
            raw = bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            raw = b""
        if len(raw) != _KEY_LEN:
            raise ValueError("must be 32 bytes as 0x-prefixed hex")
        return "0x" + value.lower().removeprefix("0x")

    @property
    def sealing_key_bytes(self) -> bytes:
        return bytes.fromhex(self.sealing_key[2:])


def permit_typed_data(
    *, issuer: str, expiration: int, sealing_key: bytes, chain_id: int
) -> dict[str, Any]:
    """The full EIP-712 message a permit signs (protocol.md §3), as eth-account takes it."""
    return {
        "types": PERMIT_TYPES,
        "primaryType": "Permit",
        "domain": {
            "name": "CoFHE",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": ZERO_ADDRESS,
        },
        "message": {
            "issuer": to_checksum_address(issuer),
            "expiration": expiration,
            "sealingKey": sealing_key,
        },
    }


def _signable(issuer: str, expiration: int, sealing_key: bytes, chain_id: int) -> SignableMessage:
    data = permit_typed_data(
        issuer=issuer, expiration=expiration, sealing_key=sealing_key, chain_id=chain_id
    )
    return encode_typed_data(full_message=data)


def make_permit(
    account: LocalAccount, *, chain_id: int, sealing_public_key: bytes, expiration: int
) -> dict[str, Any]:
    """A self-issued permit: ``account`` lets the holder of ``sealing_public_key`` read."""
    if len(sealing_public_key) != _KEY_LEN:
        raise CofheError(f"a sealing key is {_KEY_LEN} bytes, not {len(sealing_public_key)}")
    issuer = to_checksum_address(account.address)
    signed = account.sign_message(_signable(issuer, expiration, sealing_public_key, chain_id))
    return {
        "issuer": issuer,
        "expiration": int(expiration),
        "sealingKey": "0x" + sealing_public_key.hex(),
        "signature": "0x" + signed.signature.hex().removeprefix("0x"),
    }


def recover_permit_signer(permit: dict[str, Any], *, chain_id: int) -> str:
    """The checksummed address that signed ``permit`` for ``chain_id``; CofheError if none."""
    try:
        parsed = Permit.model_validate(permit)
    except ValidationError as exc:
        raise CofheError(f"malformed permit: {_first_error(exc)}") from None
    signable = _signable(parsed.issuer, parsed.expiration, parsed.sealing_key_bytes, chain_id)
    try:
        signer = Account.recover_message(signable, signature=parsed.signature)
    # A malformed signature surfaces as one of several unrelated exception types
    # (binascii.Error, ValueError, eth_keys BadSignature, eth_utils ValidationError).
    except Exception as exc:
        raise CofheError(f"permit signature is not a valid signature: {exc}") from None
    return to_checksum_address(signer)


# --- sealing -----------------------------------------------------------------------------


def _aes_key(private: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    shared = private.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_INFO).derive(shared)


def seal(value: int, recipient_public: bytes, *, width: int = 16) -> str:
    """``value`` sealed to ``recipient_public`` as CoFHE does: a fresh ephemeral key each time."""
    if value < 0 or value.bit_length() > 8 * width:
        raise CofheError(f"the value does not fit in {width} bytes")
    try:
        peer = X25519PublicKey.from_public_bytes(recipient_public)
    except ValueError:
        raise CofheError(
            f"a sealing key is {_KEY_LEN} bytes, not {len(recipient_public)}"
        ) from None
    ephemeral = X25519PrivateKey.generate()
    iv = os.urandom(_IV_LEN)
    try:
        key = _aes_key(ephemeral, peer)
    except ValueError:
        raise CofheError("the sealing key is a low-order point: no shared secret") from None
    sealed = AESGCM(key).encrypt(iv, value.to_bytes(width, "big"), None)
    return "0x" + (ephemeral.public_key().public_bytes_raw() + iv + sealed).hex()


def unseal(sealed_hex: str, private_key: X25519PrivateKey) -> int:
    """The value inside a CoFHE sealed answer; CofheRefusedError when it fails authentication."""
    raw = _hex_to_bytes(sealed_hex, "sealed value")
    if len(raw) < _KEY_LEN + _IV_LEN + _TAG_LEN:
        raise CofheError(
            f"sealed value is {len(raw)} bytes, shorter than the "
            f"{_KEY_LEN + _IV_LEN + _TAG_LEN} bytes of key, iv and tag"
        )
    ephemeral = X25519PublicKey.from_public_bytes(raw[:_KEY_LEN])
    iv, sealed = raw[_KEY_LEN : _KEY_LEN + _IV_LEN], raw[_KEY_LEN + _IV_LEN :]
    try:
        plain = AESGCM(_aes_key(private_key, ephemeral)).decrypt(iv, sealed, None)
    # ValueError: the ephemeral key is a low-order point (all-zero shared secret).
    except (InvalidTag, ValueError):
        raise CofheRefusedError(
            "sealed value fails authentication: sealed to another key, or altered"
        ) from None
    return int.from_bytes(plain, "big")


def _hex_to_bytes(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise CofheError(f"{what} is not a hex string")
    body = text.removeprefix("0x").removeprefix("0X")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise CofheError(f"{what} is not hex") from None


# --- the JSON-RPC client -----------------------------------------------------------------


_R = TypeVar("_R", bound=BaseModel)


class _RpcError(BaseModel):
    code: int
    message: str = ""


class _RpcResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    jsonrpc: str
    id: int | str | None = None
    result: Any = None
    error: _RpcError | None = None


class _DecryptResult(BaseModel):
    sealed_value: str = Field(alias="sealedValue")


class _EncryptResult(BaseModel):
    handle: str | int


@dataclass(frozen=True)
class HeldPermit:
    """A permit with the private half of its sealing key; answers to it unseal with that."""

    wire: dict[str, Any]
    private_key: X25519PrivateKey
    expiration: int


class JsonRpcCofhe:
    """CoFHE over JSON-RPC (``cofhe_mode = "python"``). Thread-safe for a worker pool."""

    mode = "python"

    def __init__(
        self,
        endpoint: str,
        *,
        account: LocalAccount,
        chain_id: int,
        timeout: float = 30.0,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        permit_ttl_s: int = 7 * 86400,
        renew_before_s: int = 3600,
    ) -> None:
        if renew_before_s >= permit_ttl_s:
            raise ValueError("renew_before_s must be shorter than permit_ttl_s")
        self.endpoint = endpoint
        self.address: str = to_checksum_address(account.address)
        self.chain_id = chain_id
        self._account = account
        self._timeout = timeout
        self._session = session or requests.Session()
        self._clock = clock
        self._permit_ttl_s = permit_ttl_s
        self._renew_before_s = renew_before_s
        self._permit: HeldPermit | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> JsonRpcCofhe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # calls -------------------------------------------------------------------------------

    def decrypt(self, handle: int) -> int:
        held = self.permit()
        result = self._call("cofhe_decryptForView", [hex(handle), held.wire])
        answer = self._result(result, _DecryptResult, "cofhe_decryptForView")
        value = unseal(answer.sealed_value, held.private_key)
        log.debug("CoFHE decrypted handle %s to %d", hex(handle), value)
        return value

    def encrypt_uint128(self, value: int) -> EncryptedValue:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT128_MAX:
            raise CofheError("cofhe_encrypt: the value is not a uint128 (0 .. 2**128-1); not sent")
        log.debug("CoFHE encrypting %d as uint128", value)
        result = self._call("cofhe_encrypt", [hex(value), "uint128", self.address])
        answer = self._result(result, _EncryptResult, "cofhe_encrypt")
        try:
            ct_hash = _to_int(answer.handle)
        except ValueError:
            raise self._garbage("cofhe_encrypt", "handle is not a number") from None
        return EncryptedValue(ct_hash=ct_hash)

    def permit(self) -> HeldPermit:
        """The current permit, made on first use and again ``renew_before_s`` before expiry."""
        with self._lock:
            now = int(self._clock())
            held = self._permit
            if held is None or now >= held.expiration - self._renew_before_s:
                held = self._new_permit(now + self._permit_ttl_s)
                self._permit = held
            return held

    def _new_permit(self, expiration: int) -> HeldPermit:
        private = X25519PrivateKey.generate()
        wire = make_permit(
            self._account,
            chain_id=self.chain_id,
            sealing_public_key=private.public_key().public_bytes_raw(),
            expiration=expiration,
        )
        log.info("CoFHE permit issued by %s, valid until %d", self.address, expiration)
        return HeldPermit(wire=wire, private_key=private, expiration=expiration)

    # plumbing ----------------------------------------------------------------------------

    def _call(self, method: str, params: list[Any]) -> Any:
        request_id = next(self._ids)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        response = self._post(method, body)
        rpc = self._envelope(method, response, request_id)
        if rpc.error is not None:
            raise self._rpc_error(method, rpc.error)
        return rpc.result

    def _post(self, method: str, body: dict[str, Any]) -> requests.Response:
        where = display_url(self.endpoint)
        try:
            response = self._session.post(
                self.endpoint,
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise CofheTransportError(
                f"CoFHE unreachable: {method} to {where} failed ({type(exc).__name__})"
            ) from exc
        status = response.status_code
        if status >= 500 or status == 429:
            raise CofheTransportError(f"CoFHE {status} {response.reason} for {method} at {where}")
        if status >= 400:
            raise CofheRefusedError(
                f"CoFHE {status} {response.reason} for {method} at {where}", code=status
            )
        return response

    def _envelope(self, method: str, response: requests.Response, request_id: int) -> _RpcResponse:
        try:
            rpc = _RpcResponse.model_validate(response.json())
        except (ValueError, ValidationError):
            raise self._garbage(method, "not a JSON-RPC response") from None
        if rpc.id is not None and rpc.id != request_id:
            raise self._garbage(method, f"answer to request {rpc.id!r}, not {request_id}")
        return rpc

    def _result(self, result: Any, model: type[_R], method: str) -> _R:
        try:
            return model.model_validate(result)
        except ValidationError as exc:
            raise self._garbage(method, f"result {_first_error(exc)}") from None

    def _rpc_error(self, method: str, error: _RpcError) -> CofheError:
        where = display_url(self.endpoint)
        message = " ".join(error.message.split())[:300]
        if error.code == BUSY_CODE:
            return CofheTransportError(
                f"CoFHE busy ({error.code} {message}) for {method} at {where}"
            )
        return CofheRefusedError(
            f"CoFHE refused {method} at {where}: {error.code} {message}", code=error.code
        )

    def _garbage(self, method: str, why: str) -> CofheTransportError:
        return CofheTransportError(
            f"CoFHE answered {method} at {display_url(self.endpoint)} with garbage: {why}"
        )


def _to_int(value: str | int) -> int:
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text, 16) if text.lower().startswith("0x") else int(text, 10)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


# --- choosing an implementation ------------------------------------------------------------


def open_cofhe(
    settings: Settings, account: LocalAccount, *, directory: Path | None = None
) -> Cofhe:
    """The CoFHE client ``settings`` ask for, or CofheError saying what to change.
    ``directory`` is the node's: the SDK helper of bridge mode keeps its key cache there."""
    mode = settings.effective_cofhe_mode
    if mode not in COFHE_MODES:
        raise CofheError(
            f"cofhe_mode {mode!r} is not served by this node; available: {', '.join(COFHE_MODES)}"
        )
    if not settings.cofhe_endpoint:
        if mode == "bridge":
            raise CofheError(
                "cofhe_mode 'bridge' needs cofhe_endpoint: the chain's RPC URL, as for the "
                "public node (or BLF_COFHE_ENDPOINT)"
            )
        raise CofheError("no CoFHE endpoint: set cofhe_endpoint (or BLF_COFHE_ENDPOINT)")
    if mode == "bridge":
        from blf.cofhe_bridge import open_bridge  # the bridge module builds on this one

        return open_bridge(settings, account, directory=directory or Path.cwd())
    return JsonRpcCofhe(
        settings.cofhe_endpoint,
        account=account,
        chain_id=settings.cofhe_chain_id,
        timeout=settings.cofhe_timeout_s,
    )
