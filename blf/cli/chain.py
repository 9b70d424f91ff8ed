"""``chain``: the node's NodeRegistry state, and on-chain registration."""

from __future__ import annotations

import click

from blf.node import Node


def register(cli: click.Group) -> None:
    cli.add_command(chain)


@click.group()
def chain() -> None:
    """NodeRegistry: registration, heartbeat, balance."""


def register_on_chain(node: Node) -> None:
    raise click.ClickException("on-chain registration is not wired yet")
