"""The node's settings: one flat ``config.json``, overridable by ``BLF_<FIELD>`` variables.

The file format is the public Python node's (protocol.md section 7), so an operator can
switch to blf on the same files. Two rules follow from that:

* fields blf does not know are kept and written back untouched;
* environment overrides apply at run time only and are never written into the file
  (the public node writes them back on every start; we do not).

Hence loading keeps two views: ``Settings`` (file + environment, validated) for reading,
and the raw file object, which is the only thing ``update_config_file`` ever rewrites.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from blf.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "PUBLIC_ICL_ENDPOINT",
    "LoadedConfig",
    "Settings",
    "load_config",
    "load_settings_or_environment",
    "resolve_config_path",
    "update_config_file",
    "write_new_config",
]

ENV_PREFIX = "BLF_"
DEFAULT_CONFIG_PATH = Path("~/.blindference/config.json")
PUBLIC_ICL_ENDPOINT = "https://icl.blindference.xyz"
PUBLIC_CHAIN_ID = 421614  # Arbitrum Sepolia
PUBLIC_NODE_REGISTRY = "0x72C0Ead949Fd2C346598a30AF1A69c3c5Cb86082"
PUBLIC_IPFS_GATEWAY = "https://node.lighthouse.storage"
PUBLIC_STAKING = "0x222Ac74201Ed58915e42Ee5be626d939fd234D0b"  # BlindferenceStaking
PUBLIC_BLIND_TOKEN = "0x232D5470DaaC7AD552a42d876aDEF1f778033cE0"

CommaList = Annotated[list[str], NoDecode]
COFHE_MODES = ("python", "bridge")  # JSON-RPC; Fhenix's @cofhe/sdk in a Node.js helper


class BackendSpec(BaseModel):
    """Which inference backend serves a model, and its options (``{"backend": "mock"}``,
    or just ``"mock"``). A model with no entry has no backend: its jobs fail, loudly."""

    model_config = ConfigDict(extra="allow", frozen=True)

    backend: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(BaseSettings):
    """Every field a node reads. The first block is the public node's, names unchanged."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="allow", validate_default=True, case_sensitive=False
    )

    # --- the public node's fields (protocol.md section 7) ---
    node_address: str = ""
    keystore_path: str = "keystore.json"
    tier: int = Field(0, ge=0, le=2)
    supported_model_ids: CommaList = Field(default_factory=list)
    attestation_backend: str = "mock"
    icl_endpoint: str = PUBLIC_ICL_ENDPOINT
    payment_service_url: str | None = None
    rpc_url: str | None = None
    ipfs_gateway: str = PUBLIC_IPFS_GATEWAY
    model_cache_dir: str | None = None
    log_level: str = "INFO"
    zdr_compliant: bool = False
    network: str | None = None
    attestation_cert_hash: str | None = None
    attestation_expiry: int | None = None
    registered_on_chain: bool = False
    stake_amount_wei: int = Field(0, ge=0)
    cofhe_mode: str | None = None
    cofhe_endpoint: str | None = None
    cofhe_chain_id: int = PUBLIC_CHAIN_ID
    skip_output_key_storage: bool = False
    custom_backends: Any = None
    # Read and kept; the token blf uses is the staking contract's own blindToken().
    blind_token_address: str = PUBLIC_BLIND_TOKEN

    # --- blf's own fields; absent from a public node's file, so all have defaults ---
    chain_id: int = PUBLIC_CHAIN_ID
    node_registry_address: str = PUBLIC_NODE_REGISTRY
    staking_address: str = PUBLIC_STAKING
    max_fee_gwei: float = Field(50.0, gt=0)
    ipfs_api_url: str | None = None
    ipfs_gateway_fallbacks: CommaList = Field(default_factory=list)
    ipfs_timeout_s: float = Field(30.0, gt=0)
    pinata_jwt: SecretStr | None = None
    pinata_api_url: str = "https://api.pinata.cloud"
    cofhe_timeout_s: float = Field(30.0, gt=0)
    cofhe_bridge_modules: Path | None = None  # node_modules holding @cofhe/sdk; default: found
    cofhe_bridge_node: str = "node"
    model_backends: dict[str, BackendSpec] = Field(default_factory=dict)
    cluster_key_file: str = "cluster.key"
    cluster_key: SecretStr | None = None  # BLF_CLUSTER_KEY on GPU machines; hex, 32 bytes
    control_key_file: str = "control.key"
    verifier_poll_max_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(60.0, gt=0)
    claim_requires_worker: bool = True  # claim only jobs a live GPU worker can serve
    gpu_memory_limit_mib: int | None = Field(None, gt=0)  # past it, a GPU worker restarts
    broker_url: str = ""
    gpus: CommaList = Field(default_factory=list)
    heartbeat_interval_s: float = Field(60.0, gt=0)
    chain_heartbeat_interval_s: float = Field(10 * 86400.0, gt=0)
    chain_heartbeat_check_s: float = Field(3600.0, gt=0)
    watchdog_interval_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(5.0, gt=0)
    reattest_within_s: int = Field(6 * 3600, ge=0)
    shutdown_timeout_s: float = Field(300.0, ge=0)
    job_timeout_s: int = Field(3600, gt=0)
    max_job_deliveries: int = Field(3, ge=1)
    control_concurrency: int = Field(4, ge=1)
    inference_concurrency: int = Field(1, ge=1)
    metrics_port: int = Field(9464, ge=0, le=65535)  # 0: any free port
    metrics_host: str = "127.0.0.1"  # `metrics` refuses a non-loopback one without --allow-remote

    @field_validator("model_backends", mode="before")
    @classmethod
    def _backend_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"backend": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("supported_model_ids", "gpus", "ipfs_gateway_fallbacks", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # The public node takes lists from the environment comma-separated.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("icl_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Caught here, once: a URL without a scheme would otherwise look like a transient
        # connection failure to the ICL client, and be retried for ever.
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"must be an http:// or https:// URL, not {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the first source wins, so BLF_* beats it.
        return (env_settings, init_settings)

    @property
    def attested(self) -> bool:
        return bool(self.attestation_cert_hash) and bool(self.attestation_expiry)

    @property
    def effective_cofhe_mode(self) -> str:
        """The public node defaults to "bridge"; a blf-made config leaves it empty: JSON-RPC."""
        return self.cofhe_mode or "python"

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


@dataclass
class LoadedConfig:
    """The effective settings plus where they came from."""

    path: Path
    settings: Settings
    raw: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def keystore_file(self) -> Path:
        return resolve_keystore_path(self.settings.keystore_path, self.directory)

    def beside(self, name: str) -> Path:
        """A file named in config (cluster key, control key): relative to config.json."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.directory / path


def resolve_config_path(environ: Mapping[str, str] | None = None) -> tuple[Path, list[str]]:
    """``BLF_CONFIG_PATH`` (the file), else ``BLF_CONFIG_DIR`` (the public node's: the
    directory), else ``~/.blindference/config.json``. Returns the path and any warnings."""
    env = os.environ if environ is None else environ
    explicit, directory = env.get("BLF_CONFIG_PATH"), env.get("BLF_CONFIG_DIR")
    if explicit:
        warnings = []
        if directory:
            warnings.append(
                f"both BLF_CONFIG_PATH and BLF_CONFIG_DIR are set; using BLF_CONFIG_PATH={explicit}"
            )
        return Path(explicit).expanduser().absolute(), warnings
    if directory:
        return Path(directory).expanduser().absolute() / "config.json", []
    return DEFAULT_CONFIG_PATH.expanduser().absolute(), []


def resolve_keystore_path(keystore_path: str, config_dir: Path) -> Path:
    """A relative path is looked up next to config.json first, then in the working
    directory (where the public node looks)."""
    path = Path(keystore_path).expanduser()
    if path.is_absolute():
        return path
    beside, in_cwd = config_dir / path, Path.cwd() / path
    for candidate in (beside, in_cwd):
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"keystore {keystore_path!r} not found: looked in {beside} and {in_cwd}",
        field="keystore_path",
    )


def read_raw(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no config file; run `blindference-node init` first", path=str(path)
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", path=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            path=str(path),
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level", path=str(path))
    return data


def build_settings(raw: Mapping[str, Any], *, path: Path) -> Settings:
    try:
        return Settings(**raw)
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc}", path=str(path)) from None
    except ValidationError as exc:
        raise _validation_to_config_error(exc, path) from None


def _validation_to_config_error(exc: ValidationError, path: Path) -> ConfigError:
    first = exc.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "?"
    env_name = ENV_PREFIX + name.split(".")[0].upper()
    source = f"environment variable {env_name}" if env_name in os.environ else str(path)
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ConfigError(
        f"{source}: field {name!r}: {first['msg']}{more}", path=str(path), field=name
    )


def load_config(path: Path | None = None) -> LoadedConfig:
    warnings: list[str] = []
    if path is None:
        path, warnings = resolve_config_path()
    # Absolute, so the node directory means the same after a chdir (redis-server does one).
    path = path.absolute()
    raw = read_raw(path)
    settings = build_settings(raw, path=path)
    return LoadedConfig(path=path, settings=settings, raw=raw, warnings=warnings)


def load_settings_or_environment() -> tuple[Settings, Path | None]:
    """config.json when there is one, else BLF_* alone (a GPU machine configured by its
    environment); with the config's directory, None without a file."""
    path, _ = resolve_config_path()
    if path.exists():
        loaded = load_config(path)
        return loaded.settings, loaded.directory
    return build_settings({}, path=path), None


def _atomic_write_json(path: Path, data: Mapping[str, Any], *, mode: int = 0o600) -> None:
    # Temp file in the same directory + fsync + rename: a crash leaves old or new, never half.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_config_file(path: Path, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Set ``updates`` in the file as it is on disk, leaving every other field alone:
    unknown fields survive and environment overrides never land in the file."""
    raw = read_raw(path)
    raw.update(updates)
    build_settings(raw, path=path)  # never write a file we could not read back
    mode = path.stat().st_mode & 0o777
    _atomic_write_json(path, raw, mode=mode)
    return raw


def write_new_config(path: Path, data: Mapping[str, Any]) -> None:
    build_settings(data, path=path)
    _atomic_write_json(path, data)
