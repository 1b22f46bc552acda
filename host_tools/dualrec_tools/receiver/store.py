"""The receiver's store: what it holds for each enrolled device, and the rules for taking more.

Files live under data_dir/devices/<device>/ with the segment file names of docs/FORMAT.md; an
SQLite index (data_dir/receiver.db, WAL, synchronous=FULL) holds the enrolled devices, every
stored header with its hash, payload flag and receipt, the problems seen (forks, broken links,
bad signatures, mismatched payloads...) and the time of each device's last contact. It is the
embedded implementation of storage.Storage.

Whatever arrives, the index stays bounded: problems are one row per (device, seq, kind) with a
count, at most MAX_PROBLEM_ROWS per device (then one row per kind), and at most
MAX_UNKNOWN_NAMES distinct names that are not enrolled (the rest count under "(other)"). Files
are created 0600 and directories 0750: receiver.db holds every header.

Every operation is idempotent on (device, seq, header SHA-256): the same header or payload again
gets the same answer and stores nothing new; a receipt is signed once and its bytes returned ever
after. Check-then-write sequences run under a per-device lock, so concurrent requests from one
device (aiohttp handlers interleave; the store is called from worker threads) cannot both store.
A file is written before the index row that points to it: the row is the commit point, and a
crash between the two leaves a file that the next identical upload overwrites.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key

from dualrec.durable import fsync_dir, write_durable
from dualrec.receipt import sign_receipt
from dualrec.segment_format import (
    GENESIS_PREV,
    FormatError,
    age_expected_size,
    age_header_length,
    age_plaintext_size,
    header_hash,
    header_name,
    parse_header,
    payload_name,
    verify_signature,
)
from dualrec_tools.pki import device_id_of
from dualrec_tools.receiver.storage import DeviceFigures, DeviceReport, Head, RetentionCandidate

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Bytes of a payload kept in memory to find its age header (a few hundred bytes in practice).
AGE_PREFIX = 64 * 1024
# Bounds on the problems table (module issue 12: 400 requests with 7 KB names added 5.4 MB).
MAX_PROBLEM_ROWS = 500  # per device; beyond, a problem is counted under seq NULL
MAX_UNKNOWN_NAMES = 64  # distinct device names that are not enrolled
OTHER = "(other)"  # where problems of further unknown or invalid names are counted
DETAIL_MAX = 300  # characters of a problem's detail kept (the latest one)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, signing_key_pem BLOB NOT NULL, cert_pem BLOB NOT NULL,
    cert_sha256 TEXT NOT NULL, enrolled_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    device TEXT NOT NULL, seq INTEGER NOT NULL, header_sha256 TEXT NOT NULL,
    header BLOB NOT NULL, payload_stored INTEGER NOT NULL DEFAULT 0, receipt BLOB,
    header_at INTEGER NOT NULL, payload_at INTEGER, PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS holds (
    device TEXT NOT NULL, session TEXT NOT NULL DEFAULT '', note TEXT NOT NULL,
    at INTEGER NOT NULL, PRIMARY KEY (device, session));
CREATE TABLE IF NOT EXISTS problems (
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, seq INTEGER, kind TEXT NOT NULL,
    detail TEXT NOT NULL, at INTEGER NOT NULL, last_at INTEGER NOT NULL,
    count INTEGER NOT NULL DEFAULT 1, evidence BLOB);
CREATE INDEX IF NOT EXISTS problems_by_device ON problems (device, seq);
CREATE TABLE IF NOT EXISTS contact (device TEXT PRIMARY KEY, last_contact INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    device TEXT PRIMARY KEY, report TEXT NOT NULL, received_at INTEGER NOT NULL);
"""
# Columns added after the first release (ALTER TABLE on an older receiver.db): what metrics and
# retention read without parsing every header again. deleted_at: retention removed the files;
# the row stays (its hash keeps the seq taken and the chain's link checkable) with header b"".
SEGMENT_COLUMNS = {"session": "TEXT", "end_utc_ns": "INTEGER", "payload_size": "INTEGER",
                   "clock_synced": "INTEGER", "clock_error_ns": "INTEGER", "firmware": "TEXT",
                   "deleted_at": "INTEGER"}


