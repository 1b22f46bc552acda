"""Operation-log source behind the Raspberry Pi Pico serial tap (OpLog interface, backend picotap).

The tap (firmware/tap, MicroPython) listens passively on one or two UART lines of the teller
terminal and sends what it hears over its own USB CDC data interface as tap frames
(dualrec.tapframe; the same codec runs on the Pico). This source reads that port with pyserial on
one daemon thread, decodes the frames, and turns them back into LogLines:

- Channel 0 and 1 payloads (terminal TX and RX) go into one LineFramer each; the raw bytes pass
  through untouched. A line's ``t_mono_ns`` is the tap's stamp of its first byte, mapped onto
  CLOCK_MONOTONIC by TapClock (the tap's crystal, not the box's USB latency, sets the time).
  Lines of channel 1 carry the flag ``rx``; lines holding bytes the tap read with a UART error
  carry ``tap_overrun``/``tap_framing``/``tap_parity``/``tap_break``; the lines either side of a
  loss (a seq gap, a tap reset, an unplugged cable) carry ``tap_gap`` and the one before it is
  closed there (``unterminated``) rather than glued to bytes from after the loss.
- Losses and faults become Events: ``tap_gap`` (missing frames, exactly counted from seq, or a
  reset), ``tap_reset`` (hello frame, seq or ticks going back), ``tap_errors`` (the heartbeat's
  overrun / UART error / dropped-frame counters rose), ``tap_link_errors`` (CRC/COBS/... errors
  on the USB link, at most one event per second with the counts), ``tap_clock`` (the time
  mapping changed mode), ``fault`` (port lost, tap silent) and ``oplog_reconnected`` /
  ``fault_cleared`` when they end. The port is reopened every 0.5 s after a loss, as in
  serial_oplog; "usb:VID:PID[:SERIAL]" is resolved again at every attempt (the ttyACM number of a
  re-plugged Pico changes).

Clock (TapClock): until sync pairs exist, the offset is estimated from arrival times: every
frame arrives after the instant it was stamped, so min(arrival_ns - ticks*1000) over a sliding
window is the tightest upper bound on the offset (a few hundred µs above the truth on an idle
USB bus). Drift is not modelled there: the window is kept short (10 s) so a ±30 ppm crystal
moves the estimate by at most 0.3 ms. When the box
pulses the sync line (``sync_drive`` given, or an outside pulser calling ``sync_pulse(mono_ns)``
at each rising edge), each edge the tap stamps is paired with the pulse nearest to its estimated
time, and a least-squares line (offset and drift) over the last pairs takes over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import serial
import serial.tools.list_ports

from dualrec import tapframe
from dualrec.config import TapProfile
from dualrec.devices.base import DeviceError, EventSink, LogSink
from dualrec.devices.port_reader import PortReader
from dualrec.devices.runtime import Delivery, EventEmitter
from dualrec.oplog_framer import LineFramer
from dualrec.samples import LogLine

log = logging.getLogger(__name__)

REOPEN_INTERVAL_S = 0.5
LINK_ERROR_INTERVAL_NS = 1_000_000_000
SILENT_NS = 3_000_000_000  # three missed heartbeats
SINK_FAULT_INTERVAL_NS = 1_000_000_000
RESET_TICKS_BACK_US = 5_000_000  # ticks going back this far mean a new boot, not reordering
SYNC_MATCH_NS = 100_000_000  # an edge pairs with a pulse within this of its estimated time
SYNC_PENDING_NS = 3_000_000_000  # an unpaired edge or pulse is forgotten after this
_JOIN_TIMEOUT_S = 1.0
_MAX_READ = 65536
_U32 = 0xFFFFFFFF

_LINE_FLAGS = {
    tapframe.FLAG_OVERRUN: "tap_overrun",
    tapframe.FLAG_FRAMING: "tap_framing",
    tapframe.FLAG_PARITY: "tap_parity",
    tapframe.FLAG_BREAK: "tap_break",
}
_ERROR_FIELDS = ("overruns", "uart_errors", "dropped", "sync_lost")


def resolve_port(port: str, comports: Callable[[], Iterable[Any]] | None = None) -> str:
    """A pyserial URL or path for the tap's data port; "usb:VID:PID[:SERIAL]" is looked up.

    The Pico shows two CDC interfaces with one VID:PID: MicroPython's built-in one (interface
    0, the REPL) and the tap's own, added after it (the highest interface number). Paths and
    pyserial URLs ("loop://", "/dev/ttyACM1") are returned unchanged.
    """
    if not port.startswith("usb:"):
        return port
    parts = port[4:].split(":")
    try:
        vid, pid = int(parts[0], 16), int(parts[1], 16)
    except (IndexError, ValueError) as exc:
        raise DeviceError(f"tap port {port!r}: expected usb:VID:PID[:SERIAL]") from exc
    want_serial = parts[2] if len(parts) > 2 and parts[2] else None
    ports = list((comports or serial.tools.list_ports.comports)())
    found = [p for p in ports if p.vid == vid and p.pid == pid
             and (want_serial is None or p.serial_number == want_serial)]
    if not found:
        raise DeviceError(f"tap port {port}: no USB device {vid:04x}:{pid:04x} is connected")
    devices = {(p.location or "").partition(":")[0] for p in found}
    if len(devices) > 1:
        serials = sorted(str(p.serial_number) for p in found)
        raise DeviceError(f"tap port {port}: several devices match (serials {serials}); "
                          "name one as usb:VID:PID:SERIAL")
    best = max(found, key=_interface_number)
    if _interface_number(best) == 0 and len(found) == 1:
        raise DeviceError(f"tap port {port}: only the REPL interface ({best.device}) is there; "
                          "is the tap firmware running?")
    return str(best.device)


def _interface_number(info: Any) -> int:
    """USB interface number from pyserial's location ("1-1.4:1.2" -> 2); 0 if unknown."""
    _, _, itf = (info.location or "").partition(":")
    try:
        return int(itf.rpartition(".")[2])
    except ValueError:
        return 0


