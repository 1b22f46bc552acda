"""Clock alignment for the Pico serial tap: the box pulses the tap's sync line at known instants.

The tap stamps every rising edge on its sync pin with its own microsecond clock (a hard pin
interrupt on the Pico) and reports it as a channel-2 frame. If the box knows the CLOCK_MONOTONIC
instant of each edge it made, PicoTapOpLog pairs edges with pulses and fits a line (offset and
drift) that maps tap ticks onto the box's clock (picotap.TapClock, mode "sync"): the log lines'
``t_mono_ns`` then no longer carry the USB latency the "arrival" estimate is biased by.

This module makes the pulses and reports how good the fit is:

- ``SyncPulser`` raises the line at a fixed schedule (rising edges ``period_s`` apart on absolute
  CLOCK_MONOTONIC instants, so the period does not stretch with the loop's own overhead), holds it
  high ``high_s`` (10 ms) and tells the oplog when each edge happened: the midpoint of the
  monotonic readings taken just before and just after the write that raised the line. A write that
  took longer than ``max_uncertainty_ns`` (the thread was preempted in it) is not recorded: the tap
  still sees that edge, finds no pulse for it and drops it (PicoTapOpLog counts it in
  ``sync_unmatched``), which is better than a pair that is wrong by the preemption.
- Drives: ``GpioSyncDrive`` (a Pi output through RPi.GPIO / rpi-lgpio, BCM numbering, imported
  only when started) and ``PtySyncDrive`` (the MicroPython unix stand-in of the tap: each byte on
  its DUALREC_TAP_SYNC pseudo-terminal is one rising edge; see firmware/tap/dualrec_tap/port.py).
- ``FitTapClock`` is picotap's TapClock plus the quality of its fit: the residuals of the pairs
  against the fitted line (RMS and largest), the span the pairs cover and the offset now. It is
  given to PicoTapOpLog through its ``clock`` parameter, so picotap's own ``tap_clock`` event (on a
  mode change) carries those fields too.
- ``SyncedTapOpLog`` is the OpLog the factory builds when a board's ``[tap]`` names a
  ``sync_gpio``: PicoTapOpLog and a SyncPulser started and stopped together, plus a ``tap_clock``
  event (reason "fit") when the drift first becomes fitted and then every ``report_interval_s``,
  with the residuals, so each stretch of the record says how well its log lines were placed.

Why a pulser of its own rather than PicoTapOpLog's ``sync_drive``: that loop waits a relative
period (the schedule slips by its own overhead) and records every pulse however long the write
took; this one keeps an absolute schedule, refuses uncertain pulses and reports the fit. It calls
the same ``sync_pulse(mono_ns)`` interface, so PicoTapOpLog's pairing and fitting are unchanged.

The residuals say how consistent the pairs are with one straight line (jitter in stamping the
edge on the tap, in the write on the box); a constant delay common to every edge (the level
shifter, the interrupt entry) does not show in them, nor does it matter for ordering the record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from dualrec.config import TapProfile
from dualrec.devices.base import DeviceError, EventSink, LogSink
from dualrec.devices.picotap import PicoTapOpLog, TapClock
from dualrec.devices.runtime import EventEmitter
from dualrec.oplog_framer import LineFramer

log = logging.getLogger(__name__)

PERIOD_S = 1.0
HIGH_S = 0.01
MAX_UNCERTAINTY_NS = 1_000_000  # a write slower than this was preempted: its instant is unsure
REPORT_INTERVAL_S = 60.0
DRIFT_SPAN_US = 10_000_000  # TapClock fits drift once its pairs span this (picotap._refit)
_JOIN_TIMEOUT_S = 1.0


class SyncDrive(Protocol):
    """The sync line as the pulser sees it: open, set high or low, close."""

    name: str

    def open(self) -> None: ...
    def set(self, high: bool) -> None: ...
    def close(self) -> None: ...


class GpioSyncDrive:
    """A Pi output (BCM number) wired to the Pico's sync pin, driven through RPi.GPIO."""

    def __init__(self, pin: int) -> None:
        self.pin = pin
        self.name = f"GPIO{pin}"
        self._gpio: ModuleType | None = None

    def open(self) -> None:
        try:
            import RPi.GPIO as gpio  # imported here only: the module loads on any machine
        except ImportError as exc:
            raise DeviceError(
                "tap sync: the RPi.GPIO module is not installed: apt install python3-rpi-lgpio "
                "(any Pi, required on a Pi 5) or python3-rpi.gpio (Pi 4 and older)"
            ) from exc
        except RuntimeError as exc:  # RPi.GPIO on a Pi 5 fails at import on some versions
            raise DeviceError(f"tap sync: RPi.GPIO failed: {exc}") from exc
        try:
            # The panel uses BCM numbering too; setting the same mode again is allowed.
            gpio.setmode(gpio.BCM)
            gpio.setup(self.pin, gpio.OUT, initial=gpio.LOW)
        except Exception as exc:  # RuntimeError from RPi.GPIO, lgpio.error from rpi-lgpio
            raise DeviceError(f"tap sync: cannot drive {self.name}: {type(exc).__name__}: "
                              f"{exc}") from exc
        self._gpio = gpio

    def set(self, high: bool) -> None:
        gpio = self._gpio
        if gpio is None:
            raise DeviceError(f"tap sync: {self.name} is not open")
        gpio.output(self.pin, gpio.HIGH if high else gpio.LOW)

    def close(self) -> None:
        gpio, self._gpio = self._gpio, None
        if gpio is None:
            return
        with contextlib.suppress(Exception):  # shutting down: nothing useful to do about it
            gpio.output(self.pin, gpio.LOW)
            gpio.cleanup([self.pin])


