"""``models`` and ``test-determinism``: what this machine can serve, tried for real."""

from __future__ import annotations

import sys
import time

import click

from blf.cli.common import echo_json, json_option
from blf.config import Settings
from blf.errors import BlfError

DETERMINISM_PROMPT = "Explain in one sentence why the sky is blue."


def register(cli: click.Group) -> None:
    cli.add_command(models)
    cli.add_command(test_determinism)


def _settings() -> Settings:
    """config.json when there is one, else BLF_* alone (a GPU machine set by environment)."""
    from blf.config import load_settings_or_environment

    return load_settings_or_environment()[0]


def _generate(settings: Settings, model: str, prompt: str) -> tuple[str, float, str]:
    from blf.inference import Generation, backend_for

    backend = backend_for(model, settings.model_backends)
    started = time.perf_counter()
    (output,) = backend.generate([Generation(model_id=model, prompt=prompt)])
    return output, time.perf_counter() - started, backend.describe()


@click.group()
def models() -> None:
    """The models this machine serves and the backends behind them."""


@models.command("list")
@json_option("One JSON array.")
def list_models(as_json: bool) -> None:
    """Each model with its backend, and why it cannot be served where it cannot."""
    from blf.inference import describe_models

    settings = _settings()
    rows = describe_models(list(settings.supported_model_ids), settings.model_backends)
    if as_json:
        keys = ("model", "backend", "problem")
        echo_json([dict(zip(keys, row, strict=True)) for row in rows])
        return
    if not rows:
        click.echo("No models: set supported_model_ids and model_backends in config.json.")
        return
    for model, backend, problem in rows:
        click.echo(f"{model:<24} {backend:<14} {'ok' if problem is None else problem}")


@models.command("test")
@click.argument("model")
@click.argument("prompt")
def test_model(model: str, prompt: str) -> None:
    """Run PROMPT through MODEL's backend on this machine and print the output."""
    output, seconds, engine = _generate(_settings(), model, prompt)
    click.echo(output)
    click.echo(f"({engine}, {seconds:.2f}s)", err=True)


@click.command("test-determinism")
@click.option("--model", default=None, help="Model to test (default: the first one served).")
@click.option("--prompt", default=DETERMINISM_PROMPT, show_default=True)
def test_determinism(model: str | None, prompt: str) -> None:
    """Run the same prompt twice: exit 0 when the outputs are byte-identical, else 1.
    Verifiers agree with a leader only if both are deterministic."""
    settings = _settings()
    model = model or next(iter(settings.supported_model_ids or settings.model_backends), None)
    if model is None:
        raise BlfError("no model to test: pass --model or set supported_model_ids")
    first, _, engine = _generate(settings, model, prompt)
    second, _, _ = _generate(settings, model, prompt)
    if first.encode() == second.encode():
        click.echo(f"{model}: deterministic ({engine}): the same {len(first.encode())} bytes twice")
        return
    click.echo(f"{model}: NOT deterministic ({engine}): the two outputs differ", err=True)
    sys.exit(1)
