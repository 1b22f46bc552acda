"""Operation-log source on a serial line read directly with pyserial (the OpLog interface).

One daemon thread owns the port: it stamps each read with CLOCK_MONOTONIC the moment bytes
arrive, feeds the LineFramer and pushes finished lines to the sink. The line survives a vanished
port (USB adapter unplugged, simulated terminal restarted): a fault event is recorded, the port
is reopened every 0.5 s until stop(), and the reconnection is recorded with the length of the
gap. The port spec is resolved afresh on every open (dualrec.devices.serial_ports: a path, a
/dev/serial/by-id link, "usb:VID:PID[:SERIAL]" or a pyserial URL such as "loop://"), so an
adapter replugged as another /dev/ttyUSBn is found again.

Line errors. pyserial cannot tell which bytes arrived with a parity or framing error, or that a
BREAK came: by default Linux passes such bytes on unmarked (or drops them). On a real tty this
module therefore sets termios INPCK and PARMRK (and clears IGNPAR, IGNBRK, BRKINT, ISTRIP) after
pyserial has configured the port. The line discipline (n_tty) then delivers a byte received with
a parity or framing error as \xff \x00 X, a BREAK as \xff \x00 \x00, and a genuine \xff
doubled. ParmrkDecoder undoes that marking, so the stream handed to the framer is exactly the
bytes the UART received (a BREAK is the 0x00 character the UART reads for it), and each marked
byte is recorded as Event("oplog_line_error", kind=...) and its line flagged "line_error".
n_tty marks parity and framing errors alike; the kind is told apart with the driver's error
counters (ioctl TIOCGICOUNT: frame, parity, brk, overrun, as the 8250/PL011 and most USB serial
drivers keep them). Where there are no counters (a pty) it is "framing" when the line has no
parity, else "parity_or_framing". The counters also reveal overruns (bytes lost in the UART or
the tty buffer, which leave no mark in the stream): kind "overrun". Events are limited to one per
kind per second, each with the count it stands for.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import struct
import termios
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import serial

from dualrec.devices.base import DeviceError, EventSink, LogSink
from dualrec.devices.port_reader import PortReader
from dualrec.devices.runtime import Delivery, EventEmitter
from dualrec.devices.serial_ports import parity_code, resolve_port
from dualrec.oplog_framer import LineFramer
from dualrec.samples import LogLine

log = logging.getLogger(__name__)

REOPEN_INTERVAL_S = 0.5
SINK_FAULT_INTERVAL_NS = 1_000_000_000
_JOIN_TIMEOUT_S = 1.0
_MAX_READ = 65536
LINE_ERROR_EVENT_INTERVAL_NS = 1_000_000_000
LINE_ERROR_FLAG = "line_error"

# struct serial_icounter_struct (linux/serial.h): cts dsr rng dcd rx tx frame overrun parity brk
# buf_overrun reserved[9]
_ICOUNT = struct.Struct("20i")
_TIOCGICOUNT = getattr(termios, "TIOCGICOUNT", 0x545D)


@dataclass(frozen=True, slots=True)
class LineError:
    """One byte marked by the line discipline, at offset in the bytes feed() returned with it."""

    offset: int
    byte: int  # the byte received with the error (0 for a BREAK)
    kind: str  # "break" or "parity_or_framing" until the counters say more


class ParmrkDecoder:
    """Undo termios PARMRK marking in a byte stream that arrives in arbitrary chunks.

    \xff \xff -> \xff; \xff \x00 X -> X, with a LineError (X = 0: a BREAK, or a NUL received
    with an error). Anything else after \xff cannot come from n_tty and is kept as it is.
    """

    def __init__(self) -> None:
        self._pending = b""  # the start of a mark split across chunks

    def feed(self, data: bytes) -> tuple[bytes, list[LineError]]:
        data = self._pending + data
        self._pending = b""
        if b"\xff" not in data:
            return data, []
        out = bytearray()
        errors: list[LineError] = []
        i, n = 0, len(data)
        while i < n:
            j = data.find(b"\xff", i)
            if j < 0:
                out += data[i:]
                break
            out += data[i:j]
            if j + 1 >= n or (data[j + 1] == 0 and j + 2 >= n):
                self._pending = data[j:]  # wait for the rest of the mark
                break
            nxt = data[j + 1]
            if nxt == 0xFF:
                out.append(0xFF)
                i = j + 2
            elif nxt == 0:
                x = data[j + 2]
                errors.append(LineError(len(out), x, "break" if x == 0 else "parity_or_framing"))
                out.append(x)
                i = j + 3
            else:
                out += data[j:j + 2]
                i = j + 2
        return bytes(out), errors

    def flush(self) -> bytes:
        """The stream ended inside a mark: keep its bytes as they came."""
        rest, self._pending = self._pending, b""
        return rest


def _enable_parmrk(ser: Any) -> int | None:
    """Mark line errors in-band on a real tty; its fd, or None where that is impossible."""
    try:
        fd = ser.fileno()
        attrs = termios.tcgetattr(fd)
    except Exception:  # a URL handler (loop://, socket://) has no tty under it
        return None
    attrs[0] |= termios.INPCK | termios.PARMRK
    attrs[0] &= ~(termios.IGNPAR | termios.IGNBRK | termios.BRKINT | termios.ISTRIP)
    try:
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        return None
    return int(fd)


def _icount(fd: int | None) -> dict[str, int] | None:
    """The driver's error counters, or None (a pty, a driver without them)."""
    if fd is None:
        return None
    try:
        raw = fcntl.ioctl(fd, _TIOCGICOUNT, bytes(_ICOUNT.size))
    except OSError:
        return None
    v = _ICOUNT.unpack(raw)
    return {"frame": v[6], "overrun": v[7], "parity": v[8], "brk": v[9], "buf_overrun": v[10]}


