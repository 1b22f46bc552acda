"""The append-only audit log: every unmasking (who, when, which session, the typed reason) and
every session opened for review. One JSON object per line, each carrying the SHA-256 of the line
before it, so an edited or removed line breaks the chain (`verify_log`). Opened O_APPEND, 0600,
fsynced per entry: an unmasking is granted only once its entry is on disk. Reasons pass through
the number shield: a log is not the place for a customer number either.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dualrec.shield import shield

GENESIS = "0" * 64


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def _last_hash(self) -> str:
        last = b""
        with self.path.open("rb") as f:
            for line in f:
                if line.strip():
                    last = line.rstrip(b"\n")
        return hashlib.sha256(last).hexdigest() if last else GENESIS

    def append(self, user: str, action: str, **what: Any) -> dict[str, Any]:
        with self._lock:
            entry = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                     "user": user, "action": action,
                     **{k: shield(v) if isinstance(v, str) else v for k, v in what.items()},
                     "prev": self._last_hash()}
            data = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return entry

    def entries(self) -> list[dict[str, Any]]:
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def verify_log(path: Path) -> list[int]:
    """Line numbers (1-based) whose prev does not match the line before: empty if intact."""
    bad, prev = [], GENESIS
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b"\n")
            if not line:
                continue
            try:
                if json.loads(line).get("prev") != prev:
                    bad.append(n)
            except ValueError:
                bad.append(n)
            prev = hashlib.sha256(line).hexdigest()
    return bad
