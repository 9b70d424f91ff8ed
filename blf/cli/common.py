"""What the command modules share: warnings, loading the config, time and amount text,
JSON output, and the node's address, RPC URL and Redis as commands read them.

Every module of ``blf.cli`` may import this one; it imports none of them, so the command
modules never need to import each other for a helper.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from blf.config import LoadedConfig, Settings, load_config
from blf.errors import ChainError

if TYPE_CHECKING:
    import redis

    from blf.chain import TxResult

__all__ = [
    "JSON_HELP",
    "ConfigClickError",
    "configured_address",
    "echo_json",
    "ether",
    "humanize_seconds",
    "json_option",
    "load_with_warnings",
    "node_redis",
    "print_tx",
    "require_rpc_url",
    "stamp",
    "warn",
]

JSON_HELP = "Print one JSON object instead of text."
F = TypeVar("F", bound=Callable[..., Any])


# --- messages ----------------------------------------------------------------------------


class ConfigClickError(click.ClickException):
    """A config error: one line, exit 2 (a unit's RestartPreventExitStatus names it)."""

    exit_code = 2


def warn(message: str) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def load_with_warnings() -> LoadedConfig:
    """The node's config (BLF_CONFIG_PATH, BLF_CONFIG_DIR or the default), its warnings shown."""
    loaded = load_config()
    for message in loaded.warnings:
        warn(message)
    return loaded


def json_option(help: str = JSON_HELP) -> Callable[[F], F]:
    """``--json``, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# --- time and amounts --------------------------------------------------------------------


def humanize_seconds(seconds: int) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    return f"{sign}{minutes}m {rest % 60}s"


def stamp(unix: float) -> str:
    """A local date and time, e.g. ``2025-01-31 14:05:00 CET``."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


def ether(wei: int) -> str:
    """Wei → ETH, without trailing zeros."""
    from blf.chain import format_amount

    return format_amount(wei, 18)


def print_tx(tx: TxResult) -> None:
    click.echo(f"  Tx      : {tx.tx_hash}")
    click.echo(f"  Block   : {tx.block_number}")
    click.echo(f"  Gas used: {tx.gas_used} (fee {ether(tx.fee_wei)} ETH)")


# --- the node, read without its password -------------------------------------------------


def require_rpc_url(settings: Settings, *, where: str | Path = "config.json") -> str:
    """``rpc_url``, or a ``ChainError`` that says where to set it (``where``: the file)."""
    if not settings.rpc_url:
        raise ChainError(f'no rpc_url configured: set BLF_RPC_URL or add "rpc_url" to {where}')
    return settings.rpc_url


def configured_address(loaded: LoadedConfig) -> str:
    """The node's address without the password: config.json, else the keystore's header."""
    from blf.wallet import keystore_address

    if loaded.settings.node_address:
        return loaded.settings.node_address
    address = keystore_address(loaded.keystore_file())
    if not address:
        raise ChainError(
            f"no node_address in {loaded.path} and the keystore does not declare one; "
            "run `blindference-node init`"
        )
    return address


def node_redis(loaded: LoadedConfig, *, timeout: float = 5.0, retries: bool = True) -> redis.Redis:
    """A client of the node's Redis (``broker_url``, else the embedded Redis of a running
    `run`), answering ``str``; raises ``ConfigError`` when neither is there (the node is
    not running). Opens no connection yet. ``retries=False``: one attempt per command."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from blf.broker import node_broker

    urls = node_broker(loaded.settings.broker_url, loaded.directory)
    options: dict[str, Any] = {} if retries else {"retry": Retry(NoBackoff(), 0)}
    return redis.Redis.from_url(
        urls.redis,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        **options,
    )
