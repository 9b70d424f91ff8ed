"""blf.chain.staking against a real anvil running the real BLIND and BlindferenceStaking
bytecode: amounts refused before sending, approve + stake, unbonding, and a dropped
transaction resent without doubling the stake."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from blf.chain import StakingClient, format_amount, parse_amount
from blf.errors import (
    ChainError,
    ChainIdMismatchError,
    ContractRevertError,
    PendingTransactionError,
    StakeAmountError,
    UnbondingError,
)
from tests.fixtures_chain import AnvilNode, StakingDeployment

BLIND = 10**18
MIN_STAKE = 1000 * BLIND
UNBONDING = 345600

MakeStaking = Callable[..., StakingClient]


def _nonce(anvil: AnvilNode, address: str) -> int:
    return int(anvil.rpc("eth_getTransactionCount", address, "pending"), 16)


@pytest.fixture
def operator(anvil: AnvilNode, staking: StakingDeployment) -> LocalAccount:
    account = anvil.accounts[1]
    staking.mint(account.address, 5000 * BLIND)
    return account


@pytest.fixture
def make_staking(anvil: AnvilNode, staking: StakingDeployment, tmp_path: Path) -> MakeStaking:
    def make(account: LocalAccount | None = None, **options: Any) -> StakingClient:
        options.setdefault("chain_id", anvil.chain_id)
        options.setdefault("receipt_timeout_s", 30.0)
        options.setdefault("pending_path", tmp_path / "pending-tx.json")
        options.setdefault("nonce_lock_path", tmp_path / "nonce.lock")
        return StakingClient(anvil.url, staking_address=staking.staking, account=account, **options)

    return make


@pytest.fixture
def client(make_staking: MakeStaking, operator: LocalAccount) -> StakingClient:
    return make_staking(operator)


def _approve(client: StakingClient, staking: StakingDeployment, amount: int) -> None:
    """An ERC-20 approve sent outside `stake` (as another wallet or an earlier run would)."""
    client._transact(client._token(), "BLIND", "approve", (staking.staking, amount), value=0)


def test_reads_come_from_the_contract(client: StakingClient, staking: StakingDeployment) -> None:
    assert client.token_address() == staking.token
    assert client.min_stake() == MIN_STAKE
    assert client.unbonding_period() == UNBONDING
    assert client.max_consecutive_failures() == 3
    assert client.decimals() == 18


def test_first_stake_below_minimum_is_refused_before_sending(
    anvil: AnvilNode, client: StakingClient, operator: LocalAccount
) -> None:
    before = _nonce(anvil, operator.address)
    with pytest.raises(StakeAmountError, match="below the staking contract's MIN_STAKE of 1000"):
        client.stake(999 * BLIND)
    with pytest.raises(StakeAmountError, match="holds 5000 BLIND"):
        client.stake(6000 * BLIND)
    assert _nonce(anvil, operator.address) == before


def test_approve_then_stake_then_stake_again_without_approve(
    anvil: AnvilNode, client: StakingClient, operator: LocalAccount, staking: StakingDeployment
) -> None:
    eth_before = client.balance(operator.address)

    first = client.stake(1000 * BLIND)

    assert first.approve is not None and first.approve.gas_used > 0
    assert first.info.staked == 1000 * BLIND and first.info.active
    assert client.is_active(operator.address)
    assert staking.token_balance(operator.address) == 4000 * BLIND
    assert staking.token_balance(staking.staking) == 1000 * BLIND
    spent = first.approve.fee_wei + first.stake.fee_wei
    assert client.balance(operator.address) == eth_before - spent

    # An allowance that already covers the amount: no second approve.
    _approve(client, staking, 1000 * BLIND)
    nonce = _nonce(anvil, operator.address)
    second = client.stake(1000 * BLIND)

    assert second.approve is None
    assert second.stake.nonce == nonce
    assert _nonce(anvil, operator.address) == nonce + 1
    assert second.info.staked == 2000 * BLIND


def test_unstake_then_withdraw_refused_early_then_after_unbonding(
    anvil: AnvilNode, client: StakingClient, operator: LocalAccount, staking: StakingDeployment
) -> None:
    client.stake(1500 * BLIND)

    unstaked = client.initiate_unstake()

    assert unstaked.info.staked == 0 and unstaked.info.unbonding == 1500 * BLIND
    assert not unstaked.info.active and not client.is_active(operator.address)
    block = anvil.rpc("eth_getBlockByNumber", hex(unstaked.tx.block_number), False)
    assert unstaked.info.unbonding_available_at == int(block["timestamp"], 16) + UNBONDING
    nonce = _nonce(anvil, operator.address)

    with pytest.raises(UnbondingError, match="unlock in") as caught:
        client.complete_unstake()
    assert 0 < caught.value.seconds_left <= UNBONDING
    assert "nothing sent" in str(caught.value)
    assert _nonce(anvil, operator.address) == nonce

    anvil.increase_time(UNBONDING)
    assert client.can_complete_unstake(operator.address)
    withdrawn = client.complete_unstake()

    assert withdrawn.info.unbonding == 0 and withdrawn.info.staked == 0
    assert staking.token_balance(operator.address) == 5000 * BLIND
    with pytest.raises(UnbondingError, match="nothing unbonding"):
        client.complete_unstake()
    with pytest.raises(UnbondingError, match="nothing staked"):
        client.initiate_unstake()


def test_wrong_chain_id_is_refused_before_any_transaction(
    anvil: AnvilNode, make_staking: MakeStaking, operator: LocalAccount
) -> None:
    client = make_staking(operator, chain_id=421614)
    calls: list[Callable[[], object]] = [
        lambda: client.stake(MIN_STAKE),
        client.initiate_unstake,
        client.complete_unstake,
        lambda: client.status(operator.address),
    ]
    for call in calls:
        with pytest.raises(ChainIdMismatchError, match="421614"):
            call()
    assert _nonce(anvil, operator.address) == 0


def test_dropped_stake_is_resent_not_doubled(
    anvil: AnvilNode,
    make_staking: MakeStaking,
    operator: LocalAccount,
    staking: StakingDeployment,
    tmp_path: Path,
) -> None:
    make_staking(operator).stake(MIN_STAKE)  # approve + first stake, mined
    staking_client = make_staking(operator, receipt_timeout_s=0.2)
    _approve(staking_client, staking, MIN_STAKE)
    anvil.set_automine(False)
    try:
        with pytest.raises(ChainError, match="not mined within"):
            staking_client.stake(MIN_STAKE)
        journal = (tmp_path / "pending-tx.json").read_text()
        assert "BlindferenceStaking.stake" in journal
        anvil.rpc("anvil_dropAllTransactions")  # the node forgets it
        assert anvil.pending_count() == 0
    finally:
        anvil.set_automine(True)
    nonce = _nonce(anvil, operator.address)

    retried = make_staking(operator).stake(MIN_STAKE)

    assert retried.approve is None
    assert retried.stake.nonce == nonce  # the journalled nonce, the same signed bytes
    assert retried.info.staked == 2 * MIN_STAKE  # once, not twice
    assert _nonce(anvil, operator.address) == nonce + 1
    assert "BlindferenceStaking.stake" not in (tmp_path / "pending-tx.json").read_text()


def test_pending_stake_of_another_amount_is_not_followed_by_a_second(
    anvil: AnvilNode, make_staking: MakeStaking, operator: LocalAccount, staking: StakingDeployment
) -> None:
    first = make_staking(operator, receipt_timeout_s=0.2)
    _approve(first, staking, 3 * MIN_STAKE)
    anvil.set_automine(False)
    try:
        with pytest.raises(ChainError, match="not mined within"):
            first.stake(MIN_STAKE)
        with pytest.raises(PendingTransactionError, match="still pending"):
            make_staking(operator).stake(2 * MIN_STAKE)
        assert anvil.pending_count() == 1
        anvil.rpc("evm_mine")
    finally:
        anvil.set_automine(True)

    assert make_staking(operator).stake_info(operator.address).staked == MIN_STAKE


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("1000", 1000 * BLIND),
        ("1000.5", 10005 * BLIND // 10),
        ("1e3", 1000 * BLIND),
        ("0.000000000000000001", 1),
    ],
)
def test_parse_amount(text: str, units: int) -> None:
    assert parse_amount(text, 18) == units
    assert parse_amount(format_amount(units, 18), 18) == units


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.0000000000000000001", "more decimals than BLIND's 18"),
        ("-5", "must be positive"),
        ("0", "must be positive"),
        ("abc", "not an amount"),
        ("nan", "not an amount"),
        ("1e400", "does not fit"),
    ],
)
def test_parse_amount_refuses(text: str, message: str) -> None:
    with pytest.raises(StakeAmountError, match=message):
        parse_amount(text, 18)


def test_fee_cap_below_base_fee_is_refused_before_sending(
    anvil: AnvilNode, make_staking: MakeStaking, operator: LocalAccount
) -> None:
    base_fee = int(anvil.rpc("eth_getBlockByNumber", "latest", False)["baseFeePerGas"], 16)
    client = make_staking(operator, max_fee_gwei=base_fee / 2 / 10**9)
    with pytest.raises(ChainError, match="fees exceed the configured cap"):
        client.stake(MIN_STAKE)
    assert _nonce(anvil, operator.address) == 0


def test_unreachable_rpc_error_hides_the_url_key() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v2/sEcReTaPiKeY0123456789?token=hush"
        client = StakingClient(url, chain_id=31337, staking_address="0x" + "11" * 20)
        with pytest.raises(ChainError, match="cannot reach chain RPC") as caught:
            client.min_stake()
    message = str(caught.value)
    assert "TaPiKeY0123456789" not in message and "hush" not in message
    assert "\n" not in message


def test_a_custom_error_revert_is_named_with_its_arguments(
    anvil: AnvilNode, client: StakingClient, operator: LocalAccount
) -> None:
    zero = "0x" + "00" * 20
    with pytest.raises(ContractRevertError) as caught:
        client._transact(client._token(), "BLIND", "approve", (zero, 1), value=0)
    assert caught.value.reason == f"ERC20InvalidSpender({zero})"
    assert _nonce(anvil, operator.address) == 0
