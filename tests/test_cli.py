"""``init``, ``attest`` and ``status`` run in-process through click, against a real devnet ICL."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from eth_account import Account

from blf.config import PUBLIC_ICL_ENDPOINT
from blf.devnet.icl import DevnetIcl
from tests.nodes import (
    PASSWORD,
    NodeDir,
    closed_port_url,
    devnet_nodes,
    error_line,
    short_tempdir,
    status_rows,
)

MODEL = "test-model"
CERT_HASH = "0x" + "ab" * 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template() -> Iterator[NodeDir]:
    """One node made by ``init`` for the module (scrypt is slow); tests get copies."""
    root = short_tempdir()
    node = NodeDir(root)
    result = node.invoke("init", "--models", MODEL, "--icl", "http://127.0.0.1:9")
    assert result.exit_code == 0, result.output
    node.address = node.config()["node_address"]
    yield node
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def node(template: NodeDir, tmp_path: Path, devnet: DevnetIcl) -> NodeDir:
    """An initialised, unattested node pointed at the test's devnet."""
    copy = NodeDir(tmp_path / "node", address=template.address)
    shutil.copytree(template.root, copy.root)
    copy.set_config(icl_endpoint=devnet.url)
    return copy


def fresh(tmp_path: Path) -> NodeDir:
    return NodeDir(tmp_path / "fresh")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- init


def test_init_creates_a_v3_keystore_readable_only_by_the_owner(tmp_path: Path) -> None:
    node = fresh(tmp_path)
    result = node.invoke("init", "--models", MODEL)
    assert result.exit_code == 0, result.output
    config = node.config()
    keystore_path = node.root / config["keystore_path"]
    assert mode(keystore_path) == 0o600
    assert mode(node.config_path) == 0o600
    keystore = json.loads(keystore_path.read_text())
    assert keystore["version"] == 3
    assert keystore["crypto"]["kdf"] == "scrypt"
    key = Account.decrypt(keystore, PASSWORD)
    address = Account.from_key(key).address
    assert config["node_address"] == address
    assert address in result.stdout
    assert config["icl_endpoint"] == PUBLIC_ICL_ENDPOINT
    assert config["supported_model_ids"] == [MODEL]
    assert config["attestation_cert_hash"] is None
    assert PASSWORD not in node.config_path.read_text()


def test_init_imports_a_private_key(tmp_path: Path) -> None:
    account = Account.create()
    node = fresh(tmp_path)
    result = node.invoke("init", env={"BLF_PRIVATE_KEY": account.key.hex()})
    assert result.exit_code == 0, result.output
    assert node.config()["node_address"] == account.address
    keystore = json.loads((node.root / "keystore.json").read_text())
    assert Account.decrypt(keystore, PASSWORD) == account.key
    assert account.key.hex().removeprefix("0x") not in (node.root / "keystore.json").read_text()


def test_init_refuses_an_invalid_private_key(tmp_path: Path) -> None:
    node = fresh(tmp_path)
    result = node.invoke("init", env={"BLF_PRIVATE_KEY": "0x1234"})
    assert result.exit_code == 1
    assert "BLF_PRIVATE_KEY" in error_line(result)
    assert not node.root.exists() or not any(node.root.iterdir())


def test_init_refuses_to_overwrite_without_force(node: NodeDir) -> None:
    before = node.config_path.read_bytes(), (node.root / "keystore.json").read_bytes()
    result = node.invoke("init", "--models", "other")
    assert result.exit_code == 1
    assert "--force" in error_line(result)
    assert (node.config_path.read_bytes(), (node.root / "keystore.json").read_bytes()) == before


def test_init_force_replaces_the_node(node: NodeDir) -> None:
    account = Account.create()
    result = node.invoke(
        "init", "--force", "--models", "other", env={"BLF_PRIVATE_KEY": account.key.hex()}
    )
    assert result.exit_code == 0, result.output
    config = node.config()
    assert config["node_address"] == account.address != node.address
    assert config["supported_model_ids"] == ["other"]
    keystore = json.loads((node.root / "keystore.json").read_text())
    assert Account.decrypt(keystore, PASSWORD) == account.key


