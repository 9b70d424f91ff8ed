"""``systemd``: the units it writes, read back as systemd reads them, and checked by
``systemd-analyze verify`` where systemd is installed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result

from blf.cli.systemd import NODE_UNIT, WORKER_UNIT, run_stop_budget_s, worker_stop_budget_s
from blf.config import load_config
from tests.nodes import PASSWORD, NodeDir, error_line, make_node, short_tempdir

# A key to import, so that the test knows the secret it must never see in a unit.
PRIVATE_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
REDIS_SECRET = "redis-secret-8c1f"
PINATA_SECRET = "pinata-jwt-secret-51d0"
HEADER = re.compile(r"^# ==> (\S+) <==\n", re.MULTILINE)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CONSOLE_SCRIPT = Path(sys.executable).parent / "blindference-node"


# --------------------------------------------------------------------------- reading units


@dataclass
class Unit:
    """A unit file as systemd reads it: sections of settings, where a key may repeat."""

    text: str
    sections: dict[str, list[tuple[str, str]]]

    @classmethod
    def parse(cls, text: str) -> Unit:
        sections: dict[str, list[tuple[str, str]]] = {}
        current: str | None = None
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):  # a continuation line
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                assert current not in sections, f"section [{current}] twice"
                sections[current] = []
                continue
            assert current is not None, f"a setting before any section: {raw!r}"
            key, sep, value = line.partition("=")
            assert sep, f"not a Key=value line: {raw!r}"
            sections[current].append((key.strip(), value.strip()))
        return cls(text, sections)

    def all(self, section: str, key: str) -> list[str]:
        return [value for name, value in self.sections.get(section, []) if name == key]

    def one(self, section: str, key: str) -> str:
        values = self.all(section, key)
        assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times: {values}"
        return values[0]

    def words(self, section: str, key: str) -> list[str]:
        """A space-separated setting's words, unquoted, specifiers (%%) and, in Exec lines,
        variables ($$) unescaped: the values systemd hands to the process."""
        found = []
        for value in self.all(section, key):
            for word in shlex.split(value):
                if key.startswith("Exec"):
                    word = word.replace("$$", "$")
                found.append(word.replace("%%", "%"))
        return found

    def environment(self) -> dict[str, str]:
        pairs = (word.partition("=") for word in self.words("Service", "Environment"))
        return {name: value for name, _, value in pairs}

    def seconds(self, section: str, key: str) -> float:
        value = self.one(section, key)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)s?", value)
        assert match, f"{key}={value} is not plain seconds"
        return float(match.group(1))


def units_of(output: str) -> dict[str, Unit]:
    """``--print`` output split at its ``# ==> NAME <==`` lines."""
    parts = HEADER.split(output)
    assert parts[0] == "", f"output before the first header: {parts[0]!r}"
    names, texts = parts[1::2], parts[2::2]
    # One blank line between units: each but the last ends with it.
    for index, text in enumerate(texts[:-1]):
        assert text.endswith("\n\n"), f"no blank line after {names[index]}"
        texts[index] = text[:-1]
    return {name: Unit.parse(text) for name, text in zip(names, texts, strict=True)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def template() -> Iterator[NodeDir]:
    """One node made by ``init`` (importing a known key) for the module; tests get copies."""
    node = make_node(
        "http://127.0.0.1:9", models="test-model", attest=False, private_key=PRIVATE_KEY
    )
    yield node
    shutil.rmtree(node.root, ignore_errors=True)


def copy_of(template: NodeDir, root: Path) -> NodeDir:
    shutil.copytree(template.root, root)
    return NodeDir(root, address=template.address)


@pytest.fixture
def node(template: NodeDir, tmp_path: Path) -> NodeDir:
    return copy_of(template, tmp_path / "node")


def units(node: NodeDir, *args: str, **env: str) -> tuple[Result, dict[str, Unit]]:
    result = node.invoke("systemd", *args, env=env)
    assert result.exit_code == 0, result.output
    return result, units_of(result.stdout)


def current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


# --------------------------------------------------------------------------- the node's unit


def test_print_writes_both_units_each_after_a_header(node: NodeDir) -> None:
    result, found = units(node, "--print")
    assert list(found) == [NODE_UNIT, WORKER_UNIT]
    # The default is the same as --print: the units on stdout, nothing else there.
    assert node.invoke("systemd").stdout == result.stdout


def test_node_unit_runs_this_installation_as_this_user(node: NodeDir) -> None:
    _, found = units(node)
    unit = found[NODE_UNIT]
    executable, *args = unit.words("Service", "ExecStart")
    assert args == ["run"]
    assert Path(executable).is_absolute() and os.access(executable, os.X_OK)
    assert Path(executable).name == "blindference-node"
    assert unit.environment()["BLF_CONFIG_PATH"] == str(node.config_path)
    assert unit.one("Service", "EnvironmentFile") == "/etc/blindference/node.env"
    assert unit.one("Service", "User") == current_user()
    assert unit.words("Service", "WorkingDirectory") == [str(node.root)]
    assert unit.words("Service", "ReadWritePaths") == [str(node.root)]
    for key, value in [
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectSystem", "full"),
    ]:
        assert unit.one("Service", key) == value, key
    assert unit.seconds("Service", "RestartSec") > 0
    assert unit.one("Unit", "After") == unit.one("Unit", "Wants") == "network-online.target"
    assert unit.one("Install", "WantedBy") == "multi-user.target"


def test_the_console_script_names_itself(node: NodeDir, tmp_path: Path) -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT} (blf is not pip-installed)")
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "systemd", "--print"],
        env=node.process_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    unit = units_of(done.stdout)[NODE_UNIT]
    assert unit.words("Service", "ExecStart") == [str(CONSOLE_SCRIPT.resolve()), "run"]


