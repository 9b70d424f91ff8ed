"""The operator key: a standard encrypted Ethereum keystore (v3, scrypt) and request signing.

The key is decrypted once on the control machine and kept in memory only; it is never
logged, never written in the clear, and never placed in a Celery message.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from blf.errors import WalletError, WrongPasswordError

__all__ = [
    "PASSWORD_ENV",
    "PASSWORD_FILE_ENV",
    "create_keystore",
    "keystore_address",
    "load_account",
    "read_password",
    "sign_text",
]

PASSWORD_ENV = "BLF_KEY_PASSWORD"
PASSWORD_FILE_ENV = "BLF_KEY_PASSWORD_FILE"
PRIVATE_KEY_ENV = "BLF_PRIVATE_KEY"


def read_password(*, confirm: bool = False, prompt: Callable[[str], str] = getpass.getpass) -> str:
    """``BLF_KEY_PASSWORD`` if set; else the first line of the file ``BLF_KEY_PASSWORD_FILE``
    names (a Docker or compose secret, a systemd credential: the password then stays out of
    every environment); else ask on the terminal without echo."""
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        return from_env
    file_name = os.environ.get(PASSWORD_FILE_ENV)
    if file_name:
        return _password_from_file(Path(file_name))
    if not sys.stdin.isatty():
        raise WalletError(
            f"no keystore password: set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, or run interactively"
        )
    password = prompt("Keystore password: ")
    if confirm and prompt("Repeat password: ") != password:
        raise WalletError("the two passwords differ")
    return password


def _password_from_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise WalletError(
            f"cannot read the keystore password from {path} ({PASSWORD_FILE_ENV}): {why}"
        ) from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise WalletError(f"{path} ({PASSWORD_FILE_ENV}) holds no password on its first line")
    return lines[0]


def create_keystore(path: Path, password: str, private_key: str | None = None) -> str:
    """Write a new keystore (fresh key, or ``private_key`` imported); returns the address."""
    if private_key:
        try:
            account = Account.from_key(private_key)
        except (ValueError, TypeError):
            raise WalletError(f"{PRIVATE_KEY_ENV} is not a valid private key") from None
    else:
        account = Account.create()
    keystore = Account.encrypt(account.key, password, kdf="scrypt")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: a chmod after writing leaves a readable window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(keystore, handle)
    os.chmod(path, 0o600)
    return str(account.address)


def _read_keystore(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WalletError(f"keystore not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WalletError(f"keystore {path} is unreadable: {exc}") from None
    if not isinstance(data, dict) or "crypto" not in {k.lower() for k in data}:
        raise WalletError(f"keystore {path} is not an Ethereum v3 keystore")
    return data


def keystore_address(path: Path) -> str | None:
    """The address a keystore declares, read without the password (None if absent)."""
    address = _read_keystore(path).get("address")
    if not address:
        return None
    text = str(address)
    try:
        return to_checksum_address(text if text.startswith("0x") else f"0x{text}")
    except ValueError:
        raise WalletError(f"keystore {path} declares an invalid address {text!r}") from None


def load_account(path: Path, password: str) -> LocalAccount:
    data = _read_keystore(path)
    try:
        key = Account.decrypt(data, password)
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise WrongPasswordError(f"wrong password for keystore {path}") from None
        raise WalletError(f"keystore {path} cannot be decrypted: {exc}") from None
    # A malformed keystore (missing field, unknown KDF, wrong types) surfaces from
    # eth-keyfile as KeyError or TypeError: still a broken keystore, not a crash.
    except KeyError as exc:
        raise WalletError(f"keystore {path} is not a valid v3 keystore: no {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise WalletError(f"keystore {path} is not a valid v3 keystore: {exc}") from None
    account: LocalAccount = Account.from_key(key)
    return account


def sign_text(account: LocalAccount, text: str) -> str:
    """EIP-191 ``personal_sign`` of a UTF-8 string, as ``0x`` + hex."""
    signed = account.sign_message(encode_defunct(text=text))
    return "0x" + signed.signature.hex().removeprefix("0x")
