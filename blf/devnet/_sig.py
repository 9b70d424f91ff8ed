"""Request signatures of the ICL wire protocol (protocol.md §1), checked by the devnet ICL.

A node signs every ``/internal`` request with EIP-191 ``personal_sign`` over the UTF-8 string
``body_text + timestamp``. The public ICL does not check this yet; the devnet does, so that a
node whose signing is wrong fails here and not on the day the public ICL starts checking.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address

__all__ = [
    "HEADER_ADDRESS",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_CLOCK_SKEW_S",
    "SignatureRejected",
    "check_signed_request",
    "signed_message",
]

HEADER_ADDRESS = "X-Node-Address"
HEADER_TIMESTAMP = "X-Timestamp"
HEADER_SIGNATURE = "X-Signature"

# A signed request is accepted this long after (or before) its timestamp: long enough for
# honest clock drift, short enough that a captured request cannot be replayed for long.
MAX_CLOCK_SKEW_S = 300

_DECIMAL = re.compile(r"[0-9]+")


class SignatureRejected(Exception):
    """The request's signature headers do not prove who sent it; ``str()`` says why."""


def signed_message(body_text: str, timestamp: str) -> str:
    """The exact text a node signs: the raw body (empty for GET) followed by the timestamp."""
    return body_text + timestamp


def check_signed_request(headers: Mapping[str, str], body_text: str, now: float) -> str:
    """Return the checksummed address that signed this request, or raise SignatureRejected."""
    claimed = _required(headers, HEADER_ADDRESS)
    timestamp = _required(headers, HEADER_TIMESTAMP)
    signature = _required(headers, HEADER_SIGNATURE)
    if not is_address(claimed):
        raise SignatureRejected(f"{HEADER_ADDRESS} {claimed!r} is not an Ethereum address")
    _check_fresh(timestamp, now)
    signer = _recover(signed_message(body_text, timestamp), signature)
    if signer != to_checksum_address(claimed):
        raise SignatureRejected(
            f"signature was made by {signer}, not by {HEADER_ADDRESS} {claimed}"
            " (signed text must be the exact body followed by X-Timestamp)"
        )
    return signer


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureRejected(f"missing header {name}")
    return value


def _check_fresh(timestamp: str, now: float) -> None:
    if not _DECIMAL.fullmatch(timestamp):
        raise SignatureRejected(
            f"{HEADER_TIMESTAMP} {timestamp!r} is not unix seconds as a decimal string"
        )
    age = now - int(timestamp)
    if age > MAX_CLOCK_SKEW_S:
        raise SignatureRejected(
            f"{HEADER_TIMESTAMP} is {int(age)} s old (limit {MAX_CLOCK_SKEW_S} s)"
        )
    if -age > MAX_CLOCK_SKEW_S:
        raise SignatureRejected(
            f"{HEADER_TIMESTAMP} is {int(-age)} s in the future (limit {MAX_CLOCK_SKEW_S} s)"
        )


def _recover(message: str, signature: str) -> str:
    try:
        signer = Account.recover_message(encode_defunct(text=message), signature=signature)
    # eth-account reports a malformed signature through several unrelated exception types
    # (binascii.Error, ValueError, eth_utils.ValidationError, eth_keys.BadSignature): all of
    # them mean the same thing to a caller here.
    except Exception as exc:
        raise SignatureRejected(f"{HEADER_SIGNATURE} is not a valid signature: {exc}") from exc
    return to_checksum_address(signer)
