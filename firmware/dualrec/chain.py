"""Durable chain state: the next seq, the previous header's hash, and the session left open.

Kept in SQLite (synchronous=FULL) so it survives kill -9 and power loss. The commit point of a
segment is the rename of its header into the spool; the state row is updated after it. On start,
reconcile() adopts any header in the spool newer than the state (killed between the two), so a
seq is never issued twice and never skipped.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dualrec.segment_format import GENESIS_PREV, header_hash, parse_header, scan_dir


@dataclass(frozen=True, slots=True)
class ChainHead:
    next_seq: int
    prev: str


class ChainState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # No state on disk: a new box, or one whose state was lost (a replaced or restored SD
        # card, a deleted file). The gateway then resumes from what it can prove: its spool,
        # or the receiver's head (dualrec.chain_resume, FORMAT.md §4).
        self.fresh = not path.exists()
        with contextlib.suppress(OSError):  # 0600, -wal/-shm follow; a read-only disk keeps its
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))  # mode and still starts
            os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS chain (id INTEGER PRIMARY KEY CHECK (id = 0),"
            " next_seq INTEGER NOT NULL, prev TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS open_session (id INTEGER PRIMARY KEY CHECK (id = 0),"
            " session TEXT NOT NULL, boot_id TEXT NOT NULL, next_index INTEGER NOT NULL,"
            " last_end_mono_ns INTEGER NOT NULL, last_end_utc_ns INTEGER NOT NULL)"
        )
        self._db.execute("INSERT OR IGNORE INTO chain VALUES (0, 0, ?)", (GENESIS_PREV,))

    def head(self) -> ChainHead:
        row = self._db.execute("SELECT next_seq, prev FROM chain WHERE id = 0").fetchone()
        return ChainHead(row[0], row[1])

    def advance(self, seq: int, header_bytes: bytes) -> None:
        """Record that the header for seq is committed, with its session's open/closed state."""
        header = parse_header(header_bytes)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = self._db.execute(
                "UPDATE chain SET next_seq = ?, prev = ? WHERE id = 0 AND next_seq = ?",
                (seq + 1, header_hash(header_bytes), seq),
            )
            if cur.rowcount != 1:
                raise RuntimeError(f"chain state moved under us while committing seq {seq}")
            if header["final"]:
                self._db.execute("DELETE FROM open_session")
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO open_session VALUES (0, ?, ?, ?, ?, ?)",
                    (header["session"], header["boot_id"], header["session_index"] + 1,
                     header["end"]["mono_ns"], header["end"]["utc_ns"]),
                )
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (a COMMIT failing on a full disk does): a
            # second ROLLBACK would raise and hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def reconcile(self, spool_dir: Path) -> list[int]:
        """Adopt committed headers newer than the state; return the seqs adopted."""
        adopted = []
        files = scan_dir(spool_dir) if spool_dir.exists() else {}
        while True:
            head = self.head()
            seg = files.get(head.next_seq)
            if seg is None or seg.header is None:
                return adopted
            data = seg.header.read_bytes()
            if parse_header(data)["prev"] != head.prev:
                raise RuntimeError(
                    f"spool header {head.next_seq} does not link to the chain state"
                )
            self.advance(head.next_seq, data)
            adopted.append(head.next_seq)

    def adopt(self, header_bytes: bytes) -> None:
        """Take a header proven to be this device's newest (its own signature checked by the
        caller) as the head of a fresh state: the next seq follows it, and its session, unless
        final, is the one left open."""
        header = parse_header(header_bytes)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("UPDATE chain SET next_seq = ?, prev = ? WHERE id = 0",
                             (header["seq"] + 1, header_hash(header_bytes)))
            self._db.execute("DELETE FROM open_session")
            if not header["final"]:
                self._db.execute(
                    "INSERT INTO open_session VALUES (0, ?, ?, ?, ?, ?)",
                    (header["session"], header["boot_id"], header["session_index"] + 1,
                     header["end"]["mono_ns"], header["end"]["utc_ns"]))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self.fresh = False

    # --- the session that a crash may leave open -------------------------------------------

    def open_session(self) -> tuple[str, str, int, int, int] | None:
        """(session, boot_id, next_index, last_end_mono_ns, last_end_utc_ns), if unclosed."""
        return self._db.execute(
            "SELECT session, boot_id, next_index, last_end_mono_ns, last_end_utc_ns"
            " FROM open_session WHERE id = 0"
        ).fetchone()

    def close(self) -> None:
        self._db.close()
