"""Verify a directory of sealed segments: is the chain complete and untouched?

`verify_dir` only reads the directory and returns a Report of findings (Problem), each with a
kind from FINDINGS, the seq it concerns and the reason. It never raises for anything a directory
holds: any name, any file type, any byte of any file ends as a finding. docs/FORMAT.md §6 is the
specification and lists the same kinds; given the branch identity, the payloads' content is
checked too (verify_content.py).

Device public keys are PEM files; `dualrec-tool keys device` writes the device id above the PEM
block as RFC 7468 explanatory text ("dualrec-device: ID"), which PEM readers skip, so a key file
says which device it belongs to and a header signed by another device's key is named as such.
"""

from __future__ import annotations

import hashlib
import os
import stat
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
    age_expected_size,
    age_header_length,
    age_plaintext_size,
    header_hash,
    is_temp_name,
    parse_header,
    parse_name,
    verify_signature,
)

DEVICE_LABEL = "dualrec-device:"
MAX_HEADER_BYTES = 65536  # a header is under 2 KiB; more is not a header
AGE_HEADER_PREFIX = 65536  # bytes read to find the end of a payload's age header

# Every kind of finding, as FORMAT.md §6.2 lists them (a test keeps the two in step).
FINDINGS = {
    "empty": "the directory holds no segment header",
    "unknown_entry": "an entry whose name is not a segment file name",
    "not_regular": "a segment file name on a symlink, directory or other non-regular file",
    "temp_file": "an uncommitted write (.NAME.tmp); warning",
    "unreadable": "a segment file that cannot be read",
    "header_invalid": "a header that is not canonical JSON or breaks the schema",
    "signature_invalid": "no given device key verifies the signature",
    "wrong_device": "signed by the key of another device, or names another device",
    "seq_mismatch": "the header's seq differs from its file name",
    "fork": "two different headers claim one seq",
    "gap": "seqs missing inside the chain",
    "chain_start": "the chain does not start at the seq asserted",
    "genesis": "seq 0 without the genesis prev",
    "prev_mismatch": "prev differs from the SHA-256 of the previous header file",
    "payload_missing": "a header without its payload",
    "payload_size": "payload length differs from the header",
    "payload_sha256": "payload SHA-256 differs from the header",
    "payload_age": "payload is not an age file of a length age can produce",
    "orphan_payload": "a payload without a header (warning past the last header)",
    "time_order": "times run backwards within a boot",
    "continuity": "a session's segment does not start where the previous one ended",
    "session_index": "a session's indexes do not run 0, 1, 2 ... in seq order",
    "session_interleaved": "another segment lies between two segments of a session",
    "session_after_final": "a segment of a session after its final segment",
    "session_cut_off": "a session without its final segment, yet later segments follow",
    "session_open": "the newest session has no final segment yet; warning",
    "chain_resumed": "the device lost its chain state and resumed its chain here; warning",
    "deletion_log": "the deletion log given does not verify (signature, chain or format)",
    "chain_restart": "the device lost its chain state and began a new chain; warning",
    "payload_undecryptable": "the payload does not decrypt with the given identity",
    "content_tar": "the plaintext is not the tar FORMAT.md §5.2 describes",
    "content_record": "a member's record is not canonical or breaks the schema",
    "content_count": "a stream count in the header differs from the payload",
    "content_time": "a sample, line or event time outside the segment's [start, end)",
    "content_media": "media.mkv does not hold what the header says",
    "content_keyframe": "the segment's first video packet is not a keyframe",
    "content_clock": "clock.json disagrees with the header's times or clock",
    "content_session": "session events missing or inconsistent with the header",
}
WARNING_KINDS = {"temp_file", "session_open", "chain_resumed", "chain_restart"}


class KeyFileError(ValueError):
    """A device key file cannot be used; the message names the file and why."""


class DirectoryError(OSError):
    """The directory itself cannot be listed (the CLI exits 2: an I/O error, not a finding)."""


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


