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
from blf.devnet.icl import DevnetIcl
from blf.errors import CofheRefusedError, CofheTransportError
from tests.fixtures_chain import AnvilNode
from tests.fixtures_cofhe import CofheMocks
from tests.nodes import Processes, make_node, status_rows


def _bridge(
    anvil: AnvilNode, account: LocalAccount, home: Path, *, signer: Any = None, **kw: Any
) -> BridgeCofhe:
    timeout = kw.pop("timeout", 30.0)
    helper = BridgeHelper(
        modules=find_modules(None),
        home=home,
        node=find_node("node"),
        signer=signer or PermitSigner(account, anvil.chain_id),
        timeout=timeout,
    )
    return BridgeCofhe(
        helper,
        rpc_url=kw.pop("rpc_url", anvil.url),
        chain_id=kw.pop("chain_id", anvil.chain_id),
        address=account.address,
        timeout=timeout,
    )


def _funded(anvil: AnvilNode) -> LocalAccount:
    # Fresh accounts: the dev accounts' nonces belong to the chain tests that count them.
    account = Account.create()
    anvil.rpc("anvil_setBalance", account.address, hex(10**20))
    return account


@pytest.fixture
def user(anvil: AnvilNode) -> LocalAccount:
    return _funded(anvil)


@pytest.fixture
def node_account(anvil: AnvilNode) -> LocalAccount:
    return _funded(anvil)


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
        user,
        user_bridge.encrypt_uint128(high),
        user_bridge.encrypt_uint128(low),
        node_account.address,
    )
    assert [node_bridge.decrypt(h) for h in handles] == [high, low]

    output_key = secrets.token_bytes(32)
    halves = [int.from_bytes(output_key[:16], "big"), int.from_bytes(output_key[16:], "big")]
    encrypted = [node_bridge.encrypt_uint128(v) for v in halves]
    assert all(e.utype == 6 and e.security_zone == 0 for e in encrypted)
    assert all(len(bytes.fromhex(e.signature[2:])) == 65 for e in encrypted)
    granted = cofhe_mocks.store(node_account, *encrypted, user.address)
    assert [user_bridge.decrypt(h) for h in granted] == halves


# --- the handshake and the chain settings ---------------------------------------------------


def test_handshake_reports_the_sdk_version_and_chain(
    anvil: AnvilNode, node_account: LocalAccount, tmp_path: Path
) -> None:
    bridge = _bridge(anvil, node_account, tmp_path)
    try:
        info = bridge.handshake()
        assert info.sdk == "0.5.1" and info.chain_id == anvil.chain_id
        assert info.environment == "MOCK"
        assert bridge.handshake() is info  # connected once, not per call
        assert bridge.helper.starts == 1
    finally:
        bridge.close()
    assert not bridge.helper.alive()


def test_an_rpc_serving_another_chain_is_refused_in_one_line(
    anvil: AnvilNode, node_account: LocalAccount, tmp_path: Path
) -> None:
    bridge = _bridge(anvil, node_account, tmp_path, chain_id=421614)
    try:
        with pytest.raises(CofheRefusedError) as caught:
            bridge.handshake()
    finally:
        bridge.close()
    assert "serves chain id 31337, not the configured 421614" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_chain_the_sdk_does_not_know_is_refused(
    anvil: AnvilNode, node_account: LocalAccount, tmp_path: Path
) -> None:
    bridge = _bridge(anvil, node_account, tmp_path, chain_id=999)
    try:
        with pytest.raises(CofheRefusedError, match="chain id 999 is not one the SDK knows"):
            bridge.handshake()
    finally:
        bridge.close()


