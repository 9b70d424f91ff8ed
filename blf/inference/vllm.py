"""vLLM as a backend (extra ``[gpu]``): one async engine per GPU worker process, its event
loop on a thread of its own, fed concurrently by the worker's thread pool.

vLLM batches continuously: every request is handed to the engine as it comes and joins
the running batch at the next step, so this backend declares itself ``concurrent`` and the
worker's threads call it directly instead of through ``blf.inference.batcher``. All engine
calls run on the loop thread, so ``LLM.generate``'s lack of thread safety never matters.

Facts designed around: the engine starts a subprocess of its own (prefork's daemonic
children cannot), so the GPU worker uses threads; Celery's time limits do not apply to
threads, so a request past the job's deadline is aborted in the engine here. Determinism:
temperature 0 with an explicit seed per request, and ``VLLM_BATCH_INVARIANT=1`` where the
GPU supports it; verifiers agree only on the same hardware class and versions.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from blf.errors import InferenceError
from blf.inference import Generation

__all__ = ["VllmBackend"]


def _engine_from_vllm(**engine_args: Any) -> Any:
    os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")
    try:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
    except ImportError:
        raise InferenceError("vLLM is not installed: pip install 'blf[gpu]'") from None
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_args))


def _sampling_from_vllm(**params: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**params)


class VllmBackend:
    name = "vllm"
    concurrent = True  # called from many threads at once; see the module docstring

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 64,
        engine_factory: Callable[..., Any] = _engine_from_vllm,
        sampling_factory: Callable[..., Any] = _sampling_from_vllm,
    ) -> None:
        args = {
            "model": model,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_num_seqs": max_num_seqs,
        }
        if max_model_len:
            args["max_model_len"] = max_model_len
        self.model = model
        self._sampling = sampling_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blf-vllm", daemon=True)
        self._thread.start()
        # Built on the loop's thread: the engine binds to the loop that creates it.
        try:
            self._engine = self._call(self._build(engine_factory, args), timeout_s=None)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    async def _build(self, factory: Callable[..., Any], args: dict[str, Any]) -> Any:
        return factory(**args)

    def generate(self, requests: list[Generation], *, timeout_s: float | None = None) -> list[str]:
        return [self._one(r, timeout_s) for r in requests]

    def describe(self) -> str:
        version = getattr(self._engine, "version", None) or _vllm_version()
        return f"vllm {version} {self.model} greedy seeded"

    def _one(self, request: Generation, timeout_s: float | None) -> str:
        request_id = uuid.uuid4().hex
        params = self._sampling(temperature=0, seed=request.seed, max_tokens=request.max_tokens)
        future = asyncio.run_coroutine_threadsafe(
            self._final_text(request.prompt, params, request_id), self._loop
        )
        try:
            return str(future.result(timeout=None if timeout_s is None else max(timeout_s, 0.0)))
        except FutureTimeout:
            future.cancel()  # stops our side of the stream; the engine is told to drop it
            self._call(self._abort(request_id), timeout_s=10)
            raise InferenceError("deadline passed during inference") from None

    async def _final_text(self, prompt: str, params: Any, request_id: str) -> str:
        final = None
        async for output in self._engine.generate(prompt, params, request_id):
            final = output
        if final is None or not final.outputs:
            raise InferenceError("vLLM returned no output")
        return str(final.outputs[0].text)

    async def _abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def _call(self, coroutine: Any, timeout_s: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=None if timeout_s is None else max(timeout_s, 0.0))


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:
        return "?"
