"""Identity commands: ``init``, ``attest``, ``status``, ``migrate``."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from eth_utils import is_address, to_checksum_address

from blf.attestation import BACKENDS
from blf.cli.chain import REGISTER_HINT, inactive_reason, read_only_client
from blf.cli.chain import register_on_chain as register_on_chain_now
from blf.cli.chain import require_rpc_url as require_chain_rpc_url

# load_with_warnings, warn and humanize_seconds live in blf.cli.common; service, systemd and
# metrics still import the first two from here.
from blf.cli.common import (
    configured_address,
    echo_json,
    humanize_seconds,
    json_option,
    load_with_warnings,
    node_redis,
    stamp,
    warn,
)
from blf.cli.staking import read_stake, stake_json, stake_line
from blf.config import (
    PUBLIC_ICL_ENDPOINT,
    LoadedConfig,
    Settings,
    build_settings,
    load_config,
    resolve_config_path,
    write_new_config,
)
from blf.errors import BlfError, ConfigError
from blf.gpu import detect_gpus
from blf.icl import Retry, probe
from blf.keyfiles import create_key_file
from blf.node import Node, open_node
from blf.redact import display_url
from blf.wallet import PRIVATE_KEY_ENV, create_keystore, read_password

if TYPE_CHECKING:
    import redis

    from blf.chain import ChainNodeStatus, StakingStatus


KEYSTORE_NAME = "keystore.json"
CLUSTER_KEY_NAME = "cluster.key"
CONTROL_KEY_NAME = "control.key"
# An operator is waiting at the terminal and can rerun: one quick retry for a 5xx blip,
# not the daemon's four attempts (about 3.5 s of backoff before a dead URL is reported).
CLI_RETRY = Retry(attempts=2, backoff=0.5, backoff_max=0.5)


def register(cli: click.Group) -> None:
    for command in (init, attest, status, migrate):
        cli.add_command(command)


def split_models(values: tuple[str, ...]) -> list[str]:
    return [m.strip() for value in values for m in value.split(",") if m.strip()]


def describe_expiry(expiry: int | None, *, now: float | None = None) -> tuple[str, str | None]:
    """A readable expiry and, when it needs action, a warning."""
    if not expiry:
        return "none (run `blindference-node attest --mock`)", "no attestation"
    left = int(expiry - (time.time() if now is None else now))
    when = stamp(expiry)
    if left <= 0:
        return f"{when} (expired {humanize_seconds(-left)} ago)", "certificate expired"
    text = f"{when} (in {humanize_seconds(left)})"
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
        require_chain_rpc_url(loaded)  # fail before attesting, not after
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
        register_on_chain_now(node)


# --- status ------------------------------------------------------------------------------

# An operator is waiting: each probe and read gives up quickly, and they run side by side.
PROBE_TIMEOUT_S = 3.0
CHAIN_TIMEOUT_S = 5.0
REDIS_TIMEOUT_S = 3.0
NOT_RUNNING = "the node is not running (no Redis)"


@dataclass
class StatusReport:
    """What `status` found: text rows (``Name  value``), the same facts as one JSON object,
    and the warnings to show."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, data: Any, *rows: tuple[str, str]) -> None:
        self.data[key] = data
        self.rows.extend(rows)


def _node_address(loaded: LoadedConfig) -> str:
    try:
        address = configured_address(loaded)
    except BlfError:
        return "(unknown)"
    # Shown checksummed, as every path and body carries it (a public file may not be).
    return str(to_checksum_address(address)) if is_address(address) else address


@click.command()
@json_option("Print one JSON object with the same facts instead of text (no secrets).")
def status(as_json: bool) -> None:
    """Show the node's identity and certificate, its ICL, chain, registration and stake,
    CoFHE and IPFS, and its cluster: live GPU workers and free slots per model, queue
    depths, jobs in flight and the last ICL heartbeat (read from the node's Redis)."""
    loaded = load_with_warnings()
    report = status_report(loaded)
    if as_json:
        echo_json({**report.data, "warnings": [*loaded.warnings, *report.warnings]})
        return
    # Plain aligned lines, not a rich table: a table folds long URLs and paths at 80 columns
    # when stdout is not a terminal, which breaks copy-paste and grep.
    for name, value in report.rows:
        click.echo(f"{name:<8} {value}")
    for message in report.warnings:
        warn(message)


