"""``devnet``: local stand-ins for the network's services, for trials and tests."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    cli.add_command(devnet)


@click.group()
def devnet() -> None:
    """Run local stand-ins for the network (no public network needed)."""


@devnet.command("icl")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8545 + 1000, show_default=True, type=int, help="Port to bind.")
@click.option(
    "--mock-key",
    default=None,
    help="Mock attestation key nodes must use (default: $MOCK_ATTESTATION_KEY, else the "
    "network's default).",
)
def devnet_icl(host: str, port: int, mock_key: str | None) -> None:
    """A local ICL coordinator speaking the node protocol, with an /admin API for jobs."""
    from blf.devnet.icl import serve

    serve(host, port, mock_attestation_key=mock_key)
