"""The spool: sealed segments waiting for the branch receiver, oldest first.

The files in the spool directory are the truth about what is waiting (the sealer commits them);
a SQLite table (WAL) keeps the upload state of each: header delivered, receipt. A segment leaves
the spool only after its verified receipt is stored, in the order receipt, payload, header, so a
kill -9 at any point leaves either a segment still to upload (safe to repeat) or one whose receipt
is already on record (finished on the next pass). Nothing here decides to delete anything else.
A segment the receiver refuses for good is marked quarantined here (kept, never deleted; the
uplink leaves it aside and reports it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dualrec.durable import fsync_dir
from dualrec.segment_format import header_hash, parse_header, scan_dir


@dataclass(frozen=True)
class Entry:
    seq: int
    header_path: Path
    payload_path: Path | None
    header_bytes: bytes
    header_sha256: str
    payload_sha256: str
    payload_size: int
    header_delivered: bool
    quarantined: str | None = None  # why the receiver refuses it for good, if it does
    receipted: bool = False  # receipt stored, files not yet removed (completion interrupted)


class Spool:
    def __init__(self, directory: Path, db_path: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # 0600, -wal/-shm follow; a read-only disk keeps its
            os.close(os.open(db_path, os.O_RDONLY | os.O_CREAT, 0o600))  # mode and still starts
            os.chmod(db_path, 0o600)
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS upload (seq INTEGER PRIMARY KEY,"
            " header_sha256 TEXT NOT NULL, header_delivered_ns INTEGER,"
            " receipt BLOB, receipt_ns INTEGER)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(upload)")}
        for name, kind in (("quarantined_ns", "INTEGER"), ("quarantine_reason", "TEXT")):
            if name not in columns:  # a spool made before quarantine existed
                self._db.execute(f"ALTER TABLE upload ADD COLUMN {name} {kind}")
        self._lock = threading.Lock()  # one connection shared by the uplink's threads
        # Committed headers never change: parse each once, not on every poll of a long backlog.
        self._parsed: dict[tuple[int, int], tuple[bytes, str, str, int]] = {}

    def entries(self) -> list[Entry]:
        """Segments in the spool with a committed header, oldest first."""
        with self._lock:
            return self._entries()

    def _entries(self) -> list[Entry]:
        # Every flag belongs to the header it was set for: a row for another header under the
        # same seq (a restored chain state) says nothing about this one.
        rows = {(seq, sha): (delivered, receipted, reason) for seq, sha, delivered, receipted,
                reason in self._db.execute(
                    "SELECT seq, header_sha256, header_delivered_ns IS NOT NULL,"
                    " receipt IS NOT NULL, quarantine_reason FROM upload")}
        out = []
        seen = set()
        for seq, files in scan_dir(self.dir).items():
            if files.header is None:
                continue  # a payload without header is not committed (the sealer cleans it)
            try:
                key = (seq, files.header.stat().st_ino)
                if key not in self._parsed:
                    data = files.header.read_bytes()
                    header = parse_header(data)
                    self._parsed[key] = (data, header_hash(data), header["payload"]["sha256"],
                                         header["payload"]["size"])
            except (OSError, ValueError):
                continue  # vanished under us (completed by another thread) or unreadable
            seen.add(key)
            data, sha, payload_sha, size = self._parsed[key]
            delivered, receipted, reason = rows.get((seq, sha), (False, False, None))
            out.append(Entry(seq, files.header, files.payload, data, sha, payload_sha, size,
                             bool(delivered), reason, bool(receipted)))
        for key in self._parsed.keys() - seen:
            del self._parsed[key]
        return out

    def mark_header_delivered(self, entry: Entry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO upload (seq, header_sha256, header_delivered_ns) VALUES (?, ?, ?)"
                " ON CONFLICT(seq) DO UPDATE SET header_sha256 = excluded.header_sha256,"
                " header_delivered_ns = excluded.header_delivered_ns",
                (entry.seq, entry.header_sha256, time.time_ns()))

    def mark_header_undelivered(self, entry: Entry) -> None:
        with self._lock:
            self._db.execute("UPDATE upload SET header_delivered_ns = NULL WHERE seq = ?",
                             (entry.seq,))

    def quarantine(self, entry: Entry, reason: str) -> bool:
        """Mark the segment refused for good (kept on the box); True if it was not already."""
        with self._lock:
            row = self._db.execute(
                "SELECT quarantined_ns FROM upload WHERE seq = ? AND header_sha256 = ?",
                (entry.seq, entry.header_sha256)).fetchone()
            if row is not None and row[0] is not None:
                self._db.execute("UPDATE upload SET quarantine_reason = ? WHERE seq = ?",
                                 (reason, entry.seq))
                return False
            self._db.execute(
                "INSERT INTO upload (seq, header_sha256, quarantined_ns, quarantine_reason)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(seq) DO UPDATE SET"
                " header_sha256 = excluded.header_sha256,"
                " quarantined_ns = excluded.quarantined_ns,"
                " quarantine_reason = excluded.quarantine_reason",
                (entry.seq, entry.header_sha256, time.time_ns(), reason))
            return True

    def quarantined(self) -> list[tuple[int, str, int]]:
        """(seq, reason, since time.time_ns()) of every quarantined segment still held."""
        held = {(e.seq, e.header_sha256) for e in self.entries()}
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, header_sha256, quarantine_reason, quarantined_ns FROM upload"
                " WHERE quarantined_ns IS NOT NULL ORDER BY seq").fetchall()
        return [(seq, reason, since) for seq, sha, reason, since in rows if (seq, sha) in held]

    def complete(self, entry: Entry, receipt: bytes) -> None:
        """Store the verified receipt, then remove the segment's files."""
        with self._lock:
            self._db.execute(
                "INSERT INTO upload (seq, header_sha256, receipt, receipt_ns) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(seq) DO UPDATE SET receipt = excluded.receipt,"
                " receipt_ns = excluded.receipt_ns",
                (entry.seq, entry.header_sha256, receipt, time.time_ns()))
        if entry.payload_path is not None:
            entry.payload_path.unlink(missing_ok=True)
        entry.header_path.unlink(missing_ok=True)
        fsync_dir(self.dir)

    def receipt(self, seq: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT receipt FROM upload WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    def finish_receipted(self) -> list[int]:
        """Remove files of segments whose receipt is already stored (killed mid-completion)."""
        with self._lock:
            done = {seq: sha for seq, sha in self._db.execute(
                "SELECT seq, header_sha256 FROM upload WHERE receipt IS NOT NULL")}
        removed = []
        for e in self.entries():
            if done.get(e.seq) == e.header_sha256:
                if e.payload_path is not None:
                    e.payload_path.unlink(missing_ok=True)
                e.header_path.unlink(missing_ok=True)
                removed.append(e.seq)
        if removed:
            fsync_dir(self.dir)
        return removed

    def usage(self) -> tuple[int, int]:
        """(bytes held in the spool, bytes free on its filesystem)."""
        used = 0
        for p in self.dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                used += p.stat().st_size
        st = os.statvfs(self.dir)
        return used, st.f_bavail * st.f_frsize

    def close(self) -> None:
        self._db.close()