def tap_config_json(tap: TapProfile, wdt_ms: int = 5000) -> str:
    """The /tap.json the flashing tool writes to the Pico (read by firmware/tap port.py)."""
    uarts = [((pin + 4) & 8) >> 3 for pin in tap.rx_pins]
    if len(tap.rx_pins) > 2 or len(set(uarts)) != len(uarts):
        raise ValueError(f"tap rx_pins {tap.rx_pins}: at most two, on different UARTs")
    return json.dumps({"uart_baud": tap.uart_baud, "rx_pins": list(tap.rx_pins),
                       "sync_pin": tap.sync_pin, "wdt_ms": wdt_ms}, sort_keys=True)


class TapClock:
    """Maps the tap's extended ticks (µs) to CLOCK_MONOTONIC ns; see the module docstring.

    mode: "none" (nothing known), "arrival" (offset from frame arrival times) or "sync"
    (least squares over sync pairs: offset and drift). Not thread-safe: the reader owns it.
    """

    def __init__(self, max_pairs: int = 120, arrival_window_ns: int = 10_000_000_000,
                 max_drift_ppm: int = 500) -> None:
        self.max_pairs = max_pairs
        self.arrival_window_ns = arrival_window_ns
        self.max_drift_ppm = max_drift_ppm
        self.reset()

    def reset(self) -> None:
        """Forget everything (the tap rebooted: its ticks started again)."""
        self._pairs: deque[tuple[int, int]] = deque(maxlen=self.max_pairs)
        # Sliding-window minimum: (arrival_ns, offset_ns), offsets increasing front to back.
        self._arrivals: deque[tuple[int, int]] = deque()
        self._fit: tuple[int, int, float] | None = None  # x0 µs, y0 ns, slope ns/µs

    @property
    def mode(self) -> str:
        if self._fit is not None:
            return "sync"
        return "arrival" if self._arrivals else "none"

    def add_arrival(self, tap_ticks: int, mono_ns: int) -> None:
        """A frame stamped tap_ticks was read at mono_ns (so it was stamped no later)."""
        offset = mono_ns - tap_ticks * 1000
        arr = self._arrivals
        while arr and arr[-1][1] >= offset:
            arr.pop()
        arr.append((mono_ns, offset))
        while arr[0][0] < mono_ns - self.arrival_window_ns:
            arr.popleft()

    def add_pair(self, tap_ticks: int, mono_ns: int) -> None:
        """The tap stamped tap_ticks for an edge the box made at mono_ns."""
        self._pairs.append((tap_ticks, mono_ns))
        self._refit()

    def _refit(self) -> None:
        pairs = self._pairs
        n = len(pairs)
        x0 = sum(p[0] for p in pairs) // n
        y0 = sum(p[1] for p in pairs) // n
        sxx = sum((p[0] - x0) ** 2 for p in pairs)
        slope = 1000.0
        # Drift needs a baseline: below ten seconds of spread, jitter would dominate it.
        if sxx > 0 and max(p[0] for p in pairs) - min(p[0] for p in pairs) >= 10_000_000:
            sxy = sum((p[0] - x0) * (p[1] - y0) for p in pairs)
            fitted = sxy / sxx
            bound = 1000.0 * self.max_drift_ppm / 1e6
            if abs(fitted - 1000.0) <= bound:
                slope = fitted
        # Centre the line on the mean of the pairs (the residuals sum to zero there).
        mean_x = sum(p[0] for p in pairs) / n
        mean_y = sum(p[1] - y0 for p in pairs) / n
        self._fit = (x0, y0 + round(mean_y - slope * (mean_x - x0)), slope)

    def to_mono(self, tap_ticks: int) -> int:
        if self._fit is not None:
            x0, y0, slope = self._fit
            return y0 + round(slope * (tap_ticks - x0))
        if self._arrivals:
            return tap_ticks * 1000 + self._arrivals[0][1]
        raise ValueError("tap clock: no reference yet")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self._fit is not None:
            out["pairs"] = len(self._pairs)
            out["drift_ppb"] = round((self._fit[2] - 1000.0) * 1e6)
        elif self._arrivals:
            out["offset_ns"] = self._arrivals[0][1]
        return out


