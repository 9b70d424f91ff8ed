"""``devnet``: local stand-ins for the network's services, for trials and tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from blf.wallet import PASSWORD_ENV

DEVNET_PASSWORD = "devnet"  # guards a throwaway key that only ever talks to this machine


def register(cli: click.Group) -> None:
    cli.add_command(devnet)


@click.group()
def devnet() -> None:
    """Run local stand-ins for the network (no public network needed)."""


@devnet.command("icl")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8700, show_default=True, type=int, help="Port to bind.")
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


@devnet.command("up")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("~/.blindference-devnet"),
    show_default=True,
    help="Where the devnet node keeps its config, keystore and Redis data.",
)
@click.option("--models", default="demo-model", show_default=True, help="Model ids to list.")
@click.option("--port", default=0, type=int, help="Port for the local ICL (default: any free).")
def devnet_up(directory: Path, models: str, port: int) -> None:
    """Try blf with nothing but this machine: start a local ICL, create a node (first
    time only), attest it, and run it until Ctrl+C. The keystore password is
    BLF_KEY_PASSWORD, else "devnet"."""
    from blf.cli.node import init
    from blf.config import load_config
    from blf.devnet.icl import DevnetIcl
    from blf.logging import configure_logging
    from blf.node import open_node
    from blf.supervisor import Supervisor

    config_path = directory.expanduser() / "node" / "config.json"
    password = os.environ.setdefault(PASSWORD_ENV, DEVNET_PASSWORD)
    with DevnetIcl(port=port) as icl:
        # Run-time overrides only: the node's file keeps pointing wherever it was made for.
        os.environ["BLF_CONFIG_PATH"] = str(config_path)
        os.environ["BLF_ICL_ENDPOINT"] = icl.url
        os.environ.pop("BLF_CONFIG_DIR", None)
        if not config_path.exists():
            click.get_current_context().invoke(init, models=(models,), icl_endpoint=icl.url)
        click.echo(_banner(icl.url, config_path))
        node = open_node(load_config(config_path), password=password)
        configure_logging(node.address, node.settings.log_level)
        node.attest()  # the devnet starts empty every time
        code = Supervisor(node=node, password=password).run()
    sys.exit(code)


def _banner(icl_url: str, config_path: Path) -> str:
    return f"""
Devnet ICL : {icl_url}   (jobs: POST {icl_url}/admin/jobs, nodes: GET {icl_url}/admin/nodes)
Node dir   : {config_path.parent}
Stop with Ctrl+C.

To join the public network instead (https://icl.blindference.xyz):
  blindference-node init --models <model-id>     # creates ~/.blindference/config.json
  blindference-node attest --mock
  blindference-node run
"""
