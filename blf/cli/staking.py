"""``staking`` and ``balance``: the operator's BLIND stake and the node's balances.

``staking status`` and ``balance`` only read, so they need no keystore password (the
address comes from config.json). ``stake``, ``unstake`` and ``withdraw`` unlock the key;
everything the chain lets blf check first (the amount, the minimum, the unbonding clock)
is checked before the password prompt or before anything is signed.

The staking contract is ``staking_address``; the token is whatever that contract's
``blindToken()`` names. The public node's ``blind_token_address`` is kept in config.json,
and a value set there that disagrees with the contract earns a warning.
"""

from __future__ import annotations

from typing import Any

import click

from blf.chain import StakingClient, StakingStatus, TxResult, format_amount, parse_amount
from blf.chain.staking import StakeOutcome, UnstakeOutcome
from blf.cli.common import (
    configured_address,
    echo_json,
    humanize_seconds,
    json_option,
    load_with_warnings,
    print_tx,
    require_rpc_url,
    stamp,
    warn,
)
from blf.config import LoadedConfig, Settings
from blf.errors import BlfError, UnbondingError
from blf.node import Node, open_node

__all__ = [
    "balance",
    "read_stake",
    "register",
    "stake_json",
    "stake_line",
    "stake_rows",
    "stake_summary",
    "staking",
    "staking_client",
]

PENDING_FILE = "pending-tx.json"
NONCE_LOCK_FILE = "nonce.lock"  # the same lock as NodeRegistry's: one key, one nonce sequence


def register(cli: click.Group) -> None:
    cli.add_command(staking)
    cli.add_command(balance)


@click.group()
def staking() -> None:
    """BLIND staking: status, stake, unstake, withdraw after unbonding."""


# --- clients -----------------------------------------------------------------------------


def staking_client(
    settings: Settings, *, node: Node | None = None, timeout_s: float = 30.0
) -> StakingClient:
    """A read-only client, or with `node` one that signs (journal and lock beside config)."""
    return StakingClient(
        require_rpc_url(settings),
        chain_id=settings.chain_id,
        staking_address=settings.staking_address,
        account=node.account if node else None,
        max_fee_gwei=settings.max_fee_gwei,
        nonce_lock_path=node.directory / NONCE_LOCK_FILE if node else None,
        pending_path=node.directory / PENDING_FILE if node else None,
        timeout_s=timeout_s,
    )


def _read_only(loaded: LoadedConfig) -> StakingClient:
    require_rpc_url(loaded.settings, where=loaded.path)  # names the config file in its error
    return staking_client(loaded.settings)


def _address(loaded: LoadedConfig) -> str:
    return configured_address(loaded)


def check_token_address(settings: Settings, token_address: str) -> None:
    """Warn when config.json's blind_token_address (set there, not a default) disagrees."""
    if "blind_token_address" not in settings.model_fields_set:
        return
    if settings.blind_token_address.lower() != token_address.lower():
        warn(
            f"blind_token_address {settings.blind_token_address} in config differs from the "
            f"staking contract's blindToken() {token_address}; using the contract's"
        )


# --- formatting --------------------------------------------------------------------------


def _blind(units: int, status: StakingStatus) -> str:
    return f"{format_amount(units, status.decimals)} BLIND"


def _unbonding_text(status: StakingStatus) -> str:
    left = status.unlocks_in
    if left is None:
        return "none"
    amount = _blind(status.info.unbonding, status)
    if left == 0:
        return f"{amount}, withdrawable now (`blindference-node staking withdraw`)"
    when = stamp(status.info.unbonding_available_at)
    return f"{amount}, unlocks {when} (in {humanize_seconds(left)})"


def stake_rows(status: StakingStatus) -> list[tuple[str, str]]:
    """The staking lines `staking status` and `chain status` share."""
    info = status.info
    return [
        ("Staking", status.staking_address),
        ("BLIND token", status.token_address),
        ("Staked", _blind(info.staked, status)),
        ("Min stake", _blind(status.min_stake, status)),
        ("Unbonding", _unbonding_text(status)),
        (
            "Failures",
            f"{info.consecutive_failures} of {status.max_consecutive_failures} consecutive",
        ),
        ("Stake active", "yes" if status.is_active else "no"),
    ]


