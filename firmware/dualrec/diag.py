"""`dualrec diag`: check each device of the box, pass or fail with the reason.

Camera (a decodable keyframe arrives), microphone (blocks arrive; level in dBFS), operation log
(the port opens; lines decode and a start or stop line is recognised), clock (source, synced,
estimated error; RTC against the system clock where the board has one), spool disk (free space
against the quota), receiver (TLS with the device's certificate, its status answer). Each check
is bounded in time, so a dead device fails instead of hanging the technician.
"""

from __future__ import annotations

import contextlib
import math
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from dualrec.config import BoardProfile, SiteConfig
from dualrec.devices.base import DeviceError
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name:<12} {self.detail}"


def _collect(start: Callable[[Callable, Callable], None], stop: Callable[[], None],
             seconds: float, enough: Callable[[list], bool]) -> tuple[list, list[Event]]:
    samples: queue.Queue = queue.Queue()
    events: list[Event] = []
    start(samples.put, events.append)
    got: list = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not enough(got):
            with contextlib.suppress(queue.Empty):
                got.append(samples.get(timeout=0.05))
    finally:
        stop()
    return got, events


def check_camera(board: BoardProfile, seconds: float = 5) -> Check:
    from dualrec.devices.factory import build_camera

    try:
        cam = build_camera(board)
        if cam is None:
            return Check("camera", True, "none on this board")
        got, events = _collect(cam.start, cam.stop, seconds,
                               lambda g: any(isinstance(p, VideoPacket) and p.keyframe for p in g)
                               and len(g) >= 3)
    except DeviceError as exc:
        return Check("camera", False, str(exc))
    faults = [e.detail for e in events if e.kind == "fault"]
    keys = [p for p in got if isinstance(p, VideoPacket) and p.keyframe]
    if faults or not keys:
        return Check("camera", False, f"no keyframe within {seconds:.0f} s {faults or ''}".strip())
    import av

    try:
        codec = av.CodecContext.create("h264", "r")
        frames = [f for p in got for f in codec.decode(av.Packet(p.data))]
    except av.FFmpegError as exc:
        return Check("camera", False, f"frames do not decode: {exc}")
    f = cam.format
    return Check("camera", bool(frames), f"{len(got)} frames, {f.width}x{f.height}@{f.fps}, "
                 f"{len(frames)} decoded")


def check_microphone(board: BoardProfile, seconds: float = 2) -> Check:
    from dualrec.devices.factory import build_microphone

    try:
        mic = build_microphone(board)
        if mic is None:
            return Check("microphone", True, "none on this board")
        rate = mic.format.rate
        got, events = _collect(mic.start, mic.stop, seconds + 1,
                               lambda g: sum(b.frames for b in g) >= rate * seconds)
    except DeviceError as exc:
        return Check("microphone", False, str(exc))
    blocks = [b for b in got if isinstance(b, AudioBlock)]
    if not blocks:
        return Check("microphone", False, f"no audio within {seconds + 1:.0f} s")
    import numpy as np

    pcm = np.frombuffer(b"".join(b.pcm for b in blocks), "<i2").astype(np.float64)
    rms = math.sqrt(float(np.mean(pcm**2))) if pcm.size else 0.0
    dbfs = 20 * math.log10(rms / 32768) if rms > 0 else -math.inf
    overflows = sum(b.overflow for b in blocks)
    ok = dbfs > -90 and not [e for e in events if e.kind == "fault"]
    why = "" if dbfs > -90 else " (digital silence: muted or unplugged?)"
    return Check("microphone", ok, f"{pcm.size / rate / mic.format.channels:.1f} s, "
                 f"level {dbfs:.0f} dBFS, {overflows} overflows{why}")