def test_the_helper_holds_no_secret_in_its_environment_or_command_line(
    anvil: AnvilNode,
    node_account: LocalAccount,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "hunter2-" + secrets.token_hex(8)
    monkeypatch.setenv("BLF_KEY_PASSWORD", password)
    monkeypatch.setenv("BLF_PRIVATE_KEY", node_account.key.hex())
    bridge = _bridge(anvil, node_account, tmp_path)
    try:
        bridge.handshake()
        pid = bridge.helper.pid
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        bridge.close()
    names = sorted(entry.split(b"=", 1)[0].decode() for entry in environ if entry)
    assert names == ["HOME", "NODE_ENV", "PATH"]
    key_hex = node_account.key.hex().removeprefix("0x").encode()
    for blob in (b"\0".join(environ), cmdline):
        assert password.encode() not in blob
        assert key_hex not in blob.lower()
        assert anvil.url.encode() not in blob  # the RPC URL travels in the request


# --- signing ------------------------------------------------------------------------------


def _permit_request(account: LocalAccount, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "domain": {
            "name": "ACL",
            "version": "1",
            "chainId": "31337",
            "verifyingContract": "0x" + "11" * 20,
        },
        "types": {
            "PermissionedV2IssuerSelf": [
                {"name": "issuer", "type": "address"},
                {"name": "expiration", "type": "uint64"},
                {"name": "recipient", "type": "address"},
                {"name": "validatorId", "type": "uint256"},
                {"name": "validatorContract", "type": "address"},
                {"name": "sealingKey", "type": "bytes32"},
            ]
        },
        "primaryType": "PermissionedV2IssuerSelf",
        "message": {
            "issuer": account.address,
            "expiration": "1900000000",
            "recipient": "0x" + "00" * 20,
            "validatorId": "0",
            "validatorContract": "0x" + "00" * 20,
            "sealingKey": "0x" + "22" * 32,
        },
    }
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return data


def test_the_signer_signs_a_self_permit_recoverable_to_the_node() -> None:
    from eth_account.messages import encode_typed_data

    account = Account.create()
    signature = PermitSigner(account, 31337)("typedData", _permit_request(account))
    request = _permit_request(account)
    full = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            **request["types"],
        },
        "primaryType": request["primaryType"],
        "domain": {**request["domain"], "chainId": 31337},
        "message": {**request["message"], "expiration": 1900000000, "validatorId": 0},
    }
    assert Account.recover_message(encode_typed_data(full_message=full), signature=signature) == (
        account.address
    )


@pytest.mark.parametrize(
    ("kind", "changes", "why"),
    [
        ("transaction", {}, "'transaction' signature"),
        ("message", {}, "'message' signature"),
        ("typedData", {"message__issuer": "0x" + "33" * 20}, "another issuer"),
        ("typedData", {"message__recipient": "0x" + "44" * 20}, "shared with someone"),
        ("typedData", {"domain__chainId": "1"}, "chain 1, not 31337"),
    ],
)
def test_the_signer_refuses_what_is_not_this_nodes_self_permit(
    kind: str, changes: dict[str, Any], why: str
) -> None:
    account = Account.create()
    with pytest.raises(CofheRefusedError, match=why):
        PermitSigner(account, 31337)(kind, _permit_request(account, **changes))


def test_the_signer_refuses_another_primary_type() -> None:
    account = Account.create()
    request = _permit_request(account)
    request["types"]["Order"] = request["types"].pop("PermissionedV2IssuerSelf")
    request["primaryType"] = "Order"
    with pytest.raises(CofheRefusedError, match="not a self permit"):
        PermitSigner(account, 31337)("typedData", request)


def test_decrypt_signs_one_permit_through_python_and_reuses_it(
    anvil: AnvilNode,
    cofhe_mocks: CofheMocks,
    user: LocalAccount,
    node_account: LocalAccount,
    user_bridge: BridgeCofhe,
    tmp_path: Path,
) -> None:
    asked: list[str] = []
    signer = PermitSigner(node_account, anvil.chain_id)

    def counting(kind: str, data: Any) -> str:
        asked.append(kind)
        return signer(kind, data)

    handles = cofhe_mocks.store(
        user, user_bridge.encrypt_uint128(7), user_bridge.encrypt_uint128(8), node_account.address
    )
    bridge = _bridge(anvil, node_account, tmp_path / "counted", signer=counting)
    try:
        assert [bridge.decrypt(h) for h in handles] == [7, 8]
    finally:
        bridge.close()
    assert asked == ["typedData"]


def test_a_handle_not_granted_to_the_node_is_refused(
    cofhe_mocks: CofheMocks,
    user: LocalAccount,
    node_account: LocalAccount,
    user_bridge: BridgeCofhe,
    node_bridge: BridgeCofhe,
) -> None:
    handles = cofhe_mocks.store(
        user, user_bridge.encrypt_uint128(1), user_bridge.encrypt_uint128(2), user.address
    )
    with pytest.raises(CofheRefusedError, match=r"NotAllowed|Access Denied"):
        node_bridge.decrypt(handles[0])