def shown(name: str) -> str:
    """A file name as a finding prints it: plain when it is a tidy ASCII name, else repr (so a
    newline, a lookalike digit or an undecodable byte is visible and stays on one line)."""
    ok = name.isascii() and name.isprintable() and name.strip() == name and name
    return name if ok else repr(name)


@dataclass(frozen=True)
class Problem:
    seq: int | None  # the seq the problem is about; None for a session or the whole directory
    reason: str
    warning: bool = False  # fails verification only in strict mode
    session: str | None = None
    span: tuple[int, int] | None = None  # lowest and highest seq involved, when not just seq
    kind: str = ""

    def __str__(self) -> str:
        return self.reason if self.seq is None else f"seq {self.seq}: {self.reason}"

    @property
    def seqs(self) -> tuple[int, int] | None:
        if self.span is not None:
            return self.span
        return None if self.seq is None else (self.seq, self.seq)


def finding(kind: str, seq: int | None, reason: str, **kw: Any) -> Problem:
    assert kind in FINDINGS, kind
    return Problem(seq, reason, kind in WARNING_KINDS or kw.pop("warning", False), kind=kind,
                   **kw)


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
    content_checked: bool = False

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
        if not self.passed(strict):
            return f"FAILED: {len(self.failures(strict))} problems"
        if not self.segments:
            return "VERIFIED: 0 segments"
        return (f"VERIFIED: {self.segments} segments, seq {self.first_seq}..{self.last_seq},"
                f" {len(self.sessions)} sessions")

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


# --- inventory ---------------------------------------------------------------------------------


