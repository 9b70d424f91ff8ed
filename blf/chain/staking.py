"""BLIND staking: stake, unstake, withdraw after unbonding, and the reads behind them.

`StakingClient` talks to `BlindferenceStaking` at the configured `staking_address` and to
the ERC-20 the contract itself names (`blindToken()`), never to a token address taken on
trust from config. Everything blf can refuse (a malformed amount, one below `MIN_STAKE`, a
withdrawal before the unbonding period ends) is refused here, before anything is signed.
Amounts are integers in the token's smallest unit; `parse_amount` and `format_amount`
convert from and to BLIND as an operator writes it.
"""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from blf.chain.tx import TxClient, TxResult, checksum
from blf.errors import StakeAmountError, UnbondingError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3.contract import Contract

__all__ = [
    "BLIND_ABI",
    "STAKING_ABI",
    "StakeInfo",
    "StakeOutcome",
    "StakingClient",
    "StakingStatus",
    "UnstakeOutcome",
    "format_amount",
    "parse_amount",
]

log = logging.getLogger(__name__)

UINT256_MAX = 2**256 - 1
STAKING = "BlindferenceStaking"
TOKEN = "BLIND"

# Only the entries blf calls, copied from shared/contracts/{BLIND,BlindferenceStaking}.json.
BLIND_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "allowance",
        "stateMutability": "view",
        "inputs": [
            {"name": "owner", "type": "address", "internalType": "address"},
            {"name": "spender", "type": "address", "internalType": "address"},
        ],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
    {
        "type": "function",
        "name": "approve",
        "stateMutability": "nonpayable",
        "inputs": [
            {"name": "spender", "type": "address", "internalType": "address"},
            {"name": "value", "type": "uint256", "internalType": "uint256"},
        ],
        "outputs": [{"name": "", "type": "bool", "internalType": "bool"}],
    },
    {
        "type": "function",
        "name": "balanceOf",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address", "internalType": "address"}],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
    {
        "type": "function",
        "name": "decimals",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint8", "internalType": "uint8"}],
    },
    {
        "type": "function",
        "name": "symbol",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "string", "internalType": "string"}],
    },
]

STAKING_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "MAX_CONSECUTIVE_FAILURES",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
    {
        "type": "function",
        "name": "MIN_STAKE",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
    {
        "type": "function",
        "name": "UNBONDING_PERIOD",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint256", "internalType": "uint256"}],
    },
    {
        "type": "function",
        "name": "blindToken",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "address", "internalType": "contract IERC20"}],
    },
    {
        "type": "function",
        "name": "canCompleteUnstake",
        "stateMutability": "view",
        "inputs": [{"name": "node", "type": "address", "internalType": "address"}],
        "outputs": [{"name": "", "type": "bool", "internalType": "bool"}],
    },
    {
        "type": "function",
        "name": "completeUnstake",
        "stateMutability": "nonpayable",
        "inputs": [],
        "outputs": [],
    },
    {
        "type": "function",
        "name": "getStakeInfo",
        "stateMutability": "view",
        "inputs": [{"name": "node", "type": "address", "internalType": "address"}],
        "outputs": [
            {
                "name": "",
                "type": "tuple",
                "internalType": "struct BlindferenceStaking.StakeInfo",
                "components": [
                    {"name": "staked", "type": "uint256", "internalType": "uint256"},
                    {"name": "unbonding", "type": "uint256", "internalType": "uint256"},
                    {"name": "unbondingAvailableAt", "type": "uint256", "internalType": "uint256"},
                    {"name": "consecutiveFailures", "type": "uint256", "internalType": "uint256"},
                    {"name": "active", "type": "bool", "internalType": "bool"},
                ],
            }
        ],
    },
    {
        "type": "function",
        "name": "initiateUnstake",
        "stateMutability": "nonpayable",
        "inputs": [],
        "outputs": [],
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
        "name": "stake",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "amount", "type": "uint256", "internalType": "uint256"}],
        "outputs": [],
    },
]


# Custom errors of both contracts (the staking contract bubbles up the token's), for
# naming a revert that carries no reason string.
CUSTOM_ERRORS_ABI: list[dict[str, Any]] = [
    {
        "type": "error",
        "name": "ERC20InsufficientAllowance",
        "inputs": [
            {"name": "spender", "type": "address"},
            {"name": "allowance", "type": "uint256"},
            {"name": "needed", "type": "uint256"},
        ],
    },
    {
        "type": "error",
        "name": "ERC20InsufficientBalance",
        "inputs": [
            {"name": "sender", "type": "address"},
            {"name": "balance", "type": "uint256"},
            {"name": "needed", "type": "uint256"},
        ],
    },
    {
        "type": "error",
        "name": "ERC20InvalidApprover",
        "inputs": [{"name": "approver", "type": "address"}],
    },
    {
        "type": "error",
        "name": "ERC20InvalidReceiver",
        "inputs": [{"name": "receiver", "type": "address"}],
    },
    {
        "type": "error",
        "name": "ERC20InvalidSender",
        "inputs": [{"name": "sender", "type": "address"}],
    },
    {
        "type": "error",
        "name": "ERC20InvalidSpender",
        "inputs": [{"name": "spender", "type": "address"}],
    },
    {
        "type": "error",
        "name": "OwnableInvalidOwner",
        "inputs": [{"name": "owner", "type": "address"}],
    },
    {
        "type": "error",
        "name": "OwnableUnauthorizedAccount",
        "inputs": [{"name": "account", "type": "address"}],
    },
    {"type": "error", "name": "ReentrancyGuardReentrantCall", "inputs": []},
    {
        "type": "error",
        "name": "SafeERC20FailedOperation",
        "inputs": [{"name": "token", "type": "address"}],
    },
]


