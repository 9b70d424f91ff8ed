"""cofhe_mode "bridge": Fhenix's @cofhe/sdk in a Node.js helper, the key kept in Python.

The real CoFHE network cannot be reached from here; the SDK runs for real against Fhenix's
mock contracts on anvil (chain id 31337, where the SDK uses its mocks), so a prompt key's
halves go user → SDK encrypt → chain → SDK decrypt for the node, and an output key back.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from blf.cofhe_bridge import BridgeCofhe, BridgeHelper, PermitSigner, find_modules, find_node
from blf.errors import CofheRefusedError, CofheTransportError
from tests.fixtures_chain import AnvilNode
from tests.fixtures_cofhe import CofheMocks


def _bridge(
    anvil: AnvilNode, account: LocalAccount, home: Path, *, signer: Any = None, **kw: Any
) -> BridgeCofhe:
    helper = BridgeHelper(
        modules=find_modules(None),
        home=home,
        node=find_node("node"),
        signer=signer or PermitSigner(account, anvil.chain_id),
        timeout=kw.pop("timeout", 30.0),
    )
    return BridgeCofhe(
        helper,
        rpc_url=kw.pop("rpc_url", anvil.url),
        chain_id=kw.pop("chain_id", anvil.chain_id),
        address=account.address,
    )


@pytest.fixture
def user(anvil: AnvilNode) -> LocalAccount:
    return anvil.accounts[1]


@pytest.fixture
def node_account(anvil: AnvilNode) -> LocalAccount:
    return anvil.accounts[2]


@pytest.fixture
def node_bridge(
    anvil: AnvilNode, node_account: LocalAccount, tmp_path: Path, cofhe_mocks: CofheMocks
) -> Iterator[BridgeCofhe]:
    bridge = _bridge(anvil, node_account, tmp_path / "node")
    yield bridge
    bridge.close()


@pytest.fixture
def user_bridge(
    anvil: AnvilNode, user: LocalAccount, tmp_path: Path, cofhe_mocks: CofheMocks
) -> Iterator[BridgeCofhe]:
    bridge = _bridge(anvil, user, tmp_path / "user")
    yield bridge
    bridge.close()


def test_prompt_key_and_output_key_round_trip_through_the_sdk(
    cofhe_mocks: CofheMocks,
    user: LocalAccount,
    node_account: LocalAccount,
    user_bridge: BridgeCofhe,
    node_bridge: BridgeCofhe,
) -> None:
    key = secrets.token_bytes(32)
    high, low = int.from_bytes(key[:16], "big"), int.from_bytes(key[16:], "big")
    handles = cofhe_mocks.store(
        user, user_bridge.encrypt_uint128(high), user_bridge.encrypt_uint128(low), node_account.address
    )
    assert [node_bridge.decrypt(h) for h in handles] == [high, low]

    output_key = secrets.token_bytes(32)
    halves = [int.from_bytes(output_key[:16], "big"), int.from_bytes(output_key[16:], "big")]
    encrypted = [node_bridge.encrypt_uint128(v) for v in halves]
    assert all(e.utype == 6 and e.security_zone == 0 for e in encrypted)
    assert all(len(bytes.fromhex(e.signature[2:])) == 65 for e in encrypted)
    granted = cofhe_mocks.store(node_account, *encrypted, user.address)
    assert [user_bridge.decrypt(h) for h in granted] == halves
