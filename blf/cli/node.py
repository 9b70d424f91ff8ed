"""Identity commands: ``init``, ``attest``, ``status``, ``migrate``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from eth_utils import is_address, to_checksum_address

from blf.attestation import BACKENDS
from blf.config import (
    PUBLIC_ICL_ENDPOINT,
    LoadedConfig,
    Settings,
    build_settings,
    load_config,
    resolve_config_path,
    write_new_config,
)
from blf.errors import BlfError
from blf.gpu import detect_gpus
from blf.icl import Retry, probe
from blf.keyfiles import create_key_file
from blf.node import Node, open_node
from blf.redact import display_url
from blf.wallet import PRIVATE_KEY_ENV, create_keystore, keystore_address, read_password

KEYSTORE_NAME = "keystore.json"
CLUSTER_KEY_NAME = "cluster.key"
CONTROL_KEY_NAME = "control.key"
# An operator is waiting at the terminal and can rerun: one quick retry for a 5xx blip,
# not the daemon's four attempts (about 3.5 s of backoff before a dead URL is reported).
CLI_RETRY = Retry(attempts=2, backoff=0.5, backoff_max=0.5)


def register(cli: click.Group) -> None:
    for command in (init, attest, status, migrate):
        cli.add_command(command)


def warn(message: str) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def load_with_warnings() -> LoadedConfig:
    loaded = load_config()
    for message in loaded.warnings:
        warn(message)
    return loaded


def split_models(values: tuple[str, ...]) -> list[str]:
    return [m.strip() for value in values for m in value.split(",") if m.strip()]


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


def describe_expiry(expiry: int | None, *, now: float | None = None) -> tuple[str, str | None]:
    """A readable expiry and, when it needs action, a warning."""
    if not expiry:
        return "none (run `blindference-node attest --mock`)", "no attestation"
    left = int(expiry - (time.time() if now is None else now))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expiry))
    if left <= 0:
        return f"{stamp} (expired {humanize_seconds(-left)} ago)", "certificate expired"
    text = f"{stamp} (in {humanize_seconds(left)})"
    if left < 6 * 3600:
        return text, "certificate expires within 6 h"
    return text, None


# --- init --------------------------------------------------------------------------------


@click.command()
@click.option(
    "--models",
    multiple=True,
    help="Model ids this node serves (comma-separated or repeated), e.g. qwen2.5-7b.",
)
@click.option("--icl", "icl_endpoint", default=None, help=f"ICL endpoint [{PUBLIC_ICL_ENDPOINT}].")
@click.option("--force", is_flag=True, help="Overwrite an existing node (its key is replaced).")
def init(models: tuple[str, ...], icl_endpoint: str | None, force: bool) -> None:
    """Create the node directory, its keystore and config.json.

    A new key is generated unless BLF_PRIVATE_KEY holds one to import. The keystore
    password comes from BLF_KEY_PASSWORD or a prompt; with both env vars set, init
    asks nothing.
    """
    path, warnings = resolve_config_path()
    for message in warnings:
        warn(message)
    keystore = path.parent / KEYSTORE_NAME
    if (path.exists() or keystore.exists()) and not force:
        raise click.ClickException(
            f"a node already exists at {path.parent}; use --force to replace it "
            "(this discards its key unless BLF_PRIVATE_KEY re-imports it)"
        )
    gpus = detect_gpus()
    config = {
        "node_address": "",
        "keystore_path": KEYSTORE_NAME,
        "tier": 0,
        "supported_model_ids": split_models(models),
        "attestation_backend": "mock",
        "icl_endpoint": icl_endpoint or PUBLIC_ICL_ENDPOINT,
        "log_level": "INFO",
        "attestation_cert_hash": None,
        "attestation_expiry": None,
        "registered_on_chain": False,
        "gpus": gpus,
    }
    # Check the config (with any BLF_* overrides) before a key exists: a bad value must not
    # leave a keystore without a config.json behind, which the next init would refuse.
    build_settings(config, path=path)
    password = read_password(confirm=True)
    address = create_keystore(keystore, password, os.environ.get(PRIVATE_KEY_ENV))
    config["node_address"] = address
    write_new_config(path, config)
    _new_key_files(path.parent)
    path.parent.chmod(0o700)  # the keystore's directory: nobody else's business
    click.echo(f"Node initialised in {path.parent}")
    click.echo(f"  Address : {address}")
    click.echo(f"  Models  : {', '.join(config['supported_model_ids']) or '(none)'}")  # type: ignore[arg-type]
    click.echo(f"  GPUs    : {', '.join(gpus) or 'none found (fine for a control machine)'}")
    click.echo(f"  Keys    : {CLUSTER_KEY_NAME} (copy to GPU machines), {CONTROL_KEY_NAME} (never)")
    click.echo("Next: blindference-node attest --mock")


def _new_key_files(directory: Path) -> None:
    """The cluster key (copied to GPU machines) and the control key (never copied)."""
    for name in (CLUSTER_KEY_NAME, CONTROL_KEY_NAME):
        (directory / name).unlink(missing_ok=True)  # --force: a new node, new keys
        create_key_file(directory / name)


# --- attest ------------------------------------------------------------------------------


@click.command()
@click.option("--mock", is_flag=True, help="Use the mock backend (tier 0), the only one today.")
@click.option(
    "--tee-key",
    default=None,
    help="Mock attestation key (default: $MOCK_ATTESTATION_KEY, else the network's default).",
)
@click.option(
    "--register-on-chain",
    is_flag=True,
    help="Also register the node in NodeRegistry (needs rpc_url and gas).",
)
def attest(mock: bool, tee_key: str | None, register_on_chain: bool) -> None:
    """Attest this node with the ICL: challenge, quote, verify; saves the certificate."""
    if not mock:
        lines = ["Attestation backends:"]
        for backend in BACKENDS.values():
            state = "available" if backend.available else "not available yet"
            lines.append(f"  {backend.name:8} tier {backend.tier}  {state}: {backend.about}")
        lines.append("Only the mock backend (tier 0) is available now:")
        lines.append("  blindference-node attest --mock")
        click.echo("\n".join(lines))
        raise SystemExit(2)
    loaded = load_with_warnings()
    if register_on_chain:
        from blf.cli.chain import require_rpc_url

        require_rpc_url(loaded)  # fail before attesting, not after
    node = open_node(loaded)
    with node.icl(retry=CLI_RETRY) as client:
        cert = node.attest(tee_key=tee_key, icl=client)
    expiry_text, _ = describe_expiry(cert.expiry)
    click.echo(f"Attested with {node.settings.icl_endpoint}")
    click.echo(f"  Address : {node.address}")
    click.echo(f"  Tier    : {cert.tier}")
    click.echo(f"  Cert    : {cert.cert_hash}")
    click.echo(f"  Expires : {expiry_text}")
    if register_on_chain:
        from blf.cli.chain import register_on_chain as do_register

        do_register(node)


# --- status ------------------------------------------------------------------------------


def _node_address(loaded: LoadedConfig) -> str:
    configured = loaded.settings.node_address
    if configured:
        # Shown checksummed, as every path and body carries it (a public file may not be).
        return str(to_checksum_address(configured)) if is_address(configured) else configured
    try:
        return keystore_address(loaded.keystore_file()) or "(unknown)"
    except BlfError:
        return "(unknown)"


@click.command()
def status() -> None:
    """Show the node's identity and certificate, its ICL, chain and stake, CoFHE, IPFS,
    and the live GPU workers per model."""
    loaded = load_with_warnings()
    settings = loaded.settings
    expiry_text, expiry_warning = describe_expiry(settings.attestation_expiry)
    reachable = probe(settings.icl_endpoint)
    icl_state = "answers" if reachable is None else f"does not answer: {reachable}"
    rows = [
        ("Config", str(loaded.path)),
        ("Address", _node_address(loaded)),
        ("Tier", str(settings.tier)),
        ("Models", ", ".join(settings.supported_model_ids) or "(none)"),
        ("Cert", settings.attestation_cert_hash or "(none)"),
        ("Expires", expiry_text),
        ("ICL", f"{settings.icl_endpoint} ({icl_state})"),
        # Redis passwords and hosted-RPC keys live in these URLs: never print them.
        ("Broker", display_url(settings.broker_url) or "embedded Redis (started by `run`)"),
        ("Chain", display_url(settings.rpc_url or "") or "no rpc_url: on-chain duties off"),
        ("Stake", _stake_line(loaded)),
        ("CoFHE", _cofhe_line(loaded)),
        ("IPFS", _ipfs_line(settings)),
    ]
    workers, idle = _worker_rows(loaded)
    rows += workers
    # Plain aligned lines, not a rich table: a table folds long URLs and paths at 80 columns
    # when stdout is not a terminal, which breaks copy-paste and grep.
    for name, value in rows:
        click.echo(f"{name:<8} {value}")
    for model in idle:
        warn(f"no live worker serves {model}: its jobs are not claimed")
    if expiry_warning:
        warn(f"{expiry_warning}: run `blindference-node attest --mock`")
    if settings.unknown_fields:
        unknown = ", ".join(settings.unknown_fields)
        warn(f"ignored config fields, unknown to blf (kept in the file as they are): {unknown}")


def _worker_rows(loaded: LoadedConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """A row per model: its live GPU workers and free slots, read from the node's Redis
    (a running `run`'s, or broker_url); and the models no worker serves."""
    import redis

    from blf.broker import node_broker
    from blf.capacity import live_workers

    settings = loaded.settings
    address = _node_address(loaded)
    if not settings.supported_model_ids or not is_address(address):
        return [], []
    try:
        urls = node_broker(settings.broker_url, loaded.directory)
    except BlfError:
        return [("Workers", "not checked: the node is not running (no Redis)")], []
    client = redis.Redis.from_url(urls.redis, socket_timeout=3, socket_connect_timeout=3)
    rows, idle = [], []
    try:
        for model in settings.supported_model_ids:
            workers = live_workers(client, address, model)
            if not workers:
                idle.append(model)
            rows.append(
                (
                    "Workers",
                    f"{model}: {len(workers)} live, {sum(workers.values())} free slot(s)",
                )
            )
    except (redis.RedisError, OSError) as exc:
        return [("Workers", f"not checked: Redis did not answer ({type(exc).__name__})")], []
    finally:
        client.close()
    return rows, idle


def _stake_line(loaded: LoadedConfig) -> str:
    from blf.cli.staking import stake_summary

    address = _node_address(loaded)
    if not is_address(address):
        return "not checked: no node address"
    return stake_summary(loaded.settings, address)


def _cofhe_endpoint(settings: Settings) -> str:
    return display_url(settings.cofhe_endpoint or "") or "no cofhe_endpoint: jobs fail"


def _cofhe_line(loaded: LoadedConfig) -> str:
    """The mode and endpoint; in bridge mode, whether the SDK helper starts and connects
    (no key is unlocked for this: it signs nothing)."""
    settings = loaded.settings
    line = f"{settings.effective_cofhe_mode}, {_cofhe_endpoint(settings)}"
    if settings.effective_cofhe_mode != "bridge" or not settings.cofhe_endpoint:
        return line
    from blf.cofhe_bridge import open_bridge
    from blf.errors import CofheError

    try:
        bridge = open_bridge(
            settings, None, directory=loaded.path.parent, address=_node_address(loaded)
        )
        try:
            info = bridge.handshake()
        finally:
            bridge.close()
    except CofheError as exc:
        return f"{line} (helper does not answer: {exc})"
    return f"{line} (helper answers: @cofhe/sdk {info.sdk}, chain {info.chain_id})"


def _ipfs_line(settings: Settings) -> str:
    if settings.ipfs_api_url:
        upload = f"upload to {display_url(settings.ipfs_api_url)}"
    elif settings.pinata_jwt:
        upload = "upload to Pinata"
    else:
        upload = "no upload target: leader jobs fail"
    gateways = [settings.ipfs_gateway, *settings.ipfs_gateway_fallbacks]
    return f"{upload}; gateways {', '.join(display_url(g) for g in gateways if g)}"


# --- migrate -----------------------------------------------------------------------------


@click.command()
@click.option(
    "--from",
    "source",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The public node's directory (the one holding its config.json).",
)
def migrate(source: Path) -> None:
    """Check a public node's directory before running blf on it; changes nothing.

    Point BLF_CONFIG_DIR (or BLF_CONFIG_PATH) at that directory afterwards: blf reads the
    same config.json and keystore as they are.
    """
    path = source.expanduser() / "config.json"
    loaded = load_config(path)
    click.echo(f"config.json  : ok ({path})")
    for field in loaded.settings.unknown_fields:
        click.echo(f"  unknown field kept as is: {field}")
    node: Node = open_node(loaded)
    click.echo(f"keystore     : ok, decrypts to {node.address} ({loaded.keystore_file()})")
    expiry_text, expiry_warning = describe_expiry(loaded.settings.attestation_expiry)
    click.echo(f"attestation  : {expiry_text}")
    todo = []
    if expiry_warning:
        todo.append("blindference-node attest --mock")
    todo.append("blindference-node run")
    click.echo(f"\nNext, with BLF_CONFIG_DIR={source.expanduser()} set:")
    for step in todo:
        click.echo(f"  {step}")
