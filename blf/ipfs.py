"""Downloading and uploading the node's blobs over IPFS, never trusting a source's word.

Downloads (``cat``) try a Kubo RPC node, then the configured gateway, then its fallbacks,
and keep the first answer whose bytes match the CID: a gateway that serves the wrong
bytes is logged and skipped, never believed. Uploads (``add``) go to a Kubo RPC node or,
failing that setting, to Pinata; the CID they answer must be the one computed here from
the bytes, so the node never reports a CID it has not checked, and never invents one when
it has nowhere to upload (the public node does both; protocol.md section 4).

Blobs are small (AES-GCM encrypted prompts and outputs), at most one IPFS block of 1 MiB,
so every transfer is one request whose answer is read into memory with a size cap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

from blf import cid as cids
from blf.errors import (
    CidMismatchError,
    IpfsError,
    IpfsTransportError,
    NoUploadTargetError,
    UnverifiableCidError,
)
from blf.redact import display_url

if TYPE_CHECKING:
    from blf.config import Settings

__all__ = ["MAX_BLOB", "MAX_DOWNLOAD", "IpfsClient"]

log = logging.getLogger(__name__)

MAX_BLOB = cids.MAX_BLOCK  # the largest blob the node uploads: one block, one raw CID
MAX_DOWNLOAD = MAX_BLOB + 64 * 1024  # a source sending more than this is cut off
# Kubo's default chunker splits at 256 KiB, and the file is then a tree, not the raw block
# whose CID we compute; one chunk of the block's size keeps a file of up to 1 MiB whole.
KUBO_CHUNKER = f"size-{cids.MAX_BLOCK}"
NO_TARGET = "no IPFS upload target: set ipfs_api_url (a Kubo RPC node) or pinata_jwt"
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class _Source:
    """One place a blob can be downloaded from; ``label`` is safe to show and log."""

    label: str
    method: str
    url: str
    params: dict[str, str] | None = None


class IpfsClient:
    """Verified ``cat`` and ``add`` of small blobs. Thread-safe: no state changes after
    construction, and one ``requests.Session`` shared by every thread."""

    def __init__(
        self,
        *,
        api_url: str | None,
        gateways: list[str],
        pinata_jwt: str | None = None,
        pinata_api_url: str = "https://api.pinata.cloud",
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self._api_url = kubo_base(api_url) if api_url else None
        self._gateways = _unique(_gateway_base(g) for g in gateways if g.strip())
        self._pinata_jwt = pinata_jwt or None
        self._pinata_api_url = pinata_api_url.rstrip("/")
        self._timeout = timeout
        self._session = session or requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> IpfsClient:
        jwt = settings.pinata_jwt.get_secret_value() if settings.pinata_jwt else None
        return cls(
            api_url=settings.ipfs_api_url,
            gateways=[settings.ipfs_gateway, *settings.ipfs_gateway_fallbacks],
            pinata_jwt=jwt,
            pinata_api_url=settings.pinata_api_url,
            timeout=settings.ipfs_timeout_s,
        )

    @property
    def can_upload(self) -> bool:
        return self.upload_target is not None

    @property
    def upload_target(self) -> str | None:
        """Where ``add`` uploads, fit to show an operator (never the JWT); None: nowhere."""
        if self._api_url:
            return f"kubo {display_url(self._api_url)}"
        if self._pinata_jwt:
            return f"pinata {display_url(self._pinata_api_url)}"
        return None

    @property
    def sources(self) -> list[str]:
        """Where ``cat`` looks, in order, as display strings."""
        return [source.label for source in self._sources("")]

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> IpfsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- upload ----------------------------------------------------------------------------

    def add(self, data: bytes) -> str:
        """Upload and pin ``data``; returns its CIDv1 raw, checked against the bytes."""
        target = self.upload_target
        if target is None:
            raise NoUploadTargetError(NO_TARGET)
        if len(data) > MAX_BLOB:
            raise IpfsError(
                f"IPFS add refused: {len(data)} bytes exceed the {MAX_BLOB}-byte limit of a blob"
            )
        expected = cids.cid_v1_raw(data)
        answered = self._add_kubo(data, target) if self._api_url else self._add_pinata(data, target)
        if not _same_cid(answered, expected):
            raise IpfsError(
                f"IPFS add via {target} answered CID {answered!r}, but the {len(data)} bytes"
                f" hash to {expected}; not using it"
            )
        log.info("IPFS add: %d bytes pinned via %s as %s", len(data), target, expected)
        return expected

    def _add_kubo(self, data: bytes, target: str) -> str:
        params = {
            "cid-version": "1",
            "raw-leaves": "true",
            "pin": "true",
            "chunker": KUBO_CHUNKER,
        }
        response = self._post_upload(
            target,
            f"{self._api_url}/api/v0/add",
            params=params,
            files={"file": ("blob", data, "application/octet-stream")},
        )
        # Kubo streams one JSON object per line (one per file, then the wrapping ones).
        lines = [line for line in response.text.splitlines() if line.strip()]
        return _answer_field(target, lines[-1] if lines else "", "Hash")

    def _add_pinata(self, data: bytes, target: str) -> str:
        response = self._post_upload(
            target,
            f"{self._pinata_api_url}/pinning/pinFileToIPFS",
            headers={"Authorization": f"Bearer {self._pinata_jwt}"},
            data={"pinataOptions": json.dumps({"cidVersion": 1})},
            files={"file": ("blob", data, "application/octet-stream")},
        )
        return _answer_field(target, response.text, "IpfsHash")

    def _post_upload(self, target: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session.post(url, timeout=self._timeout, **kwargs)
        except requests.RequestException as exc:
            raise IpfsTransportError(f"IPFS add via {target}: {_transport_reason(exc)}") from None
        if response.status_code >= 500:
            raise IpfsTransportError(
                f"IPFS add via {target}: {_status_line(response)}{_short_body(response.content)}"
            )
        if response.status_code >= 400:
            raise IpfsError(
                f"IPFS add via {target} refused: "
                f"{_status_line(response)}{_short_body(response.content)}"
            )
        return response

    # --- download --------------------------------------------------------------------------

    def cat(self, cid: str) -> bytes:
        """The bytes ``cid`` names, from the first source whose answer matches it."""
        cid = cid.strip()
        cids.parse(cid)  # UnverifiableCidError now: no source could give checkable bytes
        sources = self._sources(cid)
        if not sources:
            raise IpfsError("IPFS cat: no source configured (ipfs_api_url or ipfs_gateway)")
        failures: list[tuple[str, IpfsError]] = []
        for source in sources:
            try:
                data = self._fetch(source)
                cids.verify(cid, data)
            except (CidMismatchError, UnverifiableCidError) as exc:
                log.warning("IPFS %s served bad bytes for %s: %s", source.label, cid, exc)
                failures.append((source.label, exc))
            except IpfsError as exc:
                log.info("IPFS %s could not serve %s: %s", source.label, cid, exc)
                failures.append((source.label, exc))
            else:
                log.debug("IPFS cat %s: %d bytes from %s", cid, len(data), source.label)
                return data
        raise _cat_failure(cid, failures)

    def _sources(self, cid: str) -> list[_Source]:
        sources = []
        if self._api_url:
            # ``timeout`` bounds Kubo's own search: it otherwise looks for a missing CID for
            # as long as the connection stays open.
            params = {"arg": cid, "timeout": f"{self._timeout:g}s"}
            label = f"kubo {display_url(self._api_url)}"
            sources.append(_Source(label, "POST", f"{self._api_url}/api/v0/cat", params))
        for gateway in self._gateways:
            url = f"{gateway}/ipfs/{quote(cid, safe='')}"
            sources.append(_Source(f"gateway {display_url(gateway)}", "GET", url))
        return sources

    def _fetch(self, source: _Source) -> bytes:
        """The answer's body; IpfsTransportError when the source fails to give one."""
        try:
            with self._session.request(
                source.method, source.url, params=source.params, stream=True, timeout=self._timeout
            ) as response:
                if response.status_code >= 400:
                    body = next(response.iter_content(512), b"")
                    raise IpfsTransportError(f"{_status_line(response)}{_short_body(body)}")
                return self._read_capped(response)
        except requests.RequestException as exc:
            raise IpfsTransportError(_transport_reason(exc)) from None

    def _read_capped(self, response: requests.Response) -> bytes:
        # requests' timeout bounds each read, not the whole body: a source that drips bytes
        # is cut off at the same timeout, overall.
        deadline = time.monotonic() + self._timeout
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_DOWNLOAD:
            raise IpfsError(f"answer of {declared} bytes exceeds the {MAX_DOWNLOAD}-byte cap")
        body = bytearray()
        for chunk in response.iter_content(_READ_SIZE):
            body += chunk
            if len(body) > MAX_DOWNLOAD:
                raise IpfsError(f"answer exceeds the {MAX_DOWNLOAD}-byte cap; cut off")
            if time.monotonic() > deadline:
                raise IpfsTransportError(f"answer not complete within {self._timeout:g} s")
        return bytes(body)


