"""Service commands: ``run`` (the whole node), ``worker`` and ``beat`` (one role each)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import click

from blf.cli.common import load_with_warnings
from blf.config import LoadedConfig
from blf.errors import ConfigError
from blf.logging import configure_logging, say, warn_if_root

NO_ATTESTATION = "Error: No attestation found. Run `blindference-node attest` first."


def register(cli: click.Group) -> None:
    for command in (run, worker, beat, flower):
        cli.add_command(command)


def _loaded() -> LoadedConfig:
    return load_with_warnings()


def _require_broker(loaded: LoadedConfig) -> None:
    if not loaded.settings.broker_url:
        raise ConfigError(
            f"{loaded.path}: field 'broker_url' is empty; `worker` and `beat` join an existing "
            "Redis (set BLF_BROKER_URL=redis://...), while `run` starts an embedded one",
            field="broker_url",
        )


# The signals that stop `run` gracefully: blf.supervisor.STOP_SIGNALS (not imported from
# there: that module's imports are the slow part of the start this must cover).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _catch_stop_signals(stop: threading.Event) -> dict[int, Any]:
    """Until the supervisor runs nothing has started (no lock, no Redis, no child, no
    heartbeat), so a stop request ends the process at once, with status 0: by SystemExit,
    which lets a password prompt restore the terminal. Python drops an exception raised
    where it cannot propagate (a signal handled inside a weakref callback of the import
    machinery, say), so ``stop`` is set too: `run` checks it before the supervisor starts,
    and the supervisor, handed the same event, at its first step."""

    def stop_before_start(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            say(f"Stopped by {signal.Signals(signum).name} before the node started")
        raise SystemExit(0)

    return {signum: signal.signal(signum, stop_before_start) for signum in STOP_SIGNALS}


@click.command()
def run() -> None:
    """Run the node: embedded Redis (unless broker_url is set), beat (heartbeat 60 s,
    poller 5 s, watchdog 10 min, on-chain heartbeat 10 days), a control worker and the
    metrics endpoint (metrics_port; 0 takes a free one; a port in use is a warning, not a
    failure), all three in this process, which holds the key; and an inference worker, a
    process without it (none when no model is served). SIGINT/SIGTERM stop it gracefully: no new
    assignments, running jobs finish (up to shutdown_timeout_s), a final heartbeat, then
    exit 0. A stop before the node is up exits 0 at once, with no heartbeat sent (the
    final heartbeat follows only a first one)."""
    # First of all, before the slow imports and the keystore's unlocking: a SIGTERM that
    # systemd or a test sends during the start must not kill the process (status 143).
    from blf.entry import STOPPED_EARLY

    stop = threading.Event()
    previous = _catch_stop_signals(stop)
    if STOPPED_EARLY.is_set():  # a signal before this command ran: see blf.entry
        raise SystemExit(0)
    try:
        from blf.node import open_node
        from blf.readiness import check_servable
        from blf.supervisor import Supervisor
        from blf.wallet import read_password

        loaded = _loaded()
        if not loaded.settings.attested:
            click.echo(NO_ATTESTATION, err=True)
            sys.exit(1)
        configure_logging(loaded.settings.node_address, loaded.settings.log_level)
        check_servable(loaded.settings)
        password = read_password()
        node = open_node(loaded, password=password)
        configure_logging(node.address, loaded.settings.log_level)
        if stop.is_set():
            raise SystemExit(0)
    except BaseException:
        if not stop.is_set():  # a refusal (or a test calling `run` in-process)
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)
        raise
    # Supervisor.run installs its own handlers before it starts anything.
    supervisor = Supervisor(node=node, stop_requested=stop)
    code = 1
    try:
        code = supervisor.run()
    finally:
        if supervisor.abandoned_threads:
            # A job still runs in a thread that would not stop: Python's exit would wait for
            # it. Its message is unacknowledged, so the next worker to start takes it again.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


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
    from blf.app import settings_with_address
    from blf.control_worker import build_control_worker
    from blf.node import open_node

    loaded = _loaded()
    _require_broker(loaded)
    settings = settings_with_address(loaded)
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    node = open_node(loaded, password=password)
    configure_logging(node.address, settings.log_level)
    warn_if_root()  # before the worker: it also quiets Celery's multi-line warning
    instance = build_control_worker(
        node,
        loaded,
        broker_url=settings.broker_url,
        concurrency=concurrency,
        with_beat=with_beat,
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


@click.command()
def beat() -> None:
    """Run only the beat scheduler; a RedBeat lock keeps it to one per node."""
    from blf.app import app, configure, settings_with_address
    from blf.authority import install_node_control_key

    loaded = _loaded()
    _require_broker(loaded)
    settings = settings_with_address(loaded)
    configure(settings)
    install_node_control_key(loaded)
    configure_logging(settings.node_address, settings.log_level)
    app.Beat(loglevel=settings.log_level, quiet=True).run()


FLOWER_LOGIN_ENV = "FLOWER_BASIC_AUTH"  # Flower reads its options from FLOWER_* variables


def _flower_logins(value: str) -> str:
    """Flower's basic-auth value checked: ``user:password``, several comma-separated (the
    value itself is never echoed: it holds passwords)."""
    for entry in value.split(","):
        user, colon, password = entry.partition(":")
        if not (colon and user.strip() and password):
            raise click.ClickException(
                f"--basic-auth ({FLOWER_LOGIN_ENV}) must be user:password, several separated "
                "by commas; an entry has no user or no password"
            )
    return value


@click.command()
@click.option("--port", default=5555, show_default=True, type=int, help="Port for the web UI.")
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; beyond loopback only with a login (--basic-auth).",
)
@click.option(
    "--basic-auth",
    "logins",
    envvar=FLOWER_LOGIN_ENV,
    show_envvar=True,
    default=None,
    help="Flower's login, user:password (several: comma-separated). Prefer the variable: "
    "a command line is readable by every local user.",
)
def flower(port: int, address: str, logins: str | None) -> None:
    """Monitor this node's workers and tasks in Flower (a web UI).

    Uses broker_url, or the embedded Redis of a running `run` in this node directory.
    Listens on loopback unless told otherwise; any other address needs a login, since
    Flower can revoke tasks and shut workers down. Tasks show the job and role as their
    arguments, never the sealed keys or tokens they carry.
    """
    from blf.broker import node_broker
    from blf.children import child_env
    from blf.metrics import is_loopback

    if logins:
        _flower_logins(logins)
    elif not is_loopback(address):
        raise click.ClickException(
            f"Flower on {address or 'every address'} would be open to the network without a "
            f"login: set {FLOWER_LOGIN_ENV}=user:password (or --basic-auth), or bind 127.0.0.1"
        )
    loaded = _loaded()
    broker = node_broker(loaded.settings.broker_url, loaded.directory)
    env = child_env(BLF_CONFIG_PATH=str(loaded.path), BLF_BROKER_URL=broker.celery)
    env.pop(FLOWER_LOGIN_ENV, None)  # an empty one would give Flower a login of ""
    if logins:
        env[FLOWER_LOGIN_ENV] = logins  # in Flower's environment, not on its command line
    command = [sys.executable, "-m", "celery", "-A", "blf.app", "flower"]
    command += [f"--port={port}", f"--address={address}"]
    os.execve(sys.executable, command, env)
