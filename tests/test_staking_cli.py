"""`blindference-node staking ...` and `balance` against a real anvil running the real BLIND
and BlindferenceStaking bytecode, on node directories made by the real `init`."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from blf.chain import StakingClient
from blf.errors import ChainError
from blf.wallet import load_account
from tests.fixtures_chain import AnvilNode, StakingDeployment
from tests.nodes import PASSWORD, NodeDir, closed_port_url, error_line, make_node

BLIND = 10**18
OPERATOR_KEY_INDEX = 1
UNBONDING = 345600


@pytest.fixture
def node(tmp_path: Path, anvil: AnvilNode, registry: str, staking: StakingDeployment) -> NodeDir:
    made = make_node(
        "http://127.0.0.1:9",
        root=tmp_path / "node",
        attest=False,
        private_key=anvil.private_keys[OPERATOR_KEY_INDEX],
        rpc_url=anvil.url,
        chain_id=anvil.chain_id,
        node_registry_address=registry,
        staking_address=staking.staking,
    )
    staking.mint(made.address, 5000 * BLIND)
    return made


def _nonce(anvil: AnvilNode, address: str) -> int:
    return int(anvil.rpc("eth_getTransactionCount", address, "pending"), 16)


def _rows(result: Result) -> dict[str, str]:
    rows = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition("  ")
        if value.strip():
            rows[name.strip()] = value.strip()
    return rows


def _gas(result: Result) -> list[int]:
    return [int(n) for n in re.findall(r"Gas used: (\d+)", result.stdout)]


def _ok(node: NodeDir, *args: str) -> Result:
    result = node.invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _client(node: NodeDir, anvil: AnvilNode, **options: Any) -> StakingClient:
    account = load_account(node.root / "keystore.json", PASSWORD)
    return StakingClient(
        anvil.url,
        chain_id=anvil.chain_id,
        staking_address=node.config()["staking_address"],
        account=account,
        nonce_lock_path=node.root / "nonce.lock",
        pending_path=node.root / "pending-tx.json",
        **options,
    )


def _approve(client: StakingClient, staking: StakingDeployment, amount: int) -> None:
    """An ERC-20 approve sent outside `stake` (as another wallet or an earlier run would)."""
    client._transact(client._token(), "BLIND", "approve", (staking.staking, amount), value=0)


def test_stake_unstake_withdraw_with_balances(
    node: NodeDir, anvil: AnvilNode, staking: StakingDeployment
) -> None:
    gas: dict[str, list[int]] = {}
    before = json.loads(_ok(node, "balance", "--json").stdout)
    assert before["blind"] == "5000" and before["token_address"] == staking.token
    assert float(before["eth"]) > 1000

    status = _ok(node, "staking", "status")
    rows = _rows(status)
    assert rows["Staked"] == "0 BLIND" and rows["Stake active"] == "no"
    assert rows["Min stake"] == "1000 BLIND" and rows["Failures"] == "0 of 3 consecutive"
    assert "Not staked. Stake with: blindference-node staking stake 1000" in status.stdout

    first = _ok(node, "staking", "stake", "1e3")
    gas["approve + first stake"] = _gas(first)
    assert "Approved 1000 BLIND" in first.stdout
    assert "Staked: 1000 BLIND in total, active" in first.stdout
    assert len(gas["approve + first stake"]) == 2

    # An allowance that already covers the next stake: no approve is sent.
    _approve(_client(node, anvil), staking, 1000 * BLIND)
    nonce = _nonce(anvil, node.address)
    second = json.loads(_ok(node, "staking", "stake", "1000", "--json").stdout)
    assert second["approve"] is None and second["stake"]["nonce"] == nonce
    assert _nonce(anvil, node.address) == nonce + 1
    assert second["staked_blind"] == "2000" and second["active"] is True
    gas["second stake"] = [second["stake"]["gas_used"]]

    middle = json.loads(_ok(node, "balance", "--json").stdout)
    assert middle["blind"] == "3000"
    assert int(middle["eth_wei"]) < int(before["eth_wei"])
    assert json.loads(_ok(node, "staking", "status", "--json").stdout)["active"] is True

    unstaked = _ok(node, "staking", "unstake")
    gas["unstake"] = _gas(unstaked)
    assert "Unstaking 2000 BLIND" in unstaked.stdout
    assert "(in 4d 0h)" in unstaked.stdout  # UNBONDING_PERIOD, read from the contract
    rows = _rows(_ok(node, "staking", "status"))
    assert rows["Stake active"] == "no" and rows["Staked"] == "0 BLIND"
    assert rows["Unbonding"].startswith("2000 BLIND, unlocks")

    nonce = _nonce(anvil, node.address)
    early = node.invoke("staking", "withdraw")
    assert early.exit_code == 1
    line = error_line(early)
    assert "2000 BLIND unlock" in line and "in 4d 0h" in line and "nothing sent" in line
    assert _nonce(anvil, node.address) == nonce

    anvil.increase_time(UNBONDING)
    assert "withdrawable now" in _rows(_ok(node, "staking", "status"))["Unbonding"]
    withdrawn = _ok(node, "staking", "withdraw")
    gas["withdraw"] = _gas(withdrawn)
    assert "Withdrew 2000 BLIND" in withdrawn.stdout

    after = json.loads(_ok(node, "balance", "--json").stdout)
    assert after["blind"] == "5000"
    assert int(after["eth_wei"]) < int(middle["eth_wei"])
    print(f"gas used on anvil: {gas}; deploy: {staking.deploy_gas}")


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [
        ("999.999", "below the staking contract's MIN_STAKE of 1000 BLIND"),
        ("1000.0000000000000000001", "more decimals than BLIND's 18"),
        ("-5", "must be positive"),
        ("0", "must be positive"),
        ("lots", "not an amount of BLIND"),
        ("6000", "holds 5000 BLIND"),
    ],
)
def test_bad_amounts_are_refused_before_sending(
    node: NodeDir, anvil: AnvilNode, amount: str, fragment: str
) -> None:
    result = node.invoke("staking", "stake", amount)
    assert result.exit_code == 1, result.output
    assert fragment in error_line(result)
    assert _nonce(anvil, node.address) == 0


def test_unstake_and_withdraw_with_nothing_staked(node: NodeDir, anvil: AnvilNode) -> None:
    assert "nothing staked" in error_line(node.invoke("staking", "unstake"))
    assert "nothing unbonding" in error_line(node.invoke("staking", "withdraw"))
    assert _nonce(anvil, node.address) == 0


def test_wrong_chain_id_is_refused_by_every_command(node: NodeDir, anvil: AnvilNode) -> None:
    node.set_config(chain_id=1)
    commands = [
        ("balance",),
        ("staking", "status"),
        ("staking", "stake", "1000"),
        ("staking", "unstake"),
        ("staking", "withdraw"),
    ]
    for args in commands:
        line = error_line(node.invoke(*args))
        assert f"serves chain id {anvil.chain_id}" in line and "chain id 1 is" in line
    assert _nonce(anvil, node.address) == 0


def test_a_dropped_stake_is_resumed_by_the_command_not_doubled(
    node: NodeDir, anvil: AnvilNode, staking: StakingDeployment
) -> None:
    _ok(node, "staking", "stake", "1000")
    impatient = _client(node, anvil, receipt_timeout_s=0.2)
    _approve(impatient, staking, 1000 * BLIND)
    anvil.set_automine(False)
    try:
        with pytest.raises(ChainError, match="rerun to resume it"):
            impatient.stake(1000 * BLIND)
        anvil.rpc("anvil_dropAllTransactions")
    finally:
        anvil.set_automine(True)
    nonce = _nonce(anvil, node.address)

    retried = json.loads(_ok(node, "staking", "stake", "1000", "--json").stdout)

    assert retried["stake"]["nonce"] == nonce
    assert retried["staked_blind"] == "2000"  # the first stake plus the resent one, once
    assert _nonce(anvil, node.address) == nonce + 1


def test_token_address_in_config_is_checked_against_the_contract(
    node: NodeDir, staking: StakingDeployment
) -> None:
    quiet = _ok(node, "staking", "status")  # the field unset: the default is not compared
    assert "blind_token_address" not in quiet.stderr

    node.set_config(blind_token_address="0x" + "33" * 20)
    warned = _ok(node, "balance")
    assert "blind_token_address 0x3333" in warned.stderr and staking.token in warned.stderr
    assert f"(token {staking.token})" in warned.stdout
    assert node.config()["blind_token_address"] == "0x" + "33" * 20  # kept as it is

    node.set_config(blind_token_address=staking.token.lower())
    assert "blind_token_address" not in _ok(node, "staking", "status").stderr


def test_chain_status_and_status_show_the_stake(node: NodeDir) -> None:
    _ok(node, "staking", "stake", "1000.5")

    rows = _rows(_ok(node, "chain", "status"))
    assert rows["Staked"] == "1000.5 BLIND"
    assert rows["Failures"] == "0 of 3 consecutive"
    assert rows["Stake active"] == "yes"
    assert rows["Unbonding"] == "none"

    status = _ok(node, "status")
    stake_line = next(line for line in status.stdout.splitlines() if line.startswith("Stake "))
    assert stake_line.split(None, 1)[1] == "1000.5 BLIND staked, active"


def test_no_staking_contract_is_one_line_not_a_crash(node: NodeDir) -> None:
    missing = "0x" + "12" * 20
    node.set_config(staking_address=missing)

    line = error_line(node.invoke("staking", "status"))
    assert f"no BlindferenceStaking at {missing}" in line and "staking_address" in line

    chain_rows = _rows(_ok(node, "chain", "status"))
    assert chain_rows["Registered"] == "no"
    assert chain_rows["Staking"].startswith(f"cannot read: no BlindferenceStaking at {missing}")
    status = _ok(node, "status")
    assert "Stake    cannot read: no BlindferenceStaking" in status.stdout


def _supervisor(node: NodeDir) -> Any:
    from blf.config import load_config
    from blf.node import open_node
    from blf.supervisor import Supervisor

    loaded = load_config(node.config_path)
    return Supervisor(node=open_node(loaded, password=PASSWORD))


def _start_warnings(node: NodeDir, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blf.node"):
        _supervisor(node)._warn_if_unstaked()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_run_warns_at_start_without_an_active_stake(
    node: NodeDir, caplog: pytest.LogCaptureFixture
) -> None:
    warnings = _start_warnings(node, caplog)
    assert len(warnings) == 1
    assert "No active BLIND stake" in warnings[0]
    assert "staking stake 1000" in warnings[0]

    _ok(node, "staking", "stake", "1000")
    assert _start_warnings(node, caplog) == []

    node.set_config(rpc_url=closed_port_url())
    warnings = _start_warnings(node, caplog)
    assert len(warnings) == 1 and warnings[0].startswith("Could not check the BLIND stake")
    assert "\n" not in warnings[0]

    node.set_config(rpc_url=None)
    assert _start_warnings(node, caplog) == []