class SerialOpLog:
    """Reads the teller terminal's log line through pyserial; see the module docstring."""

    def __init__(
        self,
        port: str,
        baud: int,
        framer: LineFramer,
        *,
        bytesize: int = serial.EIGHTBITS,
        parity: str = serial.PARITY_NONE,
        stopbits: float = serial.STOPBITS_ONE,
        read_timeout_s: float = 0.05,
        line_errors: bool | None = None,
    ) -> None:
        """port: a spec as serial_ports.resolve_port takes it; parity as pyserial ("E") or as
        the site config names it ("even"). line_errors: None marks them wherever the port is a
        tty; True decodes PARMRK marks even where they could not be enabled (tests)."""
        # A read must return often enough to notice the framer's idle timeout (poll below).
        read_timeout_s = framer.wake_interval_s(read_timeout_s)
        self.port = port
        self.baud = baud
        self.framer = framer
        self.bytesize = bytesize
        self.parity = parity_code(parity)
        self.stopbits = stopbits
        self.read_timeout_s = read_timeout_s
        self.line_errors = line_errors
        self.device: str | None = None  # what the spec resolved to at the last open
        self._fd: int | None = None
        self._decoder: ParmrkDecoder | None = None
        self._counters: dict[str, int] | None = None
        self._fed = 0  # decoded bytes handed to the framer
        self._delivered = 0  # raw bytes of the lines delivered
        self._marks: deque[int] = deque()  # stream offsets whose line gets LINE_ERROR_FLAG
        self._err_last_ns: dict[str, int] = {}
        self._err_held: dict[str, tuple[int, dict[str, Any]]] = {}  # kind -> (count, detail)
        self._thread: threading.Thread | None = None
        self._emit_at = EventEmitter(f"oplog {port}")
        self._delivery = Delivery(self._emit_at, {"device": "oplog", "port": port},
                                  SINK_FAULT_INTERVAL_NS)
        self._reader = PortReader(
            f"oplog-{port}", self._emit_at, open_port=self._open_port, on_data=self._on_data,
            on_lost=self._on_lost, on_reopened=self._on_reopened, finish=self._finish,
            fault_detail={"device": "oplog", "port": port}, read_timeout_s=read_timeout_s,
            reopen_s=REOPEN_INTERVAL_S, max_read=_MAX_READ)

    def start(self, sink: LogSink, events: EventSink) -> None:
        """Open the port (DeviceError if impossible) and start the reader thread."""
        if self._thread is not None:
            raise DeviceError(f"oplog {self.port}: already started")
        self._reader.open()
        self._delivery.sink = sink
        self._emit_at.events = events
        self._thread = self._reader.start()

    def stop(self) -> None:
        """Stop reading within about a second; the buffered partial line is delivered first."""
        if self._thread is None:
            return
        if not self._reader.stop(_JOIN_TIMEOUT_S):
            log.error(
                "oplog %s: reader thread did not stop within %.1f s", self.port, _JOIN_TIMEOUT_S
            )
        self._thread = None

    @property
    def serial_port(self) -> serial.Serial | None:
        """The open pyserial port, if any (diagnostics; tests write into loop:// through it)."""
        return self._reader.port

    def _open(self) -> serial.Serial:
        # Resolved on every open: after a replug the adapter may be another /dev/ttyUSBn.
        device = resolve_port(self.port)
        try:
            ser = serial.serial_for_url(
                device,
                baudrate=self.baud,
                bytesize=self.bytesize,
                parity=self.parity,
                stopbits=self.stopbits,
                timeout=self.read_timeout_s,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            where = self.port if device == self.port else f"{self.port} ({device})"
            raise DeviceError(f"oplog port {where}: cannot open: {exc}") from exc
        self.device = device
        return ser

    def _open_port(self) -> serial.Serial:
        """Open, and set up line-error marking on what was opened."""
        ser = self._open()
        fd = _enable_parmrk(ser) if self.line_errors is not False else None
        self._fd = fd
        self._decoder = ParmrkDecoder() if fd is not None or self.line_errors else None
        self._counters = _icount(fd)
        return ser

    def _on_data(self, data: bytes, t: int) -> None:
        """What one read returned (the reader thread, see port_reader)."""
        if not data:
            if self._err_held:  # a burst of errors that stopped: its count is due
                self._flush_line_errors(due_only=True)
            self._deliver(self.framer.poll(t))  # a pause ends the line without a terminator
            return
        self._feed(data, t)

    def _finish(self) -> None:
        """The reader ends: what is buffered is delivered before the port closes."""
        self._flush_decoder(time.monotonic_ns())
        self._deliver(self.framer.flush(time.monotonic_ns()))
        self._flush_line_errors()

    def _feed(self, data: bytes, t: int) -> None:
        """Decode line-error marks (if on), note them, and hand the bytes to the framer."""
        start = self._fed
        if self._decoder is not None:
            data, errors = self._decoder.feed(data)
            counters = _icount(self._fd) if self._fd is not None else None
            self._line_errors(errors, start, counters, t)
        self._fed += len(data)
        self._deliver(self.framer.feed(data, t))

    def _line_errors(self, errors: list[LineError], start: int,
                     counters: dict[str, int] | None, t: int) -> None:
        delta: dict[str, int] = {}
        if counters is not None and self._counters is not None:
            delta = {k: counters[k] - self._counters[k] for k in counters}
        if counters is not None:
            self._counters = counters
        lost = delta.get("overrun", 0) + delta.get("buf_overrun", 0)
        if lost > 0:
            # Bytes lost in the UART FIFO or the tty buffer leave no mark: flag where they were.
            self._marks.append(start)
            self._report_error("overrun", lost, t, {})
        for err in errors:
            self._marks.append(start + err.offset)
            detail: dict[str, Any] = {} if err.kind == "break" and err.byte == 0 else {
                "byte": err.byte}
            self._report_error(self._classify(err, delta), 1, t, detail)

    def _classify(self, err: LineError, delta: dict[str, int]) -> str:
        parity, frame, brk = delta.get("parity", 0), delta.get("frame", 0), delta.get("brk", 0)
        if err.byte == 0 and (brk > 0 or not (parity or frame)):
            return "break"
        if delta:
            if parity > 0 and frame == 0:
                return "parity"
            if frame > 0 and parity == 0:
                return "framing"
        if self.parity == serial.PARITY_NONE:
            return "framing"  # no parity on the line: a marked byte can only be misframed
        return "parity_or_framing"

    def _report_error(self, kind: str, count: int, t: int, detail: dict[str, Any]) -> None:
        held_count, held_detail = self._err_held.get(kind, (0, detail))
        count += held_count
        last = self._err_last_ns.get(kind)
        if last is not None and t - last < LINE_ERROR_EVENT_INTERVAL_NS:
            # A cut or floating line makes thousands a second; one event a second, counted.
            self._err_held[kind] = (count, held_detail)
            return
        self._err_held.pop(kind, None)
        self._err_last_ns[kind] = t
        self._emit_at("oplog_line_error", {"kind": kind, "count": count, "port": self.port,
                                           "device": self.device, **held_detail}, t)

    def _flush_line_errors(self, *, due_only: bool = False) -> None:
        """Record the counts held back by the rate limit (all of them, or those now due)."""
        now = time.monotonic_ns()
        for kind, (count, detail) in list(self._err_held.items()):
            if due_only and now - self._err_last_ns.get(kind, 0) < LINE_ERROR_EVENT_INTERVAL_NS:
                continue
            del self._err_held[kind]
            self._err_last_ns[kind] = now
            self._emit_at("oplog_line_error", {"kind": kind, "count": count,
                                               "port": self.port, "device": self.device,
                                               **detail}, now)

    def _on_lost(self, t: int) -> None:
        """The port failed mid-run (the fault is on record; the reader closes and reopens)."""
        # Bytes after the gap belong to a different line than the ones before it; joining them
        # would forge a line the terminal never sent, so the partial line is closed here.
        self._flush_decoder(t)
        self._deliver(self.framer.flush(t))
        self._fd = None

    def _flush_decoder(self, t: int) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._fed += len(rest)
                self._deliver(self.framer.feed(rest, t))

    def _on_reopened(self, gap_ns: int) -> None:
        self._emit_at("oplog_reconnected", {"gap_ns": gap_ns, "device": self.device})

    def _deliver(self, lines: list[LogLine]) -> None:
        for line in [self._flag(line) for line in lines]:
            self._delivery(line)
        for kind, detail in self.framer.take_events():  # a decode fault starts or ends
            self._emit_at(kind, {**detail, "port": self.port})

    def _flag(self, line: LogLine) -> LogLine:
        """Add LINE_ERROR_FLAG to a line holding a marked byte (or sitting on lost bytes)."""
        end = self._delivered + len(line.raw)
        self._delivered = end
        hit = False
        while self._marks and self._marks[0] < end:
            self._marks.popleft()
            hit = True
        if not hit:
            return line
        return dataclasses.replace(line, flags=tuple(sorted({*line.flags, LINE_ERROR_FLAG})))
