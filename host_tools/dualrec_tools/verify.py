"""Verify a directory of sealed segments: is the chain complete and untouched?

`verify_dir` is pure (it only reads the directory) and returns a Report of Problems, each naming
the seq it concerns and why: a header that does not parse or is not signed by a given device key,
a seq claimed by two headers (fork) or stored under another seq's name, a gap, a prev link that
does not match the previous header's hash, a payload that is missing or whose size, SHA-256 or age
length does not match, time running backwards within a boot, and sessions that skip a
session_index or lack their final segment. docs/FORMAT.md ("Verifying") is the specification.

Device public keys are PEM files; `dualrec-tool keys device` writes the device id above the PEM
block as RFC 7468 explanatory text ("dualrec-device: ID"), which PEM readers skip, so a key file
says which device it belongs to and a header signed by another device's key is named as such.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from dualrec.segment_format import (
    GENESIS_PREV,
    FormatError,
    SegmentFiles,
    age_expected_size,
    age_header_length,
    age_plaintext_size,
    header_hash,
    parse_header,
    scan_dir,
    verify_signature,
)

DEVICE_LABEL = "dualrec-device:"


class KeyFileError(ValueError):
    """A device key file cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class DeviceKey:
    key: Ed25519PublicKey
    device: str | None  # None: the file names no device, so it may sign for any
    source: str


def device_pub_pem(key: Ed25519PublicKey, device_id: str) -> bytes:
    """A device's public key file: its id as explanatory text, then the SPKI PEM block."""
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return f"{DEVICE_LABEL} {device_id}\n".encode() + pem


def load_device_key(path: Path) -> DeviceKey:
    try:
        data = path.read_bytes()
        key = load_pem_public_key(data)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    device = None
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("-----BEGIN"):
            break
        if line.startswith(DEVICE_LABEL):
            device = line[len(DEVICE_LABEL):].strip() or None
    return DeviceKey(key, device, str(path))


@dataclass(frozen=True)
class Problem:
    seq: int | None  # the seq the problem is about; None for a session or the whole directory
    reason: str
    warning: bool = False  # fails verification only in strict mode
    session: str | None = None
    span: tuple[int, int] | None = None  # lowest and highest seq involved, when not just seq

    def __str__(self) -> str:
        return self.reason if self.seq is None else f"seq {self.seq}: {self.reason}"

    @property
    def seqs(self) -> tuple[int, int] | None:
        if self.span is not None:
            return self.span
        return None if self.seq is None else (self.seq, self.seq)


@dataclass(frozen=True)
class HeaderFile:
    """One header file as found: its bytes, the parsed header (None if it does not parse)."""

    file_seq: int
    path: Path
    data: bytes
    header: dict[str, Any] | None
    error: str | None
    payload: Path | None

    @property
    def seq(self) -> int:
        """The seq the header claims (signed), or its file name's when it does not parse."""
        return self.header["seq"] if self.header is not None else self.file_seq


@dataclass(frozen=True)
class SessionSegment:
    seq: int
    index: int
    final: bool
    reason: str


@dataclass
class SessionInfo:
    session: str
    segments: list[SessionSegment]
    start_utc_ns: int
    duration_ns: int  # sum of the segments' monotonic spans: a restart's gap is not counted
    complete: bool  # from session_index 0, none skipped, ends with a final segment

    @property
    def seqs(self) -> list[int]:
        return [s.seq for s in self.segments]

    @property
    def status(self) -> str:
        last = self.segments[-1]
        if not last.final:
            return "open"
        if not self.complete:
            return "incomplete"
        return "interrupted" if last.reason == "interrupted" else "complete"


@dataclass
class Report:
    segments: int  # distinct seqs with a header
    ok_segments: int  # of those, how many no error names
    first_seq: int | None
    last_seq: int | None
    problems: list[Problem]
    sessions: list[SessionInfo]
    signatures_checked: bool
    chain: dict[int, HeaderFile] = field(default_factory=dict)  # the header taken for each seq

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.warning]

    def failures(self, strict: bool = False) -> list[Problem]:
        return self.problems if strict else self.errors

    def passed(self, strict: bool = False) -> bool:
        return not self.failures(strict)

    def verdict(self, strict: bool = False) -> str:
        if self.passed(strict):
            return (f"VERIFIED: {self.segments} segments, seq {self.first_seq}..{self.last_seq},"
                    f" {len(self.sessions)} sessions")
        return f"FAILED: {len(self.failures(strict))} problems"

    def session(self, session: str) -> SessionInfo | None:
        return next((s for s in self.sessions if s.session == session), None)

    def problems_of(self, info: SessionInfo) -> list[Problem]:
        """The problems that concern a session: its own, and any touching its seq range (a
        broken link into the segment after it says its last header was replaced)."""
        lo, hi = info.seqs[0], info.seqs[-1]
        out = []
        for p in self.problems:
            span = p.seqs
            if p.session == info.session or (span is not None and span[0] <= hi and span[1] >= lo):
                out.append(p)
        return out


