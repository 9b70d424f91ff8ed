"""llama.cpp as a backend (extra ``[cpu]``, ``llama-cpp-python``): a real model on a CPU,
or on a GPU llama.cpp was built for. One model per worker process, built in that process.

Greedy (temperature 0, top-k 1) with the request's seed: the same prompt gives the same
bytes on the same build and hardware. The engine is not thread-safe; the batcher calls it
from one thread, one request after another (llama.cpp's own batching is per sequence).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from blf.errors import InferenceError
from blf.inference import Generation

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(
        self,
        model_path: str,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        max_tokens: int = 512,
        n_gpu_layers: int = 0,
    ) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise InferenceError(
                "llama-cpp-python is not installed: pip install 'blf[cpu]'"
            ) from None
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise InferenceError(f"llama_cpp: no model file at {path}")
        self.path = path
        self.max_tokens = int(max_tokens)
        self.version = str(getattr(llama_cpp, "__version__", "?"))
        self._llm: Any = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=int(n_ctx),
            n_threads=int(n_threads) if n_threads else os.cpu_count(),
            n_gpu_layers=int(n_gpu_layers),
            seed=0,
            verbose=False,
        )

    def generate(self, requests: list[Generation]) -> list[str]:
        return [self._one(request) for request in requests]

    def describe(self) -> str:
        return f"llama.cpp {self.version} {self.path.name} greedy max_tokens={self.max_tokens}"

    def _one(self, request: Generation) -> str:
        answer = self._llm.create_completion(
            request.prompt,
            max_tokens=min(request.max_tokens, self.max_tokens),
            temperature=0.0,
            top_k=1,
            repeat_penalty=1.0,  # pure greedy, whatever the library's default
            seed=request.seed,
        )
        return str(answer["choices"][0]["text"])
