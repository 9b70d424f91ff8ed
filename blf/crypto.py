"""The node's symmetric cryptography and commitments, as pure functions.

Three formats live here, and each one is fixed by someone else, so none may drift:

* prompt and output blobs (protocol.md section 2): AES-256-GCM, no associated data, laid
  out ``iv (12) ‖ tag (16) ‖ ciphertext``. ``cryptography`` returns ``ciphertext ‖ tag``,
  so the tag is moved on the way out and back on the way in;
* the commitment a leader publishes and a verifier recomputes: ``SHA-256(SHA-256(cid) ‖
  SHA-256(normalize(output)))``. ``normalize`` must be byte-for-byte the public node's
  Python definition, or honest nodes disagree on the same output;
* sealed secrets: keys that cross Redis between the control machine and GPU machines.
  The job id is the associated data, so a sealed key replayed into another job (or read
  with another cluster's key) fails authentication instead of decrypting.

Every failure is a ``CryptoError`` (malformed input) or a ``TamperedError`` (authentication
failed). Messages never carry key bytes, plaintext or ciphertext.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blf.errors import CryptoError, TamperedError

__all__ = [
    "IV_BYTES",
    "KEY_BYTES",
    "TAG_BYTES",
    "commitment",
    "commitment_of",
    "decrypt_blob",
    "encrypt_blob",
    "join_key",
    "new_key",
    "normalize",
    "output_hash",
    "seal",
    "split_key",
    "unseal",
]

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
HALF_BITS = 128

_WHITESPACE_RUN = re.compile(r"\s+")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def new_key() -> bytes:
    """A fresh AES-256 key from the OS's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _aead(key: bytes) -> AESGCM:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise CryptoError(f"AES-256 key must be {KEY_BYTES} bytes, got {size}")
    return AESGCM(bytes(key))


def _open(aead: AESGCM, iv: bytes, sealed: bytes, associated: bytes | None, what: str) -> bytes:
    try:
        return aead.decrypt(iv, sealed, associated)
    except InvalidTag:
        # InvalidTag says nothing more, so neither can we: both causes look the same.
        raise TamperedError(
            f"{what} failed AES-GCM authentication: wrong key or altered bytes"
        ) from None


def encrypt_blob(key: bytes, plaintext: bytes) -> bytes:
    """``iv ‖ tag ‖ ciphertext`` under ``key``, with a fresh random IV every call."""
    aead = _aead(key)
    iv = secrets.token_bytes(IV_BYTES)
    sealed = aead.encrypt(iv, plaintext, None)
    return iv + sealed[-TAG_BYTES:] + sealed[:-TAG_BYTES]


def decrypt_blob(key: bytes, blob: bytes) -> bytes:
    """The plaintext of an ``iv ‖ tag ‖ ciphertext`` blob, or ``TamperedError``."""
    aead = _aead(key)
    if len(blob) < IV_BYTES + TAG_BYTES:
        raise CryptoError(
            f"encrypted blob is {len(blob)} bytes, shorter than the "
            f"{IV_BYTES + TAG_BYTES}-byte iv and tag it must start with"
        )
    head = IV_BYTES + TAG_BYTES
    iv, tag, ciphertext = blob[:IV_BYTES], blob[IV_BYTES:head], blob[head:]
    return _open(aead, bytes(iv), bytes(ciphertext + tag), None, "encrypted blob")


def split_key(key: bytes) -> tuple[int, int]:
    """The two ``uint128`` halves CoFHE stores a key as: ``(high, low)``, big-endian."""
    if len(key) != KEY_BYTES:
        raise CryptoError(f"key to split must be {KEY_BYTES} bytes, got {len(key)}")
    half = KEY_BYTES // 2
    return int.from_bytes(key[:half], "big"), int.from_bytes(key[half:], "big")


def join_key(high: int, low: int) -> bytes:
    """The key whose halves are ``high`` and ``low`` (as CoFHE decrypts them)."""
    for name, value in (("high", high), ("low", low)):
        if not 0 <= value < 2**HALF_BITS:
            # The value is (half of) a key: name the problem, never print the number.
            raise CryptoError(f"key half {name!r} is not a uint128 (outside 0 .. 2**128-1)")
    half = KEY_BYTES // 2
    return high.to_bytes(half, "big") + low.to_bytes(half, "big")


def normalize(text: str) -> str:
    """The public node's normalization, verbatim: Python's Unicode whitespace, not ASCII's."""
    return _WHITESPACE_RUN.sub(" ", text.strip())


def output_hash(text: str) -> str:
    """Lowercase hex SHA-256 of the normalized output, as UTF-8."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def commitment(output_cid: str, output_sha256: str) -> str:
    """``SHA-256(SHA-256(utf8(output_cid)) ‖ output_sha256)``, lowercase hex, no ``0x``.

    The CID is only ever hashed, never parsed: a public leader may publish a fake one."""
    if not isinstance(output_sha256, str) or not _SHA256_HEX.fullmatch(output_sha256):
        raise CryptoError("output hash must be 64 hex characters (a SHA-256 digest)")
    cid_digest = hashlib.sha256(output_cid.encode("utf-8")).digest()
    return hashlib.sha256(cid_digest + bytes.fromhex(output_sha256)).hexdigest()


def commitment_of(output_cid: str, output: str) -> str:
    """The commitment to ``output`` published under ``output_cid``."""
    return commitment(output_cid, output_hash(output))


def seal(cluster_key: bytes, job_id: str, secret: bytes) -> str:
    """``secret`` encrypted for one job, as hex ``iv ‖ ciphertext ‖ tag``, fit for Redis."""
    aead = _aead(cluster_key)
    iv = secrets.token_bytes(IV_BYTES)
    return (iv + aead.encrypt(iv, secret, job_id.encode("utf-8"))).hex()


def unseal(cluster_key: bytes, job_id: str, sealed: str) -> bytes:
    """The secret ``seal`` sealed for ``job_id``; ``TamperedError`` for another job or key."""
    aead = _aead(cluster_key)
    try:
        raw = bytes.fromhex(sealed)
    except (ValueError, TypeError):
        raise CryptoError(f"sealed secret for job {job_id!r} is not hex") from None
    if len(raw) < IV_BYTES + TAG_BYTES:
        raise CryptoError(
            f"sealed secret for job {job_id!r} is {len(raw)} bytes, shorter than "
            f"the {IV_BYTES + TAG_BYTES}-byte iv and tag"
        )
    what = f"sealed secret for job {job_id!r}"
    return _open(aead, raw[:IV_BYTES], raw[IV_BYTES:], job_id.encode("utf-8"), what)