class StakeInfo(BaseModel):
    """`getStakeInfo(address)`; an address that never staked reads as all zeros."""

    model_config = ConfigDict(frozen=True)

    staked: int
    unbonding: int
    unbonding_available_at: int
    consecutive_failures: int
    active: bool


class StakingStatus(BaseModel):
    """Everything `staking status` shows about one address."""

    model_config = ConfigDict(frozen=True)

    chain_id: int
    staking_address: str
    token_address: str
    address: str
    info: StakeInfo
    is_active: bool
    min_stake: int
    unbonding_period: int
    max_consecutive_failures: int
    decimals: int
    balance_wei: int
    token_balance: int
    block_timestamp: int

    @property
    def unlocks_in(self) -> int | None:
        """Seconds until the unbonding tokens can be withdrawn (0: now); None: nothing unbonding."""
        if not self.info.unbonding:
            return None
        return max(self.info.unbonding_available_at - self.block_timestamp, 0)


class StakeOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    approve: TxResult | None  # None: the allowance already covered the amount
    stake: TxResult
    info: StakeInfo


class UnstakeOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    tx: TxResult
    info: StakeInfo


class StakingClient(TxClient):
    """BlindferenceStaking and its BLIND token for one RPC endpoint and (optionally) one key."""

    contract_name = STAKING
    address_field = "staking_address"

    def __init__(
        self,
        rpc_url: str,
        *,
        chain_id: int,
        staking_address: str,
        account: LocalAccount | None = None,
        max_fee_gwei: float = 50.0,
        nonce_lock_path: Path | None = None,
        pending_path: Path | None = None,
        timeout_s: float = 30.0,
        receipt_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(
            rpc_url,
            chain_id=chain_id,
            contract_address=staking_address,
            abi=STAKING_ABI,
            error_abi=CUSTOM_ERRORS_ABI,
            account=account,
            max_fee_gwei=max_fee_gwei,
            nonce_lock_path=nonce_lock_path,
            pending_path=pending_path,
            timeout_s=timeout_s,
            receipt_timeout_s=receipt_timeout_s,
        )
        self._token_contract: Contract | None = None

    @property
    def staking_address(self) -> str:
        return self.contract_address

    # ----------------------------------------------------------------- reads

    def token_address(self) -> str:
        return str(self._token().address)

    def min_stake(self) -> int:
        return int(self._call(self._contract, STAKING, "MIN_STAKE"))

    def unbonding_period(self) -> int:
        return int(self._call(self._contract, STAKING, "UNBONDING_PERIOD"))

    def max_consecutive_failures(self) -> int:
        return int(self._call(self._contract, STAKING, "MAX_CONSECUTIVE_FAILURES"))

    def stake_info(self, address: str) -> StakeInfo:
        raw = self._call(self._contract, STAKING, "getStakeInfo", checksum(address))
        staked, unbonding, available_at, failures, active = raw
        return StakeInfo(
            staked=int(staked),
            unbonding=int(unbonding),
            unbonding_available_at=int(available_at),
            consecutive_failures=int(failures),
            active=bool(active),
        )

    def is_active(self, address: str) -> bool:
        return bool(self._call(self._contract, STAKING, "isActive", checksum(address)))

    def can_complete_unstake(self, address: str) -> bool:
        return bool(self._call(self._contract, STAKING, "canCompleteUnstake", checksum(address)))

    def decimals(self) -> int:
        return int(self._call(self._token(), TOKEN, "decimals"))

    def token_balance(self, address: str) -> int:
        return int(self._call(self._token(), TOKEN, "balanceOf", checksum(address)))

    def allowance(self, owner: str) -> int:
        args = (checksum(owner), self.staking_address)
        return int(self._call(self._token(), TOKEN, "allowance", *args))

    def status(self, address: str) -> StakingStatus:
        checksummed = checksum(address)
        return StakingStatus(
            chain_id=self.chain_id,
            staking_address=self.staking_address,
            token_address=self.token_address(),
            address=checksummed,
            info=self.stake_info(checksummed),
            is_active=self.is_active(checksummed),
            min_stake=self.min_stake(),
            unbonding_period=self.unbonding_period(),
            max_consecutive_failures=self.max_consecutive_failures(),
            decimals=self.decimals(),
            balance_wei=self.balance(checksummed),
            token_balance=self.token_balance(checksummed),
            block_timestamp=self.block_timestamp(),
        )

    # ---------------------------------------------------------- transactions

    def stake(self, amount: int) -> StakeOutcome:
        """Approve (only when the allowance is short), then stake `amount` token units.

        A stake left pending by an earlier run is finished first and counts as this one:
        a retry never sends a second stake.
        """
        account = self._require_account()
        if self._pending is not None and self._pending.get(f"{STAKING}.stake") is not None:
            tx = self._transact(self._contract, STAKING, "stake", (amount,), value=0)
            return StakeOutcome(approve=None, stake=tx, info=self.stake_info(account.address))
        self._check_stake_amount(account.address, amount)
        approve = None
        if self.allowance(account.address) < amount:
            args = (self.staking_address, amount)
            approve = self._transact(self._token(), TOKEN, "approve", args, value=0)
        tx = self._transact(self._contract, STAKING, "stake", (amount,), value=0)
        return StakeOutcome(approve=approve, stake=tx, info=self.stake_info(account.address))

    def initiate_unstake(self) -> UnstakeOutcome:
        """Move the whole stake to unbonding; it unlocks after `UNBONDING_PERIOD`."""
        account = self._require_account()
        if self.stake_info(account.address).staked == 0:
            raise UnbondingError(f"{account.address} has nothing staked: nothing to unstake")
        tx = self._transact(self._contract, STAKING, "initiateUnstake", (), value=0)
        return UnstakeOutcome(tx=tx, info=self.stake_info(account.address))

    def complete_unstake(self) -> UnstakeOutcome:
        """Withdraw the unbonded tokens; refused, with the time left, before they unlock."""
        account = self._require_account()
        info = self.stake_info(account.address)
        if info.unbonding == 0:
            raise UnbondingError(
                f"{account.address} has nothing unbonding: run `staking unstake` first"
            )
        left = info.unbonding_available_at - self.block_timestamp()
        if left > 0:
            raise UnbondingError(
                f"{format_amount(info.unbonding, self.decimals())} BLIND unlock in {left} s "
                f"(at unix time {info.unbonding_available_at}): nothing sent",
                seconds_left=left,
            )
        tx = self._transact(self._contract, STAKING, "completeUnstake", (), value=0)
        return UnstakeOutcome(tx=tx, info=self.stake_info(account.address))

    # ------------------------------------------------------------- internals

    def _token(self) -> Contract:
        # The token is whatever the staking contract pulls from: ask it, once.
        if self._token_contract is None:
            address = self._call(self._contract, STAKING, "blindToken")
            self._token_contract = self._w3.eth.contract(address=checksum(address), abi=BLIND_ABI)
        return self._token_contract

    def _check_stake_amount(self, address: str, amount: int) -> None:
        decimals = self.decimals()
        if amount <= 0:
            raise StakeAmountError(f"stake amount must be positive, got {amount} units")
        minimum = self.min_stake()
        # The contract refuses every stake() below MIN_STAKE, not only the first one.
        if amount < minimum:
            raise StakeAmountError(
                f"{format_amount(amount, decimals)} BLIND is below the staking contract's "
                f"MIN_STAKE of {format_amount(minimum, decimals)} BLIND: nothing sent"
            )
        have = self.token_balance(address)
        if have < amount:
            raise StakeAmountError(
                f"{address} holds {format_amount(have, decimals)} BLIND, "
                f"cannot stake {format_amount(amount, decimals)}: nothing sent"
            )


# ------------------------------------------------------------------ amounts


def parse_amount(text: str, decimals: int) -> int:
    """`1000`, `1000.5` or `1e3` BLIND → token units; refuses what the token cannot hold."""
    with localcontext() as ctx:
        ctx.prec = 200  # exact for any uint256 with its decimals
        try:
            value = Decimal(text.strip())
        except InvalidOperation:
            raise StakeAmountError(
                f"{text!r} is not an amount of BLIND (e.g. 1000 or 1000.5)"
            ) from None
        if not value.is_finite():
            raise StakeAmountError(f"{text!r} is not an amount of BLIND (e.g. 1000 or 1000.5)")
        if value <= 0:
            raise StakeAmountError(f"the amount must be positive, got {text}")
        if value.adjusted() > 100:
            raise StakeAmountError(f"{text} BLIND does not fit a uint256")
        units = value.scaleb(decimals)
        if units != units.to_integral_value():
            raise StakeAmountError(
                f"{text} has more decimals than BLIND's {decimals}: "
                f"the smallest amount is {format_amount(1, decimals)}"
            )
    result = int(units)
    if result > UINT256_MAX:
        raise StakeAmountError(f"{text} BLIND does not fit a uint256")
    return result


def format_amount(units: int, decimals: int) -> str:
    """Token units → BLIND, without trailing zeros (`1000`, `1000.5`)."""
    with localcontext() as ctx:
        ctx.prec = 200
        text = f"{Decimal(units).scaleb(-decimals):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
