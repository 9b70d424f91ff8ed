"""Client for the ICL's node-facing REST API (protocol.md section 1), and its wire models.

Every request is signed: ``X-Signature`` is an EIP-191 signature over the exact body text
followed by the timestamp. Idempotent calls (reads, heartbeat) retry on connection errors
and 5xx with capped exponential backoff; calls that change job state never retry here:
the task layer decides what an ``IclTransportError`` means for those, knowing which
repeats are safe (a claim repeated for the same job id is the same claim; a result or a
verdict is never sent twice).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import requests
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from blf.errors import (
    IclProtocolError,
    IclStatusError,
    IclTransportError,
    NodeUnknownError,
)
from blf.wallet import sign_text

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "Assignment",
    "AttestationRequest",
    "Certificate",
    "Challenge",
    "ClaimGrant",
    "IclClient",
    "JobStatus",
    "LeaderResult",
    "Retry",
    "SubmissionAck",
    "Timeout",
    "Verdict",
    "parse_handle",
    "probe",
]

log = logging.getLogger(__name__)


# --- transport policy --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Timeout:
    """Seconds to wait for the connection and for the answer."""

    connect: float = 5.0
    read: float = 15.0

    def as_requests(self) -> tuple[float, float]:
        return (self.connect, self.read)


@dataclass(frozen=True, kw_only=True)
class Retry:
    """Attempts for idempotent calls; delay = min(backoff * 2**n, backoff_max), jittered."""

    attempts: int = 4
    backoff: float = 0.5
    backoff_max: float = 8.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, not {self.attempts}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("Retry.backoff and Retry.backoff_max must not be negative")

    def delay(self, attempt: int) -> float:
        capped = min(self.backoff * (2**attempt), self.backoff_max)
        return random.uniform(capped / 2, capped) if self.jitter else capped


DEFAULT_TIMEOUT = Timeout()
DEFAULT_RETRY = Retry()
NO_RETRY = Retry(attempts=1)


# --- wire models -------------------------------------------------------------------------


def parse_handle(value: Any) -> int | None:
    """CoFHE handles come as int, decimal string or ``0x`` hex depending on the endpoint."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("a handle is a number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    raise ValueError(f"unsupported handle {value!r}")


def _checksum(value: Any) -> Any:
    return to_checksum_address(value) if isinstance(value, str) and value else value


Handle = Annotated[int | None, BeforeValidator(parse_handle)]
Address = Annotated[str, BeforeValidator(_checksum)]


