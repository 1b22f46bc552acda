"""Read-only access to the receiver's data directory: the storage interface's reading methods on
a read-only SQLite connection, the device keys, and each device's verified chain of sessions.

The web service never writes where the receiver keeps evidence: receiver.db is opened with
`mode=ro` (a write would fail in SQLite, not only by convention), and segment files are only read.
Verification and transaction labels are cached per device and keyed by what the index says is
stored, so a page view does not re-verify an unchanged chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.session_labels import Transaction, read_transaction
from dualrec_tools.verify import DeviceKey, Report, SessionInfo, verify_dir

NS = 1_000_000_000


class ArchiveError(RuntimeError):
    """The receiver's data directory cannot be read."""


class ReadOnlyStore(ReceiverStore):
    """ReceiverStore's reading methods (figures, status, device, devices) on a read-only
    connection. Its constructor is replaced because the embedded one creates directories and
    migrates the schema; the web user may not, and must not, do either."""

    def __init__(self, data_dir: Path) -> None:
        db = data_dir / "receiver.db"
        if not db.is_file():
            raise ArchiveError(f"{db}: no receiver index (has the receiver run here?)")
        self.data_dir = data_dir
        self.receiver_id = "branch"
        self._receipt_key = None
        self._db = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=5000")  # the receiver writes while we read
        self._db_lock = threading.RLock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        """A read-only query of the index (what the interface has no method for)."""
        return self._rows(sql, *args)


@dataclass
class DeviceChain:
    """A device's directory as verified (chain level: signatures, links, payload hashes)."""

    device: str
    report: Report
    stamp: tuple[Any, ...]  # what the index said when it was verified
    retention: bool  # retention deleted its oldest segments: the chain may start later


@dataclass(frozen=True)
class SessionRow:
    device: str
    counter: str | None
    info: SessionInfo
    txn: Transaction
    verdict: str  # "verified" or "FAILED: ..." for the session's segments (chain level)
    problems: list[str]

    @property
    def start_utc_ns(self) -> int:
        return self.info.start_utc_ns


class Archive:
    """What the pages read: the devices, their verified chains, their sessions' labels."""

    def __init__(self, data_dir: Path, identities: list[Any],
                 counters: dict[str, str] | None = None,
                 labels_cache: Path | None = None) -> None:
        self.data_dir = data_dir
        self.labels_cache = labels_cache  # transaction labels, not customer numbers (FORMAT §5.3)
        self.identities = identities
        self.counters = counters or {}
        self.store = ReadOnlyStore(data_dir)
        self._chains: dict[str, DeviceChain] = {}
        self._txns: dict[tuple[str, str, tuple[int, ...]], Transaction] = {}
        self._lock = threading.Lock()  # handlers run these in worker threads

    def close(self) -> None:
        self.store.close()

    def device_dir(self, device: str) -> Path:
        return self.store.device_dir(device)

    def keys(self, device: str) -> list[DeviceKey]:
        dev = self.store.device(device)
        return [] if dev is None else [DeviceKey(dev.signing_key, device, "receiver.db")]

    def _stamp(self, device: str) -> tuple[Any, ...]:
        r = self.store.rows("SELECT count(*), sum(payload_stored), max(seq), "
                            "sum(deleted_at IS NOT NULL) FROM segments WHERE device=?", device)[0]
        return tuple(r)

    def chain(self, device: str) -> DeviceChain | None:
        """The device's verified chain, re-verified only when the index changed."""
        if self.store.device(device) is None or not self.device_dir(device).is_dir():
            return None
        stamp = self._stamp(device)
        with self._lock:
            cached = self._chains.get(device)
            if cached is not None and cached.stamp == stamp:
                return cached
        retention = bool(stamp[3])
        # After retention the chain starts at the oldest kept seq; the deletion log explains
        # the rest (receiver/retention.py), so from_seq is not asserted then.
        report = verify_dir(self.device_dir(device), self.keys(device),
                            from_seq=None if retention else 0)
        chain = DeviceChain(device, report, stamp, retention)
        with self._lock:
            self._chains[device] = chain
        return chain

    def has_session(self, device: str, session: str) -> bool:
        chain = self.chain(device)
        return chain is not None and chain.report.session(session) is not None

    def transaction(self, device: str, chain: DeviceChain, info: SessionInfo) -> Transaction:
        have = tuple(s for s in info.seqs if chain.report.chain[s].payload is not None)
        key = (device, info.session, have)
        with self._lock:
            if key in self._txns:
                return self._txns[key]
        # On disk, keyed by the headers' bytes (which sign the payloads): a restart does not
        # decrypt every session again, and a changed segment is a new key.
        digest = hashlib.sha256(b"".join(chain.report.chain[s].data for s in have)).hexdigest()
        txn = self._stored_txn(digest)
        if txn is None:
            txn = read_transaction(info, chain.report.chain, self.identities)
            if not txn.unreadable:  # a payload arriving later may still make it readable
                self._store_txn(digest, txn)
        with self._lock:
            self._txns[key] = txn
        return txn

    def _labels_db(self) -> sqlite3.Connection | None:
        if self.labels_cache is None:
            return None
        if not self.labels_cache.exists():
            self.labels_cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.labels_cache, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.labels_cache, isolation_level=None)
        db.execute("CREATE TABLE IF NOT EXISTS txn (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return db

    def _stored_txn(self, digest: str) -> Transaction | None:
        db = self._labels_db()
        if db is None:
            return None
        try:
            row = db.execute("SELECT value FROM txn WHERE key=?", (digest,)).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        v = json.loads(row[0])
        return Transaction(v["labels"], v["complete"], v["missing"], [])

    def _store_txn(self, digest: str, txn: Transaction) -> None:
        db = self._labels_db()
        if db is None:
            return
        try:
            db.execute("INSERT OR REPLACE INTO txn VALUES (?, ?)", (digest, json.dumps(
                {"labels": txn.labels, "complete": txn.complete, "missing": txn.missing})))
        finally:
            db.close()

    def sessions(self) -> list[SessionRow]:
        """Every session of every enrolled device, newest first."""
        out = []
        for device in self.store.devices():
            chain = self.chain(device)
            if chain is None:
                continue
            for info in chain.report.sessions:
                problems = [p for p in chain.report.problems_of(info) if not p.warning]
                verdict = "verified" if not problems else f"FAILED: {len(problems)} problems"
                out.append(SessionRow(device, self.counters.get(device), info,
                                      self.transaction(device, chain, info), verdict,
                                      [str(p) for p in problems]))
        out.sort(key=lambda r: r.start_utc_ns, reverse=True)
        return out

    def gaps(self, device: str) -> list[tuple[int, int]]:
        """Seqs missing below the highest held, as inclusive ranges, from the index alone (one
        pass over the primary key; the dashboard asks at every refresh)."""
        rows = self.store.rows(
            "SELECT seq + 1, nxt - 1 FROM (SELECT seq, lead(seq) OVER (ORDER BY seq) AS nxt "
            "FROM segments WHERE device=?) WHERE nxt > seq + 1", device)
        first = self.store.rows("SELECT min(seq) FROM segments WHERE device=?", device)[0][0]
        out = [(0, first - 1)] if first else []
        return out + [(r[0], r[1]) for r in rows]

    def upload_rate(self, device: str, window_s: int = 300) -> float:
        """Payload bytes per second stored over the last window."""
        since = time.time_ns() - window_s * NS
        r = self.store.rows("SELECT coalesce(sum(payload_size), 0) FROM segments WHERE "
                            "device=? AND payload_at >= ?", device, since)[0]
        return r[0] / window_s
