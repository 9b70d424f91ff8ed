"""The Celery app, its settings, and the one place queue and key names are made.

``import blf.app`` builds the app and its conf and nothing else: no Redis, network or
keystore access happens here (those open in worker signals or inside tasks). Importing
it reads config.json when one exists, so ``celery -A blf.app worker`` works; the CLI
calls ``configure`` itself with the settings it loaded.

Everything a node writes to Redis is namespaced by its address, so two nodes sharing one
Redis never see each other's queues, locks, schedule or job state.
"""

from __future__ import annotations

import gc
import logging
from datetime import timedelta
from functools import cached_property
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from celery import Celery
from celery.signals import beat_init, setup_logging, worker_ready

import beat_schedule
from blf.broker import broker_urls
from blf.config import LoadedConfig, Settings, load_config, resolve_config_path
from blf.errors import ConfigError
from blf.logging import configure_logging
from blf.names import control_queue, model_queue, namespace, node_key

__all__ = [
    "CONTROL_TASKS",
    "app",
    "build_conf",
    "configure",
    "control_queue",
    "model_queue",
    "node_key",
]

log = logging.getLogger("blf.app")

# Seconds between a worker's ``worker-heartbeat`` events (Celery's default is 2). Only
# Flower reads them (it shows a worker offline two intervals after its last one); the
# poller learns which workers serve a model from blf.capacity, and the ICL heartbeat is a
# task of its own. Every event is a wake-up of the worker and a PUBLISH to Redis.
WORKER_EVENT_HEARTBEAT_S = 30.0


class NodeCelery(Celery):
    """The node's Celery app: beat without the task modules, workers that wake less.

    * ``Beat`` (``blindference-node beat``, ``celery -A blf.app beat``) skips importing the
      ``include`` modules: it sends each duty by name (``send_task``), so it never loads
      the control tasks and with them the ICL client, the wallet and CoFHE (their memory,
      and no operator-side code in a process that needs none). Messages are still signed:
      that is ``blf.authority``'s publish hook, which the beat command installs.
    * ``Worker`` sends its event heartbeat every ``WORKER_EVENT_HEARTBEAT_S`` unless
      told otherwise (``heartbeat_interval``); ``embedded=True`` leaves the process's
      signal handlers and title alone (`run` hosts its control worker in a thread). Its
      idle BRPOP waits ``IDLE_BRPOP_S``, not kombu's 1 s: blf.worker_wake wakes its loop
      for what it must notice sooner.
    """

    @cached_property
    def Beat(self) -> Any:  # Celery's attribute name
        return self.subclass_with_self("blf.scheduler:NodeBeat")

    @cached_property
    def Worker(self) -> Any:  # Celery's attribute name
        from celery.apps.worker import Worker  # workers only: beat and the CLI skip it

        from blf.worker_wake import IDLE_BRPOP_S, connection_name

        self_app = self

        class NodeWorker(Worker):
            def __init__(self, *args: Any, embedded: bool = False, **kwargs: Any) -> None:
                # Embedded: a thread of a process that owns its signals and its title (the
                # control worker inside `run`): Celery's handlers would take over `run`'s.
                self.embedded = embedded
                if kwargs.get("heartbeat_interval") is None:
                    kwargs["heartbeat_interval"] = WORKER_EVENT_HEARTBEAT_S
                options = self_app.conf.broker_transport_options or {}
                self_app.conf.broker_transport_options = {
                    **options,
                    # Its Redis connections' name: how blf.worker_wake finds its BRPOP.
                    "client_name": connection_name(),
                    # Its idle BRPOP (kombu's brpop_timeout): a message ends it at once,
                    # and blf.worker_wake wakes the loop for a stop or a freed slot. Not
                    # for clients (the CLI, Flower): a remote-control call that gives up
                    # would leave its BRPOP waiting that long in Redis.
                    "polling_interval": IDLE_BRPOP_S,
                }
                super().__init__(*args, **kwargs)

            def install_platform_tweaks(self, worker: Any) -> None:
                if not self.embedded:
                    super().install_platform_tweaks(worker)

            def set_process_status(self, info: str) -> Any:
                return None if self.embedded else super().set_process_status(info)

        from blf.worker_wake import UnblockAtShutdown, WakeOnEvents

        self.steps["worker"].add(WakeOnEvents)
        self.steps["consumer"].add(UnblockAtShutdown)
        return self.subclass_with_self(NodeWorker)


app = NodeCelery("blf", set_as_current=False)

# Tasks that speak for the operator identity (ICL, chain, CoFHE): control machine only.
CONTROL_TASKS = (
    "blf.tasks.loops.icl_heartbeat",
    "blf.tasks.loops.poll_assignments",
    "blf.tasks.loops.attestation_watchdog",
    "blf.tasks.loops.chain_heartbeat",
    "blf.tasks.jobs.start_job",
    "blf.tasks.jobs.unlock_key",
    "blf.tasks.finish.finish_job",
    "blf.tasks.loops.sweep_jobs",
)

# Margin between the longest job and kombu's redelivery of an unacknowledged message.
VISIBILITY_MARGIN_S = 600


def visibility_timeout(settings: Settings) -> int:
    """Seconds before kombu redelivers an unacknowledged job: longer than the longest job,
    or a job still running would be handed to a second worker."""
    return settings.job_timeout_s + min(VISIBILITY_MARGIN_S, settings.job_timeout_s)


