"""``devnet``: local stand-ins for the network's services, for trials and tests."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from blf.cli.common import json_option
from blf.errors import BlfError
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


DEFAULT_DIR = Path("~/.blindference-devnet")
dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="The devnet's directory: devnet.json and one directory per node.",
)


@devnet.command("up")
@dir_option
@click.option(
    "--nodes",
    default=3,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Local nodes to run (a job needs 3: a leader and two verifiers).",
)
@click.option(
    "--model",
    default="demo-model",
    show_default=True,
    help="Model id the nodes serve, with the mock backend (not a model).",
)
@click.option("--port", default=0, type=int, help="Port for the local ICL (default: any free).")
@click.option(
    "--demo/--no-demo",
    default=True,
    show_default=True,
    help="Send one job as a user once the nodes are ready, and show its output.",
)
def devnet_up(directory: Path, nodes: int, model: str, port: int, demo: bool) -> None:
    """Try blf with nothing but this machine: a local ICL, CoFHE and IPFS, and NODES local
    nodes (created the first time), attested and running until Ctrl+C. Submit jobs with
    `devnet submit`. The nodes' keystore password is BLF_KEY_PASSWORD, else "devnet"."""
    from blf.devnet.network import LocalNetwork

    root = directory.expanduser().absolute()
    password = os.environ.get(PASSWORD_ENV) or DEVNET_PASSWORD
    network = LocalNetwork(root, nodes=nodes, model=model, password=password)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        network.start(icl_port=port)
        network.wait_ready()
        click.echo(_banner(network, root))
        click.echo("Devnet ready", nl=True)
        if demo and nodes >= 3:
            threading.Thread(target=_demo_job, args=(network, model), daemon=True).start()
        _report_jobs(network, stop)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        network.stop()
    click.echo("Devnet stopped")


DEMO_PROMPT = "What is confidential inference?"


def _demo_job(network: Any, model: str) -> None:
    """One job through the whole pipeline, as a user would send it."""
    from blf.devnet.user import DevnetInfo, DevnetUser

    user = DevnetUser(DevnetInfo.read(network.info_path))
    try:
        job_id = user.submit(DEMO_PROMPT, model)
        click.echo(f"Demo job {job_id[:16]}... sent: {DEMO_PROMPT!r}")
        record = user.wait(job_id, 120)
        click.echo(
            f"Demo job {job_id[:16]}... output, as the user decrypts it: {user.output(record)}"
        )
    except BlfError as exc:
        click.echo(f"Demo job failed: {exc}", err=True)
    finally:
        user.close()


def _report_jobs(network: Any, stop: threading.Event) -> None:
    """One line per job that reaches a final state, until stopped."""
    reported: set[str] = set()
    while not stop.wait(0.5):
        for node in network.members:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"{node.directory.name} exited with {node.process.returncode}")
        for job in network.icl.state.job_records()["jobs"]:
            if job["status"] == "QUEUED" or job["jobId"] in reported:
                continue
            reported.add(job["jobId"])
            verdicts = ", ".join(v["verdict"] for v in job["verdicts"].values()) or "none"
            click.echo(
                f"Job {job['jobId'][:16]}...: {job['status']} (model {job['modelId']}, "
                f"verdicts: {verdicts})"
            )


def _banner(network: Any, root: Path) -> str:
    lines = [
        "",
        f"Devnet ICL   : {network.icl.url}",
        f"Devnet CoFHE : {network.cofhe.url}",
        f"Devnet IPFS  : {network.ipfs.url}",
        f"Devnet file  : {root / 'devnet.json'}",
    ]
    lines += [f"Node {n.directory.name:7}: {n.address}" for n in network.members]
    lines += [
        "",
        "Send a job from another terminal:",
        f'  blindference-node devnet submit --dir {root} --prompt "Hello" --wait',
        "Stop with Ctrl+C.",
        "",
        "To join the public network instead (https://icl.blindference.xyz):",
        "  blindference-node init --models <model-id>     # creates ~/.blindference/config.json",
        "  blindference-node attest --mock",
        "  blindference-node run",
        "",
    ]
    return "\n".join(lines)


@devnet.command("submit")
@dir_option
@click.option("--prompt", required=True, help="The prompt text (encrypted before it leaves).")
@click.option("--model", default="demo-model", show_default=True, help="Model id.")
@click.option("--wait", is_flag=True, help="Wait for the job's final status and its output.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds --wait waits.")
@json_option("One JSON object (job_id, status, output).")
def devnet_submit(
    directory: Path, prompt: str, model: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """Act as a user of the running devnet: encrypt the prompt, store its key in CoFHE,
    upload it to IPFS and create the job."""
    from blf.devnet.user import DevnetInfo, DevnetUser

    user = DevnetUser(DevnetInfo.read(directory.expanduser() / "devnet.json"))
    try:
        job_id = user.submit(prompt, model)
        if not wait:
            _print_job(user, user.job(job_id), as_json, with_output=False)
            return
        record = user.wait(job_id, timeout)
        _print_job(user, record, as_json, with_output=True)
    finally:
        user.close()
    if record["status"] == "QUEUED":
        raise click.ClickException(f"job {job_id} still QUEUED after {timeout:.0f}s")


@devnet.command("show")
@dir_option
@click.argument("job_id")
@json_option("One JSON object.")
def devnet_show(directory: Path, job_id: str, as_json: bool) -> None:
    """A devnet job's status, and the leader's output decrypted as the user would."""
    from blf.devnet.user import DevnetInfo, DevnetUser

    user = DevnetUser(DevnetInfo.read(directory.expanduser() / "devnet.json"))
    try:
        _print_job(user, user.job(job_id), as_json, with_output=True)
    finally:
        user.close()


def _print_job(user: Any, record: dict[str, Any], as_json: bool, *, with_output: bool) -> None:
    output = user.output(record) if with_output else None
    summary = {
        "job_id": record["jobId"],
        "status": record["status"],
        "model": record["modelId"],
        "leader": record["leader"],
        "verifiers": record["verifiers"],
        "verdicts": {a: v["verdict"] for a, v in record["verdicts"].items()},
        "output_cid": record["outputCid"],
        "output": output,
        "failure_reason": record["failureReason"],
    }
    if as_json:
        click.echo(json.dumps(summary))  # one line: a script reads one job per line
        return
    click.echo(f"Job      {summary['job_id']}")
    click.echo(f"Status   {summary['status']}")
    click.echo(f"Leader   {summary['leader']}")
    for address, verdict in summary["verdicts"].items():
        click.echo(f"Verdict  {verdict} from {address}")
    if summary["failure_reason"]:
        click.echo(f"Reason   {summary['failure_reason']}")
    if output is not None:
        click.echo(f"Output   {output}")
