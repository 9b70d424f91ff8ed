"""The exactly-once marks and the control side's continuations, on a real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from blf.authority import Refused, issue_continuation, message_mac, redeem_continuation
from blf.broker import EmbeddedRedis
from blf.errors import IclProtocolError, IclStatusError, IclTransportError
from blf.payloads import JobTicket
from blf.submission import LEASE_S, Settled, Submission, Submitted, drop_leases

ADDRESS = "0x000000000000000000000000000000000000dEaD"


@pytest.fixture
def client(shared_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(shared_redis.urls.redis, decode_responses=True)
    yield connection
    connection.flushall()
    connection.close()


class Ledger:
    """Counts what was sent and what the ICL was asked."""

    def __init__(self, settled: Settled = Settled.ABSENT, fail: Exception | None = None):
        self.sent = 0
        self.asked = 0
        self.settled = settled
        self.fail = fail

    def send(self) -> str:
        self.sent += 1
        if self.fail is not None:
            raise self.fail
        return "ok"

    def settle(self) -> Settled:
        self.asked += 1
        return self.settled


def guard(client: redis.Redis, job: str = "job-1") -> Submission:
    return Submission(client, ADDRESS, job, ttl_s=600)


def transport_error() -> IclTransportError:
    return IclTransportError("ICL unreachable: POST /internal/task/result failed (ReadTimeout)")


def test_a_submission_is_sent_once_and_then_known_done(client: redis.Redis) -> None:
    ledger = Ledger()
    assert guard(client).submit(ledger.send, ledger.settle) is Submitted.SENT
    assert guard(client).done()
    assert guard(client).submit(ledger.send, ledger.settle) is Submitted.ALREADY
    assert (ledger.sent, ledger.asked) == (1, 0)


@pytest.mark.parametrize(
    ("settled", "outcome", "sends"),
    [
        (Settled.LANDED, Submitted.ALREADY, 0),
        (Settled.CLOSED, Submitted.CLOSED, 0),
        (Settled.UNKNOWN, Submitted.UNCONFIRMED, 0),
        (Settled.ABSENT, Submitted.SENT, 1),
    ],
)
def test_after_an_ambiguous_failure_the_icl_decides_whether_to_send(
    client: redis.Redis, settled: Settled, outcome: Submitted, sends: int
) -> None:
    first = Ledger(fail=transport_error())
    with pytest.raises(IclTransportError):
        guard(client).submit(first.send, first.settle)
    retry = Ledger(settled=settled)
    assert guard(client).submit(retry.send, retry.settle) is outcome
    assert (retry.asked, retry.sent) == (1, sends)


def test_a_refused_submission_is_never_sent_again(client: redis.Redis) -> None:
    refused = IclStatusError("ICL 400", method="POST", url="u", status=400)
    with pytest.raises(IclStatusError):
        guard(client).submit(Ledger(fail=refused).send, Ledger().settle)
    again = Ledger()
    assert guard(client).submit(again.send, again.settle) is Submitted.REFUSED
    assert again.sent == 0


def test_a_2xx_answer_the_client_cannot_read_still_counts_as_landed(client: redis.Redis) -> None:
    garbled = IclProtocolError("ICL answered POST /internal/task/result with an unexpected body")
    assert guard(client).submit(Ledger(fail=garbled).send, Ledger().settle) is Submitted.SENT
    assert guard(client).done()


def test_a_copy_whose_lease_lapsed_while_settling_does_not_send(client: redis.Redis) -> None:
    """Copy A asks the ICL for too long; its lease lapses and copy B takes it. A must then
    neither send nor free B's lease."""
    first = Ledger(fail=transport_error())
    with pytest.raises(IclTransportError):
        guard(client).submit(first.send, first.settle)
    lease = f"blf:{ADDRESS.lower()}:submit-lease:job-1"
    sends: list[str] = []

    def slow_settle() -> Settled:
        client.delete(lease)  # A's lease lapses...
        client.set(lease, "copy-b", ex=LEASE_S)  # ...and B holds it now
        return Settled.ABSENT

    def send_a() -> str:
        sends.append("a")
        return "ok"

    assert guard(client).submit(send_a, slow_settle) is Submitted.BUSY
    assert sends == [] and client.get(lease) == "copy-b"


def test_a_copy_of_the_task_waits_while_another_is_sending(client: redis.Redis) -> None:
    inner: list[Submitted] = []
    ledger = Ledger()

    def send_while_a_copy_tries() -> str:
        inner.append(guard(client).submit(ledger.send, ledger.settle))
        return "ok"

    assert guard(client).submit(send_while_a_copy_tries, ledger.settle) is Submitted.SENT
    assert inner == [Submitted.BUSY] and ledger.sent == 0
    assert client.ttl(f"blf:{ADDRESS.lower()}:submit-lease:job-1") == -2  # released


def test_leases_left_by_dead_workers_can_be_dropped(client: redis.Redis) -> None:
    client.set(f"blf:{ADDRESS.lower()}:submit-lease:job-1", "1", ex=LEASE_S)
    client.set(f"blf:{ADDRESS.lower()}:submit-lease:job-2", "1", ex=LEASE_S)
    client.set("blf:0xother:submit-lease:job-3", "1", ex=LEASE_S)
    assert drop_leases(client, ADDRESS) == 2
    assert client.exists("blf:0xother:submit-lease:job-3")
    ledger = Ledger()
    assert guard(client).submit(ledger.send, ledger.settle) is Submitted.SENT


# --- continuations ---------------------------------------------------------------------------

TICKET = JobTicket(job_id="j" * 64, role="leader", model_id="m", prompt_cid="c", deadline=9)


def redeem(client: redis.Redis, token: str) -> Callable[..., JobTicket]:
    return lambda step, task_id, answer="a": redeem_continuation(
        client, ADDRESS, token, step, task_id, {"answer": answer}
    )


def test_a_continuation_is_good_for_one_message(client: redis.Redis) -> None:
    token = issue_continuation(client, ADDRESS, TICKET, "finish", ttl_s=60)
    use = redeem(client, token)
    assert use("finish", "task-a") == TICKET
    assert use("finish", "task-a") == TICKET  # the same message, redelivered
    with pytest.raises(Refused, match="already used by another message"):
        use("finish", "task-b")
    with pytest.raises(Refused, match="already used by another message"):
        use("finish", "task-a", "another answer under the same task id")
    with pytest.raises(Refused, match="not 'other'"):
        use("other", "task-a")
    with pytest.raises(Refused, match="unknown or expired"):
        redeem(client, "0" * 64)("finish", "task-a")
    # Redis holds only the token's hash: reading it yields nothing to redeem with.
    assert not [k for k in client.scan_iter() if token in k or token in str(client.hgetall(k))]


def test_message_mac_covers_name_id_and_arguments() -> None:
    key = b"k" * 32
    base = message_mac(key, "t", "id", ("a",), {"x": 1})
    assert base == message_mac(key, "t", "id", ["a"], {"x": 1})  # JSON form: tuple == list
    for changed in (
        message_mac(key, "u", "id", ("a",), {"x": 1}),
        message_mac(key, "t", "id2", ("a",), {"x": 1}),
        message_mac(key, "t", "id", ("b",), {"x": 1}),
        message_mac(key, "t", "id", ("a",), {"x": 2}),
        message_mac(b"o" * 32, "t", "id", ("a",), {"x": 1}),
    ):
        assert changed != base