def read_headers(directory: Path) -> tuple[list[HeaderFile], list[SegmentFiles]]:
    """Every header file in directory, parsed where possible, and the payloads with no header."""
    headers, orphans = [], []
    for seq, files in scan_dir(directory).items():
        if files.header is None:
            orphans.append(files)
            continue
        data = files.header.read_bytes()
        try:
            header, error = parse_header(data), None
        except FormatError as exc:
            header, error = None, str(exc)
        headers.append(HeaderFile(seq, files.header, data, header, error, files.payload))
    return headers, orphans


def sessions_of(headers: Iterable[HeaderFile]) -> list[SessionInfo]:
    """Sessions named by the parsed headers, in seq order. Event-only segments (sealed while
    idle, session "") belong to no session."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for hf in sorted(headers, key=lambda h: h.seq):
        if hf.header is not None and hf.header["session"]:
            by_session.setdefault(hf.header["session"], []).append(hf.header)
    out = []
    for session, hs in by_session.items():
        indices = [h["session_index"] for h in hs]
        out.append(SessionInfo(
            session=session,
            segments=[SessionSegment(h["seq"], h["session_index"], h["final"], h["reason"])
                      for h in hs],
            start_utc_ns=hs[0]["start"]["utc_ns"],
            duration_ns=sum(h["end"]["mono_ns"] - h["start"]["mono_ns"] for h in hs),
            complete=indices == list(range(len(hs))) and hs[-1]["final"],
        ))
    return out


def _payload_problem(data: bytes, header: dict[str, Any]) -> str | None:
    size, sha = header["payload"]["size"], header["payload"]["sha256"]
    if len(data) != size:
        how = "truncated" if len(data) < size else "replaced or appended to"
        return f"payload size {len(data)} bytes, header says {size} ({how})"
    if hashlib.sha256(data).hexdigest() != sha:
        return "payload sha256 mismatch"
    # The hash matches what the device sealed; this catches a device that sealed a broken file
    # (a writer that lost its final chunk and still reported success).
    try:
        header_len = age_header_length(data)
    except FormatError as exc:
        return f"payload is not well-formed age: {exc}"
    plain = age_plaintext_size(len(data), header_len)
    if plain is None or age_expected_size(header_len, plain) != len(data):
        return "payload length does not fit the age format (a lost or partial chunk)"
    return None


def _check_file(hf: HeaderFile, keys: Sequence[DeviceKey] | None) -> list[Problem]:
    seq = hf.file_seq
    if hf.header is None:
        return [Problem(seq, f"header invalid: {hf.error}")]
    h = hf.header
    out = []
    if h["seq"] != seq:
        out.append(Problem(seq, f"file name says seq {seq}, header says {h['seq']}",
                           span=(min(seq, h["seq"]), max(seq, h["seq"]))))
    if keys is not None:
        own = [k for k in keys if k.device in (None, h["device"])]
        if not any(verify_signature(h, k.key) for k in own):
            other = next((k for k in keys if k not in own and verify_signature(h, k.key)), None)
            if other is not None:
                out.append(Problem(seq, f"signed by the key of device {other.device}, "
                                        f"header says device {h['device']}"))
            else:
                out.append(Problem(seq, "signature invalid (no given device key verifies it)"))
    if hf.payload is None:
        out.append(Problem(seq, "payload missing"))
    else:
        reason = _payload_problem(hf.payload.read_bytes(), h)
        if reason:
            out.append(Problem(seq, reason))
    return out


def _chain_members(headers: list[HeaderFile]) -> tuple[dict[int, HeaderFile], list[Problem]]:
    """One header per claimed seq; two different headers claiming one seq are a fork."""
    claims: dict[int, list[HeaderFile]] = {}
    for hf in headers:
        claims.setdefault(hf.seq, []).append(hf)
    chain, problems = {}, []
    for seq, hfs in sorted(claims.items()):
        distinct = {hf.data for hf in hfs}
        if len(distinct) > 1:
            names = ", ".join(hf.path.name for hf in hfs)
            problems.append(Problem(
                seq, f"fork: {len(distinct)} different headers claim seq {seq} ({names})"))
        # The one under its own name is the chain's; the others are already reported.
        chain[seq] = next((hf for hf in hfs if hf.file_seq == seq), hfs[0])
    return chain, problems


def _check_chain(chain: dict[int, HeaderFile], from_seq: int | None) -> list[Problem]:
    out = []
    seqs = sorted(chain)
    lowest = seqs[0]
    if from_seq is not None and lowest > from_seq:
        n = lowest - from_seq
        what = f"seq {from_seq}..{lowest - 1} ({n} segments)" if n > 1 else f"seq {from_seq}"
        out.append(Problem(from_seq, f"missing: the chain should start at seq {from_seq}, "
                                     f"{what} absent before seq {lowest}",
                           span=(from_seq, lowest - 1)))
    first = chain[lowest].header
    if from_seq == 0 and lowest == 0 and first is not None and first["prev"] != GENESIS_PREV:
        out.append(Problem(0, "prev is not the genesis value (the chain does not start here)"))
    for a, b in pairwise(seqs):
        ha, hb = chain[a].header, chain[b].header
        if b > a + 1:
            missing = f"seq {a + 1}..{b - 1} missing" if b > a + 2 else "missing"
            out.append(Problem(a + 1, f"{missing} (gap between seq {a} and seq {b})",
                               span=(a + 1, b - 1)))
        elif hb is not None and hb["prev"] != header_hash(chain[a].data):
            out.append(Problem(b, f"prev does not match hash of seq {a} "
                                  "(reordered, replaced or forked)", span=(a, b)))
        if ha is None or hb is None or ha["boot_id"] != hb["boot_id"]:
            continue  # monotonic times compare only within one boot
        if ha["session"] and ha["session"] == hb["session"]:
            if hb["start"]["mono_ns"] < ha["end"]["mono_ns"]:
                out.append(Problem(b, f"starts before seq {a} ends (reordered)", span=(a, b)))
        # A new session's pre-roll may reach back before the previous segment's end, so across
        # sessions only the ends must be in order.
        elif hb["end"]["mono_ns"] < ha["end"]["mono_ns"]:
            out.append(Problem(b, f"ends before seq {a} ends (reordered)", span=(a, b)))
    return out


def _check_sessions(sessions: list[SessionInfo], chain: dict[int, HeaderFile],
                    from_seq: int | None) -> list[Problem]:
    out = []
    lowest, highest = min(chain), max(chain)
    unreadable = {seq for seq, hf in chain.items() if hf.header is None}

    def unknown(a: int, b: int) -> bool:
        # An unreadable header between a and b may be the segment that seems to be missing;
        # it is reported (within the session's seq range) and guessing would only add noise.
        return any(a < seq < b for seq in unreadable)

    for info in sessions:
        name, segs = info.session, info.segments
        found: list[Problem] = []

        def problem(reason: str, span: tuple[int, int], warning: bool = False,
                    name: str = name, found: list[Problem] = found) -> None:
            found.append(Problem(None, f"session {name}: {reason}", warning, name, span))

        first, last = segs[0], segs[-1]
        # Unless the chain must start at seq 0, a session may have begun before the
        # directory's first segment.
        cut_at_start = from_seq != 0 and first.seq == lowest
        if first.index != 0 and not cut_at_start:
            problem(f"first segment seq {first.seq} has session_index {first.index} "
                    f"(index 0..{first.index - 1} missing)", (first.seq, first.seq))
        for x, y in pairwise(segs):
            if y.index != x.index + 1 and not unknown(x.seq, y.seq):
                problem(f"session_index skips from {x.index} (seq {x.seq}) to {y.index} "
                        f"(seq {y.seq})", (x.seq, y.seq))
            if x.final:
                problem(f"seq {y.seq} follows the final segment seq {x.seq}", (x.seq, y.seq))
        if not last.final:
            after = last.seq + 1
            if last.seq == highest:
                problem("no final segment (truncated or still recording)",
                        (last.seq, last.seq), warning=True)
            elif after in unreadable:
                problem(f"no final segment; seq {after} after its last (seq {last.seq}) is "
                        "unreadable", (last.seq, last.seq))
            elif after not in chain:
                problem(f"no final segment; seq {after} after its last (seq {last.seq}) is "
                        "missing", (last.seq, last.seq))
            else:
                problem(f"no final segment, yet later segments follow seq {last.seq} "
                        "(cut off)", (last.seq, last.seq))
        out.extend(found)
    return out


def _order(p: Problem) -> tuple[int, int]:
    # by seq, then the sessions' findings (which sum up what the seqs showed), then the rest
    if p.seq is not None:
        return 0, p.seq
    return (1, p.span[0]) if p.span is not None else (2, 0)


def verify_dir(directory: Path, keys: Sequence[DeviceKey] | None, *,
               from_seq: int | None = 0) -> Report:
    """Verify every segment in directory.

    keys: the device public keys a header may be signed by; None skips signature checks (only
    for callers that say so to their user). from_seq: the seq the chain must start at (0: the
    first segment must also carry the genesis prev); None for a partial directory, which may
    start anywhere (a box's spool after uploaded segments were deleted).
    """
    headers, orphans = read_headers(directory)
    problems: list[Problem] = []
    for hf in headers:
        problems.extend(_check_file(hf, keys))
    chain, forks = _chain_members(headers)
    problems.extend(forks)
    if not chain:
        problems.append(Problem(None, f"no segment headers in {directory}"))
        return Report(0, 0, None, None, problems, [], keys is not None)
    highest = max(chain)
    problems.extend(_check_chain(chain, from_seq))
    for files in orphans:
        # Past the last header this is a seal that was never committed (a box's recover()
        # removes it); inside the chain it is a segment whose header was removed.
        problems.append(Problem(files.seq, "payload without header", warning=files.seq > highest))
    sessions = sessions_of(chain.values())
    problems.extend(_check_sessions(sessions, chain, from_seq))
    problems.sort(key=_order)
    bad = {p.seq for p in problems if not p.warning and p.seq is not None}
    return Report(
        segments=len(chain),
        ok_segments=sum(1 for seq in chain if seq not in bad),
        first_seq=min(chain),
        last_seq=highest,
        problems=problems,
        sessions=sessions,
        signatures_checked=keys is not None,
        chain=chain,
    )

