"""``jobs``: what this node did with the jobs it was given, from its journal in Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import redis

from blf.broker import node_broker
from blf.config import LoadedConfig
from blf.journal import STAGES, Journal


def register(cli: click.Group) -> None:
    cli.add_command(jobs)


def _journal(loaded: LoadedConfig) -> Journal:
    from blf.app import settings_with_address

    settings = settings_with_address(loaded)
    urls = node_broker(settings.broker_url, loaded.directory)
    client = redis.Redis.from_url(urls.redis, decode_responses=True, socket_timeout=5)
    return Journal(client, settings.node_address)


def _loaded() -> LoadedConfig:
    from blf.cli.node import load_with_warnings

    return load_with_warnings()


def _read(call: Any) -> Any:
    try:
        return call()
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"cannot read the node's Redis: {exc}") from None


@click.group()
def jobs() -> None:
    """The node's jobs: state and time per stage (kept a week; needs the node's Redis)."""


@jobs.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of job records.")
def list_jobs(limit: int, as_json: bool) -> None:
    """The most recent jobs, newest first."""
    found = _read(lambda: _journal(_loaded()).recent(limit))
    if as_json:
        click.echo(json.dumps([{"job_id": j, **r} for j, r in found], indent=2))
        return
    if not found:
        click.echo("No jobs recorded.")
        return
    click.echo(f"{'JOB':<18} {'ROLE':<9} {'MODEL':<16} {'STATE':<12} {'TOTAL':>8}  UPDATED")
    for job_id, record in found:
        total = record.get("total_s")
        updated = time.strftime("%H:%M:%S", time.localtime(float(record.get("updated_at", 0))))
        click.echo(
            f"{job_id[:16] + '..':<18} {record.get('role', '?'):<9} "
            f"{record.get('model_id', '?')[:16]:<16} {record.get('state', '?'):<12} "
            f"{(total + 's') if total else '-':>8}  {updated}"
        )


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The job's record as one JSON object.")
def show_job(job_id: str, as_json: bool) -> None:
    """One job's record: state, reason, commitment, and the seconds in each stage."""
    journal = _journal(_loaded())
    record = _read(lambda: journal.get(job_id))
    if not record:
        raise click.ClickException(f"job {job_id} is not in this node's journal")
    if as_json:
        click.echo(json.dumps({"job_id": job_id, **record}, indent=2))
        return
    click.echo(f"Job      {job_id}")
    for name in ("role", "model_id", "state", "reason", "verdict", "commitment", "backend"):
        if name in record:
            click.echo(f"{name.replace('_id', ''):<8} {record[name]}")
    stages = [(s.removesuffix("_s"), record[s]) for s in STAGES if s in record]
    if stages:
        click.echo("Stages   " + "  ".join(f"{name} {value}s" for name, value in stages))
