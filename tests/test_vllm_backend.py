"""The vLLM backend's own logic, through a fake engine that records how requests reached
it (it tests our code around the engine, not vLLM, which needs a GPU)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from blf.errors import InferenceError
from blf.inference import Generation
from blf.inference.batcher import Batcher
from blf.inference.vllm import VllmBackend


class FakeEngine:
    """Streams two partial outputs per request; waits until ``together`` are in flight."""

    version = "fake-0.0"

    def __init__(self, together: int) -> None:
        self.together = together
        self.in_flight = 0
        self.most_in_flight = 0
        self.params: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.loop_threads: set[str] = set()
        self._all_in: asyncio.Event | None = None

    async def generate(
        self, prompt: str, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[Any]:
        self.loop_threads.add(threading.current_thread().name)
        self._all_in = self._all_in or asyncio.Event()
        self.params.append(params)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= self.together:
            self._all_in.set()
        if prompt == "never":
            await asyncio.sleep(3600)  # until cancelled
        await asyncio.wait_for(self._all_in.wait(), 10)
        yield SimpleNamespace(outputs=[SimpleNamespace(text=prompt[:1])])
        self.in_flight -= 1
        yield SimpleNamespace(outputs=[SimpleNamespace(text=prompt.upper())])

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def make(engine: FakeEngine) -> VllmBackend:
    return VllmBackend(
        "tiny", engine_factory=lambda **args: engine, sampling_factory=lambda **p: dict(p)
    )


def test_concurrent_jobs_reach_the_engine_together_on_its_own_loop_thread() -> None:
    engine = FakeEngine(together=4)
    batcher = Batcher(make(engine), max_batch=4)
    outputs: dict[str, str] = {}

    def ask(prompt: str) -> None:
        outputs[prompt] = batcher.generate(Generation("tiny", prompt, seed=7), timeout_s=30)

    threads = [threading.Thread(target=ask, args=(p,)) for p in ("ab", "cd", "ef", "gh")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outputs == {"ab": "AB", "cd": "CD", "ef": "EF", "gh": "GH"}  # the final text
    assert engine.most_in_flight == 4  # continuous batching: all four in the engine at once
    assert engine.loop_threads == {"blf-vllm"}
    assert {(p["temperature"], p["seed"]) for p in engine.params} == {(0, 7)}


def test_a_request_past_the_deadline_is_aborted_in_the_engine() -> None:
    engine = FakeEngine(together=1)
    backend = make(engine)
    with pytest.raises(InferenceError, match="deadline passed during inference"):
        backend.generate([Generation("tiny", "never")], timeout_s=0.05)
    assert len(engine.aborted) == 1
    assert backend.describe() == "vllm fake-0.0 tiny greedy seeded"


def test_without_vllm_installed_the_error_says_how_to_get_it() -> None:
    with pytest.raises(InferenceError, match=r"pip install 'blf\[gpu\]'"):
        VllmBackend("tiny")
