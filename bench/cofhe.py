"""CoFHE cost per call: the JSON-RPC client against the devnet's CoFHE server, and the SDK
bridge (``cofhe_mode = "bridge"``) against Fhenix's mock contracts on anvil.

Prints the bridge helper's start time (spawn to ready, and to connected) and, for each mode,
the median and p90 of a decrypt and of an encrypt over ROUNDS calls (default 30). The two
back ends differ (an HTTP server in this process; an EVM behind the SDK), so the figures say
what a node pays per job in each mode on this machine, not which wire is faster. Needs
`npm ci`; run with `.venv/bin/python bench/cofhe.py`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account

from blf.cofhe import JsonRpcCofhe
from blf.cofhe_bridge import BridgeCofhe, BridgeHelper, PermitSigner, find_modules
from blf.devnet.cofhe import DevnetCofhe

ROUNDS = int(os.environ.get("ROUNDS", "30"))


def timed(call: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float]:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def report(mode: str, what: str, figures: tuple[float, float]) -> None:
    print(f"{mode:<7} {what:<8} p50 {figures[0]:7.2f} ms   p90 {figures[1]:7.2f} ms")


def json_rpc() -> None:
    node = Account.create()
    with DevnetCofhe(chain_id=421614) as server:
        client = JsonRpcCofhe(server.url, account=node, chain_id=421614)
        handle = server.state.store(12345, [node.address])
        client.decrypt(handle)  # the permit is made once, then reused
        report("python", "decrypt", timed(lambda: client.decrypt(handle)))
        report("python", "encrypt", timed(lambda: client.encrypt_uint128(2**127)))
        client.close()


def bridge() -> None:
    import pytest

    from tests import fixtures_chain, fixtures_cofhe

    anvil_gen = fixtures_chain.anvil.__wrapped__()  # type: ignore[attr-defined]
    anvil = next(anvil_gen)
    try:
        mocks = fixtures_cofhe.cofhe_mocks.__wrapped__(  # type: ignore[attr-defined]
            anvil, fixtures_cofhe._compiled()
        )
        user, node = anvil.accounts[1], anvil.accounts[2]
        with tempfile.TemporaryDirectory() as home:
            began = time.perf_counter()
            helper = BridgeHelper(
                modules=find_modules(None),
                home=Path(home),
                signer=PermitSigner(node, anvil.chain_id),
            )
            client = BridgeCofhe(
                helper, rpc_url=anvil.url, chain_id=anvil.chain_id, address=node.address
            )
            client.handshake()
            connected = (time.perf_counter() - began) * 1000
            print(
                f"bridge  start    spawn to ready {helper.last_start_s * 1000:.0f} ms, "
                f"to connected {connected:.0f} ms"
            )
            user_helper = BridgeHelper(
                modules=find_modules(None),
                home=Path(home) / "user",
                signer=PermitSigner(user, anvil.chain_id),
            )
            user_client = BridgeCofhe(
                user_helper, rpc_url=anvil.url, chain_id=anvil.chain_id, address=user.address
            )
            handles = mocks.store(
                user, user_client.encrypt_uint128(1), user_client.encrypt_uint128(2), node.address
            )
            first = time.perf_counter()
            client.decrypt(handles[0])
            print(
                "bridge  first    decrypt with a new permit "
                f"{(time.perf_counter() - first) * 1000:.1f} ms"
            )
            report("bridge", "decrypt", timed(lambda: client.decrypt(handles[0])))
            report("bridge", "encrypt", timed(lambda: client.encrypt_uint128(2**127)))
            client.close()
            user_client.close()
    except pytest.skip.Exception as skipped:
        print(f"bridge  skipped: {skipped}")
    finally:
        next(anvil_gen, None)


if __name__ == "__main__":
    json_rpc()
    bridge()