def check_oplog(board: BoardProfile, site: SiteConfig, seconds: float = 10) -> Check:
    """Open the port and read for up to `seconds`, until a start or stop line shows the
    encoding and the patterns are right. FAIL when most lines with non-ASCII bytes do not
    decode, or when lines came but none matched a start or stop pattern (a UTF-8 terminal read
    as GB18030, Big5 read as GB18030 by auto, patterns of another terminal: each records no
    session at all). No lines: PASS with a hint (the terminal may be idle)."""
    import re

    from dualrec.devices.factory import build_oplog

    patterns = [re.compile(p) for p in (*site.oplog.start_patterns, *site.oplog.stop_patterns)]

    def matches(line: object) -> bool:
        return isinstance(line, LogLine) and any(p.search(line.text) for p in patterns)

    try:
        oplog = build_oplog(board, site)
        if oplog is None:
            return Check("oplog", True, "none on this board")
        got, events = _collect(oplog.start, oplog.stop, seconds,
                               lambda g: bool(g) and matches(g[-1]))
    except DeviceError as exc:
        return Check("oplog", False, str(exc))
    lines = [x for x in got if isinstance(x, LogLine)]
    # A decode fault is judged below from the lines themselves; any other is the port's.
    faults = [e.detail for e in events if e.kind == "fault"
              and not str(e.detail.get("part", "")).startswith("decode")]
    if faults:
        return Check("oplog", False, f"{faults[0]}")
    enc = site.oplog.encoding
    if not lines:
        return Check("oplog", True, f"port open; no lines in {seconds:.0f} s (terminal idle? "
                     "run a transaction during diag to check encoding and patterns)")
    informative = [x for x in lines if not x.raw.isascii()]
    bad = sum("decode_error" in x.flags for x in informative)
    flagged = sum(bool(x.flags) for x in lines)
    seen = f"{len(lines)} lines ({flagged} flagged)"
    if informative and bad * 2 > len(informative):
        return Check("oplog", False, f"{seen}: {bad} of {len(informative)} lines with "
                     f"non-ASCII bytes do not decode as {enc}: wrong encoding? "
                     "(site config [oplog] encoding)")
    if not any(matches(x) for x in lines):
        # The lines' text is not shown: it may hold a customer's numbers.
        return Check("oplog", False, f"{seen} in {seconds:.0f} s, none matches a start or stop "
                     f"pattern read as {enc}: wrong encoding or patterns? (site config "
                     "[oplog] encoding, start_patterns, stop_patterns; run a transaction "
                     "during diag)")
    return Check("oplog", True, f"port open; {seen}, a start or stop line read as {enc}")


def check_clock(board: BoardProfile) -> Check:
    from dualrec.timebase import kernel_sync_state

    source, sync_state = "system", kernel_sync_state
    if board.clock.source == "rtc" or board.clock.chrony:
        try:
            from dualrec.devices.clock import ClockQuality

            quality = ClockQuality(board.clock)
            source, sync_state = quality.source, quality.sync_state
        except (DeviceError, OSError) as exc:
            return Check("clock", False, str(exc))
    synced, err = sync_state()
    bound = "unknown" if err < 0 else f"{err / 1e6:.1f} ms"
    text = f"source {source}, " + (f"synced, est. error {bound}" if synced
                                   else "NOT synced: UTC in headers is marked unsynced")
    return Check("clock", synced or board.clock.source == "system", text)


def check_disk(site: SiteConfig) -> Check:
    site.spool.dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(site.spool.dir)
    free_mb = usage.free // 2**20
    ok = free_mb > site.spool.min_free_mb
    return Check("disk", ok, f"{free_mb} MiB free at {site.spool.dir} "
                 f"(minimum {site.spool.min_free_mb} MiB, quota {site.spool.quota_mb} MiB)")


def check_receiver(site: SiteConfig) -> Check:
    if site.uplink is None:
        return Check("receiver", True, "no [uplink] configured")
    import httpx

    from dualrec.uplink import client_ssl_context

    url = f"{site.uplink.url.rstrip('/')}/v1/devices/{site.device.id}/status"
    try:
        r = httpx.get(url, verify=client_ssl_context(site.uplink), timeout=5)
    except (httpx.HTTPError, OSError) as exc:
        return Check("receiver", False, f"{site.uplink.url}: {exc}")
    if r.status_code != 200:
        return Check("receiver", False, f"{site.uplink.url}: HTTP {r.status_code} {r.text[:120]}")
    st = r.json()
    return Check("receiver", True, f"{site.uplink.url}: enrolled, highest seq "
                 f"{st.get('highest_seq')}, {len(st.get('waiting', []))} waiting")


def check_gateway(site: SiteConfig) -> Check | None:
    """The faults the running gateway has on record now (its status file), or None when no
    gateway runs (no file, or one left by a gateway that is gone)."""
    import json
    import os

    from dualrec.supervision import STATUS_NAME

    path = site.spool.state.parent / STATUS_NAME
    try:
        doc = json.loads(path.read_text())
        os.kill(int(doc["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    faults = doc.get("faults", [])
    if not faults:
        return Check("gateway", True, f"running (pid {doc['pid']}), no fault")
    now = time.monotonic_ns()
    listed = "; ".join(f"{f['key']}: {f['reason']} (for {(now - f['since_mono_ns']) // 10**9} s)"
                       for f in faults)
    return Check("gateway", False, f"running (pid {doc['pid']}) with {len(faults)} fault(s): "
                 f"{listed}")


def run_all(board: BoardProfile, site: SiteConfig) -> list[Check]:
    checks = [check_camera(board), check_microphone(board), check_oplog(board, site),
              check_clock(board), check_disk(site), check_receiver(site)]
    gateway = check_gateway(site)
    return checks + ([gateway] if gateway is not None else [])
