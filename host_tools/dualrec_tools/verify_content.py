"""Check what a payload holds against the header that signed it (FORMAT.md §5, §6.3).

Run by verify_dir when it is given the branch identity (`dualrec-tool verify --identity KEY`):
the payload is decrypted in memory and its tar, records, clock anchors and media are checked
against every claim of the header: member names, order, modes and mtime; stream counts; every
packet, block, line and event time inside [start, end); the first video packet a keyframe;
clock.json consistent with the header's times and clock; the session events the header implies.
Every failure is a finding naming the seq; nothing here raises for what a payload holds.
"""

from __future__ import annotations

import base64
import io
import tarfile
from collections.abc import Sequence
from typing import Any

import av
import pyrage

from dualrec.canonical import CanonicalError, parse_canonical
from dualrec.schema import ClockJson, EventRecord, LineRecord, SchemaError, validate
from dualrec_tools.verify import HeaderFile, Problem, finding

MEMBERS = ("clock.json", "events.jsonl", "oplog.jsonl", "media.mkv")
EARLY_CUTS = frozenset({"tamper", "power_fail", "clock_step"})
MEDIA_SLACK_NS = 500_000  # Matroska stores milliseconds: a stamp may round by half of one
MAX_PLAINTEXT = 1 << 31  # what one segment can hold; more is refused before decrypting


class ContentError(Exception):
    """A payload breaks a claim of its header; kind is the finding's kind."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def utc_at(anchors: Sequence[dict[str, Any]], mono_ns: int) -> int:
    """UTC of a monotonic instant through the anchor in force: the newest at or before it, or
    the first when none is (FORMAT.md §5.2)."""
    anchor = anchors[0]
    for a in anchors:
        if a["mono_ns"] <= mono_ns:
            anchor = a
    return anchor["utc_ns"] + (mono_ns - anchor["mono_ns"])


def session_origins(chain: dict[int, HeaderFile]) -> dict[str, int]:
    """Each session's media time zero: the start of its session_index 0 segment."""
    out = {}
    for hf in chain.values():
        h = hf.header
        if h is not None and h["session"] and h["session_index"] == 0:
            out.setdefault(h["session"], h["start"]["mono_ns"])
    return out


def check_contents(chain: dict[int, HeaderFile], identities: Sequence[Any],
                   skip: set[int | None]) -> list[Problem]:
    origins = session_origins(chain)
    out = []
    for seq, hf in sorted(chain.items()):
        if hf.header is None or hf.payload is None or seq in skip or hf.file_seq != seq:
            continue
        before = chain.get(seq - 1)
        h = hf.header
        # After an early cut (tamper, power fail, clock step: at the event's instant, not at a
        # keyframe) a segment's video continues the previous one's GOP (FORMAT.md §5.4).
        continues_gop = (h["session_index"] > 0 and before is not None
                         and before.header is not None
                         and before.header["session"] == h["session"]
                         and before.header["reason"] in EARLY_CUTS)
        # the end of the segment before a session's first, in the same boot (FORMAT.md §4)
        prev_end = (before.header["end"]["mono_ns"] if before is not None and before.header
                    and h["session"] and h["session_index"] == 0
                    and before.header["boot_id"] == h["boot_id"]
                    and before.header["session"] != h["session"] else None)
        try:
            check_payload(h, hf.payload.read_bytes(), identities, origins.get(h["session"]),
                          keyframe_first=not continues_gop, prev_end=prev_end)
        except ContentError as exc:
            out.append(finding(exc.kind, seq, str(exc)))
        except OSError as exc:
            out.append(finding("unreadable", seq, f"payload: {exc.strerror or exc}"))
    return out


def check_payload(h: dict[str, Any], ciphertext: bytes, identities: Sequence[Any],
                  origin: int | None, keyframe_first: bool = True,
                  prev_end: int | None = None) -> None:
    """Raise ContentError for the first way the payload breaks the header's claims."""
    try:
        plaintext = pyrage.decrypt(ciphertext, list(identities))
    except Exception as exc:  # pyrage raises its own DecryptError, or ValueError
        raise ContentError("payload_undecryptable",
                           f"payload does not decrypt with the given identity ({exc})") from None
    members = read_tar(plaintext, h)
    clock = _record(ClockJson, members["clock.json"], "clock.json", whole=True)[0]
    _check_clock(h, clock)
    events = _record(EventRecord, members["events.jsonl"], "events.jsonl")
    lines = _record(LineRecord, members["oplog.jsonl"], "oplog.jsonl")
    _check_records(h, events, lines, prev_end)
    media = members.get("media.mkv")
    s = h["streams"]
    has_media = bool(s["video"]["frames"] or s["audio"]["samples"])
    if has_media != (media is not None):
        raise ContentError("content_tar", "media.mkv is present exactly when the header counts "
                           "video frames or audio samples")
    if media is not None:
        # origin None: the session's first segment is not in the directory, so media times
        # cannot be placed (FORMAT.md §6.3); everything else is still checked
        check_media(h, media, origin, keyframe_first)


