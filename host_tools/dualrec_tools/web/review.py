"""One session as the review page shows it: the operation log and events on the media timeline
(seconds since the session origin, FORMAT.md §5.4), wall-clock times, the content-level verdict,
and the segments' media for the player.

Text is masked with the number shield unless the caller says the viewer unmasked this session;
the raw bytes stay in the sealed evidence and are never sent. The media is decrypted only for
the player's file (media_of), not for every page view.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from dualrec.schema import EventRecord, LineRecord
from dualrec.segment import MEDIA_NAME
from dualrec.shield import shield
from dualrec_tools import regulator
from dualrec_tools.export import decrypt_payload, jsonl, session_origin
from dualrec_tools.verify import HeaderFile, SessionInfo
from dualrec_tools.verify_content import check_contents
from dualrec_tools.web.archive import Archive, DeviceChain, SessionRow

NS = 1_000_000_000
# Events marked on the timeline, and how the page names them.
TIMELINE_KINDS = {
    "session_start": "pre-roll start", "fault": "fault", "fault_cleared": "fault cleared",
    "clock_step": "clock step", "gap": "gap", "preroll_short": "pre-roll short",
    "stream_missing": "stream missing", "tamper": "tamper", "power_fail": "power fail",
    "mark": "mark", "button": "button", "session_stop": "stop",
    "session_interrupted": "interrupted",
}


@dataclass
class SessionView:
    row: SessionRow
    origin_ns: int
    start_utc_ns: int | None
    lines: list[dict[str, Any]]
    events: list[dict[str, Any]]
    has_media: bool
    content_problems: list[str]
    notes: list[str] = field(default_factory=list)


def _when(utc_ns: int | None, tz: tzinfo) -> dict[str, str]:
    if utc_ns is None:
        return {"local": "unknown", "utc": "unknown"}
    utc = datetime.fromtimestamp(utc_ns / NS, UTC)
    return {"local": utc.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " "
            + (utc.astimezone(tz).tzname() or ""),
            "utc": utc.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"}


def _detail(detail: Any, origin_ns: int) -> str:
    """An event's detail for a tooltip: nanosecond stamps as seconds (a CLOCK_MONOTONIC stamp
    as media time), then through the shield, since a fault reason may quote a line."""
    if not isinstance(detail, dict):
        return ""
    shown = {}
    for k, v in detail.items():
        if k.endswith("_ns") and isinstance(v, int) and not isinstance(v, bool):
            v = round(((v - origin_ns) if "mono" in k else v) / NS, 3)
            k = k[:-3] + "_s"
        shown[k] = v
    return shield(json.dumps(shown, ensure_ascii=False, sort_keys=True))[:300]


@dataclass
class _Decrypted:
    """A session's records as sealed (unmasked: never sent as they are), its origin and the
    content-level findings; kept for a few sessions so a page, its API call and a reload do not
    decrypt the whole session again."""

    lines: list[dict[str, Any]]
    events: list[dict[str, Any]]
    origin: int
    content: list[str]
    notes: list[str]


_CACHE: OrderedDict[tuple[Any, ...], _Decrypted] = OrderedDict()
_CACHE_SIZE = 16
_cache_lock = threading.Lock()


def _members(archive: Archive, hf: HeaderFile) -> dict[str, bytes]:
    assert hf.payload is not None
    return decrypt_payload(hf.payload.read_bytes(), archive.identities)


def _decrypt(archive: Archive, chain: DeviceChain, info: SessionInfo) -> _Decrypted:
    key = (chain.device, info.session,
           tuple((s, chain.report.chain[s].payload is not None) for s in info.seqs))
    with _cache_lock:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    lines: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    notes: list[str] = []
    origin_from_header = None
    for seq in info.seqs:
        hf = chain.report.chain[seq]
        if hf.header is not None and hf.header["session_index"] == 0:
            origin_from_header = hf.header["start"]["mono_ns"]
        if hf.payload is None:
            notes.append(f"seq {seq}: payload not received yet")
            continue
        try:
            members = _members(archive, hf)
        except Exception as exc:  # a damaged payload: the page says so and shows the rest
            notes.append(f"seq {seq}: cannot decrypt ({type(exc).__name__})")
            continue
        lines += jsonl(members.get("oplog.jsonl", b""), LineRecord)
        events += jsonl(members.get("events.jsonl", b""), EventRecord)
    origin = session_origin(events)
    if origin is None:
        origin = origin_from_header if origin_from_header is not None else info.start_utc_ns
    sub = {s: chain.report.chain[s] for s in info.seqs}
    content = [str(p) for p in check_contents(sub, archive.identities, set())]
    out = _Decrypted(lines, events, origin, content, notes)
    with _cache_lock:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return out


def media_of(archive: Archive, device: str, session: str) -> tuple[list[tuple[int, bytes]], int]:
    """The session's media.mkv per segment, and the picture height (for the watermark)."""
    chain = archive.chain(device)
    info = chain.report.session(session) if chain else None
    if chain is None or info is None:
        return [], 0
    media, height = [], 0
    for seq in info.seqs:
        hf = chain.report.chain[seq]
        if hf.header is not None:
            height = max(height, hf.header["streams"]["video"]["height"])
        if hf.payload is None:
            continue
        try:
            members = _members(archive, hf)
        except Exception:  # reported on the session's page; the player gets what decrypts
            continue
        if MEDIA_NAME in members:
            media.append((seq, members[MEDIA_NAME]))
    return media, height


