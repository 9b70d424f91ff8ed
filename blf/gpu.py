"""GPU discovery. No GPU is a normal state (a control machine has none), not an error."""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["detect_gpus", "memory_used_mib"]


def detect_gpus() -> list[str]:
    """The NVIDIA GPUs visible here, e.g. ``["NVIDIA H100 80GB HBM3 (81559 MiB)"]``."""
    return _from_nvml() or _from_nvidia_smi()


def _from_nvml() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types when no driver is loaded
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            found.append(f"{name} ({memory} MiB)")
        return found
    finally:
        pynvml.nvmlShutdown()


def _from_nvidia_smi() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, memory = line.partition(",")
        if name.strip():
            gpus.append(f"{name.strip()} ({memory.strip()} MiB)")
    return gpus


def memory_used_mib(index: int = 0) -> int | None:
    """Memory in use on the ``index``-th visible GPU (after CUDA_VISIBLE_DEVICES), from
    NVML; None when NVML or the GPU is not there. A leaking engine shows here, not in
    the host's memory that Celery's per-child limits measure."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        physical = int(visible.split(",")[index]) if visible.strip() else index
        handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // (1024 * 1024)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