def test_init_models_may_be_repeated_and_comma_separated(tmp_path: Path) -> None:
    node = fresh(tmp_path)
    icl = "http://icl.example.test:8080"
    result = node.invoke("init", "--models", "a, b,", "--models", "c", "--icl", icl)
    assert result.exit_code == 0, result.output
    config = node.config()
    assert config["supported_model_ids"] == ["a", "b", "c"]
    assert config["icl_endpoint"] == icl


def test_init_without_a_password_source_says_how_to_give_one(tmp_path: Path) -> None:
    node = fresh(tmp_path)
    result = node.invoke("init", env={"BLF_KEY_PASSWORD": None})  # type: ignore[dict-item]
    assert result.exit_code == 1
    assert "BLF_KEY_PASSWORD" in error_line(result)
    assert not (node.root / "keystore.json").exists()


def test_init_with_a_bad_override_leaves_no_half_made_node(tmp_path: Path) -> None:
    node = fresh(tmp_path)
    result = node.invoke("init", env={"BLF_TIER": "x"})
    assert result.exit_code == 2
    assert "BLF_TIER" in error_line(result)
    assert not (node.root / "keystore.json").exists()
    assert not node.config_path.exists()


# --------------------------------------------------------------------------- errors


def test_wrong_password_is_one_line(node: NodeDir) -> None:
    before = node.config_path.read_bytes()
    result = node.invoke("attest", "--mock", env={"BLF_KEY_PASSWORD": "not it"})
    assert result.exit_code == 1
    assert "wrong password" in error_line(result)
    assert node.config_path.read_bytes() == before


def test_the_password_can_come_from_a_file_a_secret_is_mounted_as(
    node: NodeDir, tmp_path: Path
) -> None:
    secret = tmp_path / "key_password"
    secret.write_text(PASSWORD + "\n")  # as `echo` and most secret stores write it
    env = {"BLF_KEY_PASSWORD": None, "BLF_KEY_PASSWORD_FILE": str(secret)}
    result = node.invoke("attest", "--mock", env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert node.config()["attestation_cert_hash"]


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read the keystore password from"), ("\n", "holds no password")],
)
def test_an_unusable_password_file_is_one_line_naming_it(
    node: NodeDir, tmp_path: Path, content: str | None, says: str
) -> None:
    secret = tmp_path / "key_password"
    if content is not None:
        secret.write_text(content)
    env = {"BLF_KEY_PASSWORD": None, "BLF_KEY_PASSWORD_FILE": str(secret)}
    result = node.invoke("attest", "--mock", env=env)  # type: ignore[arg-type]
    assert result.exit_code == 1
    line = error_line(result)
    assert says in line and str(secret) in line and "BLF_KEY_PASSWORD_FILE" in line


def broken_keystores() -> dict[str, Any]:
    good = Account.encrypt(Account.create().key, PASSWORD, kdf="pbkdf2", iterations=2)
    unknown_kdf = json.loads(json.dumps(good))
    unknown_kdf["crypto"]["kdf"] = "bogus"
    return {
        "not-json": "{",
        "not-a-keystore": {"hello": "world"},
        "no-version": {k: v for k, v in good.items() if k != "version"},
        "crypto-a-string": {**good, "crypto": "x"},
        "unknown-kdf": unknown_kdf,
    }


@pytest.mark.parametrize("broken", list(broken_keystores().values()), ids=list(broken_keystores()))
def test_broken_keystore_is_one_line(node: NodeDir, broken: Any) -> None:
    keystore = node.root / "keystore.json"
    keystore.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    result = node.invoke("attest", "--mock")
    assert result.exit_code == 1
    assert str(keystore) in error_line(result)


