"""What ``run`` checks before it takes jobs: a node that claims jobs it can never answer
costs its operator reputation, so what would make every job fail is said at start."""

from __future__ import annotations

from blf.config import COFHE_MODES, Settings
from blf.errors import ConfigError

__all__ = ["check_servable", "job_warnings"]


def check_servable(settings: Settings) -> None:
    """Refuse to start on a setting this release cannot serve at all."""
    mode = settings.effective_cofhe_mode
    if mode not in COFHE_MODES:
        raise ConfigError(
            f"cofhe_mode {mode!r} is not available in this release; available: "
            f"{', '.join(COFHE_MODES)} (set cofhe_mode and cofhe_endpoint in config.json)",
            field="cofhe_mode",
        )
    if mode == "bridge" and not settings.cofhe_endpoint:
        raise ConfigError(
            "cofhe_mode 'bridge' needs cofhe_endpoint: the RPC URL of the chain CoFHE serves "
            f"(chain id {settings.cofhe_chain_id}, cofhe_chain_id), as for the public node",
            field="cofhe_endpoint",
        )


def job_warnings(settings: Settings) -> list[str]:
    """Settings that make some or all jobs fail, one line each."""
    found = []
    if settings.supported_model_ids and not settings.cofhe_endpoint:
        found.append("no cofhe_endpoint: prompt keys cannot be decrypted, every job will fail")
    if settings.supported_model_ids and not (settings.ipfs_api_url or settings.pinata_jwt):
        found.append("no IPFS upload target (ipfs_api_url or pinata_jwt): jobs as leader will fail")
    missing = [m for m in settings.supported_model_ids if m not in settings.model_backends]
    if missing:
        found.append(
            f"no backend configured for {', '.join(missing)} (model_backends): their jobs will fail"
        )
    return found
