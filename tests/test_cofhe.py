"""The CoFHE client over real HTTP: against the devnet CoFHE with real keys, and against a tiny
scripted server for the answers the devnet never gives (5xx, 4xx, HTML)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from eth_utils import keccak
from fastapi import FastAPI, Request
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st

from blf.cofhe import (
    UINT128_MAX,
    Cofhe,
    EncryptedValue,
    JsonRpcCofhe,
    make_permit,
    open_cofhe,
    recover_permit_signer,
    seal,
    unseal,
)
from blf.config import Settings
from blf.devnet.cofhe import (
    BAD_SIGNATURE,
    NOT_ALLOWED,
    PERMIT_EXPIRED,
    UNKNOWN_HANDLE,
    DevnetCofhe,
)
from blf.devnet.server import LocalServer
from blf.errors import CofheError, CofheRefusedError, CofheTransportError
from tests.nodes import closed_port_url

CHAIN_ID = 421614
DAY = 86400
SECRET = 0x0123456789ABCDEF0FEDCBA987654321  # distinctive, to look for in messages and logs


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cofhe() -> Iterator[DevnetCofhe]:
    with DevnetCofhe(chain_id=CHAIN_ID) as server:
        yield server


@pytest.fixture
def node() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account


@pytest.fixture
def make_client(node: LocalAccount) -> Iterator[Callable[..., JsonRpcCofhe]]:
    made: list[JsonRpcCofhe] = []

    def make(url: str, **options: Any) -> JsonRpcCofhe:
        options.setdefault("account", node)
        options.setdefault("chain_id", CHAIN_ID)
        options.setdefault("timeout", 5.0)
        client = JsonRpcCofhe(url, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def rpc(url: str, method: str, params: Any, request_id: Any = 7) -> dict[str, Any]:
    """A raw JSON-RPC call, for requests the client would never make."""
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    response = requests.post(url, json=body, timeout=5)
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


def assert_one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc)


# --------------------------------------------------------------------------- decryption


@pytest.mark.parametrize("value", [0, 1, UINT128_MAX], ids=["zero", "one", "max"])
def test_allowed_handle_decrypts_to_its_value(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe], value: int
) -> None:
    handle = cofhe.state.store(value, [node.address])
    assert make_client(cofhe.url).decrypt(handle) == value
    assert cofhe.state.decrypt_calls[(handle, node.address)] == 1


def test_handle_not_granted_is_refused_until_granted(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    someone_else = Account.create().address
    handle = cofhe.state.store(SECRET, [someone_else])
    client = make_client(cofhe.url)
    with pytest.raises(CofheRefusedError) as caught:
        client.decrypt(handle)
    message = str(caught.value)
    assert caught.value.code == NOT_ALLOWED
    assert f"{node.address} is not allowed to decrypt handle {hex(handle)}" in message
    assert "cofhe_decryptForView" in message and cofhe.url in message
    assert str(SECRET) not in message and hex(SECRET) not in message
    assert_one_line(caught.value)

    granted = requests.post(
        cofhe.url + "/admin/grant", json={"handle": hex(handle), "addresses": [node.address]}
    )
    assert granted.status_code == 200
    assert client.decrypt(handle) == SECRET


def test_unknown_handle_is_refused(
    cofhe: DevnetCofhe, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    with pytest.raises(CofheRefusedError) as caught:
        make_client(cofhe.url).decrypt(0xABC)
    assert caught.value.code == UNKNOWN_HANDLE
    assert "unknown handle 0xabc" in str(caught.value)


def test_permit_is_reused_across_calls_and_threads(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    handles = [cofhe.state.store(v, [node.address]) for v in range(8)]
    client = make_client(cofhe.url)
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(client.decrypt, handles * 3))
    assert values == list(range(8)) * 3
    assert len(cofhe.state.sealing_keys_seen) == 1
    assert sum(cofhe.state.sealing_keys_seen.values()) == 24


def test_permit_is_renewed_within_renew_before_of_expiry(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    clock = FakeClock()
    start = int(clock.now)
    client = make_client(cofhe.url, clock=clock, permit_ttl_s=2 * DAY, renew_before_s=3600)
    handle = cofhe.state.store(SECRET, [node.address])

    assert client.decrypt(handle) == SECRET
    first = client.permit()
    assert first.expiration == start + 2 * DAY

    clock.now = start + 2 * DAY - 3601  # a second before the renewal window
    assert client.decrypt(handle) == SECRET
    assert client.permit() is first
    assert len(cofhe.state.sealing_keys_seen) == 1

    clock.now = start + 2 * DAY - 3600  # the renewal window opens
    assert client.decrypt(handle) == SECRET
    renewed = client.permit()
    assert renewed is not first
    assert renewed.wire["sealingKey"] != first.wire["sealingKey"]
    assert renewed.expiration == start + 4 * DAY - 3600
    assert set(cofhe.state.sealing_keys_seen) == {
        first.wire["sealingKey"],
        renewed.wire["sealingKey"],
    }


def test_permit_expired_by_the_servers_clock_is_refused(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    handle = cofhe.state.store(SECRET, [node.address])
    behind = FakeClock(time.time() - 8 * DAY)  # the client thinks its 7-day permit is fresh
    with pytest.raises(CofheRefusedError) as caught:
        make_client(cofhe.url, clock=behind).decrypt(handle)
    assert caught.value.code == PERMIT_EXPIRED
    assert "permit expired" in str(caught.value)


def test_validly_signed_but_expired_permit_is_refused(
    cofhe: DevnetCofhe, node: LocalAccount
) -> None:
    handle = cofhe.state.store(SECRET, [node.address])
    key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    permit = make_permit(
        node, chain_id=CHAIN_ID, sealing_public_key=key, expiration=int(time.time()) - 1
    )
    answer = rpc(cofhe.url, "cofhe_decryptForView", [hex(handle), permit])
    assert answer["error"]["code"] == PERMIT_EXPIRED
    assert answer["id"] == 7


def test_forged_permits_are_refused(cofhe: DevnetCofhe, node: LocalAccount) -> None:
    handle = cofhe.state.store(SECRET, [node.address])
    key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    expiration = int(time.time()) + DAY
    by_other = make_permit(
        Account.create(), chain_id=CHAIN_ID, sealing_public_key=key, expiration=expiration
    )
    genuine = make_permit(node, chain_id=CHAIN_ID, sealing_public_key=key, expiration=expiration)
    other_chain = make_permit(node, chain_id=1, sealing_public_key=key, expiration=expiration)
    forgeries = [
        {**by_other, "issuer": node.address},  # signed by another key
        {**genuine, "expiration": expiration + 365 * DAY},  # expiration changed after signing
        {**genuine, "sealingKey": "0x" + "11" * 32},  # sealing key swapped
        other_chain,  # signed for another chain
        {**genuine, "signature": "0x1234"},  # not a signature at all
    ]
    for forged in forgeries:
        answer = rpc(cofhe.url, "cofhe_decryptForView", [hex(handle), forged])
        assert answer["error"]["code"] == BAD_SIGNATURE, forged
        assert "invalid permit signature" in answer["error"]["message"]
    assert cofhe.state.decrypt_calls[(handle, node.address)] == 0


def test_permit_signature_recovers_from_an_independent_eip712_hash(node: LocalAccount) -> None:
    sealing = bytes(range(32))
    expiration = 1_900_000_000
    permit = make_permit(node, chain_id=CHAIN_ID, sealing_public_key=sealing, expiration=expiration)
    assert set(permit) == {"issuer", "expiration", "sealingKey", "signature"}
    assert permit["issuer"] == node.address  # checksummed
    assert permit["expiration"] == expiration
    assert permit["sealingKey"] == "0x" + sealing.hex()

    # EIP-712, by hand: keccak(0x1901 ‖ domainSeparator ‖ hashStruct(permit)).
    domain_type = (
        b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    domain_separator = keccak(
        abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(domain_type), keccak(b"CoFHE"), keccak(b"1"), CHAIN_ID, "0x" + "00" * 20],
        )
    )
    permit_type = b"Permit(address issuer,uint256 expiration,bytes32 sealingKey)"
    struct_hash = keccak(
        abi_encode(
            ["bytes32", "address", "uint256", "bytes32"],
            [keccak(permit_type), node.address, expiration, sealing],
        )
    )
    digest = keccak(b"\x19\x01" + domain_separator + struct_hash)

    raw = bytes.fromhex(permit["signature"][2:])
    assert len(raw) == 65
    signature = keys.Signature(
        vrs=(raw[64] - 27, int.from_bytes(raw[:32]), int.from_bytes(raw[32:64]))
    )
    recovered = signature.recover_public_key_from_msg_hash(digest).to_checksum_address()
    assert recovered == node.address
    assert recover_permit_signer(permit, chain_id=CHAIN_ID) == node.address
    assert recover_permit_signer(permit, chain_id=1) != node.address


def test_make_permit_refuses_a_key_that_is_not_32_bytes(node: LocalAccount) -> None:
    # eth-account would right-pad a short bytes32 silently and sign something else.
    with pytest.raises(CofheError, match="32 bytes"):
        make_permit(node, chain_id=CHAIN_ID, sealing_public_key=b"\x01" * 31, expiration=1)
    with pytest.raises(CofheError, match="malformed permit"):
        recover_permit_signer(
            {"issuer": node.address, "expiration": 1, "sealingKey": "0x01", "signature": "0x"},
            chain_id=CHAIN_ID,
        )


# --------------------------------------------------------------------------- transient failures


def test_busy_answers_are_transient_until_used_up(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    handle = cofhe.state.store(SECRET, [node.address])
    client = make_client(cofhe.url)
    assert requests.post(cofhe.url + "/admin/busy", json={"count": 2}).status_code == 200
    for _ in range(2):
        with pytest.raises(CofheTransportError) as caught:
            client.decrypt(handle)
        assert "busy" in str(caught.value) and "cofhe_decryptForView" in str(caught.value)
        assert_one_line(caught.value)
    assert cofhe.state.busy_left == 0
    assert client.decrypt(handle) == SECRET


def test_busy_applies_to_encryption_too(
    cofhe: DevnetCofhe, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    cofhe.state.set_busy(1)
    client = make_client(cofhe.url)
    with pytest.raises(CofheTransportError, match="cofhe_encrypt"):
        client.encrypt_uint128(5)
    assert cofhe.state.encrypt_calls == 0
    assert cofhe.state.value_of(client.encrypt_uint128(5).ct_hash) == 5


def test_closed_port_is_transient(make_client: Callable[..., JsonRpcCofhe]) -> None:
    url = closed_port_url()
    with pytest.raises(CofheTransportError) as caught:
        make_client(url).decrypt(1)
    assert "unreachable" in str(caught.value) and url in str(caught.value)
    assert "cofhe_decryptForView" in str(caught.value)
    assert_one_line(caught.value)


@dataclass
class Reply:
    status: int
    body: str
    content_type: str = "application/json"


class Scripted(LocalServer):
    """A real HTTP server that answers every POST with ``reply``."""

    name = "scripted-cofhe"

    def __init__(self) -> None:
        self.reply = Reply(200, "{}")
        app = FastAPI()

        @app.post("/")
        async def answer(_request: Request) -> Response:
            return Response(
                self.reply.body, status_code=self.reply.status, media_type=self.reply.content_type
            )

        super().__init__(app)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    with Scripted() as server:
        yield server


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, "<html><body>502 Bad Gateway</body></html>", "text/html"),
        Reply(200, ""),
        Reply(200, json.dumps([1, 2])),
        Reply(200, json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"other": "0x00"}})),
        Reply(200, json.dumps({"jsonrpc": "2.0", "id": 999, "result": {"sealedValue": "0x"}})),
        Reply(500, "internal error", "text/plain"),
        Reply(503, "<html>unavailable</html>", "text/html"),
        Reply(429, "slow down", "text/plain"),
    ],
    ids=["html", "empty", "list", "wrong-result", "wrong-id", "500", "503", "429"],
)
def test_garbage_and_server_errors_are_transient(
    scripted: Scripted, make_client: Callable[..., JsonRpcCofhe], reply: Reply
) -> None:
    scripted.reply = reply
    with pytest.raises(CofheTransportError) as caught:
        make_client(scripted.url).decrypt(1)
    assert "cofhe_decryptForView" in str(caught.value) and scripted.url in str(caught.value)
    assert_one_line(caught.value)


def test_client_errors_are_refusals(
    scripted: Scripted, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    scripted.reply = Reply(403, "forbidden", "text/plain")
    with pytest.raises(CofheRefusedError) as caught:
        make_client(scripted.url).encrypt_uint128(1)
    assert caught.value.code == 403
    assert "cofhe_encrypt" in str(caught.value)


def test_other_json_rpc_errors_are_refusals_with_code_and_message(
    scripted: Scripted, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    error = {"code": -32000, "message": "execution\nreverted"}
    scripted.reply = Reply(200, json.dumps({"jsonrpc": "2.0", "id": 1, "error": error}))
    with pytest.raises(CofheRefusedError) as caught:
        make_client(scripted.url).decrypt(1)
    assert caught.value.code == -32000
    assert "-32000 execution reverted" in str(caught.value)
    assert_one_line(caught.value)


# --------------------------------------------------------------------------- encryption


def test_encrypt_uint128_stores_the_value_for_the_node(
    cofhe: DevnetCofhe, node: LocalAccount, make_client: Callable[..., JsonRpcCofhe]
) -> None:
    client = make_client(cofhe.url)
    encrypted = client.encrypt_uint128(UINT128_MAX)
    assert isinstance(encrypted, EncryptedValue)
    assert (encrypted.security_zone, encrypted.utype, encrypted.signature) == (0, 6, "0x")
    assert cofhe.state.value_of(encrypted.ct_hash) == UINT128_MAX
    assert cofhe.state.allowed(encrypted.ct_hash) == {node.address}
    assert cofhe.state.encrypt_calls == 1
    assert client.decrypt(encrypted.ct_hash) == UINT128_MAX


@pytest.mark.parametrize("value", [-SECRET, 2**128 + SECRET, True], ids=["neg", "big", "bool"])
def test_encrypt_refuses_non_uint128_before_sending(
    cofhe: DevnetCofhe, make_client: Callable[..., JsonRpcCofhe], value: int
) -> None:
    with pytest.raises(CofheError) as caught:
        make_client(cofhe.url).encrypt_uint128(value)
    assert not isinstance(caught.value, CofheTransportError | CofheRefusedError)
    if not isinstance(value, bool):
        assert str(abs(value)) not in str(caught.value)
        assert hex(abs(value)) not in str(caught.value)
    assert cofhe.state.encrypt_calls == 0


def test_plaintext_is_logged_only_at_debug(
    cofhe: DevnetCofhe,
    node: LocalAccount,
    make_client: Callable[..., JsonRpcCofhe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = cofhe.state.store(SECRET, [node.address])
    client = make_client(cofhe.url)
    with caplog.at_level(logging.DEBUG, logger="blf.cofhe"):
        client.decrypt(handle)
        client.encrypt_uint128(SECRET)
    private = client.permit().private_key.private_bytes_raw().hex()
    node_key = node.key.hex().removeprefix("0x")
    for record in caplog.records:
        text = record.getMessage()
        assert private not in text and node_key not in text
        if record.levelno > logging.DEBUG:
            assert str(SECRET) not in text and hex(SECRET) not in text
    assert any(str(SECRET) in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- sealing


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=UINT128_MAX))
def test_seal_unseal_round_trip(value: int) -> None:
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    sealed = seal(value, public)
    assert len(bytes.fromhex(sealed[2:])) == 32 + 12 + 16 + 16
    assert unseal(sealed, private) == value
    assert seal(value, public) != sealed  # a fresh ephemeral key and iv every time


@pytest.mark.parametrize("index", [0, 31, 32, 43, 44, 59, 60, 75], ids=lambda i: f"byte{i}")
def test_tampered_sealed_value_fails_authentication(index: int) -> None:
    private = X25519PrivateKey.generate()
    raw = bytearray.fromhex(seal(SECRET, private.public_key().public_bytes_raw())[2:])
    raw[index] ^= 0x01
    with pytest.raises(CofheRefusedError, match="fails authentication"):
        unseal("0x" + raw.hex(), private)


def test_unseal_with_another_key_or_malformed_input_fails() -> None:
    private = X25519PrivateKey.generate()
    sealed = seal(SECRET, private.public_key().public_bytes_raw())
    with pytest.raises(CofheRefusedError):
        unseal(sealed, X25519PrivateKey.generate())
    with pytest.raises(CofheError, match="shorter"):
        unseal(sealed[: 2 + 2 * 59], private)
    with pytest.raises(CofheError, match="not hex"):
        unseal("0xzz", private)
    with pytest.raises(CofheError, match="does not fit"):
        seal(2**128, private.public_key().public_bytes_raw())


# --------------------------------------------------------------------------- the devnet's own API


def test_devnet_json_rpc_errors_come_as_http_200(cofhe: DevnetCofhe) -> None:
    assert rpc(cofhe.url, "eth_chainId", [])["error"]["code"] == -32601
    assert rpc(cofhe.url, "cofhe_decryptForView", ["0x1"])["error"]["code"] == -32602
    bad_key = {"issuer": Account.create().address, "expiration": 1, "sealingKey": "0xzz"}
    bad_permit = rpc(cofhe.url, "cofhe_decryptForView", ["0x1", {**bad_key, "signature": "0x"}])
    assert bad_permit["error"]["code"] == -32602
    assert "sealingKey" in bad_permit["error"]["message"]
    assert (
        rpc(cofhe.url, "cofhe_encrypt", ["0x1", "uint64", bad_key["issuer"]])["error"]["code"]
        == -32602
    )
    not_rpc = requests.post(cofhe.url, json={"hello": "world"}, timeout=5)
    assert not_rpc.status_code == 200
    assert not_rpc.json()["error"]["code"] == -32600
    not_json = requests.post(cofhe.url, data=b"{", timeout=5)
    assert not_json.status_code == 200
    assert not_json.json()["error"]["code"] == -32700
    info = requests.get(cofhe.url, timeout=5).json()
    assert info["chainId"] == CHAIN_ID
    assert "cofhe_decryptForView" in info["methods"]


def test_devnet_admin_store_grant_and_list(cofhe: DevnetCofhe, node: LocalAccount) -> None:
    lower = node.address.lower()
    stored = requests.post(
        cofhe.url + "/admin/store", json={"value": str(UINT128_MAX), "allowed": [lower]}
    ).json()
    handle = int(stored["handleInt"])
    assert int(stored["handle"], 16) == handle
    assert cofhe.state.value_of(handle) == UINT128_MAX
    other = Account.create().address
    granted = requests.post(
        cofhe.url + "/admin/grant", json={"handle": handle, "addresses": [other]}
    )
    assert granted.status_code == 200
    [record] = requests.get(cofhe.url + "/admin/handles").json()["handles"]
    assert record == {
        "handle": hex(handle),
        "handleInt": str(handle),
        "utype": 6,
        "allowed": sorted([node.address, other]),
    }
    unknown = requests.post(cofhe.url + "/admin/grant", json={"handle": 5, "addresses": [other]})
    assert unknown.status_code == 404
    too_big = requests.post(cofhe.url + "/admin/store", json={"value": 2**128, "allowed": []})
    assert too_big.status_code == 400
    bad_address = requests.post(cofhe.url + "/admin/store", json={"value": 1, "allowed": ["0x1"]})
    assert bad_address.status_code == 400


# --------------------------------------------------------------------------- choosing a client


def test_open_cofhe_serves_python_mode(node: LocalAccount) -> None:
    client = open_cofhe(
        Settings(cofhe_endpoint="http://127.0.0.1:1", cofhe_chain_id=5, cofhe_timeout_s=2.0),
        node,
    )
    try:
        assert isinstance(client, JsonRpcCofhe) and isinstance(client, Cofhe)
        assert client.mode == "python"
        assert client.chain_id == 5
    finally:
        client.close()


def test_open_cofhe_refuses_an_unknown_mode_naming_both(node: LocalAccount) -> None:
    with pytest.raises(CofheError) as caught:
        open_cofhe(Settings(cofhe_mode="tachyon", cofhe_endpoint="http://127.0.0.1:1"), node)
    assert "'tachyon'" in str(caught.value) and "python, bridge" in str(caught.value)
    assert_one_line(caught.value)


def test_open_cofhe_in_bridge_mode_wants_the_chain_rpc(node: LocalAccount) -> None:
    with pytest.raises(CofheError) as caught:
        open_cofhe(Settings(cofhe_mode="bridge"), node)
    assert "needs cofhe_endpoint: the chain's RPC URL" in str(caught.value)
    assert_one_line(caught.value)


def test_open_cofhe_without_endpoint_says_what_to_set(node: LocalAccount) -> None:
    with pytest.raises(CofheError) as caught:
        open_cofhe(Settings(), node)
    assert "cofhe_endpoint" in str(caught.value) and "BLF_COFHE_ENDPOINT" in str(caught.value)
