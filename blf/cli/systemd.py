"""``systemd``: unit files that keep the node, and its GPU workers, running under systemd.

Two units, made from the current config:

* ``blindference-node.service`` runs ``blindference-node run`` as the operator's user. The
  keystore password comes from an EnvironmentFile that only root reads; it is never
  written into the unit (unit files are world-readable, and ``systemctl show`` prints them).
* ``blindference-worker@.service`` is a template for the key-free GPU worker
  (``python -m workers.gpu``): instance N sees GPU N only, so each GPU's worker is started,
  stopped and restarted on its own. Its broker URL and cluster key come from an
  EnvironmentFile; it needs no keystore and no password.

``TimeoutStopSec`` is derived from how long the code takes to stop after SIGTERM
(``blf.supervisor``) and from ``shutdown_timeout_s``, so systemd's SIGKILL never cuts a
graceful shutdown short.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import pwd
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from blf.cli.common import ConfigClickError
from blf.config import LoadedConfig, Settings, load_settings_or_environment
from blf.icl import Retry, Timeout

__all__ = [
    "NODE_UNIT",
    "WORKER_UNIT",
    "node_command",
    "node_unit",
    "register",
    "run_stop_budget_s",
    "worker_stop_budget_s",
    "worker_unit",
]

NODE_UNIT = "blindference-node.service"
WORKER_UNIT = "blindference-worker@.service"
UNIT_DIR = "/etc/systemd/system"
DEFAULT_ENV_FILE = Path("/etc/blindference/node.env")
DEFAULT_WORKER_ENV_FILE = Path("/etc/blindference/worker.env")
# Between a crash and the restart: a crash loop stays slow enough to read in the journal.
RESTART_SEC = 10
# Past the computed stop budget: interpreter exit, log flushing, a loaded host.
STOP_MARGIN_S = 30
# A configuration error exits 2 (the CLI and workers.gpu alike): a restart cannot fix it,
# so systemd should not loop on it every RESTART_SEC.
CONFIG_ERROR_EXIT = ConfigClickError.exit_code
# The environment variables that select the node or unlock it; any other BLF_* set in this
# shell would be lost under systemd, so its name (never its value) is pointed out.
_SELECTING_ENV = ("BLF_CONFIG_PATH", "BLF_CONFIG_DIR", "BLF_KEY_PASSWORD")
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$")
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")


def register(cli: click.Group) -> None:
    cli.add_command(systemd)


# --- stop budgets ------------------------------------------------------------------------


def run_stop_budget_s(settings: Settings) -> float:
    """The longest `run` takes from SIGTERM to its exit, as ``blf.supervisor`` stops:
    beat (``BEAT_STOP_S``), the workers (``shutdown_timeout_s``, then
    the cold grace), the final heartbeat (every attempt timing out), the embedded Redis."""
    from blf.broker import EmbeddedRedis
    from blf.icl import DEFAULT_TIMEOUT
    from blf.supervisor import BEAT_STOP_S, COLD_SHUTDOWN_GRACE_S, FINAL_HEARTBEAT_RETRY

    beat = BEAT_STOP_S
    workers = settings.shutdown_timeout_s + COLD_SHUTDOWN_GRACE_S
    heartbeat = _call_budget_s(FINAL_HEARTBEAT_RETRY, DEFAULT_TIMEOUT)
    redis = float(_default_of(EmbeddedRedis.stop, "timeout"))
    return beat + workers + heartbeat + redis


def worker_stop_budget_s(settings: Settings) -> float:
    """A GPU worker on its own: as long as `run` gives its inference worker, the warm
    shutdown (running jobs finish, up to ``shutdown_timeout_s``) plus the cold grace."""
    from blf.supervisor import COLD_SHUTDOWN_GRACE_S

    return settings.shutdown_timeout_s + COLD_SHUTDOWN_GRACE_S


def timeout_stop_sec(budget_s: float) -> int:
    return math.ceil(budget_s + STOP_MARGIN_S)


def _call_budget_s(retry: Retry, timeout: Timeout) -> float:
    """Every attempt of an ICL call timing out, with the longest wait between attempts."""
    steady = replace(retry, jitter=False)
    waits = sum(steady.delay(attempt) for attempt in range(retry.attempts - 1))
    return retry.attempts * (timeout.connect + timeout.read) + waits


def _default_of(function: Callable[..., Any], parameter: str) -> Any:
    return inspect.signature(function).parameters[parameter].default


# --- executables -------------------------------------------------------------------------


def _python() -> str:
    # Not resolved: a virtualenv's python is a symlink to the system one, and following
    # it would lose the virtualenv (and blf with it).
    if sys.executable:
        return str(Path(sys.executable).absolute())
    found = shutil.which("python3")
    if not found:
        raise click.ClickException("cannot tell which Python runs blf (sys.executable is empty)")
    return str(Path(found).absolute())


def node_command() -> list[str]:
    """This installation's ``blindference-node``: the script being run, else the one beside
    this Python, else the one on PATH, else ``python -m blf``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "blindference-node" and argv0.is_file():
        return [str(argv0.resolve())]
    beside = Path(_python()).parent / "blindference-node"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("blindference-node")
    if found:
        return [str(Path(found).absolute())]
    return [_python(), "-m", "blf"]


