"""Who may command the control queue: only the control machine.

A GPU host shares the node's Redis, so it can put any message on any queue. The control
worker therefore runs a message only with proof that the control machine asked for it:

* **signed**: an HMAC-SHA256 over the task name, id, args and kwargs, in the ``blf_mac``
  header, made with the node's control key (``control.key`` beside config.json, 0600).
  Only control-side processes (beat, the control worker, the CLI) load that key; every
  message they publish is signed on the way out, retries included. GPU machines never
  have it.
* **a continuation**: the one message that follows GPU work (``finish_job``) carries a
  random token that the control side issued for that job and step when it dispatched the
  GPU work. The token is good for one message: the first task id that redeems it owns it,
  so a redelivery of that same message still runs and any other message is refused. The
  job's ticket comes from the control side's own record, not from the message.

Anything else is refused with a logged reason and acknowledged (it is never retried), and
so is any message that brings callbacks, errbacks, a chain or a chord: Celery would publish
those from the control worker, signed. A signed message can be replayed by whoever reads
Redis; every control task is idempotent for that reason (marks, not trust, keep claims and
submissions single). A continuation token travels in clear in the GPU order and in the
answer: whoever reads Redis can use it, but only for that job's one answer, whose outcome
is fixed by the first message that redeems it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore
from celery.signals import before_task_publish

from blf.keyfiles import control_key
from blf.names import node_key
from blf.payloads import JobTicket

if TYPE_CHECKING:
    from blf.config import LoadedConfig

__all__ = [
    "MAC_HEADER",
    "ControlTask",
    "Refused",
    "install_control_key",
    "install_node_control_key",
    "issue_continuation",
    "message_mac",
    "redeem_continuation",
]

log = logging.getLogger("blf.authority")

MAC_HEADER = "blf_mac"

_control_key: bytes | None = None


class Refused(Exception):
    """A control-queue message without valid proof; ``str()`` is the logged reason."""


def install_control_key(key: bytes) -> None:
    """Sign everything this process publishes, and accept what is signed with ``key``."""
    global _control_key
    _control_key = key


def install_node_control_key(loaded: LoadedConfig) -> None:
    """Install the control key of the node whose config.json ``loaded`` is (made at the
    first call): every control-side process (beat, control worker, CLI) signs with it."""
    install_control_key(control_key(loaded.beside(loaded.settings.control_key_file)))


def message_mac(
    key: bytes, name: str, task_id: str, args: Any, kwargs: Any, retries: int = 0
) -> str:
    # JSON is what crosses the broker, so the MAC covers the JSON form (tuples as lists).
    # ``retries`` is covered because the tasks act on it (claim attempts, delivery counts).
    text = json.dumps(
        [name, task_id, int(retries or 0), list(args or ()), kwargs or {}],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


@before_task_publish.connect
def _sign_outgoing(body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    if _control_key is None or headers is None or not isinstance(body, list | tuple):
        return
    args, kwargs = body[0], body[1]
    headers[MAC_HEADER] = message_mac(
        _control_key, headers["task"], headers["id"], args, kwargs, headers.get("retries", 0)
    )


def _signed(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    given = getattr(task.request, MAC_HEADER, None)
    if _control_key is None or not isinstance(given, str):
        return False
    request = task.request
    expected = message_mac(_control_key, task.name, request.id, args, kwargs, request.retries)
    return hmac.compare_digest(expected, given)


# Celery runs these after a task succeeds (or fails), and publishes them from the worker,
# where they would be signed: a message that brings its own is refused outright. The
# pipeline chains its steps by explicit calls and never uses them.
_FOLLOW_UPS = ("callbacks", "errbacks", "chain", "chord", "group", "group_index")


def _follow_ups(task: Task) -> list[str]:
    return [name for name in _FOLLOW_UPS if getattr(task.request, name, None)]


class ControlTask(Task):
    """Base of every control-queue task: runs it only with proof of the control machine.

    A task that sets ``continuation_step`` also accepts an unsigned message carrying a
    ``continuation`` kwarg; it must redeem it itself (``redeem_continuation``) before
    acting, signed or not (the job's record comes with the redemption).
    """

    continuation_step: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return super().__call__(*args, **kwargs)
        extra = _follow_ups(self)
        if extra:
            self._refuse(f"it carries {', '.join(extra)}, which the control queue never runs")
        continued = bool(self.continuation_step) and "continuation" in kwargs
        if not continued and not _signed(self, args, kwargs):
            why = "no control key loaded" if _control_key is None else "missing or bad signature"
            self._refuse(f"not from the control machine ({why})")
        return super().__call__(*args, **kwargs)

    def _refuse(self, why: str) -> NoReturn:
        log.error("Refused %s (task %s): %s", self.name, self.request.id, why)
        # Ignore: no result is stored and nothing attached to the message is published.
        raise Ignore()


# --- continuations -------------------------------------------------------------------------

_REDEEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'redeemed_by', ARGV[1])
redis.call('HSETNX', KEYS[1], 'answer', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""


def _continuation_key(address: str, token: str) -> str:
    # The key holds the token's hash, so the record itself does not give the token away.
    return node_key(address, "cont", hashlib.sha256(token.encode()).hexdigest())


def issue_continuation(
    client: redis.Redis, address: str, ticket: JobTicket, step: str, ttl_s: int
) -> str:
    token = secrets.token_hex(32)
    key = _continuation_key(address, token)
    mapping = {"job_id": ticket.job_id, "step": step, "ticket": ticket.model_dump_json()}
    with client.pipeline() as pipe:
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]  # invariant stub
        pipe.expire(key, max(ttl_s, 1))
        pipe.execute()
    return token


def redeem_continuation(
    client: redis.Redis, address: str, token: str, step: str, task_id: str, answer: Any
) -> JobTicket:
    """The ticket the control side recorded for this token; raises Refused otherwise.

    The first message to redeem it fixes the task id and the answer (``answer``, hashed);
    only that same message, redelivered, is accepted again."""
    digest = hashlib.sha256(
        json.dumps(answer, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    raw = client.eval(_REDEEM, 1, _continuation_key(address, str(token)), task_id, digest)
    if not raw:
        raise Refused("unknown or expired continuation")
    items = [v.decode() if isinstance(v, bytes) else str(v) for v in raw]
    record = dict(zip(items[::2], items[1::2], strict=True))
    if record.get("step") != step:
        raise Refused(f"continuation is for step {record.get('step')!r}, not {step!r}")
    if record.get("redeemed_by") != task_id or record.get("answer") != digest:
        raise Refused("continuation already used by another message")
    return JobTicket.model_validate_json(record["ticket"])