def read_stake(settings: Settings, address: str, *, timeout_s: float = 5.0) -> StakingStatus | str:
    """The stake for `status`, or why it was not read (never raises a ``BlfError``)."""
    if not settings.rpc_url:
        return "not checked: no rpc_url"
    try:
        return staking_client(settings, timeout_s=timeout_s).status(address)
    except BlfError as exc:
        return f"cannot read: {exc}"


def stake_summary(settings: Settings, address: str) -> str:
    """One line for `status`: the stake, or why it could not be read (never raises)."""
    return stake_line(read_stake(settings, address))


def stake_line(status: StakingStatus | str) -> str:
    """``read_stake``'s answer as `status` shows it."""
    if isinstance(status, str):
        return status
    state = "active" if status.is_active else "not active"
    text = f"{_blind(status.info.staked, status)} staked, {state}"
    if status.info.unbonding:
        text += f"; unbonding {_unbonding_text(status)}"
    return text


def _tx_json(tx: TxResult | None) -> dict[str, Any] | None:
    if tx is None:
        return None
    return {**tx.model_dump(), "fee_wei": str(tx.fee_wei)}


def stake_json(status: StakingStatus) -> dict[str, Any]:
    """``staking status --json``'s object (amounts in wei as strings: JSON readers that
    parse numbers as doubles would round them)."""
    info = status.info
    return {
        "chain_id": status.chain_id,
        "address": status.address,
        "staking_address": status.staking_address,
        "token_address": status.token_address,
        "staked_wei": str(info.staked),
        "staked_blind": format_amount(info.staked, status.decimals),
        "unbonding_wei": str(info.unbonding),
        "unbonding_available_at": info.unbonding_available_at or None,
        "unlocks_in_s": status.unlocks_in,
        "consecutive_failures": info.consecutive_failures,
        "max_consecutive_failures": status.max_consecutive_failures,
        "active": status.is_active,
        "min_stake_wei": str(status.min_stake),
        "unbonding_period_s": status.unbonding_period,
        "eth_wei": str(status.balance_wei),
        "blind_wei": str(status.token_balance),
    }


def _print_tx(what: str, tx: TxResult) -> None:
    click.echo(what)
    print_tx(tx)


# --- commands ----------------------------------------------------------------------------


@staking.command("status")
@json_option()
def status_command(as_json: bool) -> None:
    """Stake, unbonding, failures and whether staking counts the node active.

    Reads only: no keystore password needed.
    """
    loaded = load_with_warnings()
    status = _read_only(loaded).status(_address(loaded))
    check_token_address(loaded.settings, status.token_address)
    if as_json:
        echo_json(stake_json(status))
        return
    rows = [("Chain id", str(status.chain_id)), ("Address", status.address), *stake_rows(status)]
    rows.append(("Unbond time", humanize_seconds(status.unbonding_period)))
    for name, value in rows:
        click.echo(f"{name:<13} {value}")
    if not status.is_active and status.min_stake > 0 and not status.info.unbonding:
        click.echo(f"Not staked. Stake with: blindference-node staking stake {_min(status)}")


def _min(status: StakingStatus) -> str:
    return format_amount(status.min_stake, status.decimals)


# ignore_unknown_options: "-5" is an amount to refuse clearly, not an unknown option.
@staking.command("stake", context_settings={"ignore_unknown_options": True})
@click.argument("amount")
@json_option()
def stake_command(amount: str, as_json: bool) -> None:
    """Stake AMOUNT BLIND (e.g. 1000, 1000.5 or 1e3); approves first only if needed.

    Every stake must be at least the contract's MIN_STAKE. A stake left unconfirmed by an
    earlier run is finished (resent if dropped), never sent twice.
    """
    loaded = load_with_warnings()
    reader = _read_only(loaded)
    units = parse_amount(amount, reader.decimals())  # refused before the password prompt
    check_token_address(loaded.settings, reader.token_address())
    node = open_node(loaded)
    client = staking_client(node.settings, node=node)
    if not as_json:
        click.echo(
            f"Staking {amount} BLIND from {node.address} in BlindferenceStaking "
            f"{client.staking_address} (chain {client.chain_id}) ..."
        )
    outcome = client.stake(units)
    _report_stake(outcome, units, reader.decimals(), as_json)


