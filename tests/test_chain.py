"""blf.chain against a real anvil running the real NodeRegistry bytecode."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from blf.chain import ChainClient, _send_error_kind
from blf.errors import (
    ChainError,
    ChainIdMismatchError,
    ContractRevertError,
    InsufficientFundsError,
)
from blf.redact import display_url
from tests.fixtures_chain import AnvilNode

CERT_HASH = "0x" + "ab" * 32
MODELS = ["qwen2.5-7b", "llama-3.1-8b"]

MakeClient = Callable[..., ChainClient]


def _expiry(client: ChainClient) -> int:
    return client.block_timestamp() + 7 * 24 * 3600


def _register(client: ChainClient, **overrides: Any) -> None:
    args: dict[str, Any] = {
        "tier": 1,
        "cert_hash": CERT_HASH,
        "expiry": _expiry(client),
        "models": MODELS,
    }
    args.update(overrides)
    client.register(**args)


def _nonce(anvil: AnvilNode, address: str) -> int:
    return int(anvil.rpc("eth_getTransactionCount", address, "pending"), 16)


def _wait_for(predicate: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Poll a condition the test cannot be told about (another thread reaching the pool)."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def operator(anvil: AnvilNode) -> LocalAccount:
    return anvil.accounts[1]


@pytest.fixture
def client(make_chain_client: MakeClient, operator: LocalAccount) -> ChainClient:
    return make_chain_client(operator)


@pytest.fixture
def manual_mining(anvil: AnvilNode) -> Iterator[None]:
    anvil.set_automine(False)
    try:
        yield
    finally:
        anvil.set_automine(True)


def test_fresh_registry_reads_from_contract(client: ChainClient, operator: LocalAccount) -> None:
    assert client.heartbeat_grace_seconds() == 300
    assert client.min_stake() == 0
    node = client.get_node(operator.address)
    assert not node.registered
    assert node.attestation_hash == "0x" + "00" * 32
    assert client.is_active(operator.address) is False


def test_register_records_the_node(
    client: ChainClient,
    operator: LocalAccount,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expiry = _expiry(client)
    with caplog.at_level(logging.DEBUG):
        tx = client.register(tier=1, cert_hash=CERT_HASH, expiry=expiry, models=MODELS)

    assert tx.tx_hash.startswith("0x")
    assert tx.gas_used > 0
    node = client.get_node(operator.address)
    assert node.registered
    assert node.operator == operator.address
    assert (node.tier, node.attestation_hash, node.attestation_expires) == (1, CERT_HASH, expiry)
    assert node.models == MODELS
    assert node.active
    assert client.is_active(operator.address)
    status = client.node_status(operator.address)
    assert status.is_active and status.heartbeat_grace_seconds == 300
    assert status.balance_wei > 0
    assert "Mined NodeRegistry.register" in caplog.text
    assert operator.key.hex().removeprefix("0x") not in caplog.text


def test_short_cert_hash_is_left_padded(client: ChainClient, operator: LocalAccount) -> None:
    _register(client, cert_hash="0xabc")
    assert client.get_node(operator.address).attestation_hash == "0x" + "0" * 61 + "abc"


def test_bad_cert_hash_is_refused_before_sending(
    anvil: AnvilNode, client: ChainClient, operator: LocalAccount
) -> None:
    before = _nonce(anvil, operator.address)
    for bad in ("0xzz", "0x" + "00" * 33, ""):
        with pytest.raises(ChainError, match="attestation hash"):
            _register(client, cert_hash=bad)
    assert _nonce(anvil, operator.address) == before


def test_double_register_reverts_with_decoded_reason(
    anvil: AnvilNode, client: ChainClient, operator: LocalAccount
) -> None:
    _register(client)
    before = _nonce(anvil, operator.address)
    with pytest.raises(ContractRevertError) as caught:
        _register(client)
    assert caught.value.reason == "NodeRegistry: already registered"
    assert "already registered" in str(caught.value)
    assert _nonce(anvil, operator.address) == before, "a reverting estimate must not send"


def test_heartbeat_if_due_sends_once_then_skips_until_due(
    anvil: AnvilNode, client: ChainClient
) -> None:
    _register(client)
    interval, margin = 100, 10

    anvil.increase_time(interval - margin)
    first = client.heartbeat_if_due(interval_s=interval, margin_s=margin)
    assert first.status == "sent"
    assert first.tx is not None

    second = client.heartbeat_if_due(interval_s=interval, margin_s=margin)
    assert second.status == "skipped"
    assert second.tx is None
    assert second.seconds_until_due is not None
    assert 0 < second.seconds_until_due <= interval - margin

    anvil.increase_time(second.seconds_until_due)
    third = client.heartbeat_if_due(interval_s=interval, margin_s=margin)
    assert third.status == "sent"
    assert third.tx is not None and third.tx.nonce == first.tx.nonce + 1


def test_grace_lapse_makes_inactive_and_heartbeat_restores(
    anvil: AnvilNode, client: ChainClient, operator: LocalAccount
) -> None:
    _register(client)
    grace = client.heartbeat_grace_seconds()
    assert client.is_active(operator.address)

    anvil.increase_time(grace + 1)
    assert not client.is_active(operator.address)

    outcome = client.heartbeat_if_due(interval_s=grace, margin_s=0)
    assert outcome.status == "sent"
    assert client.is_active(operator.address)


def test_wrong_chain_id_is_refused_before_any_transaction(
    anvil: AnvilNode, make_chain_client: MakeClient, operator: LocalAccount
) -> None:
    client = make_chain_client(operator, chain_id=421614)
    before = _nonce(anvil, operator.address)
    with pytest.raises(ChainIdMismatchError) as caught:
        client.register(tier=0, cert_hash=CERT_HASH, expiry=2**40, models=MODELS)
    assert "421614" in str(caught.value) and str(anvil.chain_id) in str(caught.value)
    with pytest.raises(ChainIdMismatchError):
        client.heartbeat()
    with pytest.raises(ChainIdMismatchError):
        client.get_node(operator.address)
    assert _nonce(anvil, operator.address) == before


def test_unfunded_account_gets_insufficient_funds_naming_it(
    anvil: AnvilNode,
    make_chain_client: MakeClient,
    make_unfunded_account: Callable[[], LocalAccount],
) -> None:
    poor = make_unfunded_account()
    client = make_chain_client(poor)
    with pytest.raises(InsufficientFundsError) as caught:
        _register(client)
    assert caught.value.address == poor.address
    message = str(caught.value)
    assert poor.address in message and "\n" not in message
    assert _nonce(anvil, poor.address) == 0


def test_heartbeat_when_not_registered_sends_nothing(
    anvil: AnvilNode,
    make_chain_client: MakeClient,
    make_unfunded_account: Callable[[], LocalAccount],
    operator: LocalAccount,
) -> None:
    for account in (make_unfunded_account(), operator):
        client = make_chain_client(account)
        before = _nonce(anvil, account.address)
        outcome = client.heartbeat_if_due(interval_s=100, margin_s=10)
        assert outcome.status == "not_registered"
        assert outcome.tx is None
        assert _nonce(anvil, account.address) == before


def test_direct_heartbeat_unregistered_reverts_with_reason(client: ChainClient) -> None:
    with pytest.raises(ContractRevertError) as caught:
        client.heartbeat()
    assert caught.value.reason == "NodeRegistry: node not found"


def test_two_clients_sharing_lock_get_distinct_nonces_in_flight(
    anvil: AnvilNode,
    make_chain_client: MakeClient,
    operator: LocalAccount,
    tmp_path: Path,
) -> None:
    lock = tmp_path / "nonce.lock"
    first, second = (make_chain_client(operator, nonce_lock_path=lock) for _ in range(2))
    _register(first)
    start = _nonce(anvil, operator.address)

    anvil.set_automine(False)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(c.heartbeat) for c in (first, second)]
            _wait_for(lambda: anvil.pending_count() == 2, "both heartbeats in the pool")
            anvil.rpc("evm_mine")
            results = [f.result(timeout=30) for f in futures]
    finally:
        anvil.set_automine(True)

    assert sorted(r.nonce for r in results) == [start, start + 1]
    assert len({r.block_number for r in results}) == 1
    assert lock.exists()


def test_receipt_revert_is_decoded_by_replay(
    anvil: AnvilNode, client: ChainClient, manual_mining: None
) -> None:
    # Both registrations pass estimation (neither is mined yet); the second fails on-chain.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures: list[Future[None]] = [pool.submit(_register, client) for _ in range(2)]
        _wait_for(lambda: anvil.pending_count() == 2, "both registrations in the pool")
        anvil.rpc("evm_mine")
        errors = [f.exception(timeout=30) for f in futures]

    assert errors.count(None) == 1
    revert = next(e for e in errors if e is not None)
    assert isinstance(revert, ContractRevertError)
    assert revert.reason == "NodeRegistry: already registered"
    assert "reverted in block" in str(revert)


def test_fee_cap_below_base_fee_is_refused(
    anvil: AnvilNode, make_chain_client: MakeClient, operator: LocalAccount
) -> None:
    base_fee = int(anvil.rpc("eth_getBlockByNumber", "latest", False)["baseFeePerGas"], 16)
    cap_gwei = float(Decimal(base_fee) / 2 / 10**9)
    client = make_chain_client(operator, max_fee_gwei=cap_gwei)
    before = _nonce(anvil, operator.address)
    with pytest.raises(ChainError, match="fees exceed the configured cap"):
        _register(client)
    assert _nonce(anvil, operator.address) == before


def test_max_fee_respects_cap(make_chain_client: MakeClient, operator: LocalAccount) -> None:
    quote = make_chain_client(operator).fee_quote()
    assert quote.max_fee == min(2 * quote.base_fee + quote.max_priority_fee, 50 * 10**9)


def test_unreachable_rpc_names_the_url() -> None:
    with socket.socket() as sock:
        # Bound but not listening: connections are refused, and nobody else gets the port.
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        client = ChainClient(url, chain_id=31337, registry_address="0x" + "11" * 20)
        with pytest.raises(ChainError) as caught:
            client.get_node("0x" + "22" * 20)
    assert url in str(caught.value)
    assert "\n" not in str(caught.value)


def test_send_error_classification() -> None:
    assert _send_error_kind("Insufficient funds for gas * price + value") == "funds"
    assert _send_error_kind("insufficient funds for gas * price + value: balance 0") == "funds"
    assert _send_error_kind("nonce too low") == "nonce"
    assert _send_error_kind("replacement transaction underpriced") == "nonce"
    assert _send_error_kind("already known") == "known"
    assert _send_error_kind("transaction already imported") == "known"
    assert _send_error_kind("intrinsic gas too low") == "other"


def test_display_url_hides_hosted_rpc_keys() -> None:
    shown = display_url("https://arb-sepolia.g.alchemy.com/v2/AbCdEfGhIjKlMnOpQrStUv")
    assert "AbCdEfGhIjKlMnOpQrStUv" not in shown
    assert shown.startswith("https://arb-sepolia.g.alchemy.com/v2/AbCd")
    assert display_url("http://user:pw@127.0.0.1:8545") == "http://127.0.0.1:8545"
