"""The operator identity at run time: settings, the unlocked account, and what only they
can do together (attest, persist the certificate, build clients).

Built once at the edge (the CLI, or a Celery worker's start-up) and passed down, so no
module below calls ``Settings()`` or reads the keystore on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eth_utils import to_checksum_address

from blf.attestation import BACKENDS, mock_key, mock_quote, runtime_hash
from blf.chain import ChainClient
from blf.config import LoadedConfig, Settings, load_config, update_config_file
from blf.errors import AttestationError, ChainError, IclStatusError, WalletError
from blf.icl import DEFAULT_RETRY, AttestationRequest, Certificate, IclClient, Retry
from blf.wallet import load_account, read_password

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

__all__ = ["Node", "open_node"]

log = logging.getLogger("blf.node")


@dataclass
class Node:
    config: LoadedConfig
    account: LocalAccount
    clock: Callable[[], float] = field(default=time.time, repr=False)

    @property
    def settings(self) -> Settings:
        return self.config.settings

    @property
    def address(self) -> str:
        return str(to_checksum_address(self.account.address))

    @property
    def directory(self) -> Path:
        return self.config.directory

    def reload(self) -> None:
        """Re-read config.json: another process (the CLI, a peer worker) may have re-attested."""
        self.config = load_config(self.config.path)

    def icl(self, *, retry: Retry = DEFAULT_RETRY) -> IclClient:
        return IclClient(self.settings.icl_endpoint, account=self.account, retry=retry)

    def chain(self) -> ChainClient:
        settings = self.settings
        if not settings.rpc_url:
            raise ChainError("no rpc_url configured: set it in config.json or BLF_RPC_URL")
        return ChainClient(
            settings.rpc_url,
            chain_id=settings.chain_id,
            registry_address=settings.node_registry_address,
            account=self.account,
            max_fee_gwei=settings.max_fee_gwei,
            # One lock file per key: the CLI and the workers may send at the same time.
            nonce_lock_path=self.directory / "nonce.lock",
        )

    def cert_seconds_left(self) -> int | None:
        if not self.settings.attested:
            return None
        return int(self.settings.attestation_expiry or 0) - int(self.clock())

    def needs_attestation(self) -> bool:
        left = self.cert_seconds_left()
        return left is None or left < self.settings.reattest_within_s

    def attest(self, *, tee_key: str | None = None, icl: IclClient | None = None) -> Certificate:
        """Challenge, quote, verify, then persist the certificate atomically."""
        backend = self.settings.attestation_backend or "mock"
        if backend != "mock" or not BACKENDS.get(backend, BACKENDS["mock"]).available:
            raise AttestationError(
                f"attestation backend {backend!r} is not available; only 'mock' (tier 0) is"
            )
        client = icl or self.icl()
        try:
            cert = self._attest_with(client, tee_key)
        finally:
            if icl is None:  # ours to close; a client passed in belongs to the caller
                client.close()
        self.save_certificate(cert)
        log.info(
            "Attested: tier %d, cert %s, expires in %ds",
            cert.tier,
            cert.cert_hash[:18],
            cert.expiry - int(self.clock()),
        )
        return cert

    def _attest_with(self, client: IclClient, tee_key: str | None) -> Certificate:
        challenge = client.challenge()
        request = AttestationRequest(
            node_address=self.address,
            backend_type="mock",
            quote=mock_quote(challenge.nonce, mock_key(tee_key)),
            runtime_hash=runtime_hash(),
            challenge_id=challenge.challenge_id,
            supported_model_ids=list(self.settings.supported_model_ids),
        )
        try:
            return client.verify_attestation(request)
        except IclStatusError as exc:
            raise AttestationError(f"ICL refused the attestation: {exc}") from None

    def save_certificate(self, cert: Certificate) -> None:
        fields = {
            "attestation_cert_hash": cert.cert_hash,
            "attestation_expiry": int(cert.expiry),
            "tier": int(cert.tier),
        }
        update_config_file(self.config.path, fields)
        self.config.raw.update(fields)
        self.config.settings = self.settings.model_copy(update=fields)


def open_node(config: LoadedConfig | None = None, *, password: str | None = None) -> Node:
    """Load the config and unlock the keystore; checks the keystore matches the config."""
    loaded = config or load_config()
    if password is None:
        password = read_password()
    account = load_account(loaded.keystore_file(), password)
    configured = loaded.settings.node_address
    if configured and to_checksum_address(configured) != to_checksum_address(account.address):
        raise WalletError(
            f"keystore {loaded.keystore_file()} holds {account.address}, but config.json says "
            f"node_address {configured}"
        )
    return Node(config=loaded, account=account)
