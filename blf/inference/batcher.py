"""Concurrent jobs on one GPU worker, served by one backend in batches.

The worker's thread pool runs one job per thread; each hands its request to the model's
``Batcher`` and waits. One dispatcher thread per model takes what is queued (up to
``max_batch``), waits up to ``window_s`` for the jobs this worker is busy with that have
not asked yet (a thread freed by the last batch needs a few milliseconds to fetch, download
and decrypt its next job; a lone job waits for nobody), and calls the backend once for them
all: a backend that batches (vLLM, transformers) then runs them together, one that does
not (the mock, a public-node plugin) loops. The backend is only ever called from that one
thread, so engines that are not thread-safe need no lock of their own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from blf.errors import InferenceError
from blf.inference import Backend, Generation

__all__ = ["Batcher"]

log = logging.getLogger("blf.inference")


@dataclass
class _Pending:
    request: Generation
    result: Future[str]


class Batcher:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int,
        window_s: float = 0.03,
        busy: Callable[[], int] | None = None,
    ) -> None:
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self._busy = busy or (lambda: self.max_batch)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="blf-batcher", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def generate(self, request: Generation, *, timeout_s: float) -> str:
        """The output for ``request``; InferenceError past ``timeout_s`` (the job's
        deadline: Celery's time limits do not apply to the threads pool). A backend that
        batches by itself (``concurrent = True``, e.g. vLLM) is called directly."""
        if getattr(self.backend, "concurrent", False):
            outputs: list[str] = self.backend.generate(  # type: ignore[call-arg]
                [request], timeout_s=timeout_s
            )
            return outputs[0]
        pending = _Pending(request, Future())
        self._queue.put(pending)
        try:
            return pending.result.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout:
            pending.result.cancel()  # still queued: it will be skipped; running: discarded
            raise InferenceError("deadline passed during inference") from None

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            live = [p for p in batch if p.result.set_running_or_notify_cancel()]
            if live:
                self._run(live)

    def _collect(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        wanted = min(self.max_batch, max(1, self._busy()))
        while len(batch) < wanted:
            try:
                item = self._queue.get(timeout=self.window_s)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        try:
            outputs = self.backend.generate([p.request for p in batch])
            if len(outputs) != len(batch):
                raise InferenceError(
                    f"backend {self.backend.name} returned {len(outputs)} outputs for "
                    f"{len(batch)} requests"
                )
        except Exception as exc:  # every waiting job learns of it, none hangs
            for pending in batch:
                pending.result.set_exception(exc)
            return
        for pending, output in zip(batch, outputs, strict=True):
            pending.result.set_result(output)
