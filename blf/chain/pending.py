"""The journal of signed, not yet mined transactions (``pending-tx.json``).

A transaction is written here, under the nonce lock, before it is sent, and removed once
its receipt is seen. A run that died or gave up waiting leaves its entry behind, so the
next run resends those same bytes (same nonce: they land at most once) instead of signing
a second transaction for the same purpose.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from blf.errors import ChainError

__all__ = ["PendingJournal", "PendingTx"]


class PendingTx(BaseModel):
    """A signed transaction sent but not yet seen mined. The raw bytes are public once
    broadcast, so keeping them on disk reveals nothing the chain will not."""

    model_config = ConfigDict(frozen=True)

    label: str
    sender: str
    to: str
    data: str
    value: int
    nonce: int
    tx_hash: str
    raw: str


class PendingJournal:
    """`{label: PendingTx}` in one JSON file, written atomically (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, label: str) -> PendingTx | None:
        return self._read().get(label)

    def put(self, record: PendingTx) -> None:
        entries = self._read()
        entries[record.label] = record
        self._write(entries)

    def clear(self, label: str, tx_hash: str) -> None:
        entries = self._read()
        if label in entries and entries[label].tx_hash == tx_hash:
            del entries[label]
            self._write(entries)

    def _read(self) -> dict[str, PendingTx]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {k: PendingTx.model_validate(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, ValidationError) as err:
            raise ChainError(
                f"cannot read the pending-transaction file {self.path}: {err}"
            ) from err

    def _write(self, entries: dict[str, PendingTx]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({k: v.model_dump() for k, v in entries.items()}, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