class Wire(BaseModel):
    """Answers may grow fields; we keep what we do not use rather than fail on it."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Challenge(Wire):
    challenge_id: str = Field(alias="challengeId")
    nonce: str
    expires_at: int = Field(alias="expiresAt")


class AttestationRequest(Wire):
    node_address: Address = Field(alias="nodeAddress")
    backend_type: str = Field(alias="backendType")
    quote: str
    runtime_hash: str = Field(alias="runtimeHash")
    challenge_id: str = Field(alias="challengeId")
    supported_model_ids: list[str] = Field(alias="supportedModelIds")


class Certificate(Wire):
    cert_hash: str = Field(alias="certHash")
    expiry: int
    tier: int


class HeartbeatRequest(Wire):
    node_address: Address = Field(alias="nodeAddress")
    timestamp: str


class Assignment(Wire):
    job_id: str = Field(alias="jobId")
    role: Literal["leader", "verifier"]
    model_id: str = Field(alias="modelId")
    prompt_cid: str = Field(alias="promptCid")
    deadline: int
    insurance_opt_in: bool = Field(False, alias="insuranceOptIn")
    user_address: Address | None = Field(None, alias="userAddress")
    kp_high_handle: Handle = Field(None, alias="kpHighHandle")
    kp_low_handle: Handle = Field(None, alias="kpLowHandle")


class AssignmentList(Wire):
    assignments: list[Assignment]


class ClaimRequest(Wire):
    job_id: str = Field(alias="jobId")
    node_address: Address = Field(alias="nodeAddress")


class ClaimGrant(Wire):
    kp_high_handle: Handle = Field(None, alias="kpHighHandle")
    kp_low_handle: Handle = Field(None, alias="kpLowHandle")
    output_key_granted: bool = Field(False, alias="outputKeyGranted")
    claim_deadline: int | None = Field(None, alias="claimDeadline")


class EncryptedInput(Wire):
    ct_hash: str = Field(alias="ctHash")
    security_zone: int = Field(0, alias="securityZone")
    utype: int = 6
    signature: str


class EncryptedKeyInputs(Wire):
    high: EncryptedInput
    low: EncryptedInput


class LeaderResult(Wire):
    job_id: str = Field(alias="jobId")
    output_cid: str
    commitment_hash: str
    encrypted_output_key_high: str
    encrypted_output_key_low: str
    encrypted_output_key_inputs: EncryptedKeyInputs
    output_key_store_tx: str | None = None


class Verdict(Wire):
    job_id: str = Field(alias="jobId")
    verifier_address: Address
    commitment_hash: str
    verdict: Literal["CONFIRM", "REJECT"]
    confidence: int = Field(ge=0, le=100)


class SubmissionAck(Wire):
    status: str
    job_id: str | None = None
    task_id: str | None = None
    finalized: bool = False


class JobStatus(Wire):
    job_id: str = Field(alias="jobId")
    status: str
    output_cid: str | None = Field(None, alias="outputCid")
    leader_commitment: str | None = Field(None, alias="leaderCommitment")
    failure_reason: Any = Field(None, alias="failureReason")
    node_assignments: Any = Field(None, alias="nodeAssignments")

    def submitted_by(self, address: str) -> bool | None:
        """Whether the ICL has this node's submission, when its answer says (the devnet's
        ``nodeAssignments.submitted`` does); None when it cannot tell."""
        listed = (
            self.node_assignments.get("submitted")
            if isinstance(self.node_assignments, dict)
            else None
        )
        if not isinstance(listed, list):
            return None
        return to_checksum_address(address) in {str(a) for a in listed}


class StatusAck(Wire):
    status: str


M = TypeVar("M", bound=BaseModel)


# --- the client --------------------------------------------------------------------------


class IclClient:
    """Typed, signed calls to one ICL. Thread-safe for use from Celery's pool."""

    def __init__(
        self,
        base_url: str,
        *,
        account: LocalAccount,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: Retry = DEFAULT_RETRY,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.address: str = to_checksum_address(account.address)
        self._account = account
        self._timeout = timeout
        self._retry = retry
        self._session = session or requests.Session()
        self._clock = clock
        self._sleep = sleep

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> IclClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # endpoints ---------------------------------------------------------------------------

    def challenge(self) -> Challenge:
        return self._call("GET", f"/internal/challenge/{self.address}", Challenge)

    def verify_attestation(self, request: AttestationRequest) -> Certificate:
        # A challenge is single-use, so a retry here could only fail: never retried.
        return self._call(
            "POST", "/internal/attestation/verify", Certificate, body=request, retry=NO_RETRY
        )

    def heartbeat(self, *, retry: Retry | None = None) -> StatusAck:
        body = HeartbeatRequest(node_address=self.address, timestamp=str(int(self._clock())))
        return self._call("POST", "/internal/heartbeat", StatusAck, body=body, retry=retry)

    def assignments(self, *, retry: Retry | None = None) -> list[Assignment]:
        path = f"/internal/assignments/{self.address}"
        try:
            answer = self._call("GET", path, AssignmentList, retry=retry)
        except IclStatusError as exc:
            if exc.status in (401, 404):
                raise NodeUnknownError(
                    f"ICL does not know node {self.address} ({exc.status} on {exc.url}); re-attest",
                    method="GET",
                    url=exc.url,
                    status=exc.status,
                    body=exc.body,
                ) from None
            raise
        return answer.assignments

    def claim(self, job_id: str) -> ClaimGrant:
        body = ClaimRequest(job_id=job_id, node_address=self.address)
        return self._call("POST", "/internal/task/claim", ClaimGrant, body=body, retry=NO_RETRY)

    def submit_result(self, result: LeaderResult) -> SubmissionAck:
        return self._call(
            "POST", "/internal/task/result", SubmissionAck, body=result, retry=NO_RETRY
        )

    def submit_verdict(self, verdict: Verdict) -> SubmissionAck:
        return self._call(
            "POST", "/internal/task/verify", SubmissionAck, body=verdict, retry=NO_RETRY
        )

    def job_status(self, job_id: str, *, retry: Retry | None = None) -> JobStatus:
        return self._call("GET", f"/internal/jobs/{job_id}/status", JobStatus, retry=retry)

    # plumbing ----------------------------------------------------------------------------

    def signed_headers(self, body_text: str) -> dict[str, str]:
        timestamp = str(int(self._clock()))
        return {
            "Content-Type": "application/json",
            "X-Node-Address": self.address,
            "X-Timestamp": timestamp,
            "X-Signature": sign_text(self._account, body_text + timestamp),
        }

    def _call(
        self,
        method: str,
        path: str,
        answer: type[M],
        *,
        body: BaseModel | None = None,
        retry: Retry | None = None,
    ) -> M:
        body_text = "" if body is None else _encode(body)
        response = self._send(method, self.base_url + path, body_text, retry or self._retry)
        return _decode(response, answer, method)

    def _send(self, method: str, url: str, body_text: str, retry: Retry) -> requests.Response:
        for attempt in range(retry.attempts):
            last = attempt == retry.attempts - 1
            try:
                response = self._send_once(method, url, body_text)
            except IclTransportError as exc:
                if last:
                    raise
                delay = retry.delay(attempt)
                log.debug("%s; retrying in %.1fs", exc, delay)
                self._sleep(delay)
                continue
            return response
        raise AssertionError("unreachable: Retry.attempts must be >= 1")

    def _send_once(self, method: str, url: str, body_text: str) -> requests.Response:
        log.debug("ICL %s %s %s", method, url, body_text)
        try:
            response = self._session.request(
                method,
                url,
                data=body_text.encode("utf-8") if body_text else None,
                headers=self.signed_headers(body_text),
                timeout=self._timeout.as_requests(),
            )
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise IclTransportError(
                f"ICL unreachable: {method} {url} failed ({reason})", method=method, url=url
            ) from exc
        log.debug("ICL %s %s -> %s %s", method, url, response.status_code, response.text[:2000])
        if response.status_code >= 500:
            raise IclTransportError(
                f"ICL {response.status_code} {response.reason} for {method} {url}",
                method=method,
                url=url,
            )
        if response.status_code >= 400:
            raise IclStatusError(
                f"ICL {response.status_code} {response.reason} for {method} {url}: "
                f"{_detail(response)}",
                method=method,
                url=url,
                status=response.status_code,
                body=response.text[:2000],
            )
        return response


def probe(base_url: str, *, timeout: float = 3.0) -> str | None:
    """None when an HTTP server answers at ``base_url`` (any status), else why not."""
    try:
        requests.get(base_url.rstrip("/") + "/", timeout=timeout)
    except requests.RequestException as exc:
        return type(exc).__name__
    return None


def _encode(body: BaseModel) -> str:
    # The signature covers these exact bytes, so the text is built once and sent verbatim.
    return json.dumps(body.model_dump(by_alias=True, exclude_none=True), separators=(",", ":"))


def _decode(response: requests.Response, answer: type[M], method: str) -> M:
    try:
        return answer.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        summary = str(exc).splitlines()[0]
        raise IclProtocolError(
            f"ICL answered {method} {response.url} with an unexpected body: {summary}",
            method=method,
            url=response.url,
        ) from None


def _detail(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or "(empty body)"
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:200]
    return json.dumps(data)[:200]
