"""`blindference-node chain ...` and `attest --register-on-chain` against a real anvil running
the real NodeRegistry bytecode, with node directories attested by the devnet ICL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from web3 import Web3

from blf.chain import ChainClient
from blf.devnet.icl import DevnetIcl
from tests.fixtures_chain import AnvilNode
from tests.nodes import NodeDir

MODELS = ["qwen2.5-7b", "llama-3.1-8b"]
OPERATOR_KEY_INDEX = 1  # anvil's key 0 deploys the registry
MIN_STAKE_SLOT = "0x" + format(4, "064x")  # NodeRegistry.minStake's storage slot


def _init_node(
    root: Path,
    devnet: DevnetIcl,
    anvil: AnvilNode,
    registry: str,
    *,
    private_key: str | None,
    attest: bool = True,
    **config: Any,
) -> NodeDir:
    """A node made with the real CLI, its key imported (funded) or fresh (unfunded)."""
    node = NodeDir(root)
    env = {"BLF_PRIVATE_KEY": private_key} if private_key else {}
    result = node.invoke("init", "--models", ",".join(MODELS), "--icl", devnet.url, env=env)
    assert result.exit_code == 0, result.output
    node.address = node.config()["node_address"]
    fields: dict[str, Any] = {
        "rpc_url": anvil.url,
        "chain_id": anvil.chain_id,
        "node_registry_address": registry,
        "operator_note": "kept as is",  # a field blf does not know
    }
    fields.update(config)
    node.set_config(**fields)
    if attest:
        result = node.invoke("attest", "--mock")
        assert result.exit_code == 0, result.output
    return node


@pytest.fixture
def funded_node(tmp_path: Path, devnet: DevnetIcl, anvil: AnvilNode, registry: str) -> NodeDir:
    return _init_node(
        tmp_path / "node",
        devnet,
        anvil,
        registry,
        private_key=anvil.private_keys[OPERATOR_KEY_INDEX],
        # Short enough that a test can make a heartbeat due with evm_increaseTime.
        chain_heartbeat_interval_s=100,
        chain_heartbeat_check_s=5,
    )


@pytest.fixture
def reader(make_chain_client: Any) -> ChainClient:
    client: ChainClient = make_chain_client()
    return client


def _nonce(anvil: AnvilNode, address: str) -> int:
    return int(anvil.rpc("eth_getTransactionCount", address, "pending"), 16)


def _assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _status_rows(result: Result) -> dict[str, str]:
    rows = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("  ")
        if value.strip():
            rows[name.strip()] = value.strip()
    return rows


def _register(node: NodeDir) -> Result:
    result = node.invoke("chain", "register")
    assert result.exit_code == 0, result.output
    return result


# --- registration ------------------------------------------------------------------------


def test_attest_register_on_chain_registers_and_persists_flag(
    funded_node: NodeDir, reader: ChainClient, anvil: AnvilNode
) -> None:
    before = funded_node.config()
    assert before["registered_on_chain"] is False

    result = funded_node.invoke("attest", "--mock", "--register-on-chain")

    assert result.exit_code == 0, result.output
    after = funded_node.config()
    record = reader.get_node(funded_node.address)
    assert record.registered
    assert record.operator == funded_node.address
    assert record.tier == after["tier"] == 0
    assert record.attestation_hash == after["attestation_cert_hash"]
    assert record.attestation_expires == after["attestation_expiry"]
    assert record.models == MODELS
    assert record.stake == 0
    assert reader.is_active(funded_node.address)

    # The flag is set; the other fields are the file's own (the unknown one included), and
    # only the re-attestation's certificate fields changed.
    assert after["registered_on_chain"] is True
    assert after.keys() == before.keys()
    changed = {"registered_on_chain", "attestation_cert_hash", "attestation_expiry", "tier"}
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    assert after["operator_note"] == "kept as is"

    receipt = anvil.rpc("eth_getTransactionReceipt", _tx_hash(result))
    assert int(receipt["status"], 16) == 1
    assert f"Block   : {int(receipt['blockNumber'], 16)}" in result.output
    assert f"Gas used: {int(receipt['gasUsed'], 16)}" in result.output


def _tx_hash(result: Result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip().startswith("Tx ")]
    assert len(lines) == 1, result.output
    tx_hash = lines[0].split(":", 1)[1].strip()
    assert len(tx_hash) == 66 and tx_hash.startswith("0x")
    return tx_hash


def test_register_again_sends_nothing(funded_node: NodeDir, anvil: AnvilNode) -> None:
    _register(funded_node)
    nonce = _nonce(anvil, funded_node.address)
    # A stale flag is repaired from the chain, without a transaction.
    funded_node.set_config(registered_on_chain=False)

    result = funded_node.invoke("chain", "register")

    assert result.exit_code == 0, result.output
    assert "Already registered" in result.output
    assert "nothing sent" in result.output
    assert _nonce(anvil, funded_node.address) == nonce
    assert funded_node.config()["registered_on_chain"] is True


def test_register_uses_the_configured_stake_and_checks_min_stake(
    funded_node: NodeDir, anvil: AnvilNode, registry: str, reader: ChainClient
) -> None:
    # Deployed directly, the registry has no owner to call setMinStake: write its storage.
    min_stake = 10**16
    anvil.rpc("anvil_setStorageAt", registry, MIN_STAKE_SLOT, "0x" + format(min_stake, "064x"))
    assert reader.min_stake() == min_stake
    nonce = _nonce(anvil, funded_node.address)

    result = funded_node.invoke("chain", "register")

    _assert_one_line_error(result, "stake_amount_wei 0", f"minStake of {min_stake} wei")
    assert _nonce(anvil, funded_node.address) == nonce  # refused before sending

    result = funded_node.invoke("chain", "register", env={"BLF_STAKE_AMOUNT_WEI": str(min_stake)})

    assert result.exit_code == 0, result.output
    assert reader.get_node(funded_node.address).stake == min_stake
    # The environment override is not written into the file.
    assert "stake_amount_wei" not in funded_node.config()


def test_register_needs_an_attestation(
    tmp_path: Path, devnet: DevnetIcl, anvil: AnvilNode, registry: str
) -> None:
    node = _init_node(
        tmp_path / "node",
        devnet,
        anvil,
        registry,
        private_key=anvil.private_keys[OPERATOR_KEY_INDEX],
        attest=False,
    )

    result = node.invoke("chain", "register")

    _assert_one_line_error(result, "no attestation", "blindference-node attest --mock")


def test_unfunded_key_names_the_address_to_fund(
    tmp_path: Path, devnet: DevnetIcl, anvil: AnvilNode, registry: str, reader: ChainClient
) -> None:
    node = _init_node(tmp_path / "node", devnet, anvil, registry, private_key=None)

    result = node.invoke("attest", "--mock", "--register-on-chain")

    line = _assert_one_line_error(result, "insufficient funds", f"fund {node.address}")
    assert "0 ETH" in line
    assert node.config()["registered_on_chain"] is False
    assert not reader.get_node(node.address).registered
    assert _nonce(anvil, node.address) == 0


def test_no_rpc_url_says_how_to_set_it(
    tmp_path: Path, devnet: DevnetIcl, anvil: AnvilNode, registry: str
) -> None:
    node = _init_node(
        tmp_path / "node",
        devnet,
        anvil,
        registry,
        private_key=anvil.private_keys[OPERATOR_KEY_INDEX],
        rpc_url=None,
    )

    for args in (("chain", "register"), ("chain", "status"), ("chain", "heartbeat")):
        result = node.invoke(*args)
        _assert_one_line_error(
            result, "no rpc_url", "BLF_RPC_URL", "rpc_url", str(node.config_path)
        )

    result = node.invoke("attest", "--mock", "--register-on-chain")
    _assert_one_line_error(result, "no rpc_url", "BLF_RPC_URL")


def test_wrong_chain_id_names_both_ids(funded_node: NodeDir, anvil: AnvilNode) -> None:
    funded_node.set_config(chain_id=1)

    for args in (("chain", "register"), ("chain", "status"), ("chain", "heartbeat")):
        result = funded_node.invoke(*args)
        _assert_one_line_error(result, f"serves chain id {anvil.chain_id}", "chain id 1 is")
    assert _nonce(anvil, funded_node.address) == 0


def test_registry_address_without_contract_is_one_line_error(funded_node: NodeDir) -> None:
    funded_node.set_config(node_registry_address="0x" + "12" * 20)

    result = funded_node.invoke("chain", "status")

    _assert_one_line_error(result, "0x" + "12" * 20)


# --- status ------------------------------------------------------------------------------


def test_status_before_and_after_registration(
    funded_node: NodeDir, anvil: AnvilNode, registry: str
) -> None:
    # No password: status reads with the address from config.json alone.
    no_password = {"BLF_KEY_PASSWORD": None}  # type: ignore[dict-item]

    result = funded_node.invoke("chain", "status", env=no_password)

    assert result.exit_code == 0, result.output
    rows = _status_rows(result)
    assert rows["Chain id"] == str(anvil.chain_id)
    assert rows["Registry"] == Web3.to_checksum_address(registry)
    assert rows["Address"] == funded_node.address
    assert rows["Registered"] == "no"
    assert rows["Active"] == "no"
    assert rows["Grace"].startswith("300 s")
    assert rows["Balance"].endswith(" ETH") and float(rows["Balance"].split()[0]) > 1000
    assert "Register with: blindference-node attest --mock --register-on-chain" in result.output

    _register(funded_node)
    config = funded_node.config()

    result = funded_node.invoke("chain", "status", env=no_password)

    assert result.exit_code == 0, result.output
    rows = _status_rows(result)
    assert rows["Registered"] == "yes"
    assert rows["Active"] == "yes"
    assert rows["Tier"] == "0"
    assert rows["Attestation"] == config["attestation_cert_hash"]
    assert "(in " in rows["Att. expires"]
    assert rows["Models"] == ", ".join(MODELS)
    assert rows["Registered at"].endswith(("ago)", "(now)"))
    assert rows["Last heartbeat"] == rows["Registered at"]
    assert rows["Next heartbeat"].startswith("in ")
    assert "Register with" not in result.output


def test_status_flags_an_inactive_node(funded_node: NodeDir, anvil: AnvilNode) -> None:
    _register(funded_node)
    anvil.increase_time(301)  # past the registry's grace

    result = funded_node.invoke("chain", "status")

    assert result.exit_code == 0, result.output
    assert _status_rows(result)["Active"] == "no"
    assert "older than the grace" in result.output


# --- heartbeat ---------------------------------------------------------------------------


def test_heartbeat_sends_when_due_then_skips(
    funded_node: NodeDir, anvil: AnvilNode, reader: ChainClient
) -> None:
    _register(funded_node)
    registered_at = reader.get_node(funded_node.address).last_heartbeat
    anvil.increase_time(100 - 10)  # interval 100 s, margin 2 x 5 s

    first = funded_node.invoke("chain", "heartbeat")

    assert first.exit_code == 0, first.output
    assert "heartbeat sent" in first.output
    _tx_hash(first)
    assert reader.get_node(funded_node.address).last_heartbeat > registered_at
    nonce = _nonce(anvil, funded_node.address)

    second = funded_node.invoke("chain", "heartbeat")

    assert second.exit_code == 0, second.output
    assert "not due" in second.output and "--force" in second.output
    assert _nonce(anvil, funded_node.address) == nonce

    forced = funded_node.invoke("chain", "heartbeat", "--force")

    assert forced.exit_code == 0, forced.output
    assert "heartbeat sent" in forced.output
    assert _nonce(anvil, funded_node.address) == nonce + 1


def test_heartbeat_of_an_unregistered_node_points_to_register(funded_node: NodeDir) -> None:
    for args in (("chain", "heartbeat"), ("chain", "heartbeat", "--force")):
        result = funded_node.invoke(*args)
        _assert_one_line_error(result, "not registered", "--register-on-chain")