@dataclass
class Inventory:
    headers: dict[int, Path] = field(default_factory=dict)
    payloads: dict[int, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _lax_seq(name: str) -> str:
    """What a lax reader (Unicode digits, trailing whitespace) would take a name for."""
    stem = name.strip()
    for suffix in (".hdr.json", ".payload.age"):
        if stem.endswith(suffix) and len(stem) == 10 + len(suffix):
            try:
                return f" (a lax reader would take it for seq {int(stem[:10])})"
            except ValueError:
                return ""
    return ""


def take_inventory(directory: Path) -> Inventory:
    """Every entry of the directory, classified by the strict name rule (FORMAT.md §1)."""
    inv = Inventory()
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise DirectoryError(exc.errno, f"{directory}: {exc.strerror or exc}") from None
    for entry in entries:
        name = entry.name
        parsed = parse_name(name)
        if parsed is None:
            if is_temp_name(name):
                inv.problems.append(finding("temp_file", None,
                                            f"{shown(name)}: an uncommitted write, ignored"))
            else:
                inv.problems.append(finding(
                    "unknown_entry", None,
                    f"{shown(name)}: not a segment file name{_lax_seq(name)}"))
            continue
        seq, what = parsed
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as exc:
            inv.problems.append(finding("unreadable", seq, f"{name}: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(mode):
            kind = "symlink" if stat.S_ISLNK(mode) else "directory" if stat.S_ISDIR(mode) \
                else "special file"
            inv.problems.append(finding("not_regular", seq, f"{name} is a {kind}, not a file"))
            continue
        (inv.headers if what == "header" else inv.payloads)[seq] = Path(entry.path)
    return inv


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """A file's bytes, refusing to follow a symlink swapped in after the inventory."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read() if limit is None else f.read(limit)
    finally:
        os.close(fd)


def read_headers(directory: Path) -> tuple[list[HeaderFile], list[Problem]]:
    """Every header file in directory, parsed where possible, and the inventory's findings
    (unknown entries, unreadable files, payloads without a header are left to verify_dir)."""
    inv = take_inventory(directory)
    headers, problems = [], list(inv.problems)
    for seq, path in sorted(inv.headers.items()):
        try:
            data = _read_regular(path, MAX_HEADER_BYTES + 1)
        except OSError as exc:
            problems.append(finding("unreadable", seq, f"header: {exc.strerror or exc}"))
            continue
        if len(data) > MAX_HEADER_BYTES:
            header, error = None, f"larger than {MAX_HEADER_BYTES} bytes"
        else:
            try:
                header, error = parse_header(data), None
            except FormatError as exc:
                header, error = None, str(exc)
        headers.append(HeaderFile(seq, path, data, header, error, inv.payloads.get(seq)))
    return headers, problems


def orphan_payloads(directory: Path) -> list[int]:
    inv = take_inventory(directory)
    return sorted(inv.payloads.keys() - inv.headers.keys())


def sessions_of(headers: Iterable[HeaderFile]) -> list[SessionInfo]:
    """Sessions named by the parsed headers, in seq order. Idle segments (session "") belong to
    no session."""
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


# --- one segment ---------------------------------------------------------------------------------


def payload_problem(path: Path, header: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, reason) if the payload file does not match its header (FORMAT.md §5.5)."""
    size, sha = header["payload"]["size"], header["payload"]["sha256"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return "unreadable", f"payload: {exc.strerror or exc}"
    digest, length, prefix = hashlib.sha256(), 0, b""
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return "not_regular", "payload is not a regular file"
            while chunk := f.read(1 << 20):
                if len(prefix) < AGE_HEADER_PREFIX:
                    prefix += chunk[:AGE_HEADER_PREFIX - len(prefix)]
                digest.update(chunk)
                length += len(chunk)
    except OSError as exc:
        return "unreadable", f"payload: {exc.strerror or exc}"
    if length != size:
        how = "truncated" if length < size else "replaced or appended to"
        return "payload_size", f"payload size {length} bytes, header says {size} ({how})"
    if digest.hexdigest() != sha:
        return "payload_sha256", "payload sha256 mismatch"
    # The hash matches what the device sealed; this catches a device that sealed a broken file
    # (a writer that lost its final chunk and still reported success).
    try:
        header_len = age_header_length(prefix)
    except FormatError as exc:
        return "payload_age", f"payload is not well-formed age: {exc}"
    plain = age_plaintext_size(length, header_len)
    if plain is None or age_expected_size(header_len, plain) != length:
        return "payload_age", "payload length does not fit the age format (a lost or partial chunk)"
    return None


def _check_file(hf: HeaderFile, keys: Sequence[DeviceKey] | None) -> list[Problem]:
    seq = hf.file_seq
    if hf.header is None:
        return [finding("header_invalid", seq, f"header invalid: {hf.error}")]
    h = hf.header
    out = []
    if h["seq"] != seq:
        out.append(finding("seq_mismatch", seq, f"file name says seq {seq}, header says "
                           f"{h['seq']}", span=(min(seq, h["seq"]), max(seq, h["seq"]))))
    if keys is not None:
        own = [k for k in keys if k.device in (None, h["device"])]
        if not any(verify_signature(h, k.key) for k in own):
            other = next((k for k in keys if k not in own and verify_signature(h, k.key)), None)
            if other is not None:
                out.append(finding("wrong_device", seq, f"signed by the key of device "
                                   f"{other.device}, header says device {h['device']}"))
            else:
                out.append(finding("signature_invalid", seq,
                                   "signature invalid (no given device key verifies it)"))
    if hf.payload is None:
        out.append(finding("payload_missing", seq, "payload missing"))
    else:
        found = payload_problem(hf.payload, h)
        if found:
            out.append(finding(found[0], seq, found[1]))
    return out


# --- the chain -----------------------------------------------------------------------------------


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
            problems.append(finding(
                "fork", seq, f"fork: {len(distinct)} different headers claim seq {seq} ({names})"))
        # The one under its own name is the chain's; the others are already reported.
        chain[seq] = next((hf for hf in hfs if hf.file_seq == seq), hfs[0])
    return chain, problems


def _check_devices(chain: dict[int, HeaderFile]) -> list[Problem]:
    """A directory holds one device's chain: the device the lowest readable header names."""
    named = [(seq, hf.header["device"]) for seq, hf in sorted(chain.items()) if hf.header]
    if not named:
        return []
    device = named[0][1]
    return [finding("wrong_device", seq, f"names device {d}, the directory's chain is "
                    f"device {device}") for seq, d in named if d != device]


def _check_chain(chain: dict[int, HeaderFile], from_seq: int | None) -> list[Problem]:
    out = []
    seqs = sorted(chain)
    lowest = seqs[0]
    if from_seq is not None and lowest > from_seq:
        n = lowest - from_seq
        what = f"seq {from_seq}..{lowest - 1} ({n} segments)" if n > 1 else f"seq {from_seq}"
        out.append(finding("chain_start", from_seq, f"missing: the chain should start at seq "
                           f"{from_seq}, {what} absent before seq {lowest}",
                           span=(from_seq, lowest - 1)))
    first = chain[lowest].header
    if from_seq == 0 and lowest == 0 and first is not None and first["prev"] != GENESIS_PREV:
        out.append(finding("genesis", 0,
                           "prev is not the genesis value (the chain does not start here)"))
    for a, b in pairwise(seqs):
        ha, hb = chain[a].header, chain[b].header
        if b > a + 1:
            missing = f"seq {a + 1}..{b - 1} missing" if b > a + 2 else "missing"
            out.append(finding("gap", a + 1, f"{missing} (gap between seq {a} and seq {b})",
                               span=(a + 1, b - 1)))
        elif hb is not None and hb["prev"] != header_hash(chain[a].data):
            out.append(finding("prev_mismatch", b, f"prev does not match hash of seq {a} "
                               "(reordered, replaced or forked)", span=(a, b)))
        if ha is None or hb is None or b != a + 1:
            continue
        out.extend(_check_times(a, ha, b, hb))
    return out


def _check_times(a: int, ha: dict[str, Any], b: int, hb: dict[str, Any]) -> list[Problem]:
    """FORMAT.md §4: consecutive segments within one boot, and within one session."""
    same_session = bool(ha["session"]) and ha["session"] == hb["session"]
    if ha["boot_id"] != hb["boot_id"]:
        if same_session and hb["reason"] != "interrupted":
            return [finding("continuity", b, f"session continues on another boot than seq {a} "
                            "without being closed as interrupted", span=(a, b))]
        return []  # monotonic times compare only within one boot
    end_a, start_b = ha["end"]["mono_ns"], hb["start"]["mono_ns"]
    if same_session:
        if start_b < end_a:
            return [finding("time_order", b, f"starts before seq {a} ends (reordered)",
                            span=(a, b))]
        if start_b != end_a and hb["reason"] != "interrupted":
            return [finding("continuity", b, f"starts {start_b - end_a} ns after seq {a} ends; "
                            "a session's next segment starts where the previous ended",
                            span=(a, b))]
        return []
    # A new session's pre-roll may reach back before the previous segment's end, so across
    # sessions only the ends must be in order.
    if hb["end"]["mono_ns"] < ha["end"]["mono_ns"]:
        return [finding("time_order", b, f"ends before seq {a} ends (reordered)", span=(a, b))]
    return []


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

        def problem(kind: str, reason: str, span: tuple[int, int],
                    name: str = name, found: list[Problem] = found) -> None:
            found.append(finding(kind, None, f"session {name}: {reason}", session=name,
                                 span=span))

        first, last = segs[0], segs[-1]
        # Unless the chain must start at seq 0, a session may have begun before the
        # directory's first segment.
        cut_at_start = from_seq != 0 and first.seq == lowest
        if first.index != 0 and not cut_at_start:
            problem("session_index", f"first segment seq {first.seq} has session_index "
                    f"{first.index} (index 0..{first.index - 1} missing)", (first.seq, first.seq))
        for x, y in pairwise(segs):
            if y.index != x.index + 1 and not unknown(x.seq, y.seq):
                problem("session_index", f"session_index skips from {x.index} (seq {x.seq}) to "
                        f"{y.index} (seq {y.seq})", (x.seq, y.seq))
            between = [s for s in range(x.seq + 1, y.seq)
                       if s in chain and chain[s].header is not None]
            if between:
                problem("session_interleaved", f"seq {between[0]} of another session lies "
                        f"between its seq {x.seq} and seq {y.seq}", (x.seq, y.seq))
            if x.final:
                problem("session_after_final", f"seq {y.seq} follows the final segment "
                        f"seq {x.seq}", (x.seq, y.seq))
        if not last.final:
            after = last.seq + 1
            if last.seq == highest:
                problem("session_open", "no final segment (truncated or still recording)",
                        (last.seq, last.seq))
            elif after in unreadable:
                problem("session_cut_off", f"no final segment; seq {after} after its last "
                        f"(seq {last.seq}) is unreadable", (last.seq, last.seq))
            elif after not in chain:
                problem("session_cut_off", f"no final segment; seq {after} after its last "
                        f"(seq {last.seq}) is missing", (last.seq, last.seq))
            else:
                problem("session_cut_off", f"no final segment, yet later segments follow seq "
                        f"{last.seq} (cut off)", (last.seq, last.seq))
        out.extend(found)
    return out


def _check_restarts(chain: dict[int, HeaderFile]) -> list[Problem]:
    """Where the device says it lost its chain state (FORMAT.md §4): a warning, so a reader
    knows the chain before this point was taken from the spool or the receiver."""
    out = []
    for seq, hf in sorted(chain.items()):
        reason = hf.header["reason"] if hf.header is not None and not hf.header["session"] \
            else None
        if reason == "chain_resumed":
            out.append(finding("chain_resumed", seq, "the device lost its chain state and "
                               "resumed its chain here (its chain_resumed event says from what)"))
        elif reason == "chain_restart":
            out.append(finding("chain_restart", seq, "the device lost its chain state and began "
                               "a new chain (its chain_restart event says why)"))
    return out


def _order(p: Problem) -> tuple[int, int, str]:
    # by seq, then the sessions' findings (which sum up what the seqs showed), then the rest
    if p.seq is not None:
        return 0, p.seq, ""
    return (1, p.span[0], "") if p.span is not None else (2, 0, p.reason)


def verify_dir(directory: Path, keys: Sequence[DeviceKey] | None, *,
               from_seq: int | None = 0, identities: Sequence[Any] | None = None) -> Report:
    """Verify every segment in directory.

    keys: the device public keys a header may be signed by; None skips signature checks (only
    for callers that say so to their user). from_seq: the seq the chain must start at (0: the
    first segment must also carry the genesis prev); None for a partial directory, which may
    start anywhere (a box's spool after uploaded segments were deleted) and may be empty.
    identities: age identities (pyrage) to check every payload's content with; None: the chain
    and the payloads' hashes only. Raises DirectoryError only if the directory cannot be listed.
    """
    inv_headers, problems = read_headers(directory)
    for hf in inv_headers:
        problems.extend(_check_file(hf, keys))
    chain, forks = _chain_members(inv_headers)
    problems.extend(forks)
    orphans = orphan_payloads(directory)
    if not chain:
        if from_seq is not None:  # a partial directory (a drained spool) may be empty
            problems.append(finding("empty", None, f"no segment headers in {directory}"))
        problems.extend(finding("orphan_payload", seq, "payload without header", warning=True)
                        for seq in orphans)
        problems.sort(key=_order)
        return Report(0, 0, None, None, problems, [], keys is not None)
    highest = max(chain)
    problems.extend(_check_devices(chain))
    problems.extend(_check_chain(chain, from_seq))
    for seq in orphans:
        # Past the last header this is a seal that was never committed (a box's recover()
        # removes it); inside the chain it is a segment whose header was removed.
        problems.append(finding("orphan_payload", seq, "payload without header",
                                warning=seq > highest))
    sessions = sessions_of(chain.values())
    problems.extend(_check_sessions(sessions, chain, from_seq))
    problems.extend(_check_restarts(chain))
    if identities is not None:
        from dualrec_tools.verify_content import check_contents

        problems.extend(check_contents(chain, identities, {p.seq for p in problems
                                                           if p.kind in _UNUSABLE_PAYLOAD}))
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
        content_checked=identities is not None,
    )


# A payload these findings name is not decrypted: its bytes are not the ones the header signed.
_UNUSABLE_PAYLOAD = {"payload_missing", "payload_size", "payload_sha256", "payload_age",
                     "unreadable", "not_regular", "header_invalid"}
