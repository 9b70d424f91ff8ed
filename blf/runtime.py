"""What a control worker process holds while it runs tasks: the unlocked node, one ICL
client, one CoFHE client, the cluster key, one Redis connection pool.

The CLI installs the node before the worker starts; a worker started as
``celery -A blf.app worker`` unlocks it on first use from BLF_KEY_PASSWORD."""

from __future__ import annotations

import threading

import redis
from celery.signals import worker_shutdown

from blf import keyfiles
from blf.app import app
from blf.broker import broker_urls
from blf.cofhe import Cofhe, open_cofhe
from blf.errors import BrokerError
from blf.icl import IclClient
from blf.journal import Journal
from blf.node import Node, open_node

__all__ = ["cluster_key", "cofhe", "icl", "install", "journal", "node", "redis_client"]

_node: Node | None = None
_icl: IclClient | None = None
_cofhe: Cofhe | None = None
_cluster_key: bytes | None = None
_redis: redis.Redis | None = None
_lock = threading.Lock()  # the thread pool's first tasks race to build the clients


def install(current: Node) -> None:
    global _node, _icl, _cofhe, _cluster_key
    _node, _icl, _cofhe, _cluster_key = current, None, None, None


def node() -> Node:
    if _node is None:
        install(open_node())  # `celery -A blf.app worker` started by hand: password from env
    assert _node is not None
    return _node


def icl() -> IclClient:
    global _icl
    current = node()
    if _icl is None or _icl.base_url != current.settings.icl_endpoint.rstrip("/"):
        if _icl is not None:
            _icl.close()
        _icl = current.icl()
    return _icl


def cofhe() -> Cofhe:
    global _cofhe
    with _lock:
        if _cofhe is None:
            current = node()
            _cofhe = open_cofhe(current.settings, current.account, directory=current.directory)
        return _cofhe


def cluster_key() -> bytes:
    global _cluster_key
    if _cluster_key is None:
        current = node()
        _cluster_key = keyfiles.cluster_key(current.settings, current.directory)
    return _cluster_key


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        url = app.conf.broker_url
        if not url:
            raise BrokerError("no broker configured for this worker")
        _redis = redis.Redis.from_url(broker_urls(url).redis, decode_responses=True)
    return _redis


@worker_shutdown.connect
def _close_cofhe(**_: object) -> None:
    # The bridge's helper would also go with this process; closing says goodbye on its pipe.
    global _cofhe
    if _cofhe is not None:
        _cofhe.close()
        _cofhe = None


def journal() -> Journal:
    return Journal(redis_client(), app.conf.blf_address)
