"""Inference backends and the registry that maps a model id to one.

Runs on GPU machines: imports nothing of the operator side (no wallet, chain, CoFHE or
ICL). A model with no backend configured has none: its jobs fail with that reason rather
than fall back silently to something else (the public node falls back to its mock).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from blf.config import BackendSpec
from blf.errors import UnknownModelError

__all__ = ["Backend", "Generation", "backend_for"]


@dataclass(frozen=True)
class Generation:
    """One request: deterministic by default (greedy, fixed seed)."""

    model_id: str
    prompt: str
    max_tokens: int = 512
    seed: int = 0


class Backend(Protocol):
    name: str

    def generate(self, requests: list[Generation]) -> list[str]: ...

    def describe(self) -> str:
        """Engine, version and settings, for the job journal (verifiers agree only on the
        same hardware class and versions)."""
        ...


def backend_for(model_id: str, specs: Mapping[str, BackendSpec]) -> Backend:
    spec = specs.get(model_id)
    if spec is None:
        raise UnknownModelError(
            f"no backend configured for model {model_id!r} (set model_backends in config.json)"
        )
    if spec.backend == "mock":
        from blf.inference.mock import MockBackend

        return MockBackend(**spec.options)
    raise UnknownModelError(f"model {model_id!r}: unknown backend {spec.backend!r} (known: mock)")
