"""A whole Blindference network on this machine: the devnet ICL, CoFHE and IPFS on
loopback, and N nodes, each with its own directory and identity, each a real
``blindference-node run`` (embedded Redis, beat, control and GPU workers).

``devnet up`` runs this until Ctrl+C; the end-to-end tests run it with per-node overrides
(a verifier that disagrees, a node that is slow to download).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from eth_account import Account

from blf.devnet.cofhe import DevnetCofhe
from blf.devnet.icl import DevnetIcl
from blf.devnet.ipfs import DevnetIpfs
from blf.devnet.user import DevnetInfo

__all__ = ["DEVNET_FILE", "LocalNetwork", "LocalNode"]

DEVNET_FILE = "devnet.json"
CHAIN_ID = 421614
STOP_TIMEOUT_S = 60.0


@dataclass
class LocalNode:
    directory: Path
    env: dict[str, str]
    address: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"


@dataclass
class LocalNetwork:
    """``start()``, then ``wait_ready()``; ``stop()`` ends the nodes, then the services."""

    directory: Path
    nodes: int = 3
    model: str = "demo-model"
    password: str = "devnet"
    node_env: list[dict[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # for every node
    output: Callable[[LocalNode], IO[bytes] | None] = lambda _node: None
    icl: DevnetIcl = field(init=False)
    cofhe: DevnetCofhe = field(init=False)
    ipfs: DevnetIpfs = field(init=False)
    members: list[LocalNode] = field(default_factory=list, init=False)

    def start(
        self, *, icl_port: int = 0, before: Callable[[LocalNetwork], None] | None = None
    ) -> LocalNetwork:
        """``before`` sees the services built and not yet started (tests add middleware)."""
        self.cofhe = DevnetCofhe(chain_id=CHAIN_ID)
        self.ipfs = DevnetIpfs()
        self.icl = DevnetIcl(port=icl_port, grants=self.cofhe.state)
        if before is not None:
            before(self)
        for server in (self.cofhe, self.ipfs, self.icl):
            server.start()
        self._write_info()
        self.members = [self._member(i) for i in range(self.nodes)]
        _all(lambda node: self._prepare(node), self.members)
        for node in self.members:
            self._spawn(node)
        return self

    @property
    def info_path(self) -> Path:
        return self.directory / DEVNET_FILE

    def _write_info(self) -> None:
        previous = None
        if self.info_path.exists():
            try:
                previous = DevnetInfo.read(self.info_path).user_key
            except Exception:  # a broken file from an older run: a new user is fine
                previous = None
        info = DevnetInfo(
            icl=self.icl.url,
            cofhe=self.cofhe.url,
            ipfs=self.ipfs.url,
            chain_id=CHAIN_ID,
            user_key=previous or Account.create().key.hex(),
        )
        info.write(self.info_path)

    def _member(self, index: int) -> LocalNode:
        extra = self.node_env[index] if index < len(self.node_env) else {}
        node = LocalNode(self.directory / f"node-{index + 1}", env={})
        node.env = {**self._node_env(node), **self.env, **extra}
        return node

    def _node_env(self, node: LocalNode) -> dict[str, str]:
        # Run-time overrides: the node's own config.json stays as init wrote it.
        return {
            "BLF_CONFIG_PATH": str(node.config_path),
            "BLF_KEY_PASSWORD": self.password,
            "BLF_ICL_ENDPOINT": self.icl.url,
            "BLF_COFHE_MODE": "python",
            "BLF_COFHE_ENDPOINT": self.cofhe.url,
            "BLF_COFHE_CHAIN_ID": str(CHAIN_ID),
            "BLF_IPFS_API_URL": self.ipfs.url,
            "BLF_IPFS_GATEWAY": self.ipfs.url,
            "BLF_SUPPORTED_MODEL_IDS": self.model,
            "BLF_MODEL_BACKENDS": json.dumps({self.model: "mock"}),
            "BLF_POLL_INTERVAL_S": "1",
            # Several nodes share this machine: each metrics endpoint takes a free port.
            "BLF_METRICS_PORT": "0",
        }

    def _prepare(self, node: LocalNode) -> None:
        if not node.config_path.exists():
            _cli(node, "init", "--models", self.model, "--icl", self.icl.url)
        _cli(node, "attest", "--mock")  # the devnet ICL starts empty every time
        node.address = json.loads(node.config_path.read_text())["node_address"]

    def restart(self, node: LocalNode) -> None:
        """Start a member's `run` again (after it stopped or was killed)."""
        if node.process is not None and node.process.poll() is None:
            raise RuntimeError(f"{node.directory.name} is still running")
        self._spawn(node)

    def _spawn(self, node: LocalNode) -> None:
        out = self.output(node)
        node.process = subprocess.Popen(
            [sys.executable, "-m", "blf", "run"],
            env=_environment(node.env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )

    def ready(self) -> bool:
        """Every node attested and polling the ICL."""
        records = {n["address"]: n for n in self.icl.state.node_records()["nodes"]}
        return all(records.get(n.address, {}).get("polls", 0) >= 1 for n in self.members)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            for node in self.members:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(
                        f"node {node.directory.name} exited with {node.process.returncode}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the devnet nodes did not start polling in {timeout_s} s")
            time.sleep(0.1)

    def stop(self) -> None:
        running = [n.process for n in self.members if n.process and n.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for server in ("icl", "ipfs", "cofhe"):
            if hasattr(self, server):
                getattr(self, server).stop()


def _environment(overrides: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLF_")}
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(node: LocalNode, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blf", *args],
        env=_environment(node.env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`blindference-node {args[0]}` failed for {node.directory}: "
            f"{(done.stderr or done.stdout).strip()}"
        )


def _all(action: Callable[[LocalNode], Any], nodes: list[LocalNode]) -> None:
    """Each node's set-up in parallel (scrypt and start-up dominate)."""
    errors: list[BaseException] = []

    def guarded(node: LocalNode) -> None:
        try:
            action(node)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
