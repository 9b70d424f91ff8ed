"""CoFHE through Fhenix's official SDK (``cofhe_mode = "bridge"``), with the key kept here.

The SDK is TypeScript, so it runs in a helper: ``node cofhe_bridge.mjs``, one per process
that uses CoFHE, started on first use, restarted when it dies, stopped with its owner (its
stdin closes; the kernel's parent-death signal covers a killed owner). Requests and answers
are line-delimited JSON over its pipes, each with an id and a timeout.

The public node hands its private key to its bridge in every request. This helper gets no
key: when the SDK needs a signature (a permit's EIP-712 typed data) the helper asks over
the pipe, and ``PermitSigner`` signs here, only what a self-issued permit for this node on
the configured chain looks like. Its command line is ``node <script> <node_modules>``; its
environment is PATH, HOME (a directory for the SDK's key cache) and NODE_ENV; the RPC URL
and the address travel in the ``connect`` request.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blf.children import spawn
from blf.cofhe import UINT128_MAX, EncryptedValue
from blf.config import Settings
from blf.errors import CofheError, CofheRefusedError, CofheTransportError

__all__ = [
    "BRIDGE_SCRIPT",
    "MOCK_ZK_SIGNER_KEY",
    "BridgeCofhe",
    "BridgeHelper",
    "Handshake",
    "PermitSigner",
    "find_modules",
    "find_node",
    "open_bridge",
]

log = logging.getLogger(__name__)

BRIDGE_SCRIPT = Path(__file__).with_name("cofhe_bridge.mjs")
SDK_PACKAGE = "@cofhe/sdk"
READY_TIMEOUT_S = 30.0  # the SDK and its TFHE WebAssembly load in about a second
MOCK_CHAIN_ID = 31337
# The SDK's own public test signer for its local mocks (published in @cofhe/sdk's consts):
# it records mock ciphertexts on a local chain. Never used on any other chain.
MOCK_ZK_SIGNER_KEY = "0x6C8D7F768A6BB4AAFE85E8A2F5A9680355239C7E14646ED62B044E39DE154512"
PERMIT_PRIMARY_TYPE = "PermissionedV2IssuerSelf"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


# --- where the SDK lives -------------------------------------------------------------------


def find_modules(configured: Path | None) -> Path:
    """The node_modules directory holding @cofhe/sdk: ``configured``, else the nearest one
    above this package (a source checkout after ``npm ci``); CofheError saying how if none."""
    if configured is not None:
        if (configured / SDK_PACKAGE / "package.json").is_file():
            return configured
        raise CofheError(
            f"cofhe_bridge_modules {configured} holds no {SDK_PACKAGE}: run "
            f"`npm ci --omit=dev` in blf's source directory and point it at its node_modules"
        )
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "node_modules"
        if (candidate / SDK_PACKAGE / "package.json").is_file():
            return candidate
    raise CofheError(
        f"cofhe_mode 'bridge' needs {SDK_PACKAGE}: run `npm ci --omit=dev` in blf's source "
        "directory, or set cofhe_bridge_modules (BLF_COFHE_BRIDGE_MODULES) to a node_modules "
        "directory that has it"
    )


def find_node(configured: str) -> str:
    found = shutil.which(configured)
    if found is None:
        raise CofheError(
            f"cofhe_mode 'bridge' needs Node.js: {configured!r} is not on PATH "
            "(install Node.js 18 or newer, or set cofhe_bridge_node)"
        )
    return found


# --- signing -------------------------------------------------------------------------------


class _TypedData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    domain: dict[str, Any]
    types: dict[str, list[dict[str, str]]]
    primary_type: str = Field(alias="primaryType")
    message: dict[str, Any]


_DOMAIN_FIELDS = {
    "name": "string",
    "version": "string",
    "chainId": "uint256",
    "verifyingContract": "address",
    "salt": "bytes32",
}


class PermitSigner:
    """Signs for the helper what a self-issued permit of ``account`` on ``chain_id`` is, and
    nothing else: no plain message, no transaction, no permit naming another issuer."""

    def __init__(self, account: LocalAccount, chain_id: int) -> None:
        self._account = account
        self.address = to_checksum_address(account.address)
        self.chain_id = chain_id

    def __call__(self, kind: str, data: Any) -> str:
        if kind != "typedData":
            raise CofheRefusedError(f"the CoFHE helper asked for a {kind!r} signature; refused")
        try:
            typed = _TypedData.model_validate(data)
        except ValidationError:
            raise CofheRefusedError("the CoFHE helper sent typed data of no known shape") from None
        self._check(typed)
        full = {
            "types": {"EIP712Domain": self._domain_type(typed.domain), **typed.types},
            "primaryType": typed.primary_type,
            "domain": _typed_values(typed.domain, self._domain_type(typed.domain)),
            "message": _typed_values(typed.message, typed.types[typed.primary_type]),
        }
        signed = self._account.sign_message(encode_typed_data(full_message=full))
        log.debug("Signed a CoFHE permit for the SDK helper")
        return "0x" + signed.signature.hex().removeprefix("0x")

    def _check(self, typed: _TypedData) -> None:
        message = typed.message
        if typed.primary_type != PERMIT_PRIMARY_TYPE or typed.primary_type not in typed.types:
            raise CofheRefusedError(
                f"the CoFHE helper asked to sign {typed.primary_type!r}, not a self permit"
            )
        issuer = str(message.get("issuer", ""))
        if issuer.lower() != self.address.lower():
            raise CofheRefusedError("the CoFHE helper asked to sign a permit of another issuer")
        if str(message.get("recipient", ZERO_ADDRESS)).lower() != ZERO_ADDRESS:
            raise CofheRefusedError("the CoFHE helper asked to sign a permit shared with someone")
        if int(typed.domain.get("chainId", -1)) != self.chain_id:
            raise CofheRefusedError(
                f"the CoFHE helper asked to sign for chain {typed.domain.get('chainId')}, "
                f"not {self.chain_id}"
            )

    @staticmethod
    def _domain_type(domain: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": k, "type": t} for k, t in _DOMAIN_FIELDS.items() if k in domain]


def _typed_values(values: dict[str, Any], fields: list[dict[str, str]]) -> dict[str, Any]:
    """JSON brings integers as decimal strings (JavaScript bigints); eth-account wants ints."""
    out = dict(values)
    for entry in fields:
        name, kind = entry["name"], entry["type"]
        if name in out and kind.startswith(("uint", "int")) and isinstance(out[name], str):
            out[name] = int(out[name], 0)
    return out


# --- the helper process ------------------------------------------------------------------


class Handshake(BaseModel):
    """What the helper says once connected: the SDK's version and the chain it serves."""

    sdk: str
    chain_id: int = Field(alias="chainId")
    environment: str
    started_in_s: float = 0.0


