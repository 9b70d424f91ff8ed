"""NodeRegistry calls: the node's registration, its on-chain heartbeat, and reads.

One `ChainClient` per RPC endpoint and operator key. Every public method checks first that
the RPC serves the configured chain, so a misconfigured URL can never receive a signed
transaction. Failures surface as the `ChainError` leaves of `blf.errors`, each a single line
naming what to act on (the URL, the address to fund, the contract's revert reason).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict

from blf.chain.tx import ZERO_ADDRESS, TxClient, TxResult, _hex, checksum
from blf.errors import ChainError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

__all__ = ["NODE_REGISTRY_ABI", "ChainClient", "ChainNodeStatus", "HeartbeatOutcome", "NodeRecord"]

log = logging.getLogger(__name__)

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


class ChainClient(TxClient):
    """NodeRegistry client for one RPC endpoint, one registry and (optionally) one key.

    Without an account only the reads work. Thread-safe: transactions from several threads,
    or from several processes that pass the same `nonce_lock_path`, get distinct nonces.
    """

    contract_name = "NodeRegistry"
    address_field = "node_registry_address"

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
        super().__init__(
            rpc_url,
            chain_id=chain_id,
            contract_address=registry_address,
            abi=NODE_REGISTRY_ABI,
            account=account,
            max_fee_gwei=max_fee_gwei,
            nonce_lock_path=nonce_lock_path,
            timeout_s=timeout_s,
            receipt_timeout_s=receipt_timeout_s,
        )

    @property
    def registry_address(self) -> str:
        return self.contract_address

    # ----------------------------------------------------------------- reads

    def get_node(self, address: str) -> NodeRecord:
        return _node_record(
            self._call(self._contract, "NodeRegistry", "getNode", checksum(address))
        )

    def is_active(self, address: str) -> bool:
        return bool(self._call(self._contract, "NodeRegistry", "isActive", checksum(address)))

    def heartbeat_grace_seconds(self) -> int:
        return int(self._call(self._contract, "NodeRegistry", "heartbeatGraceSeconds"))

    def min_stake(self) -> int:
        return int(self._call(self._contract, "NodeRegistry", "minStake"))

    def node_status(self, address: str) -> ChainNodeStatus:
        checksummed = checksum(address)
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
        return self._transact(self._contract, "NodeRegistry", "register", args, value=stake_wei)

    def heartbeat(self) -> TxResult:
        return self._transact(self._contract, "NodeRegistry", "heartbeat", (), value=0)

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


# ------------------------------------------------------------------ helpers


def _node_record(raw: Sequence[Any]) -> NodeRecord:
    operator, tier, att_hash, registered_at, last_hb, expires, active, models, stake = raw
    return NodeRecord(
        operator=to_checksum_address(operator),
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
