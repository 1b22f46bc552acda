"""Operation-log source on a serial line read directly with pyserial (the OpLog interface).

One daemon thread owns the port: it stamps each read with CLOCK_MONOTONIC the moment bytes
arrive, feeds the LineFramer and pushes finished lines to the sink. The line survives a vanished
port (USB adapter unplugged, simulated terminal restarted): a fault event is recorded, the port
is reopened every 0.5 s until stop(), and the reconnection is recorded with the length of the
gap. The port is named by a pyserial URL, so "loop://" and other handlers work as well as paths.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import serial

from dualrec.devices.base import DeviceError, EventSink, LogSink
from dualrec.oplog_framer import LineFramer
from dualrec.samples import Event, LogLine

log = logging.getLogger(__name__)

REOPEN_INTERVAL_S = 0.5
SINK_FAULT_INTERVAL_NS = 1_000_000_000
_JOIN_TIMEOUT_S = 1.0
_MAX_READ = 65536


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
    ) -> None:
        self.port = port
        self.baud = baud
        self.framer = framer
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits
        self.read_timeout_s = read_timeout_s
        self._ser: serial.Serial | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sink: LogSink | None = None
        self._events: EventSink | None = None
        self._lost_ns = 0
        self._sink_errors = 0
        self._last_sink_fault_ns: int | None = None

    def start(self, sink: LogSink, events: EventSink) -> None:
        """Open the port (DeviceError if impossible) and start the reader thread."""
        if self._thread is not None:
            raise DeviceError(f"oplog {self.port}: already started")
        self._ser = self._open()
        self._sink = sink
        self._events = events
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"oplog-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading within about a second; the buffered partial line is delivered first."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            # Only a sink that never returns can hold the thread; it is a daemon, so leave it.
            log.error(
                "oplog %s: reader thread did not stop within %.1f s", self.port, _JOIN_TIMEOUT_S
            )
        self._thread = None

    def _open(self) -> serial.Serial:
        try:
            return serial.serial_for_url(
                self.port,
                baudrate=self.baud,
                bytesize=self.bytesize,
                parity=self.parity,
                stopbits=self.stopbits,
                timeout=self.read_timeout_s,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise DeviceError(f"oplog port {self.port}: cannot open: {exc}") from exc

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as exc:
                    # A bug below must neither end recording silently nor spin: record it,
                    # breathe, go on reading.
                    log.exception("oplog %s: reader step failed", self.port)
                    self._emit(
                        "fault",
                        {"device": "oplog", "port": self.port, "reason": f"reader failed: {exc!r}"},
                    )
                    self._stop.wait(self.read_timeout_s)
        finally:
            try:
                self._deliver(self.framer.flush(time.monotonic_ns()))
            finally:
                self._close()

    def _step(self) -> None:
        """One read (or one reconnection attempt cycle) and its delivery."""
        ser = self._ser
        if ser is None:
            self._reconnect()
            return
        try:
            first = ser.read(1)
            if not first:
                return
            # Stamp before anything else: the chunk's time is its first byte's time.
            t = time.monotonic_ns()
            waiting = ser.in_waiting
            data = first + ser.read(min(waiting, _MAX_READ)) if waiting else first
        except (serial.SerialException, OSError) as exc:
            self._lost(exc)
            return
        self._deliver(self.framer.feed(data, t))

    def _lost(self, exc: BaseException) -> None:
        """The port failed mid-run: record it and drop it; _run reopens."""
        self._lost_ns = time.monotonic_ns()
        self._emit("fault", {"device": "oplog", "port": self.port, "reason": str(exc)})
        # Bytes after the gap belong to a different line than the ones before it; joining them
        # would forge a line the terminal never sent, so the partial line is closed here.
        self._deliver(self.framer.flush(self._lost_ns))
        self._close()

    def _reconnect(self) -> None:
        """Retry opening every REOPEN_INTERVAL_S until it works or stop() is called."""
        while not self._stop.wait(REOPEN_INTERVAL_S):
            try:
                self._ser = self._open()
            except DeviceError:
                continue
            self._emit("oplog_reconnected", {"gap_ns": time.monotonic_ns() - self._lost_ns})
            return

    def _close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                ser.close()

    def _deliver(self, lines: list[LogLine]) -> None:
        sink = self._sink
        if sink is None:
            return
        for line in lines:
            try:
                sink(line)
            except Exception as exc:
                self._sink_failed(exc)

    def _sink_failed(self, exc: Exception) -> None:
        # A broken sink fails on every line; one event per second (with a count) keeps the
        # record readable and the thread fast enough to keep draining the port.
        self._sink_errors += 1
        now = time.monotonic_ns()
        last = self._last_sink_fault_ns
        if last is not None and now - last < SINK_FAULT_INTERVAL_NS:
            return
        self._last_sink_fault_ns = now
        count, self._sink_errors = self._sink_errors, 0
        self._emit(
            "fault",
            {
                "device": "oplog",
                "port": self.port,
                "reason": f"sink failed: {exc!r}",
                "count": count,
            },
        )

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        events = self._events
        if events is None:
            return
        try:
            events(Event(t_mono_ns=time.monotonic_ns(), kind=kind, detail=detail))
        except Exception:
            log.exception("oplog %s: event sink failed on %s %s", self.port, kind, detail)
