"""blf.keyfiles: key files are born private, read strictly, and found where config says."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blf import keyfiles
from blf.config import Settings
from blf.errors import ConfigError
from blf.keyfiles import (
    cluster_key,
    control_key,
    create_key_file,
    parse_key_hex,
    read_key_file,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key(path: Path, text: str, file_mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(file_mode)


def test_created_file_is_0600_hex_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    key = create_key_file(path)
    assert len(key) == 32
    assert mode(path) == 0o600
    assert path.read_text() == key.hex() + "\n"
    assert read_key_file(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.key"]  # no temp file left


def test_created_file_is_0600_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        create_key_file(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    write_key(path, "keep me")
    with pytest.raises(ConfigError, match="already exists"):
        create_key_file(path)
    assert path.read_text() == "keep me"


def test_create_in_missing_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        create_key_file(tmp_path / "nowhere" / "k")


def test_create_without_hard_links_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(keyfiles.os, "link", no_links)
    path = tmp_path / "k"
    key = create_key_file(path)
    assert read_key_file(path) == key and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_other_readable_file_refused(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "cluster.key"
    write_key(path, "ab" * 32, file_mode)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        read_key_file(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", ["", "abc", "zz" * 32, "ab" * 31, "ab" * 33, "0x" + "ab" * 31])
def test_bad_hex_refused_naming_the_path(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cluster.key"
    write_key(path, text)
    with pytest.raises(ConfigError) as caught:
        read_key_file(path)
    message = str(caught.value)
    assert str(path) in message and "64 hex" in message and "\n" not in message
    assert caught.value.path == str(path)


def test_non_ascii_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"\xff" * 64)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="64 hex"):
        read_key_file(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError, match="no such key file") as caught:
        read_key_file(path)
    assert str(path) in str(caught.value)


def test_unreadable_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        read_key_file(tmp_path)  # a directory
    assert str(tmp_path) in str(caught.value)


def test_bad_hex_message_never_echoes_the_text() -> None:
    almost = "ab" * 31 + "zz"
    with pytest.raises(ConfigError) as caught:
        parse_key_hex(almost, source="BLF_CLUSTER_KEY")
    assert almost not in str(caught.value) and "ab" * 4 not in str(caught.value)
    assert str(caught.value).startswith("BLF_CLUSTER_KEY:")


@given(
    st.binary(min_size=32, max_size=32),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["", " ", "\n", "\t "]),
)
def test_parse_key_hex_forms(key: bytes, prefix: bool, upper: bool, pad: str) -> None:
    body = key.hex().upper() if upper else key.hex()
    text = pad + ("0x" if prefix else "") + body + pad
    assert parse_key_hex(text, source="test") == key


# --- the cluster key -----------------------------------------------------------------------


def test_env_key_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_key_file(tmp_path / "cluster.key")
    env_key = bytes(range(32))
    monkeypatch.setenv("BLF_CLUSTER_KEY", "0x" + env_key.hex())
    assert cluster_key(Settings(), tmp_path) == env_key


def test_env_key_bad_hex_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLF_CLUSTER_KEY", "nothex")
    with pytest.raises(ConfigError, match="BLF_CLUSTER_KEY"):
        cluster_key(Settings(), None)


def test_file_relative_to_directory(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "cluster.key")
    assert cluster_key(Settings(), tmp_path) == key


def test_file_env_override_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    key = create_key_file(tmp_path / "sub" / "copied.key")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLF_CLUSTER_KEY_FILE", "sub/copied.key")
    assert cluster_key(Settings(), None) == key


def test_file_absolute_path_ignores_directory(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "elsewhere.key")
    settings = Settings(cluster_key_file=str(tmp_path / "elsewhere.key"))
    assert cluster_key(settings, tmp_path / "unrelated") == key


def test_missing_everything_says_what_gpu_machines_need(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        cluster_key(Settings(), tmp_path)
    message = str(caught.value)
    assert "BLF_CLUSTER_KEY_FILE" in message and "BLF_CLUSTER_KEY " in message
    assert "cluster.key" in message and str(tmp_path) in message


def test_empty_env_key_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = create_key_file(tmp_path / "cluster.key")
    monkeypatch.setenv("BLF_CLUSTER_KEY", "")
    assert cluster_key(Settings(), tmp_path) == key


def test_group_readable_cluster_key_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    write_key(path, "ab" * 32, 0o644)  # as `scp` without -p would leave a copy
    with pytest.raises(ConfigError, match="chmod 600"):
        cluster_key(Settings(), tmp_path)


# --- the control key -----------------------------------------------------------------------


def test_control_key_created_once_then_same(tmp_path: Path) -> None:
    path = tmp_path / "control.key"
    first = control_key(path)
    assert mode(path) == 0o600
    assert control_key(path) == first
    assert read_key_file(path) == first


def test_control_key_race_reads_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "control.key"
    winner = create_key_file(path)
    # As if another process created the file between our existence check and our create.
    monkeypatch.setattr(keyfiles.os.path, "lexists", lambda _p: False)
    assert control_key(path) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["control.key"]


def test_control_key_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "control.key"
    write_key(path, "junk")
    with pytest.raises(ConfigError, match="64 hex"):
        control_key(path)
    assert path.read_text() == "junk"  # never silently replaced
