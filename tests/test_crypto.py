"""blf.crypto: the blob layout, commitments and sealing must match protocol.md exactly."""

from __future__ import annotations

import hashlib
import re

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from blf.crypto import (
    IV_BYTES,
    KEY_BYTES,
    TAG_BYTES,
    commitment,
    commitment_of,
    decrypt_blob,
    encrypt_blob,
    join_key,
    new_key,
    normalize,
    output_hash,
    seal,
    split_key,
    unseal,
)
from blf.errors import CryptoError, TamperedError

keys = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)
payloads = st.binary(max_size=512)
job_ids = st.text(max_size=40)
HEAD = IV_BYTES + TAG_BYTES


def test_constants_and_new_key() -> None:
    assert (KEY_BYTES, IV_BYTES, TAG_BYTES) == (32, 12, 16)
    first, second = new_key(), new_key()
    assert len(first) == 32 and first != second


# --- blobs ---------------------------------------------------------------------------------


@given(keys, payloads)
def test_blob_round_trip(key: bytes, plaintext: bytes) -> None:
    blob = encrypt_blob(key, plaintext)
    assert len(blob) == HEAD + len(plaintext)
    assert decrypt_blob(key, blob) == plaintext


def test_blob_iv_is_fresh_each_time() -> None:
    key = new_key()
    assert encrypt_blob(key, b"same")[:IV_BYTES] != encrypt_blob(key, b"same")[:IV_BYTES]


@given(keys, payloads, st.data())
@settings(max_examples=200)
def test_blob_any_flipped_bit_is_refused(key: bytes, plaintext: bytes, data: st.DataObject) -> None:
    blob = bytearray(encrypt_blob(key, plaintext))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TamperedError):
        decrypt_blob(key, bytes(blob))


@given(keys, payloads, st.data())
@settings(max_examples=200)
def test_blob_any_truncation_is_refused(key: bytes, plaintext: bytes, data: st.DataObject) -> None:
    blob = encrypt_blob(key, plaintext)
    start = data.draw(st.integers(0, len(blob)))
    end = data.draw(st.integers(start, len(blob)))
    cut = blob[:start] + blob[end:]
    if cut == blob:
        return  # nothing removed
    with pytest.raises(CryptoError):  # TamperedError is a CryptoError
        decrypt_blob(key, cut)


@given(keys, keys, payloads)
def test_blob_wrong_key_is_tampered(key: bytes, other: bytes, plaintext: bytes) -> None:
    if key == other:
        return
    with pytest.raises(TamperedError, match="wrong key or altered bytes"):
        decrypt_blob(other, encrypt_blob(key, plaintext))


@given(keys, payloads)
def test_blob_made_by_aesgcm_in_documented_layout_decrypts(key: bytes, plaintext: bytes) -> None:
    iv = b"\x07" * IV_BYTES
    sealed = AESGCM(key).encrypt(iv, plaintext, None)  # ciphertext ‖ tag
    blob = iv + sealed[-TAG_BYTES:] + sealed[:-TAG_BYTES]  # iv ‖ tag ‖ ciphertext
    assert decrypt_blob(key, blob) == plaintext


@given(keys, payloads)
def test_our_blob_decrypts_with_plain_aesgcm(key: bytes, plaintext: bytes) -> None:
    blob = encrypt_blob(key, plaintext)
    iv, tag, ciphertext = blob[:IV_BYTES], blob[IV_BYTES:HEAD], blob[HEAD:]
    assert AESGCM(key).decrypt(iv, ciphertext + tag, None) == plaintext


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_blob_bad_key_size(size: int) -> None:
    with pytest.raises(CryptoError, match="32 bytes") as caught:
        decrypt_blob(b"k" * size, b"\0" * 40)
    assert not isinstance(caught.value, TamperedError)
    with pytest.raises(CryptoError, match="32 bytes"):
        encrypt_blob(b"k" * size, b"x")


@pytest.mark.parametrize("size", [0, 1, 27])
def test_blob_too_short(size: int) -> None:
    with pytest.raises(CryptoError, match="shorter") as caught:
        decrypt_blob(new_key(), b"\0" * size)
    assert not isinstance(caught.value, TamperedError)


def test_messages_carry_no_secrets() -> None:
    key, plaintext = b"\xab" * 32, b"the secret prompt"
    blob = encrypt_blob(key, plaintext)
    with pytest.raises(TamperedError) as caught:
        decrypt_blob(b"\xcd" * 32, blob)
    message = str(caught.value)
    assert "\n" not in message and "prompt" not in message
    assert key.hex() not in message and "ab" * 8 not in message and "secret" not in message


# --- key halves ----------------------------------------------------------------------------


@given(keys)
def test_split_join_round_trip(key: bytes) -> None:
    high, low = split_key(key)
    assert 0 <= high < 2**128 and 0 <= low < 2**128
    assert high == int.from_bytes(key[:16], "big") and low == int.from_bytes(key[16:], "big")
    assert join_key(high, low) == key


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1))
def test_join_split_round_trip(high: int, low: int) -> None:
    assert split_key(join_key(high, low)) == (high, low)


