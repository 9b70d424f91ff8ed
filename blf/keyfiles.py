"""The node's two symmetric keys as files: the cluster key and the control key.

* The cluster key seals secrets that cross Redis between the control machine and the GPU
  machines (``blf.crypto.seal``). Every machine of one node shares it: the control machine
  creates ``cluster.key``, and each GPU machine is given a copy, as a file
  (``BLF_CLUSTER_KEY_FILE``) or as hex in ``BLF_CLUSTER_KEY``.
* The control key stays on the control machine and is never needed on a GPU machine, so
  it is simply created the first time it is asked for.

Both are 64 lowercase hex characters and a newline, mode 0600. A key file is born with
that mode and with its full contents (written aside, then hard-linked into place), so there
is never a moment when another user could read it, nor one when another process could read
it half-written. A file that others can read is refused rather than silently used: the
key may already have leaked, and the operator should know.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path

from blf.config import Settings
from blf.errors import ConfigError

__all__ = [
    "cluster_key",
    "control_key",
    "create_key_file",
    "parse_key_hex",
    "read_key_file",
]

_KEY_BYTES = 32
_KEY_HEX = re.compile(r"[0-9a-fA-F]{64}")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
# Filesystems without hard links (vfat, some network mounts) answer one of these.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}


def parse_key_hex(text: str, *, source: str) -> bytes:
    """A 32-byte key from 64 hex characters (an optional ``0x`` and whitespace around)."""
    body = text.strip()
    if body[:2] in ("0x", "0X"):
        body = body[2:]
    if not _KEY_HEX.fullmatch(body):
        # Never echo the text: it is (close to) a secret key.
        raise ConfigError(
            f"{source}: expected a key of 64 hex characters, got {len(body)} characters"
            + ("" if len(body) != 64 else " that are not all hex")
        )
    return bytes.fromhex(body)


def _write_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data``; ``FileExistsError`` if it exists."""
    fd = os.open(path, _CREATE_FLAGS, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only narrow 0600; make it exactly that
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    # A key that vanishes in a crash after first use would strand what it sealed.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish_new_key(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` complete or not at all; ``FileExistsError`` if taken."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    _write_exclusive(aside, data)
    try:
        os.link(aside, path)  # atomic, and refuses an existing path like O_EXCL does
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: create in place; a racing reader may then see it short.
        _write_exclusive(path, data)
    finally:
        aside.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _create(path: Path) -> bytes:
    """A new key at ``path``; ``FileExistsError`` passes, other failures are ConfigError."""
    key = secrets.token_bytes(_KEY_BYTES)
    try:
        _publish_new_key(path, (key.hex() + "\n").encode("ascii"))
    except FileExistsError:
        raise
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot create key file: {exc.strerror or exc}", path=str(path)
        ) from None
    return key


def create_key_file(path: Path) -> bytes:
    """Create a new random key file at ``path`` (mode 0600) and return the key."""
    try:
        return _create(path)
    except FileExistsError:
        raise ConfigError(
            f"{path}: key file already exists; refusing to overwrite it", path=str(path)
        ) from None


def _read_private(path: Path) -> bytes:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such key file", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc.strerror}", path=str(path)) from None
    with handle:
        # fstat of the open file, not stat of the name: the file checked is the file read.
        if os.fstat(handle.fileno()).st_mode & 0o077:
            raise ConfigError(
                f"{path}: key file is readable by group or others; run `chmod 600 {path}`",
                path=str(path),
            )
        try:
            return handle.read()
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot read key file: {exc.strerror}", path=str(path)
            ) from None


def read_key_file(path: Path) -> bytes:
    """The 32-byte key in ``path``; ConfigError naming the path for any problem."""
    data = _read_private(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: expected a key of 64 hex characters, found non-ASCII bytes",
            path=str(path),
        ) from None
    try:
        return parse_key_hex(text, source=str(path))
    except ConfigError as exc:
        raise ConfigError(str(exc), path=str(path)) from None


def _cluster_key_path(settings: Settings, directory: Path | None) -> Path | None:
    if not settings.cluster_key_file.strip():
        return None
    path = Path(settings.cluster_key_file).expanduser()
    if path.is_absolute():
        return path
    return (directory if directory is not None else Path.cwd()) / path


def _no_cluster_key(reason: str) -> ConfigError:
    return ConfigError(
        f"no cluster key ({reason}): GPU machines need BLF_CLUSTER_KEY_FILE (a path) or "
        "BLF_CLUSTER_KEY (its hex), copied from the control machine's cluster.key",
        field="cluster_key_file",
    )


def cluster_key(settings: Settings, directory: Path | None) -> bytes:
    """``BLF_CLUSTER_KEY`` if set, else the file ``cluster_key_file`` names.

    A relative file name is taken relative to ``directory`` (config.json's), else to the
    working directory. An empty ``BLF_CLUSTER_KEY`` counts as unset."""
    if settings.cluster_key is not None and settings.cluster_key.get_secret_value().strip():
        return parse_key_hex(settings.cluster_key.get_secret_value(), source="BLF_CLUSTER_KEY")
    path = _cluster_key_path(settings, directory)
    if path is None:
        raise _no_cluster_key("cluster_key_file is empty")
    if not os.path.lexists(path):
        raise _no_cluster_key(f"{path} does not exist")
    return read_key_file(path)


def control_key(path: Path) -> bytes:
    """The control machine's own key at ``path``, created on first use."""
    if not os.path.lexists(path):
        try:
            return _create(path)
        except FileExistsError:
            pass  # another process created it between our check and our create: use theirs
    return read_key_file(path)