def test_without_a_key_the_bridge_connects_but_cannot_decrypt(
    anvil: AnvilNode,
    cofhe_mocks: CofheMocks,
    user: LocalAccount,
    node_account: LocalAccount,
    user_bridge: BridgeCofhe,
    tmp_path: Path,
) -> None:
    handles = cofhe_mocks.store(
        user, user_bridge.encrypt_uint128(3), user_bridge.encrypt_uint128(4), node_account.address
    )
    helper = BridgeHelper(modules=find_modules(None), home=tmp_path, signer=None)
    bridge = BridgeCofhe(
        helper, rpc_url=anvil.url, chain_id=anvil.chain_id, address=node_account.address
    )
    try:
        assert bridge.handshake().sdk == "0.5.1"
        with pytest.raises((CofheRefusedError, CofheTransportError), match="refused to sign"):
            bridge.decrypt(handles[0])
    finally:
        bridge.close()


# --- faults: a dying, hanging or babbling helper ------------------------------------------------


def test_a_helper_killed_mid_request_fails_the_call_and_the_retry_succeeds(
    anvil: AnvilNode,
    cofhe_mocks: CofheMocks,
    user: LocalAccount,
    node_account: LocalAccount,
    user_bridge: BridgeCofhe,
    tmp_path: Path,
) -> None:
    handles = cofhe_mocks.store(
        user, user_bridge.encrypt_uint128(5), user_bridge.encrypt_uint128(6), node_account.address
    )
    signer = PermitSigner(node_account, anvil.chain_id)
    bridge: BridgeCofhe | None = None
    killed: list[int] = []

    def kill_first(kind: str, data: Any) -> str:
        # The helper is waiting on this signature: it dies mid-decrypt.
        if not killed and bridge is not None and bridge.helper.pid is not None:
            killed.append(bridge.helper.pid)
            os.kill(bridge.helper.pid, 9)
        return signer(kind, data)

    bridge = _bridge(anvil, node_account, tmp_path, signer=kill_first)
    try:
        with pytest.raises(CofheTransportError, match="lost during decrypt"):
            bridge.decrypt(handles[0])
        assert bridge.decrypt(handles[0]) == 5  # what a job's retry does
        assert bridge.helper.starts == 2 and bridge.helper.pid != killed[0]
    finally:
        bridge.close()


def test_a_hanging_rpc_is_a_retryable_error_and_the_helper_stays(
    anvil: AnvilNode, node_account: LocalAccount, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        bridge = _bridge(anvil, node_account, tmp_path, rpc_url=url, timeout=1.0)
        try:
            with pytest.raises(CofheTransportError, match="failed connect"):
                bridge.handshake()  # the SDK's own RPC timeout answers first
            assert bridge.helper.call("ping", {})["sdk"] == "0.5.1"
        finally:
            bridge.close()


def test_a_helper_that_stops_answering_is_stopped_and_replaced(tmp_path: Path) -> None:
    script = _fake_helper(
        tmp_path, "if (m.method === 'ping') say({ id: m.id, result: { sdk: 'fake' } });"
    )
    helper = BridgeHelper(modules=tmp_path, home=tmp_path / "home", script=script)
    try:
        with pytest.raises(CofheTransportError, match=r"no answer to decrypt within 0\.5 s"):
            helper.call("decrypt", {}, timeout=0.5)
        assert not helper.alive() and helper.starts == 1
        assert helper.call("ping", {}) == {"sdk": "fake"}
        assert helper.starts == 2
    finally:
        helper.close()


def _fake_helper(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake.mjs"
    script.write_text(
        "import { createInterface } from 'node:readline';\n"
        "const say = (m) => process.stdout.write(JSON.stringify(m) + '\\n');\n"
        "say({ event: 'ready', sdk: 'fake', node: process.version });\n"
        "createInterface({ input: process.stdin }).on('line', (line) => {\n"
        "  const m = JSON.parse(line);\n" + body + "\n});\n"
    )
    return script


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ("process.stdout.write('<html>oops</html>\\n');", CofheTransportError, "not protocol JSON"),
        ("say({ surprise: true });", CofheTransportError, "no known kind"),
        ("process.exit(3);", CofheTransportError, "exited with code 3"),
        ("say({ id: m.id, result: { value: 'twelve' } });", CofheTransportError, "garbage"),
        ("say({ id: m.id, result: 42 });", CofheTransportError, "garbage"),
        (
            "say({ id: m.id, error: { code: 'X', message: 'no\\nway', refused: true } });",
            CofheRefusedError,
            "refused decrypt: X no way",
        ),
        (
            "say({ id: m.id, error: { code: 'ETIMEDOUT', message: 'fetch failed' } });",
            CofheTransportError,
            "failed decrypt: ETIMEDOUT",
        ),
    ],
)
def test_bad_answers_become_retryable_or_refused_errors(
    tmp_path: Path, body: str, error: type[Exception], match: str
) -> None:
    connect_ok = (
        "if (m.method === 'connect') { say({ id: m.id, result: "
        "{ sdk: 'fake', chainId: 31337, environment: 'MOCK' } }); return; }\n"
    )
    helper = BridgeHelper(
        modules=tmp_path,
        home=tmp_path / "home",
        script=_fake_helper(tmp_path, connect_ok + body),
        timeout=10.0,
    )
    bridge = BridgeCofhe(helper, rpc_url="http://x", chain_id=31337, address="0x" + "11" * 20)
    try:
        with pytest.raises(error, match=match):
            bridge.decrypt(123)
    finally:
        bridge.close()