def status_report(loaded: LoadedConfig) -> StatusReport:
    """Everything `status` shows. Never raises for what it reads: a source that does not
    answer is a row that says so."""
    settings = loaded.settings
    address = _node_address(loaded)
    report = StatusReport()
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="blf-status") as pool:
        # The network reads wait on timeouts, not on each other.
        probes = {
            url: pool.submit(probe, url, timeout=PROBE_TIMEOUT_S)
            for url in dict.fromkeys([settings.icl_endpoint, *_ipfs_probe_urls(settings)])
        }
        registry = pool.submit(_registry_state, loaded, address)
        stake: Future[StakingStatus | str] | None = None
        if is_address(address):
            stake = pool.submit(read_stake, settings, address, timeout_s=CHAIN_TIMEOUT_S)
        cofhe_row, cofhe = _cofhe_state(loaded, address)
        cluster = _cluster_state(loaded, address)
        answers = {url: future.result() for url, future in probes.items()}
        expiry_warning = _identity(report, loaded, address)
        _icl(report, settings, answers[settings.icl_endpoint])
        _chain(report, loaded, registry.result())
        _stake(report, stake.result() if stake else "not checked: no node address")
    report.add("cofhe", cofhe, ("CoFHE", cofhe_row))
    _ipfs(report, settings, answers)
    cluster.report(report)
    if expiry_warning:
        report.warnings.append(f"{expiry_warning}: run `blindference-node attest --mock`")
    if settings.unknown_fields:
        unknown = ", ".join(settings.unknown_fields)
        report.warnings.append(
            f"ignored config fields, unknown to blf (kept in the file as they are): {unknown}"
        )
    return report


def _identity(report: StatusReport, loaded: LoadedConfig, address: str) -> str | None:
    """Config, address, tier, models and certificate; returns the certificate's warning."""
    settings = loaded.settings
    expiry = int(settings.attestation_expiry or 0) or None
    expiry_text, expiry_warning = describe_expiry(expiry)
    report.add("config", str(loaded.path), ("Config", str(loaded.path)))
    report.add("address", None if address == "(unknown)" else address, ("Address", address))
    report.add("tier", settings.tier, ("Tier", str(settings.tier)))
    report.add(
        "models",
        list(settings.supported_model_ids),
        ("Models", ", ".join(settings.supported_model_ids) or "(none)"),
    )
    certificate = {
        "hash": settings.attestation_cert_hash or None,
        "expiry": expiry,
        "seconds_left": int(expiry - time.time()) if expiry else None,
        "warning": expiry_warning,
    }
    report.add(
        "certificate",
        certificate,
        ("Cert", settings.attestation_cert_hash or "(none)"),
        ("Expires", expiry_text),
    )
    return expiry_warning


def _icl(report: StatusReport, settings: Settings, error: str | None) -> None:
    endpoint = display_url(settings.icl_endpoint)
    state = "answers" if error is None else f"does not answer: {error}"
    data = {"endpoint": endpoint, "answers": error is None, "error": error}
    report.add("icl", data, ("ICL", f"{endpoint} ({state})"))
    # Redis passwords and hosted-RPC keys live in these URLs: never print them.
    broker = display_url(settings.broker_url) if settings.broker_url else None
    report.add(
        "broker",
        {"url": broker, "embedded": broker is None},
        ("Broker", broker or "embedded Redis (started by `run`)"),
    )


# --- status: chain -----------------------------------------------------------------------


def _registry_state(loaded: LoadedConfig, address: str) -> ChainNodeStatus | str:
    """The node's NodeRegistry record, or why it was not read (never raises a BlfError)."""
    if not loaded.settings.rpc_url:
        return "not checked: no rpc_url"
    if not is_address(address):
        return "not checked: no node address"
    try:
        return read_only_client(loaded, timeout_s=CHAIN_TIMEOUT_S).node_status(address)
    except BlfError as exc:
        return f"cannot read: {exc}"


def _chain(report: StatusReport, loaded: LoadedConfig, state: ChainNodeStatus | str) -> None:
    settings = loaded.settings
    rpc = display_url(settings.rpc_url) if settings.rpc_url else None
    data: dict[str, Any] = {
        "rpc_url": rpc,
        "chain_id": settings.chain_id,
        "registry_address": settings.node_registry_address,
        "registered": None,
        "active": None,
        "last_heartbeat": None,
        "heartbeat_age_s": None,
        "attestation_expires": None,
        "error": None,
    }
    if isinstance(state, str):
        data["error"] = state
        text = state
    else:
        node = state.node
        age = state.seconds_since_heartbeat
        data.update(
            registered=node.registered,
            active=state.is_active,
            last_heartbeat=node.last_heartbeat if node.registered else None,
            heartbeat_age_s=age,
            attestation_expires=node.attestation_expires if node.registered else None,
        )
        if not node.registered:
            text = f"not registered (register with `{REGISTER_HINT}`)"
        elif state.is_active:
            text = f"registered, active; last heartbeat {humanize_seconds(age or 0)} ago"
        else:
            text = f"registered, not active: {inactive_reason(state)}"
    report.add(
        "chain",
        data,
        ("Chain", rpc or "no rpc_url: on-chain duties off"),
        ("Registry", text),
    )


