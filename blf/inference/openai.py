"""An OpenAI-compatible server as a backend: `vllm serve`, llama.cpp's server, or any
endpoint that speaks ``/v1/completions`` (or ``/v1/chat/completions``), for operators who
already run one.

Greedy and seeded (``temperature 0``, the request's seed), so two nodes asking the same
server get the same text. A batch is sent as concurrent requests, so a server that
batches continuously (vLLM) runs them together.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from blf.errors import InferenceError
from blf.inference import Generation
from blf.redact import display_url

__all__ = ["OpenAICompatibleBackend"]


class OpenAICompatibleBackend:
    name = "openai"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        chat: bool = False,
        api_key_env: str | None = None,
        timeout_s: float = 300.0,
        max_parallel: int = 16,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.chat = bool(chat)
        self.timeout_s = float(timeout_s)
        # Server-specific sampling fields (llama.cpp's repeat_penalty, vLLM's
        # repetition_penalty…): every node of a quorum must send the same.
        self.extra = dict(extra or {})
        # The key stays in the environment: config.json is no place for it.
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="blf-openai")

    def generate(self, requests_: list[Generation]) -> list[str]:
        return list(self._pool.map(self._one, requests_))

    def describe(self) -> str:
        kind = "chat" if self.chat else "completions"
        return f"openai-compatible {kind} at {display_url(self.url)}, model {self.model or '(job)'}"

    def _one(self, request: Generation) -> str:
        model = self.model or request.model_id
        body: dict[str, Any] = {
            **self.extra,
            "model": model,
            "max_tokens": request.max_tokens,
            "temperature": 0,
            "seed": request.seed,
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        answer = self._post(path, body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise InferenceError(f"{display_url(self.url)}{path}: answer has no text") from None
        return str(text)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        where = display_url(self.url) + path
        try:
            response = self._session.post(
                self.url + path, json=body, headers=self._headers, timeout=self.timeout_s
            )
        except requests.RequestException as exc:
            raise InferenceError(f"{where} unreachable ({type(exc).__name__})") from None
        if response.status_code >= 400:
            # The body may echo the prompt: only the status is reported.
            raise InferenceError(f"{where} answered {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise InferenceError(f"{where} answered with something other than JSON") from None