def test_keystore_with_an_invalid_address_does_not_break_status(node: NodeDir) -> None:
    keystore = json.loads((node.root / "keystore.json").read_text())
    (node.root / "keystore.json").write_text(json.dumps({**keystore, "address": "zz"}))
    node.set_config(node_address="")
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    assert status_rows(result)["Address"] == "(unknown)"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ({"tier": "x"}, "'tier'"),
        ({"tier": 7}, "'tier'"),
        ({"supported_model_ids": 3}, "'supported_model_ids'"),
        ({"log_level": "LOUD"}, "'log_level'"),
    ],
    ids=["invalid-json", "not-an-object", "tier-not-int", "tier-7", "models-int", "log-level"],
)
@pytest.mark.parametrize("command", [["status"], ["attest", "--mock"]])
def test_corrupt_config_names_the_file_and_field(
    node: NodeDir, content: str | dict[str, Any], expected: str, command: list[str]
) -> None:
    if isinstance(content, dict):
        node.set_config(**content)
    else:
        node.config_path.write_text(content)
    result = node.invoke(*command)
    assert result.exit_code == 2
    line = error_line(result)
    assert str(node.config_path) in line
    assert expected in line


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("BLF_TIER", "x", "tier"),
        ("BLF_ZDR_COMPLIANT", "maybe", "zdr_compliant"),
        ("BLF_STAKE_AMOUNT_WEI", "-1", "stake_amount_wei"),
    ],
)
def test_bad_environment_value_names_the_variable(
    node: NodeDir, variable: str, value: str, field: str
) -> None:
    result = node.invoke("status", env={variable: value})
    assert result.exit_code == 2
    line = error_line(result)
    assert variable in line
    assert repr(field) in line


# --------------------------------------------------------------------------- attest


def attested_ok(node: NodeDir, devnet: DevnetIcl, result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    config = node.config()
    record = devnet_nodes(devnet.url)[node.address]
    assert config["attestation_cert_hash"] == record["certHash"]
    assert config["attestation_expiry"] == record["expiry"]
    assert config["tier"] == record["tier"] == 0
    assert record["models"] == [MODEL]
    assert record["certHash"] in result.stdout
    return config


def test_attest_with_the_published_default_key(node: NodeDir, devnet: DevnetIcl) -> None:
    result = node.invoke("attest", "--mock")
    attested_ok(node, devnet, result)
    assert f"Attested with {devnet.url}" in result.stdout


def test_attest_with_mock_attestation_key_from_the_environment(node: NodeDir) -> None:
    with DevnetIcl(mock_attestation_key="k1") as devnet:
        node.set_config(icl_endpoint=devnet.url)
        result = node.invoke("attest", "--mock", env={"MOCK_ATTESTATION_KEY": "k1"})
        attested_ok(node, devnet, result)


def test_attest_with_tee_key_option(node: NodeDir) -> None:
    with DevnetIcl(mock_attestation_key="k2") as devnet:
        node.set_config(icl_endpoint=devnet.url)
        # --tee-key wins over the environment
        result = node.invoke(
            "attest", "--mock", "--tee-key", "k2", env={"MOCK_ATTESTATION_KEY": "k1"}
        )
        attested_ok(node, devnet, result)


@pytest.mark.parametrize(
    ("args", "env"),
    [([], {}), ([], {"MOCK_ATTESTATION_KEY": "k1"}), (["--tee-key", "k1"], {})],
    ids=["default", "env", "option"],
)
def test_attest_with_the_wrong_key_is_refused(
    node: NodeDir, args: list[str], env: dict[str, str]
) -> None:
    with DevnetIcl(mock_attestation_key="k2") as devnet:
        node.set_config(icl_endpoint=devnet.url)
        before = node.config_path.read_bytes()
        result = node.invoke("attest", "--mock", *args, env=env)
        assert result.exit_code == 1
        line = error_line(result)
        assert "refused the attestation" in line
        assert "401" in line and "MOCK_ATTESTATION_KEY" in line
        assert node.config_path.read_bytes() == before
        assert devnet_nodes(devnet.url) == {}


def test_attest_without_a_backend_explains_the_backends(node: NodeDir, devnet: DevnetIcl) -> None:
    before = node.config_path.read_bytes()
    result = node.invoke("attest")
    assert result.exit_code != 0
    for backend in ("mock", "tpm", "sev-snp", "tdx"):
        assert backend in result.output
    assert "attest --mock" in result.output
    assert node.config_path.read_bytes() == before
    assert devnet_nodes(devnet.url) == {}


def test_attest_with_an_unreachable_icl_names_the_url(node: NodeDir) -> None:
    url = closed_port_url()
    node.set_config(icl_endpoint=url)
    before = node.config_path.read_bytes()
    result = node.invoke("attest", "--mock")
    assert result.exit_code == 1
    line = error_line(result)
    assert "unreachable" in line
    assert url + "/internal/challenge/" in line
    assert node.config_path.read_bytes() == before


def test_attest_with_an_unserved_model_list_is_refused(node: NodeDir) -> None:
    node.set_config(supported_model_ids=[])
    result = node.invoke("attest", "--mock")
    assert result.exit_code == 1
    assert "supportedModelIds" in error_line(result)


def test_reattest_replaces_the_certificate(node: NodeDir, devnet: DevnetIcl) -> None:
    first = attested_ok(node, devnet, node.invoke("attest", "--mock"))
    second = attested_ok(node, devnet, node.invoke("attest", "--mock"))
    assert second["attestation_cert_hash"] != first["attestation_cert_hash"]
    assert devnet_nodes(devnet.url)[node.address]["attestations"] == 2


# --------------------------------------------------------------------------- status


def test_status_before_attest_warns(node: NodeDir, devnet: DevnetIcl) -> None:
    result = node.invoke("status", env={"BLF_KEY_PASSWORD": None})  # type: ignore[dict-item]
    assert result.exit_code == 0, result.output
    rows = status_rows(result)
    assert rows["Address"] == node.address
    assert rows["Tier"] == "0"
    assert rows["Models"] == MODEL
    assert rows["Cert"] == "(none)"
    assert rows["Expires"].startswith("none")
    assert rows["ICL"] == f"{devnet.url} (answers)"
    assert "no attestation" in result.stderr
    assert "attest --mock" in result.stderr


def test_status_after_attest(node: NodeDir, devnet: DevnetIcl) -> None:
    config = attested_ok(node, devnet, node.invoke("attest", "--mock"))
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    rows = status_rows(result)
    assert rows["Cert"] == config["attestation_cert_hash"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(config["attestation_expiry"]))
    assert rows["Expires"].startswith(stamp)
    assert re.search(r"\(in \d+h \d+m\)$", rows["Expires"]), rows["Expires"]
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("offset", "shown", "warning"),
    [
        (3 * 3600, r"\(in [0-9]h \d+m\)", "expires within 6 h"),
        (-2 * 86400, r"\(expired 2d 0h ago\)", "certificate expired"),
    ],
    ids=["expiring", "expired"],
)
def test_status_warns_about_a_certificate_due(
    node: NodeDir, offset: int, shown: str, warning: str
) -> None:
    node.set_config(attestation_cert_hash=CERT_HASH, attestation_expiry=int(time.time()) + offset)
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    assert re.search(shown, status_rows(result)["Expires"]), result.stdout
    assert warning in result.stderr