@pytest.mark.parametrize("shutdown_timeout_s", [300, 1234.5, 0])
def test_timeout_stop_outlasts_the_graceful_shutdown(
    node: NodeDir, shutdown_timeout_s: float
) -> None:
    node.set_config(shutdown_timeout_s=shutdown_timeout_s)
    settings = load_config(node.config_path).settings
    _, found = units(node)
    run_stop = found[NODE_UNIT].seconds("Service", "TimeoutStopSec")
    worker_stop = found[WORKER_UNIT].seconds("Service", "TimeoutStopSec")
    assert run_stop > run_stop_budget_s(settings) > shutdown_timeout_s
    assert worker_stop > worker_stop_budget_s(settings) > shutdown_timeout_s
    # `run` stops more than a worker: beat, the final heartbeat, the embedded Redis.
    assert run_stop > worker_stop


def test_an_environment_override_counts_and_is_named(node: NodeDir) -> None:
    result, found = units(node, BLF_SHUTDOWN_TIMEOUT_S="2000")
    assert found[NODE_UNIT].seconds("Service", "TimeoutStopSec") > 2000
    # The unit does not carry it: the operator is told to put it in the environment file.
    assert "BLF_SHUTDOWN_TIMEOUT_S" not in found[NODE_UNIT].text
    assert "BLF_SHUTDOWN_TIMEOUT_S" in result.stderr


def test_no_secret_reaches_the_units(node: NodeDir) -> None:
    env = {
        "BLF_KEY_PASSWORD": PASSWORD,
        "BLF_BROKER_URL": f"redis://:{REDIS_SECRET}@10.0.0.5:6379/0",
        "BLF_PINATA_JWT": PINATA_SECRET,
    }
    result = node.invoke("systemd", env=env)
    assert result.exit_code == 0, result.output
    keystore = json.loads((node.root / "keystore.json").read_text())
    secrets = [
        PASSWORD,
        PRIVATE_KEY,
        REDIS_SECRET,
        PINATA_SECRET,
        keystore["crypto"]["ciphertext"],
        keystore["crypto"]["mac"],
        keystore["crypto"]["kdfparams"]["salt"],
        (node.root / "cluster.key").read_text().strip(),
        (node.root / "control.key").read_text().strip(),
    ]
    for secret in secrets:
        assert secret.lower() not in result.output.lower()
    # Only the environment file's name; no Environment= line sets a password.
    unit = units_of(result.stdout)[NODE_UNIT]
    assert "BLF_KEY_PASSWORD" not in unit.environment()


