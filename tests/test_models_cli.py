"""`models list`, `models test` and `test-determinism`, on this machine's backends."""

from __future__ import annotations

import json

from blf.devnet.icl import DevnetIcl
from blf.inference.mock import mock_output
from tests.nodes import error_line, make_node
from tests.test_inference import installed_plugins

__all__ = ["installed_plugins"]  # the fixture, used by name below

BACKENDS = json.dumps({"m": "mock", "gone": "gone", "dice": "dice"})


def test_models_list_says_what_can_be_served_and_why_not(
    devnet: DevnetIcl, installed_plugins: None
) -> None:
    node = make_node(devnet.url, models="m,unbacked", attest=False)
    env = {"BLF_MODEL_BACKENDS": BACKENDS}
    listed = node.invoke("models", "list", env=env)
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert lines["m"].split()[1:] == ["mock", "ok"]
    assert "no backend configured" in lines["unbacked"]
    assert "not available" in lines["gone"]
    rows = json.loads(node.invoke("models", "list", "--json", env=env).stdout)
    assert {r["model"]: r["problem"] for r in rows}["dice"] is None


def test_models_test_and_determinism(devnet: DevnetIcl, installed_plugins: None) -> None:
    node = make_node(devnet.url, models="m", attest=False)
    env = {"BLF_MODEL_BACKENDS": BACKENDS}
    tried = node.invoke("models", "test", "m", "hello", env=env)
    assert tried.exit_code == 0 and tried.stdout.strip() == mock_output("m", "hello")
    same = node.invoke("test-determinism", env=env)
    assert same.exit_code == 0 and "m: deterministic (mock (not a model))" in same.stdout
    differs = node.invoke("test-determinism", "--model", "dice", env=env)
    assert differs.exit_code == 1 and "NOT deterministic" in differs.stderr
    unknown = node.invoke("models", "test", "nope", "x", env=env)
    assert unknown.exit_code == 1 and "no backend configured for model 'nope'" in error_line(
        unknown
    )
