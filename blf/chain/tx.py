"""Transactions and fees: what every contract client of blf shares.

`TxClient` owns one RPC endpoint and (optionally) one key. It checks once that the RPC
serves the configured chain, prices EIP-1559 fees under the configured cap, hands out
nonces under a thread and file lock, and waits for receipts, replaying a reverted
transaction to recover its reason. With a `pending_path` it also journals every signed
transaction before sending it, so a retry after a dropped or unconfirmed transaction
resends the same signed bytes (same nonce: it can land at most once) instead of signing a
second one.

web3 is imported when a client is built, not with this module: the node's processes that
never talk to the chain (beat, the GPU side, a control worker without ``rpc_url``) then
never load it (about 15 MiB and 0.3 s each).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import requests
from eth_utils import is_address, keccak, to_checksum_address
from pydantic import BaseModel, ConfigDict

from blf.chain.pending import PendingJournal, PendingTx
from blf.errors import (
    ChainError,
    ChainIdMismatchError,
    ContractRevertError,
    InsufficientFundsError,
    PendingTransactionError,
)
from blf.redact import display_url

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from eth_typing import ChecksumAddress
    from web3.contract import Contract
    from web3.exceptions import ContractLogicError, Web3RPCError

__all__ = ["FeeQuote", "TxClient", "TxResult"]

log = logging.getLogger(__name__)

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
GWEI = 10**9
ETHER = 10**18

# Used when the node cannot suggest a tip (eth_maxPriorityFeePerGas is not universal).
DEFAULT_PRIORITY_FEE_WEI = 1 * GWEI
# Estimates are exact for the state they ran on; a margin absorbs state that moves before
# the transaction is mined (another heartbeat in the same block, a cold storage slot).
GAS_HEADROOM = Decimal("1.2")
# Nonce races resolve on the next read; more attempts than this means something else is wrong.
MAX_SEND_ATTEMPTS = 5


class FeeQuote(BaseModel):
    model_config = ConfigDict(frozen=True)

    base_fee: int
    max_priority_fee: int
    max_fee: int


class TxResult(BaseModel):
    """A mined, successful transaction."""

    model_config = ConfigDict(frozen=True)

    tx_hash: str
    nonce: int
    block_number: int
    gas_used: int
    effective_gas_price: int

    @property
    def fee_wei(self) -> int:
        return self.gas_used * self.effective_gas_price


class TxClient:
    """One RPC endpoint, one main contract and (optionally) one key.

    Without an account only the reads work. Thread-safe: transactions from several threads,
    or from several processes that pass the same `nonce_lock_path`, get distinct nonces.
    """

    # Named in errors: which contract is missing and which config field points at it.
    contract_name = "contract"
    address_field = "address"

    def __init__(
        self,
        rpc_url: str,
        *,
        chain_id: int,
        contract_address: str,
        abi: list[dict[str, Any]],
        error_abi: Sequence[dict[str, Any]] = (),
        account: LocalAccount | None = None,
        max_fee_gwei: float = 50.0,
        nonce_lock_path: Path | None = None,
        pending_path: Path | None = None,
        timeout_s: float = 30.0,
        receipt_timeout_s: float = 120.0,
    ) -> None:
        from web3 import Web3

        if not is_address(contract_address):
            raise ChainError(f"invalid {self.contract_name} address {contract_address!r}")
        if max_fee_gwei <= 0:
            raise ChainError(f"max fee cap must be positive, got {max_fee_gwei} gwei")
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self.contract_address = to_checksum_address(contract_address)
        self.account = account
        self.max_fee_wei = int(Decimal(str(max_fee_gwei)) * GWEI)
        self.receipt_timeout_s = receipt_timeout_s
        self._nonce_lock_path = nonce_lock_path
        self._pending = PendingJournal(pending_path) if pending_path else None
        self._thread_lock = threading.Lock()
        self._chain_checked = False
        self._display_url = display_url(rpc_url)
        # No provider-level retries: callers (periodic tasks) own the retry policy, and a
        # refused connection should fail in one round trip, not after seconds of backoff.
        provider = Web3.HTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=None
        )
        self._w3 = Web3(provider)
        self._contract = self._w3.eth.contract(address=self.contract_address, abi=abi)
        self._custom_errors = custom_errors([*abi, *error_abi])

    def __repr__(self) -> str:
        who = self.account.address if self.account else None
        name = type(self).__name__
        return f"{name}({self._display_url!r}, chain_id={self.chain_id}, account={who})"

    # ----------------------------------------------------------------- reads

    def check_chain_id(self) -> None:
        """Refuse an RPC that serves another chain than configured."""
        with self._rpc("eth_chainId"):
            actual = self._w3.eth.chain_id
        if actual != self.chain_id:
            raise ChainIdMismatchError(
                f"RPC {self._display_url} serves chain id {actual}, "
                f"but chain id {self.chain_id} is configured"
            )
        self._chain_checked = True

    def balance(self, address: str) -> int:
        self._ensure_chain()
        with self._rpc("eth_getBalance"):
            return int(self._w3.eth.get_balance(checksum(address)))

    def block_timestamp(self) -> int:
        """The latest block's timestamp: the contract's clock, not ours."""
        self._ensure_chain()
        with self._rpc("eth_getBlockByNumber"):
            return int(self._w3.eth.get_block("latest")["timestamp"])

    def fee_quote(self) -> FeeQuote:
        """EIP-1559 fees: 2x the base fee plus the tip, never above the configured cap."""
        self._ensure_chain()
        with self._rpc("eth_getBlockByNumber"):
            base_fee = self._w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            raise ChainError(f"RPC {self._display_url} reports no base fee (not an EIP-1559 chain)")
        if base_fee > self.max_fee_wei:
            raise ChainError(
                f"fees exceed the configured cap: base fee {gwei(base_fee)} gwei "
                f"> max fee {gwei(self.max_fee_wei)} gwei; raise the cap or wait"
            )
        priority = min(self._suggested_priority_fee(), self.max_fee_wei - base_fee)
        max_fee = min(2 * base_fee + priority, self.max_fee_wei)
        return FeeQuote(base_fee=base_fee, max_priority_fee=priority, max_fee=max_fee)

    def _call(self, contract: Contract, name: str, fn_name: str, *args: Any) -> Any:
        """A view call, its failures named `name.fn_name`."""
        self._ensure_chain()
        with self._rpc(f"{name}.{fn_name}"):
            return contract.functions[fn_name](*args).call()

    # ---------------------------------------------------------- transactions

    def _transact(
        self, contract: Contract, name: str, fn_name: str, args: Sequence[Any], *, value: int
    ) -> TxResult:
        account = self._require_account()
        self._ensure_chain()
        label = f"{name}.{fn_name}"
        to = str(contract.address)
        data = contract.encode_abi(fn_name, args=list(args))
        resumed = self._resume_pending(label, account.address, to, data, value)
        if resumed is not None:
            return resumed
        gas = self._estimate_gas(label, to, account.address, data, value)
        for attempt in range(1, MAX_SEND_ATTEMPTS + 1):
            fees = self.fee_quote()
            self._check_funds(account.address, gas, fees.max_fee, value)
            sent = self._sign_and_send(account, label, to, data, gas, fees, value)
            if sent is not None:
                tx_hash, nonce = sent
                break
            log.warning(
                "%s: nonce taken by another transaction, retrying (%d/%d)",
                label,
                attempt,
                MAX_SEND_ATTEMPTS,
            )
        else:
            raise ChainError(
                f"{label}: no free nonce for {account.address} after {MAX_SEND_ATTEMPTS} attempts"
            )
        log.info(
            "Sent %s tx %s (nonce %d, max fee %s gwei)", label, tx_hash, nonce, gwei(fees.max_fee)
        )
        return self._await_receipt(label, tx_hash, nonce, account.address, to, data, value)

    def _resume_pending(
        self, label: str, sender: str, to: str, data: str, value: int
    ) -> TxResult | None:
        """Finish a journalled transaction of the same kind before signing a new one.

        The same request gets the earlier transaction's result (resent first if the node
        dropped it); a different one is refused while the earlier may still land.
        """
        record = self._pending.get(label) if self._pending else None
        if record is None or record.sender != sender:
            return None
        receipt = self._receipt_or_none(record.tx_hash)
        if receipt is None and not self._nonce_used(record):
            self._rebroadcast(record)
        elif receipt is None:
            # Its nonce is used: mined between the two reads, or replaced by another tx.
            receipt = self._receipt_or_none(record.tx_hash)
            if receipt is None:
                log.warning(
                    "%s tx %s was replaced (nonce %d used)", label, record.tx_hash, record.nonce
                )
                self._forget(record)
                return None
        if (record.to, record.data, record.value) != (to, data, value):
            if receipt is not None:
                self._forget(record)  # mined earlier, only its journal entry was left
                return None
            raise PendingTransactionError(
                f"an earlier {label} tx {record.tx_hash} (nonce {record.nonce}) is still "
                "pending and was resent: nothing new sent; rerun once it is mined",
                tx_hash=record.tx_hash,
            )
        log.warning("%s: resuming tx %s (nonce %d)", label, record.tx_hash, record.nonce)
        return self._await_receipt(label, record.tx_hash, record.nonce, sender, to, data, value)

    def _receipt_or_none(self, tx_hash: str) -> Any:
        from hexbytes import HexBytes
        from web3.exceptions import TransactionNotFound

        try:
            with self._rpc("eth_getTransactionReceipt"):
                return self._w3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None

    def _nonce_used(self, record: PendingTx) -> bool:
        with self._rpc("eth_getTransactionCount"):
            mined = self._w3.eth.get_transaction_count(checksum(record.sender), "latest")
        return int(mined) > record.nonce

    def _rebroadcast(self, record: PendingTx) -> None:
        """Send the journalled bytes again; a node that still holds them says so."""
        from hexbytes import HexBytes
        from web3.exceptions import Web3RPCError

        try:
            with self._rpc("eth_sendRawTransaction"):
                self._w3.eth.send_raw_transaction(HexBytes(record.raw))
            log.warning("%s tx %s was not in the node's pool: resent", record.label, record.tx_hash)
        except ChainError as err:
            cause = err.__cause__
            # Known: still pooled. Nonce: mined meanwhile (the receipt wait will see it).
            if not isinstance(cause, Web3RPCError) or _send_error_kind(_rpc_message(cause)) not in (
                "known",
                "nonce",
            ):
                raise

    def _forget(self, record: PendingTx) -> None:
        if self._pending is not None:
            with self._nonce_guard():
                self._pending.clear(record.label, record.tx_hash)

    def _estimate_gas(self, label: str, to: str, sender: str, data: str, value: int) -> int:
        # No fee fields: with them a node checks the balance and reports "out of gas" for
        # an unfunded sender, hiding the revert reason and the real funding problem.
        from web3.exceptions import ContractLogicError

        tx: Any = {"from": sender, "to": to, "data": data, "value": value}
        try:
            with self._rpc(f"{label} gas estimate"):
                estimate = self._w3.eth.estimate_gas(tx)
        except ContractLogicError as err:
            reason = _reason_text(err, self._custom_errors)
            raise ContractRevertError(f"{label} reverted: {reason}", reason=reason) from err
        return int(Decimal(estimate) * GAS_HEADROOM)

    def _check_funds(self, sender: str, gas: int, max_fee: int, value: int) -> None:
        needed = gas * max_fee + value
        have = self.balance(sender)
        if have < needed:
            raise _insufficient_funds(sender, needed=needed, have=have)

    def _sign_and_send(
        self,
        account: LocalAccount,
        label: str,
        to: str,
        data: str,
        gas: int,
        fees: FeeQuote,
        value: int,
    ) -> tuple[str, int] | None:
        """Send once; None means the nonce was taken under us and the caller should retry."""
        # Reading the pending nonce and handing the signed transaction to the node must be
        # one step: once the node holds it, the next pending-nonce read counts it.
        with self._nonce_guard():
            with self._rpc("eth_getTransactionCount"):
                nonce = self._w3.eth.get_transaction_count(account.address, "pending")
            tx: Any = {
                "type": 2,
                "chainId": self.chain_id,
                "nonce": nonce,
                "to": to,
                "value": value,
                "data": data,
                "gas": gas,
                "maxFeePerGas": fees.max_fee,
                "maxPriorityFeePerGas": fees.max_priority_fee,
            }
            raw = bytes(account.sign_transaction(tx).raw_transaction)
            tx_hash = _hex(keccak(raw))
            if self._pending is not None:
                # Journalled before it can be mined, so no crash leaves it unaccounted for.
                self._pending.put(
                    PendingTx(
                        label=label,
                        sender=account.address,
                        to=to,
                        data=data,
                        value=value,
                        nonce=nonce,
                        tx_hash=tx_hash,
                        raw=_hex(raw),
                    )
                )
            try:
                with self._rpc("eth_sendRawTransaction"):
                    self._w3.eth.send_raw_transaction(raw)
            except ChainError as err:
                sent = self._handle_send_error(err, tx_hash, nonce, account.address)
                if sent is None and self._pending is not None:
                    self._pending.clear(label, tx_hash)
                return sent
        return tx_hash, nonce

    def _handle_send_error(
        self, err: ChainError, tx_hash: str, nonce: int, sender: str
    ) -> tuple[str, int] | None:
        from web3.exceptions import Web3RPCError

        cause = err.__cause__
        if not isinstance(cause, Web3RPCError):
            raise err
        kind = _send_error_kind(_rpc_message(cause))
        if kind == "known":
            # The node already holds these exact bytes (a retried POST): it is our transaction.
            return tx_hash, nonce
        if kind == "nonce":
            return None
        if kind == "funds":
            have = self.balance(sender)
            raise _insufficient_funds(sender, needed=None, have=have) from cause
        raise err

    def _await_receipt(
        self,
        label: str,
        tx_hash: str,
        nonce: int,
        sender: str,
        to: str,
        data: str,
        value: int,
    ) -> TxResult:
        from hexbytes import HexBytes
        from web3.exceptions import TimeExhausted

        try:
            with self._rpc("eth_getTransactionReceipt"):
                receipt = self._w3.eth.wait_for_transaction_receipt(
                    HexBytes(tx_hash), timeout=self.receipt_timeout_s
                )
        except TimeExhausted as err:
            retry = "rerun to resume it" if self._pending else "check before resending"
            raise ChainError(
                f"{label} tx {tx_hash} not mined within "
                f"{self.receipt_timeout_s:g}s; it may still be mined, {retry}"
            ) from err
        if self._pending is not None:
            with self._nonce_guard():
                self._pending.clear(label, tx_hash)
        block = int(receipt["blockNumber"])
        if receipt["status"] != 1:
            reason = self._replay_reason(sender, to, data, value, block)
            raise ContractRevertError(
                f"{label} tx {tx_hash} reverted in block {block}: {reason}", reason=reason
            )
        result = TxResult(
            tx_hash=tx_hash,
            nonce=nonce,
            block_number=block,
            gas_used=int(receipt["gasUsed"]),
            effective_gas_price=int(receipt["effectiveGasPrice"]),
        )
        log.info("Mined %s tx %s in block %d (gas used %d)", label, tx_hash, block, result.gas_used)
        return result

    def _replay_reason(self, sender: str, to: str, data: str, value: int, block: int) -> str:
        """A receipt carries no reason: replay the call on the state the block left."""
        # The block's state includes whatever earlier transaction in it made ours fail
        # (the usual case: a concurrent registration), so that is where the revert repeats.
        from web3.exceptions import ContractLogicError

        call: Any = {"from": sender, "to": to, "data": data, "value": value}
        try:
            with self._rpc("eth_call replay"):
                self._w3.eth.call(call, block_identifier=block)
        except ContractLogicError as err:
            return _reason_text(err, self._custom_errors)
        except ChainError:
            pass
        return "reverted without a reason (the call succeeds when replayed)"

    # ------------------------------------------------------------- internals

    def _ensure_chain(self) -> None:
        # The chain behind a URL does not change under a running client: check once.
        if not self._chain_checked:
            self.check_chain_id()

    def _require_account(self) -> LocalAccount:
        if self.account is None:
            raise ChainError("no operator key loaded: transactions need the wallet")
        return self.account

    def _suggested_priority_fee(self) -> int:
        from web3.exceptions import Web3RPCError

        try:
            with self._rpc("eth_maxPriorityFeePerGas"):
                return int(self._w3.eth.max_priority_fee)
        except ChainError as err:
            if isinstance(err.__cause__, Web3RPCError):
                return DEFAULT_PRIORITY_FEE_WEI
            raise

    @contextmanager
    def _nonce_guard(self) -> Iterator[None]:
        with self._thread_lock:
            if self._nonce_lock_path is None:
                yield
                return
            self._nonce_lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._nonce_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                # Closing the descriptor drops the flock, also if the process dies mid-send.
                os.close(fd)

    @contextmanager
    def _rpc(self, what: str) -> Iterator[None]:
        """Turn transport and node errors into one-line `ChainError`s naming the URL."""
        from web3.exceptions import (
            BadFunctionCallOutput,
            BadResponseFormat,
            ContractLogicError,
            ProviderConnectionError,
            TransactionNotFound,
            Web3RPCError,
        )

        try:
            yield
        except (ContractLogicError, TransactionNotFound):
            raise
        except (requests.RequestException, ProviderConnectionError, OSError) as err:
            reason = _without_url_secrets(_first_line(err), self.rpc_url)
            raise ChainError(
                f"cannot reach chain RPC {self._display_url} ({what}): {reason}"
            ) from err
        except BadFunctionCallOutput as err:
            raise ChainError(
                f"no {self.contract_name} at {self.contract_address} on chain {self.chain_id} "
                f"({what} returned nothing): check {self.address_field}"
            ) from err
        except BadResponseFormat as err:
            raise ChainError(
                f"chain RPC {self._display_url} gave a malformed answer to {what}"
            ) from err
        except Web3RPCError as err:
            raise ChainError(
                f"chain RPC {self._display_url} refused {what}: {_rpc_message(err)}"
            ) from err


# ------------------------------------------------------------------ helpers


def checksum(address: str) -> ChecksumAddress:
    if not is_address(address):
        raise ChainError(f"invalid address {address!r}")
    return to_checksum_address(address)


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def gwei(wei: int) -> str:
    return f"{Decimal(wei) / GWEI:f}"


def ether(wei: int) -> str:
    return f"{Decimal(wei) / ETHER:f}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _without_url_secrets(text: str, url: str) -> str:
    """urllib3 names the URL's path in its errors, and a hosted RPC's API key is the path."""
    raw, shown = urlsplit(url), urlsplit(display_url(url))
    pairs = [
        (url, display_url(url)),
        (
            raw.path + (f"?{raw.query}" if raw.query else ""),
            shown.path + ("?…" if raw.query else ""),
        ),
        (raw.path, shown.path),
        (raw.query, "…"),
        (raw.password or "", "***"),
    ]
    for secret, replacement in pairs:
        if len(secret) > 1 and secret != replacement:
            text = text.replace(secret, replacement)
    return text


def _rpc_message(err: Web3RPCError) -> str:
    response = err.rpc_response or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return _first_line(err)


SendErrorKind = Literal["known", "nonce", "funds", "other"]

# What nodes say (geth, anvil, nitro) when a nonce was used or a slot is already taken.
_NONCE_RACE_MARKERS = (
    "nonce too low",
    "replacement transaction underpriced",
    "replacement fee too low",
    "already exists",
)
_ALREADY_KNOWN_MARKERS = ("already known", "already imported", "known transaction")


def _send_error_kind(message: str) -> SendErrorKind:
    text = message.lower()
    if any(marker in text for marker in _ALREADY_KNOWN_MARKERS):
        return "known"
    if any(marker in text for marker in _NONCE_RACE_MARKERS):
        return "nonce"
    if "insufficient funds" in text:
        return "funds"
    return "other"


CustomErrors = dict[str, tuple[str, list[str]]]


def custom_errors(abi: Sequence[dict[str, Any]]) -> CustomErrors:
    """Selector (``0x`` + 8 hex digits) -> (name, argument types) of an ABI's custom errors."""
    found: CustomErrors = {}
    for entry in abi:
        if entry.get("type") != "error":
            continue
        types = [str(arg["type"]) for arg in entry.get("inputs", [])]
        selector = _hex(keccak(text=f"{entry['name']}({','.join(types)})")[:4])
        found[selector] = (str(entry["name"]), types)
    return found


