"""A result is submitted at most once per job, whatever dies when."""

from __future__ import annotations

import signal

from blf import crypto
from blf.devnet.network import LocalNetwork
from blf.devnet.user import DevnetInfo, DevnetUser
from blf.inference.mock import mock_output
from tests.nodes import wait_until
from tests.pipeline import Gate, node_log, start_network, wait_state


def test_control_worker_killed_while_its_result_is_in_flight_never_sends_it_twice() -> None:
    """The ICL records the leader's result, and the control worker (a thread of `run`) is
    killed with its process before the answer comes back; run again, the redelivered step
    finds its send ambiguous, asks the ICL, learns the result landed, and sends nothing
    more."""
    gates: list[Gate] = []

    def before(network: LocalNetwork) -> None:
        gates.append(Gate(network.icl.app, "/internal/task/result", limit=1, after=True))

    network = start_network(before=before)
    gate = gates[0]
    try:
        user = DevnetUser(DevnetInfo.read(network.info_path))
        leader = network.members[0]
        gate.hold_all()
        key = crypto.new_key()
        prompt = "Count to three."
        job_id = user.submit_blob(
            crypto.encrypt_blob(key, prompt.encode()),
            key,
            "demo-model",
            quorum=[n.address for n in network.members],
        )
        wait_state(leader, job_id, "submitting")
        wait_until(lambda: gate.arrivals == 1, what="the result's answer to be held")
        assert leader.process is not None
        leader.process.send_signal(signal.SIGKILL)
        assert leader.process.wait(60) == -signal.SIGKILL
        gate.release.set()
        assert network.icl.state.job_record(job_id)["resultPosts"] == 1

        network.restart(leader)
        record = wait_state(leader, job_id, "submitted")
        assert record["role"] == "leader"
        final = user.wait(job_id, 60)
        assert final["status"] == "ACCEPTED"
        assert final["resultPosts"] == 1
        assert user.output(final) == mock_output("demo-model", prompt)
        assert "Requeued 1 job message(s)" in node_log(network, leader)
        assert "result submitted" not in node_log(network, leader)  # it never got the answer
    finally:
        gate.release.set()
        network.stop()
