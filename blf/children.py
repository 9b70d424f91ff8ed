"""Child processes of a node: started with only the environment they need, and unable to
outlive the process that started them (a killed supervisor must not leave a headless
worker polling and claiming jobs, or a Redis holding the node directory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["SECRET_ENV", "child_env", "spawn"]

# Never handed to a child: the key is passed to the one process that needs it by pipe.
# (The password file's name is no secret, but no child has any use for it.)
SECRET_ENV = ("BLF_KEY_PASSWORD", "BLF_KEY_PASSWORD_FILE", "BLF_PRIVATE_KEY")
_PR_SET_PDEATHSIG = 1


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment less the secrets, plus ``overrides``. BLF_CONFIG_DIR is
    dropped too: children are always given BLF_CONFIG_PATH, and both would warn."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and k != "BLF_CONFIG_DIR"}
    env.update(overrides)
    return env


@functools.cache
def _prctl() -> Any:
    """libc's prctl, looked up in the parent: the child, between fork and exec in a process
    with threads, must not start ldconfig or dlopen a library (either can deadlock)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform.startswith("linux"):
        return ctypes.CDLL(libc_name, use_errno=True).prctl
    return None


def _die_with_parent() -> Callable[[], None]:
    """What the child runs before exec: the kernel sends it SIGTERM when its parent dies,
    however it dies (Linux)."""
    prctl = _prctl()

    def arrange() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return arrange


def spawn(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (a terminal's Ctrl+C reaches only the parent,
    which stops children in order) that ends when this process ends."""
    return subprocess.Popen(
        list(command),
        env=dict(env),
        stdin=stdin,
        stdout=stdout,
        # Unless asked otherwise, a captured stdout takes stderr with it.
        stderr=stderr if stderr is not None or stdout is None else subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
        umask=umask,
    )
