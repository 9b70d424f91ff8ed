"""An operator of the public Python node points blf at its files, unchanged (protocol.md §7)."""

from __future__ import annotations

import json
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from blf.devnet.icl import DevnetIcl
from tests.nodes import (
    PASSWORD,
    NodeDir,
    Processes,
    closed_port_url,
    devnet_node,
    error_line,
    short_tempdir,
    status_rows,
    wait_until,
)

MODELS = ["qwen2.5-7b", "llama-3.1-8b"]
UNKNOWN = "operator_note"
ATTESTATION_FIELDS = {"attestation_cert_hash", "attestation_expiry", "tier"}
PUBLIC_FIELDS = [
    "node_address",
    "keystore_path",
    "tier",
    "supported_model_ids",
    "attestation_backend",
    "icl_endpoint",
    "payment_service_url",
    "rpc_url",
    "ipfs_gateway",
    "model_cache_dir",
    "log_level",
    "zdr_compliant",
    "network",
    "attestation_cert_hash",
    "attestation_expiry",
    "registered_on_chain",
    "stake_amount_wei",
    "cofhe_mode",
    "cofhe_endpoint",
    "cofhe_chain_id",
    "skip_output_key_storage",
    "custom_backends",
]


# ---------------------------------------------------------------- the public node's files


@pytest.fixture(scope="module")
def account() -> LocalAccount:
    created: LocalAccount = Account.create()
    return created


@pytest.fixture(scope="module")
def keystore(account: LocalAccount) -> dict[str, Any]:
    # Written the way the public node writes it: eth-account's default KDF and parameters.
    encrypted: dict[str, Any] = Account.encrypt(account.key, PASSWORD)
    return encrypted


def public_config(address: str, **overrides: Any) -> dict[str, Any]:
    config = {
        "node_address": address,
        "keystore_path": "keystore.json",
        "tier": 1,
        "supported_model_ids": list(MODELS),
        "attestation_backend": "mock",
        # Not the devnet, and nothing listens there: BLF_ICL_ENDPOINT must redirect.
        "icl_endpoint": closed_port_url(),
        "payment_service_url": "https://payments.blindference.example",
        "rpc_url": None,
        "ipfs_gateway": "https://node.lighthouse.storage",
        "model_cache_dir": "/root/.blindference/models",
        "log_level": "info",
        "zdr_compliant": True,
        "network": "testnet",
        "attestation_cert_hash": "0x" + "12" * 32,
        "attestation_expiry": int(time.time()) + 5 * 86400,
        "registered_on_chain": True,
        "stake_amount_wei": 10**21,  # beyond 64 bits: must survive as an exact integer
        "cofhe_mode": "python",
        "cofhe_endpoint": "https://cofhe.example/rpc",
        "cofhe_chain_id": 421614,
        "skip_output_key_storage": False,
        "custom_backends": {"local-llm": {"type": "openai", "url": "http://127.0.0.1:8000/v1"}},
        UNKNOWN: "rack 4, left shelf",
    }
    assert set(config) == {*PUBLIC_FIELDS, UNKNOWN}
    config.update(overrides)
    return config


def write_public_node(
    root: Path, account: LocalAccount, keystore: dict[str, Any], **overrides: Any
) -> NodeDir:
    root.mkdir(parents=True, exist_ok=True)
    (root / "keystore.json").write_text(json.dumps(keystore))
    config = public_config(account.address, **overrides)
    # The public node writes with indent=4; blf must not care.
    (root / "config.json").write_text(json.dumps(config, indent=4))
    return NodeDir(root, address=account.address)


@pytest.fixture
def public(tmp_path: Path, account: LocalAccount, keystore: dict[str, Any]) -> NodeDir:
    return write_public_node(tmp_path / "public-node", account, keystore)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.iterdir())
    }


# --------------------------------------------------------------------------- status


