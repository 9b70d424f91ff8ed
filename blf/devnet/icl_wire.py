"""The devnet ICL's wire: what a node may send it, validated as strictly as the ICL reads it.

Addresses in bodies must be EIP-55 checksummed, hashes and handles must be what the
protocol says (protocol.md section 1); a request that is not is answered 400 with one
line naming every field that is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Protocol, TypeVar

from eth_utils import is_address, to_checksum_address
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError

from blf.devnet.server import DevnetError

__all__ = [
    "AttestationRequest",
    "ChecksumAddress",
    "ClaimRequest",
    "HeartbeatRequest",
    "KeyGrants",
    "NewJobRequest",
    "ResultRequest",
    "VerdictRequest",
    "checksummed",
    "one_line",
    "parse",
]

# --------------------------------------------------------------------------- wire validators

_HEX = re.compile(r"[0-9a-f]*")
_DECIMAL = re.compile(r"[0-9]+")


def checksummed(value: str) -> str:
    if not is_address(value):
        raise ValueError(f"{value!r} is not an Ethereum address")
    if value != to_checksum_address(value):
        raise ValueError(
            f"{value} is not EIP-55 checksummed (expected {to_checksum_address(value)})"
        )
    return value


def _any_address(value: str) -> str:
    if not is_address(value):
        raise ValueError(f"{value!r} is not an Ethereum address")
    return to_checksum_address(value)


def _hex_bytes(value: Any) -> str:
    """Lowercase hex without ``0x``; senders disagree on the prefix, so both are accepted."""
    if not isinstance(value, str):
        raise ValueError("must be a hex string")
    text = value.lower().removeprefix("0x")
    if not _HEX.fullmatch(text) or len(text) % 2:
        raise ValueError(f"{value!r} is not hex bytes")
    return text


def _sha256_hex(value: str) -> str:
    if len(value) != 64:
        raise ValueError(f"must be 32 bytes (64 hex characters), got {len(value)} characters")
    return value


def _decimal(value: str) -> str:
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"{value!r} is not a decimal integer string")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


ChecksumAddress = Annotated[str, AfterValidator(checksummed)]
AnyAddress = Annotated[str, AfterValidator(_any_address)]
HexBytes = Annotated[str, BeforeValidator(_hex_bytes)]
Sha256Hex = Annotated[str, BeforeValidator(_hex_bytes), AfterValidator(_sha256_hex)]
DecimalStr = Annotated[str, AfterValidator(_decimal)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


# --------------------------------------------------------------------------- request models


class AttestationRequest(BaseModel):
    nodeAddress: ChecksumAddress
    backendType: str
    quote: HexBytes
    runtimeHash: Sha256Hex
    challengeId: str
    supportedModelIds: Annotated[list[NonEmptyStr], Field(min_length=1)]


class HeartbeatRequest(BaseModel):
    nodeAddress: ChecksumAddress
    timestamp: DecimalStr


class ClaimRequest(BaseModel):
    jobId: str
    nodeAddress: ChecksumAddress


class EncryptedInput(BaseModel):
    """One CoFHE encrypted input (protocol.md §2, step 5)."""

    ctHash: DecimalStr
    securityZone: int
    utype: int
    signature: HexBytes


class EncryptedKeyInputs(BaseModel):
    high: EncryptedInput
    low: EncryptedInput


class ResultRequest(BaseModel):
    jobId: str
    output_cid: NonEmptyStr
    commitment_hash: Sha256Hex
    encrypted_output_key_high: DecimalStr
    encrypted_output_key_low: DecimalStr
    encrypted_output_key_inputs: EncryptedKeyInputs
    output_key_store_tx: str | None = None


class VerdictRequest(BaseModel):
    jobId: str
    verifier_address: ChecksumAddress
    commitment_hash: Sha256Hex
    verdict: Literal["CONFIRM", "REJECT"]
    confidence: Annotated[float, Field(ge=0, le=100)]


class NewJobRequest(BaseModel):
    modelId: NonEmptyStr
    promptCid: NonEmptyStr
    kpHighHandle: Annotated[int, Field(ge=0)]
    kpLowHandle: Annotated[int, Field(ge=0)]
    userAddress: AnyAddress
    insuranceOptIn: bool = False
    deadlineSeconds: Annotated[int, Field(gt=0)] = 600
    # Tests and trials may pick the quorum (leader first) instead of the random choice.
    quorum: Annotated[list[ChecksumAddress], Field(min_length=3, max_length=3)] | None = None


class KeyGrants(Protocol):
    """Who may decrypt a CoFHE handle: the devnet CoFHE, when one runs beside this ICL."""

    def grant(self, handle: int, addresses: Iterable[str]) -> None: ...


ModelT = TypeVar("ModelT", bound=BaseModel)


def one_line(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def parse(model: type[ModelT], raw: bytes) -> ModelT:
    # Parsed from the very bytes that were signed, never from a re-serialised form.
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise DevnetError(400, one_line(exc)) from exc
