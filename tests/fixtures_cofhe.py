"""Pytest plugin: Fhenix's CoFHE mock contracts on the tests' anvil, for the SDK bridge.

The SDK (``@cofhe/sdk``) switches to its mocks on chain id 31337: it encrypts through
``MockZkVerifier`` at 0x…5001 and decrypts through ``MockQueryDecrypter`` at 0x…5002, with
the ``TaskManager`` at its network address and an ``ACL`` it finds through it. Hardhat's
plugin installs them with ``hardhat_setCode``; this does the same with anvil's
``anvil_setCode``, from the mocks' own sources (npm ``@fhenixprotocol/cofhe-mock-contracts``,
pinned in package.json) compiled with solc-js, plus ``KeyVault`` (tests/cofhe_mocks), which
stands in for the network's PromptKeyStore. The compiled artifacts are cached by the hash of
their sources, so only the first session pays for solc (about 6 s here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from tests.fixtures_chain import REPO_ROOT, AnvilNode, deploy

MODULES = REPO_ROOT / "node_modules"
HERE = Path(__file__).with_name("cofhe_mocks")
TASK_MANAGER = "0xeA30c4B8b44078Bbf8a6ef5b9f1eC1626C7848D9"
ZK_VERIFIER = "0x0000000000000000000000000000000000005001"
QUERY_DECRYPTER = "0x0000000000000000000000000000000000005002"
ZK_SIGNER = "0x6E12D8C87503D4287c294f2Fdef96ACd9DFf6bd2"  # the SDK's public mock signer
MOCK_SOURCES = ("ACL.sol", "MockTaskManager.sol", "MockZkVerifier.sol", "MockQueryDecrypter.sol")


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in [HERE / "build.mjs", HERE / "KeyVault.sol", *sorted(HERE.glob("shim/**/*.sol"))]:
        digest.update(path.read_bytes())
    package = MODULES / "@fhenixprotocol" / "cofhe-mock-contracts"
    for name in MOCK_SOURCES:
        digest.update((package / name).read_bytes())
    digest.update((MODULES / "solc" / "package.json").read_bytes())
    return digest.hexdigest()[:16]


def _compiled() -> dict[str, Any]:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: the CoFHE SDK bridge needs it")
    for needed in ("@cofhe/sdk", "@fhenixprotocol/cofhe-mock-contracts", "solc"):
        if not (MODULES / needed / "package.json").is_file():
            pytest.skip(f"{needed} is not installed: run `npm ci` in the repository root")
    cache = MODULES / ".cache" / "blf-cofhe-mocks" / f"{_sources_digest()}.json"
    if cache.is_file():
        cached: dict[str, Any] = json.loads(cache.read_text())
        return cached
    built = subprocess.run(
        ["node", str(HERE / "build.mjs"), str(MODULES)],
        capture_output=True,
        check=False,
        timeout=300,
    )
    if built.returncode != 0:
        raise RuntimeError(f"compiling the CoFHE mocks failed: {built.stderr.decode()[-2000:]}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: another test process may be reading it.
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(built.stdout)
    os.replace(partial, cache)
    artifacts: dict[str, Any] = json.loads(built.stdout)
    return artifacts


@dataclass
class CofheMocks:
    """The mocks installed on ``anvil``; ``vault`` is a fresh KeyVault."""

    anvil: AnvilNode
    artifacts: dict[str, Any] = field(repr=False)
    acl: str
    vault: str

    def store(self, sender: LocalAccount, high: Any, low: Any, reader: str) -> tuple[int, int]:
        """``sender`` stores two encrypted halves for ``reader``; the handles it may read."""
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(self.anvil.url))
        vault = w3.eth.contract(address=self.vault, abi=self.artifacts["KeyVault"]["abi"])
        call = vault.functions.store(_in(high), _in(low), Web3.to_checksum_address(reader))
        tx = call.build_transaction(
            {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address)}
        )
        tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
        assert receipt["status"] == 1, "KeyVault.store reverted"
        event = vault.events.Stored().process_receipt(receipt)[0]["args"]
        return int(event["high"]), int(event["low"])


def _in(value: Any) -> tuple[int, int, int, bytes]:
    """An EncryptedValue as the contracts' InEuint128 tuple."""
    return (
        value.ct_hash,
        value.security_zone,
        value.utype,
        bytes.fromhex(value.signature.removeprefix("0x")),
    )


def _send(anvil: AnvilNode, address: str, abi: list[Any], name: str, *args: Any) -> None:
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil.url))
    owner = anvil.accounts[0]
    contract = w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)
    tx = getattr(contract.functions, name)(*args).build_transaction(
        {"from": owner.address, "nonce": w3.eth.get_transaction_count(owner.address)}
    )
    tx_hash = w3.eth.send_raw_transaction(owner.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    assert receipt["status"] == 1, f"{name} reverted"


@pytest.fixture(scope="session")
def cofhe_mock_artifacts() -> dict[str, Any]:
    return _compiled()


@pytest.fixture(scope="session")
def cofhe_mocks(anvil: AnvilNode, cofhe_mock_artifacts: dict[str, Any]) -> CofheMocks:
    """Installed once per session, as the SDK expects them, with signature checks on."""
    art = cofhe_mock_artifacts
    owner = anvil.accounts[0].address
    anvil.rpc("anvil_setCode", TASK_MANAGER, art["TaskManager"]["deployedBytecode"])
    _send(anvil, TASK_MANAGER, art["TaskManager"]["abi"], "initialize", owner)
    _send(anvil, TASK_MANAGER, art["TaskManager"]["abi"], "setSecurityZones", 0, 0)
    _send(anvil, TASK_MANAGER, art["TaskManager"]["abi"], "setVerifierSigner", ZK_SIGNER)
    acl, _ = deploy(anvil, art["ACL"], owner)
    _send(anvil, TASK_MANAGER, art["TaskManager"]["abi"], "setACLContract", acl)
    anvil.rpc("anvil_setCode", ZK_VERIFIER, art["MockZkVerifier"]["deployedBytecode"])
    anvil.rpc("anvil_setCode", QUERY_DECRYPTER, art["MockQueryDecrypter"]["deployedBytecode"])
    _send(anvil, QUERY_DECRYPTER, art["MockQueryDecrypter"]["abi"], "initialize", TASK_MANAGER, acl)
    # The SDK's mock signer sends the transactions that record mock ciphertexts.
    anvil.rpc("anvil_setBalance", ZK_SIGNER, hex(10**20))
    vault, _ = deploy(anvil, art["KeyVault"])
    return CofheMocks(anvil=anvil, artifacts=art, acl=acl, vault=vault)
