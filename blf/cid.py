"""Content identifiers (CIDs) of single-block blobs, computed and checked locally.

A gateway or an RPC node can serve any bytes for a CID; the only thing that makes a CID
worth having is that the bytes can be checked against it. This module does that check
for the shapes IPFS gives a small file (protocol.md section 4):

* CIDv1, codec raw (0x55): the block *is* the file; the multihash is sha2-256 of the bytes.
  What ``ipfs add --cid-version=1`` (raw leaves) makes of a file that fits in one chunk.
* CIDv0 (``Qm…``) and CIDv1 dag-pb (0x70): a dag-pb node holding a UnixFS File whose data
  is inline. What ``ipfs add`` (``--raw-leaves=false``) makes of a file of one chunk.

A dag-pb file of several chunks is a tree whose shape depends on the chunker and layout
that made it: it cannot be rebuilt from the bytes alone, so it is refused as unverifiable
rather than trusted. Stdlib only: the devnet IPFS service uses this module as well.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from blf.errors import CidMismatchError, UnverifiableCidError

__all__ = [
    "CHUNK_SIZE",
    "DAG_PB",
    "MAX_BLOCK",
    "RAW",
    "SHA2_256",
    "Cid",
    "cid_v0",
    "cid_v1_dag_pb",
    "cid_v1_raw",
    "dag_pb_file_node",
    "parse",
    "verify",
]

RAW = 0x55
DAG_PB = 0x70
SHA2_256 = 0x12
MAX_BLOCK = 1 << 20  # the largest block IPFS implementations exchange
CHUNK_SIZE = 262144  # Kubo's default chunker (size-262144): a larger file has several chunks

_CODEC_NAMES = {RAW: "raw", DAG_PB: "dag-pb", 0x71: "dag-cbor", 0x0129: "dag-json"}
_HASH_NAMES = {
    0x00: "identity",
    0x11: "sha1",
    0x13: "sha2-512",
    0x1E: "blake3",
    0xB220: "blake2b-256",
}
_MULTIBASE_NAMES = {"k": "base36", "K": "base36upper", "m": "base64", "u": "base64url"}
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX = {c: i for i, c in enumerate(_BASE58)}


@dataclass(frozen=True)
class Cid:
    """A parsed CID: version, content codec and sha2-256 digest (the only hash we check)."""

    version: int
    codec: int
    digest: bytes

    @property
    def codec_name(self) -> str:
        return _CODEC_NAMES.get(self.codec, hex(self.codec))

    @property
    def block_key(self) -> tuple[int, bytes]:
        """Equal for CIDv0 and CIDv1 dag-pb of the same node: they name the same block."""
        return (self.codec, self.digest)

    def encode(self) -> str:
        """The canonical text: ``Qm…`` for v0, multibase base32 ``b…`` for v1."""
        if self.version == 0:
            return _base58_encode(_multihash(self.digest))
        return "b" + _base32(_varint(1) + _varint(self.codec) + _multihash(self.digest))


# --------------------------------------------------------------------------- computing


def cid_v1_raw(data: bytes) -> str:
    """The CIDv1 (raw, sha2-256, base32) of ``data`` stored as one block."""
    return Cid(1, RAW, hashlib.sha256(data).digest()).encode()


def cid_v0(data: bytes) -> str:
    """The CIDv0 ``Qm…`` of ``data`` added as a single-chunk UnixFS file."""
    return Cid(0, DAG_PB, hashlib.sha256(dag_pb_file_node(data)).digest()).encode()


def cid_v1_dag_pb(data: bytes) -> str:
    """The CIDv1 dag-pb (base32 ``bafybei…``) of ``data`` added as a single-chunk file."""
    return Cid(1, DAG_PB, hashlib.sha256(dag_pb_file_node(data)).digest()).encode()


def dag_pb_file_node(data: bytes) -> bytes:
    """The dag-pb block of a UnixFS File with ``data`` inline and no links, as Kubo writes
    it: PBNode{Data: UnixFS{Type: File, Data: data, filesize: len}} (an empty file has no
    Data field in UnixFS, only its filesize of 0)."""
    unixfs = b"\x08\x02"  # field 1 (Type), varint: File = 2
    if data:
        unixfs += b"\x12" + _varint(len(data)) + data  # field 2 (Data), bytes
    unixfs += b"\x18" + _varint(len(data))  # field 3 (filesize), varint
    return b"\x0a" + _varint(len(unixfs)) + unixfs  # PBNode field 1 (Data), bytes


# --------------------------------------------------------------------------- checking


def parse(cid: str) -> Cid:
    """Parse ``cid``; UnverifiableCidError for any CID whose bytes we could not check."""
    text = cid.strip()
    if not text:
        raise UnverifiableCidError("empty CID")
    if len(text) == 46 and text.startswith("Qm"):
        return _parse_multihash(_base58_decode(text, cid), cid, version=0, codec=DAG_PB)
    raw = _multibase_decode(text, cid)
    if raw[:1] == b"\x12":  # a v0 multihash in another base: still a CIDv0
        return _parse_multihash(raw, cid, version=0, codec=DAG_PB)
    version, offset = _read_varint(raw, 0, cid)
    if version != 1:
        raise UnverifiableCidError(f"CID {cid}: unsupported CID version {version}")
    codec, offset = _read_varint(raw, offset, cid)
    if codec not in (RAW, DAG_PB):
        name = _CODEC_NAMES.get(codec, hex(codec))
        raise UnverifiableCidError(f"CID {cid}: codec {name} cannot be checked (raw, dag-pb only)")
    return _parse_multihash(raw[offset:], cid, version=1, codec=codec)


def verify(cid: str, data: bytes) -> None:
    """Return if ``data`` is the content ``cid`` names; raise CidMismatchError if it is not,
    UnverifiableCidError if this CID cannot be checked against bytes at all."""
    parsed = parse(cid)
    if parsed.codec == RAW:
        if hashlib.sha256(data).digest() != parsed.digest:
            raise CidMismatchError(f"{len(data)} bytes do not hash to CID {cid}")
        return
    if hashlib.sha256(dag_pb_file_node(data)).digest() == parsed.digest:
        return
    if len(data) > CHUNK_SIZE:
        # Likely a file of several chunks, whose tree depends on how it was added.
        raise UnverifiableCidError(
            f"dag-pb CID {cid}: {len(data)} bytes would need more than one chunk"
            f" ({CHUNK_SIZE} bytes); only single-chunk dag-pb files can be checked"
        )
    raise CidMismatchError(f"{len(data)} bytes are not the single-chunk file of CID {cid}")


def _parse_multihash(raw: bytes, cid: str, *, version: int, codec: int) -> Cid:
    code, offset = _read_varint(raw, 0, cid)
    if code != SHA2_256:
        name = _HASH_NAMES.get(code, hex(code))
        raise UnverifiableCidError(f"CID {cid}: hash {name} cannot be checked (sha2-256 only)")
    length, offset = _read_varint(raw, offset, cid)
    digest = raw[offset:]
    if length != 32 or len(digest) != 32:
        raise UnverifiableCidError(f"CID {cid}: malformed sha2-256 multihash")
    return Cid(version, codec, digest)


# --------------------------------------------------------------------------- encodings


def _multihash(digest: bytes) -> bytes:
    return bytes([SHA2_256, len(digest)]) + digest


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(raw: bytes, offset: int, cid: str) -> tuple[int, int]:
    value = shift = 0
    for index in range(offset, min(len(raw), offset + 9)):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise UnverifiableCidError(f"CID {cid}: truncated or malformed varint")


def _base32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def _multibase_decode(text: str, cid: str) -> bytes:
    prefix, body = text[0], text[1:]
    try:
        if prefix in "bB":
            padded = body.upper() + "=" * (-len(body) % 8)
            return base64.b32decode(padded)
        if prefix == "z":
            return _base58_decode(body, cid)
        if prefix in "fF":
            return bytes.fromhex(body)
    except ValueError:  # binascii.Error is a ValueError
        raise UnverifiableCidError(f"CID {cid}: not valid multibase text") from None
    name = _MULTIBASE_NAMES.get(prefix)
    what = f"multibase {prefix!r} ({name})" if name else f"unknown multibase prefix {prefix!r}"
    raise UnverifiableCidError(f"CID {cid}: {what} not supported (base32, base58btc, base16)")


def _base58_encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    out = []
    while number:
        number, rest = divmod(number, 58)
        out.append(_BASE58[rest])
    zeros = len(raw) - len(raw.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


def _base58_decode(text: str, cid: str) -> bytes:
    number = 0
    for char in text:
        index = _BASE58_INDEX.get(char)
        if index is None:
            raise UnverifiableCidError(f"CID {cid}: {char!r} is not a base58btc character")
        number = number * 58 + index
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body
