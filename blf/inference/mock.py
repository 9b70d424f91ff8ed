"""The public node's mock model, exactly: ``"MOCK_OUTPUT_" + sha256_hex(model_id + ":" +
prompt)``, so mixed quorums of blf and public nodes agree on a devnet.

It is not a model. It serves only models that config maps to it, and says so in the log.
``suffix`` (for tests and trials) appends text, making this node disagree with the others.
"""

from __future__ import annotations

import hashlib
import logging

from blf.inference import Generation

__all__ = ["MockBackend", "mock_output"]

log = logging.getLogger("blf.inference")


def mock_output(model_id: str, prompt: str) -> str:
    digest = hashlib.sha256(f"{model_id}:{prompt}".encode()).hexdigest()
    return "MOCK_OUTPUT_" + digest


class MockBackend:
    name = "mock"

    def __init__(self, suffix: str = "") -> None:
        self.suffix = str(suffix)

    def generate(self, requests: list[Generation]) -> list[str]:
        for request in requests:
            log.info("Mock backend answering for %s: not a model, a fixed hash", request.model_id)
        return [mock_output(r.model_id, r.prompt) + self.suffix for r in requests]

    def describe(self) -> str:
        return "mock (not a model)" + (" with suffix" if self.suffix else "")
