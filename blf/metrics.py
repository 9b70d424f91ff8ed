"""Prometheus metrics of a node, read at each scrape from its Redis and its config.json.

What serves them needs no key: it reads the node's broker (the journal, the queues, what
GPU workers publish) and the certificate's expiry from config.json, and answers
``GET /metrics`` (from a thread of `run`, or alone as ``blindference-node metrics``).
Nothing is counted in memory between scrapes, so any number of these may run, restart, or
scrape the same node.

A Redis that is down gives a scrape that says so (``blf_redis_up 0``), never an HTTP 500.

The journal keeps a record a week and a scrape reads only its newest ``JOURNAL_WINDOW``
records, so what is derived from it can go down: those families are gauges (and a gauge
histogram) over that window, named and described as such. ``blf_jobs_total`` is a true
counter, read from a hash the journal keeps per final state when it keeps one.

Families (every name starts ``blf_``):

    blf_up                           1 when the scrape read Redis and config.json
    blf_redis_up                     1 when the node's Redis answered
    blf_scrape_errors_total{source}  sources that failed (redis, config), this process
    blf_scrape_duration_seconds      how long the scrape took
    blf_journal_records              journal records the window held
    blf_journal_jobs{role,outcome}   jobs in each final state, in the window
    blf_jobs_in_progress{role}       jobs not yet in a final state, in the window
    blf_jobs_total{role,outcome}     jobs that reached each final state (monotonic)
    blf_stage_seconds{stage}         seconds per stage, in the window (gauge histogram)
    blf_queue_messages{model}        messages waiting in each model's queue
    blf_control_queue_messages       messages waiting in the control queue
    blf_workers{model}               live GPU workers serving each model
    blf_free_slots{model}            their free slots
    blf_icl_heartbeat_age_seconds    since the ICL last took a heartbeat
    blf_chain_heartbeat_age_seconds  since the chain's lastHeartbeat
    blf_certificate_seconds_left     until the attestation certificate expires
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.backoff import NoBackoff
from redis.retry import Retry

from blf.capacity import live_workers
from blf.config import LoadedConfig, Settings, load_config
from blf.errors import BlfError, ConfigError
from blf.journal import FINAL_STATES, STAGES, outcomes_key
from blf.names import control_queue, model_queue, node_key

__all__ = [
    "HEARTBEATS",
    "JOURNAL_WINDOW",
    "STAGE_BUCKETS",
    "ConfigView",
    "MetricsServer",
    "NodeCollector",
    "NodeView",
    "build_registry",
    "is_loopback",
    "note_heartbeat",
    "serve",
]

log = logging.getLogger("blf.metrics")

JOURNAL_WINDOW = 1000  # newest journal records a scrape reads
# Seconds, from a Redis hop to the longest job (job_timeout_s defaults to an hour).
STAGE_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
)  # fmt: skip
ROLES = ("leader", "verifier")  # payloads.Role; always shown, so a zero is a zero
HEARTBEATS = ("icl", "chain")
REDIS_TIMEOUT_S = 2.0  # a scrape must answer well inside Prometheus's 10 s default
SOURCES = ("redis", "config")
_SOURCE_NAMES = {"redis": "Redis", "config": "config.json"}
# kombu's Redis transport keeps a queue's messages in one list per priority step: the
# queue's name, then ``<name>\x06\x16<step>`` (kombu.transport.redis.Channel._q_for_pri).
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
# The journal's fields a scrape reads (blf.journal: a hash per job, a sorted set of ids).
_JOB_FIELDS = ("role", "state", *STAGES)


def _heartbeat_key(address: str, kind: str) -> str:
    return node_key(address, "heartbeat", kind)


def note_heartbeat(client: redis.Redis, address: str, kind: str, at: float | None = None) -> None:
    """Record when a heartbeat last landed, for ``blf_<kind>_heartbeat_age_seconds``:
    ``icl`` when the ICL accepted one, ``chain`` with the chain's ``lastHeartbeat``."""
    if kind not in HEARTBEATS:
        raise ValueError(f"heartbeat kind must be one of {HEARTBEATS}, not {kind!r}")
    client.set(_heartbeat_key(address, kind), f"{time.time() if at is None else at:.3f}")


# --- what a scrape reads ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """The node's state a scrape needs from its configuration."""

    models: tuple[str, ...] = ()
    cert_expiry: int | None = None

    @classmethod
    def of(cls, settings: Settings) -> NodeView:
        expiry = int(settings.attestation_expiry or 0) if settings.attested else None
        return cls(models=tuple(settings.supported_model_ids), cert_expiry=expiry)


