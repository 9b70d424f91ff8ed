"""The Celery configuration a node gets from its settings."""

from __future__ import annotations

import pytest

from blf.app import build_conf, control_queue, model_queue
from blf.config import Settings
from blf.errors import ConfigError

ADDRESS = "0x4f1197fC76A05dB148670f4DA4D2c7c50FE99976"


def conf(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"node_address": ADDRESS, "broker_url": "redis://127.0.0.1:6390/0"}
    return build_conf(Settings(**{**base, **fields}))


def test_json_only_late_acks_and_one_message_at_a_time() -> None:
    c = conf()
    assert c["task_serializer"] == c["result_serializer"] == "json"
    assert c["accept_content"] == c["result_accept_content"] == ["json"]
    assert c["task_acks_late"] and c["task_reject_on_worker_lost"]
    assert c["worker_prefetch_multiplier"] == 1
    assert c["worker_cancel_long_running_tasks_on_connection_loss"]


def test_visibility_timeout_outlasts_the_longest_job_everywhere() -> None:
    c = conf(job_timeout_s=3600)
    broker, backend = c["broker_transport_options"], c["result_backend_transport_options"]
    assert isinstance(broker, dict) and isinstance(backend, dict)
    assert broker["visibility_timeout"] == backend["visibility_timeout"] == c["visibility_timeout"]
    assert broker["visibility_timeout"] > 3600


def test_everything_is_namespaced_by_the_node_address() -> None:
    c = conf(supported_model_ids=["m1"])
    assert control_queue(ADDRESS) == f"blf.{ADDRESS.lower()}.control"
    assert model_queue(ADDRESS, "m1") == f"blf.{ADDRESS.lower()}.model.m1"
    assert c["task_default_queue"] == control_queue(ADDRESS)
    prefix = f"blf:{ADDRESS.lower()}:"
    assert c["broker_transport_options"]["global_keyprefix"] == prefix  # type: ignore[index]
    assert str(c["redbeat_key_prefix"]).startswith(prefix)
    assert ADDRESS.lower() in str(c["control_exchange"])


def test_beat_entries_expire_within_their_interval_and_the_lock_frees_quickly() -> None:
    c = conf(poll_interval_s=5)
    schedule = c["beat_schedule"]
    assert isinstance(schedule, dict) and len(schedule) == 5  # the four loops and the sweeper
    for entry in schedule.values():
        assert entry["options"]["expires"] <= entry["schedule"].total_seconds()
    assert float(c["redbeat_lock_timeout"]) <= 60  # RedBeat's default is 25 minutes


def test_redis_password_stays_out_of_the_redbeat_url() -> None:
    c = conf(broker_url="rediss://:hunter2@redis.example:6380/0")
    assert "hunter2" not in str(c["redbeat_redis_url"])
    assert c["redbeat_redis_options"] == {"retry_period": 30, "password": "hunter2"}


def test_an_empty_node_address_is_refused() -> None:
    with pytest.raises(ConfigError, match="node_address"):
        conf(node_address="")