@pytest.mark.parametrize("high, low", [(-1, 0), (0, -1), (2**128, 0), (0, 2**128)])
def test_join_key_refuses_non_uint128(high: int, low: int) -> None:
    with pytest.raises(CryptoError, match="uint128"):
        join_key(high, low)


def test_split_key_refuses_wrong_size() -> None:
    with pytest.raises(CryptoError):
        split_key(b"\0" * 31)


# --- normalization and commitments ---------------------------------------------------------

whitespace_runs = st.text(alphabet=" \t\n\r\f\v\u00a0\u3000\u2003\u1680\x85", min_size=1)
words = st.lists(st.text(alphabet="abcXYZ09.,é漢", min_size=1), min_size=1, max_size=8)


@given(st.text())
def test_normalize_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert once == re.sub(r"\s+", " ", text.strip())


@given(words, st.data())
def test_normalize_equal_across_whitespace_runs(parts: list[str], data: st.DataObject) -> None:
    def spaced() -> str:
        gaps = [data.draw(whitespace_runs) for _ in range(len(parts) + 1)]
        return gaps[0] + "".join(p + g for p, g in zip(parts, gaps[1:], strict=True))

    first, second = spaced(), spaced()
    assert normalize(first) == normalize(second) == " ".join(parts)
    assert output_hash(first) == output_hash(second)


def test_normalize_unicode_whitespace() -> None:
    assert normalize("\u3000 a\u00a0\u00a0b\t\nc \u3000") == "a b c"
    assert normalize("a\u200bb") == "a\u200bb"  # zero-width space is not whitespace to Python


def test_output_hash_vector() -> None:
    expected = hashlib.sha256(b"hello world").hexdigest()
    assert output_hash("  hello \u00a0\n world\t") == expected


def test_commitment_fixed_vector() -> None:
    cid = "bafkreid7af5y3qsyl5srccaxtbhtmcv4exvdushxrobpqyphzflgtz2fyu"
    output = "MOCK_OUTPUT_abc\n\n  done "
    inner = hashlib.sha256(cid.encode("utf-8")).digest()
    inner += hashlib.sha256(b"MOCK_OUTPUT_abc done").digest()
    expected = hashlib.sha256(inner).hexdigest()
    assert commitment_of(cid, output) == expected
    assert commitment(cid, output_hash(output)) == expected
    assert re.fullmatch(r"[0-9a-f]{64}", expected)


def test_commitment_accepts_any_cid_string() -> None:
    # A public leader may invent a CID that is not even base58: it is only ever hashed.
    fake = "Qm" + "0" * 44
    assert len(commitment_of(fake, "x")) == 64
    assert commitment_of(fake, "x") != commitment_of(fake + "1", "x")


@pytest.mark.parametrize("bad", ["", "ab", "0x" + "a" * 62, "g" * 64, "a" * 63, "a" * 65])
def test_commitment_refuses_bad_output_hash(bad: str) -> None:
    with pytest.raises(CryptoError, match="64 hex"):
        commitment("cid", bad)


def test_commitment_accepts_uppercase_hash() -> None:
    digest = output_hash("x")
    assert commitment("cid", digest.upper()) == commitment("cid", digest)


# --- sealing -------------------------------------------------------------------------------


@given(keys, job_ids, payloads)
def test_seal_round_trip(key: bytes, job_id: str, secret: bytes) -> None:
    sealed = seal(key, job_id, secret)
    assert re.fullmatch(r"[0-9a-f]*", sealed)
    assert len(sealed) == 2 * (HEAD + len(secret))
    assert unseal(key, job_id, sealed) == secret


@given(keys, job_ids, job_ids, payloads)
def test_unseal_with_another_job_id_is_tampered(
    key: bytes, job_id: str, other: str, secret: bytes
) -> None:
    if job_id == other:
        return
    with pytest.raises(TamperedError):
        unseal(key, other, seal(key, job_id, secret))


@given(keys, keys, job_ids, payloads)
def test_unseal_with_another_key_is_tampered(
    key: bytes, other: bytes, job_id: str, secret: bytes
) -> None:
    if key == other:
        return
    with pytest.raises(TamperedError):
        unseal(other, job_id, seal(key, job_id, secret))


@given(keys, payloads, st.data())
@settings(max_examples=200)
def test_unseal_flipped_bit_is_tampered(key: bytes, secret: bytes, data: st.DataObject) -> None:
    raw = bytearray.fromhex(seal(key, "job-1", secret))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TamperedError):
        unseal(key, "job-1", raw.hex())


def test_seal_layout_is_iv_ciphertext_tag_with_job_id_as_aad() -> None:
    key = new_key()
    raw = bytes.fromhex(seal(key, "job-7", b"secret"))
    assert AESGCM(key).decrypt(raw[:IV_BYTES], raw[IV_BYTES:], b"job-7") == b"secret"


@pytest.mark.parametrize("sealed", ["zz", "abc", "00" * 27, ""])
def test_unseal_malformed(sealed: str) -> None:
    with pytest.raises(CryptoError) as caught:
        unseal(new_key(), "job", sealed)
    assert not isinstance(caught.value, TamperedError)