def _stake(report: StatusReport, status: StakingStatus | str) -> None:
    if isinstance(status, str):
        data: dict[str, Any] = {"error": status}
    else:
        data = {**stake_json(status), "error": None}
    report.add("stake", data, ("Stake", stake_line(status)))


# --- status: CoFHE and IPFS --------------------------------------------------------------


def _cofhe_endpoint(settings: Settings) -> str:
    return display_url(settings.cofhe_endpoint or "") or "no cofhe_endpoint: jobs fail"


def _cofhe_state(loaded: LoadedConfig, address: str) -> tuple[str, dict[str, Any]]:
    """The mode and endpoint; in bridge mode, whether the SDK helper starts and connects
    (no key is unlocked for this: it signs nothing)."""
    settings = loaded.settings
    mode = settings.effective_cofhe_mode
    line = f"{mode}, {_cofhe_endpoint(settings)}"
    endpoint = display_url(settings.cofhe_endpoint) if settings.cofhe_endpoint else None
    data: dict[str, Any] = {"mode": mode, "endpoint": endpoint, "helper": None}
    if mode != "bridge" or not settings.cofhe_endpoint:
        return line, data
    from blf.cofhe_bridge import open_bridge
    from blf.errors import CofheError

    try:
        bridge = open_bridge(settings, None, directory=loaded.path.parent, address=address)
        try:
            info = bridge.handshake()
        finally:
            bridge.close()
    except CofheError as exc:
        data["helper"] = {"answers": False, "sdk": None, "chain_id": None, "error": str(exc)}
        return f"{line} (helper does not answer: {exc})", data
    data["helper"] = {"answers": True, "sdk": info.sdk, "chain_id": info.chain_id, "error": None}
    return f"{line} (helper answers: @cofhe/sdk {info.sdk}, chain {info.chain_id})", data


def _ipfs_upload(settings: Settings) -> tuple[str | None, str | None]:
    """The upload target's kind and the URL to probe (None, None: there is none)."""
    from blf.ipfs import kubo_base  # where blf.ipfs sends Kubo RPC calls

    if settings.ipfs_api_url:
        return "kubo", kubo_base(settings.ipfs_api_url)
    if settings.pinata_jwt:
        return "pinata", settings.pinata_api_url
    return None, None


def _ipfs_gateways(settings: Settings) -> list[str]:
    return [g for g in (settings.ipfs_gateway, *settings.ipfs_gateway_fallbacks) if g]


def _ipfs_probe_urls(settings: Settings) -> list[str]:
    _, upload = _ipfs_upload(settings)
    return [*([upload] if upload else []), *_ipfs_gateways(settings)]


def _ipfs(report: StatusReport, settings: Settings, answers: dict[str, str | None]) -> None:
    kind, upload_url = _ipfs_upload(settings)
    if settings.ipfs_api_url:
        upload = f"upload to {display_url(settings.ipfs_api_url)}"
    elif settings.pinata_jwt:
        upload = "upload to Pinata"
    else:
        upload = "no upload target: leader jobs fail"
    gateways = _ipfs_gateways(settings)
    line = f"{upload}; gateways {', '.join(display_url(g) for g in gateways)}"
    probed = _ipfs_probe_urls(settings)
    silent = [f"{display_url(u)} [{answers[u]}]" for u in dict.fromkeys(probed) if answers[u]]
    if probed:
        line += f" (no answer from {', '.join(silent)})" if silent else " (all answer)"

    def target(url: str) -> dict[str, Any]:
        error = answers[url]
        return {"url": display_url(url), "answers": error is None, "error": error}

    data = {
        "upload": {"kind": kind, **target(upload_url)} if upload_url else None,
        "gateways": [target(g) for g in gateways],
    }
    report.add("ipfs", data, ("IPFS", line))


# --- status: the cluster, from the node's Redis ------------------------------------------