def test_worker_template_is_key_free_and_pins_one_gpu(node: NodeDir, tmp_path: Path) -> None:
    _, found = units(node)
    unit = found[WORKER_UNIT]
    lowered = unit.text.lower()
    for word in (
        "keystore",
        "key_password",
        "password",
        "control.key",
        "private_key",
        "private key",
    ):
        assert word not in lowered, word
    assert "BLF_CONFIG_PATH" not in unit.environment()
    env = unit.environment()
    assert unit.all("Service", "Environment").count("CUDA_VISIBLE_DEVICES=%i") == 1
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # so N is nvidia-smi's GPU N
    assert env["BLF_NODE_ADDRESS"] == node.address
    assert unit.one("Service", "EnvironmentFile") == "/etc/blindference/worker.env"
    assert "BLF_BROKER_URL" in unit.text and "BLF_CLUSTER_KEY_FILE" in unit.text
    for key in ("Restart", "KillMode", "KillSignal"):
        assert unit.one("Service", key) == found[NODE_UNIT].one("Service", key)
    command = unit.words("Service", "ExecStart")
    assert command[1:] == ["-P", "-m", "workers.gpu"]
    # The command starts from an unrelated directory (the unit's is the user's home).
    done = subprocess.run(
        [*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "workers.gpu" in done.stdout, done.stderr


def test_worker_only_needs_no_config(tmp_path: Path) -> None:
    nowhere = NodeDir(tmp_path / "no-node")
    result = nowhere.invoke("systemd", "--worker-only", env={"BLF_NODE_ADDRESS": "0x" + "ab" * 20})
    assert result.exit_code == 0, result.output
    found = units_of(result.stdout)
    assert list(found) == [WORKER_UNIT]
    assert found[WORKER_UNIT].environment()["BLF_NODE_ADDRESS"] == "0x" + "ab" * 20


# --------------------------------------------------------------------------- options


def test_output_dir_writes_the_files_0644(node: NodeDir, tmp_path: Path) -> None:
    printed = node.invoke("systemd").stdout
    out = tmp_path / "units"
    out.mkdir()
    old_umask = os.umask(0o077)
    try:
        result = node.invoke("systemd", "--output-dir", str(out))
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([NODE_UNIT, WORKER_UNIT])
    for name, unit in units_of(printed).items():
        path = out / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert path.read_text() == unit.text
    assert "systemctl daemon-reload" in result.stdout


def test_user_and_env_files_are_options(node: NodeDir) -> None:
    _, found = units(
        node,
        "--user",
        "blf",
        "--env-file",
        "/srv/blf/node.env",
        "--worker-env-file",
        "/srv/blf/gpu.env",
    )
    assert [u.one("Service", "User") for u in found.values()] == ["blf", "blf"]
    assert found[NODE_UNIT].one("Service", "EnvironmentFile") == "/srv/blf/node.env"
    assert found[WORKER_UNIT].one("Service", "EnvironmentFile") == "/srv/blf/gpu.env"


@pytest.mark.parametrize(
    "args",
    [
        ("--print", "--output-dir", "/tmp"),
        ("--user", "two words"),
        ("--env-file", "relative.env"),
    ],
)
def test_bad_options_are_usage_errors(node: NodeDir, args: tuple[str, ...]) -> None:
    result = node.invoke("systemd", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_without_a_node_it_says_so(tmp_path: Path) -> None:
    result = NodeDir(tmp_path / "none").invoke("systemd")
    assert result.exit_code == 2
    assert "no config file" in error_line(result)


def test_help_says_where_the_units_go(node: NodeDir) -> None:
    text = node.invoke("systemd", "--help").output
    for needed in (
        "/etc/systemd/system/",
        "systemctl daemon-reload && sudo systemctl enable --now blindference-node",
        "enable --now blindference-worker@0",
        "BLF_KEY_PASSWORD",
        "--output-dir",
    ):
        assert needed in text, needed


def test_paths_that_need_quoting_read_back_exactly(template: NodeDir) -> None:
    node = copy_of(template, short_tempdir() / "node dir 100%")
    try:
        _, found = units(node)
        unit = found[NODE_UNIT]
        assert unit.environment()["BLF_CONFIG_PATH"] == str(node.config_path)
        assert unit.words("Service", "ReadWritePaths") == [str(node.root)]
        assert unit.one("Service", "WorkingDirectory").replace("%%", "%") == str(node.root)
    finally:
        shutil.rmtree(node.root.parent, ignore_errors=True)


# --------------------------------------------------------------------------- systemd-analyze

needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (no systemd here)"
)
OUR_UNITS = re.compile(r"blindference-(node\.service|worker@)")


def verify(directory: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about our units (the template checked as
    itself and as instance 0). It warns about a bad setting and exits 0 (the setting is
    ignored), so its messages are the verdict; lines about other units (a container's
    missing pieces) are not ours and are left aside."""
    assert SYSTEMD_ANALYZE is not None
    files = [
        directory / NODE_UNIT,
        directory / WORKER_UNIT,
        directory / "blindference-worker@0.service",
    ]
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        check=False,
    )
    lines = (done.stdout + done.stderr).splitlines()
    ours = [line for line in lines if OUR_UNITS.search(line)]
    if done.returncode != 0 and not ours:
        pytest.skip(f"systemd-analyze verify cannot run here: {lines[-3:]}")
    return ours


@needs_systemd
@pytest.mark.parametrize("name", ["node", "node dir 100%"])
def test_systemd_accepts_the_units(template: NodeDir, name: str) -> None:
    root = short_tempdir()
    try:
        node = copy_of(template, root / name)
        out = root / "units"
        out.mkdir()
        result = node.invoke("systemd", "--output-dir", str(out))
        assert result.exit_code == 0, result.output
        assert verify(out) == []
        # The check has teeth: one mistyped value in a copy is reported.
        unit = out / NODE_UNIT
        unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
        assert any("mixd" in line for line in verify(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)