def test_status_when_the_icl_does_not_answer(node: NodeDir) -> None:
    url = closed_port_url()
    node.set_config(icl_endpoint=url)
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    assert status_rows(result)["ICL"].startswith(f"{url} (does not answer")


def test_status_shows_models_from_a_comma_separated_environment_variable(node: NodeDir) -> None:
    result = node.invoke("status", env={"BLF_SUPPORTED_MODEL_IDS": "a, b,c"})
    assert result.exit_code == 0, result.output
    assert status_rows(result)["Models"] == "a, b, c"
    assert node.config()["supported_model_ids"] == [MODEL]


def test_status_never_prints_credentials_in_urls(node: NodeDir) -> None:
    secret_env = {
        "BLF_BROKER_URL": "rediss://:hunter2@redis.example:6380/0",
        "BLF_RPC_URL": "https://arb-sepolia.g.alchemy.com/v2/sEcReTaPiKeY0123456789",
    }
    result = node.invoke("status", env=secret_env)
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "TaPiKeY0123456789" not in result.output
    rows = status_rows(result)
    assert rows["Broker"] == "rediss://redis.example:6380/0"
    assert rows["Chain"] == "https://arb-sepolia.g.alchemy.com/v2/sEcR…"


def test_init_records_the_gpus_nvidia_smi_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in answering the exact query gpu.py makes, as the real nvidia-smi prints it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--query-gpu=name,memory.total" ] || exit 9\n'
        'printf "NVIDIA H100 80GB HBM3, 81559\\nNVIDIA H100 80GB HBM3, 81559\\n"\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    node = fresh(tmp_path)
    result = node.invoke("init", "--models", MODEL)
    assert result.exit_code == 0, result.output
    assert node.config()["gpus"] == ["NVIDIA H100 80GB HBM3 (81559 MiB)"] * 2


def test_init_without_a_gpu_is_normal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    node = fresh(tmp_path)
    result = node.invoke("init", "--models", MODEL)
    assert result.exit_code == 0, result.output
    assert node.config()["gpus"] == []
    assert "none found" in result.output