def worker_command() -> list[str]:
    """The key-free GPU worker. ``worker --role inference`` only replaces itself with this
    same command, so there is no fallback when ``workers`` is not installed."""
    if importlib.util.find_spec("workers.gpu") is None:
        raise click.ClickException(
            f"the GPU worker (workers.gpu) is not importable by {_python()}: reinstall blf"
        )
    # -P: the working directory (the user's home) does not go on sys.path, so no stray
    # file there can stand in for a module.
    return [_python(), "-P", "-m", "workers.gpu"]


# --- unit file syntax --------------------------------------------------------------------


def _escape(value: str) -> str:
    """A value as a unit file reads it back: ``%`` starts a specifier, so it is doubled."""
    if any(ch in value for ch in "\n\r\0"):
        raise click.ClickException(f"{value!r} cannot be written into a unit file")
    return value.replace("%", "%%")


def _word(value: str) -> str:
    """One word of a space-separated setting, quoted when it has to be."""
    if value and not _NEEDS_QUOTES.search(value):
        return _escape(value)
    quoted = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{_escape(quoted)}"'


def _command_line(args: Sequence[str]) -> str:
    # ExecStart= expands $NAME too: a literal $ is written $$.
    return " ".join(_word(arg).replace("$", "$$") for arg in args)


def _env(name: str, value: str) -> str:
    return _word(f"{name}={value}")


Entry = tuple[str, str] | str  # a setting, or a comment line


def _render(header: Sequence[str], sections: Sequence[tuple[str, Sequence[Entry]]]) -> str:
    lines = [f"# {line}".rstrip() for line in header]
    for name, entries in sections:
        lines += ["", f"[{name}]"]
        for entry in entries:
            lines.append(f"# {entry}" if isinstance(entry, str) else f"{entry[0]}={entry[1]}")
    return "\n".join(lines) + "\n"


def _stopping(timeout_s: int, why: Sequence[str]) -> list[Entry]:
    return [
        ("Restart", "on-failure"),
        ("RestartSec", str(RESTART_SEC)),
        f"Exit {CONFIG_ERROR_EXIT} is a configuration error: fix it, then start the unit again.",
        ("RestartPreventExitStatus", str(CONFIG_ERROR_EXIT)),
        # All at once would stop Redis or a model engine under the jobs still draining.
        "mixed: SIGTERM to the main process alone, which stops its own children in order;",
        "SIGKILL to whatever is left after TimeoutStopSec.",
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        *why,
        ("TimeoutStopSec", str(timeout_s)),
    ]


def _hardening(writable: Sequence[Path] = ()) -> list[Entry]:
    # Nothing here hides the GPUs (no PrivateDevices=) or the home directory, where the
    # node directory and the model caches usually are.
    entries: list[Entry] = [
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectSystem", "full"),
    ]
    if writable:
        entries.append(("ReadWritePaths", " ".join(_word(str(path)) for path in writable)))
    return entries


