"""A GPU worker whose engine leaks GPU memory stops past a limit, so that it is restarted;
NVML is stood in for by a module with its API (there is no GPU here)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from blf.config import build_settings
from blf.gpu import memory_used_mib
from blf.ipfs import IpfsClient
from blf.tasks import inference


class FakeNvml:
    def __init__(self, used_mib: int) -> None:
        self.used = used_mib * 1024 * 1024
        self.asked: list[int] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.asked.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(used_mib=900)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_memory_is_read_from_the_gpu_this_worker_is_pinned_to(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert memory_used_mib() == 900
    assert nvml.asked == [3]


def test_past_the_limit_the_worker_stops_once(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    signals: list[int] = []
    monkeypatch.setattr(inference.os, "kill", lambda pid, sig: signals.append(sig))

    def context(limit: int) -> inference.GpuContext:
        settings = build_settings({"gpu_memory_limit_mib": limit}, path=tmp_path / "c.json")
        return inference.GpuContext(settings, b"k" * 32, IpfsClient(api_url=None, gateways=[]))

    roomy = context(1000)
    inference._check_memory(roomy)
    assert signals == [] and not roomy.leaked
    tight = context(500)
    inference._check_memory(tight)
    inference._check_memory(tight)  # already stopping: not asked twice
    assert signals == [signal.SIGTERM] and tight.leaked
