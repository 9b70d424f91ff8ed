"""Service commands: ``run`` (the whole node), ``worker`` and ``beat`` (one role each)."""

from __future__ import annotations

import os
import socket
import sys

import click

from blf.config import LoadedConfig
from blf.errors import ConfigError
from blf.logging import configure_logging, warn_if_root

NO_ATTESTATION = "Error: No attestation found. Run `blindference-node attest` first."


def register(cli: click.Group) -> None:
    for command in (run, worker, beat, flower):
        cli.add_command(command)


def _loaded() -> LoadedConfig:
    from blf.cli.node import load_with_warnings

    return load_with_warnings()


def _require_broker(loaded: LoadedConfig) -> None:
    if not loaded.settings.broker_url:
        raise ConfigError(
            f"{loaded.path}: field 'broker_url' is empty; `worker` and `beat` join an existing "
            "Redis (set BLF_BROKER_URL=redis://...), while `run` starts an embedded one",
            field="broker_url",
        )


@click.command()
def run() -> None:
    """Run the node: embedded Redis (unless broker_url is set), beat (heartbeat 60 s,
    poller 5 s, watchdog 10 min, on-chain heartbeat 10 days), a control worker and an
    inference worker. SIGINT/SIGTERM stop it gracefully: no new assignments, running jobs
    finish (up to shutdown_timeout_s), a final heartbeat, then exit 0."""
    from blf.node import open_node
    from blf.readiness import check_servable
    from blf.supervisor import Supervisor
    from blf.wallet import read_password

    loaded = _loaded()
    if not loaded.settings.attested:
        click.echo(NO_ATTESTATION, err=True)
        sys.exit(1)
    check_servable(loaded.settings)
    password = read_password()
    node = open_node(loaded, password=password)
    configure_logging(node.address, loaded.settings.log_level)
    sys.exit(Supervisor(node=node, password=password).run())


@click.command()
@click.option(
    "--role",
    type=click.Choice(["control", "inference"]),
    default="control",
    show_default=True,
    help="control: heartbeat, poller, claims, CoFHE, submissions, chain; needs the keystore. "
    "inference: the model queues only (same as `python -m workers.gpu`); no key, only the "
    "cluster key (GPU machines).",
)
@click.option("--beat", "with_beat", is_flag=True, help="Also run the beat scheduler inside.")
@click.option("--concurrency", type=int, default=None, help="Parallel tasks (default from config).")
@click.option(
    "--models", default=None, help="inference: comma-separated models to serve (default: config)."
)
@click.option("--gpus", type=int, default=None, help="inference: one worker per GPU, pinned to it.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the keystore password from the first stdin line."
)
def worker(
    role: str,
    with_beat: bool,
    concurrency: int | None,
    models: str | None,
    gpus: int | None,
    password_stdin: bool,
) -> None:
    """Run one Celery worker of this node against its broker_url."""
    if role == "inference":
        _exec_gpu_worker(concurrency, models, gpus)
    from blf import runtime
    from blf.app import app, configure, control_queue, settings_with_address
    from blf.node import open_node

    loaded = _loaded()
    _require_broker(loaded)
    settings = settings_with_address(loaded)
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    node = open_node(loaded, password=password)
    runtime.install(node)
    settings = settings.model_copy(update={"node_address": node.address})
    configure(settings)
    _load_control_key(loaded)
    configure_logging(settings.node_address, settings.log_level)
    warn_if_root()
    instance = app.Worker(
        hostname=f"control.{settings.node_address[:10]}@{socket.gethostname()}",
        queues=[control_queue(node.address)],
        beat=with_beat,
        # Control tasks wait on HTTP, CoFHE and the chain: threads.
        pool="threads",
        concurrency=concurrency or settings.control_concurrency,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        quiet=True,
    )
    instance.start()
    sys.exit(instance.exitcode or 0)


def _exec_gpu_worker(concurrency: int | None, models: str | None, gpus: int | None) -> None:
    """The inference role is the key-free GPU entry point (``python -m workers.gpu``): this
    process has imported the CLI, and with it the operator-side modules, so it is replaced."""
    command = [sys.executable, "-m", "workers.gpu"]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    if models:
        command += ["--models", models]
    if gpus:
        command += ["--gpus", str(gpus)]
    os.execv(sys.executable, command)


def _load_control_key(loaded: LoadedConfig) -> None:
    """Control-side processes sign what they publish (see blf.authority)."""
    from blf.authority import install_control_key
    from blf.keyfiles import control_key

    install_control_key(control_key(loaded.beside(loaded.settings.control_key_file)))


@click.command()
def beat() -> None:
    """Run only the beat scheduler; a RedBeat lock keeps it to one per node."""
    from blf.app import app, configure, settings_with_address

    loaded = _loaded()
    _require_broker(loaded)
    settings = settings_with_address(loaded)
    configure(settings)
    _load_control_key(loaded)
    configure_logging(settings.node_address, settings.log_level)
    app.Beat(loglevel=settings.log_level, quiet=True).run()


@click.command()
@click.option("--port", default=5555, show_default=True, type=int, help="Port for the web UI.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
def flower(port: int, address: str) -> None:
    """Monitor this node's workers and tasks in Flower (a web UI).

    Uses broker_url, or the embedded Redis of a running `run` in this node directory.
    """
    from blf.broker import node_broker
    from blf.children import child_env

    loaded = _loaded()
    broker = node_broker(loaded.settings.broker_url, loaded.directory)
    env = child_env(BLF_CONFIG_PATH=str(loaded.path), BLF_BROKER_URL=broker.celery)
    command = [sys.executable, "-m", "celery", "-A", "blf.app", "flower"]
    command += [f"--port={port}", f"--address={address}"]
    os.execve(sys.executable, command, env)