def _reason_text(err: ContractLogicError, errors: CustomErrors | None = None) -> str:
    message = (err.message or "").strip()
    for prefix in ("execution reverted:", "execution reverted"):
        if message.lower().startswith(prefix):
            message = message[len(prefix) :].strip()
            break
    if message and not message.startswith("0x"):
        return message
    if isinstance(err.data, str) and err.data not in ("", "0x"):
        return _custom_error_text(err.data, errors or {})
    return "reverted without a reason"


def _custom_error_text(data: str, errors: CustomErrors) -> str:
    """`ERC20InsufficientBalance(0x…, 0, 1000)` for a known selector, else the selector."""
    from eth_abi import decode as abi_decode
    from eth_abi.exceptions import DecodingError

    known = errors.get(data[:10].lower())
    if known is None:
        return f"custom error {data[:10]}"
    name, types = known
    try:
        args = abi_decode(types, bytes.fromhex(data[10:]))
    except (ValueError, DecodingError):
        return name
    return f"{name}({', '.join(str(arg) for arg in args)})"


def _insufficient_funds(address: str, *, needed: int | None, have: int) -> InsufficientFundsError:
    need = f"needs at least {ether(needed)} ETH" if needed is not None else "needs more ETH"
    return InsufficientFundsError(
        f"insufficient funds: fund {address} (has {ether(have)} ETH, {need} for gas and stake)",
        address=address,
    )
