"""The OpenAI-compatible backend against a local server speaking that API over HTTP (a
stand-in: the real llama.cpp server needs a 5-minute compile, left to the inference
milestone's real-model tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from blf.config import BackendSpec
from blf.devnet.server import LocalServer
from blf.errors import InferenceError
from blf.inference import Generation, backend_for
from tests.nodes import closed_port_url


class StandIn:
    def __init__(self, together: int = 1) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[str] = []
        self.mode = "ok"
        self.app = FastAPI()
        arrived = asyncio.Event()

        @self.app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(request.headers.get("authorization", ""))
            if len(self.bodies) >= together:
                arrived.set()
            await asyncio.wait_for(arrived.wait(), 10)  # proves the batch came concurrently
            if self.mode == "error":
                return JSONResponse({"error": "overloaded"}, status_code=503)
            if self.mode == "garbage":
                return PlainTextResponse("<html>proxy</html>")
            return {"choices": [{"text": "echo:" + body["prompt"]}]}

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.bodies.append(body)
            return {"choices": [{"message": {"content": "chat:" + body["messages"][0]["content"]}}]}


@pytest.fixture
def stand_in() -> Iterator[tuple[StandIn, str]]:
    server = StandIn(together=3)
    with LocalServer(server.app) as running:
        yield server, running.url


def backend(url: str, **options: Any) -> Any:
    return backend_for("m", {"m": BackendSpec(backend="openai", url=url, **options)})


def test_a_batch_goes_out_concurrently_greedy_and_seeded(
    stand_in: tuple[StandIn, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, url = stand_in
    monkeypatch.setenv("SERVER_KEY", "sk-test")
    engine = backend(url, model="served-name", api_key_env="SERVER_KEY")
    prompts = ["one", "two", "three"]
    outputs = engine.generate([Generation("m", p, max_tokens=7, seed=3) for p in prompts])
    assert outputs == ["echo:one", "echo:two", "echo:three"]
    assert {(b["model"], b["temperature"], b["seed"], b["max_tokens"]) for b in server.bodies} == {
        ("served-name", 0, 3, 7)
    }
    assert server.headers == ["Bearer sk-test"] * 3
    assert "served-name" in engine.describe() and "sk-test" not in engine.describe()


def test_chat_form(stand_in: tuple[StandIn, str]) -> None:
    server, url = stand_in
    engine = backend(url, chat=True)
    assert engine.generate([Generation("m", "hi")]) == ["chat:hi"]
    assert server.bodies[0]["model"] == "m"  # the job's model id when none is configured


@pytest.mark.parametrize(
    ("mode", "message"), [("error", "answered 503"), ("garbage", "other than JSON")]
)
def test_server_errors_are_one_line_without_the_prompt(mode: str, message: str) -> None:
    server = StandIn()
    server.mode = mode
    with (
        LocalServer(server.app) as running,
        pytest.raises(InferenceError, match=message) as caught,
    ):
        backend(running.url).generate([Generation("m", "secret prompt")])
    assert "secret prompt" not in str(caught.value)


def test_an_unreachable_server_says_so() -> None:
    with pytest.raises(InferenceError, match="unreachable"):
        backend(closed_port_url(), timeout_s=2).generate([Generation("m", "x")])
