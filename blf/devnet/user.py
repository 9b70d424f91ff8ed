"""The devnet's user: what a Blindference client does around a job, done locally.

To submit: encrypt the prompt with a fresh key (the node's blob format), upload the blob
to the devnet IPFS, store the key's two halves in the devnet CoFHE, and create the job at
the devnet ICL, which grants the key to the job's quorum. To read the answer: decrypt the
output key from CoFHE with the user's own permit (the ICL granted it when it recorded the
leader's result), download the output blob (checked against its CID) and decrypt it.

Its addresses and the user's throwaway key live in ``devnet.json`` (mode 0600), written by
``devnet up``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount

from blf import crypto
from blf.cofhe import JsonRpcCofhe
from blf.errors import BlfError
from blf.ipfs import IpfsClient

__all__ = ["DevnetInfo", "DevnetUser"]

FINAL = ("ACCEPTED", "REJECTED", "DISPUTED", "TIMEDOUT")


@dataclass(frozen=True)
class DevnetInfo:
    """What ``devnet up`` writes to devnet.json for later commands."""

    icl: str
    cofhe: str
    ipfs: str
    chain_id: int
    user_key: str

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.__dict__, handle, indent=2)

    @classmethod
    def read(cls, path: Path) -> DevnetInfo:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise BlfError(f"{path} not found: start `blindference-node devnet up` first") from None
        except (OSError, ValueError, TypeError) as exc:
            raise BlfError(f"{path} is unreadable ({exc}); restart `devnet up`") from None


class DevnetUser:
    def __init__(self, info: DevnetInfo, *, timeout: float = 10.0) -> None:
        self.info = info
        self.account: LocalAccount = Account.from_key(info.user_key)
        self._timeout = timeout
        self._ipfs = IpfsClient(api_url=info.ipfs, gateways=[info.ipfs], timeout=timeout)

    def close(self) -> None:
        self._ipfs.close()

    def submit(self, prompt: str, model: str, **job: Any) -> str:
        """Encrypt, upload, store the key, create the job; returns the job id."""
        key = crypto.new_key()
        return self.submit_blob(crypto.encrypt_blob(key, prompt.encode("utf-8")), key, model, **job)

    def submit_blob(self, blob: bytes, key: bytes, model: str, **job: Any) -> str:
        """Submit an already encrypted prompt (tests submit tampered ones)."""
        cid = self._ipfs.add(blob)
        high, low = (self._store(half) for half in crypto.split_key(key))
        body = {
            "modelId": model,
            "promptCid": cid,
            "kpHighHandle": high,
            "kpLowHandle": low,
            "userAddress": self.account.address,
            **job,
        }
        return str(self._post(self.info.icl + "/admin/jobs", body)["jobId"])

    def _store(self, value: int) -> int:
        body = {"value": str(value), "allowed": [self.account.address]}
        return int(self._post(self.info.cofhe + "/admin/store", body)["handleInt"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self._get(f"{self.info.icl}/admin/jobs/{job_id}")

    def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.job(job_id)
            if record["status"] in FINAL or time.monotonic() > deadline:
                return record
            time.sleep(0.25)

    def output(self, record: dict[str, Any]) -> str | None:
        """The leader's output, decrypted as the user; None before there is a result."""
        result = record.get("result")
        if not result:
            return None
        cofhe = JsonRpcCofhe(
            self.info.cofhe, account=self.account, chain_id=self.info.chain_id, timeout=10
        )
        try:
            halves = [
                cofhe.decrypt(int(result[f"encrypted_output_key_{part}"]))
                for part in ("high", "low")
            ]
        finally:
            cofhe.close()
        blob = self._ipfs.cat(result["output_cid"])
        return crypto.decrypt_blob(crypto.join_key(*halves), blob).decode("utf-8")

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return _answer(lambda: requests.post(url, json=body, timeout=self._timeout), url)

    def _get(self, url: str) -> dict[str, Any]:
        return _answer(lambda: requests.get(url, timeout=self._timeout), url)


def _answer(call: Any, url: str) -> dict[str, Any]:
    try:
        response = call()
    except requests.RequestException as exc:
        raise BlfError(
            f"devnet unreachable at {url} ({type(exc).__name__}): is `devnet up` running?"
        ) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise BlfError(f"devnet refused {url}: {response.status_code} {detail}")
    return dict(response.json())
