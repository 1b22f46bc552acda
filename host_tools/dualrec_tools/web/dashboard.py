"""The dashboard's figures per box: the storage interface's figures(), an upload rate from the
index, and the box's current faults read from its newest idle segments' events (the receiver
cannot decrypt them; this service holds the identity). Faults during a session are on that
session's timeline, not here. Spool use (% of quota, free) and the fault names the box itself
reported come from its latest state report (PUT /v1/devices/{device}/report); a box that has
not reported says "not reported" rather than a guess.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, tzinfo
from typing import Any

from dualrec.schema import EventRecord
from dualrec.segment_format import parse_header, payload_name
from dualrec.shield import shield
from dualrec_tools.export import decrypt_payload, jsonl
from dualrec_tools.receiver.storage import DeviceReport
from dualrec_tools.web.archive import Archive

NS = 1_000_000_000
FAULT_SCAN = 200  # newest idle fault segments read per box
_FAULT_REASONS = ("fault", "fault_cleared")


def _local(ns: int | None, tz: tzinfo) -> str:
    if ns is None:
        return "never"
    return datetime.fromtimestamp(ns / NS, UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


class Faults:
    """Current faults per box from fault/fault_cleared idle segments, each decrypted once."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._events: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _segment_events(self, device: str, seq: int, sha: str,
                        header: bytes) -> list[dict[str, Any]]:
        """The fault events of one idle segment; [] for any other reason. Cached by the
        header's hash (a stored segment never changes), so a refresh parses only new ones."""
        key = (device, seq, sha)
        with self._lock:
            if key in self._events:
                return self._events[key]
        events: list[dict[str, Any]] = []
        try:
            if parse_header(header)["reason"] in _FAULT_REASONS:
                data = (self.archive.device_dir(device) / payload_name(seq)).read_bytes()
                members = decrypt_payload(data, self.archive.identities)
                events = [e for e in jsonl(members.get("events.jsonl", b""), EventRecord)
                          if e.get("kind") in _FAULT_REASONS]
        except Exception:  # unreadable: the chain's verdict reports it; no fault guessed
            events = []
        with self._lock:
            self._events[key] = events
        return events

    def current(self, device: str) -> list[str]:
        rows = self.archive.store.rows(
            "SELECT seq, header_sha256, header FROM segments WHERE device=? AND session='' AND "
            "payload_stored=1 AND deleted_at IS NULL ORDER BY seq DESC LIMIT ?",
            device, FAULT_SCAN)
        active: dict[tuple[str, str], str] = {}
        for r in reversed(rows):
            for e in self._segment_events(device, r["seq"], r["header_sha256"],
                                          bytes(r["header"])):
                d = e.get("detail") or {}
                part = (str(d.get("device", "?")), str(d.get("part", "")))
                if e["kind"] == "fault":
                    active[part] = str(d.get("reason", ""))
                else:
                    active.pop(part, None)
        if rows:  # forget what fell out of the window: the cache stays bounded
            low = rows[-1]["seq"]
            with self._lock:
                for key in [k for k in self._events if k[0] == device and k[1] < low]:
                    del self._events[key]
        return [shield(f"{dev}{'/' + part if part else ''}: {why}")
                for (dev, part), why in sorted(active.items())]


def spool_text(report: DeviceReport | None) -> str:
    """The box's reported spool use: "% of quota, free", or "not reported"."""
    if report is None:
        return "not reported"
    ratio = report.used_ratio
    used = "no quota" if ratio is None else f"{ratio * 100:.0f} % of quota"
    return f"{used}, {report.spool_free_bytes / 2**30:.1f} GiB free"


def rows(archive: Archive, faults: Faults, alert_after_s: float, tz: tzinfo) -> list[dict]:
    now = time.time_ns()
    out = []
    for f in archive.store.figures():
        silent_s = None if f.last_contact_ns is None else max(0, now - f.last_contact_ns) / NS
        cert_days = None if f.cert_not_after_ns is None else \
            (f.cert_not_after_ns - now) / NS / 86400
        out.append({
            "device": f.device, "counter": archive.counters.get(f.device),
            "last_contact": _local(f.last_contact_ns, tz),
            "silent_s": None if silent_s is None else round(silent_s, 1),
            "silent": silent_s is None or silent_s > alert_after_s,
            "backlog": f.backlog, "headers": f.headers, "payloads": f.payloads,
            "upload_rate_bps": round(archive.upload_rate(f.device)),
            "clock": "no header yet" if f.clock_synced is None else
            ("synced" if f.clock_synced else "NOT synced"),
            "clock_error_ms": None if f.clock_error_ns in (None, -1) else
            round(f.clock_error_ns / 1e6, 3),
            "spool": spool_text(f.report),
            "faults": faults.current(f.device),
            "reported_faults": None if f.report is None else list(f.report.faults),
            "gaps": [f"{a}..{b}" if a != b else str(a) for a, b in archive.gaps(f.device)],
            "missing": f.missing, "forks": f.forks,
            "problems": {k: v for k, v in f.problems.items()},
            "firmware": f.firmware or "unknown",
            "cert_expiry": "unknown" if f.cert_not_after_ns is None else
            _local(f.cert_not_after_ns, tz),
            "cert_days": None if cert_days is None else round(cert_days, 1),
            "deleted": f.deleted,
        })
    return out
