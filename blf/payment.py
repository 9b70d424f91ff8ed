"""The payment service: what this node earned, per job and in total (read only).

REST shape (protocol.md section 7): ``GET /v1/nodes/{address}/jobs?limit=N`` answers
``{"jobs": [{"job_id", "role", "status", "amount_blind_earned": number|null}]}`` and
``GET /v1/nodes/{address}/earnings`` answers ``{"total_blind_earned": number,
"jobs_count": int}``. Rewards are paid on completion, so there is nothing to claim: the
node only ever reads. Amounts are parsed as ``Decimal`` so a BLIND amount is shown as the
service wrote it, not as the nearest binary float.
"""

from __future__ import annotations

from decimal import Decimal
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import requests
from eth_utils import is_address, to_checksum_address
from pydantic import BaseModel, ConfigDict, ValidationError

from blf.errors import (
    PaymentError,
    PaymentProtocolError,
    PaymentStatusError,
    PaymentTransportError,
)
from blf.redact import display_url

__all__ = ["DEFAULT_TIMEOUT_S", "Earnings", "PaymentClient", "PaymentJob"]

M = TypeVar("M", bound=BaseModel)

# The CLI waits on this; a service that has not answered in this long is "unreachable".
DEFAULT_TIMEOUT_S = 10.0


class PaymentJob(BaseModel):
    """One job as the payment service sees it; ``None`` earned: not paid (yet)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str
    role: str | None = None
    status: str | None = None
    amount_blind_earned: Decimal | None = None


class _JobsPage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    jobs: list[PaymentJob]


class Earnings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    total_blind_earned: Decimal
    jobs_count: int


class PaymentClient:
    """``PaymentClient(base_url, *, timeout_s, session=None)``; a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = session or requests.Session()
        self._owns_session = session is None

    @property
    def display_url(self) -> str:
        return display_url(self.base_url)

    def jobs(self, address: str, *, limit: int = 20) -> list[PaymentJob]:
        body = self._get(f"/v1/nodes/{_address(address)}/jobs", params={"limit": limit})
        return self._parse(_JobsPage, body, "jobs").jobs

    def earnings(self, address: str) -> Earnings:
        body = self._get(f"/v1/nodes/{_address(address)}/earnings")
        return self._parse(Earnings, body, "earnings")

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        shown = self.display_url + path
        try:
            response = self._session.get(url, params=params, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise PaymentTransportError(
                f"payment service {self.display_url} unreachable: {_reason(exc, self.timeout_s)}",
                url=shown,
            ) from exc
        if response.status_code >= 500:
            raise PaymentTransportError(
                f"payment service {response.status_code} for GET {shown}", url=shown
            )
        if response.status_code >= 400:
            raise PaymentStatusError(
                f"payment service {response.status_code} for GET {shown}",
                url=shown,
                status=response.status_code,
            )
        try:
            return response.json(parse_float=Decimal)
        except ValueError:
            raise PaymentProtocolError(
                f"payment service answered GET {shown} with something that is not JSON", url=shown
            ) from None

    def _parse(self, model: type[M], body: Any, what: str) -> M:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(body)"
            raise PaymentProtocolError(
                f"payment service {self.display_url}: unexpected {what} answer "
                f"({where}: {first['msg']})",
                url=self.base_url,
            ) from None


def _address(address: str) -> str:
    if not is_address(address):
        raise PaymentError(f"invalid node address {address!r}")
    return quote(str(to_checksum_address(address)))


def _reason(err: requests.RequestException, timeout_s: float) -> str:
    # Not str(err): urllib3 repeats the URL there, query string (a token, maybe) included.
    if isinstance(err, requests.Timeout):
        return f"no answer within {timeout_s:g}s"
    if isinstance(err, requests.ConnectionError):
        return "connection failed"
    return type(err).__name__