@dataclass
class _Channel:
    """A tapped line: its framer and which flags go with the bytes it still buffers."""

    framer: LineFramer
    extra: tuple[str, ...]  # flags every line of this channel carries
    # (byte count, flags) for the buffered bytes, oldest first; a zero count is a marker that
    # applies to the line holding the next byte (e.g. "tap_gap" after a loss).
    segs: deque[list[Any]] = field(default_factory=deque)

    def take(self, n: int) -> set[str]:
        flags: set[str] = set()
        segs = self.segs
        while segs and n > 0:
            seg = segs[0]
            flags |= seg[1]
            if seg[0] <= n:
                n -= seg[0]
                segs.popleft()
            else:
                seg[0] -= n
                n = 0
        return flags


class PicoTapOpLog:
    """Reads the Pico tap's frames through pyserial; see the module docstring."""

    def __init__(
        self,
        tap: TapProfile,
        framer: LineFramer,
        *,
        read_timeout_s: float = 0.05,
        sync_drive: Callable[[bool], None] | None = None,
        sync_period_s: float = 1.0,
        clock: TapClock | None = None,
    ) -> None:
        # A read must return often enough to notice the framer's idle timeout (poll below).
        read_timeout_s = framer.wake_interval_s(read_timeout_s)
        self.tap = tap
        self.port = tap.port
        self.read_timeout_s = read_timeout_s
        self.sync_drive = sync_drive
        self.sync_period_s = sync_period_s
        second = framer.fresh()
        self._chans = [_Channel(framer, ()), _Channel(second, ("rx",))]
        self.clock = clock or TapClock()
        self.decoder = tapframe.Decoder()
        self.heartbeat: dict[str, int] = {}  # the latest one, for diagnostics
        self.hello: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._pulser: threading.Thread | None = None
        self._stop = threading.Event()  # the pulser's; the reader has its own
        self._emit = EventEmitter(f"oplog tap {self.port}")
        self._delivery = Delivery(self._emit, {"device": "oplog", "port": self.port},
                                  SINK_FAULT_INTERVAL_NS)
        self._reader = PortReader(
            f"oplog-tap-{self.port}", self._emit, open_port=self._open,
            on_data=self._on_data, on_lost=self._on_lost, on_reopened=self._on_reopened,
            finish=self._finish, fault_detail={"device": "oplog", "port": self.port},
            read_timeout_s=read_timeout_s, reopen_s=REOPEN_INTERVAL_S, max_read=_MAX_READ)
        self._pulses: deque[int] = deque(maxlen=64)  # appended by the pulser thread
        self._edges: deque[tuple[int, int, int]] = deque(maxlen=64)  # ticks, index, arrival
        self._last_seq: int | None = None
        self._last_ticks: int | None = None
        self._last_frame_ns = 0
        self._silent = False
        self._reported_mode = "none"
        self._reported_errors = dict(self.decoder.errors)
        self._last_link_event_ns: int | None = None
        self.sync_unmatched = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, sink: LogSink, events: EventSink) -> None:
        """Open the tap's port (DeviceError if impossible) and start the reader thread."""
        if self._thread is not None:
            raise DeviceError(f"oplog tap {self.port}: already started")
        self._reader.open()
        self.decoder.reset(joining=True)  # the tap may be mid-frame: its tail is no damage
        self._delivery.sink = sink
        self._emit.events = events
        self._stop.clear()
        self._last_frame_ns = time.monotonic_ns()
        self._thread = self._reader.start()
        if self.sync_drive is not None:
            self._pulser = threading.Thread(target=self._pulse_loop, name="tap-sync", daemon=True)
            self._pulser.start()

    def stop(self) -> None:
        """Stop within about a second; buffered partial lines are delivered first."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        stopped = self._reader.stop(_JOIN_TIMEOUT_S)
        if self._pulser is not None:
            self._pulser.join(_JOIN_TIMEOUT_S)
        if not stopped:
            log.error("oplog tap %s: reader thread did not stop within %.1f s", self.port,
                      _JOIN_TIMEOUT_S)
        self._thread = self._pulser = None

    def sync_pulse(self, mono_ns: int) -> None:
        """Record that the box raised the sync line at mono_ns (any thread may call this)."""
        self._pulses.append(mono_ns)

    # --- reading -----------------------------------------------------------------------------

    def _open(self) -> serial.Serial:
        try:
            return serial.serial_for_url(resolve_port(self.port), baudrate=115200,
                                         timeout=self.read_timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(f"oplog tap port {self.port}: cannot open: {exc}") from exc

    def _on_data(self, data: bytes, t: int) -> None:
        """What one read returned (the reader thread, see port_reader)."""
        if data:
            for frame in self.decoder.feed(data):
                self._frame(frame, t)
        now = time.monotonic_ns()
        for ch in self._chans:  # a pause ends a line without a terminator, on either channel
            self._deliver_lines(ch, ch.framer.poll(now))
        self._periodic(now)

    def _finish(self) -> None:
        now = time.monotonic_ns()
        for ch in self._chans:
            self._deliver_lines(ch, ch.framer.flush(now))

    def _on_lost(self, t: int) -> None:
        self._break_lines()

    def _on_reopened(self, gap_ns: int) -> None:
        self.decoder.reset(joining=True)
        self._last_frame_ns = time.monotonic_ns()
        self._emit("oplog_reconnected", {"gap_ns": gap_ns, "port": self.port})

    # --- frames ------------------------------------------------------------------------------

    def _frame(self, f: tapframe.Frame, arrival_ns: int) -> None:
        if self._silent:
            self._silent = False
            self._emit("fault_cleared", {"device": "oplog", "port": self.port,
                                         "reason": "tap heard again"})
        if self._is_reset(f):
            self._reset(f, arrival_ns)
        elif self._last_seq is not None:
            missing = (f.seq - self._last_seq - 1) & _U32
            if missing:
                self._break_lines()
                self._emit("tap_gap", {"reason": "seq", "missing": missing,
                                       "after_seq": self._last_seq, "seq": f.seq})
        self._last_seq = f.seq
        if self._last_ticks is None or f.ticks > self._last_ticks:
            self._last_ticks = f.ticks
        self._last_frame_ns = arrival_ns
        self.clock.add_arrival(f.ticks, arrival_ns)
        if f.channel in (tapframe.CH_UART0, tapframe.CH_UART1):
            self._uart(self._chans[f.channel], f)
        elif f.channel == tapframe.CH_SYNC:
            if len(f.payload) >= 4:
                index = struct.unpack_from("<I", f.payload)[0]
                self._edges.append((f.ticks, index, arrival_ns))
        elif f.channel == tapframe.CH_HEARTBEAT:
            self._heartbeat(tapframe.parse_heartbeat(f.payload))
        self._match_sync(arrival_ns)
        self._report_clock()

    def _is_reset(self, f: tapframe.Frame) -> bool:
        if f.channel == tapframe.CH_HELLO or f.flags & tapframe.FLAG_FIRST:
            return True
        if self._last_seq is not None and (f.seq - self._last_seq) & _U32 >= 1 << 31:
            return True  # seq went back: a new boot whose hello we lost
        return self._last_ticks is not None and f.ticks < self._last_ticks - RESET_TICKS_BACK_US

    def _reset(self, f: tapframe.Frame, arrival_ns: int) -> None:
        hello = None
        if f.channel == tapframe.CH_HELLO:
            version, fields = tapframe.parse_hello(f.payload)
            hello = {"version": version, **fields}
            self.hello = hello
        if self._last_seq is not None:
            self._break_lines()
            self._emit("tap_gap", {"reason": "reset", "after_seq": self._last_seq,
                                   "gap_ns": arrival_ns - self._last_frame_ns})
        self._emit("tap_reset", {"prev_seq": self._last_seq, "seq": f.seq, "hello": hello})
        self._reported_mode = "none"  # the new boot's clock mode goes on record again
        self._last_seq = None
        self._last_ticks = None
        self.heartbeat = {}
        self.clock.reset()
        self._edges.clear()

    def _uart(self, ch: _Channel, f: tapframe.Frame) -> None:
        flags = {name for bit, name in _LINE_FLAGS.items() if f.flags & bit}
        ch.segs.append([len(f.payload), flags])
        self._deliver_lines(ch, ch.framer.feed(f.payload, self.clock.to_mono(f.ticks)))

    def _break_lines(self) -> None:
        """A loss: close each line at the gap and mark the lines either side of it."""
        now = time.monotonic_ns()
        for ch in self._chans:
            self._deliver_lines(ch, ch.framer.flush(now), also=("tap_gap",))  # before the gap
            ch.segs.clear()
            ch.segs.append([0, {"tap_gap"}])  # and the next line starts after it

    def _heartbeat(self, hb: dict[str, int]) -> None:
        prev, self.heartbeat = self.heartbeat, hb
        if not prev:
            totals = {k: hb[k] for k in _ERROR_FIELDS if hb.get(k)}
            if totals:  # errors from before we listened: on record once
                self._emit("tap_errors", {"since_boot": True, "totals": totals})
            return
        delta = {k: (hb[k] - prev.get(k, 0)) & _U32 for k in _ERROR_FIELDS
                 if k in hb and hb[k] != prev.get(k, 0)}
        if delta:
            self._emit("tap_errors", {"delta": delta,
                                      "totals": {k: hb[k] for k in _ERROR_FIELDS if k in hb}})

    def _match_sync(self, now: int) -> None:
        """Pair sync edges the tap stamped with pulses the box made (nearest within a bound)."""
        if self.clock.mode == "none":
            return
        while self._pulses and self._pulses[0] < now - 2 * SYNC_PENDING_NS:
            self._pulses.popleft()
        keep: deque[tuple[int, int, int]] = deque(maxlen=self._edges.maxlen)
        for ticks, index, arrival in self._edges:
            est = self.clock.to_mono(ticks)
            pulses = list(self._pulses)
            best = min(pulses, key=lambda p: abs(p - est), default=None)
            if best is not None and abs(best - est) <= SYNC_MATCH_NS:
                self.clock.add_pair(ticks, best)
                with contextlib.suppress(ValueError):
                    self._pulses.remove(best)
            elif now - arrival < SYNC_PENDING_NS:
                keep.append((ticks, index, arrival))  # its pulse may not be recorded yet
            else:
                self.sync_unmatched += 1
        self._edges = keep

    def _report_clock(self) -> None:
        mode = self.clock.mode
        if mode != self._reported_mode:
            self._reported_mode = mode
            self._emit("tap_clock", self.clock.describe())

    def _periodic(self, now: int) -> None:
        errors = self.decoder.errors
        if errors != self._reported_errors and (
            self._last_link_event_ns is None
            or now - self._last_link_event_ns >= LINK_ERROR_INTERVAL_NS
        ):
            delta = {k: v - self._reported_errors.get(k, 0) for k, v in errors.items()
                     if v != self._reported_errors.get(k, 0)}
            self._reported_errors = dict(errors)
            self._last_link_event_ns = now
            self._emit("tap_link_errors", {"delta": delta, "totals": dict(errors)})
        if self._edges:
            self._match_sync(now)
        if not self._silent and now - self._last_frame_ns > SILENT_NS:
            self._silent = True
            self._fault(f"tap silent for {(now - self._last_frame_ns) // 1_000_000} ms")

    # --- delivery ----------------------------------------------------------------------------

    def _deliver_lines(self, ch: _Channel, lines: list[LogLine],
                       also: tuple[str, ...] = ()) -> None:
        for line in lines:
            flags = ch.take(len(line.raw))
            flags.update(ch.extra, also)
            if flags - set(line.flags):
                line = replace(line, flags=tuple(sorted(flags.union(line.flags))))
            self._deliver(line)
        for kind, detail in ch.framer.take_events():  # a decode fault starts or ends
            part = f"{detail['part']}_rx" if ch.extra else detail["part"]
            self._emit(kind, {**detail, "part": part, "port": self.port})

    def _deliver(self, line: LogLine) -> None:
        self._delivery(line)

    def _fault(self, reason: str, **extra: Any) -> None:
        self._emit("fault", {"device": "oplog", "port": self.port, "reason": reason, **extra})

    # --- sync pulses -------------------------------------------------------------------------

    def _pulse_loop(self) -> None:
        """Raise the sync line every sync_period_s for 10 ms; the tap stamps the rising edge."""
        drive = self.sync_drive
        assert drive is not None
        while not self._stop.wait(self.sync_period_s):
            try:
                before = time.monotonic_ns()
                drive(True)
                after = time.monotonic_ns()
                self.sync_pulse((before + after) // 2)
                time.sleep(0.01)
                drive(False)
            except Exception as exc:
                log.exception("oplog tap %s: sync pulse failed", self.port)
                self._fault(f"sync pulse failed: {exc!r}")
                self._stop.wait(5.0)
