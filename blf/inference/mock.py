"""The public node's mock model, exactly: ``"MOCK_OUTPUT_" + sha256_hex(model_id + ":" +
prompt)``, so mixed quorums of blf and public nodes agree on a devnet.

It is not a model. It serves only models that config maps to it, and says so in the log.
``suffix`` (for tests and trials) appends text, making this node disagree with the others;
``batch_latency_s`` makes every call take that long whatever the batch size, like an
engine whose batch costs one forward pass (for benchmarks of the pipeline's batching).
"""

from __future__ import annotations

import hashlib
import logging
import time

from blf.inference import Generation

__all__ = ["MockBackend", "mock_output"]

log = logging.getLogger("blf.inference")


def mock_output(model_id: str, prompt: str) -> str:
    digest = hashlib.sha256(f"{model_id}:{prompt}".encode()).hexdigest()
    return "MOCK_OUTPUT_" + digest


class MockBackend:
    name = "mock"

    def __init__(self, suffix: str = "", batch_latency_s: float = 0.0) -> None:
        self.suffix = str(suffix)
        self.batch_latency_s = float(batch_latency_s)

    def generate(self, requests: list[Generation]) -> list[str]:
        if self.batch_latency_s:
            time.sleep(self.batch_latency_s)  # the stand-in for one batched forward pass
        for request in requests:
            log.info("Mock backend answering for %s: not a model, a fixed hash", request.model_id)
        return [mock_output(r.model_id, r.prompt) + self.suffix for r in requests]

    def describe(self) -> str:
        return "mock (not a model)" + (" with suffix" if self.suffix else "")
