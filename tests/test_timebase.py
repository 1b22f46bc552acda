"""Timebase: anchors, UTC mapping through the anchor in force, clock-step detection."""

from __future__ import annotations

import time

from dualrec.timebase import ClockWatcher, Timebase, kernel_sync_state


class SteppableClock:
    """CLOCK_REALTIME stand-in that follows the real clock until the test steps it."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset


def test_step_detected_recorded_and_mapped():
    clock = SteppableClock()
    tb = Timebase(step_threshold_ns=50_000_000, realtime_ns=clock,
                  sync_state=lambda: (True, 1_000_000))
    t_before = time.monotonic_ns()
    utc_before = tb.to_utc_ns(t_before)
    assert tb.check() is None  # no step: no event, no new anchor
    assert len(tb.anchors) == 1
    clock.offset = -14 * 24 * 3600 * 10**9  # fake-hwclock style: two weeks back
    ev = tb.check()
    assert ev is not None and ev.kind == "clock_step"
    assert abs(ev.detail["step_ns"] - clock.offset) < 10_000_000
    # instants before the step keep the UTC they had; after it, the new one applies
    assert tb.to_utc_ns(t_before) == utc_before
    now = time.monotonic_ns()
    assert abs(tb.to_utc_ns(now) - (time.time_ns() + clock.offset)) < 10_000_000
    clock_json = tb.clock_json(t_before, now)
    assert len(clock_json["anchors"]) == 2 and clock_json["timeline"] == "CLOCK_MONOTONIC"


def test_small_drift_is_not_a_step():
    clock = SteppableClock()
    tb = Timebase(step_threshold_ns=100_000_000, realtime_ns=clock)
    clock.offset = 20_000_000  # NTP slewing moves UTC gradually
    assert tb.check() is None


def test_watcher_reports_steps_from_its_thread():
    clock = SteppableClock()
    tb = Timebase(step_threshold_ns=50_000_000, realtime_ns=clock)
    events = []
    watcher = ClockWatcher(tb, events.append, period_s=0.02)
    watcher.start()
    try:
        time.sleep(0.1)
        clock.offset = 3 * 10**9
        deadline = time.monotonic() + 2
        while not events and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.stop()
    assert [e.kind for e in events] == ["clock_step"]


def test_kernel_sync_state_reads_adjtimex():
    synced, err = kernel_sync_state()
    assert isinstance(synced, bool) and (err >= 0 if synced else err == -1)
