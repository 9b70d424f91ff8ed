"""CIDs computed and checked locally: the spec's vectors, well-known ones, and refusals."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blf import cid
from blf.errors import CidMismatchError, UnverifiableCidError

HELLO = b"hello blindference"
HELLO_V1_RAW = "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"  # protocol.md §4
HELLO_V0 = "QmS8cv9WqAGMttWBsuevrxJAKk9yGyf59egT8zNGcMQcwB"  # protocol.md §4
# Well-known CIDs of the empty file, as Kubo prints them.
EMPTY_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
EMPTY_V1_DAG_PB = "bafybeif7ztnhq65lumvvtr4ekcwd2ifwgm3awq4zfr3srh462rwyinlb4y"
EMPTY_V1_RAW = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def _v1(codec: int, multihash: bytes, prefix: str = "b") -> str:
    raw = bytes([1]) + _varint(codec) + multihash
    if prefix == "b":
        return "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    if prefix == "f":
        return "f" + raw.hex()
    raise AssertionError(prefix)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _sha256_multihash(data: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(data).digest()


def test_spec_vectors() -> None:
    assert cid.cid_v1_raw(HELLO) == HELLO_V1_RAW
    assert cid.cid_v0(HELLO) == HELLO_V0
    cid.verify(HELLO_V1_RAW, HELLO)
    cid.verify(HELLO_V0, HELLO)


def test_empty_file_vectors() -> None:
    assert cid.cid_v0(b"") == EMPTY_V0
    assert cid.cid_v1_dag_pb(b"") == EMPTY_V1_DAG_PB
    assert cid.cid_v1_raw(b"") == EMPTY_V1_RAW
    for text in (EMPTY_V0, EMPTY_V1_DAG_PB, EMPTY_V1_RAW):
        cid.verify(text, b"")


def test_v1_dag_pb_of_a_single_chunk_file_verifies() -> None:
    v1 = cid.cid_v1_dag_pb(HELLO)
    assert v1.startswith("bafybei")
    cid.verify(v1, HELLO)
    # CIDv0 and CIDv1 dag-pb of one file name the same block.
    assert cid.parse(v1).block_key == cid.parse(HELLO_V0).block_key
    with pytest.raises(CidMismatchError):
        cid.verify(v1, HELLO + b"!")


def test_other_multibases_of_the_same_cid_verify() -> None:
    raw_cid = cid.parse(HELLO_V1_RAW)
    as_hex = _v1(cid.RAW, b"\x12\x20" + raw_cid.digest, prefix="f")
    cid.verify(as_hex, HELLO)
    cid.verify(HELLO_V1_RAW.upper(), HELLO)  # "B": base32 upper case
    assert cid.parse(as_hex) == raw_cid
    assert cid.parse(HELLO_V0).encode() == HELLO_V0
    assert raw_cid.encode() == HELLO_V1_RAW


def test_mismatch_is_reported() -> None:
    with pytest.raises(CidMismatchError, match="do not hash to CID"):
        cid.verify(HELLO_V1_RAW, b"hello blindferencf")
    with pytest.raises(CidMismatchError):
        cid.verify(HELLO_V0, b"")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty CID"),
        ("not a cid", "unknown multibase"),
        ("kbafkreid7af", "base36"),
        ("b!!!!", "not valid multibase"),
        ("Qm" + "0" * 44, "not a base58btc character"),
        ("bae", "malformed varint"),
    ],
)
def test_unparseable_cids_are_unverifiable(text: str, reason: str) -> None:
    with pytest.raises(UnverifiableCidError, match=reason):
        cid.verify(text, HELLO)


def test_other_hashes_and_codecs_are_unverifiable() -> None:
    sha512 = b"\x13\x40" + hashlib.sha512(HELLO).digest()
    with pytest.raises(UnverifiableCidError, match="hash sha2-512"):
        cid.verify(_v1(cid.RAW, sha512), HELLO)
    identity = b"\x00" + _varint(len(HELLO)) + HELLO
    with pytest.raises(UnverifiableCidError, match="hash identity"):
        cid.verify(_v1(cid.RAW, identity), HELLO)
    with pytest.raises(UnverifiableCidError, match="codec dag-cbor"):
        cid.verify(_v1(0x71, _sha256_multihash(HELLO)), HELLO)
    with pytest.raises(UnverifiableCidError, match="malformed sha2-256"):
        cid.verify(_v1(cid.RAW, b"\x12\x10" + bytes(16)), HELLO)
    version_2 = "b" + base64.b32encode(b"\x02\x55" + _sha256_multihash(HELLO)).decode().lower()
    with pytest.raises(UnverifiableCidError, match="CID version 2"):
        cid.verify(version_2.rstrip("="), HELLO)


def test_dag_pb_beyond_one_chunk_is_unverifiable_unless_it_is_one_node() -> None:
    big = bytes(cid.CHUNK_SIZE + 1)
    other = cid.cid_v0(b"x")
    with pytest.raises(UnverifiableCidError, match="more than one chunk"):
        cid.verify(other, big)
    # A node holding it all inline (``--chunker=size-1048576``) is still checked exactly.
    cid.verify(cid.cid_v0(big), big)
    # At the limit itself the bytes are one chunk: a wrong CID is a plain mismatch.
    with pytest.raises(CidMismatchError):
        cid.verify(other, bytes(cid.CHUNK_SIZE))


def test_varint_lengths_above_one_byte() -> None:
    # Lengths of 128 and more take multi-byte varints inside the dag-pb node.
    for size in (127, 128, 300, 16384, cid.CHUNK_SIZE):
        data = bytes([7]) * size
        node = cid.dag_pb_file_node(data)
        assert node.endswith(b"\x18" + _varint(size))
        cid.verify(cid.cid_v0(data), data)


@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_round_trip_and_any_other_bytes_fail(data: bytes, other: bytes) -> None:
    for text in (cid.cid_v1_raw(data), cid.cid_v0(data), cid.cid_v1_dag_pb(data)):
        cid.verify(text, data)
        if other != data:
            with pytest.raises(CidMismatchError):
                cid.verify(text, other)


@given(st.binary(min_size=1, max_size=256))
def test_a_single_flipped_bit_fails(data: bytes) -> None:
    flipped = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(CidMismatchError):
        cid.verify(cid.cid_v1_raw(data), flipped)