# --- helpers ----------------------------------------------------------------------------------


def _cat_failure(cid: str, failures: list[tuple[str, IpfsError]]) -> IpfsError:
    """One error for a download that failed everywhere: transient if any source was merely
    unreachable (it may yet serve the real bytes), permanent if every answer was wrong."""
    summary = "; ".join(f"{label}: {exc}" for label, exc in failures)
    errors = [exc for _label, exc in failures]
    if any(isinstance(exc, IpfsTransportError) for exc in errors):
        return IpfsTransportError(f"IPFS cat {cid}: no source served it: {summary}")
    if any(isinstance(exc, CidMismatchError) for exc in errors):
        return CidMismatchError(f"IPFS cat {cid}: every source served wrong bytes: {summary}")
    if all(isinstance(exc, UnverifiableCidError) for exc in errors):
        return UnverifiableCidError(f"IPFS cat {cid}: no answer could be checked: {summary}")
    return IpfsError(f"IPFS cat {cid}: no usable answer: {summary}")


def _same_cid(answered: str, expected: str) -> bool:
    # Compared parsed, so the same CID in another multibase still counts as the same.
    try:
        return cids.parse(answered) == cids.parse(expected)
    except UnverifiableCidError:
        return False


def _answer_field(target: str, text: str, name: str) -> str:
    try:
        value = json.loads(text).get(name)
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value:
        raise IpfsError(f"IPFS add via {target}: answer has no {name!r}: {_short_body(text)}")
    return value


def _transport_reason(exc: requests.RequestException) -> str:
    # The exception's text is not used: it holds the URL, credentials included.
    what = "timed out" if isinstance(exc, requests.Timeout) else "unreachable"
    return f"{what} ({type(exc).__name__})"


def _status_line(response: requests.Response) -> str:
    return f"HTTP {response.status_code} {response.reason or ''}".rstrip()


def _short_body(body: bytes | str) -> str:
    """A hint from an error answer, one line: Kubo's "Message", a "detail"/"error", or text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("Message", "detail", "error", "message"):
            if key in data:
                text = data[key] if isinstance(data[key], str) else json.dumps(data[key])
                break
    line = " ".join(text.split())[:200]
    return f": {line}" if line else ""


def kubo_base(url: str) -> str:
    return url.rstrip("/").removesuffix("/api/v0")


def _gateway_base(url: str) -> str:
    # "https://gw.example" and "https://gw.example/ipfs/" name the same gateway.
    return url.strip().rstrip("/").removesuffix("/ipfs")


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