def _report_stake(outcome: StakeOutcome, units: int, decimals: int, as_json: bool) -> None:
    staked = format_amount(outcome.info.staked, decimals)
    if as_json:
        echo_json(
            {
                "approve": _tx_json(outcome.approve),
                "stake": _tx_json(outcome.stake),
                "staked_wei": str(outcome.info.staked),
                "staked_blind": staked,
                "active": outcome.info.active,
            }
        )
        return
    if outcome.approve is not None:
        _print_tx(f"Approved {format_amount(units, decimals)} BLIND for staking", outcome.approve)
    else:
        click.echo("Allowance already covers the amount: no approve sent")
    state = "active" if outcome.info.active else "not active"
    _print_tx(f"Staked: {staked} BLIND in total, {state}", outcome.stake)


@staking.command("unstake")
@json_option()
def unstake_command(as_json: bool) -> None:
    """Start unbonding the whole stake; shows when the tokens unlock."""
    loaded = load_with_warnings()
    reader = _read_only(loaded)
    info = reader.stake_info(_address(loaded))
    if info.staked == 0:
        raise UnbondingError(f"{_address(loaded)} has nothing staked: nothing to unstake")
    node = open_node(loaded)
    outcome = staking_client(node.settings, node=node).initiate_unstake()
    _report_unstake(reader, outcome, as_json)


def _report_unstake(reader: StakingClient, outcome: UnstakeOutcome, as_json: bool) -> None:
    info, decimals = outcome.info, reader.decimals()
    left = max(info.unbonding_available_at - reader.block_timestamp(), 0)
    if as_json:
        echo_json(
            {
                "tx": _tx_json(outcome.tx),
                "unbonding_wei": str(info.unbonding),
                "unbonding_available_at": info.unbonding_available_at,
                "unlocks_in_s": left,
                "unbonding_period_s": reader.unbonding_period(),
            }
        )
        return
    amount = format_amount(info.unbonding, decimals)
    _print_tx(f"Unstaking {amount} BLIND: no longer active in staking", outcome.tx)
    click.echo(
        f"Unlocks {stamp(info.unbonding_available_at)} (in {humanize_seconds(left)}); "
        "then: blindference-node staking withdraw"
    )


@staking.command("withdraw")
@json_option()
def withdraw_command(as_json: bool) -> None:
    """Withdraw unbonded BLIND; before they unlock, says how long is left and sends nothing."""
    loaded = load_with_warnings()
    reader = _read_only(loaded)
    status = reader.status(_address(loaded))
    left = status.unlocks_in
    if left is None:
        raise UnbondingError(f"{status.address} has nothing unbonding: run `staking unstake` first")
    if left > 0:
        raise UnbondingError(
            f"{_blind(status.info.unbonding, status)} unlock "
            f"{stamp(status.info.unbonding_available_at)}, in {humanize_seconds(left)}: "
            "nothing sent",
            seconds_left=left,
        )
    node = open_node(loaded)
    outcome = staking_client(node.settings, node=node).complete_unstake()
    if as_json:
        echo_json({"tx": _tx_json(outcome.tx), "withdrawn_wei": str(status.info.unbonding)})
        return
    _print_tx(f"Withdrew {_blind(status.info.unbonding, status)}", outcome.tx)


@click.command()
@json_option()
def balance(as_json: bool) -> None:
    """The node address's ETH (for gas) and BLIND (unstaked) balances.

    Reads only: no keystore password needed.
    """
    loaded = load_with_warnings()
    client = _read_only(loaded)
    address = _address(loaded)
    eth, blind = client.balance(address), client.token_balance(address)
    decimals, token = client.decimals(), client.token_address()
    check_token_address(loaded.settings, token)
    if as_json:
        echo_json(
            {
                "address": address,
                "chain_id": client.chain_id,
                "eth_wei": str(eth),
                "eth": format_amount(eth, 18),
                "blind_wei": str(blind),
                "blind": format_amount(blind, decimals),
                "token_address": token,
            }
        )
        return
    click.echo(f"Address  {address} (chain {client.chain_id})")
    click.echo(f"ETH      {format_amount(eth, 18)}")
    click.echo(f"BLIND    {format_amount(blind, decimals)} (token {token})")
