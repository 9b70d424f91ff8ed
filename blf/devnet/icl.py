"""A local ICL (coordinator) that speaks the node-facing wire protocol of protocol.md §1.

It exists so that a node can be run and tested end to end without the public network. It is
faithful where a node could tell the difference (paths, shapes, status codes, the order in which
assignments appear, how commitments are tallied) and stricter where the public ICL is naive:

- every ``/internal`` request must carry a valid, fresh EIP-191 signature (401 otherwise), and
  the signer must be the node named in the path or body;
- addresses in paths and bodies must be EIP-55 checksummed (400 otherwise), because the public
  ICL compares them as strings and silently mis-assigns roles when they are not.

An unsigned admin API under ``/admin`` lets a test or a person submit jobs, dispute them and
inspect everything the ICL saw. The node never imports this module: it talks to it over HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict, Unpack

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from blf.devnet._sig import SignatureRejected, check_signed_request
from blf.devnet.icl_wire import (
    AttestationRequest,
    ClaimRequest,
    HeartbeatRequest,
    KeyGrants,
    NewJobRequest,
    ResultRequest,
    VerdictRequest,
    checksummed,
    one_line,
    parse,
)
from blf.devnet.server import DevnetError, LocalServer, install_error_handler
from blf.devnet.server import serve as serve_app

__all__ = [
    "DEFAULT_MOCK_ATTESTATION_KEY",
    "AppOptions",
    "DevnetError",
    "DevnetIcl",
    "DevnetState",
    "create_app",
    "serve",
]

DEFAULT_MOCK_ATTESTATION_KEY = "weloveblindference"
CHALLENGE_TTL_S = 300
QUORUM_SIZE = 3  # one leader and two verifiers
VOTES_TO_DECIDE = 2  # of the QUORUM_SIZE commitments, the leader's included

QUEUED = "QUEUED"
ACCEPTED = "ACCEPTED"
REJECTED = "REJECTED"
DISPUTED = "DISPUTED"
TIMEDOUT = "TIMEDOUT"


# --------------------------------------------------------------------------- state


@dataclass
class Challenge:
    challenge_id: str
    address: str
    nonce: bytes
    expires_at: int
    used: bool = False


@dataclass
class Operator:
    address: str
    models: list[str]
    tier: int
    cert_hash: str
    expiry: int
    runtime_hash: str
    backend: str
    attested_at: float
    last_seen: float  # last attestation or heartbeat: what liveness is judged on
    heartbeats: list[float] = field(default_factory=list)  # explicit /heartbeat calls only
    attestations: int = 1
    polls: int = 0


@dataclass
class LeaderResult:
    output_cid: str
    commitment_hash: str
    encrypted_output_key_high: str
    encrypted_output_key_low: str
    encrypted_output_key_inputs: dict[str, Any]
    output_key_store_tx: str | None
    submitted_at: float


@dataclass
class Verdict:
    commitment_hash: str
    verdict: str
    confidence: float
    submitted_at: float


@dataclass
class Job:
    job_id: str
    model_id: str
    prompt_cid: str
    kp_high: int
    kp_low: int
    user_address: str
    insurance_opt_in: bool
    created_at: float
    deadline: int
    leader: str
    verifiers: list[str]
    task_ids: dict[str, str]
    status: str = QUEUED
    failure_reason: str | None = None
    finalized_at: float | None = None
    result: LeaderResult | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    claims: dict[str, int] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)  # times listed to each node
    result_posts: int = 0  # every POST /task/result, repeats included: exactly-once checks
    verdict_posts: dict[str, int] = field(default_factory=dict)

    @property
    def quorum(self) -> list[str]:
        return [self.leader, *self.verifiers]

    def role_of(self, address: str) -> str | None:
        if address == self.leader:
            return "leader"
        return "verifier" if address in self.verifiers else None


class DevnetState:
    """Everything the devnet ICL knows, in memory; every method takes the lock.

    Methods raise DevnetError for refusals, and return JSON-ready dicts in the wire shapes.
    """

    def __init__(
        self,
        *,
        mock_attestation_key: str,
        cert_ttl_s: int,
        liveness_window_s: int,
        verifiers_wait_for_leader: bool,
        relist_claimed: bool,
        clock: Callable[[], float],
        grants: KeyGrants | None = None,
    ):
        self.mock_attestation_key = mock_attestation_key
        self.cert_ttl_s = cert_ttl_s
        self.liveness_window_s = liveness_window_s
        self.verifiers_wait_for_leader = verifiers_wait_for_leader
        self.relist_claimed = relist_claimed
        self.clock = clock
        self.grants = grants
        self.lock = threading.Lock()
        self.rng = random.Random()  # seed it for a reproducible quorum choice
        self.challenges: dict[str, Challenge] = {}
        self.nodes: dict[str, Operator] = {}
        self.jobs: dict[str, Job] = {}

    def reset(self) -> None:
        """Forget every node, challenge and job, as a restarted ICL would."""
        with self.lock:
            self.challenges.clear()
            self.nodes.clear()
            self.jobs.clear()

    # ---- attestation

    def issue_challenge(self, signer: str, address: str) -> dict[str, Any]:
        _require_signer(signer, address, "the address in the path")
        with self.lock:
            expires_at = int(self.clock()) + CHALLENGE_TTL_S
            challenge = Challenge(str(uuid.uuid4()), address, secrets.token_bytes(32), expires_at)
            self.challenges[challenge.challenge_id] = challenge
        return {
            "challengeId": challenge.challenge_id,
            "nonce": "0x" + challenge.nonce.hex(),
            "expiresAt": challenge.expires_at,
        }

    def verify_attestation(self, signer: str, req: AttestationRequest) -> dict[str, Any]:
        _require_signer(signer, req.nodeAddress, "nodeAddress")
        if req.backendType != "mock":
            raise DevnetError(400, f"backend {req.backendType} not supported by devnet")
        with self.lock:
            now = self.clock()
            challenge = self._usable_challenge(req.challengeId, req.nodeAddress, now)
            expected = hmac.new(
                self.mock_attestation_key.encode(), challenge.nonce, hashlib.sha256
            ).digest()
            if not hmac.compare_digest(expected, bytes.fromhex(req.quote)):
                raise DevnetError(401, "mock quote does not match: wrong MOCK_ATTESTATION_KEY?")
            challenge.used = True
            node = self._register(req, challenge, now)
        return {"certHash": node.cert_hash, "expiry": node.expiry, "tier": node.tier}

    def _usable_challenge(self, challenge_id: str, address: str, now: float) -> Challenge:
        challenge = self.challenges.get(challenge_id)
        if challenge is None:
            raise DevnetError(401, f"unknown challenge {challenge_id}")
        if challenge.address != address:
            raise DevnetError(401, f"challenge {challenge_id} was issued to {challenge.address}")
        if challenge.used:
            raise DevnetError(401, f"challenge {challenge_id} was already used")
        if now > challenge.expires_at:
            raise DevnetError(401, f"challenge {challenge_id} expired at {challenge.expires_at}")
        return challenge

    def _register(self, req: AttestationRequest, challenge: Challenge, now: float) -> Operator:
        # Unique per attestation: the nonce is fresh, so re-attesting yields a new certificate.
        cert_hash = (
            "0x"
            + hashlib.sha256(
                bytes.fromhex(req.nodeAddress[2:])
                + challenge.nonce
                + bytes.fromhex(req.runtimeHash)
            ).hexdigest()
        )
        previous = self.nodes.get(req.nodeAddress)
        node = Operator(
            address=req.nodeAddress,
            models=list(req.supportedModelIds),
            tier=0,
            cert_hash=cert_hash,
            expiry=int(now) + self.cert_ttl_s,
            runtime_hash=req.runtimeHash,
            backend=req.backendType,
            attested_at=now,
            last_seen=now,
        )
        if previous is not None:  # keep the history tests count
            node.heartbeats = previous.heartbeats
            node.polls = previous.polls
            node.attestations = previous.attestations + 1
        self.nodes[node.address] = node
        return node

    # ---- liveness and polling

    def heartbeat(self, signer: str, req: HeartbeatRequest) -> dict[str, Any]:
        _require_signer(signer, req.nodeAddress, "nodeAddress")
        with self.lock:
            node = self.nodes.get(req.nodeAddress)
            # Like the public ICL: an unknown node gets 200 and nothing happens.
            if node is not None:
                now = self.clock()
                node.heartbeats.append(now)
                node.last_seen = now
        return {"status": "ok"}

    def assignments(self, signer: str, address: str) -> dict[str, Any]:
        _require_signer(signer, address, "the address in the path")
        with self.lock:
            node = self.nodes.get(address)
            if node is None:
                raise DevnetError(404, "node not registered")
            node.polls += 1
            now = self.clock()
            listed = []
            for job in self.jobs.values():
                self._expire(job, now)
                if self._is_listed(job, address):
                    job.polls[address] += 1
                    listed.append(_assignment(job, address))
        return {"assignments": listed}

    def _is_listed(self, job: Job, address: str) -> bool:
        role = job.role_of(address)
        if job.status != QUEUED or role is None:
            return False
        if job.claims[address] and not self.relist_claimed:
            return False
        if role == "leader":
            return job.result is None
        if address in job.verdicts:
            return False
        return job.result is not None or not self.verifiers_wait_for_leader

    # ---- job pipeline

    def claim(self, signer: str, req: ClaimRequest) -> dict[str, Any]:
        _require_signer(signer, req.nodeAddress, "nodeAddress")
        with self.lock:
            job = self._job(req.jobId)
            role = job.role_of(req.nodeAddress)
            if role is None:
                raise DevnetError(
                    400, f"{req.nodeAddress} is not in the quorum of job {job.job_id}"
                )
            # A repeated claim is answered the same; the count lets tests catch double claims.
            job.claims[req.nodeAddress] += 1
        return {
            "kpHighHandle": job.kp_high,
            "kpLowHandle": job.kp_low,
            "outputKeyGranted": role == "leader",
            "claimDeadline": job.deadline,
        }

    def submit_result(self, signer: str, req: ResultRequest) -> dict[str, Any]:
        with self.lock:
            job = self._job(req.jobId)
            if signer != job.leader:
                raise DevnetError(400, f"{signer} is not the leader of job {job.job_id}")
            job.result_posts += 1
            committed = False
            if job.result is None:
                self._grant_output_key(job, req)
                job.result = LeaderResult(
                    output_cid=req.output_cid,
                    commitment_hash=req.commitment_hash,
                    encrypted_output_key_high=req.encrypted_output_key_high,
                    encrypted_output_key_low=req.encrypted_output_key_low,
                    encrypted_output_key_inputs=req.encrypted_output_key_inputs.model_dump(),
                    output_key_store_tx=req.output_key_store_tx,
                    submitted_at=self.clock(),
                )
                committed = self._tally(job)
            elif (job.result.output_cid, job.result.commitment_hash) != (
                req.output_cid,
                req.commitment_hash,
            ):
                raise DevnetError(400, f"job {job.job_id} already has a different leader result")
        return {
            "status": "committed" if committed else "leader_result_recorded",
            "job_id": job.job_id,
            "task_id": job.task_ids[signer],
            "commitment_hash": req.commitment_hash,
            "finalized": job.status != QUEUED,
        }

    def submit_verdict(self, signer: str, req: VerdictRequest) -> dict[str, Any]:
        _require_signer(signer, req.verifier_address, "verifier_address")
        with self.lock:
            job = self._job(req.jobId)
            address = req.verifier_address
            if address not in job.verifiers:
                raise DevnetError(400, f"{address} is not a verifier of job {job.job_id}")
            job.verdict_posts[address] = job.verdict_posts.get(address, 0) + 1
            committed = False
            previous = job.verdicts.get(address)
            if previous is None:
                job.verdicts[address] = Verdict(
                    req.commitment_hash, req.verdict, req.confidence, self.clock()
                )
                committed = self._tally(job)
            elif previous.commitment_hash != req.commitment_hash:
                raise DevnetError(400, f"{address} already sent another verdict for {job.job_id}")
        return {
            "status": "committed" if committed else "verifier_verdict_recorded",
            "job_id": job.job_id,
            "task_id": job.task_ids[address],
            "verifier_address": address,
            "finalized": job.status != QUEUED,
        }

    def job_status(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self._job(job_id)
            return {
                "jobId": job.job_id,
                "status": job.status,
                "outputCid": job.result.output_cid if job.result else None,
                "leaderCommitment": job.result.commitment_hash if job.result else None,
                "failureReason": job.failure_reason,
                "nodeAssignments": {
                    "leader": job.leader,
                    "verifiers": list(job.verifiers),
                    # Not in the public ICL's answer: lets a node settle an ambiguous send.
                    "submitted": _submitted(job),
                },
            }

    def _grant_output_key(self, job: Job, req: ResultRequest) -> None:
        # The public network grants the user on chain (PromptKeyStore.storeOutputKey); the
        # JSON-RPC form has no grant call, so the devnet grants when it records the result.
        if self.grants is None:
            return
        for handle in (req.encrypted_output_key_high, req.encrypted_output_key_low):
            try:
                self.grants.grant(int(handle), [job.user_address])
            except (KeyError, ValueError, DevnetError) as exc:
                raise DevnetError(400, f"output key handle {handle} unknown to CoFHE") from exc

    def _job(self, job_id: str) -> Job:
        """The job, brought up to date with the clock (caller holds the lock)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise DevnetError(404, f"job {job_id} not found")
        self._expire(job, self.clock())
        return job

    def _expire(self, job: Job, now: float) -> None:
        # The public ICL notices a deadline only when someone reads the job; so does this one.
        if job.status == QUEUED and now > job.deadline:
            self._finalize(job, TIMEDOUT, "deadline passed before a decision", now)

    def _tally(self, job: Job) -> bool:
        """Decide the job if the votes allow it; True when this call decided it.

        Only commitment equality counts (the verdict word is advisory), and nothing is decided
        before the leader's result is in: early verdicts wait for it.
        """
        if job.status != QUEUED or job.result is None:
            return False
        votes = [job.result.commitment_hash] + [v.commitment_hash for v in job.verdicts.values()]
        if max(Counter(votes).values()) >= VOTES_TO_DECIDE:
            self._finalize(job, ACCEPTED, None, self.clock())
            return True
        if len(job.verdicts) == len(job.verifiers):
            reason = f"no commitment reached {VOTES_TO_DECIDE} of {QUORUM_SIZE} votes"
            self._finalize(job, REJECTED, reason, self.clock())
            return True
        return False

    @staticmethod
    def _finalize(job: Job, status: str, reason: str | None, now: float) -> None:
        job.status = status
        job.failure_reason = reason
        job.finalized_at = now

    # ---- admin

    def create_job(self, req: NewJobRequest) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            live = sorted(a for a, n in self.nodes.items() if self._eligible(n, req.modelId, now))
            if len(live) < QUORUM_SIZE:
                raise DevnetError(
                    409,
                    f"only {len(live)} live attested node(s) serve model {req.modelId!r};"
                    f" a job needs {QUORUM_SIZE} (attested, certificate valid, heartbeat within"
                    f" {self.liveness_window_s} s)",
                )
            leader, *verifiers = self._quorum(req, live)
            self._grant_prompt_key(req, [leader, *verifiers])
            job = Job(
                job_id=secrets.token_hex(32),
                model_id=req.modelId,
                prompt_cid=req.promptCid,
                kp_high=req.kpHighHandle,
                kp_low=req.kpLowHandle,
                user_address=req.userAddress,
                insurance_opt_in=req.insuranceOptIn,
                created_at=now,
                deadline=int(now) + req.deadlineSeconds,
                leader=leader,
                verifiers=verifiers,
                task_ids={a: uuid.uuid4().hex for a in (leader, *verifiers)},
            )
            job.claims = dict.fromkeys(job.quorum, 0)
            job.polls = dict.fromkeys(job.quorum, 0)
            self.jobs[job.job_id] = job
        return {"jobId": job.job_id, "leader": leader, "verifiers": verifiers}

    def _quorum(self, req: NewJobRequest, live: list[str]) -> list[str]:
        if req.quorum is None:
            return self.rng.sample(live, QUORUM_SIZE)
        idle = [a for a in req.quorum if a not in live]
        if idle or len(set(req.quorum)) != QUORUM_SIZE:
            raise DevnetError(409, f"quorum must be {QUORUM_SIZE} distinct live nodes: {idle}")
        return list(req.quorum)

    def _grant_prompt_key(self, req: NewJobRequest, quorum: list[str]) -> None:
        if self.grants is None:
            return
        for handle in (req.kpHighHandle, req.kpLowHandle):
            try:
                self.grants.grant(handle, quorum)
            except (KeyError, DevnetError) as exc:
                raise DevnetError(400, f"prompt key handle {handle} unknown to CoFHE") from exc

    def _eligible(self, node: Operator, model_id: str, now: float) -> bool:
        return model_id in node.models and self._is_live(node, now)

    def _is_live(self, node: Operator, now: float) -> bool:
        # Stricter than the public ICL, which keeps picking silent nodes while their
        # certificate is valid: here a job only goes to nodes that can answer it.
        return node.expiry > now and now - node.last_seen <= self.liveness_window_s

    def dispute(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            job = self._job(job_id)
            self._finalize(job, DISPUTED, "disputed via admin", self.clock())
            return _job_record(job)

    def job_record(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            return _job_record(self._job(job_id))

    def job_records(self) -> dict[str, Any]:
        with self.lock:
            return {"jobs": [_job_record(self._job(job_id)) for job_id in self.jobs]}

    def node_records(self) -> dict[str, Any]:
        with self.lock:
            now = self.clock()
            return {"nodes": [self._node_record(n, now) for n in self.nodes.values()]}

    def _node_record(self, node: Operator, now: float) -> dict[str, Any]:
        return {
            "address": node.address,
            "models": list(node.models),
            "tier": node.tier,
            "certHash": node.cert_hash,
            "expiry": node.expiry,
            "runtimeHash": node.runtime_hash,
            "heartbeats": list(node.heartbeats),
            "lastSeen": node.last_seen,
            "attestations": node.attestations,
            "polls": node.polls,
            "live": self._is_live(node, now),
        }


def _require_signer(signer: str, address: str, where: str) -> None:
    if signer != address:
        raise DevnetError(401, f"request signed by {signer}, but {where} is {address}")


def _assignment(job: Job, address: str) -> dict[str, Any]:
    return {
        "jobId": job.job_id,
        "role": job.role_of(address),
        "modelId": job.model_id,
        "promptCid": job.prompt_cid,
        "deadline": job.deadline,
        "insuranceOptIn": job.insurance_opt_in,
        "userAddress": job.user_address,
        # The public ICL sends handles as hex strings here (and as ints from claim).
        "kpHighHandle": hex(job.kp_high),
        "kpLowHandle": hex(job.kp_low),
    }


def _submitted(job: Job) -> list[str]:
    return ([job.leader] if job.result else []) + list(job.verdicts)


def _job_record(job: Job) -> dict[str, Any]:
    result = None
    if job.result is not None:
        r = job.result
        result = {
            "output_cid": r.output_cid,
            "commitment_hash": r.commitment_hash,
            "encrypted_output_key_high": r.encrypted_output_key_high,
            "encrypted_output_key_low": r.encrypted_output_key_low,
            "encrypted_output_key_inputs": r.encrypted_output_key_inputs,
            "output_key_store_tx": r.output_key_store_tx,
            "submittedAt": r.submitted_at,
        }
    return {
        "jobId": job.job_id,
        "status": job.status,
        "failureReason": job.failure_reason,
        "modelId": job.model_id,
        "promptCid": job.prompt_cid,
        "kpHighHandle": job.kp_high,
        "kpLowHandle": job.kp_low,
        "userAddress": job.user_address,
        "insuranceOptIn": job.insurance_opt_in,
        "createdAt": job.created_at,
        "deadline": job.deadline,
        "finalizedAt": job.finalized_at,
        "leader": job.leader,
        "verifiers": list(job.verifiers),
        "outputCid": job.result.output_cid if job.result else None,
        "leaderCommitment": job.result.commitment_hash if job.result else None,
        "result": result,
        "verdicts": {
            a: {
                "commitment_hash": v.commitment_hash,
                "verdict": v.verdict,
                "confidence": v.confidence,
                "submittedAt": v.submitted_at,
            }
            for a, v in job.verdicts.items()
        },
        "claims": dict(job.claims),
        "polls": dict(job.polls),
        "resultPosts": job.result_posts,
        "verdictPosts": dict(job.verdict_posts),
    }


# --------------------------------------------------------------------------- the app


class AppOptions(TypedDict, total=False):
    """Keyword options of create_app, accepted unchanged by DevnetIcl and serve."""

    mock_attestation_key: str | None
    cert_ttl_s: int
    liveness_window_s: int
    verifiers_wait_for_leader: bool
    relist_claimed: bool
    clock: Callable[[], float]
    grants: KeyGrants | None


@dataclass(frozen=True)
class Signed:
    """A request whose signature checked out: who signed it, and the exact bytes signed."""

    signer: str
    body: bytes


def create_app(
    *,
    mock_attestation_key: str | None = None,
    cert_ttl_s: int = 86400,
    liveness_window_s: int = 300,
    verifiers_wait_for_leader: bool = True,
    relist_claimed: bool = False,
    clock: Callable[[], float] = time.time,
    grants: KeyGrants | None = None,
) -> FastAPI:
    """Build the devnet ICL app; its state is ``app.state.devnet`` (a DevnetState).

    ``verifiers_wait_for_leader=False`` mimics older ICLs that list verifiers at once;
    ``relist_claimed=True`` mimics ICLs that keep listing a claimed job while it is QUEUED.
    """
    key = mock_attestation_key
    if key is None:
        key = os.environ.get("MOCK_ATTESTATION_KEY") or DEFAULT_MOCK_ATTESTATION_KEY
    state = DevnetState(
        mock_attestation_key=key,
        cert_ttl_s=cert_ttl_s,
        liveness_window_s=liveness_window_s,
        verifiers_wait_for_leader=verifiers_wait_for_leader,
        relist_claimed=relist_claimed,
        clock=clock,
        grants=grants,
    )
    app = FastAPI(title="Blindference devnet ICL")
    app.state.devnet = state
    install_error_handler(app)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.include_router(_internal_router(state))
    app.add_api_route("/", _service_info, methods=["GET"])
    app.include_router(_admin_router(state))
    return app


def _service_info() -> dict[str, Any]:
    return {"service": "blindference devnet icl", "protocol": "/internal", "admin": "/admin"}


async def _validation_error_response(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI answers 422; the node treats any 4xx alike, and 400 is what the ICL sends.
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": one_line(exc)}, status_code=400)


async def _signed(request: Request) -> Signed:
    # The body is read once, as bytes; the signature and the parsed model both come from it.
    state: DevnetState = request.app.state.devnet
    try:
        raw = await request.body()
    except ClientDisconnect as exc:  # the node went away mid-request (killed, timed out)
        raise DevnetError(400, "client disconnected before sending its body") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DevnetError(400, "request body is not UTF-8") from exc
    try:
        signer = check_signed_request(request.headers, text, state.clock())
    except SignatureRejected as exc:
        raise DevnetError(401, str(exc)) from exc
    return Signed(signer, raw)


# Module-level so FastAPI can resolve it from the (postponed) annotations of the routes.
SignedReq = Annotated[Signed, Depends(_signed)]


def _internal_router(state: DevnetState) -> APIRouter:
    # Router-level, so no /internal route can forget it; FastAPI caches it per request, so
    # routes that also take it as a parameter do not check twice.
    router = APIRouter(prefix="/internal", dependencies=[Depends(_signed)])

    @router.get("/challenge/{address}")
    def challenge(address: str, req: SignedReq) -> dict[str, Any]:
        return state.issue_challenge(req.signer, _path_address(address))

    @router.post("/attestation/verify")
    def attestation_verify(req: SignedReq) -> dict[str, Any]:
        return state.verify_attestation(req.signer, parse(AttestationRequest, req.body))

    @router.post("/heartbeat")
    def heartbeat(req: SignedReq) -> dict[str, Any]:
        return state.heartbeat(req.signer, parse(HeartbeatRequest, req.body))

    @router.get("/assignments/{address}")
    def assignments(address: str, req: SignedReq) -> dict[str, Any]:
        return state.assignments(req.signer, _path_address(address))

    @router.post("/task/claim")
    def claim(req: SignedReq) -> dict[str, Any]:
        return state.claim(req.signer, parse(ClaimRequest, req.body))

    @router.post("/task/result")
    def result(req: SignedReq) -> dict[str, Any]:
        return state.submit_result(req.signer, parse(ResultRequest, req.body))

    @router.post("/task/verify")
    def verify(req: SignedReq) -> dict[str, Any]:
        return state.submit_verdict(req.signer, parse(VerdictRequest, req.body))

    @router.get("/jobs/{job_id}/status")
    def job_status(job_id: str) -> dict[str, Any]:
        return state.job_status(job_id)

    return router


def _path_address(address: str) -> str:
    try:
        return checksummed(address)
    except ValueError as exc:
        raise DevnetError(400, f"path address: {exc}") from exc


def _admin_router(state: DevnetState) -> APIRouter:
    router = APIRouter(prefix="/admin")

    @router.post("/jobs")
    def new_job(req: NewJobRequest) -> dict[str, Any]:
        return state.create_job(req)

    @router.get("/jobs")
    def jobs() -> dict[str, Any]:
        return state.job_records()

    @router.get("/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return state.job_record(job_id)

    @router.post("/jobs/{job_id}/dispute")
    def dispute(job_id: str) -> dict[str, Any]:
        return state.dispute(job_id)

    @router.get("/nodes")
    def nodes() -> dict[str, Any]:
        return state.node_records()

    @router.post("/reset")
    def reset() -> dict[str, Any]:
        # Simulates an ICL restart: nodes then get 404 on assignments and must re-attest.
        state.reset()
        return {"status": "ok"}

    return router


# --------------------------------------------------------------------------- running it


class DevnetIcl(LocalServer):
    """The devnet ICL on a background thread, for tests and embedding.

    ``with DevnetIcl() as icl: requests.get(icl.url + "/admin/nodes")``.
    """

    name = "devnet-icl"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Unpack[AppOptions]):
        super().__init__(create_app(**options), host, port)
        self.state: DevnetState = self.app.state.devnet


def serve(host: str, port: int, *, log_level: str = "info", **options: Unpack[AppOptions]) -> None:
    """Run the devnet ICL in the foreground until interrupted (``blindference-node devnet icl``)."""
    if options.get("mock_attestation_key") is not None:
        key_source = "given"
    elif os.environ.get("MOCK_ATTESTATION_KEY"):
        key_source = "from MOCK_ATTESTATION_KEY"
    else:
        key_source = "the published default"
    banner = f"Devnet ICL (mock attestation key: {key_source})"
    serve_app(create_app(**options), host, port, banner=banner, log_level=log_level)