_INSTALL: tuple[str, Sequence[Entry]] = ("Install", [("WantedBy", "multi-user.target")])


def node_unit(
    loaded: LoadedConfig, *, user: str, env_file: Path, command: Sequence[str] | None = None
) -> str:
    settings = loaded.settings
    directory = loaded.directory
    stop_s = timeout_stop_sec(run_stop_budget_s(settings))
    header = [
        f"{NODE_UNIT}: the Blindference node, `blindference-node run`.",
        f"Made by `blindference-node systemd` from {loaded.path}.",
        "Regenerate it after moving the node or blf, or changing shutdown_timeout_s.",
        f"Install: copy to {UNIT_DIR}/, then",
        "  systemctl daemon-reload && systemctl enable --now blindference-node",
        f"{env_file} (owned by root, mode 0600) holds the keystore password:",
        "  BLF_KEY_PASSWORD='the password'",
        "(single quotes keep it literal) and any other secret BLF_* setting, such as a",
        "BLF_BROKER_URL with a Redis password.",
    ]
    service: list[Entry] = [
        ("Type", "simple"),
        ("User", _escape(user)),
        ("WorkingDirectory", _escape(str(directory))),
        ("Environment", _env("BLF_CONFIG_PATH", str(loaded.path))),
        ("Environment", _env("PYTHONUNBUFFERED", "1")),  # logs reach the journal at once
        ("EnvironmentFile", _escape(str(env_file))),
        ("ExecStart", _command_line([*(command or node_command()), "run"])),
        *_stopping(
            stop_s,
            [
                "SIGTERM: no new jobs, running ones finish (shutdown_timeout_s="
                f"{settings.shutdown_timeout_s:g}),",
                f"a final heartbeat: at most {run_stop_budget_s(settings):g} s, "
                f"plus {STOP_MARGIN_S} s to spare.",
            ],
        ),
        # ProtectSystem=full leaves the node directory writable unless it is under /etc or
        # /usr; ReadWritePaths= makes sure (config.json, Redis and the journal live there).
        *_hardening([directory]),
    ]
    unit = [
        ("Description", _escape(f"Blindference node {settings.node_address}".rstrip())),
        ("After", "network-online.target"),
        ("Wants", "network-online.target"),
    ]
    return _render(header, [("Unit", unit), ("Service", service), _INSTALL])


