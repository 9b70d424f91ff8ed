"""config.json plus BLF_* overrides: reading, validating, and rewriting without losing anything."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from blf.config import (
    DEFAULT_CONFIG_PATH,
    PUBLIC_ICL_ENDPOINT,
    load_config,
    resolve_config_path,
    resolve_keystore_path,
    update_config_file,
    write_new_config,
)
from blf.errors import ConfigError

ADDRESS = "0x" + "11" * 20


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "node" / "config.json",
        {"node_address": ADDRESS, "supported_model_ids": ["m1"], "tier": 0, "extra_thing": [1]},
    )


# --------------------------------------------------------------------------- locating the file


def test_config_path_is_the_file(tmp_path: Path) -> None:
    path, warnings = resolve_config_path({"BLF_CONFIG_PATH": str(tmp_path / "c.json")})
    assert (path, warnings) == (tmp_path / "c.json", [])


def test_config_dir_is_the_directory(tmp_path: Path) -> None:
    path, warnings = resolve_config_path({"BLF_CONFIG_DIR": str(tmp_path)})
    assert (path, warnings) == (tmp_path / "config.json", [])


def test_config_path_wins_over_config_dir_with_a_warning(tmp_path: Path) -> None:
    env = {"BLF_CONFIG_PATH": str(tmp_path / "a.json"), "BLF_CONFIG_DIR": str(tmp_path / "b")}
    path, [warning] = resolve_config_path(env)
    assert path == tmp_path / "a.json"
    assert "BLF_CONFIG_PATH" in warning and "BLF_CONFIG_DIR" in warning


def test_default_is_the_documented_docker_volume() -> None:
    path, warnings = resolve_config_path({})
    assert path == DEFAULT_CONFIG_PATH.expanduser()
    assert path.parts[-2:] == (".blindference", "config.json")
    assert warnings == []


def test_load_config_uses_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLF_CONFIG_DIR", str(config_file.parent))
    loaded = load_config()
    assert loaded.path == config_file
    assert loaded.settings.node_address == ADDRESS
    assert loaded.directory == config_file.parent


# --------------------------------------------------------------------------- reading


def test_defaults_are_the_public_network(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path / "config.json", {})).settings
    assert settings.icl_endpoint == PUBLIC_ICL_ENDPOINT
    assert settings.chain_id == settings.cofhe_chain_id == 421614
    assert settings.node_registry_address == "0x72C0Ead949Fd2C346598a30AF1A69c3c5Cb86082"
    assert settings.ipfs_gateway == "https://node.lighthouse.storage"
    assert settings.rpc_url is None
    assert not settings.attested


def test_environment_overrides_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLF_TIER", "2")
    monkeypatch.setenv("BLF_ICL_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("BLF_ZDR_COMPLIANT", "true")
    loaded = load_config(config_file)
    assert loaded.settings.tier == 2
    assert loaded.settings.icl_endpoint == "http://127.0.0.1:1"
    assert loaded.settings.zdr_compliant is True
    assert loaded.raw["tier"] == 0  # the file's view is kept apart


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a,b", ["a", "b"]), (" a , b ,, ", ["a", "b"]), ("solo", ["solo"]), ("", [])],
)
def test_lists_from_the_environment_are_comma_separated(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("BLF_SUPPORTED_MODEL_IDS", value)
    monkeypatch.setenv("BLF_GPUS", value)
    settings = load_config(config_file).settings
    assert settings.supported_model_ids == expected
    assert settings.gpus == expected


def test_lists_in_the_file_stay_json_lists(config_file: Path) -> None:
    assert load_config(config_file).settings.supported_model_ids == ["m1"]


def test_unknown_fields_are_kept_and_listed(config_file: Path) -> None:
    settings = load_config(config_file).settings
    assert settings.unknown_fields == ["extra_thing"]


def test_blf_variables_that_are_not_fields_do_not_become_fields(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLF_KEY_PASSWORD", "secret")
    monkeypatch.setenv("BLF_CONFIG_PATH", str(config_file))
    settings = load_config(config_file).settings
    assert settings.unknown_fields == ["extra_thing"]
    assert "secret" not in repr(settings)


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path / "config.json", {"log_level": "debug"})).settings
    assert settings.log_level == "DEBUG"


# --------------------------------------------------------------------------- errors


def test_missing_file_says_to_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(caught.value)
    assert "init" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"tier": 1,', None),
        ("[]", None),
        ({"tier": "x"}, "tier"),
        ({"tier": 7}, "tier"),
        ({"tier": -1}, "tier"),
        ({"supported_model_ids": [1, {}]}, "supported_model_ids.0"),
        ({"stake_amount_wei": -5}, "stake_amount_wei"),
        ({"poll_interval_s": 0}, "poll_interval_s"),
    ],
)
def test_bad_file_names_the_file_and_the_field(
    tmp_path: Path, content: dict[str, Any] | str, field: str | None
) -> None:
    path = write(tmp_path / "config.json", content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert str(path) in str(error) and "\n" not in str(error)
    assert error.path == str(path)
    assert error.field == field
    if field:
        assert repr(field) in str(error)


@pytest.mark.parametrize("url", ["icl.blindference.xyz", "ftp://icl.example", "http://"])
def test_icl_endpoint_must_be_an_http_url(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("BLF_ICL_ENDPOINT", url)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert str(caught.value).startswith("environment variable BLF_ICL_ENDPOINT:")
    assert caught.value.field == "icl_endpoint"


def test_bad_environment_value_names_the_variable(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLF_TIER", "x")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file)
    assert str(caught.value).startswith("environment variable BLF_TIER: field 'tier'")
    assert caught.value.field == "tier"


def test_a_good_environment_value_hides_a_bad_file_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "config.json", {"tier": "x"})
    monkeypatch.setenv("BLF_TIER", "1")
    assert load_config(path).settings.tier == 1


# --------------------------------------------------------------------------- the keystore path


def test_relative_keystore_next_to_config_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir, cwd = tmp_path / "node", tmp_path / "cwd"
    for directory in (config_dir, cwd):
        write(directory / "keystore.json", "{}")
    monkeypatch.chdir(cwd)
    assert resolve_keystore_path("keystore.json", config_dir) == config_dir / "keystore.json"
    (config_dir / "keystore.json").unlink()
    assert resolve_keystore_path("keystore.json", config_dir) == cwd / "keystore.json"


def test_missing_keystore_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        resolve_keystore_path("keys/k.json", tmp_path / "node")
    message = str(caught.value)
    assert str(tmp_path / "node" / "keys" / "k.json") in message
    assert str(tmp_path / "keys" / "k.json") in message
    assert caught.value.field == "keystore_path"


def test_absolute_keystore_path_is_taken_as_is(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "k.json"
    assert resolve_keystore_path(str(absolute), tmp_path / "node") == absolute


# --------------------------------------------------------------------------- writing


def test_update_keeps_unknown_fields_and_never_writes_overrides(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file.chmod(0o640)
    monkeypatch.setenv("BLF_ICL_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("BLF_SUPPORTED_MODEL_IDS", "x,y")
    before = json.loads(config_file.read_text())
    update_config_file(config_file, {"attestation_cert_hash": "0xab", "attestation_expiry": 5})
    after = json.loads(config_file.read_text())
    assert after == {**before, "attestation_cert_hash": "0xab", "attestation_expiry": 5}
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o640
    assert [p.name for p in config_file.parent.iterdir()] == ["config.json"]  # no temp left


def test_update_refuses_a_value_it_could_not_read_back(config_file: Path) -> None:
    before = config_file.read_bytes()
    with pytest.raises(ConfigError) as caught:
        update_config_file(config_file, {"tier": 9})
    assert caught.value.field == "tier"
    assert config_file.read_bytes() == before


def test_new_config_is_private(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "config.json"
    write_new_config(path, {"node_address": ADDRESS})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"node_address": ADDRESS}