def test_a_helper_that_never_says_ready_does_not_start(tmp_path: Path) -> None:
    script = tmp_path / "mute.mjs"
    script.write_text("process.stderr.write('cannot load the SDK\\n'); process.exit(1);\n")
    helper = BridgeHelper(modules=tmp_path, home=tmp_path / "home", script=script)
    with pytest.raises(CofheTransportError, match="did not start: it exited with code 1"):
        helper.call("ping", {})


def test_missing_sdk_modules_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="npm ci --omit=dev"):
        find_modules(tmp_path)
    with pytest.raises(Exception, match="is not on PATH"):
        find_node("no-such-node-binary")


# --- the node: run's start lines and status -------------------------------------------------


def test_run_in_bridge_mode_completes_the_handshake_and_names_the_sdk(
    anvil: AnvilNode, devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(
        devnet.url, cofhe_mode="bridge", cofhe_endpoint=anvil.url, cofhe_chain_id=anvil.chain_id
    )
    run = processes.start(node, "run")
    [line] = run.wait_for(r"CoFHE   : bridge")
    assert f"@cofhe/sdk 0.5.1, chain {anvil.chain_id}, helper answered in" in line
    run.wait_for("Heartbeat sent to ICL")
    run.signal()
    assert run.wait() == 0, run.output()


def test_run_in_bridge_mode_on_the_wrong_chain_stops_with_one_line(
    anvil: AnvilNode, devnet: DevnetIcl, processes: Processes
) -> None:
    node = make_node(
        devnet.url, cofhe_mode="bridge", cofhe_endpoint=anvil.url, cofhe_chain_id=421614
    )
    run = processes.start(node, "run")
    assert run.wait() == 1
    [line] = run.lines("Error: ")
    assert "serves chain id 31337, not the configured 421614" in line
    assert "Traceback" not in run.output()


def test_status_says_whether_the_helper_answers(anvil: AnvilNode, devnet: DevnetIcl) -> None:
    node = make_node(
        devnet.url, cofhe_mode="bridge", cofhe_endpoint=anvil.url, cofhe_chain_id=anvil.chain_id
    )
    result = node.invoke("status")
    assert result.exit_code == 0, result.output
    assert status_rows(result)["CoFHE"] == (
        f"bridge, {anvil.url} (helper answers: @cofhe/sdk 0.5.1, chain {anvil.chain_id})"
    )
    node.set_config(cofhe_chain_id=999)
    row = status_rows(node.invoke("status"))["CoFHE"]
    assert row.startswith(f"bridge, {anvil.url} (helper does not answer: ")
    assert "chain id 999 is not one the SDK knows" in row