class ConfigView:
    """config.json, re-read when it changes (the watchdog re-attests by rewriting it)."""

    def __init__(self, path: Path, first: Settings | None = None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._view = NodeView()
        if first is not None:
            self._stamp = self._file_stamp()
            self._view = NodeView.of(first)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        # The inode too: config.json is replaced, never rewritten in place, and two
        # replacements within one clock tick share a modification time.
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def __call__(self) -> NodeView:
        """The current view; raises ``BlfError`` when the file cannot be read (the caller
        keeps ``last``)."""
        stamp = self._file_stamp()
        if stamp is None:
            raise ConfigError(f"{self.path}: cannot read", path=str(self.path))
        if stamp != self._stamp:
            self._view = NodeView.of(load_config(self.path).settings)
            self._stamp = stamp
        return self._view

    @property
    def last(self) -> NodeView:
        return self._view


@dataclass
class Snapshot:
    """One scrape's reads from Redis."""

    records: list[dict[str, str | None]]
    queued: dict[str, int]
    control_queued: int
    outcomes: dict[str, str]
    heartbeats: dict[str, float | None]
    workers: dict[str, dict[str, int]]


@dataclass
class Window:
    """What the newest journal records add up to."""

    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})


class NodeCollector(Collector):
    """Reads the node's Redis and configuration at each ``collect`` and yields families.

    ``queue_prefix`` is the prefix kombu puts before the node's queue names
    (``blf.app.transport_options(settings)["global_keyprefix"]``).
    """

    def __init__(
        self,
        client: redis.Redis,
        address: str,
        view: Callable[[], NodeView],
        *,
        queue_prefix: str,
        journal_window: int = JOURNAL_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.address = address
        self._view = view
        # What a failed read falls back on: a ConfigView knows the file as first loaded.
        self._last_view = getattr(view, "last", NodeView())
        self._queue_prefix = queue_prefix
        self._window = max(journal_window, 1)
        self._clock = clock
        self._lock = threading.Lock()  # scrapes run in the server's threads
        self._errors = dict.fromkeys(SOURCES, 0)
        self._failing: set[str] = set()

    # -- reading ---------------------------------------------------------------------------

    def _read_view(self) -> NodeView | None:
        try:
            view = self._view()
        except (BlfError, OSError) as exc:
            self._failed("config", exc)
            return None
        self._recovered("config")
        self._last_view = view
        return view

    def _queue_keys(self, queue: str) -> list[str]:
        return [
            self._queue_prefix + (f"{queue}{PRIORITY_SEP}{step}" if step else queue)
            for step in PRIORITY_STEPS
        ]

    def read_redis(self, models: Sequence[str]) -> Snapshot:
        address = self.address
        ids = self.client.zrevrange(node_key(address, "jobs"), 0, self._window - 1)
        queues = {m: self._queue_keys(model_queue(address, m)) for m in models}
        control = self._queue_keys(control_queue(address))
        with self.client.pipeline(transaction=False) as pipe:  # one round trip
            for job_id in ids:
                pipe.hmget(node_key(address, "job", str(job_id)), _JOB_FIELDS)
            for keys in (*queues.values(), control):
                for key in keys:
                    pipe.llen(key)
            pipe.hgetall(outcomes_key(address))
            pipe.mget([_heartbeat_key(address, kind) for kind in HEARTBEATS])
            replies: list[Any] = pipe.execute()
        rows, rest = replies[: len(ids)], iter(replies[len(ids) :])
        queued = {m: sum(int(next(rest)) for _ in keys) for m, keys in queues.items()}
        control_queued = sum(int(next(rest)) for _ in control)
        outcomes, beats = next(rest), next(rest)
        return Snapshot(
            records=[dict(zip(_JOB_FIELDS, row, strict=True)) for row in rows],
            queued=queued,
            control_queued=control_queued,
            outcomes={_text(k): _text(v) for k, v in outcomes.items()},
            heartbeats={k: _number(v) for k, v in zip(HEARTBEATS, beats, strict=True)},
            # Two reads per model, through the one function that knows capacity's layout.
            workers={m: live_workers(self.client, address, m) for m in models},
        )

    def _failed(self, source: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[source] += 1
            first = source not in self._failing
            self._failing.add(source)
        if first:  # once per outage, not once per scrape
            log.warning(
                "Metrics: cannot read the node's %s: %s", _SOURCE_NAMES[source], _one_line(exc)
            )

    def _recovered(self, source: str) -> None:
        with self._lock:
            was = source in self._failing
            self._failing.discard(source)
        if was:
            log.info("Metrics: the node's %s can be read again", _SOURCE_NAMES[source])

    # -- families --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        now = self._clock()
        view = self._read_view()
        current = view if view is not None else self._last_view
        snapshot: Snapshot | None = None
        try:
            snapshot = self.read_redis(current.models)
        except Exception as exc:  # a scrape answers whatever broke: down, timeout, garbage
            self._failed("redis", exc)
        else:
            self._recovered("redis")
        families: list[Metric] = []
        if snapshot is not None:
            families += self._journal_families(snapshot)
            families += self._queue_families(snapshot, current.models)
            families += self._heartbeat_families(snapshot, now)
        if current.cert_expiry is not None:
            families.append(
                _gauge(
                    "blf_certificate_seconds_left",
                    "Seconds until the attestation certificate expires (config.json's "
                    "attestation_expiry); negative once expired.",
                    current.cert_expiry - now,
                )
            )
        yield from families
        yield _gauge(
            "blf_up",
            "1 when this scrape read the node's Redis and config.json, else 0.",
            1 if snapshot is not None and view is not None else 0,
        )
        yield _gauge(
            "blf_redis_up", "1 when the node's Redis answered this scrape, else 0.",
            1 if snapshot is not None else 0,
        )  # fmt: skip
        errors = CounterMetricFamily(
            "blf_scrape_errors",
            "Scrapes by this metrics process that could not read a source (redis, config).",
            labels=["source"],
        )
        with self._lock:
            counts = dict(self._errors)
        for source in SOURCES:
            errors.add_metric([source], counts[source])
        yield errors
        yield _gauge(
            "blf_scrape_duration_seconds",
            "Seconds this scrape took to read its sources.",
            time.perf_counter() - started,
        )

    def window_of(self, records: Iterable[dict[str, str | None]]) -> Window:
        window = Window()
        for record in records:
            state = record.get("state")
            if state is None:  # expired between the index and its hash
                continue
            role = record.get("role") or "unknown"
            if state in FINAL_STATES:
                key = (role, state)
                window.finished[key] = window.finished.get(key, 0) + 1
            else:
                window.running[role] = window.running.get(role, 0) + 1
            for stage in STAGES:
                seconds = _number(record.get(stage))
                if seconds is not None and seconds >= 0:
                    window.stages[stage].append(seconds)
        return window

    def _journal_families(self, snapshot: Snapshot) -> list[Metric]:
        window = self.window_of(snapshot.records)
        seen = sum(1 for r in snapshot.records if r.get("state") is not None)
        scope = f"among the newest {self._window} journal records (kept a week)"
        records = _gauge(
            "blf_journal_records",
            f"Journal records read by this scrape, at most {self._window}; the window the "
            "blf_journal_* and blf_stage_seconds families describe.",
            seen,
        )
        roles = sorted({*ROLES, *(r for r, _ in window.finished), *window.running})
        finished = GaugeMetricFamily(
            "blf_journal_jobs",
            f"Jobs in each final state {scope}. A gauge: it falls as records leave the "
            "window; blf_jobs_total is the counter.",
            labels=["role", "outcome"],
        )
        for role in roles:
            for outcome in sorted(FINAL_STATES):
                finished.add_metric([role, outcome], window.finished.get((role, outcome), 0))
        running = GaugeMetricFamily(
            "blf_jobs_in_progress",
            f"Jobs not yet in a final state {scope}.",
            labels=["role"],
        )
        for role in roles:
            running.add_metric([role], window.running.get(role, 0))
        stages = GaugeHistogramMetricFamily(
            "blf_stage_seconds",
            f"Seconds jobs spent in each stage {scope} (the journal's <stage>_s fields; "
            "total is from the poll to the submission). A gauge histogram over that window: "
            "use histogram_quantile on it directly, not on its rate.",
            labels=["stage"],
        )
        for stage in STAGES:
            values = window.stages[stage]
            buckets = [
                (floatToGoString(bound), sum(1 for v in values if v <= bound))
                for bound in STAGE_BUCKETS
            ]
            buckets.append(("+Inf", len(values)))
            stages.add_metric([stage.removesuffix("_s")], buckets, gsum_value=sum(values))
        families: list[Metric] = [records, finished, running, stages]
        if snapshot.outcomes:
            total = CounterMetricFamily(
                "blf_jobs",
                "Jobs that reached each final state, as the journal counts them when they "
                "get there (monotonic; a late submission counts a failed job once more as "
                "submitted).",
                labels=["role", "outcome"],
            )
            for name, count in sorted(snapshot.outcomes.items()):
                role, _, outcome = name.rpartition(":")
                if role and outcome and (value := _number(count)) is not None:
                    total.add_metric([role, outcome], value)
            families.append(total)
        return families

    def _queue_families(self, snapshot: Snapshot, models: Sequence[str]) -> list[Metric]:
        queued = GaugeMetricFamily(
            "blf_queue_messages",
            "Messages waiting in each model's queue (not yet taken by a GPU worker).",
            labels=["model"],
        )
        workers = GaugeMetricFamily(
            "blf_workers",
            "Live GPU workers serving each model (their word in Redis has not expired).",
            labels=["model"],
        )
        slots = GaugeMetricFamily(
            "blf_free_slots",
            "Free job slots the live GPU workers of each model report.",
            labels=["model"],
        )
        for model in models:
            queued.add_metric([model], snapshot.queued.get(model, 0))
            live = snapshot.workers.get(model, {})
            workers.add_metric([model], len(live))
            slots.add_metric([model], sum(live.values()))
        control = _gauge(
            "blf_control_queue_messages",
            "Messages waiting in the control queue (duties and job steps).",
            snapshot.control_queued,
        )
        return [queued, control, workers, slots]

    def _heartbeat_families(self, snapshot: Snapshot, now: float) -> list[Metric]:
        about = {
            "icl": "Seconds since the ICL last accepted this node's heartbeat.",
            "chain": "Seconds since the node's last on-chain heartbeat (NodeRegistry's "
            "lastHeartbeat, as the on-chain heartbeat duty last read it).",
        }
        return [
            _gauge(f"blf_{kind}_heartbeat_age_seconds", about[kind], now - at)
            for kind, at in snapshot.heartbeats.items()
            if at is not None
        ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(_text(value))
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- serving ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


# How many times ``MetricsServer.close`` connects to its server to wake it (0.05 s apart).
CLOSE_TRIES = 100


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress must not hold the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per scrape


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close`` stops it.

    Its loop waits for connections with no timeout (an idle node's endpoint never wakes
    up); ``close`` asks it to stop, then connects to it so that it notices."""

    host: str
    port: int
    _httpd: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        stopping = threading.Thread(target=self._httpd.shutdown, daemon=True)
        stopping.start()
        for _ in range(CLOSE_TRIES):  # bounded: its thread is a daemon, and may be left
            if not (stopping.is_alive() and self._thread.is_alive()):
                break
            with contextlib.suppress(OSError):
                socket.create_connection((_reachable(self.host), self.port), timeout=1).close()
            stopping.join(0.05)
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reachable(host: str) -> str:
    """An address of this machine that reaches a server bound to ``host``."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _start_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    family, address = info[0], str(info[4][0])
    server_class = type("MetricsHTTPServer", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(
        address, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": None}, name="metrics", daemon=True
    )
    thread.start()
    return MetricsServer(host=host, port=int(httpd.server_port), _httpd=httpd, _thread=thread)


def serve(
    settings: Settings,
    *,
    registry: CollectorRegistry,
    host: str | None = None,
    port: int | None = None,
    allow_remote: bool = False,
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (defaults: ``metrics_host``,
    ``metrics_port``; port 0 takes a free one) from a thread, until ``close``.

    The endpoint has no authentication, so a host that is not loopback is refused unless
    ``allow_remote``, and then warned about: put it behind a firewall or a proxy.
    """
    host = settings.metrics_host if host is None else host
    port = settings.metrics_port if port is None else port
    if not is_loopback(host):
        if not allow_remote:
            raise ConfigError(
                f"metrics_host {host!r} is not a loopback address: the metrics would be "
                "open to the network without authentication; use 127.0.0.1 (and a proxy), "
                "or pass --allow-remote",
                field="metrics_host",
            )
        log.warning(
            "Metrics listen on %s, beyond this machine, with no authentication: firewall the port",
            host,
        )
    try:
        return _start_server(host, port, registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
            field="metrics_port",
        ) from None


def build_registry(
    loaded: LoadedConfig, *, journal_window: int = JOURNAL_WINDOW
) -> CollectorRegistry:
    """A registry holding this node's collector: its Redis is ``broker_url``, else the
    embedded Redis of a `run` in the node's directory (which may start later: until it
    answers, scrapes say ``blf_redis_up 0``). Opens no connection yet."""
    from blf.app import settings_with_address, transport_options
    from blf.broker import SOCKET_NAME, broker_urls, socket_url

    settings = settings_with_address(loaded)
    urls = (
        broker_urls(settings.broker_url)
        if settings.broker_url
        else socket_url(loaded.directory / SOCKET_NAME)
    )
    client = redis.Redis.from_url(
        urls.redis,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),  # the next scrape is the retry
    )
    collector = NodeCollector(
        client,
        settings.node_address,
        ConfigView(loaded.path, first=loaded.settings),
        queue_prefix=transport_options(settings)["global_keyprefix"],
        journal_window=journal_window,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
