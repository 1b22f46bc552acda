"""The receiver's deletion log: an append-only file of canonical JSON lines, one per range of
segments deleted by retention, each signed with the receiver's receipt key (Ed25519) and
hash-chained to the line before (like the segments' `prev`):

    {"device", "first_seq", "last_seq", "header_sha256": [one per seq], "session", "reason",
     "utc_ns", "receiver", "prev": SHA-256 hex of the previous line's bytes (64 zeros first),
     "sig": base64 Ed25519 over the canonical bytes without "sig"}

`explain(report, log)` tells which of a verification report's missing ranges (findings
`chain_start` and `gap`) a valid entry explains: the range is covered by entries of the device,
and the entry's last header hash is the `prev` of the first header after the range, so the
deleted segments are the chain's own. verify.py is not changed: its CLI may call explain().
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dualrec.canonical import CanonicalError, canonical_bytes, parse_canonical

GENESIS = "0" * 64
FIELDS = {"device", "first_seq", "last_seq", "header_sha256", "session", "reason", "utc_ns",
          "receiver", "prev", "sig"}


class DeletionLogError(ValueError):
    """A line does not parse, is not signed by the key, or breaks the hash chain."""


@dataclass(frozen=True)
class Entry:
    line: int  # 1-based line number in the file
    device: str
    first_seq: int
    last_seq: int
    header_sha256: tuple[str, ...]
    session: str | None
    reason: str
    utc_ns: int

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.utc_ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"seq {self.first_seq}..{self.last_seq}, {self.reason}, {when}, log line " \
               f"{self.line}"


@dataclass(frozen=True)
class DeletionLog:
    entries: list[Entry]
    head: str  # SHA-256 of the last line (GENESIS when empty): what the next line's prev is


@dataclass(frozen=True)
class Explanation:
    problem: Any  # the verify.Problem (kind "gap" or "chain_start") explained
    entries: list[Entry]

    def __str__(self) -> str:
        return "deleted by retention (" + "; ".join(e.describe() for e in self.entries) + ")"


def _line_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_log(path: Path, key: Ed25519PublicKey) -> DeletionLog:
    """Every entry, checked: canonical, signed by key, chained. DeletionLogError otherwise."""
    entries, prev = [], GENESIS
    if not path.exists():
        return DeletionLog([], GENESIS)
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            obj = parse_canonical(raw)
        except CanonicalError as exc:
            raise DeletionLogError(f"line {n}: not canonical JSON ({exc})") from None
        if not isinstance(obj, dict) or set(obj) != FIELDS:
            raise DeletionLogError(f"line {n}: not a deletion entry")
        try:
            key.verify(base64.b64decode(obj["sig"], validate=True),
                       canonical_bytes({k: v for k, v in obj.items() if k != "sig"}))
        except (InvalidSignature, ValueError, TypeError):
            raise DeletionLogError(f"line {n}: signature does not verify") from None
        if obj["prev"] != prev:
            raise DeletionLogError(f"line {n}: prev does not match the line before (a line "
                                   "removed, reordered or changed)")
        first, last, hashes = obj["first_seq"], obj["last_seq"], obj["header_sha256"]
        if not (isinstance(first, int) and isinstance(last, int) and isinstance(hashes, list)
                and 0 <= first <= last and len(hashes) == last - first + 1):
            raise DeletionLogError(f"line {n}: seq range and header hashes disagree")
        entries.append(Entry(n, obj["device"], first, last, tuple(hashes), obj["session"],
                             obj["reason"], obj["utc_ns"]))
        prev = _line_hash(raw)
    return DeletionLog(entries, prev)


def append_entry(path: Path, key: Ed25519PrivateKey, *, device: str, first_seq: int,
                 header_sha256: list[str], session: str | None, reason: str, utc_ns: int,
                 receiver: str) -> None:
    """Append one signed, chained line and fsync it (before the files are deleted)."""
    prev = GENESIS
    if path.exists() and path.stat().st_size:
        prev = _line_hash(path.read_bytes().splitlines()[-1])
    fields = {"device": device, "first_seq": first_seq,
              "last_seq": first_seq + len(header_sha256) - 1, "header_sha256": header_sha256,
              "session": session, "reason": reason, "utc_ns": utc_ns, "receiver": receiver,
              "prev": prev}
    sig = base64.b64encode(key.sign(canonical_bytes(fields))).decode()
    line = canonical_bytes({**fields, "sig": sig}) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def explain(report: Any, log: DeletionLog, device: str | None = None) -> list[Explanation]:
    """The missing ranges of report (verify.Report) that log explains, one Explanation per
    explained finding. device: the chain's device (default: the device of its headers)."""
    chain = getattr(report, "chain", {}) or {}
    if device is None:
        device = next((hf.header["device"] for hf in chain.values()
                       if hf.header is not None), None)
    by_seq: dict[int, tuple[Entry, int]] = {}
    for e in log.entries:
        if e.device == device:
            for i, seq in enumerate(range(e.first_seq, e.last_seq + 1)):
                by_seq[seq] = (e, i)
    out = []
    for p in report.problems:
        if p.kind not in ("gap", "chain_start") or p.seqs is None:
            continue
        lo, hi = p.seqs
        if any(s not in by_seq for s in range(lo, hi + 1)):
            continue
        if not _links(by_seq, lo, hi, chain):
            continue
        entries: list[Entry] = []
        for s in range(lo, hi + 1):
            if by_seq[s][0] not in entries:
                entries.append(by_seq[s][0])
        out.append(Explanation(p, entries))
    return out


def _links(by_seq: dict[int, tuple[Entry, int]], lo: int, hi: int, chain: dict) -> bool:
    """The logged hashes fit the chain around the range: the header after it names the last
    deleted hash as prev, and the one before it is the prev... of nothing we can check here
    (its hash is what the first deleted header's prev was; the log does not keep prevs)."""
    after = chain.get(hi + 1)
    if after is None or after.header is None:
        return after is None  # the range ends the chain (nothing after it to contradict)
    entry, i = by_seq[hi]
    return after.header["prev"] == entry.header_sha256[i]