def test_status_reads_the_public_files(public: NodeDir, devnet: DevnetIcl) -> None:
    config = public.config()
    result = public.invoke("status", env={"BLF_ICL_ENDPOINT": devnet.url})
    assert result.exit_code == 0, result.output
    rows = status_rows(result)
    assert rows["Address"] == public.address
    assert rows["Tier"] == "1"
    assert rows["Models"] == ", ".join(MODELS)
    assert rows["Cert"] == config["attestation_cert_hash"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(config["attestation_expiry"]))
    assert rows["Expires"].startswith(stamp)
    assert "(in 4d 23h)" in rows["Expires"] or "(in 5d 0h)" in rows["Expires"]
    assert rows["ICL"] == f"{devnet.url} (answers)"
    # the unknown field is named once, as ignored; none of the public node's own fields is
    assert result.output.count(UNKNOWN) == 1
    [warning] = [line for line in result.stderr.splitlines() if UNKNOWN in line]
    assert "ignored" in warning
    for name in PUBLIC_FIELDS:
        assert name not in result.stderr


def test_status_does_not_need_the_password(public: NodeDir) -> None:
    result = public.invoke("status", env={"BLF_KEY_PASSWORD": None})  # type: ignore[dict-item]
    assert result.exit_code == 0, result.output
    assert status_rows(result)["Address"] == public.address


def test_comma_separated_models_from_the_environment(public: NodeDir, devnet: DevnetIcl) -> None:
    env = {"BLF_SUPPORTED_MODEL_IDS": "a,b", "BLF_ICL_ENDPOINT": devnet.url}
    assert status_rows(public.invoke("status", env=env))["Models"] == "a, b"
    result = public.invoke("attest", "--mock", env=env)
    assert result.exit_code == 0, result.output
    assert devnet_node(devnet.url, public.address)["models"] == ["a", "b"]
    assert public.config()["supported_model_ids"] == MODELS  # an override is never written


def test_lowercase_node_address_is_accepted_and_shown_checksummed(
    tmp_path: Path, account: LocalAccount, keystore: dict[str, Any], devnet: DevnetIcl
) -> None:
    node = write_public_node(
        tmp_path / "n", account, keystore, node_address=account.address.lower()
    )
    env = {"BLF_ICL_ENDPOINT": devnet.url}
    assert status_rows(node.invoke("status", env=env))["Address"] == account.address
    result = node.invoke("attest", "--mock", env=env)
    assert result.exit_code == 0, result.output
    assert devnet_node(devnet.url, account.address)["models"] == MODELS
    assert node.config()["node_address"] == account.address.lower()  # left as written


def test_status_without_node_address_reads_it_from_the_keystore(
    tmp_path: Path, account: LocalAccount, keystore: dict[str, Any]
) -> None:
    node = write_public_node(tmp_path / "n", account, keystore, node_address="")
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    assert status_rows(result)["Address"] == account.address


def test_keystore_of_another_account_is_refused(
    tmp_path: Path, account: LocalAccount, keystore: dict[str, Any]
) -> None:
    other = Account.create().address
    node = write_public_node(tmp_path / "n", account, keystore, node_address=other)
    before = snapshot(node.root)
    result = node.invoke("attest", "--mock")
    assert result.exit_code == 1
    line = error_line(result)
    assert account.address in line and other in line
    assert snapshot(node.root) == before


# --------------------------------------------------------------------------- attest


def test_attest_updates_only_the_attestation_fields(public: NodeDir, devnet: DevnetIcl) -> None:
    before = public.config()
    mode = stat.S_IMODE(public.config_path.stat().st_mode)
    result = public.invoke("attest", "--mock", env={"BLF_ICL_ENDPOINT": devnet.url})
    assert result.exit_code == 0, result.output
    assert f"Attested with {devnet.url}" in result.stdout

    after = public.config()
    record = devnet_node(devnet.url, public.address)
    assert record["models"] == MODELS
    assert {k: after[k] for k in ATTESTATION_FIELDS} == {
        "attestation_cert_hash": record["certHash"],
        "attestation_expiry": record["expiry"],
        "tier": 0,
    }
    untouched = [k for k in before if k not in ATTESTATION_FIELDS]
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    assert list(after) == list(before)  # same fields, same order
    assert after[UNKNOWN] == before[UNKNOWN]
    assert after["icl_endpoint"] == before["icl_endpoint"] != devnet.url
    assert after["stake_amount_wei"] == 10**21
    assert stat.S_IMODE(public.config_path.stat().st_mode) == mode


