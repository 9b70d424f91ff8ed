"""NodeRegistry calls: the node's registration, its on-chain heartbeat, and reads.

One `ChainClient` per RPC endpoint and operator key. Every public method checks first that
the RPC serves the configured chain, so a misconfigured URL can never receive a signed
transaction. Failures surface as the `ChainError` leaves of `blf.errors`, each a single line
naming what to act on (the URL, the address to fund, the contract's revert reason).
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
from typing import Any, Literal

import requests
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from pydantic import BaseModel, ConfigDict
from web3 import Web3
from web3.exceptions import (
    BadFunctionCallOutput,
    BadResponseFormat,
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    Web3RPCError,
)

from blf.errors import (
    ChainError,
    ChainIdMismatchError,
    ContractRevertError,
    InsufficientFundsError,
)
from blf.redact import display_url

__all__ = [
    "NODE_REGISTRY_ABI",
    "ChainClient",
    "ChainNodeStatus",
    "FeeQuote",
    "HeartbeatOutcome",
    "NodeRecord",
    "TxResult",
]

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

# Only the entries blf calls, copied from shared/contracts/NodeRegistry.json (the full artifact
# is a test fixture, never read at runtime).
NODE_REGISTRY_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "register",
        "stateMutability": "payable",
        "inputs": [
            {"name": "tier", "type": "uint8", "internalType": "uint8"},
            {"name": "attestationHash", "type": "bytes32", "internalType": "bytes32"},
            {"name": "attestationExpires", "type": "uint64", "internalType": "uint64"},
            {"name": "models", "type": "string[]", "internalType": "string[]"},
        ],
        "outputs": [{"name": "", "type": "bool", "internalType": "bool"}],
    },
    {
        "type": "function",
        "name": "heartbeat",
        "stateMutability": "nonpayable",
        "inputs": [],
        "outputs": [],
    },
    {
        "type": "function",
        "name": "getNode",
        "stateMutability": "view",
        "inputs": [{"name": "node", "type": "address", "internalType": "address"}],
        "outputs": [
            {
                "name": "",
                "type": "tuple",
                "internalType": "struct NodeRegistry.Node",
                "components": [
                    {"name": "operator", "type": "address", "internalType": "address"},
                    {"name": "tier", "type": "uint8", "internalType": "uint8"},
                    {"name": "attestationHash", "type": "bytes32", "internalType": "bytes32"},
                    {"name": "registeredAt", "type": "uint64", "internalType": "uint64"},
                    {"name": "lastHeartbeat", "type": "uint64", "internalType": "uint64"},
                    {"name": "attestationExpires", "type": "uint64", "internalType": "uint64"},
                    {"name": "active", "type": "bool", "internalType": "bool"},
                    {"name": "models", "type": "string[]", "internalType": "string[]"},
                    {"name": "stake", "type": "uint256", "internalType": "uint256"},
                ],
            }
        ],
    },
    {
        "type": "function",
        "name": "isActive",
        "stateMutability": "view",
        "inputs": [{"name": "node", "type": "address", "internalType": "address"}],
        "outputs": [{"name": "", "type": "bool", "internalType": "bool"}],
    },
    {
        "type": "function",
        "name": "heartbeatGraceSeconds",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint64", "internalType": "uint64"}],
    },
    {
        "type": "function",
        "name": "minStake",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
]


class NodeRecord(BaseModel):
    """`NodeRegistry.getNode(address)`; an unregistered address reads as all zeros."""

    model_config = ConfigDict(frozen=True)

    operator: str
    tier: int
    attestation_hash: str
    registered_at: int
    last_heartbeat: int
    attestation_expires: int
    active: bool
    models: list[str]
    stake: int

    @property
    def registered(self) -> bool:
        return self.operator != ZERO_ADDRESS


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


class HeartbeatOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Literal["sent", "skipped", "not_registered"]
    tx: TxResult | None = None
    # Set when skipped: how long until a heartbeat is due again.
    seconds_until_due: int | None = None
    # The registry's lastHeartbeat before this call (None when not registered).
    last_heartbeat: int | None = None

    @property
    def tx_hash(self) -> str | None:
        return self.tx.tx_hash if self.tx else None


class ChainNodeStatus(BaseModel):
    """Everything `chain status` shows about one address."""

    model_config = ConfigDict(frozen=True)

    chain_id: int
    registry_address: str
    address: str
    node: NodeRecord
    is_active: bool
    balance_wei: int
    heartbeat_grace_seconds: int
    block_timestamp: int

    @property
    def seconds_since_heartbeat(self) -> int | None:
        if not self.node.registered:
            return None
        return self.block_timestamp - self.node.last_heartbeat


class ChainClient:
    """NodeRegistry client for one RPC endpoint, one registry and (optionally) one key.

    Without an account only the reads work. Thread-safe: transactions from several threads,
    or from several processes that pass the same `nonce_lock_path`, get distinct nonces.
    """

    def __init__(
        self,
        rpc_url: str,
        *,
        chain_id: int,
        registry_address: str,
        account: LocalAccount | None = None,
        max_fee_gwei: float = 50.0,
        nonce_lock_path: Path | None = None,
        timeout_s: float = 30.0,
        receipt_timeout_s: float = 120.0,
    ) -> None:
        if not Web3.is_address(registry_address):
            raise ChainError(f"invalid NodeRegistry address {registry_address!r}")
        if max_fee_gwei <= 0:
            raise ChainError(f"max fee cap must be positive, got {max_fee_gwei} gwei")
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self.registry_address = Web3.to_checksum_address(registry_address)
        self.account = account
        self.max_fee_wei = int(Decimal(str(max_fee_gwei)) * GWEI)
        self.receipt_timeout_s = receipt_timeout_s
        self._nonce_lock_path = nonce_lock_path
        self._thread_lock = threading.Lock()
        self._chain_checked = False
        self._display_url = display_url(rpc_url)
        # No provider-level retries: callers (periodic tasks) own the retry policy, and a
        # refused connection should fail in one round trip, not after seconds of backoff.
        provider = Web3.HTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout_s}, exception_retry_configuration=None
        )
        self._w3 = Web3(provider)
        self._contract = self._w3.eth.contract(address=self.registry_address, abi=NODE_REGISTRY_ABI)

    def __repr__(self) -> str:
        who = self.account.address if self.account else None
        return f"ChainClient({self._display_url!r}, chain_id={self.chain_id}, account={who})"

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

    def get_node(self, address: str) -> NodeRecord:
        self._ensure_chain()
        with self._rpc("NodeRegistry.getNode"):
            raw = self._contract.functions.getNode(_checksum(address)).call()
        return _node_record(raw)

    def is_active(self, address: str) -> bool:
        self._ensure_chain()
        with self._rpc("NodeRegistry.isActive"):
            return bool(self._contract.functions.isActive(_checksum(address)).call())

    def heartbeat_grace_seconds(self) -> int:
        self._ensure_chain()
        with self._rpc("NodeRegistry.heartbeatGraceSeconds"):
            return int(self._contract.functions.heartbeatGraceSeconds().call())

    def min_stake(self) -> int:
        self._ensure_chain()
        with self._rpc("NodeRegistry.minStake"):
            return int(self._contract.functions.minStake().call())

    def balance(self, address: str) -> int:
        self._ensure_chain()
        with self._rpc("eth_getBalance"):
            return int(self._w3.eth.get_balance(_checksum(address)))

    def block_timestamp(self) -> int:
        """The latest block's timestamp: the contract's clock, not ours."""
        self._ensure_chain()
        with self._rpc("eth_getBlockByNumber"):
            return int(self._w3.eth.get_block("latest")["timestamp"])

    def node_status(self, address: str) -> ChainNodeStatus:
        checksummed = _checksum(address)
        return ChainNodeStatus(
            chain_id=self.chain_id,
            registry_address=self.registry_address,
            address=checksummed,
            node=self.get_node(checksummed),
            is_active=self.is_active(checksummed),
            balance_wei=self.balance(checksummed),
            heartbeat_grace_seconds=self.heartbeat_grace_seconds(),
            block_timestamp=self.block_timestamp(),
        )

    def fee_quote(self) -> FeeQuote:
        """EIP-1559 fees: 2x the base fee plus the tip, never above the configured cap."""
        self._ensure_chain()
        with self._rpc("eth_getBlockByNumber"):
            base_fee = self._w3.eth.get_block("latest").get("baseFeePerGas")
        if base_fee is None:
            raise ChainError(f"RPC {self._display_url} reports no base fee (not an EIP-1559 chain)")
        if base_fee > self.max_fee_wei:
            raise ChainError(
                f"fees exceed the configured cap: base fee {_gwei(base_fee)} gwei "
                f"> max fee {_gwei(self.max_fee_wei)} gwei; raise the cap or wait"
            )
        priority = min(self._suggested_priority_fee(), self.max_fee_wei - base_fee)
        max_fee = min(2 * base_fee + priority, self.max_fee_wei)
        return FeeQuote(base_fee=base_fee, max_priority_fee=priority, max_fee=max_fee)

    # ---------------------------------------------------------- transactions

    def register(
        self,
        *,
        tier: int,
        cert_hash: str,
        expiry: int,
        models: Sequence[str],
        stake_wei: int = 0,
    ) -> TxResult:
        if not 0 <= tier <= 255:
            raise ChainError(f"tier {tier} does not fit the registry's uint8")
        if not 0 <= expiry < 2**64:
            raise ChainError(f"attestation expiry {expiry} does not fit the registry's uint64")
        if stake_wei < 0:
            raise ChainError(f"stake must not be negative, got {stake_wei} wei")
        args = (tier, _bytes32(cert_hash), expiry, list(models))
        return self._transact("register", args, value=stake_wei)

    def heartbeat(self) -> TxResult:
        return self._transact("heartbeat", (), value=0)

    def heartbeat_if_due(self, *, interval_s: int, margin_s: int) -> HeartbeatOutcome:
        """Send a heartbeat only when the last one is `interval_s - margin_s` old or older.

        Reads the registry's own lastHeartbeat against the latest block's time, so restarts,
        other processes and manual heartbeats all count, and no local state is needed.
        """
        address = self._require_account().address
        node = self.get_node(address)
        if not node.registered:
            log.warning("On-chain heartbeat skipped: %s is not registered in the registry", address)
            return HeartbeatOutcome(status="not_registered")
        self._warn_if_grace_shorter(interval_s - margin_s)
        elapsed = self.block_timestamp() - node.last_heartbeat
        due_in = interval_s - margin_s - elapsed
        if due_in > 0:
            log.debug("On-chain heartbeat not due for %ss", due_in)
            return HeartbeatOutcome(
                status="skipped", seconds_until_due=due_in, last_heartbeat=node.last_heartbeat
            )
        tx = self.heartbeat()
        return HeartbeatOutcome(status="sent", tx=tx, last_heartbeat=node.last_heartbeat)

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
        try:
            with self._rpc("eth_maxPriorityFeePerGas"):
                return int(self._w3.eth.max_priority_fee)
        except ChainError as err:
            if isinstance(err.__cause__, Web3RPCError):
                return DEFAULT_PRIORITY_FEE_WEI
            raise

    def _warn_if_grace_shorter(self, interval_s: int) -> None:
        grace = self.heartbeat_grace_seconds()
        # A proxy whose owner never set the grace reads 0; nothing useful to say then.
        if 0 < grace < interval_s:
            log.warning(
                "On-chain heartbeat interval %ss exceeds the registry's grace of %ss: "
                "the node will read as inactive between heartbeats",
                interval_s,
                grace,
            )

    def _transact(self, fn_name: str, args: Sequence[Any], *, value: int) -> TxResult:
        account = self._require_account()
        self._ensure_chain()
        data = self._contract.encode_abi(fn_name, args=list(args))
        gas = self._estimate_gas(fn_name, account.address, data, value)
        for attempt in range(1, MAX_SEND_ATTEMPTS + 1):
            fees = self.fee_quote()
            self._check_funds(account.address, gas, fees.max_fee, value)
            sent = self._sign_and_send(account, data, gas, fees, value)
            if sent is not None:
                tx_hash, nonce = sent
                break
            log.warning(
                "NodeRegistry.%s: nonce taken by another transaction, retrying (%d/%d)",
                fn_name,
                attempt,
                MAX_SEND_ATTEMPTS,
            )
        else:
            raise ChainError(
                f"NodeRegistry.{fn_name}: no free nonce for {account.address} "
                f"after {MAX_SEND_ATTEMPTS} attempts"
            )
        log.info(
            "Sent NodeRegistry.%s tx %s (nonce %d, max fee %s gwei)",
            fn_name,
            tx_hash,
            nonce,
            _gwei(fees.max_fee),
        )
        return self._await_receipt(fn_name, tx_hash, nonce, account.address, data, value)

    def _estimate_gas(self, fn_name: str, sender: str, data: str, value: int) -> int:
        # No fee fields: with them a node checks the balance and reports "out of gas" for
        # an unfunded sender, hiding the revert reason and the real funding problem.
        tx: Any = {"from": sender, "to": self.registry_address, "data": data, "value": value}
        try:
            with self._rpc(f"NodeRegistry.{fn_name} gas estimate"):
                estimate = self._w3.eth.estimate_gas(tx)
        except ContractLogicError as err:
            raise _revert_error(fn_name, err) from err
        return int(Decimal(estimate) * GAS_HEADROOM)

    def _check_funds(self, sender: str, gas: int, max_fee: int, value: int) -> None:
        needed = gas * max_fee + value
        have = self.balance(sender)
        if have < needed:
            raise _insufficient_funds(sender, needed=needed, have=have)

    def _sign_and_send(
        self, account: LocalAccount, data: str, gas: int, fees: FeeQuote, value: int
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
                "to": self.registry_address,
                "value": value,
                "data": data,
                "gas": gas,
                "maxFeePerGas": fees.max_fee,
                "maxPriorityFeePerGas": fees.max_priority_fee,
            }
            raw = account.sign_transaction(tx).raw_transaction
            try:
                with self._rpc("eth_sendRawTransaction"):
                    tx_hash = self._w3.eth.send_raw_transaction(raw)
            except ChainError as err:
                return self._handle_send_error(err, raw, nonce, account.address)
        return _hex(tx_hash), nonce

    def _handle_send_error(
        self, err: ChainError, raw: bytes, nonce: int, sender: str
    ) -> tuple[str, int] | None:
        cause = err.__cause__
        if not isinstance(cause, Web3RPCError):
            raise err
        kind = _send_error_kind(_rpc_message(cause))
        if kind == "known":
            # The node already holds these exact bytes (a retried POST): it is our transaction.
            return _hex(Web3.keccak(raw)), nonce
        if kind == "nonce":
            return None
        if kind == "funds":
            have = self.balance(sender)
            raise _insufficient_funds(sender, needed=None, have=have) from cause
        raise err

    def _await_receipt(
        self, fn_name: str, tx_hash: str, nonce: int, sender: str, data: str, value: int
    ) -> TxResult:
        try:
            with self._rpc("eth_getTransactionReceipt"):
                receipt = self._w3.eth.wait_for_transaction_receipt(
                    HexBytes(tx_hash), timeout=self.receipt_timeout_s
                )
        except TimeExhausted as err:
            raise ChainError(
                f"NodeRegistry.{fn_name} tx {tx_hash} not mined within "
                f"{self.receipt_timeout_s:g}s; it may still be mined, check before resending"
            ) from err
        block = int(receipt["blockNumber"])
        if receipt["status"] != 1:
            reason = self._replay_reason(sender, data, value, block)
            raise ContractRevertError(
                f"NodeRegistry.{fn_name} tx {tx_hash} reverted in block {block}: {reason}",
                reason=reason,
            )
        result = TxResult(
            tx_hash=tx_hash,
            nonce=nonce,
            block_number=block,
            gas_used=int(receipt["gasUsed"]),
            effective_gas_price=int(receipt["effectiveGasPrice"]),
        )
        log.info(
            "Mined NodeRegistry.%s tx %s in block %d (gas used %d)",
            fn_name,
            tx_hash,
            block,
            result.gas_used,
        )
        return result

    def _replay_reason(self, sender: str, data: str, value: int, block: int) -> str:
        """A receipt carries no reason: replay the call on the state the block left."""
        # The block's state includes whatever earlier transaction in it made ours fail
        # (the usual case: a concurrent registration), so that is where the revert repeats.
        call: Any = {"from": sender, "to": self.registry_address, "data": data, "value": value}
        try:
            with self._rpc("eth_call replay"):
                self._w3.eth.call(call, block_identifier=block)
        except ContractLogicError as err:
            return _reason_text(err)
        except ChainError:
            pass
        return "reverted without a reason (the call succeeds when replayed)"

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
        try:
            yield
        except ContractLogicError:
            raise
        except (requests.RequestException, ProviderConnectionError, OSError) as err:
            raise ChainError(
                f"cannot reach chain RPC {self._display_url} ({what}): {_first_line(err)}"
            ) from err
        except BadFunctionCallOutput as err:
            raise ChainError(
                f"no NodeRegistry at {self.registry_address} on chain {self.chain_id} "
                f"({what} returned nothing): check node_registry_address"
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


def _node_record(raw: Sequence[Any]) -> NodeRecord:
    operator, tier, att_hash, registered_at, last_hb, expires, active, models, stake = raw
    return NodeRecord(
        operator=Web3.to_checksum_address(operator),
        tier=int(tier),
        attestation_hash=_hex(att_hash),
        registered_at=int(registered_at),
        last_heartbeat=int(last_hb),
        attestation_expires=int(expires),
        active=bool(active),
        models=list(models),
        stake=int(stake),
    )


def _bytes32(cert_hash: str) -> bytes:
    """`0x`-hex of at most 32 bytes, left-padded: a hash printed as an int loses leading zeros."""
    digits = cert_hash[2:] if cert_hash[:2].lower() == "0x" else cert_hash
    if not digits or len(digits) > 64:
        raise ChainError(f"attestation hash {cert_hash!r} is not 1 to 32 bytes of hex")
    try:
        return bytes.fromhex(digits.rjust(64, "0"))
    except ValueError as err:
        raise ChainError(f"attestation hash {cert_hash!r} is not hex") from err


def _checksum(address: str) -> ChecksumAddress:
    if not Web3.is_address(address):
        raise ChainError(f"invalid address {address!r}")
    return Web3.to_checksum_address(address)


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _gwei(wei: int) -> str:
    return f"{Decimal(wei) / GWEI:f}"


def _ether(wei: int) -> str:
    return f"{Decimal(wei) / ETHER:f}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


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


def _reason_text(err: ContractLogicError) -> str:
    message = (err.message or "").strip()
    for prefix in ("execution reverted:", "execution reverted"):
        if message.lower().startswith(prefix):
            message = message[len(prefix) :].strip()
            break
    if message:
        return message
    if isinstance(err.data, str) and err.data not in ("", "0x"):
        return f"custom error {err.data[:10]}"
    return "reverted without a reason"


def _revert_error(fn_name: str, err: ContractLogicError) -> ContractRevertError:
    reason = _reason_text(err)
    return ContractRevertError(f"NodeRegistry.{fn_name} reverted: {reason}", reason=reason)


def _insufficient_funds(address: str, *, needed: int | None, have: int) -> InsufficientFundsError:
    need = f"needs at least {_ether(needed)} ETH" if needed is not None else "needs more ETH"
    return InsufficientFundsError(
        f"insufficient funds: fund {address} (has {_ether(have)} ETH, {need} for gas and stake)",
        address=address,
    )
