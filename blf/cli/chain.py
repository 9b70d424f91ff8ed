"""``chain``: the node's NodeRegistry state, and on-chain registration.

``chain status`` only reads, so it needs no keystore password: the address comes from
config.json. ``chain register`` and ``chain heartbeat`` send transactions and unlock the key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.table import Table

from blf.chain import ChainClient, ChainNodeStatus, NodeRecord
from blf.cli.common import (
    configured_address,
    ether,
    humanize_seconds,
    load_with_warnings,
    print_tx,
    stamp,
    warn,
)
from blf.cli.common import require_rpc_url as rpc_url_or_error
from blf.cli.staking import check_token_address, stake_rows, staking_client
from blf.config import LoadedConfig, Settings, update_config_file
from blf.errors import AttestationError, ChainError
from blf.node import Node, open_node

__all__ = [
    "chain",
    "inactive_reason",
    "read_only_client",
    "register",
    "register_on_chain",
    "require_rpc_url",
]

REGISTER_HINT = "blindference-node attest --mock --register-on-chain"
ATTEST_HINT = "blindference-node attest --mock"


def register(cli: click.Group) -> None:
    cli.add_command(chain)


@click.group()
def chain() -> None:
    """NodeRegistry: registration, heartbeat, balance (and the BLIND stake, in status)."""


# --- helpers -----------------------------------------------------------------------------


def require_rpc_url(loaded: LoadedConfig) -> str:
    """``rpc_url``, or a ``ChainError`` naming the config file to set it in."""
    return rpc_url_or_error(loaded.settings, where=loaded.path)


def read_only_client(loaded: LoadedConfig, *, timeout_s: float = 30.0) -> ChainClient:
    """A client for reads only: built from the settings, no keystore, no password."""
    settings = loaded.settings
    return ChainClient(
        require_rpc_url(loaded),
        chain_id=settings.chain_id,
        registry_address=settings.node_registry_address,
        account=None,
        max_fee_gwei=settings.max_fee_gwei,
        timeout_s=timeout_s,
    )


def _node_chain(node: Node) -> ChainClient:
    require_rpc_url(node.config)
    return node.chain()


def _check_attestation(settings: Settings, now: float) -> None:
    if not settings.attested:
        raise AttestationError(f"no attestation in config.json: run `{ATTEST_HINT}` first")
    if int(settings.attestation_expiry or 0) <= now:
        raise AttestationError(f"the attestation has expired: run `{ATTEST_HINT}` first")


def _relative(unix: int, now: int) -> str:
    """A timestamp and its distance from ``now`` (the chain's clock)."""
    delta = unix - now
    if delta == 0:
        return f"{stamp(unix)} (now)"
    when = f"in {humanize_seconds(delta)}" if delta > 0 else f"{humanize_seconds(-delta)} ago"
    return f"{stamp(unix)} ({when})"


def _heartbeat_margin(settings: Settings) -> tuple[int, int]:
    # The same interval and margin the periodic `chain_heartbeat` task uses.
    return int(settings.chain_heartbeat_interval_s), int(settings.chain_heartbeat_check_s) * 2


class _WarningEcho(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


@contextmanager
def _chain_warnings() -> Iterator[None]:
    """Show blf.chain's warnings (e.g. a grace shorter than the interval) as CLI warnings."""
    logger = logging.getLogger("blf.chain")
    handler = _WarningEcho(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _mark_registered(node: Node) -> None:
    update_config_file(node.config.path, {"registered_on_chain": True})
    node.config.raw["registered_on_chain"] = True
    node.config.settings = node.settings.model_copy(update={"registered_on_chain": True})


# --- registration ------------------------------------------------------------------------


def register_on_chain(node: Node) -> None:
    """Register the node in NodeRegistry once; a registered node sends nothing."""
    settings = node.settings
    _check_attestation(settings, node.clock())
    client = _node_chain(node)
    record = client.get_node(node.address)
    if record.registered:
        click.echo(
            f"Already registered in NodeRegistry {client.registry_address} "
            f"(chain {client.chain_id}) since {stamp(record.registered_at)}: nothing sent"
        )
        click.echo(f"  Tier    : {record.tier}")
        click.echo(f"  Cert    : {record.attestation_hash}")
        if not settings.registered_on_chain:
            _mark_registered(node)
        return
    min_stake = client.min_stake()
    stake = settings.stake_amount_wei
    if stake < min_stake:
        raise ChainError(
            f"stake_amount_wei {stake} is below the registry's minStake of {min_stake} wei "
            f"({ether(min_stake)} ETH): set stake_amount_wei in config.json "
            "or BLF_STAKE_AMOUNT_WEI"
        )
    click.echo(
        f"Registering {node.address} in NodeRegistry {client.registry_address} "
        f"(chain {client.chain_id}), stake {ether(stake)} ETH ..."
    )
    tx = client.register(
        tier=settings.tier,
        cert_hash=str(settings.attestation_cert_hash),
        expiry=int(settings.attestation_expiry or 0),
        models=list(settings.supported_model_ids),
        stake_wei=stake,
    )
    _mark_registered(node)
    click.echo("Registered on chain")
    print_tx(tx)


@chain.command("register")
def register_command() -> None:
    """Register this attested node in NodeRegistry.

    Needs gas and stake_amount_wei (at least the registry's minStake).
    """
    loaded = load_with_warnings()
    # Everything the config alone can refuse is refused before asking for the password.
    _check_attestation(loaded.settings, time.time())
    require_rpc_url(loaded)
    register_on_chain(open_node(loaded))


# --- heartbeat ---------------------------------------------------------------------------


@chain.command()
@click.option("--force", is_flag=True, help="Send a heartbeat even if none is due yet.")
def heartbeat(force: bool) -> None:
    """Send the on-chain heartbeat if due.

    Uses chain_heartbeat_interval_s and the same margin as the running node.
    """
    loaded = load_with_warnings()
    require_rpc_url(loaded)
    node = open_node(loaded)
    client = _node_chain(node)
    if not client.get_node(node.address).registered:
        raise ChainError(
            f"{node.address} is not registered in NodeRegistry {client.registry_address}: "
            f"run `{REGISTER_HINT}` (or `blindference-node chain register`)"
        )
    if force:
        tx = client.heartbeat()
        click.echo("On-chain heartbeat sent")
        print_tx(tx)
        return
    interval, margin = _heartbeat_margin(node.settings)
    with _chain_warnings():
        outcome = client.heartbeat_if_due(interval_s=interval, margin_s=margin)
    if outcome.status == "sent" and outcome.tx is not None:
        click.echo("On-chain heartbeat sent")
        print_tx(outcome.tx)
    elif outcome.status == "skipped":
        due = humanize_seconds(int(outcome.seconds_until_due or 0))
        click.echo(f"On-chain heartbeat not due: next in {due} (use --force to send now)")
    else:  # registered a moment ago, gone now: the registry removed the node
        raise ChainError(f"{node.address} is not registered in NodeRegistry")


# --- status ------------------------------------------------------------------------------


def _status_rows(state: ChainNodeStatus, settings: Settings) -> list[tuple[str, str]]:
    node: NodeRecord = state.node
    now = state.block_timestamp
    grace = state.heartbeat_grace_seconds
    rows = [
        ("Chain id", str(state.chain_id)),
        ("Registry", state.registry_address),
        ("Address", state.address),
        ("Balance", f"{ether(state.balance_wei)} ETH"),
        ("Registered", "yes" if node.registered else "no"),
    ]
    if node.registered:
        interval, margin = _heartbeat_margin(settings)
        due_in = node.last_heartbeat + interval - margin - now
        rows += [
            ("Tier", str(node.tier)),
            ("Attestation", node.attestation_hash),
            ("Att. expires", _relative(node.attestation_expires, now)),
            ("Models", ", ".join(node.models) or "(none)"),
            ("Stake", f"{ether(node.stake)} ETH"),
            ("Registered at", _relative(node.registered_at, now)),
            ("Last heartbeat", _relative(node.last_heartbeat, now)),
            ("Next heartbeat", "due now" if due_in <= 0 else f"in {humanize_seconds(due_in)}"),
        ]
    rows += [
        ("Active", "yes" if state.is_active else "no"),
        ("Grace", f"{grace} s ({humanize_seconds(grace)})" if grace else "0 s (not set)"),
    ]
    return rows


@chain.command()
def status() -> None:
    """Show the node's NodeRegistry record, balance and BLIND stake.

    Reads only: no keystore password needed.
    """
    loaded = load_with_warnings()
    client = read_only_client(loaded)
    state = client.node_status(configured_address(loaded))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in _status_rows(state, loaded.settings) + _staking_rows(loaded, state):
        table.add_row(name, value)
    console = Console()
    if not console.is_terminal:
        # Piped or captured: no terminal width to respect, and a wrapped hash is useless.
        console = Console(width=200)
    console.print(table)
    if not state.node.registered:
        if loaded.settings.registered_on_chain:
            warn("config.json says registered_on_chain, but this registry does not know the node")
        click.echo(f"Not registered. Register with: {REGISTER_HINT}")
    elif not state.is_active:
        warn(f"the registry counts this node inactive: {inactive_reason(state)}")


def _staking_rows(loaded: LoadedConfig, state: ChainNodeStatus) -> list[tuple[str, str]]:
    """BLIND staking's view of the same address; a staking read failure is one row, not an
    error (the registry's rows above stand on their own)."""
    try:
        staking = staking_client(loaded.settings).status(state.address)
    except ChainError as exc:
        return [("Staking", f"cannot read: {exc}")]
    check_token_address(loaded.settings, staking.token_address)
    return stake_rows(staking)


def inactive_reason(state: ChainNodeStatus) -> str:
    now, node = state.block_timestamp, state.node
    if node.attestation_expires <= now:
        return f"its on-chain attestation has expired (re-attest: `{ATTEST_HINT}`)"
    if state.heartbeat_grace_seconds and (
        now - node.last_heartbeat > state.heartbeat_grace_seconds
    ):
        return "its last heartbeat is older than the grace (`blindference-node chain heartbeat`)"
    return "see the registry's isActive rules"