def read_tar(plaintext: bytes, h: dict[str, Any]) -> dict[str, bytes]:
    try:
        with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
            infos = tar.getmembers()
            names = [m.name for m in infos]
            expected = list(MEMBERS[:3]) + (["media.mkv"] if "media.mkv" in names else [])
            if names != expected:
                raise ContentError("content_tar", f"members {names[:6]} are not "
                                   f"{', '.join(MEMBERS[:3])}[, media.mkv] in that order")
            out = {}
            for m in infos:
                if not m.isreg() or m.mode != 0o444:
                    raise ContentError("content_tar", f"member {m.name} is not a regular file "
                                       "of mode 0444")
                f = tar.extractfile(m)
                out[m.name] = f.read() if f is not None else b""
                if len(out[m.name]) != m.size:
                    raise ContentError("content_tar", f"member {m.name} is truncated")
            mtimes = {m.mtime for m in infos}
    except ContentError:
        raise
    except Exception as exc:  # tarfile raises several types for a broken archive
        raise ContentError("content_tar", f"plaintext is not a readable tar ({exc})") from None
    try:
        first_anchor = parse_canonical(out["clock.json"].removesuffix(b"\n"))["anchors"][0]
        mtime = first_anchor["utc_ns"] // 1_000_000_000
    except Exception:
        mtime = None  # clock.json's own check names what is wrong with it
    if mtime is not None and mtimes != {mtime}:
        raise ContentError("content_tar", f"member mtimes {sorted(mtimes)[:3]} are not "
                           f"clock.json's first anchor's UTC seconds ({mtime})")
    return out


def _record(model: Any, data: bytes, member: str, whole: bool = False) -> list[dict[str, Any]]:
    """The records of a member: one canonical JSON value per \\n-terminated line."""
    if data and not data.endswith(b"\n"):
        raise ContentError("content_record", f"{member} does not end with a newline")
    lines = data.split(b"\n")[:-1] if data else []
    if whole and len(lines) != 1:
        raise ContentError("content_record", f"{member} holds {len(lines)} lines, not one")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            value = parse_canonical(line)
            validate(model, value)
        except (CanonicalError, SchemaError) as exc:
            raise ContentError("content_record", f"{member} line {n}: {exc}") from None
        out.append(value)
    return out


def _inside(h: dict[str, Any], t: int) -> bool:
    return h["start"]["mono_ns"] <= t < h["end"]["mono_ns"]


def _check_clock(h: dict[str, Any], clock: dict[str, Any]) -> None:
    anchors = clock["anchors"]
    start, end = h["start"]["mono_ns"], h["end"]["mono_ns"]
    if any(not start < a["mono_ns"] <= end for a in anchors[1:]):
        raise ContentError("content_clock", "clock.json anchors after the first are not "
                           "inside (start, end]")
    if anchors[0]["mono_ns"] > start and len(anchors) > 1:
        raise ContentError("content_clock", "clock.json lacks the anchor in force at start")
    for name in ("start", "end"):
        if utc_at(anchors, h[name]["mono_ns"]) != h[name]["utc_ns"]:
            raise ContentError("content_clock", f"header {name}.utc_ns is not its mono_ns "
                               "through the anchor in force")
    last = anchors[-1]
    quality = {k: last[k] for k in ("source", "synced", "est_error_ns")}
    if quality != h["clock"]:
        raise ContentError("content_clock", "header clock is not the quality of clock.json's "
                           "last anchor")


def _check_records(h: dict[str, Any], events: list[dict[str, Any]],
                   lines: list[dict[str, Any]], prev_end: int | None = None) -> None:
    s = h["streams"]
    if len(events) != s["events"]["count"]:
        raise ContentError("content_count", f"events.jsonl holds {len(events)} events, header "
                           f"says {s['events']['count']}")
    raws = [base64.b64decode(r["raw"]) for r in lines]
    counts = {"lines": len(lines), "bytes": sum(map(len, raws)),
              "flagged": sum(1 for r in lines if r["flags"])}
    for key, value in counts.items():
        if value != s["oplog"][key]:
            raise ContentError("content_count", f"oplog.jsonl holds {value} {key}, header says "
                               f"{s['oplog'][key]}")
    for what, records in (("event", events), ("log line", lines)):
        outside = [r["t_mono_ns"] for r in records if not _inside(h, r["t_mono_ns"])]
        if outside:
            raise ContentError("content_time", f"{what} at {outside[0]} ns is outside the "
                               "segment's [start, end)")
    times = [r["t_mono_ns"] for r in lines]
    if times != sorted(times):
        raise ContentError("content_time", "log lines are not in time order")
    _check_session_events(h, events, prev_end)