def transport_options(settings: Settings) -> dict[str, Any]:
    """kombu's Redis transport options; every kombu connection of the node uses them."""
    visibility = visibility_timeout(settings)
    return {
        "visibility_timeout": visibility,
        # Look for abandoned messages about ten times per visibility period, so a job whose
        # worker died is back in its queue soon after the timeout rather than minutes later.
        "unacked_restore_interval": min(max(visibility // 10, 1), 10),
        "unacked_restore_throttle": 1,
        # kombu's own keys (unacked, bindings) would otherwise be shared between nodes.
        "global_keyprefix": node_key(settings.node_address) + ":",
    }


def _redbeat_connection(redis_url: str) -> tuple[str, dict[str, Any]]:
    """RedBeat's URL without credentials, which go in its options instead: Celery masks
    passwords in option dicts (``celery inspect conf``, Flower) but not in that URL."""
    parts = urlsplit(redis_url)
    options: dict[str, Any] = {"retry_period": 30}  # ride out a Redis blip, not die on it
    if parts.password is None and parts.username is None:
        return redis_url, options
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)), options


def build_conf(settings: Settings) -> dict[str, Any]:
    address = settings.node_address
    if not address:
        raise ConfigError(
            "node_address is empty: set it to the operator address", field="node_address"
        )
    urls = broker_urls(settings.broker_url) if settings.broker_url else None
    transport = transport_options(settings)
    redbeat_url, redbeat_options = _redbeat_connection(urls.redis) if urls else (None, {})
    loop = min(settings.poll_interval_s, 5.0)
    conf: dict[str, Any] = {
        "broker_url": urls.celery if urls else None,
        "result_backend": urls.celery if urls else None,
        "broker_transport_options": transport,
        "result_backend_transport_options": dict(transport),
        # Celery 5.7 reads only the two transport options above; the app-level key is set
        # too because older versions (celery/celery#7651) and tools look for it there.
        "visibility_timeout": transport["visibility_timeout"],
        # Task events feed Flower (`blindference-node flower`).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": timedelta(days=1),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": control_queue(address),
        "task_routes": (TaskRouter(address),),
        "task_time_limit": settings.job_timeout_s,
        "control_exchange": namespace(address),
        "event_exchange": namespace(address) + ".ev",
        "include": ["blf.tasks.loops", "blf.tasks.jobs", "blf.tasks.finish"],
        "beat_scheduler": "blf.scheduler.NodeScheduler",
        "beat_schedule": beat_schedule.build(settings, control_queue(address)),
        "beat_max_loop_interval": loop,
        "redbeat_redis_url": redbeat_url,
        "redbeat_redis_options": redbeat_options,
        "redbeat_key_prefix": node_key(address, "redbeat") + ":",
        # A crashed beat's lock must free within a few loops, not RedBeat's 25 minutes.
        "redbeat_lock_timeout": max(5 * loop, 5.0),
        "blf_address": address,
        "blf_log_level": settings.log_level,
    }
    return conf


class TaskRouter:
    """Control tasks to the node's control queue, model tasks to their model's queue."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
    ) -> dict[str, str]:
        if name in CONTROL_TASKS:
            return {"queue": control_queue(self.address)}
        model_id = (kwargs or {}).get("model_id")
        if model_id:
            return {"queue": model_queue(self.address, model_id)}
        log.warning("task %s has no route; sending it to the control queue", name)
        return {"queue": control_queue(self.address)}


def configure(settings: Settings, target: Celery = app) -> Celery:
    target.conf.update(build_conf(settings))
    return target


def requeue_unacked(settings: Settings) -> int:
    """Put every message this node's workers left unacknowledged back on its queue, now
    rather than after the visibility timeout. Only safe while none of the node's workers
    runs (``run`` calls it at start, holding the node's lock and its only Redis)."""
    scratch = configure(settings, Celery("blf-requeue", set_as_current=False))
    try:
        with scratch.connection_for_write() as connection:
            channel = connection.default_channel
            qos = channel.qos
            with channel.conn_or_acquire() as client:
                # kombu prefixes only some commands with the node's key prefix: ZRANGE is one.
                tags = list(client.zrange(qos.unacked_index_key, 0, -1))
                for tag in tags:
                    qos.restore_by_tag(tag, client)
    finally:
        scratch.close()
    return len(tags)


def settings_with_address(loaded: LoadedConfig) -> Settings:
    """The settings, with ``node_address`` from the keystore's header when config.json
    leaves it empty (GPU machines have no keystore: their config must name the address)."""
    if loaded.settings.node_address:
        return loaded.settings
    from blf.wallet import keystore_address  # control machines only

    address = keystore_address(loaded.keystore_file())
    if not address:
        raise ConfigError(
            f"{loaded.path}: field 'node_address' is empty and the keystore names no address",
            path=str(loaded.path),
            field="node_address",
        )
    return loaded.settings.model_copy(update={"node_address": address})


@setup_logging.connect
def _use_node_log_format(**_: Any) -> None:
    # Connected, so Celery leaves logging alone and its lines use the node's format too.
    configure_logging(app.conf.get("blf_address", ""), app.conf.get("blf_log_level", "INFO"))


@worker_ready.connect
@beat_init.connect
def _freeze_startup_objects(**_: Any) -> None:
    """Keep the garbage collector off what start-up built (modules, classes, the app).

    An idle node allocates a little on every tick; every few tens of seconds that makes
    CPython's collector walk the whole heap of a process, tens of ms each time for a worker or
    beat, which was most of their idle CPU. ``gc.freeze`` moves what exists now into a
    permanent generation that collections skip (garbage first, so none is kept).
    """
    gc.collect()
    gc.freeze()


def _configure_from_environment() -> None:
    """For ``celery -A blf.app ...``: configure from the node's config.json when there is
    one. A missing file is not an error here (the CLI configures explicitly); a broken one
    is, or a worker would start against a default broker and fail obscurely."""
    path, _ = resolve_config_path()
    if path.exists():
        configure(settings_with_address(load_config(path)))


_configure_from_environment()
