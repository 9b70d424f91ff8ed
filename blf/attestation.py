"""Attestation quote backends. Only ``mock`` (tier 0) exists on the network today."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from blf import __version__
from blf.errors import AttestationError

__all__ = ["BACKENDS", "DEFAULT_MOCK_KEY", "MOCK_KEY_ENV", "mock_key", "mock_quote", "runtime_hash"]

DEFAULT_MOCK_KEY = "weloveblindference"  # the network's published default
MOCK_KEY_ENV = "MOCK_ATTESTATION_KEY"
RUNTIME_ID = f"blf/{__version__}"


@dataclass(frozen=True)
class Backend:
    name: str
    tier: int
    available: bool
    about: str


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("mock", 0, True, "HMAC quote with a shared key; tier 0, for testnets"),
        Backend("tpm", 1, False, "TPM 2.0 quote; not yet accepted by the ICL"),
        Backend("sev-snp", 2, False, "AMD SEV-SNP report; not yet accepted by the ICL"),
        Backend("tdx", 2, False, "Intel TDX quote; not yet accepted by the ICL"),
    )
}


def mock_key(tee_key: str | None = None) -> str:
    """``--tee-key`` if given, else ``MOCK_ATTESTATION_KEY``, else the published default."""
    return tee_key or os.environ.get(MOCK_KEY_ENV) or DEFAULT_MOCK_KEY


def mock_quote(nonce_hex: str, key: str) -> str:
    """HMAC-SHA256(key, nonce bytes), hex without ``0x``."""
    try:
        nonce = bytes.fromhex(nonce_hex.removeprefix("0x"))
    except ValueError:
        raise AttestationError(f"challenge nonce is not hex: {nonce_hex!r}") from None
    return hmac.new(key.encode("utf-8"), nonce, hashlib.sha256).hexdigest()


def runtime_hash() -> str:
    return hashlib.sha256(RUNTIME_ID.encode("utf-8")).hexdigest()