def _check_session_events(h: dict[str, Any], events: list[dict[str, Any]],
                          prev_end: int | None = None) -> None:
    kinds = [e["kind"] for e in events]
    starts = [e for e in events if e["kind"] == "session_start"]
    if h["session"] and h["session_index"] == 0 and h["reason"] != "interrupted":
        if len(starts) != 1 or starts[0]["t_mono_ns"] != h["start"]["mono_ns"]:
            raise ContentError("content_session", "a session's first segment holds one "
                               "session_start event at its start")
        d = starts[0]["detail"]
        trig, pre = d.get("trigger_mono_ns"), d.get("preroll_ns")
        if (type(trig) is not int or type(pre) is not int or trig < h["start"]["mono_ns"]
                or pre != trig - h["start"]["mono_ns"]):
            raise ContentError("content_session", "session_start needs trigger_mono_ns at or "
                               "after the origin and preroll_ns = trigger_mono_ns - origin")
        if prev_end is not None and prev_end > trig + 1:
            raise ContentError("content_session", f"the previous segment ends {prev_end - trig} "
                               "ns after this session's trigger: sessions overlap by more than "
                               "the pre-roll")
    elif starts:
        raise ContentError("content_session", "session_start outside a session's first segment")
    if h["reason"] == "session_end" and "session_stop" not in kinds:
        raise ContentError("content_session", "a session_end segment holds a session_stop event")
    if h["reason"] in EARLY_CUTS and h["reason"] not in kinds:
        raise ContentError("content_session", f"a segment cut for {h['reason']} holds no such "
                           "event")
    if h["reason"] == "interrupted" and "session_interrupted" not in kinds:
        raise ContentError("content_session", "an interrupted segment holds a "
                           "session_interrupted event")
    if not h["session"] and h["reason"] not in ("event", "oplog") and h["reason"] not in kinds:
        raise ContentError("content_session", f"an idle segment sealed for {h['reason']} holds "
                           "no such event")


def check_media(h: dict[str, Any], media: bytes, origin: int | None,
                keyframe_first: bool = True) -> None:
    """media.mkv against the header: streams, formats, counts, times, first keyframe."""
    v, a = h["streams"]["video"], h["streams"]["audio"]
    try:
        with av.open(io.BytesIO(media), "r", format="matroska") as mkv:
            vs = [s for s in mkv.streams if s.type == "video"]
            aus = [s for s in mkv.streams if s.type == "audio"]
            if len(vs) != (1 if v["frames"] else 0) or len(aus) != (1 if a["samples"] else 0):
                raise ContentError("content_media", f"{len(vs)} video and {len(aus)} audio "
                                   "tracks; the header's counts want one of each it counts")
            if vs and (vs[0].codec_context.name != "h264" or vs[0].codec_context.width
                       != v["width"] or vs[0].codec_context.height != v["height"]):
                raise ContentError("content_media", "video track is not the header's h264 "
                                   f"{v['width']}x{v['height']}")
            if aus and (aus[0].codec_context.name != "pcm_s16le" or aus[0].sample_rate
                        != a["rate"] or aus[0].codec_context.channels != a["channels"]):
                raise ContentError("content_media", "audio track is not the header's pcm_s16le "
                                   f"{a['rate']} Hz x {a['channels']}")
            frames = keyframes = samples = 0
            first_video: bool | None = None
            for pkt in mkv.demux():
                if pkt.size == 0 or pkt.pts is None:
                    continue
                if origin is not None:
                    rel = int(pkt.pts * pkt.time_base * 1_000_000_000)
                    lo = h["start"]["mono_ns"] - origin - MEDIA_SLACK_NS
                    hi = h["end"]["mono_ns"] - origin + MEDIA_SLACK_NS
                    if not lo <= rel < hi:
                        raise ContentError("content_time", f"{pkt.stream.type} packet at "
                                           f"{rel} ns of media time is outside the segment")
                if pkt.stream.type == "video":
                    if first_video is None:
                        first_video = pkt.is_keyframe
                    frames += 1
                    keyframes += pkt.is_keyframe
                else:
                    samples += pkt.size // (2 * a["channels"])
    except ContentError:
        raise
    except Exception as exc:  # PyAV raises its own error types for a broken file
        raise ContentError("content_media", f"media.mkv cannot be read ({exc})") from None
    if first_video is False and keyframe_first:
        raise ContentError("content_keyframe", "the first video packet is not a keyframe")
    for what, got, want in (("video frames", frames, v["frames"]),
                            ("keyframes", keyframes, v["keyframes"]),
                            ("audio samples", samples, a["samples"])):
        if got != want:
            raise ContentError("content_count", f"media.mkv holds {got} {what}, header says "
                               f"{want}")
