"""Pytest plugin: a real local chain (anvil), a freshly deployed NodeRegistry, and BLIND
with BlindferenceStaking.

anvil comes from npm (`@foundry-rs/anvil`, pinned in package.json; `npm ci` installs it) and
the registry from the real artifact in ../shared/contracts. Without either, the tests that
need them skip with the reason.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
REGISTRY_ARTIFACT = SHARED / "contracts" / "NodeRegistry.json"
BLIND_ARTIFACT = SHARED / "contracts" / "BLIND.json"
STAKING_ARTIFACT = SHARED / "contracts" / "BlindferenceStaking.json"

# anvil's default mnemonic, passed explicitly so the keys below do not depend on its defaults.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_ACCOUNTS = 4
ANVIL_CHAIN_ID = 31337
STARTUP_DEADLINE_S = 20.0


@dataclass
class AnvilNode:
    """A running anvil: its URL, chain id and funded dev keys (account 0 deploys)."""

    url: str
    chain_id: int
    private_keys: list[str]
    process: subprocess.Popen[bytes] = field(repr=False)
    startup_s: float = 0.0

    @property
    def accounts(self) -> list[LocalAccount]:
        return [Account.from_key(key) for key in self.private_keys]

    def rpc(self, method: str, *params: Any) -> Any:
        """One JSON-RPC call; anvil-specific methods (evm_*, anvil_*) included."""
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
        reply = requests.post(self.url, json=body, timeout=10).json()
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def increase_time(self, seconds: int) -> None:
        """Move the chain clock forward and mine a block so reads see the new time."""
        self.rpc("evm_increaseTime", seconds)
        self.rpc("evm_mine")

    def set_automine(self, enabled: bool) -> None:
        self.rpc("evm_setAutomine", enabled)

    def pending_count(self) -> int:
        return int(self.rpc("txpool_status")["pending"], 16)


def _anvil_binary() -> Path | None:
    """The platform binary npm put in node_modules; the node wrapper in .bin is the fallback."""
    machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = {"linux": "linux", "darwin": "darwin", "win32": "win32"}.get(sys.platform, "")
    candidates = [
        REPO_ROOT / "node_modules" / "@foundry-rs" / f"anvil-{system}-{machine}" / "bin" / "anvil",
        REPO_ROOT / "node_modules" / ".bin" / "anvil",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll eth_chainId until anvil answers; fail fast if it died."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"anvil exited with {process.returncode}: {log_path.read_text()}")
        try:
            if "result" in requests.post(url, json=body, timeout=1).json():
                return
        except requests.RequestException:
            pass
        time.sleep(0.01)  # polling interval, not a synchronisation delay
    raise RuntimeError(f"anvil did not answer on {url} within {STARTUP_DEADLINE_S}s")


def _dev_keys(count: int) -> list[str]:
    Account.enable_unaudited_hdwallet_features()
    return [
        Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key.hex()
        for i in range(count)
    ]


@pytest.fixture(scope="session")
def anvil() -> Iterator[AnvilNode]:
    binary = _anvil_binary()
    if binary is None:
        pytest.skip("anvil is not installed: run `npm ci` in the repository root")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="blf-anvil-") as tmp:
        log_path = Path(tmp) / "anvil.log"
        with log_path.open("wb") as log_file:
            started = time.monotonic()
            process = subprocess.Popen(
                [
                    str(binary),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--chain-id",
                    str(ANVIL_CHAIN_ID),
                    "--accounts",
                    str(DEV_ACCOUNTS),
                    "--mnemonic",
                    DEV_MNEMONIC,
                    "--quiet",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_until_answering(url, process, log_path)
                startup_s = time.monotonic() - started
                yield AnvilNode(
                    url=url,
                    chain_id=ANVIL_CHAIN_ID,
                    private_keys=_dev_keys(DEV_ACCOUNTS),
                    process=process,
                    startup_s=startup_s,
                )
            finally:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="session")
def registry_artifact() -> dict[str, Any]:
    if not REGISTRY_ARTIFACT.is_file():
        pytest.skip(f"NodeRegistry artifact not found at {REGISTRY_ARTIFACT} (../shared absent)")
    artifact: dict[str, Any] = json.loads(REGISTRY_ARTIFACT.read_text())
    return artifact


def _creation_code(artifact: dict[str, Any]) -> str:
    bytecode = artifact["bytecode"]
    # Foundry writes {"object": "0x…"}, Hardhat a bare string.
    return str(bytecode["object"] if isinstance(bytecode, dict) else bytecode)


@pytest.fixture
def registry(anvil: AnvilNode, registry_artifact: dict[str, Any]) -> Iterator[str]:
    """Address of a NodeRegistry deployed for this test alone (grace 300 s, minStake 0).

    The chain is snapshotted first and reverted afterwards, so time jumps, automine
    changes and balances spent in one test do not leak into the next.
    """
    from web3 import Web3

    snapshot = anvil.rpc("evm_snapshot")
    try:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        deployer = anvil.accounts[0]
        contract = w3.eth.contract(
            abi=registry_artifact["abi"], bytecode=_creation_code(registry_artifact)
        )
        tx = contract.constructor().build_transaction(
            {"from": deployer.address, "nonce": w3.eth.get_transaction_count(deployer.address)}
        )
        tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        assert receipt["status"] == 1, "NodeRegistry deployment reverted"
        yield str(receipt["contractAddress"])
    finally:
        anvil.rpc("evm_setAutomine", True)
        anvil.rpc("evm_revert", snapshot)


@pytest.fixture
def make_unfunded_account() -> Callable[[], LocalAccount]:
    """Factory of brand-new keys holding no ETH."""

    def make() -> LocalAccount:
        account: LocalAccount = Account.create()
        return account

    return make


@pytest.fixture
def make_chain_client(anvil: AnvilNode, registry: str) -> Callable[..., Any]:
    """Factory: `make_chain_client(account=None, **options)` → ChainClient on `registry`."""
    from blf.chain import ChainClient

    def make(account: LocalAccount | None = None, **options: Any) -> ChainClient:
        options.setdefault("chain_id", anvil.chain_id)
        options.setdefault("receipt_timeout_s", 30.0)
        return ChainClient(anvil.url, registry_address=registry, account=account, **options)

    return make


def _artifact(path: Path) -> dict[str, Any]:
    if not path.is_file():
        pytest.skip(f"{path.stem} artifact not found at {path} (../shared absent)")
    artifact: dict[str, Any] = json.loads(path.read_text())
    return artifact


def deploy(anvil: AnvilNode, artifact: dict[str, Any], *args: Any) -> tuple[str, int]:
    """Deploy `artifact` from anvil's account 0; returns its address and the gas used."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil.url))
    deployer = anvil.accounts[0]
    contract = w3.eth.contract(abi=artifact["abi"], bytecode=_creation_code(artifact))
    tx = contract.constructor(*args).build_transaction(
        {"from": deployer.address, "nonce": w3.eth.get_transaction_count(deployer.address)}
    )
    tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    assert receipt["status"] == 1, f"{artifact.get('contractName')} deployment reverted"
    return str(receipt["contractAddress"]), int(receipt["gasUsed"])


