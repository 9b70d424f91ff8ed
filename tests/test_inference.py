"""Backends: the registry, entry-point plugins (blf's and the public node's), and the
batcher that serves a worker's concurrent jobs in one backend call."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blf.config import BackendSpec
from blf.errors import InferenceError, UnknownModelError
from blf.inference import Generation, backend_for, describe_models
from blf.inference.batcher import Batcher
from blf.inference.mock import mock_output
from tests.nodes import wait_until

PLUGINS = """
class Echo:
    name = "echo"
    def __init__(self, prefix=""):
        self.prefix = prefix
    def generate(self, requests):
        return [self.prefix + r.prompt for r in requests]
    def describe(self):
        return "echo 1.0"


class PublicStyle:
    name = "shouty"
    def is_available(self):
        return True
    def supported_models(self):
        return ["loud-model"]
    def run(self, model_id, prompt):
        return prompt.upper()


class Dice:
    name = "dice"
    def generate(self, requests):
        import secrets
        return [secrets.token_hex(4) for _ in requests]
    def describe(self):
        return "dice"


class Unavailable(PublicStyle):
    name = "gone"
    def is_available(self):
        return False
"""


@pytest.fixture
def installed_plugins(tmp_path: Path) -> Iterator[None]:
    """A package installed the way pip would: a module and a dist-info with entry points."""
    (tmp_path / "fake_backends.py").write_text(PLUGINS)
    info = tmp_path / "fake_backends-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-backends\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[blf.backends]\necho = fake_backends:Echo\ndice = fake_backends:Dice\n\n"
        "[blindference.backends]\nshouty = fake_backends:PublicStyle\n"
        "gone = fake_backends:Unavailable\nbroken = fake_backends:Missing\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fake_backends", None)


def spec(backend: str, **options: str) -> BackendSpec:
    return BackendSpec(backend=backend, **options)


def run(backend: object, model: str, prompt: str) -> str:
    return backend.generate([Generation(model, prompt)])[0]  # type: ignore[attr-defined, no-any-return]


def test_the_mock_is_the_public_nodes_mock_and_only_where_configured() -> None:
    assert run(backend_for("m", {"m": spec("mock")}), "m", "hi") == mock_output("m", "hi")
    assert mock_output("m", "hi") == (
        "MOCK_OUTPUT_" + __import__("hashlib").sha256(b"m:hi").hexdigest()
    )
    with pytest.raises(UnknownModelError, match="no backend configured for model 'other'"):
        backend_for("other", {"m": spec("mock")})
    with pytest.raises(
        UnknownModelError, match=r"unknown backend 'nope' \(built in: llama_cpp, mock"
    ):
        backend_for("m", {"m": spec("nope")})
    with pytest.raises(InferenceError, match="unexpected keyword"):
        backend_for("m", {"m": spec("mock", colour="red")})


def test_entry_point_backends_and_public_node_plugins(installed_plugins: None) -> None:
    echo = backend_for("any", {"any": spec("echo", prefix="> ")})
    assert run(echo, "any", "hello") == "> hello" and echo.describe() == "echo 1.0"
    shouty = backend_for("loud-model", {"loud-model": spec("shouty")})
    assert run(shouty, "loud-model", "hello") == "HELLO"
    assert shouty.describe() == "public-node plugin shouty"
    quiet = backend_for("quiet-model", {"quiet-model": spec("shouty")})
    with pytest.raises(InferenceError, match="does not serve 'quiet-model'"):
        run(quiet, "quiet-model", "x")
    with pytest.raises(InferenceError, match="says it is not available"):
        backend_for("m", {"m": spec("gone")})
    with pytest.raises(InferenceError, match="failed to load: AttributeError"):
        backend_for("m", {"m": spec("broken")})


def test_models_are_described_with_why_they_cannot_be_served(installed_plugins: None) -> None:
    rows = describe_models(
        ["a", "b", "c"], {"a": spec("mock"), "c": spec("gone"), "d": spec("echo")}
    )
    by_model = {model: (backend, why) for model, backend, why in rows}
    assert by_model["a"] == ("mock", None) and by_model["d"] == ("echo", None)
    assert by_model["b"][0] == "-" and "no backend configured" in str(by_model["b"][1])
    assert "not available" in str(by_model["c"][1])


class Recorder:
    """A backend that records how requests were grouped, and can hold its first call."""

    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.hold = threading.Event()
        self.held = threading.Event()

    def generate(self, requests: list[Generation]) -> list[str]:
        if not self.batches:
            self.held.set()
            self.hold.wait(30)
        self.batches.append([r.prompt for r in requests])
        return [r.prompt[::-1] for r in requests]

    def describe(self) -> str:
        return "recorder"


def test_concurrent_requests_are_batched_and_each_gets_its_own_output() -> None:
    backend = Recorder()
    batcher = Batcher(backend, max_batch=4, window_s=0.001)
    outputs: dict[str, str] = {}

    def ask(prompt: str) -> None:
        outputs[prompt] = batcher.generate(Generation("m", prompt), timeout_s=30)

    first = threading.Thread(target=ask, args=("one",))
    first.start()
    backend.held.wait(30)  # the first request is in the engine...
    others = [threading.Thread(target=ask, args=(p,)) for p in ("two", "three", "four")]
    for thread in others:
        thread.start()
    wait_until(lambda: batcher.pending() == 3, what="three requests queued behind it")
    backend.hold.set()  # ...and the three that arrived meanwhile go in one batch
    for thread in [first, *others]:
        thread.join(30)
    assert backend.batches[0] == ["one"]
    assert sorted(backend.batches[1]) == ["four", "three", "two"]
    assert outputs == {"one": "eno", "two": "owt", "three": "eerht", "four": "ruof"}
    batcher.close()


def test_a_batch_that_fails_fails_every_request_in_it_and_none_hangs() -> None:
    class Broken:
        name = "broken"

        def __init__(self, answer: list[str] | None) -> None:
            self.answer = answer

        def generate(self, requests: list[Generation]) -> list[str]:
            if self.answer is None:
                raise RuntimeError("CUDA out of memory")
            return self.answer

        def describe(self) -> str:
            return "broken"

    short = Batcher(Broken([]), max_batch=1)
    with pytest.raises(InferenceError, match="returned 0 outputs for 1 requests"):
        short.generate(Generation("m", "x"), timeout_s=30)
    short.close()
    crashing = Batcher(Broken(None), max_batch=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        crashing.generate(Generation("m", "x"), timeout_s=30)
    # The dispatcher survives a failed batch: the next request is served (and fails too).
    with pytest.raises(RuntimeError):
        crashing.generate(Generation("m", "y"), timeout_s=30)
    crashing.close()


def test_a_request_past_its_deadline_gives_up_with_a_clear_error() -> None:
    backend = Recorder()
    batcher = Batcher(backend, max_batch=1)
    with pytest.raises(InferenceError, match="deadline passed during inference"):
        batcher.generate(Generation("m", "slow"), timeout_s=0.05)
    backend.hold.set()
    batcher.close()
