"""The reader thread of a byte port that may vanish (a serial line, the Pico tap's USB port),
part of the device runtime (devices/runtime.py).

One daemon thread owns the port. Each step reads what has arrived, stamped with
CLOCK_MONOTONIC the moment the first byte is returned, and hands it to the backend (also an
empty read, so a backend can do its periodic work). A port that fails mid-run (USB adapter
unplugged, terminal restarted) is a `fault`; the backend closes what it held across the gap, the
port is closed and reopened every reopen_s until stop(), and the backend records the
reconnection. A step that raises anything else is logged with its traceback, recorded, and the
reading goes on. At the end the backend delivers what it still buffers, then the port closes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import serial

from dualrec.devices.base import DeviceError
from dualrec.devices.runtime import EventEmitter

log = logging.getLogger(__name__)


class PortReader:
    """See the module docstring. The backend gives: open_port() -> an open pyserial-like port
    (DeviceError if impossible), on_data(data, t_ns), on_lost(t_ns), on_reopened(gap_ns) and
    finish(); fault_detail is what its faults say besides the reason (device, port)."""

    def __init__(self, name: str, emit: EventEmitter, *, open_port: Callable[[], Any],
                 on_data: Callable[[bytes, int], None], on_lost: Callable[[int], None],
                 on_reopened: Callable[[int], None], finish: Callable[[], None],
                 fault_detail: dict[str, Any], read_timeout_s: float, reopen_s: float,
                 max_read: int) -> None:
        self.name = name
        self._emit = emit
        self._open_port = open_port
        self._on_data = on_data
        self._on_lost = on_lost
        self._on_reopened = on_reopened
        self._finish = finish
        self._fault_detail = fault_detail
        self._read_timeout_s = read_timeout_s
        self._reopen_s = reopen_s
        self._max_read = max_read
        self.port: Any = None
        self.thread: threading.Thread | None = None
        self.lost_ns = 0
        self._stop = threading.Event()

    def open(self) -> None:
        """Open the port now (DeviceError if impossible): a start that cannot open fails."""
        self.port = self._open_port()

    def start(self) -> threading.Thread:
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout_s: float) -> bool:
        """Stop the thread; False if it did not end in time (only a sink that never returns
        can hold it; it is a daemon, so it is left)."""
        thread = self.thread
        if thread is None:
            return True
        self._stop.set()
        thread.join(timeout_s)
        self.thread = None
        return not thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Sleep on the reader's stop: True when stop() was called."""
        return self._stop.wait(seconds)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as exc:
                    # A bug below must neither end recording silently nor spin: record it,
                    # breathe, go on reading.
                    log.exception("%s: reader step failed", self.name)
                    self._emit("fault", {**self._fault_detail,
                                         "reason": f"reader failed: {exc!r}"})
                    self._stop.wait(self._read_timeout_s)
        finally:
            try:
                self._finish()
            finally:
                self.close()

    def _step(self) -> None:
        port = self.port
        if port is None:
            self._reconnect()
            return
        try:
            first = port.read(1)
            t = time.monotonic_ns()  # before anything else: the chunk's time is its first byte's
            data = first
            if first:
                waiting = port.in_waiting
                if waiting:
                    data = first + port.read(min(waiting, self._max_read))
        except (serial.SerialException, OSError) as exc:
            self.lost_ns = time.monotonic_ns()
            self._emit("fault", {**self._fault_detail, "reason": str(exc)})
            self._on_lost(self.lost_ns)
            self.close()
            return
        self._on_data(data, t)

    def _reconnect(self) -> None:
        while not self._stop.wait(self._reopen_s):
            try:
                self.port = self._open_port()
            except DeviceError:
                continue
            self._on_reopened(time.monotonic_ns() - self.lost_ns)
            return

    def close(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
