"""The timebase: CLOCK_MONOTONIC is the timeline, UTC is attached to it by anchors.

An anchor is (mono_ns, utc_ns, source, est_error_ns, synced), taken by reading the monotonic clock
on both sides of the UTC read. A watcher compares UTC-minus-monotonic over time; a change larger
than the threshold is a clock step (fake-hwclock, an RTC read, an NTP step) and is reported as an
event with both offsets, so every record stays ordered by monotonic time whatever UTC did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from dualrec.samples import Event

STA_UNSYNC = 0x0040


@dataclass(frozen=True, slots=True)
class Anchor:
    mono_ns: int
    utc_ns: int
    source: str
    synced: bool
    est_error_ns: int  # -1 when unknown

    def to_json(self) -> dict:
        return asdict(self)


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (x86_64 and aarch64 layouts are the same: all longs)
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def _load_libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig: do it once, not on every clock check
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def kernel_sync_state() -> tuple[bool, int]:
    """(synced, est_error_ns) from adjtimex(2), read-only; (False, -1) if unavailable."""
    tx = _Timex()
    try:
        if _LIBC is None or _LIBC.adjtimex(ctypes.byref(tx)) < 0:
            return False, -1
    except AttributeError:
        return False, -1
    synced = not tx.status & STA_UNSYNC
    return synced, tx.esterror * 1000 if synced else -1


def _ratio(a: int, b: int) -> float:
    if a < 0 or b < 0:
        return 1.0 if a == b else float("inf")
    return max(a, b) / max(min(a, b), 1)


class Timebase:
    """Monotonic timeline with UTC anchors and clock-step detection."""

    def __init__(
        self,
        source: str = "system",
        step_threshold_ns: int = 100_000_000,
        realtime_ns: Callable[[], int] = time.time_ns,
        sync_state: Callable[[], tuple[bool, int]] = kernel_sync_state,
    ) -> None:
        self.source = source
        self.step_threshold_ns = step_threshold_ns
        self._realtime_ns = realtime_ns
        self._sync_state = sync_state
        self._lock = threading.Lock()
        self.anchors: list[Anchor] = [self._take_anchor()]

    @staticmethod
    def mono_ns() -> int:
        return time.monotonic_ns()

    def _take_anchor(self) -> Anchor:
        before = time.monotonic_ns()
        utc = self._realtime_ns()
        after = time.monotonic_ns()
        synced, err = self._sync_state()
        return Anchor((before + after) // 2, utc, self.source, synced, err)

    @property
    def current(self) -> Anchor:
        with self._lock:
            return self.anchors[-1]

    def to_utc_ns(self, mono_ns: int) -> int:
        """UTC of a monotonic instant, through the anchor in force at that instant."""
        with self._lock:
            anchor = self.anchors[0]
            for a in reversed(self.anchors):
                if a.mono_ns <= mono_ns:
                    anchor = a
                    break
        return anchor.utc_ns + (mono_ns - anchor.mono_ns)

    def check(self) -> Event | None:
        """Take a fresh anchor; return a clock_step event if UTC moved against monotonic."""
        new = self._take_anchor()
        with self._lock:
            old = self.anchors[-1]
            step = (new.utc_ns - new.mono_ns) - (old.utc_ns - old.mono_ns)
            if abs(step) < self.step_threshold_ns:
                # a new anchor only when the quality really changes: synced flips or the error
                # bound moves by more than a factor of two (the list must not grow every check)
                if new.synced != old.synced or _ratio(new.est_error_ns, old.est_error_ns) > 2:
                    self.anchors.append(new)
                return None
            self.anchors.append(new)
        return Event(
            new.mono_ns,
            "clock_step",
            {"step_ns": step, "utc_before_ns": old.utc_ns + (new.mono_ns - old.mono_ns),
             "utc_after_ns": new.utc_ns, "source": self.source},
        )

    def clock_json(self, start_mono_ns: int, end_mono_ns: int) -> dict:
        """The anchors relevant to a span, for a segment's clock.json."""
        with self._lock:
            anchors = list(self.anchors)
        before = [a for a in anchors if a.mono_ns <= start_mono_ns]
        inside = [a for a in anchors if start_mono_ns < a.mono_ns <= end_mono_ns]
        chosen = before[-1:] + inside or anchors[:1]
        return {"timeline": "CLOCK_MONOTONIC", "anchors": [a.to_json() for a in chosen]}


class ClockWatcher:
    """A thread that calls Timebase.check periodically and hands steps to a sink."""

    def __init__(self, timebase: Timebase, sink: Callable[[Event], None], period_s: float = 0.2):
        self._tb = timebase
        self._sink = sink
        self._period = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_check_ns = time.monotonic_ns()  # progress, for the gateway's watchdog

    def start(self, spawn: Callable[[str, Callable[[], None]], threading.Thread] | None = None
              ) -> None:
        """Run the loop on a thread; spawn(name, target) returns a started thread of its own
        kind (the gateway's supervisor, which retries the loop if a check raises)."""
        if spawn is not None:
            self._thread = spawn("clock-watch", self.run)
            return
        self._thread = threading.Thread(target=self.run, name="clock-watch", daemon=True)
        self._thread.start()

    def run(self) -> None:
        while not self._stop.wait(self._period):
            ev = self._tb.check()
            self.last_check_ns = time.monotonic_ns()
            if ev:
                self._sink(ev)

    def stop(self) -> None:
        self._stop.set()
        # stop() also runs after a start that never happened (a device failed first): there
        # is then nothing to join, and joining would raise over the real error.
        thread = self._thread
        if thread is not None and thread.ident is not None:
            thread.join(timeout=1)