class PtySyncDrive:
    """The unix stand-in's sync input: a pseudo-terminal whose every byte is one rising edge.

    The drive holds the master side; give ``path`` (the slave) to the firmware as
    DUALREC_TAP_SYNC. The pty exists from construction on, so the path is known before the
    firmware starts. A falling edge writes nothing: the stand-in has no levels, only edges.
    """

    EDGE = b"\x01"

    def __init__(self) -> None:
        self._master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)
        self.name = f"pty {self.path}"

    def open(self) -> None:
        if self._master < 0:
            raise DeviceError(f"tap sync: {self.name} is closed")

    def set(self, high: bool) -> None:
        if high:
            os.write(self._master, self.EDGE)

    def close(self) -> None:
        master, self._master = self._master, -1  # a closed fd number is soon reused: once only
        if master >= 0:
            with contextlib.suppress(OSError):
                os.close(master)


class SyncPulser:
    """Raises the sync line every ``period_s`` on an absolute schedule; see the module docstring.

    ``record(mono_ns)`` is told the instant of each rising edge it is sure of (PicoTapOpLog's
    ``sync_pulse``). ``after_pulse()``, if given, is called on the pulser's thread after each
    pulse (SyncedTapOpLog reports the fit from there). Failures of the drive are logged, handed to
    ``on_fault`` (at most one every 5 s) and retried at the next slot.
    """

    def __init__(
        self,
        drive: SyncDrive,
        record: Callable[[int], None],
        *,
        period_s: float = PERIOD_S,
        high_s: float = HIGH_S,
        max_uncertainty_ns: int = MAX_UNCERTAINTY_NS,
        on_fault: Callable[[str], None] | None = None,
        after_pulse: Callable[[], None] | None = None,
    ) -> None:
        # PicoTapOpLog pairs an edge with the pulse nearest its estimated time within 100 ms:
        # pulses closer than twice that could pair with the wrong edge.
        if period_s < 0.2 or not 0 < high_s < period_s / 2:
            raise ValueError("sync period: at least 0.2 s, and high for less than half of it")
        self.drive = drive
        self.record = record
        self.period_ns = round(period_s * 1e9)
        self.high_s = high_s
        self.max_uncertainty_ns = max_uncertainty_ns
        self.on_fault = on_fault
        self.after_pulse = after_pulse
        self.pulses = 0  # recorded
        self.uncertain = 0  # made but not recorded: the write took too long
        self.missed_slots = 0  # schedule slots skipped because the thread ran late
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_fault_ns: int | None = None

    def start(self) -> None:
        """Claim the line (DeviceError if impossible) and start pulsing."""
        if self._thread is not None:
            raise DeviceError(f"tap sync {self.drive.name}: already started")
        self.drive.open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tap-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("tap sync %s: pulser thread did not stop within %.1f s", self.drive.name,
                      _JOIN_TIMEOUT_S)
        try:
            self.drive.set(False)
        except Exception:
            log.exception("tap sync %s: cannot lower the line", self.drive.name)
        self.drive.close()

    def _run(self) -> None:
        due = time.monotonic_ns() + self.period_ns
        while not self._stop.wait(max(0, due - time.monotonic_ns()) / 1e9):
            try:
                self._pulse()
            except Exception as exc:
                self.failures += 1
                log.exception("tap sync %s: pulse failed", self.drive.name)
                self._fault(f"sync pulse failed on {self.drive.name}: {exc!r}")
            if self.after_pulse is not None:
                try:
                    self.after_pulse()
                except Exception:
                    log.exception("tap sync %s: after-pulse hook failed", self.drive.name)
            due += self.period_ns
            now = time.monotonic_ns()
            if due <= now:
                # Ran late (a suspended process, a very slow drive): keep the phase, skip the
                # slots already past rather than firing a burst of pulses closer than a period.
                skipped = (now - due) // self.period_ns + 1
                self.missed_slots += skipped
                due += skipped * self.period_ns

    def _pulse(self) -> None:
        before = time.monotonic_ns()
        self.drive.set(True)
        after = time.monotonic_ns()
        if after - before <= self.max_uncertainty_ns:
            self.record((before + after) // 2)
            self.pulses += 1
        else:
            self.uncertain += 1
        self._stop.wait(self.high_s)
        self.drive.set(False)

    def _fault(self, reason: str) -> None:
        now = time.monotonic_ns()
        if self._last_fault_ns is not None and now - self._last_fault_ns < 5_000_000_000:
            return
        self._last_fault_ns = now
        if self.on_fault is not None:
            self.on_fault(reason)


class FitTapClock(TapClock):
    """picotap's TapClock plus the quality of its sync fit (residuals of the pairs).

    Runs on PicoTapOpLog's reader thread like its base; ``quality`` is replaced whole after each
    pair (one attribute assignment), so another thread may read it without a lock.
    """

    def reset(self) -> None:
        super().reset()
        # The same window of pairs as the base class fits (it keeps its own copy private).
        self._fit_pairs: deque[tuple[int, int]] = deque(maxlen=self.max_pairs)
        self.quality: dict[str, Any] | None = None

    def add_pair(self, tap_ticks: int, mono_ns: int) -> None:
        super().add_pair(tap_ticks, mono_ns)
        self._fit_pairs.append((tap_ticks, mono_ns))
        pairs = self._fit_pairs
        residuals = [m - self.to_mono(t) for t, m in pairs]
        span_us = pairs[-1][0] - pairs[0][0]
        described = super().describe()
        # Integers only: events are recorded as canonical JSON, which has no floats.
        self.quality = {
            "pairs": len(pairs),
            "span_ms": span_us // 1000,
            "drift_fitted": span_us >= DRIFT_SPAN_US,
            "drift_ppb": described.get("drift_ppb", 0),
            # The offset now, in the same sense as the arrival mode's: mono_ns - ticks * 1000.
            "offset_ns": self.to_mono(tap_ticks) - tap_ticks * 1000,
            "residual_rms_ns": round(math.sqrt(sum(r * r for r in residuals) / len(residuals))),
            "residual_max_ns": max(abs(r) for r in residuals),
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        quality = self.quality
        if out["mode"] == "sync" and quality is not None:
            out.update(quality)
        return out


class SyncedTapOpLog:
    """PicoTapOpLog with a SyncPulser on its sync line (the OpLog interface); see the docstring.

    If the line cannot be claimed (no RPi.GPIO, pin busy) the tap is still read, in "arrival"
    mode, and the reason is on record as a fault event: the log lines are the evidence, the sync
    only makes their times better.
    """

    def __init__(self, oplog: PicoTapOpLog, drive: SyncDrive, *, period_s: float = PERIOD_S,
                 high_s: float = HIGH_S, report_interval_s: float = REPORT_INTERVAL_S) -> None:
        if not isinstance(oplog.clock, FitTapClock):
            raise ValueError("SyncedTapOpLog needs the PicoTapOpLog built with a FitTapClock")
        self.oplog = oplog
        self.clock: FitTapClock = oplog.clock
        self.report_interval_ns = round(report_interval_s * 1e9)
        self.pulser = SyncPulser(drive, oplog.sync_pulse, period_s=period_s, high_s=high_s,
                                 on_fault=self._fault, after_pulse=self._maybe_report)
        self._emit = EventEmitter("tap sync")  # events on record, from any thread
        self._pulsing = False
        self._last_report_ns: int | None = None
        self._reported_fitted = False

    def start(self, sink: LogSink, events: EventSink) -> None:
        self.oplog.start(sink, events)
        self._emit.events = events
        self._last_report_ns = None
        self._reported_fitted = False
        try:
            self.pulser.start()
            self._pulsing = True
        except DeviceError as exc:
            log.error("%s; the tap clock stays in arrival mode", exc)
            self._fault(f"{exc}; tap clock stays in arrival mode")

    def stop(self) -> None:
        if self._pulsing:
            self.pulser.stop()
            self._pulsing = False
        self.oplog.stop()

    def _maybe_report(self) -> None:
        """On the pulser's thread: a tap_clock event with the fit, when it says something new."""
        quality = self.clock.quality
        if quality is None:
            return
        now = time.monotonic_ns()
        first_fit = quality["drift_fitted"] and not self._reported_fitted
        due = (self._last_report_ns is not None
               and now - self._last_report_ns >= self.report_interval_ns)
        if not (first_fit or due):
            return
        self._last_report_ns = now
        self._reported_fitted = self._reported_fitted or quality["drift_fitted"]
        self._emit("tap_clock", {"mode": "sync", "reason": "fit", **quality,
                                 "pulses": self.pulser.pulses, "uncertain": self.pulser.uncertain,
                                 "unmatched": self.oplog.sync_unmatched})

    def _fault(self, reason: str) -> None:
        self._emit("fault", {"device": "tap_sync", "line": self.pulser.drive.name,
                             "reason": reason})


def synced_tap_oplog(tap: TapProfile, framer: LineFramer, drive: SyncDrive | None = None, *,
                     period_s: float = PERIOD_S,
                     report_interval_s: float = REPORT_INTERVAL_S) -> SyncedTapOpLog:
    """The tap's OpLog with sync pulses: on ``tap.sync_gpio`` unless another drive is given."""
    if drive is None:
        if tap.sync_gpio is None:
            raise ValueError("tap sync: [tap] sync_gpio is not set")
        drive = GpioSyncDrive(tap.sync_gpio)
    oplog = PicoTapOpLog(tap, framer, clock=FitTapClock())
    return SyncedTapOpLog(oplog, drive, period_s=period_s, report_interval_s=report_interval_s)
