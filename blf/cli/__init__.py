"""The ``blindference-node`` command line.

Every command turns a ``BlfError`` into one ``Error: ...`` line (exit 1; a config error
exits 2), so an operator never sees a traceback for a condition we know about.
"""

from __future__ import annotations

from typing import Any

import click

from blf import __version__
from blf.cli.common import ConfigClickError
from blf.errors import BlfError, ConfigError

__all__ = ["cli", "main"]


class BlfGroup(click.Group):
    """Maps blf's errors to click's one-line errors for every subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigClickError(str(exc)) from None
        except BlfError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=BlfGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blindference-node")
def cli() -> None:
    """A Blindference compute node on Celery.

    The node's directory holds config.json and the encrypted keystore. Its location is
    BLF_CONFIG_PATH (the config file), else BLF_CONFIG_DIR (its directory), else
    ~/.blindference/config.json. Any config field can be overridden at run time with
    BLF_<FIELD>, e.g. BLF_ICL_ENDPOINT; the keystore password comes from BLF_KEY_PASSWORD
    or a prompt.

    Start with `init`, then `attest --mock`, then `run`.
    """


def _register_commands() -> None:
    # Imported here so each module can import `cli` from this package without a cycle.
    from blf.cli import chain, devnet, jobs, metrics, models, node, service, staking, systemd

    for module in (node, service, chain, staking, jobs, models, metrics, systemd, devnet):
        module.register(cli)


_register_commands()


def main() -> None:
    cli(prog_name="blindference-node")