class EnrollError(ValueError):
    """The key, certificate or device id cannot be enrolled."""


class EnrollConflict(EnrollError):
    """The device is enrolled with other keys; replacing them needs replace=True."""


@dataclass(frozen=True)
class Device:
    id: str
    signing_key_pem: bytes
    cert_pem: bytes
    cert_sha256: str  # SHA-256 (hex) of the certificate's DER bytes
    enrolled_at: int  # UTC ns

    @property
    def signing_key(self) -> Ed25519PublicKey:
        return _signing_key(self.signing_key_pem)


@dataclass(frozen=True)
class Outcome:
    """The answer to an upload: "stored" (with its receipt), "awaiting_payload", or a refusal
    named by its docs/UPLOAD.md error word (fork, bad_link, header_first, ...)."""

    kind: str
    detail: str = ""
    receipt: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.kind in ("stored", "awaiting_payload")


def _signing_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise EnrollError(f"signing key is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollError("signing key is not an Ed25519 public key")
    return key


def cert_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _header_columns(header: dict[str, Any]) -> tuple[Any, ...]:
    clock = header.get("clock") or {}
    return (header.get("session"), header["end"]["utc_ns"], header["payload"]["size"],
            int(bool(clock.get("synced"))), clock.get("est_error_ns"), header.get("firmware"))


def _private_db(path: Path) -> None:
    """receiver.db (every header) and its -wal/-shm are 0640: the receiver's user writes, its
    group reads (dualrec-web runs as another user in that group: docs/review.md), others
    nothing. SQLite gives the journal files the main file's mode, so creating that one first is
    enough."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o640))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists() and p.stat().st_mode & 0o037:
            p.chmod(0o640)


def _gaps(seqs: list[int]) -> list[list[int]]:
    """Missing seqs below the highest, as inclusive [first, last] ranges (seqs sorted)."""
    out, expect = [], 0
    for s in seqs:
        if s > expect:
            out.append([expect, s - 1])
        expect = s + 1
    return out


def _age_problem(prefix: bytes, total: int) -> str | None:
    # The hash already matched what the device signed; this catches a device that sealed a
    # broken file (FORMAT.md §5.5), which no one could ever decrypt.
    try:
        header_len = age_header_length(prefix)
    except FormatError as exc:
        return f"payload is not well-formed age: {exc}"
    plain = age_plaintext_size(total, header_len)
    if plain is None or age_expected_size(header_len, plain) != total:
        return "payload length does not fit the age format (a lost or partial chunk)"
    return None


class ReceiverStore:
    def __init__(self, data_dir: Path, *, receipt_key: Ed25519PrivateKey | None = None,
                 receiver_id: str = "branch") -> None:
        self.data_dir = data_dir
        self.receiver_id = receiver_id
        self._receipt_key = receipt_key
        data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        (data_dir / "devices").mkdir(mode=0o750, exist_ok=True)
        _private_db(data_dir / "receiver.db")
        # One connection shared by worker threads, serialised by _db_lock; autocommit mode so
        # transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(data_dir / "receiver.db", isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db_lock = threading.RLock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        with self._db_lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")  # `enroll` from another process
            self._db.executescript(SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(segments)")}
            for name, kind in SEGMENT_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE segments ADD COLUMN {name} {kind}")
            if "session" not in have:  # fill the new columns of an older index once
                for r in self._db.execute("SELECT device, seq, header FROM segments").fetchall():
                    cols = _header_columns(parse_header(bytes(r["header"])))
                    self._db.execute("UPDATE segments SET session=?, end_utc_ns=?, payload_size=?,"
                                     " clock_synced=?, clock_error_ns=?, firmware=? WHERE "
                                     "device=? AND seq=?", (*cols, r["device"], r["seq"]))
            self._db.execute("CREATE INDEX IF NOT EXISTS segments_by_end ON segments "
                             "(device, deleted_at, end_utc_ns)")

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    def __enter__(self) -> ReceiverStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _lock(self, device: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(device, threading.Lock())

    def device_dir(self, device: str) -> Path:
        return self.data_dir / "devices" / device

    def _segment(self, device: str, seq: int) -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM segments WHERE device=? AND seq=?", device, seq)
        return rows[0] if rows else None

    def remove_stale_temp(self) -> list[Path]:
        """Temp files of uploads cut off by a crash. Only for the serving process at start:
        another process (an `enroll`) must not delete a running server's uploads."""
        stale = list((self.data_dir / "devices").glob("*/.*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # -- devices ----------------------------------------------------------------------------

    def enroll(self, device_id: str, signing_pub_pem: bytes, cert_pem: bytes, *,
               replace: bool = False) -> Device:
        """Enroll a device: its segment signing key (Ed25519 SPKI PEM, a `dualrec-device:`
        label line is fine) and its TLS client certificate (CN = device id). The same keys again
        change nothing; other keys for an enrolled id raise EnrollConflict unless replace."""
        if not DEVICE_ID.match(device_id):
            raise EnrollError(f"{device_id!r} is not a valid device id")
        raw_key = _signing_key(signing_pub_pem).public_bytes_raw()
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cn = device_id_of(cert)
        except (ValueError, IndexError) as exc:
            raise EnrollError(f"certificate is not a PEM X.509 certificate with a CN ({exc})") \
                from None
        if cn != device_id:
            raise EnrollError(f"certificate CN is {cn!r}, not {device_id!r}")
        fingerprint = cert_fingerprint(cert.public_bytes(Encoding.DER))
        with self._tx() as db:
            old = db.execute("SELECT * FROM devices WHERE id=?", (device_id,)).fetchone()
            same = old is not None and old["cert_sha256"] == fingerprint and \
                _signing_key(old["signing_key_pem"]).public_bytes_raw() == raw_key
            if old is not None and not same and not replace:
                raise EnrollConflict(f"{device_id} is enrolled with other keys (use replace)")
            if not same:
                db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?)",
                           (device_id, signing_pub_pem, cert_pem, fingerprint, time.time_ns()))
        self.device_dir(device_id).mkdir(mode=0o750, exist_ok=True)
        enrolled = self.device(device_id)
        assert enrolled is not None
        return enrolled

    def device(self, device_id: str) -> Device | None:
        rows = self._rows("SELECT * FROM devices WHERE id=?", device_id)
        if not rows:
            return None
        r = rows[0]
        return Device(r["id"], bytes(r["signing_key_pem"]), bytes(r["cert_pem"]),
                      r["cert_sha256"], r["enrolled_at"])

    def devices(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT id FROM devices ORDER BY id")]

    def touch(self, device: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO contact VALUES (?, ?)", (device, time.time_ns()))

    def record_problem(self, device: str, seq: int | None, kind: str, detail: str,
                       evidence: bytes | None = None) -> None:
        """Record a refusal that concerns evidence. A box retries with backoff, so the same
        problem again (device, seq, kind) only bumps its count and last time and keeps the
        latest detail; the first evidence stays. Bounded: see the module docstring."""
        now = time.time_ns()
        detail = detail[:DETAIL_MAX]
        with self._tx() as db:
            device = self._problem_name(db, device)
            row = db.execute("SELECT id FROM problems WHERE device=? AND seq IS ? AND kind=?",
                             (device, seq, kind)).fetchone()
            if row is None and seq is not None and db.execute(
                    "SELECT count(*) FROM problems WHERE device=?", (device,)
                    ).fetchone()[0] >= MAX_PROBLEM_ROWS:
                seq, evidence = None, None  # full: count it per kind only
                row = db.execute("SELECT id FROM problems WHERE device=? AND seq IS NULL AND "
                                 "kind=?", (device, kind)).fetchone()
            if row:
                db.execute("UPDATE problems SET count=count+1, last_at=?, detail=? WHERE id=?",
                           (now, detail, row["id"]))
            else:
                db.execute("INSERT INTO problems (device, seq, kind, detail, at, last_at, "
                           "evidence) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (device, seq, kind, detail, now, now, evidence))

    @staticmethod
    def _problem_name(db: sqlite3.Connection, device: str) -> str:
        """The name a problem is filed under: an enrolled or already tracked one as it is; a
        new unknown one only while fewer than MAX_UNKNOWN_NAMES are tracked."""
        if not DEVICE_ID.match(device):
            return OTHER
        if db.execute("SELECT 1 FROM devices WHERE id=? UNION ALL SELECT 1 FROM problems "
                      "WHERE device=? LIMIT 1", (device, device)).fetchone():
            return device
        unknown = db.execute("SELECT count(DISTINCT device) FROM problems WHERE device NOT IN "
                             "(SELECT id FROM devices)").fetchone()[0]
        return device if unknown < MAX_UNKNOWN_NAMES else OTHER

    def _refuse(self, device: str, seq: int, kind: str, detail: str,
                evidence: bytes | None = None) -> Outcome:
        self.record_problem(device, seq, kind, detail, evidence)
        return Outcome(kind, detail)

    # -- headers ----------------------------------------------------------------------------

    def put_header(self, device: str, seq: int, header_bytes: bytes) -> Outcome:
        with self._lock(device):
            dev = self.device(device)
            if dev is None:
                return self._refuse(device, seq, "unknown_device", "device is not enrolled")
            stored = self._segment(device, seq)
            if stored is not None and (bytes(stored["header"]) == header_bytes or (
                    stored["deleted_at"] is not None
                    and header_hash(header_bytes) == stored["header_sha256"])):
                return self._answer(stored)  # a retry, perhaps after a lost answer
            try:
                header = parse_header(header_bytes)
            except FormatError as exc:
                return self._refuse(device, seq, "malformed", str(exc))
            if header["seq"] != seq:
                return self._refuse(device, seq, "seq_mismatch",
                                    f"path says seq {seq}, header says seq {header['seq']}")
            if header["device"] != device:
                return self._refuse(device, seq, "device_mismatch",
                                    f"header names device {header['device']!r}")
            if not verify_signature(header, dev.signing_key):
                return self._refuse(device, seq, "bad_signature",
                                    "signature does not verify under the enrolled key")
            digest = header_hash(header_bytes)
            if stored is not None:
                return self._refuse(device, seq, "fork", f"a different header is stored under "
                                    f"seq {seq} (stored {stored['header_sha256']}, offered "
                                    f"{digest})", header_bytes)
            link = self._link_problem(device, seq, header["prev"], digest)
            if link:
                return self._refuse(device, seq, "bad_link", link, header_bytes)
            directory = self.device_dir(device)
            directory.mkdir(mode=0o750, exist_ok=True)
            write_durable(directory / header_name(seq), header_bytes, mode=0o640)
            with self._tx() as db:
                db.execute("INSERT INTO segments (device, seq, header_sha256, header, header_at,"
                           " session, end_utc_ns, payload_size, clock_synced, clock_error_ns, "
                           "firmware) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (device, seq, digest, header_bytes, time.time_ns(),
                            *_header_columns(header)))
            return Outcome("awaiting_payload")

    def _answer(self, row: sqlite3.Row) -> Outcome:
        if row["payload_stored"]:
            return Outcome("stored", receipt=bytes(row["receipt"]))
        return Outcome("awaiting_payload")

    def _link_problem(self, device: str, seq: int, prev: str, digest: str) -> str | None:
        """Check the header against both stored neighbours: a late header filling a gap must
        link to the one before it and be the one the next header links to."""
        if seq == 0 and prev != GENESIS_PREV:
            return "seq 0 does not carry the genesis prev"
        before = self._segment(device, seq - 1) if seq > 0 else None
        if before is not None and prev != before["header_sha256"]:
            return f"prev does not match the hash of stored seq {seq - 1} ({prev} != " \
                   f"{before['header_sha256']})"
        after = self._segment(device, seq + 1)
        if after is not None and after["deleted_at"] is None and \
                parse_header(bytes(after["header"]))["prev"] != digest:
            return f"stored seq {seq + 1} does not link to this header ({digest})"
        return None

    # -- payloads ---------------------------------------------------------------------------

    def put_payload(self, device: str, seq: int, header_sha256: str, chunks: Iterable[bytes],
                    max_size: int) -> Outcome:
        """Stream a payload to a temp file while hashing, check it against the stored header,
        then commit it and sign its receipt. The lock is not held while streaming, so a slow
        payload does not hold up the device's next headers."""
        if self._receipt_key is None:
            raise RuntimeError("this store was opened without a receipt key")
        with self._lock(device):
            pre = self._payload_precheck(device, seq, header_sha256, max_size)
        if isinstance(pre, Outcome):
            return pre
        size, sha = pre
        # A unique temp name: two uploads of one payload may stream at the same time.
        tmp = self.device_dir(device) / f".{payload_name(seq)}.{secrets.token_hex(6)}.tmp"
        try:
            problem = self._receive(tmp, chunks, size, sha)
            if problem:
                return self._refuse(device, seq, *problem)
            with self._lock(device):
                return self._commit_payload(device, seq, tmp, size, sha)
        finally:
            tmp.unlink(missing_ok=True)

    def _payload_precheck(self, device: str, seq: int, header_sha256: str,
                          max_size: int) -> Outcome | tuple[int, str]:
        if self.device(device) is None:
            return self._refuse(device, seq, "unknown_device", "device is not enrolled")
        row = self._segment(device, seq)
        if row is None:
            return Outcome("header_first", f"no header stored for seq {seq}: send it first")
        if row["header_sha256"] != header_sha256:
            return self._refuse(device, seq, "fork", f"payload offered for header "
                                f"{header_sha256}, but header {row['header_sha256']} is stored "
                                f"under seq {seq}")
        if row["payload_stored"] or row["deleted_at"] is not None:
            return self._answer(row)
        payload = parse_header(bytes(row["header"]))["payload"]
        if payload["size"] > max_size:
            return self._refuse(device, seq, "oversized", f"header says {payload['size']} "
                                f"bytes, the limit is {max_size}")
        return payload["size"], payload["sha256"]

    def _receive(self, tmp: Path, chunks: Iterable[bytes], size: int,
                 sha: str) -> tuple[str, str] | None:
        digest = hashlib.sha256()
        total = 0
        prefix = bytearray()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)  # group: dualrec-web
        try:
            for chunk in chunks:
                total += len(chunk)
                if total > size:  # stop reading: never take more than the header announced
                    return "payload_mismatch", f"payload is longer than the {size} bytes " \
                                               "the header says"
                digest.update(chunk)
                if len(prefix) < AGE_PREFIX:
                    prefix += chunk[:AGE_PREFIX - len(prefix)]
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if total < size:
            return "payload_mismatch", f"payload size {total} bytes, header says {size} " \
                                       "(truncated)"
        if digest.hexdigest() != sha:
            return "payload_mismatch", "payload sha256 does not match the header"
        age = _age_problem(bytes(prefix), total)
        return ("bad_payload", age) if age else None

    def _commit_payload(self, device: str, seq: int, tmp: Path, size: int,
                        sha: str) -> Outcome:
        row = self._segment(device, seq)
        assert row is not None  # headers are never removed
        if row["payload_stored"]:
            return self._answer(row)  # a concurrent upload of the same payload got here first
        final = self.device_dir(device) / payload_name(seq)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        assert self._receipt_key is not None
        receipt = sign_receipt(device=device, seq=seq, header_sha256=row["header_sha256"],
                               payload_sha256=sha, payload_size=size,
                               received_utc_ns=time.time_ns(), receiver=self.receiver_id,
                               key=self._receipt_key)
        with self._tx() as db:
            db.execute("UPDATE segments SET payload_stored=1, receipt=?, payload_at=? "
                       "WHERE device=? AND seq=?", (receipt, time.time_ns(), device, seq))
        return Outcome("stored", receipt=receipt)

    def receipt(self, device: str, seq: int) -> bytes | None:
        row = self._segment(device, seq)
        return bytes(row["receipt"]) if row is not None and row["payload_stored"] else None

    def head(self, device: str) -> Head | None:
        """The newest header held (retention never deletes a device's newest segment)."""
        rows = self._rows("SELECT seq, header, header_sha256 FROM segments WHERE device=? "
                          "AND deleted_at IS NULL ORDER BY seq DESC LIMIT 1", device)
        if not rows:
            return None
        return Head(rows[0]["seq"], bytes(rows[0]["header"]), rows[0]["header_sha256"])

    def put_report(self, device: str, report: DeviceReport) -> None:
        """Keep the device's latest state report (replacing the one before)."""
        doc = {k: v for k, v in asdict(report).items() if k != "received_ns"}
        doc["faults"] = list(report.faults)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO reports VALUES (?, ?, ?)",
                       (device, json.dumps(doc, sort_keys=True), time.time_ns()))

    def report(self, device: str) -> DeviceReport | None:
        """The device's latest state report, or None."""
        return self._reports(device).get(device)

    def _reports(self, device: str | None = None) -> dict[str, DeviceReport]:
        sql = "SELECT device, report, received_at FROM reports"
        try:
            rows = self._rows(sql + " WHERE device=?", device) if device else self._rows(sql)
        except sqlite3.OperationalError:  # a read-only index from before reports existed
            return {}
        out = {}
        for r in rows:
            doc = json.loads(r["report"])
            doc["faults"] = tuple(doc.get("faults", ()))
            out[r["device"]] = DeviceReport(**doc, received_ns=r["received_at"])
        return out

    # -- bookkeeping ------------------------------------------------------------------------

    def status(self, device: str) -> dict[str, Any]:
        """What the receiver holds for one device (docs/UPLOAD.md, "Receiver bookkeeping")."""
        now = time.time_ns()
        segs = self._rows("SELECT seq, header_sha256, payload_stored, header_at FROM segments "
                          "WHERE device=? ORDER BY seq", device)
        problems = self._rows("SELECT seq, kind, detail, at, last_at, count FROM problems "
                              "WHERE device=? ORDER BY id", device)
        contact = self._rows("SELECT last_contact FROM contact WHERE device=?", device)
        dev = self.device(device)
        seqs = [r["seq"] for r in segs]
        last = contact[0]["last_contact"] if contact else None
        return {
            "device": device,
            "enrolled": dev is not None,
            "cert_sha256": dev.cert_sha256 if dev else None,
            "highest_seq": seqs[-1] if seqs else None,
            "headers": len(segs),
            "payloads": sum(1 for r in segs if r["payload_stored"]),
            "waiting": [{"seq": r["seq"], "header_sha256": r["header_sha256"],
                         "since_utc_ns": r["header_at"],
                         "waited_s": max(0, now - r["header_at"]) // 10**9}
                        for r in segs if not r["payload_stored"]],
            "gaps": _gaps(seqs),
            "problems": [{"seq": p["seq"], "kind": p["kind"], "detail": p["detail"],
                          "first_utc_ns": p["at"], "last_utc_ns": p["last_at"],
                          "count": p["count"]} for p in problems],
            "last_contact_utc_ns": last,
            "last_contact_s_ago": None if last is None else max(0, now - last) // 10**9,
        }

    def status_all(self) -> dict[str, Any]:
        """Every device the receiver knows of: enrolled, or seen (a refused unknown device)."""
        names = {r[0] for r in self._rows(
            "SELECT id FROM devices UNION SELECT device FROM segments "
            "UNION SELECT device FROM problems UNION SELECT device FROM contact")}
        return {"receiver": self.receiver_id,
                "devices": {name: self.status(name) for name in sorted(names)}}

    # -- figures for metrics and alerts -----------------------------------------------------

    def figures(self) -> list[DeviceFigures]:
        """Per enrolled device, in a few aggregate queries (a scrape must stay cheap)."""
        seg = {r["device"]: r for r in self._rows(
            "SELECT device, count(*) AS headers, sum(payload_stored) AS payloads, "
            "sum(CASE WHEN payload_stored THEN coalesce(payload_size, 0) ELSE 0 END) AS bytes, "
            "max(seq) AS highest, sum(deleted_at IS NOT NULL) AS deleted "
            "FROM segments GROUP BY device")}
        newest = {r["device"]: r for r in self._rows(
            "SELECT s.device, s.clock_synced, s.clock_error_ns, s.firmware FROM segments s "
            "JOIN (SELECT device, max(seq) AS seq FROM segments GROUP BY device) m "
            "ON s.device = m.device AND s.seq = m.seq")}
        probs: dict[str, dict[str, int]] = {}
        for r in self._rows("SELECT device, kind, sum(count) AS n FROM problems "
                            "GROUP BY device, kind"):
            probs.setdefault(r["device"], {})[r["kind"]] = r["n"]
        contact = {r[0]: r[1] for r in self._rows("SELECT device, last_contact FROM contact")}
        reports = self._reports()
        out = []
        for dev in self._rows("SELECT id, cert_pem FROM devices ORDER BY id"):
            name, s_ = dev["id"], seg.get(dev["id"])
            n = newest.get(name)
            kinds = probs.get(name, {})
            headers = s_["headers"] if s_ else 0
            highest = s_["highest"] if s_ else None
            try:
                not_after = x509.load_pem_x509_certificate(bytes(dev["cert_pem"])) \
                    .not_valid_after_utc.timestamp()
            except ValueError:
                not_after = None
            out.append(DeviceFigures(
                device=name, enrolled=True, headers=headers,
                payloads=(s_["payloads"] or 0) if s_ else 0,
                backlog=headers - ((s_["payloads"] or 0) if s_ else 0),
                payload_bytes=(s_["bytes"] or 0) if s_ else 0, highest_seq=highest,
                missing=0 if highest is None else highest + 1 - headers,
                forks=kinds.get("fork", 0) + kinds.get("bad_link", 0), problems=kinds,
                last_contact_ns=contact.get(name),
                cert_not_after_ns=None if not_after is None else int(not_after * 1e9),
                deleted=(s_["deleted"] or 0) if s_ else 0,
                clock_synced=None if n is None or n["clock_synced"] is None
                else bool(n["clock_synced"]),
                clock_error_ns=n["clock_error_ns"] if n else None,
                firmware=n["firmware"] if n else None, report=reports.get(name)))
        return out

    # -- retention --------------------------------------------------------------------------

    def retention_candidates(self, device: str, limit: int) -> list[RetentionCandidate]:
        """The oldest segments of device that retention may delete, lowest seq first, at most
        limit: payload stored and receipted, and every seq below present (the chain was
        checked link by link on the way in, so a contiguous run from seq 0 is verified). The
        device's newest segment is never offered: it is the head a box resumes from."""
        rows = self._rows("SELECT seq, header_sha256, payload_stored, receipt, session, "
                          "end_utc_ns, deleted_at FROM segments WHERE device=? ORDER BY seq",
                          device)
        out: list[RetentionCandidate] = []
        for expect, r in enumerate(rows[:-1]):  # never the newest
            if r["seq"] != expect or not r["payload_stored"] or r["receipt"] is None:
                break  # a gap or a payload still awaited: nothing above is verified yet
            if r["deleted_at"] is not None:
                continue
            over = r["session"] is None or rows[expect + 1]["session"] != r["session"]
            out.append(RetentionCandidate(device, r["seq"], r["header_sha256"], r["session"],
                                          r["end_utc_ns"] or 0, over))
            if len(out) >= limit:
                break
        return out

    def delete_segments(self, device: str, seqs: list[int]) -> None:
        """Remove the files of these segments; their index rows stay (hash and receipt) with
        the header bytes dropped and deleted_at set. The caller logs the deletion first."""
        now = time.time_ns()
        with self._lock(device):
            directory = self.device_dir(device)
            for seq in seqs:
                (directory / payload_name(seq)).unlink(missing_ok=True)
                (directory / header_name(seq)).unlink(missing_ok=True)
            if seqs:
                fsync_dir(directory)
            with self._tx() as db:
                db.executemany("UPDATE segments SET header=?, deleted_at=? WHERE device=? AND "
                               "seq=?", [(b"", now, device, seq) for seq in seqs])

    def set_hold(self, device: str, session: str | None, held: bool, note: str = "") -> None:
        """A legal hold on a whole device (session None) or one session: retention skips it."""
        with self._tx() as db:
            if held:
                db.execute("INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
                           (device, session or "", note[:DETAIL_MAX], time.time_ns()))
            else:
                db.execute("DELETE FROM holds WHERE device=? AND session=?",
                           (device, session or ""))

    def holds(self) -> list[dict[str, Any]]:
        return [{"device": r["device"], "session": r["session"] or None, "note": r["note"],
                 "since_utc_ns": r["at"]}
                for r in self._rows("SELECT * FROM holds ORDER BY device, session")]


def head_json(head: Head) -> dict[str, Any]:
    """The body of GET /v1/devices/{device}/head (docs/UPLOAD.md)."""
    return {"seq": head.seq, "header_sha256": head.header_sha256,
            "header": base64.b64encode(head.header).decode()}
