"""The gateway under measurement, run as its own process by tests.bench.run.

Run as ``python -m tests.bench.gateway_child --site S --clip C --seconds N --out R.json``. It builds
the real Gateway with bench devices (ReplayCamera on the pre-encoded clip, SimMicrophone, the
real SerialOpLog on the site's port), runs it for N seconds in the site's mode, and writes what
it sealed and its own resource use around Gateway.run to R.json. The parent measures the whole
process (wait4); the figures taken here separate the run from interpreter start-up and imports.

Memory: the parent's wait4() gives the largest of this process and each child it waited for,
not their sum, so the figures here add the processes up: the gateway's resident set plus every
descendant's (the age encryption process), sampled every SAMPLE_S, and a bound that cannot miss
a short-lived child's peak entirely: this process's peak (VmHWM) plus the largest VmHWM seen of
a child (one encryption process at a time). Where
the memory goes is read at milestones (VmRSS after the interpreter, after importing each heavy
library, after building the gateway) and, during the run, as the bytes held by the buffers:
the recorder's pre-roll ring, the segmenter's open segments, the seal worker's queue. The heavy
imports are done one by one in main() for that reason, not at the top of this module.
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

# The interpreter alone, before any heavy import (this module's own imports are stdlib).
_RSS_INTERPRETER_KIB = 0
# Imported one at a time in main(), in this order, to see what each adds to the resident set.
HEAVY = ("numpy", "av", "pyrage", "cryptography.hazmat.primitives.asymmetric.ed25519", "httpx",
         "pydantic")


def _cpu_s(ru: resource.struct_rusage) -> float:
    return ru.ru_utime + ru.ru_stime


def _status_kib(field: str, pid: int | str = "self") -> int:
    """A size from /proc/PID/status (VmHWM: peak RSS of that address space, VmRSS: now)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # a child that has just ended
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc/PID/task/TID/children (the kernel's own list)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                todo.append(int(k))
    return out


def _held_bytes(samples: Any) -> int:
    """Payload bytes of a list of samples (video data, PCM, raw log bytes)."""
    total = 0
    for s in list(samples):  # a copy: the capture threads append meanwhile
        data = getattr(s, "data", None) or getattr(s, "pcm", None) or getattr(s, "raw", b"")
        total += len(data)
    return total


class Buffers:
    """Peak bytes held by the gateway's buffers, sampled: payload bytes only (each sample's
    Python object adds ~100 bytes more)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.peak: dict[str, int] = {"preroll_ring": 0, "open_segments": 0, "seal_queue": 0}

    def sample(self) -> None:
        from dualrec.seal_worker import segment_bytes

        gw = self.gateway
        seg = gw.segmenter
        now = {
            "preroll_ring": _held_bytes(getattr(gw.recorder, "_ring", [])),
            "open_segments": sum(segment_bytes(s) for s in (seg.cur, seg.nxt) if s is not None),
            "seal_queue": getattr(gw.sealing, "_bytes", 0),
        }
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)


class Monitor:
    """Samples each Python thread's CPU time from /proc (by native id) twice a second and keeps
    the last reading per thread name, so threads that have ended by the time the run returns
    are still accounted for: an estimate to 1/HZ and 0.5 s, a breakdown, not the total. Also
    keeps the process's RSS every RSS_EVERY_S, to tell steady growth from a plateau."""

    PERIOD_S = 0.5
    RSS_EVERY_S = 5.0
    # The process tree's summed RSS and the buffers: not more often, the sampling holds the GIL
    # too and would make the capture threads late (the bound below covers a child it missed).
    SAMPLE_S = 0.5

    def __init__(self, buffers: Buffers | None = None) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpu_s: dict[str, float] = {}
        self.rss_kib: list[tuple[float, int]] = []
        self.buffers = buffers
        self.tree_peak_kib = 0  # largest sum of VmRSS over this process and its descendants
        self.children_peak_kib: dict[str, int] = {}  # pid:comm -> largest VmHWM seen
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
        next_cpu = time.monotonic() + self.PERIOD_S
        while not self._stop.wait(self.SAMPLE_S):
            self._sample_tree()
            if self.buffers is not None:
                self.buffers.sample()
            if time.monotonic() < next_cpu:
                continue
            next_cpu += self.PERIOD_S
            self._sample()
            t = time.monotonic() - self._t0
            if not self.rss_kib or t - self.rss_kib[-1][0] >= self.RSS_EVERY_S - self.PERIOD_S / 2:
                self.rss_kib.append((round(t, 1), _status_kib("VmRSS")))

    def _sample_tree(self) -> None:
        total = _status_kib("VmRSS")
        for pid in descendants(os.getpid()):
            total += _status_kib("VmRSS", pid)
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            key = f"{pid}:{comm}"
            self.children_peak_kib[key] = max(self.children_peak_kib.get(key, 0),
                                              _status_kib("VmHWM", pid))
        self.tree_peak_kib = max(self.tree_peak_kib, total)

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
    ap.add_argument("--no-rt", action="store_true",
                    help="capture threads keep normal scheduling (as where SCHED_RR is refused)")
    args = ap.parse_args(argv)
    memory = {"interpreter": _RSS_INTERPRETER_KIB}
    import importlib

    for name in HEAVY:
        importlib.import_module(name)
        memory[f"+ {name.split('.')[0]}"] = _status_kib("VmRSS")
    from dualrec.config import load_board, load_site
    from dualrec.devices.factory import Devices
    from dualrec.devices.serial_oplog import SerialOpLog
    from dualrec.gateway import Gateway
    from dualrec.oplog_framer import LineFramer
    from dualrec.sim.microphone import SimMicrophone
    from dualrec.sim.panel import SimPanel
    from dualrec.sim.replay_camera import ReplayCamera

    memory["+ dualrec modules"] = _status_kib("VmRSS")
    if args.no_rt:
        from dualrec.devices import runtime

        runtime._rt_refused = True
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
    memory["+ gateway built (clip loaded)"] = _status_kib("VmRSS")

    threads = Monitor(Buffers(gateway))
    # Thread CPU counts from the thread's creation: the main thread's start-up is taken off.
    threads._sample()
    startup_main = threads.cpu_s.get("MainThread", 0.0)
    threads.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    hwm_before = _status_kib("VmHWM")
    t0 = time.monotonic()
    stats = gateway.run(threading.Event(), args.seconds)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
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
        "memory_milestones_kib": memory,
        "buffers_peak_bytes": threads.buffers.peak if threads.buffers else {},
        "tree_peak_rss_kib": threads.tree_peak_kib,
        "children_peak_rss_kib": threads.children_peak_kib,
        # Upper bound of the summed peak: one encryption process at a time. (Not the reaped
        # children's ru_maxrss: a forked child's counts the gateway's size it was forked from.)
        "summed_peak_rss_bound_kib": _status_kib("VmHWM") + max(
            [0, *threads.children_peak_kib.values()]),
        # This bench's sampling thread: its CPU is the bench's, taken off the run's figures.
        "bench_monitor_cpu_s": thread_cpu.get("bench-threadcpu", 0.0),
        "run_wall_s": wall,
        # The run's CPU counts the processes the gateway started and reaped during it (the age
        # encryption processes): work moved out of the interpreter is still the gateway's.
        "run_user_s": after.ru_utime - before.ru_utime + kids_after.ru_utime
        - kids_before.ru_utime,
        "run_sys_s": after.ru_stime - before.ru_stime + kids_after.ru_stime
        - kids_before.ru_stime,
        "run_cpu_s": _cpu_s(after) - _cpu_s(before) + _cpu_s(kids_after) - _cpu_s(kids_before),
        "run_children_cpu_s": _cpu_s(kids_after) - _cpu_s(kids_before),
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
    _RSS_INTERPRETER_KIB = _status_kib("VmRSS")
    raise SystemExit(main())
