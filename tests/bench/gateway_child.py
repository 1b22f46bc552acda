"""The gateway under measurement, run as its own process by tests.bench.run.

Run as ``python -m tests.bench.gateway_child --site S --clip C --seconds N --out R.json``. It builds
the real Gateway with bench devices (ReplayCamera on the pre-encoded clip, SimMicrophone, the
real SerialOpLog on the site's port), runs it for N seconds in the site's mode, and writes what
it sealed and its own resource use around Gateway.run to R.json. The parent measures the whole
process (wait4); the figures taken here separate the run from interpreter start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dualrec.config import load_board, load_site
from dualrec.devices.factory import Devices
from dualrec.devices.serial_oplog import SerialOpLog
from dualrec.gateway import Gateway
from dualrec.oplog_framer import LineFramer
from dualrec.sim.microphone import SimMicrophone
from dualrec.sim.panel import SimPanel
from dualrec.sim.replay_camera import ReplayCamera


def _cpu_s(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def _status_kib(field: str) -> int:
    """A size from /proc/self/status (VmHWM: peak RSS of this address space, VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Monitor:
    """Samples each Python thread's CPU time from /proc (by native id) twice a second and keeps
    the last reading per thread name, so threads that have ended by the time the run returns
    are still accounted for: an estimate to 1/HZ and 0.5 s, a breakdown, not the total. Also
    keeps the process's RSS every RSS_EVERY_S, to tell steady growth from a plateau."""

    PERIOD_S = 0.5
    RSS_EVERY_S = 5.0

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpu_s: dict[str, float] = {}
        self.rss_kib: list[tuple[float, int]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-threadcpu", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return dict(sorted(self.cpu_s.items(), key=lambda kv: -kv[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD_S):
            self._sample()
            t = time.monotonic() - self._t0
            if not self.rss_kib or t - self.rss_kib[-1][0] >= self.RSS_EVERY_S - self.PERIOD_S / 2:
                self.rss_kib.append((round(t, 1), _status_kib("VmRSS")))

    def _sample(self) -> None:
        for t in threading.enumerate():
            if t.native_id is None:
                continue
            try:
                stat = Path(f"/proc/self/task/{t.native_id}/stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised name; utime and stime are the 14th and 15th.
            fields = stat[stat.rindex(")") + 2 :].split()
            self.cpu_s[t.name] = (int(fields[11]) + int(fields[12])) / self.tick


class LatencyTap:
    """Wraps a camera or microphone to note, per sample, how long after its capture stamp it
    reached the gateway's queue. A source thread held up (by the GIL, say) shows here before it
    shows as dropped frames, and with a margin: the worst case is what a slower CPU hits."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.format = device.format
        self.late_ns: list[int] = []

    def start(self, sink: Callable[[Any], None], events: Callable[[Any], None]) -> None:
        late = self.late_ns

        def tapped(sample: Any) -> None:
            late.append(time.monotonic_ns() - sample.t_mono_ns)
            sink(sample)

        self.device.start(tapped, events)

    def stop(self) -> None:
        self.device.stop()

    def summary_ms(self, minus_ns: int = 0) -> dict[str, float]:
        """Max and 99th percentile of the delay, less minus_ns (an audio block's own length)."""
        if not self.late_ns:
            return {}
        ordered = sorted(self.late_ns)
        p99 = ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]
        return {"max": (ordered[-1] - minus_ns) / 1e6, "p99": (p99 - minus_ns) / 1e6}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.gateway_child", description=__doc__)
    ap.add_argument("--board", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--clip", type=Path, required=True, help="Annex B H.264 stream to loop")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    board = load_board(args.board)
    site = load_site(args.site)
    camera = ReplayCamera.from_annexb(args.clip.read_bytes(), args.width, args.height, args.fps)
    mic = board.microphone
    microphone = SimMicrophone(rate=mic.rate, channels=mic.channels,
                               block_frames=mic.block_frames,
                               clap_period_ms=board.sim.clap_period_ms if board.sim else 7000)
    framer = LineFramer(site.oplog.encoding, site.oplog.line_end.encode(), site.oplog.max_line)
    oplog = SerialOpLog(site.oplog.port, site.oplog.baud, framer)
    cam_tap, mic_tap = LatencyTap(camera), LatencyTap(microphone)
    gateway = Gateway(board, site, devices=Devices(cam_tap, mic_tap, oplog, SimPanel()))

    threads = Monitor()
    # Thread CPU counts from the thread's creation: the main thread's start-up is taken off.
    threads._sample()
    startup_main = threads.cpu_s.get("MainThread", 0.0)
    threads.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    hwm_before = _status_kib("VmHWM")
    t0 = time.monotonic()
    stats = gateway.run(threading.Event(), args.seconds)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    thread_cpu = threads.stop()
    thread_cpu["MainThread"] = thread_cpu.get("MainThread", 0.0) - startup_main

    recorded_ns = frames = drops = samples = lines = line_bytes = payload = 0
    sessions: set[str] = set()
    drops_by_seq: dict[int, int] = {}
    reasons: dict[str, int] = {}
    for sealed in stats.sealed:
        h = sealed.header
        reasons[h["reason"]] = reasons.get(h["reason"], 0) + 1
        payload += h["payload"]["size"]
        if not h["session"]:
            continue  # an event-only segment records no media time
        sessions.add(h["session"])
        recorded_ns += h["end"]["mono_ns"] - h["start"]["mono_ns"]
        s = h["streams"]
        frames += s["video"]["frames"]
        drops += s["video"]["drops"]
        if s["video"]["drops"]:
            drops_by_seq[h["seq"]] = s["video"]["drops"]
        samples += s["audio"]["samples"]
        lines += s["oplog"]["lines"]
        line_bytes += s["oplog"]["bytes"]
    headers = sum(p.header_path.stat().st_size for p in stats.sealed)
    result = {
        "run_wall_s": wall,
        "run_user_s": after.ru_utime - before.ru_utime,
        "run_sys_s": after.ru_stime - before.ru_stime,
        "run_cpu_s": _cpu_s(after) - _cpu_s(before),
        "startup_cpu_s": _cpu_s(before),
        "rss_before_run_kib": hwm_before,
        "peak_rss_kib": _status_kib("VmHWM"),
        "rss_end_kib": _status_kib("VmRSS"),
        "recorded_s": recorded_ns / 1e9,
        "segments": len(stats.sealed),
        "segment_reasons": reasons,
        "seal_failures": stats.seal_failures,
        "sessions": len(sessions),
        "payload_bytes": payload,
        "header_bytes": headers,
        "video_frames": frames,
        "video_drops": drops,
        "video_drops_by_seq": drops_by_seq,
        "thread_cpu_s": thread_cpu,
        "rss_timeline_kib": threads.rss_kib,
        "camera_late_ms": cam_tap.summary_ms(),
        # A block is handed over after its last sample: its own length is not lateness.
        "microphone_late_ms": mic_tap.summary_ms(mic.block_frames * 1_000_000_000 // mic.rate),
        "camera_delivered": camera.delivered,
        "audio_samples": samples,
        "oplog_lines": lines,
        "oplog_bytes": line_bytes,
        "spool": str(site.spool.dir),
    }
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
