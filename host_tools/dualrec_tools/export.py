"""Export one session from sealed segments into files a reviewer can play and read.

The session's segments are verified first (a session that does not verify is refused unless the
caller forces it), each payload is decrypted with the branch's age identity and untarred in
memory, and three files are written: SESSION.mkv (the video remuxed without re-encoding, the
audio, and the operation log as a SubRip subtitle track, so a player shows the teller's actions
in time), SESSION.oplog.jsonl and SESSION.events.jsonl (the segments' records, byte for byte).

All three streams share the session's timeline: media timestamps are already time since the
session origin (the `session_start` event), and log lines are placed at t_mono_ns minus that
origin.
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import pyrage

from dualrec.schema import EventRecord, LineRecord, SchemaError, validate
from dualrec.segment import MEDIA_NAME
from dualrec_tools import regulator
from dualrec_tools.session_labels import read_transaction
from dualrec_tools.verify import DeviceKey, Report, SessionInfo, verify_dir

NS = 1_000_000_000
MS = 1_000_000
CUE_HOLD_NS = 3 * NS  # how long a log line stays on screen unless the next one replaces it
CUE_MAX_CHARS = 400
OUTPUT_MODE = 0o600
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # it becomes a file name
_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\u2028": " ", "\u2029": " "})
# Other C0 controls (ESC from a terminal, say) would be invisible or break the subtitle
# renderer; their Unicode "control pictures" show that they were there.
_CONTROLS = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\r\n"}


class ExportError(RuntimeError):
    """The session cannot be exported; the message says why."""


@dataclass
class Exported:
    mkv: Path
    oplog: Path
    events: Path
    transcript: Path  # the log as read by a reviewer: times and masked text
    report: Path  # the verification report of the segments used
    seqs: list[int]  # the segments whose content is in the export
    origin_ns: int
    lines: int
    cues: int
    notes: list[str] = field(default_factory=list)  # warnings, and problems overridden by force


def load_identities(path: Path) -> list[pyrage.x25519.Identity]:
    """The X25519 identities of an age identity file (as `age -i` reads it: '#' comments)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExportError(f"{path}: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise ExportError(f"{path}: line {n} is not an age X25519 identity") from None
    if not out:
        raise ExportError(f"{path}: no age identity in the file")
    return out


def decrypt_payload(ciphertext: bytes,
                    identities: Sequence[pyrage.x25519.Identity]) -> dict[str, bytes]:
    """A payload's tar members by name, decrypted and unpacked in memory."""
    plaintext = pyrage.decrypt(ciphertext, list(identities))
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        out = {}
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            if f is not None:
                out[member.name] = f.read()
    return out


def jsonl(data: bytes, model: Any = None) -> list[dict[str, Any]]:
    """The records of a .jsonl member; with a schema model, only the records that pass it (a
    broken payload exported with --force must not stop the export)."""
    out = []
    for line in data.splitlines():
        try:
            value = json.loads(line)
            if model is not None:
                validate(model, value)
        except (ValueError, RecursionError, SchemaError):
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _srt_time(ns: int) -> str:
    ms = ns // MS
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _cap(texts: list[str]) -> list[str]:
    """A cue's lines, at most CUE_MAX_CHARS characters in all: a megabyte line is for the
    transcript and oplog.jsonl, not for the screen."""
    out, room = [], CUE_MAX_CHARS
    for text in texts:
        if room <= 0:
            break
        out.append(text if len(text) <= room else text[:room] + "…")
        room -= len(text)
    return out


def _display(text: str) -> str:
    return text.translate(_LINE_BREAKS).translate(_CONTROLS).strip()


def srt_document(records: Iterable[dict[str, Any]], origin_ns: int,
                 end_ns: int | None = None) -> tuple[bytes, int]:
    """SubRip cues for log records: each shown from its time for CUE_HOLD_NS or until the next,
    and not past end_ns (ns since origin: the recording's end, so the log does not outlast it).

    Lines in the same millisecond share a cue (SubRip has millisecond resolution; two cues with
    one start would give the first a zero duration). Blank lines get no cue: they stay in
    oplog.jsonl. Returns the document and its cue count."""
    groups: list[tuple[int, list[str]]] = []
    for rec in records:
        text = _display(rec.get("text", ""))
        if not text:
            continue
        t = max(0, rec["t_mono_ns"] - origin_ns) // MS * MS
        if groups and (groups[-1][0] == t or "continued" in rec.get("flags", ())):
            # a piece of an overlong line belongs to its line's cue, not a cue of its own
            groups[-1][1].append(text)
        else:
            groups.append((t, [text]))
    groups = [(t, _cap(texts)) for t, texts in groups]
    groups.sort(key=lambda g: g[0])
    cues = []
    for n, (start, texts) in enumerate(groups):
        end = start + CUE_HOLD_NS
        if n + 1 < len(groups):
            end = min(end, groups[n + 1][0])
        if end_ns is not None:
            end = max(min(end, end_ns // MS * MS), start + MS)
        cues.append(f"{n + 1}\n{_srt_time(start)} --> {_srt_time(end)}\n" + "\n".join(texts))
    return ("\n\n".join(cues) + "\n").encode() if cues else b"", len(cues)


def session_origin(events: Iterable[dict[str, Any]]) -> int | None:
    return next((e["t_mono_ns"] for e in events if e.get("kind") == "session_start"), None)


_Keyed = tuple[Fraction, int, av.Packet]


def _sorted_packets(inp: av.container.InputContainer,
                    targets: dict[str, av.stream.Stream]) -> Iterator[_Keyed]:
    """One segment's packets sorted by time, restreamed to the output; one segment at a time
    is held in memory, since a session's segments follow each other on the timeline."""
    keyed = []
    for pkt in inp.demux():
        target = targets.get(pkt.stream.type)
        if pkt.pts is None or pkt.size == 0 or target is None:
            continue  # demux ends each stream with an empty flush packet
        when = pkt.pts * pkt.time_base
        pkt.stream = target
        keyed.append((when, target.index, pkt))
    keyed.sort(key=lambda k: (k[0], k[1]))
    yield from keyed
    inp.close()


def _same_format(a: av.stream.Stream, b: av.stream.Stream) -> bool:
    ca, cb = a.codec_context, b.codec_context
    if ca.name != cb.name or (ca.extradata or b"") != (cb.extradata or b""):
        return False
    if isinstance(ca, av.VideoCodecContext) and isinstance(cb, av.VideoCodecContext):
        return (ca.width, ca.height) == (cb.width, cb.height)
    if isinstance(ca, av.AudioCodecContext) and isinstance(cb, av.AudioCodecContext):
        return (ca.sample_rate, ca.channels) == (cb.sample_rate, cb.channels)
    return True


@dataclass(frozen=True)
class SubtitleTrack:
    srt: bytes
    title: str
    language: str  # ISO 639-2, as Matroska tags tracks
    default: bool


def mux_session(media: Sequence[tuple[int, bytes]], srt: bytes, out_file: BinaryIO,
                tags: dict[str, str] | None = None, language: str = "chi",
                extra_tracks: Sequence[SubtitleTrack] = ()) -> None:
    """Remux the segments' media.mkv (seq, bytes) and the SubRip log into one Matroska file,
    with the file's tags and further subtitle tracks (a time code)."""
    inputs = [(seq, av.open(io.BytesIO(data), "r", format="matroska")) for seq, data in media]
    tracks = ([SubtitleTrack(srt, "operation log", language, True)] if srt else []) + [
        t for t in extra_tracks if t.srt]
    opened = [(t, av.open(io.BytesIO(t.srt), "r", format="srt")) for t in tracks]
    try:
        with av.open(out_file, "w", format="matroska") as out:
            templates: dict[str, av.stream.Stream] = {}
            for seq, inp in inputs:
                for stream in inp.streams:
                    if stream.type not in ("video", "audio"):
                        continue
                    first = templates.setdefault(stream.type, stream)
                    if not _same_format(first, stream):
                        raise ExportError(f"seq {seq}: {stream.type} format differs from the "
                                          "session's first segment; cannot join without "
                                          "re-encoding")
            targets: dict[str, av.stream.Stream] = {
                kind: out.add_stream_from_template(templates[kind])
                for kind in ("video", "audio") if kind in templates
            }
            streams: list[Iterator[_Keyed]] = [
                itertools.chain.from_iterable(_sorted_packets(inp, targets) for _, inp in inputs)
            ]
            for track, subs in opened:
                sub_out = out.add_stream_from_template(subs.streams[0])
                sub_out.metadata["title"] = track.title
                sub_out.metadata["language"] = track.language
                if track.default:
                    # shown by default, so a player puts the log on screen without being asked
                    sub_out.disposition = av.stream.Disposition.default
                streams.append(_sorted_packets(subs, {"subtitle": sub_out}))
            for key, value in (tags or {}).items():
                out.metadata[key] = value
            for _, _, pkt in heapq.merge(*streams, key=lambda k: (k[0], k[1])):
                out.mux(pkt)
    finally:
        for _, inp in inputs:
            inp.close()
        for _, subs in opened:
            subs.close()


def _create_private(path: Path) -> BinaryIO:
    # An export is plaintext: ID-card and bank-card numbers, faces, voices. Only its owner
    # may read it, whatever the umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_MODE)
    os.fchmod(fd, OUTPUT_MODE)
    return os.fdopen(fd, "wb")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _create_private(tmp) as f:
        f.write(data)
    os.replace(tmp, path)


def _recording_end(report: Report, info: SessionInfo, origin: int) -> int | None:
    """Where the session's timeline ends (ns since origin). Only segments of the first
    segment's boot count: an `interrupted` segment sealed after a reboot has its times on
    another boot's monotonic clock."""
    headers = [h for h in (report.chain[seq].header for seq in info.seqs) if h is not None]
    if not headers:
        return None
    boot = headers[0]["boot_id"]
    return max(h["end"]["mono_ns"] for h in headers if h["boot_id"] == boot) - origin


def export_session(spool: Path, session: str, out_dir: Path,
                   identities: Sequence[pyrage.x25519.Identity],
                   keys: Sequence[DeviceKey] | None, *, force: bool = False,
                   tz: tzinfo | None = None, counter: str | None = None,
                   language: str = "chi", timecode: bool = True,
                   progress: Callable[[int], None] = lambda n: None) -> Exported:
    """Verify, decrypt and export one session; raise ExportError with the reason if refused.

    keys None: signatures are not checked (the note in the result says so). force: export what
    can be decrypted even when verification reports problems (they are listed in the notes).
    """
    if not SESSION_NAME.match(session):
        raise ExportError(f"{session!r} is not a session id")
    # The spool may have lost its oldest segments to upload, so the chain may start anywhere.
    try:
        report = verify_dir(spool, keys, from_seq=None, identities=identities)
    except OSError as exc:
        raise ExportError(f"{spool}: {exc.strerror or exc}") from None
    info = report.session(session)
    if info is None:
        raise ExportError(f"no segments of session {session} in {spool}")
    problems = report.problems_of(info)
    errors = [str(p) for p in problems if not p.warning]
    notes = [f"warning: {p}" for p in problems if p.warning]
    if keys is None:
        notes.append("warning: signatures not checked (no device key given)")
    if errors and not force:
        raise ExportError(f"session {session} does not verify:\n  " + "\n  ".join(errors)
                          + "\n(--force exports it anyway)")
    notes.extend(f"ignored (--force): {e}" for e in errors)

    oplog, events, media, seqs = [], [], [], []
    origin_from_header = None
    for seq in info.seqs:
        progress(1)
        hf = report.chain[seq]
        if hf.header is not None and hf.header["session_index"] == 0:
            # The segmenter opens index 0 at the origin: the fallback if the event is missing.
            origin_from_header = hf.header["start"]["mono_ns"]
        if hf.payload is None:
            notes.append(f"seq {seq}: payload missing, skipped")
            continue
        try:
            members = decrypt_payload(hf.payload.read_bytes(), identities)
        except Exception as exc:  # any broken payload (only reached with --force)
            if not force:
                raise ExportError(f"seq {seq}: cannot decrypt and unpack: {exc}") from None
            notes.append(f"seq {seq}: cannot decrypt and unpack ({exc}), skipped")
            continue
        seqs.append(seq)
        oplog.append(members.get("oplog.jsonl", b""))
        events.append(members.get("events.jsonl", b""))
        if MEDIA_NAME in members:
            media.append((seq, members[MEDIA_NAME]))
    if not seqs:
        raise ExportError(f"session {session}: no segment could be decrypted")

    event_records = [e for chunk in events for e in jsonl(chunk, EventRecord)]
    origin = session_origin(event_records)
    if origin is None:
        origin = origin_from_header
    if origin is None:
        raise ExportError(f"session {session}: no session_start event and no first segment, "
                          "so the log cannot be placed on the media timeline")
    line_records = [r for chunk in oplog for r in jsonl(chunk, LineRecord)]
    srt, cues = srt_document(line_records, origin, _recording_end(report, info, origin))

    tz = tz or datetime.now().astimezone().tzinfo or UTC
    start_utc = regulator.origin_utc_ns(report, info, origin)
    txn = read_transaction(info, report.chain, identities)
    device = next((h.header["device"] for h in report.chain.values() if h.header), "")
    tags = regulator.mkv_tags(session, device, counter, start_utc, txn, tz)
    end = _recording_end(report, info, origin)
    extra = []
    if timecode and start_utc is not None and end is not None:
        extra.append(SubtitleTrack(regulator.timecode_srt(start_utc, end, tz), "time code",
                                   "zxx", False))

    out_dir.mkdir(parents=True, exist_ok=True)
    mkv = out_dir / f"{session}.mkv"
    tmp = out_dir / f".{session}.mkv.tmp"
    try:
        with _create_private(tmp) as f:
            mux_session(media, srt, f, tags, language, extra)
        os.replace(tmp, mkv)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # PyAV's errors, or media a --force export could not place
        tmp.unlink(missing_ok=True)
        raise ExportError(f"session {session}: muxing the recording failed: {exc}") from None
    oplog_path = out_dir / f"{session}.oplog.jsonl"
    events_path = out_dir / f"{session}.events.jsonl"
    transcript_path = out_dir / f"{session}.transcript.txt"
    report_path = out_dir / f"{session}.verify.txt"
    _write(oplog_path, b"".join(oplog))
    _write(events_path, b"".join(events))
    head = [f"{k}: {v}" for k, v in tags.items()]
    _write(transcript_path, regulator.transcript(line_records, origin, start_utc, tz,
                                                 head).encode())
    _write(report_path, regulator.verify_text(report, info).encode())
    return Exported(mkv, oplog_path, events_path, transcript_path, report_path, seqs, origin,
                    len(line_records), cues, notes)
