"""Simulated panel: the two LEDs as recorded states, and the button, tamper switch and power-fail
input as methods a test or the simulated counter calls."""

from __future__ import annotations

import threading
import time

from dualrec.devices.base import EventSink
from dualrec.samples import Event


class SimPanel:
    def __init__(self) -> None:
        self._events: EventSink | None = None
        self._lock = threading.Lock()
        self.recording_led = False
        self.fault_pattern: str | None = None
        self.history: list[tuple[int, str, object]] = []  # (t_mono_ns, led, state)

    def start(self, events: EventSink) -> None:
        self._events = events

    def stop(self) -> None:
        self._events = None

    def set_recording(self, on: bool) -> None:
        with self._lock:
            self.recording_led = on
            self.history.append((time.monotonic_ns(), "recording", on))

    def set_fault(self, pattern: str | None) -> None:
        with self._lock:
            self.fault_pattern = pattern
            self.history.append((time.monotonic_ns(), "fault", pattern))

    def _input(self, kind: str, **detail: object) -> None:
        if self._events is not None:
            self._events(Event(time.monotonic_ns(), kind, dict(detail)))

    def press_button(self) -> None:
        self._input("button", press="short")

    def tamper(self) -> None:
        self._input("tamper", switch="open")

    def power_fail(self) -> None:
        self._input("power_fail", input="asserted")