def _has_media(chain: DeviceChain, info: SessionInfo) -> bool:
    for seq in info.seqs:
        h = chain.report.chain[seq].header
        if h is not None and (h["streams"]["video"]["frames"] or h["streams"]["audio"]["samples"]):
            return True
    return False


def load(archive: Archive, device: str, session: str, *, unmasked: bool) -> SessionView | None:
    """Decrypt the session's segments and lay out what the page shows; None if unknown."""
    chain = archive.chain(device)
    info = chain.report.session(session) if chain else None
    if chain is None or info is None:
        return None
    row = next(r for r in archive.sessions() if r.device == device and r.info.session == session)
    d = _decrypt(archive, chain, info)
    origin = d.origin
    start_utc = regulator.origin_utc_ns(chain.report, info, origin)
    text = (lambda s: s) if unmasked else shield
    out_lines = [{"i": n, "t": (r["t_mono_ns"] - origin) / NS, "text": text(r.get("text", "")),
                  "flags": r.get("flags", [])} for n, r in enumerate(d.lines)]
    out_events = []
    for e in d.events:
        kind = e.get("kind", "")
        t = (e["t_mono_ns"] - origin) / NS
        if kind == "session_start":
            pre = e.get("detail", {}).get("preroll_ns")
            out_events.append({"t": t, "kind": kind, "label": TIMELINE_KINDS[kind],
                               "detail": _detail(e.get("detail"), origin)})
            if isinstance(pre, int) and pre > 0:
                out_events.append({"t": t + pre / NS, "kind": "trigger", "label": "trigger",
                                   "detail": ""})
            continue
        if kind in TIMELINE_KINDS:
            out_events.append({"t": t, "kind": kind, "label": TIMELINE_KINDS[kind],
                               "detail": _detail(e.get("detail"), origin)})
    for p in row.problems:
        if "gap" in p or "missing" in p:
            out_events.append({"t": 0.0, "kind": "chain_gap", "label": "chain gap",
                               "detail": shield(p)})
    return SessionView(row, origin, start_utc, out_lines, out_events, _has_media(chain, info),
                       d.content, list(d.notes))


def summary(view: SessionView, tz: tzinfo) -> dict[str, Any]:
    """What the page and GET /api/sessions/... send: masked unless unmasked."""
    row = view.row
    return {
        "device": row.device, "counter": row.counter, "session": row.info.session,
        "start": _when(view.start_utc_ns, tz),
        "duration_s": round(row.info.duration_ns / NS, 3),
        "labels": {k: shield(v) for k, v in row.txn.labels.items()},
        "completeness": shield(row.txn.completeness), "status": row.info.status,
        "verdict": row.verdict,
        "content": "verified" if not view.content_problems else
        f"FAILED: {len(view.content_problems)} problems",
        "problems": [shield(p) for p in row.problems + view.content_problems],
        "notes": view.notes, "lines": view.lines, "events": view.events,
    }
