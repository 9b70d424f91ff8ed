"""Backends installed as Python packages, through entry points.

``blf.backends``: ``name = "package.module:factory"``, the factory taking the model's
options as keyword arguments. ``blindference.backends``: the public node's plugins, with
its interface (``name``, ``is_available()``, ``supported_models()``,
``run(model_id, prompt) -> str``), served one request at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from blf.errors import InferenceError

__all__ = ["BLF_GROUP", "PUBLIC_GROUP", "PublicNodeBackend", "plugin_factory"]

log = logging.getLogger("blf.inference")

BLF_GROUP = "blf.backends"
PUBLIC_GROUP = "blindference.backends"


def _entry_point(group: str, name: str) -> EntryPoint | None:
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    return found[0] if found else None


def _load(entry: EntryPoint) -> Any:
    try:
        return entry.load()
    except Exception as exc:  # a broken plugin must not take the worker down with it
        raise InferenceError(
            f"backend {entry.name!r} ({entry.group}: {entry.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def plugin_factory(name: str) -> Callable[..., Any] | None:
    entry = _entry_point(BLF_GROUP, name)
    if entry is not None:
        factory: Callable[..., Any] = _load(entry)
        return factory
    entry = _entry_point(PUBLIC_GROUP, name)
    if entry is not None:
        plugin = _load(entry)
        return lambda **options: PublicNodeBackend(plugin, **options)
    return None


class PublicNodeBackend:
    """A public-node plugin behind blf's interface. Its ``run`` takes one prompt, so a
    batch is served one request after another."""

    def __init__(self, plugin: Any, **options: Any) -> None:
        instance = plugin() if isinstance(plugin, type) else plugin
        self._plugin = instance
        self.name = str(getattr(instance, "name", type(instance).__name__))
        available = getattr(instance, "is_available", None)
        if callable(available) and not available():
            raise InferenceError(f"public-node backend {self.name!r} says it is not available")
        if options:
            log.warning("public-node backend %s ignores options %s", self.name, sorted(options))

    def supports(self, model_id: str) -> bool:
        models = getattr(self._plugin, "supported_models", None)
        return not callable(models) or model_id in list(models())

    def generate(self, requests: list[Any]) -> list[str]:
        outputs = []
        for request in requests:
            if not self.supports(request.model_id):
                raise InferenceError(
                    f"public-node backend {self.name!r} does not serve {request.model_id!r}"
                )
            outputs.append(str(self._plugin.run(request.model_id, request.prompt)))
        return outputs

    def describe(self) -> str:
        version = getattr(self._plugin, "version", "")
        return f"public-node plugin {self.name}{' ' + str(version) if version else ''}"
