"""Simulated panel: the real panel behaviour (dualrec.devices.gpio_panel.PanelCore) on simulated
pins, so the sim board debounces, times presses and blinks the fault LED exactly as a box does.

Tests and the simulated counter work it like a person would: press_button(duration_ms) (held
long enough it is a mark), tamper() to open the case, power_fail() to pull the detector low; each
can chatter (bounce_ms) like a real contact. The LEDs' level changes are kept with their
CLOCK_MONOTONIC times (led_history), and recording_led / fault_pattern say what is shown now.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from dualrec.config import PanelProfile
from dualrec.devices.base import EventSink
from dualrec.devices.gpio_panel import PanelCore


class SimPins:
    """A PinIO with levels in memory; inputs start idle (released, case shut, power good)."""

    def __init__(self, profile: PanelProfile) -> None:
        self._lock = threading.Lock()
        self.levels: dict[int, bool] = {profile.button: True, profile.tamper: False,
                                        profile.power_fail: True,
                                        profile.recording_led: False, profile.fault_led: False}
        self.history: dict[int, list[tuple[int, bool]]] = {
            profile.recording_led: [], profile.fault_led: []}

    def read(self, pin: int) -> bool:
        with self._lock:
            return self.levels.get(pin, True)

    def write(self, pin: int, high: bool) -> None:
        with self._lock:
            changed = self.levels.get(pin) != high or not self.history.setdefault(pin, [])
            self.levels[pin] = high
            if changed:
                self.history[pin].append((time.monotonic_ns(), high))

    def set_input(self, pin: int, high: bool) -> int:
        t = time.monotonic_ns()
        with self._lock:
            self.levels[pin] = high
        return t


class SimPanel:
    """The Panel interface on simulated pins; see the module docstring."""

    def __init__(self, profile: PanelProfile | None = None) -> None:
        self.profile = profile or PanelProfile()
        self.pins = SimPins(self.profile)
        self.core = PanelCore(self.profile, name="sim-panel")
        self._started = False

    # --- the Panel interface --------------------------------------------------------------

    def start(self, events: EventSink) -> None:
        self.core.start(self.pins, events)
        self._started = True

    def stop(self) -> None:
        self._started = False
        self.core.stop()

    def set_recording(self, on: bool) -> None:
        self.core.set_recording(on)

    def set_fault(self, pattern: str | None) -> None:
        self.core.set_fault(pattern)

    # --- what the LEDs show ---------------------------------------------------------------

    @property
    def recording_led(self) -> bool:
        return self.pins.read(self.profile.recording_led)

    @property
    def fault_pattern(self) -> str | None:
        return self.core.fault

    def led_history(self, led: str) -> list[tuple[int, bool]]:
        """(t_mono_ns, lit) for each change of the "recording" or "fault" LED, oldest first."""
        pin = {"recording": self.profile.recording_led, "fault": self.profile.fault_led}[led]
        with self.pins._lock:
            return list(self.pins.history.get(pin, []))

    # --- what a person does ---------------------------------------------------------------

    def press_button(self, duration_ms: float = 120, bounce_ms: Sequence[float] = ()) -> int:
        """Press for duration_ms (long_press_ms or more: a mark) and release; returns the time of
        the press. Blocks for the duration, as a finger would."""
        t = self._drive(self.profile.button, False, bounce_ms)
        time.sleep(duration_ms / 1000)
        self._drive(self.profile.button, True, bounce_ms)
        return t

    def tamper(self, open: bool = True, bounce_ms: Sequence[float] = ()) -> int:
        """Open the case (or shut it again with open=False); returns the time of the edge."""
        return self._drive(self.profile.tamper, open, bounce_ms)

    def power_fail(self, asserted: bool = True, bounce_ms: Sequence[float] = ()) -> int:
        """The supply fails (or comes back with asserted=False); returns the time of the edge."""
        return self._drive(self.profile.power_fail, not asserted, bounce_ms)

    def _drive(self, pin: int, high: bool, bounce_ms: Sequence[float]) -> int:
        """Set the input to high, chattering through bounce_ms first; every change is an edge."""
        t0 = self._set(pin, high)
        level = high
        for i, ms in enumerate(bounce_ms):
            time.sleep(ms / 1000)
            level = (not high) if i % 2 == 0 else high
            self._set(pin, level)
        if level != high:
            self._set(pin, high)
        return t0

    def _set(self, pin: int, high: bool) -> int:
        t = self.pins.set_input(pin, high)
        if self._started:
            self.core.edge(pin, t)
        return t
