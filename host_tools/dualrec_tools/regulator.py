"""What an export for the regulator carries beside the media: the Matroska tags (wall-clock start,
device and counter, transaction labels, completeness), a time-code subtitle track, a masked
transcript of the operation log, and the verification report of the segments used.

Times: media time zero is the session's origin; its UTC is the `start.utc_ns` of the session's
first segment (FORMAT.md §3, §5.4); local time is in the zone given (the branch's), UTC beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo
from typing import Any

from dualrec.shield import shield
from dualrec_tools.session_labels import Transaction
from dualrec_tools.verify import Report, SessionInfo

NS = 1_000_000_000


def origin_utc_ns(report: Report, info: SessionInfo, origin_ns: int) -> int | None:
    """UTC of the session's media time zero, from the first of its headers present."""
    for seq in info.seqs:
        hf = report.chain.get(seq)
        if hf is not None and hf.header is not None:
            h = hf.header
            return h["start"]["utc_ns"] - (h["start"]["mono_ns"] - origin_ns)
    return None


def _when(utc_ns: int, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(utc_ns / NS, UTC).astimezone(tz)


def mkv_tags(session: str, device: str, counter: str | None, start_utc_ns: int | None,
             txn: Transaction, tz: tzinfo) -> dict[str, str]:
    """Matroska global tags (names as in the Matroska tagging guidelines where one exists)."""
    tags = {"TITLE": f"dualrec session {session}", "SESSION": session, "DEVICE": device,
            "COMPLETENESS": txn.completeness}
    if counter:
        tags["COUNTER"] = counter
    if start_utc_ns is not None:
        utc = datetime.fromtimestamp(start_utc_ns / NS, UTC)
        tags["DATE_RECORDED"] = utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        tags["DATE_RECORDED_LOCAL"] = _when(start_utc_ns, tz).isoformat(timespec="milliseconds")
    for key, name in (("txn", "TRANSACTION_ID"), ("teller", "TELLER"),
                      ("business", "BUSINESS_TYPE")):
        if key in txn.labels:
            tags[name] = shield(txn.labels[key])
    return tags


def _srt_time(ns: int) -> str:
    ms = ns // 1_000_000
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def timecode_srt(start_utc_ns: int, duration_ns: int, tz: tzinfo) -> bytes:
    """One cue per second of media: the local wall-clock time with the UTC beside it."""
    cues = []
    first = (-start_utc_ns) % NS  # the first whole second of wall-clock time
    for n, t in enumerate(range(first, max(duration_ns, 0), NS)):
        local = _when(start_utc_ns + t, tz)
        utc = datetime.fromtimestamp((start_utc_ns + t) / NS, UTC)
        text = f"{local:%Y-%m-%d %H:%M:%S %Z} ({utc:%H:%M:%S} UTC)"
        cues.append(f"{n + 1}\n{_srt_time(t)} --> {_srt_time(min(t + NS, duration_ns))}\n{text}")
    return ("\n\n".join(cues) + "\n").encode() if cues else b""


def transcript(lines: Iterable[dict[str, Any]], origin_ns: int, start_utc_ns: int | None,
               tz: tzinfo, header: list[str]) -> str:
    """The operation log as a reviewer reads it: media time, wall-clock time, masked text."""
    out = [*header, ""]
    for rec in lines:
        rel = rec["t_mono_ns"] - origin_ns
        sign = "-" if rel < 0 else "+"
        ms = abs(rel) // 1_000_000
        when = ""
        if start_utc_ns is not None:
            when = f"{_when(start_utc_ns + rel, tz):%Y-%m-%d %H:%M:%S.%f}"[:-3] + "  "
        flags = f"  [{', '.join(rec['flags'])}]" if rec.get("flags") else ""
        out.append(f"{sign}{ms // 60000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}  {when}"
                   f"{shield(rec.get('text', ''))}{flags}")
    return "\n".join(out) + "\n"


def verify_text(report: Report, info: SessionInfo) -> str:
    """The verification report for the segments the export used."""
    problems = report.problems_of(info)
    checked = ["signatures" if report.signatures_checked else "no signatures (no device key)",
               "payload content" if report.content_checked else "hashes only"]
    lines = [f"session {info.session}: seq {info.seqs[0]}..{info.seqs[-1]} "
             f"({len(info.seqs)} segments), status {info.status}",
             f"checked: {', '.join(checked)}"]
    lines += [("warning: " if p.warning else "") + str(p) for p in problems]
    lines.append("VERIFIED" if not [p for p in problems if not p.warning] else
                 f"FAILED: {len([p for p in problems if not p.warning])} problems")
    return "\n".join(lines) + "\n"