def test_attest_goes_where_the_file_says_without_the_override(public: NodeDir) -> None:
    before = public.config_path.read_bytes()
    result = public.invoke("attest", "--mock")
    assert result.exit_code == 1
    assert public.config()["icl_endpoint"] in error_line(result)
    assert public.config_path.read_bytes() == before


# --------------------------------------------------------------------------- finding the files


def test_config_dir_is_honoured_without_config_path(public: NodeDir) -> None:
    env = {"BLF_CONFIG_PATH": None, "BLF_CONFIG_DIR": str(public.root)}
    result = public.invoke("status", env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    rows = status_rows(result)
    assert rows["Config"] == str(public.config_path)
    assert rows["Address"] == public.address
    assert "BLF_CONFIG" not in result.stderr


def test_config_path_wins_over_config_dir_with_a_warning(
    public: NodeDir, tmp_path: Path, account: LocalAccount, keystore: dict[str, Any]
) -> None:
    other = write_public_node(tmp_path / "other", account, keystore, tier=2)
    result = public.invoke("status", env={"BLF_CONFIG_DIR": str(other.root)})
    assert result.exit_code == 0, result.output
    rows = status_rows(result)
    assert rows["Config"] == str(public.config_path)
    assert rows["Tier"] == "1"
    [warning] = [line for line in result.stderr.splitlines() if "BLF_CONFIG_DIR" in line]
    assert "BLF_CONFIG_PATH" in warning


def test_relative_keystore_is_found_next_to_the_config_first(
    public: NodeDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A different key in the working directory must not be picked up.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    decoy = Account.create()
    decoy_store = {**json.loads((public.root / "keystore.json").read_text())}
    decoy_store["address"] = decoy.address[2:].lower()
    (cwd / "keystore.json").write_text(json.dumps(decoy_store))
    monkeypatch.chdir(cwd)
    result = public.invoke("migrate", "--from", str(public.root))
    assert result.exit_code == 0, result.output
    assert f"decrypts to {public.address} ({public.root / 'keystore.json'})" in result.stdout


def test_relative_keystore_falls_back_to_the_working_directory(
    public: NodeDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (public.root / "keystore.json").rename(cwd / "keystore.json")
    monkeypatch.chdir(cwd)
    result = public.invoke("migrate", "--from", str(public.root))
    assert result.exit_code == 0, result.output
    assert f"decrypts to {public.address} ({cwd / 'keystore.json'})" in result.stdout


def test_missing_keystore_names_both_places(
    public: NodeDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (public.root / "keystore.json").unlink()
    monkeypatch.chdir(cwd)
    result = public.invoke("attest", "--mock")
    assert result.exit_code != 0
    line = error_line(result)
    assert str(public.root / "keystore.json") in line
    assert str(cwd / "keystore.json") in line


# --------------------------------------------------------------------------- migrate


def test_migrate_checks_everything_and_changes_nothing(public: NodeDir) -> None:
    before = snapshot(public.root)
    config = public.config()
    result = public.invoke("migrate", "--from", str(public.root), env={"BLF_CONFIG_PATH": None})  # type: ignore[dict-item]
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"config.json  : ok ({public.config_path})" in out
    assert f"unknown field kept as is: {UNKNOWN}" in out
    assert f"keystore     : ok, decrypts to {public.address}" in out
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(config["attestation_expiry"]))
    assert f"attestation  : {stamp}" in out
    assert f"BLF_CONFIG_DIR={public.root}" in out
    assert "blindference-node run" in out
    assert "attest --mock" not in out  # the certificate is good for days
    assert snapshot(public.root) == before


def test_migrate_with_an_expired_certificate_says_to_attest(
    tmp_path: Path, account: LocalAccount, keystore: dict[str, Any]
) -> None:
    node = write_public_node(
        tmp_path / "old", account, keystore, attestation_expiry=int(time.time()) - 3600
    )
    before = snapshot(node.root)
    result = node.invoke("migrate", "--from", str(node.root))
    assert result.exit_code == 0, result.output
    assert "expired" in result.stdout
    steps = result.stdout.split("Next")[1]
    assert steps.index("attest --mock") < steps.index("blindference-node run")
    assert snapshot(node.root) == before


def test_migrate_with_a_wrong_password_says_so(public: NodeDir) -> None:
    before = snapshot(public.root)
    result = public.invoke("migrate", "--from", str(public.root), env={"BLF_KEY_PASSWORD": "no"})
    assert result.exit_code == 1
    assert "config.json  : ok" in result.stdout
    assert "wrong password" in error_line(result)
    assert snapshot(public.root) == before


def test_migrate_from_a_directory_without_config(tmp_path: Path, public: NodeDir) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = public.invoke("migrate", "--from", str(empty))
    assert result.exit_code == 2
    assert str(empty / "config.json") in error_line(result)
    assert list(empty.iterdir()) == []


def test_run_starts_and_heartbeats_on_the_public_files(
    account: LocalAccount, keystore: dict[str, Any], devnet: DevnetIcl, processes: Processes
) -> None:
    node = write_public_node(short_tempdir(), account, keystore)
    env = {"BLF_CONFIG_PATH": "", "BLF_CONFIG_DIR": str(node.root), "BLF_ICL_ENDPOINT": devnet.url}
    assert node.invoke("attest", "--mock", env=env).exit_code == 0
    before = node.config()
    run = processes.start(node, "run", BLF_HEARTBEAT_INTERVAL_S="1", **env)
    run.wait_for("Daemon starting")
    wait_until(lambda: len(devnet_node(devnet.url, account.address)["heartbeats"]) >= 2)
    run.signal(signal.SIGTERM)
    assert run.wait() == 0, run.output()
    assert node.config() == before  # the override and the run left the file as it was


def test_run_refuses_a_cofhe_mode_it_cannot_serve(
    account: LocalAccount, keystore: dict[str, Any], devnet: DevnetIcl
) -> None:
    """blf says which modes it has, before it unlocks the key or claims anything."""
    node = write_public_node(short_tempdir(), account, keystore)
    env = {"BLF_CONFIG_PATH": "", "BLF_CONFIG_DIR": str(node.root), "BLF_ICL_ENDPOINT": devnet.url}
    assert node.invoke("attest", "--mock", env=env).exit_code == 0
    result = node.invoke("run", env={**env, "BLF_COFHE_MODE": "tachyon"})
    assert result.exit_code == 2
    line = error_line(result)
    assert "cofhe_mode 'tachyon' is not available" in line and "python, bridge" in line
    assert devnet_node(devnet.url, account.address)["heartbeats"] == []


def test_run_in_bridge_mode_without_an_rpc_says_what_to_set(
    account: LocalAccount, keystore: dict[str, Any], devnet: DevnetIcl
) -> None:
    """The public node's default mode: its cofhe_endpoint is the chain's RPC."""
    node = write_public_node(short_tempdir(), account, keystore)
    env = {"BLF_CONFIG_PATH": "", "BLF_CONFIG_DIR": str(node.root), "BLF_ICL_ENDPOINT": devnet.url}
    assert node.invoke("attest", "--mock", env=env).exit_code == 0
    result = node.invoke("run", env={**env, "BLF_COFHE_MODE": "bridge", "BLF_COFHE_ENDPOINT": ""})
    assert result.exit_code == 2
    assert "cofhe_mode 'bridge' needs cofhe_endpoint" in error_line(result)
    assert devnet_node(devnet.url, account.address)["heartbeats"] == []