@dataclass
class StakingDeployment:
    """BLIND and BlindferenceStaking, deployed for one test; account 0 owns the token."""

    anvil: AnvilNode
    token: str
    staking: str
    token_abi: list[dict[str, Any]] = field(repr=False)
    deploy_gas: dict[str, int] = field(default_factory=dict)

    def mint(self, to: str, amount: int) -> None:
        """Owner-only `mint(to, amount)`, sent by account 0."""
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(self.anvil.url))
        owner = self.anvil.accounts[0]
        token = w3.eth.contract(address=Web3.to_checksum_address(self.token), abi=self.token_abi)
        tx: Any = token.functions.mint(Web3.to_checksum_address(to), amount).build_transaction(
            {"from": owner.address, "nonce": w3.eth.get_transaction_count(owner.address)}
        )
        tx_hash = w3.eth.send_raw_transaction(owner.sign_transaction(tx).raw_transaction)
        assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"] == 1

    def token_balance(self, address: str) -> int:
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(self.anvil.url))
        token = w3.eth.contract(address=Web3.to_checksum_address(self.token), abi=self.token_abi)
        return int(token.functions.balanceOf(Web3.to_checksum_address(address)).call())


@pytest.fixture
def staking(anvil: AnvilNode, registry: str) -> StakingDeployment:
    """BLIND (owner: account 0) and BlindferenceStaking on it, real bytecode, for this test.

    Built on `registry`, whose snapshot is reverted afterwards, so nothing leaks out.
    """
    blind = _artifact(BLIND_ARTIFACT)
    staking_artifact = _artifact(STAKING_ARTIFACT)
    owner = anvil.accounts[0].address
    token, token_gas = deploy(anvil, blind, owner)
    contract, staking_gas = deploy(anvil, staking_artifact, token, owner)
    return StakingDeployment(
        anvil=anvil,
        token=token,
        staking=contract,
        token_abi=blind["abi"],
        deploy_gas={"BLIND": token_gas, "BlindferenceStaking": staking_gas},
    )