@dataclass
class _Pending:
    method: str
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: CofheError | None = None

    def settle(self, *, result: Any = None, error: CofheError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass
class _Run:
    """One helper process and what is waiting on it: its requests die with it."""

    process: subprocess.Popen[bytes]
    pending: dict[int, _Pending] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)
    ended: str | None = None
    last_error: str = ""  # its last stderr line, to say why it died

    def fail_all(self, why: str) -> None:
        self.ended = self.ended or why
        failed, self.pending = self.pending, {}
        for pending in failed.values():
            pending.settle(
                error=CofheTransportError(f"CoFHE helper lost during {pending.method}: {why}")
            )


Signer = Callable[[str, Any], str]


class BridgeHelper:
    """One ``node cofhe_bridge.mjs`` process at a time and the pipe protocol to it.
    Thread-safe: a thread pool's tasks share it, each request waiting on its own id."""

    def __init__(
        self,
        *,
        modules: Path,
        home: Path,
        node: str = "node",
        signer: Signer | None = None,
        script: Path = BRIDGE_SCRIPT,
        timeout: float = 30.0,
    ) -> None:
        self.modules = modules
        self.home = home
        self.node = node
        self.script = script
        self.timeout = timeout
        self._signer = signer
        self._run: _Run | None = None
        self._pid = os.getpid()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # one writer on stdin; starting and swapping runs
        self.starts = 0
        self.last_start_s = 0.0

    @property
    def pid(self) -> int | None:
        return self._run.process.pid if self._run is not None else None

    def alive(self) -> bool:
        return self._run is not None and self._run.process.poll() is None

    def call(self, method: str, params: dict[str, Any], *, timeout: float | None = None) -> Any:
        """The helper's answer to ``method``; CofheTransportError when it dies, hangs or
        answers garbage (it is then stopped; the next call starts a fresh one)."""
        limit = timeout or self.timeout
        pending = _Pending(method)
        with self._lock:
            run = self._ensure_started()
            request_id = next(self._ids)
            run.pending[request_id] = pending
            self._send(run, {"id": request_id, "method": method, "params": params})
        if not pending.done.wait(limit):
            run.pending.pop(request_id, None)
            self._kill(run, f"no answer to {method} within {limit:g} s")
            raise CofheTransportError(
                f"CoFHE helper gave no answer to {method} within {limit:g} s; "
                "stopped it (the next call starts a new one)"
            )
        if pending.error is not None:
            raise pending.error
        return pending.result

    def close(self) -> None:
        with self._lock:
            run, self._run = self._run, None
        if run is None or self._pid != os.getpid():
            return
        _close_quietly(run.process.stdin)
        try:
            run.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()
        run.fail_all("the node stopped it")

    # starting ------------------------------------------------------------------------------

    def _ensure_started(self) -> _Run:
        if self._pid != os.getpid():
            # A forked copy must not share its parent's pipes; it starts its own helper.
            self._run, self._pid = None, os.getpid()
        run = self._run
        if run is not None and run.process.poll() is None:
            return run
        if run is not None:
            log.warning(
                "CoFHE helper exited with code %s; starting a new one", run.process.returncode
            )
        return self._start()

    def _start(self) -> _Run:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "NODE_ENV": "production",
        }
        began = time.monotonic()
        try:
            process = spawn(
                [self.node, str(self.script), str(self.modules)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise CofheTransportError(f"CoFHE helper did not start: {exc}") from None
        run = _Run(process)
        self._run = run
        self.starts += 1
        threading.Thread(target=self._read, args=(run,), daemon=True).start()
        threading.Thread(target=self._log_stderr, args=(run,), daemon=True).start()
        if not run.ready.wait(READY_TIMEOUT_S) or run.ended is not None:
            self._run = None
            self._stop(run)
            why = run.ended or f"no ready line within {READY_TIMEOUT_S:g} s"
            raise CofheTransportError(f"CoFHE helper did not start: {why}")
        self.last_start_s = time.monotonic() - began
        log.info(
            "CoFHE helper started (pid %d, @cofhe/sdk %s, Node.js %s) in %.2f s",
            process.pid,
            run.info.get("sdk", "?"),
            run.info.get("node", "?"),
            self.last_start_s,
        )
        return run

    # the pipes -----------------------------------------------------------------------------

    def _send(self, run: _Run, message: dict[str, Any]) -> None:
        stdin = run.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (OSError, ValueError):
            run.fail_all("its pipe is closed")

    def _read(self, run: _Run) -> None:
        stdout = run.process.stdout
        assert stdout is not None
        for raw in _lines(stdout):
            try:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._kill(run, "it wrote a line that is not protocol JSON")
                break
            if not self._dispatch(run, message):
                break
        code = run.process.wait()
        why = f"it exited with code {code}"
        if run.last_error:
            why += f" ({run.last_error})"
        self._retire(run, why)

    def _dispatch(self, run: _Run, message: dict[str, Any]) -> bool:
        if message.get("event") == "ready":
            run.info.update(message)
            run.ready.set()
        elif "sign" in message:
            self._answer_sign(run, message)
        elif isinstance(message.get("id"), int):
            pending = run.pending.pop(message["id"], None)
            if pending is not None:
                self._settle(pending, message)
        else:
            self._kill(run, "it wrote a message of no known kind")
            return False
        return True

    @staticmethod
    def _settle(pending: _Pending, message: dict[str, Any]) -> None:
        error = message.get("error")
        if error is None:
            pending.settle(result=message.get("result"))
            return
        if not isinstance(error, dict):
            error = {"message": str(error)}
        text = " ".join(str(error.get("message", "")).split())[:300]
        what = f"{pending.method}: {error.get('code', 'ERROR')} {text}"
        if error.get("refused"):
            pending.settle(error=CofheRefusedError(f"CoFHE SDK refused {what}"))
        else:
            pending.settle(error=CofheTransportError(f"CoFHE SDK failed {what}"))

    def _answer_sign(self, run: _Run, message: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"sign": message["sign"]}
        try:
            if self._signer is None:
                raise CofheRefusedError("this process holds no key to sign with")
            answer["result"] = self._signer(str(message.get("kind")), message.get("data"))
        except CofheError as exc:
            log.warning("Refused the CoFHE helper's signing request: %s", exc)
            answer["error"] = str(exc)
        with self._lock:
            self._send(run, answer)

    @staticmethod
    def _log_stderr(run: _Run) -> None:
        stderr = run.process.stderr
        assert stderr is not None
        for raw in _lines(stderr):
            text = raw.decode(errors="replace").rstrip()
            if text:
                run.last_error = text[:300]
                log.warning("CoFHE helper: %s", text[:500])

    # stopping ------------------------------------------------------------------------------

    def _kill(self, run: _Run, why: str) -> None:
        if run.ended is None:
            log.warning("Stopping the CoFHE helper (pid %d): %s", run.process.pid, why)
        self._stop(run)
        self._retire(run, why)

    def _retire(self, run: _Run, why: str) -> None:
        # Waiters first: a caller starting this helper holds the lock until it is ready.
        run.fail_all(why)
        run.ready.set()
        with self._lock:
            if self._run is run:
                self._run = None

    @staticmethod
    def _stop(run: _Run) -> None:
        _close_quietly(run.process.stdin)
        if run.process.poll() is None:
            run.process.kill()


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    try:
        yield from iter(stream.readline, b"")
    except (OSError, ValueError):
        return


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.close()


# --- the Cofhe interface over the helper -------------------------------------------------


_M = TypeVar("_M", bound=BaseModel)


class _DecryptAnswer(BaseModel):
    value: str


class _EncryptedInput(BaseModel):
    ct_hash: str = Field(alias="ctHash")
    security_zone: int = Field(alias="securityZone")
    utype: int
    signature: str


class _EncryptAnswer(BaseModel):
    inputs: list[_EncryptedInput]


class BridgeCofhe:
    """CoFHE through the SDK helper (``cofhe_mode = "bridge"``). ``rpc_url`` is the chain's
    RPC (the public node's ``cofhe_endpoint`` in this mode)."""

    mode = "bridge"

    def __init__(
        self,
        helper: BridgeHelper,
        *,
        rpc_url: str,
        chain_id: int,
        address: str,
        timeout: float = 30.0,
    ) -> None:
        self.helper = helper
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self.address = to_checksum_address(address)
        self._timeout = timeout
        self._connected_to: int | None = None  # the helper start that was connected
        self.handshake_info: Handshake | None = None
        self._lock = threading.Lock()

    def handshake(self) -> Handshake:
        """Start the helper if needed and connect it: the SDK's version, the chain's id."""
        with self._lock:
            current = self._connected_to == self.helper.starts and self.helper.alive()
            if self.handshake_info is not None and current:
                return self.handshake_info
            began = time.monotonic()
            params: dict[str, Any] = {
                "rpcUrl": self.rpc_url,
                "chainId": self.chain_id,
                "address": self.address,
                "timeoutMs": int(self._timeout * 1000),
            }
            if self.chain_id == MOCK_CHAIN_ID:
                params["mockSignerKey"] = MOCK_ZK_SIGNER_KEY
            answer = self.helper.call("connect", params, timeout=self._wait_s)
            try:
                info = Handshake.model_validate(answer)
            except ValidationError:
                raise CofheTransportError("CoFHE helper answered connect with garbage") from None
            info.started_in_s = time.monotonic() - began
            self.handshake_info, self._connected_to = info, self.helper.starts
            return info

    def decrypt(self, handle: int) -> int:
        answer = self._call("decrypt", {"ctHash": str(handle)}, _DecryptAnswer)
        try:
            value = int(answer.value)
        except ValueError:
            raise CofheTransportError("CoFHE helper answered decrypt with garbage") from None
        log.debug("CoFHE (SDK) decrypted handle %s to %d", hex(handle), value)
        return value

    def encrypt_uint128(self, value: int) -> EncryptedValue:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT128_MAX:
            raise CofheError("encrypt: the value is not a uint128 (0 .. 2**128-1); not sent")
        answer = self._call("encrypt", {"values": [str(value)]}, _EncryptAnswer)
        if len(answer.inputs) != 1:
            raise CofheTransportError("CoFHE helper answered encrypt with the wrong count")
        item = answer.inputs[0]
        try:
            ct_hash = int(item.ct_hash)
        except ValueError:
            raise CofheTransportError("CoFHE helper answered encrypt with garbage") from None
        return EncryptedValue(
            ct_hash=ct_hash,
            security_zone=item.security_zone,
            utype=item.utype,
            signature=item.signature,
        )

    @property
    def _wait_s(self) -> float:
        # Each RPC the SDK makes has ``timeout`` itself, and one call makes several: Python
        # waits twice that, so a hung helper is stopped but a slow network reports its own
        # error first.
        return 2 * self._timeout

    def close(self) -> None:
        self.helper.close()

    def _call(self, method: str, params: dict[str, Any], model: type[_M]) -> _M:
        self.handshake()
        answer = self.helper.call(method, params, timeout=self._wait_s)
        try:
            return model.model_validate(answer)
        except ValidationError:
            raise CofheTransportError(f"CoFHE helper answered {method} with garbage") from None


def open_bridge(
    settings: Settings, account: LocalAccount | None, *, directory: Path, address: str = ""
) -> BridgeCofhe:
    """The bridge ``settings`` describe. With no ``account`` (``status``) it can connect and
    report, but signs nothing, so it cannot decrypt."""
    if not settings.cofhe_endpoint:
        raise CofheError("cofhe_mode 'bridge' needs cofhe_endpoint: the chain's RPC URL")
    signer = PermitSigner(account, settings.cofhe_chain_id) if account is not None else None
    helper = BridgeHelper(
        modules=find_modules(settings.cofhe_bridge_modules),
        home=directory / "cofhe-sdk",
        node=find_node(settings.cofhe_bridge_node),
        signer=signer,
        timeout=settings.cofhe_timeout_s,
    )
    return BridgeCofhe(
        helper,
        rpc_url=settings.cofhe_endpoint,
        chain_id=settings.cofhe_chain_id,
        address=account.address if account is not None else address,
        timeout=settings.cofhe_timeout_s,
    )
