"""The beat-scheduled on-chain heartbeat in real workers, on anvil with the real contract."""

from __future__ import annotations

import signal

from eth_account import Account

from blf.chain import ChainClient
from blf.devnet.icl import DevnetIcl
from tests.fixtures_chain import AnvilNode
from tests.nodes import Processes, make_node

INTERVAL_S = 3600


def test_one_onchain_heartbeat_across_worker_restarts(
    anvil: AnvilNode, registry: str, devnet: DevnetIcl, processes: Processes
) -> None:
    key = anvil.private_keys[2]
    node = make_node(
        devnet.url,
        private_key=key,
        rpc_url=anvil.url,
        chain_id=anvil.chain_id,
        node_registry_address=registry,
    )
    account = Account.from_key(key)
    chain = ChainClient(
        anvil.url, chain_id=anvil.chain_id, registry_address=registry, account=account
    )
    config = node.config()
    chain.register(
        tier=0,
        cert_hash=config["attestation_cert_hash"],
        expiry=config["attestation_expiry"],
        models=config["supported_model_ids"],
    )
    nonce_after_register = int(anvil.rpc("eth_getTransactionCount", account.address, "latest"), 16)
    anvil.increase_time(INTERVAL_S + 60)  # the registration's heartbeat is now overdue
    env = {
        "BLF_LOG_LEVEL": "DEBUG",
        "BLF_CHAIN_HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
        "BLF_CHAIN_HEARTBEAT_CHECK_S": "0.5",
        "BLF_HEARTBEAT_INTERVAL_S": "30",
    }
    for start in range(3):
        run = processes.start(node, "run", **env)
        if start == 0:
            run.wait_for("On-chain heartbeat sent")
        # Each start checks at least twice more and finds nothing due.
        run.wait_for("On-chain heartbeat not due", count=2)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.output()
        assert not run.lines("On-chain heartbeat sent") or start == 0
    nonce = int(anvil.rpc("eth_getTransactionCount", account.address, "latest"), 16)
    assert nonce == nonce_after_register + 1
    assert chain.is_active(account.address)