def worker_unit(
    settings: Settings,
    *,
    source: str,
    user: str,
    env_file: Path,
    command: Sequence[str] | None = None,
) -> str:
    """``source`` names where ``settings`` came from (a config.json, or the environment)."""
    stop_s = timeout_stop_sec(worker_stop_budget_s(settings))
    key_file = _home_of(user) / ".blindference" / "cluster.key"
    models = ",".join(settings.supported_model_ids) or "MODEL-ID,..."
    header = [
        f"{WORKER_UNIT}: a Blindference GPU worker, which holds no operator key;",
        "instance N uses GPU N only (nvidia-smi's numbering).",
        f"Made by `blindference-node systemd` from {source}.",
        f"Install on the GPU machine: copy to {UNIT_DIR}/, then",
        "  systemctl daemon-reload && systemctl enable --now blindference-worker@0",
        "(and blindference-worker@1 for a second GPU, and so on).",
        f"{env_file} (owned by root, mode 0600), one VAR=value a line:",
        "  BLF_BROKER_URL=redis://CONTROL-HOST:6379/0",
        "      the node's broker_url (the embedded Redis of `run` is a local socket)",
        f"  BLF_CLUSTER_KEY_FILE={key_file}",
        f"      the node directory's cluster.key, copied here (owned by {user}, mode 0600)",
        f"  BLF_SUPPORTED_MODEL_IDS={models}",
        "  BLF_MODEL_BACKENDS={...}",
        "      the node's model_backends, as JSON",
        "or BLF_CONFIG_PATH naming a config.json on this machine that has them.",
    ]
    service: list[Entry] = [
        ("Type", "simple"),
        ("User", _escape(user)),
        ("WorkingDirectory", "~"),
        ("Environment", _env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")),  # N is nvidia-smi's N
        ("Environment", "CUDA_VISIBLE_DEVICES=%i"),
        ("Environment", _env("PYTHONUNBUFFERED", "1")),
    ]
    if settings.node_address:
        # Public; the environment file may still override it (it is read after these).
        service.append(("Environment", _env("BLF_NODE_ADDRESS", settings.node_address)))
    service += [
        ("EnvironmentFile", _escape(str(env_file))),
        ("ExecStart", _command_line(command or worker_command())),
        *_stopping(
            stop_s,
            [
                "SIGTERM: running jobs finish (shutdown_timeout_s="
                f"{settings.shutdown_timeout_s:g}, plus the cold grace);",
                "a job still running after that is killed and goes back to the queue.",
            ],
        ),
        *_hardening(),
    ]
    unit = [
        ("Description", "Blindference GPU worker on GPU %i"),
        ("After", "network-online.target"),
        ("Wants", "network-online.target"),
    ]
    return _render(header, [("Unit", unit), ("Service", service), _INSTALL])


def _home_of(user: str) -> Path:
    try:
        return Path(pwd.getpwnam(user).pw_dir)
    except KeyError:
        return Path("/home") / user


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        import getpass

        return getpass.getuser()


# --- the command -------------------------------------------------------------------------


def _check_user(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    user = value or _current_user()
    if not _USER_NAME.match(user):
        raise click.BadParameter(f"{user!r} is not a user name systemd accepts")
    return user


def _absolute(_ctx: click.Context, _param: click.Parameter, value: Path) -> Path:
    if not value.is_absolute():
        raise click.BadParameter(f"{value} is not absolute: systemd needs an absolute path")
    return value


@click.command()
@click.option(
    "--print",
    "to_stdout",
    is_flag=True,
    help="Print both units to stdout, each after a `# ==> NAME <==` line (the default).",
)
@click.option(
    "--output-dir",
    type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the two unit files into this directory instead (mode 0644).",
)
@click.option(
    "--worker-only",
    is_flag=True,
    help="Only the GPU worker template, for a GPU machine: no config.json needed there "
    "(BLF_* settings alone will do).",
)
@click.option(
    "--user",
    default=None,
    callback=_check_user,
    help="The user the units run as  [default: the current user].",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_ENV_FILE,
    show_default=True,
    callback=_absolute,
    help="The node's environment file: BLF_KEY_PASSWORD=... (owned by root, mode 0600).",
)
@click.option(
    "--worker-env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_WORKER_ENV_FILE,
    show_default=True,
    callback=_absolute,
    help="The GPU workers' environment file: broker URL, cluster key file, models.",
)
def systemd(
    to_stdout: bool,
    output_dir: Path | None,
    worker_only: bool,
    user: str,
    env_file: Path,
    worker_env_file: Path,
) -> None:
    """Write systemd units that run this node, made from its current config.

    \b
      blindference-node.service     the node (`run`) as --user; the keystore password
                                    comes from --env-file, never from the unit
      blindference-worker@.service  a key-free GPU worker; instance N uses GPU N

    The units are printed unless --output-dir is given. Run this as the user the node
    runs as, not under sudo: the units take that user's config and name.

    \b
    Control machine:
      blindference-node systemd --output-dir .
      sudo install -d -m 0755 /etc/blindference
      sudo install -m 0600 /dev/null /etc/blindference/node.env
      sudoedit /etc/blindference/node.env    # BLF_KEY_PASSWORD='...'
      sudo install -m 0644 blindference-node.service /etc/systemd/system/
      sudo systemctl daemon-reload && sudo systemctl enable --now blindference-node

    \b
    GPU machine (no keystore: the cluster key, copied from the node directory):
      blindference-node systemd --worker-only --output-dir .
      sudo install -d -m 0755 /etc/blindference
      sudo install -m 0600 /dev/null /etc/blindference/worker.env
      sudoedit /etc/blindference/worker.env  # BLF_BROKER_URL, BLF_CLUSTER_KEY_FILE, ...
      sudo install -m 0644 blindference-worker@.service /etc/systemd/system/
      sudo systemctl daemon-reload && sudo systemctl enable --now blindference-worker@0

    Regenerate the units after moving the node or blf, or changing shutdown_timeout_s:
    paths and TimeoutStopSec are written into them.
    """
    if to_stdout and output_dir is not None:
        raise click.UsageError("--print and --output-dir exclude each other")
    from blf.cli.common import load_with_warnings, warn

    worker = worker_command()
    units: dict[str, str] = {}
    if worker_only:
        settings, directory = load_settings_or_environment()
        source = str(directory / "config.json") if directory else "the BLF_* environment"
        _warn_about(None, settings, user, [Path(worker[0])], warn)
    else:
        loaded = load_with_warnings()
        settings, source = loaded.settings, str(loaded.path)
        node = node_command()
        _warn_about(loaded.path, settings, user, [Path(node[0]), Path(worker[0])], warn)
        units[NODE_UNIT] = node_unit(loaded, user=user, env_file=env_file, command=node)
    units[WORKER_UNIT] = worker_unit(
        settings, source=source, user=user, env_file=worker_env_file, command=worker
    )
    if output_dir is None:
        click.echo("\n".join(f"# ==> {name} <==\n{text}" for name, text in units.items()), nl=False)
        return
    for name, text in units.items():
        path = output_dir.absolute() / name
        _write_unit(path, text)
        click.echo(f"Wrote {path}")
    name = WORKER_UNIT if worker_only else NODE_UNIT
    instance = "blindference-worker@0" if worker_only else "blindference-node"
    click.echo(f"Next: sudo install -m 0644 {output_dir / name} {UNIT_DIR}/")
    click.echo(f"      sudo systemctl daemon-reload && sudo systemctl enable --now {instance}")


def _warn_about(
    config: Path | None,
    settings: Settings,
    user: str,
    executables: Sequence[Path],
    warn: Callable[[str], None],
) -> None:
    if user == "root":
        sudo = os.environ.get("SUDO_USER")
        hint = f" (under sudo: --user {sudo})" if sudo else ""
        warn(f"the units run as root; prefer a user of the node's own with --user{hint}")
    owner = None
    if config is not None:
        with suppress(KeyError, OSError):
            owner = pwd.getpwuid(config.stat().st_uid).pw_name
    if owner is not None and user not in (owner, "root"):
        warn(f"{config} belongs to {owner}, not {user}: the node could not write to it")
    if user != _current_user():
        for executable in executables:
            closed = _closed_to(user, executable)
            if closed is not None:
                real = os.path.realpath(executable)
                warn(f"{user} may not reach {real} (the units' {executable}): {closed} is closed")
    written = {"BLF_NODE_ADDRESS"} if settings.node_address else set()
    skipped = sorted(
        name
        for name in os.environ
        if name.startswith("BLF_") and name not in (*_SELECTING_ENV, *written)
    )
    if skipped:
        warn(
            f"set here but not written into the units: {', '.join(skipped)}; "
            "put them in the environment file if the node needs them"
        )


def _closed_to(user: str, executable: Path) -> Path | None:
    """The first directory on the way to ``executable``'s real file (a virtualenv's python
    is a link, often into the installing user's home) that ``user`` cannot pass through,
    judged by owner and the bits for others (group membership aside); None if none."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return None  # a user of another machine: nothing to judge here
    if uid == 0:
        return None
    for directory in reversed(Path(os.path.realpath(executable)).parents):
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_uid != uid and not info.st_mode & 0o001:
            return directory
    return None


def _write_unit(path: Path, text: str) -> None:
    """Whole or not at all, 0644 whatever the umask (systemd and `systemctl cat` read it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
