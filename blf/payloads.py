"""What job tasks carry between machines: small validated values, never a secret in the
clear. Keys travel only sealed with the cluster key (``blf.crypto.seal``); plaintext
prompts and outputs never travel at all.

GPU machines import this module, so it imports nothing of the operator side.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = [
    "InferenceFailure",
    "InferenceOrder",
    "InferenceOutcome",
    "InferenceResult",
    "JobTicket",
    "Role",
]

Role = Literal["leader", "verifier"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


def _sha256_hex(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise ValueError("must be 64 lowercase hex characters")
    return value


def _hex(value: str) -> str:
    if not _HEX.fullmatch(value):
        raise ValueError("must be lowercase hex bytes")
    return value


Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]
SealedHex = Annotated[str, AfterValidator(_hex), Field(max_length=512)]


class Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobTicket(Payload):
    """A job as the poller saw it: ids, CIDs and ciphertext handles, never a key."""

    job_id: str
    role: Role
    model_id: str
    prompt_cid: str
    deadline: int
    user_address: str | None = None
    insurance_opt_in: bool = False
    kp_high_handle: int | None = None
    kp_low_handle: int | None = None
    enqueued_at: float | None = None


class InferenceOrder(Payload):
    """Control → GPU: everything a GPU worker needs for one job, and nothing it could use
    for anything else. ``continuation`` is the one-time proof its answer must carry."""

    job_id: str
    role: Role
    model_id: str
    prompt_cid: str
    deadline: int
    sealed_prompt_key: SealedHex
    continuation: Annotated[str, Field(min_length=32, max_length=128)]
    dispatched_at: float


class InferenceResult(Payload):
    """GPU → control, success. The control side computes the commitment itself."""

    ok: Literal[True] = True
    job_id: str
    output_sha256: Sha256Hex
    # Leader only: where the encrypted output is, and its key sealed for the control side.
    output_cid: Annotated[str, Field(max_length=128)] | None = None
    sealed_output_key: SealedHex | None = None
    backend: Annotated[str, Field(max_length=200)] = ""
    queue_s: float = 0.0
    download_s: float = 0.0
    inference_s: float = 0.0
    upload_s: float = 0.0


class InferenceFailure(Payload):
    """GPU → control: the job cannot be done; ``reason`` is one line, never plaintext."""

    ok: Literal[False] = False
    job_id: str
    reason: Annotated[str, Field(max_length=500)]


InferenceOutcome = Annotated[InferenceResult | InferenceFailure, Field(discriminator="ok")]