@dataclass
class ClusterState:
    """What the node's Redis says: GPU workers, queues, jobs in flight, heartbeats.
    ``error`` set: nothing was read, and it says why."""

    models: tuple[str, ...]
    error: str | None = None
    workers: dict[str, dict[str, int]] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)
    control_queued: int | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    records: int | None = None
    heartbeat_age_s: dict[str, float | None] = field(default_factory=dict)

    def report(self, report: StatusReport) -> None:
        rows: list[tuple[str, str]] = []
        if self.error is not None:
            reason = f"not checked: {self.error}"
            if self.models:
                rows.append(("Workers", reason))
            rows += [("Queue", reason), ("Jobs", reason), ("Heartbeat", reason)]
        else:
            rows += self._rows(report)
        redis_up = self.error is None
        report.add(
            "cluster",
            {
                "redis_up": redis_up,
                "error": self.error,
                "workers": {
                    m: {"live": len(live), "free_slots": sum(live.values())}
                    for m, live in self.workers.items()
                },
                "queues": dict(self.queued),
                "control_queue": self.control_queued,
                "jobs_in_flight": sum(self.in_flight.values()) if redis_up else None,
                "jobs_in_flight_by_role": dict(self.in_flight),
                "journal_records_read": self.records,
                "heartbeat_age_s": {
                    kind: self.heartbeat_age_s.get(kind) for kind in ("icl", "chain")
                },
            },
            *rows,
        )

    def _rows(self, report: StatusReport) -> list[tuple[str, str]]:
        rows = []
        for model in self.models:
            live = self.workers.get(model, {})
            if not live:
                report.warnings.append(f"no live worker serves {model}: its jobs are not claimed")
            rows.append(
                ("Workers", f"{model}: {len(live)} live, {sum(live.values())} free slot(s)")
            )
        rows += [("Queue", f"{m}: {self.queued.get(m, 0)} waiting") for m in self.models]
        rows.append(("Queue", f"control: {self.control_queued or 0} waiting"))
        total = sum(self.in_flight.values())
        roles = ", ".join(f"{role} {n}" for role, n in sorted(self.in_flight.items()) if n)
        rows.append(("Jobs", f"{total} in flight" + (f" ({roles})" if roles else "")))
        icl = self.heartbeat_age_s.get("icl")
        when = "never recorded" if icl is None else f"{humanize_seconds(int(icl))} ago"
        rows.append(("Heartbeat", f"ICL: {when}"))
        return rows


def _cluster_state(loaded: LoadedConfig, address: str) -> ClusterState:
    """The node's Redis (a running `run`'s, or broker_url), read in one round trip by
    blf.metrics' own reader, so `status` and the metrics endpoint never disagree."""
    import redis

    models = tuple(loaded.settings.supported_model_ids)
    if not is_address(address):
        return ClusterState(models, error="no node address")
    try:
        client = node_redis(loaded, timeout=REDIS_TIMEOUT_S, retries=False)
    except ConfigError:  # no broker_url, and no embedded Redis: `run` has not started it
        return ClusterState(models, error=NOT_RUNNING)
    except BlfError:  # the error would repeat broker_url, password included
        return ClusterState(models, error="broker_url is not a Redis URL")
    try:
        return _read_cluster(client, loaded.settings, address, models)
    except (redis.RedisError, OSError, ValueError) as exc:
        return ClusterState(models, error=f"Redis did not answer ({type(exc).__name__})")
    finally:
        client.close()


def _read_cluster(
    client: redis.Redis, settings: Settings, address: str, models: tuple[str, ...]
) -> ClusterState:
    from blf.app import transport_options
    from blf.metrics import NodeCollector, NodeView

    scoped = settings.model_copy(update={"node_address": address})
    view = NodeView.of(scoped)
    collector = NodeCollector(
        client,
        address,
        lambda: view,
        queue_prefix=transport_options(scoped)["global_keyprefix"],
    )
    # blf.metrics' readers (private there for now): the scrape's one round trip, and the
    # window's count of jobs not yet in a final state.
    snapshot = collector.read_redis(models)
    window = collector.window_of(snapshot.records)
    now = time.time()
    return ClusterState(
        models,
        workers=snapshot.workers,
        queued=snapshot.queued,
        control_queued=snapshot.control_queued,
        in_flight=window.running,
        records=sum(1 for r in snapshot.records if r.get("state") is not None),
        heartbeat_age_s={
            kind: None if at is None else max(now - at, 0.0)
            for kind, at in snapshot.heartbeats.items()
        },
    )


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
    for name in loaded.settings.unknown_fields:
        click.echo(f"  unknown field kept as is: {name}")
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
