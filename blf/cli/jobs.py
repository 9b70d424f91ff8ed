"""``jobs``: what this node did with the jobs it was given, from its journal in Redis, and
what it earned for them, from the payment service (``payment_service_url``)."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import click
import redis

from blf.cli.common import echo_json, json_option, load_with_warnings, node_redis
from blf.config import LoadedConfig
from blf.errors import PaymentError
from blf.journal import STAGES, Journal
from blf.payment import PaymentClient

# Earnings rows asked of the payment service for `jobs list`: more than the journal's rows,
# since the two lists need not end at the same job.
EARNINGS_LOOKUP_MIN = 100
NO_PAYMENT_URL = (
    "no payment_service_url configured (set BLF_PAYMENT_SERVICE_URL or add "
    '"payment_service_url" to config.json; the public node uses http://127.0.0.1:8001)'
)


def register(cli: click.Group) -> None:
    cli.add_command(jobs)


def _journal(loaded: LoadedConfig) -> Journal:
    from blf.app import settings_with_address

    address = settings_with_address(loaded).node_address
    return Journal(node_redis(loaded), address)


def _payment(loaded: LoadedConfig) -> PaymentClient:
    url = loaded.settings.payment_service_url
    if not url:
        raise PaymentError(NO_PAYMENT_URL)
    return PaymentClient(url)


def _address(loaded: LoadedConfig) -> str:
    from blf.app import settings_with_address

    return settings_with_address(loaded).node_address


def _earned_by_job(loaded: LoadedConfig, limit: int) -> dict[str, Decimal | None]:
    """The payment service's amount per job id; raises `PaymentError` when unavailable."""
    with _payment(loaded) as client:
        paid = client.jobs(_address(loaded), limit=max(limit, EARNINGS_LOOKUP_MIN))
    return {job.job_id: job.amount_blind_earned for job in paid}


def _blind(amount: Decimal | None) -> str:
    return "-" if amount is None else f"{amount:f}"


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
@json_option("One JSON array of job records.")
def list_jobs(limit: int, as_json: bool) -> None:
    """The most recent jobs, newest first; with what each earned when the payment service
    (payment_service_url) answers."""
    loaded = load_with_warnings()
    found = _read(lambda: _journal(loaded).recent(limit))
    earned: dict[str, Decimal | None] | None = None
    if found:
        try:
            earned = _earned_by_job(loaded, limit)
        except PaymentError as exc:
            # The journal stands on its own: shown as always, with why earnings are missing.
            click.echo(f"Earnings unavailable: {exc}", err=True)
    if as_json:
        records = [{"job_id": j, **r} for j, r in found]
        if earned is not None:
            for record in records:
                amount = earned.get(record["job_id"])
                record["amount_blind_earned"] = None if amount is None else f"{amount:f}"
        echo_json(records)
        return
    if not found:
        click.echo("No jobs recorded.")
        return
    earned_head = f" {'EARNED':>12}" if earned is not None else ""
    click.echo(
        f"{'JOB':<18} {'ROLE':<9} {'MODEL':<16} {'STATE':<12} {'TOTAL':>8}{earned_head}  UPDATED"
    )
    for job_id, record in found:
        total = record.get("total_s")
        updated = time.strftime("%H:%M:%S", time.localtime(float(record.get("updated_at", 0))))
        earned_cell = f" {_blind(earned.get(job_id)):>12}" if earned is not None else ""
        click.echo(
            f"{job_id[:16] + '..':<18} {record.get('role', '?'):<9} "
            f"{record.get('model_id', '?')[:16]:<16} {record.get('state', '?'):<12} "
            f"{(total + 's') if total else '-':>8}{earned_cell}  {updated}"
        )


@jobs.command("earnings")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@json_option("One JSON object: totals and jobs.")
def earnings(limit: int, as_json: bool) -> None:
    """BLIND earned, in total and per recent job, from the payment service.

    Rewards are paid on completion: there is nothing to claim. Needs payment_service_url,
    not the node's Redis.
    """
    loaded = load_with_warnings()
    address = _address(loaded)
    with _payment(loaded) as client:
        totals = client.earnings(address)
        recent = client.jobs(address, limit=limit)
        where = client.display_url
    if as_json:
        body = {
            "address": address,
            "total_blind_earned": f"{totals.total_blind_earned:f}",
            "jobs_count": totals.jobs_count,
            "jobs": [
                {**j.model_dump(), "amount_blind_earned": _json_amount(j.amount_blind_earned)}
                for j in recent
            ],
        }
        echo_json(body)
        return
    click.echo(f"Earnings of {address} (payment service {where})")
    click.echo(f"  Total   : {totals.total_blind_earned:f} BLIND")
    click.echo(f"  Jobs    : {totals.jobs_count}")
    if not recent:
        return
    click.echo(f"{'JOB':<18} {'ROLE':<9} {'STATUS':<12} {'EARNED':>12}")
    for job in recent:
        click.echo(
            f"{job.job_id[:16] + '..':<18} {job.role or '?':<9} {job.status or '?':<12} "
            f"{_blind(job.amount_blind_earned):>12}"
        )


def _json_amount(amount: Decimal | None) -> str | None:
    # A string: JSON readers that parse numbers as doubles would round a BLIND amount.
    return None if amount is None else f"{amount:f}"


@jobs.command("show")
@click.argument("job_id")
@json_option("The job's record as one JSON object.")
def show_job(job_id: str, as_json: bool) -> None:
    """One job's record: state, reason, commitment, and the seconds in each stage."""
    journal = _journal(load_with_warnings())
    record = _read(lambda: journal.get(job_id))
    if not record:
        raise click.ClickException(f"job {job_id} is not in this node's journal")
    if as_json:
        echo_json({"job_id": job_id, **record})
        return
    click.echo(f"Job      {job_id}")
    for name in ("role", "model_id", "state", "reason", "verdict", "commitment", "backend"):
        if name in record:
            click.echo(f"{name.replace('_id', ''):<8} {record[name]}")
    stages = [(s.removesuffix("_s"), record[s]) for s in STAGES if s in record]
    if stages:
        click.echo("Stages   " + "  ".join(f"{name} {value}s" for name, value in stages))
