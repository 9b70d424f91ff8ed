"""Inference backends and the registry that maps a model id to one.

Runs on GPU machines: imports nothing of the operator side (no wallet, chain, CoFHE or
ICL). Config's ``model_backends`` names each model's backend and its options; a model with
no entry has none, and its jobs fail with that reason rather than fall back silently to
something else (the public node falls back to its mock).

Backends come from three places, looked up in this order:

* blf's own: ``mock``, ``openai`` (an OpenAI-compatible server by URL), ``vllm``,
  ``llama_cpp`` and ``transformers``;
* the ``blf.backends`` entry point group: a callable taking the options as keyword
  arguments and returning a ``Backend``;
* the public node's ``blindference.backends`` group, whose plugins have
  ``name / is_available() / supported_models() / run(model_id, prompt)``: wrapped by
  ``PublicNodeBackend`` so an operator's existing plugin keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blf.config import BackendSpec
from blf.errors import InferenceError, UnknownModelError

__all__ = ["BUILTIN", "Backend", "Generation", "backend_for", "describe_models", "unservable"]


@dataclass(frozen=True)
class Generation:
    """One request: deterministic by default (greedy, fixed seed)."""

    model_id: str
    prompt: str
    max_tokens: int = 512
    seed: int = 0


class Backend(Protocol):
    name: str

    def generate(self, requests: list[Generation]) -> list[str]:
        """One output per request, in order; a backend that batches gets them together."""
        ...

    def describe(self) -> str:
        """Engine, version and settings, for the job journal (verifiers agree only on the
        same hardware class and versions)."""
        ...


def _mock(**options: Any) -> Backend:
    from blf.inference.mock import MockBackend

    return MockBackend(**options)


def _openai(**options: Any) -> Backend:
    from blf.inference.openai import OpenAICompatibleBackend

    return OpenAICompatibleBackend(**options)


def _vllm(**options: Any) -> Backend:
    from blf.inference.vllm import VllmBackend

    return VllmBackend(**options)


def _llama_cpp(**options: Any) -> Backend:
    from blf.inference.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(**options)


def _transformers(**options: Any) -> Backend:
    from blf.inference.transformers_backend import TransformersBackend

    return TransformersBackend(**options)


BUILTIN: dict[str, Callable[..., Backend]] = {
    "mock": _mock,
    "openai": _openai,
    "vllm": _vllm,
    "llama_cpp": _llama_cpp,
    "transformers": _transformers,
}


def backend_for(model_id: str, specs: Mapping[str, BackendSpec]) -> Backend:
    spec = specs.get(model_id)
    if spec is None:
        raise UnknownModelError(
            f"no backend configured for model {model_id!r} (set model_backends in config.json)"
        )
    factory = BUILTIN.get(spec.backend)
    if factory is None:
        from blf.inference.plugins import plugin_factory

        factory = plugin_factory(spec.backend)
    if factory is None:
        raise UnknownModelError(
            f"model {model_id!r}: unknown backend {spec.backend!r} (built in: "
            f"{', '.join(sorted(BUILTIN))}; or an entry point in blf.backends or "
            "blindference.backends)"
        )
    try:
        return factory(**spec.options)
    except TypeError as exc:
        raise InferenceError(f"model {model_id!r}: backend {spec.backend!r}: {exc}") from None


def unservable(model_id: str, specs: Mapping[str, BackendSpec]) -> str | None:
    """Why a model cannot be served here, judged cheaply (no engine is built): no backend
    configured, or one that no built-in or entry point provides. None when it may be."""
    spec = specs.get(model_id)
    if spec is None:
        return f"no backend configured for model {model_id!r}"
    if spec.backend in BUILTIN:
        return None
    from blf.inference.plugins import plugin_factory

    try:
        known = plugin_factory(spec.backend) is not None
    except InferenceError as exc:
        return str(exc)
    return None if known else f"model {model_id!r}: unknown backend {spec.backend!r}"


def describe_models(
    models: list[str], specs: Mapping[str, BackendSpec]
) -> list[tuple[str, str, str | None]]:
    """(model, backend, why it cannot be served or None) for each model, for ``models
    list`` and start-up checks. Building a backend is what proves it can serve."""
    rows: list[tuple[str, str, str | None]] = []
    for model in dict.fromkeys([*models, *specs]):
        spec = specs.get(model)
        try:
            backend_for(model, specs)
        except InferenceError as exc:
            rows.append((model, spec.backend if spec else "-", str(exc)))
            continue
        rows.append((model, spec.backend if spec else "-", None))
    return rows
