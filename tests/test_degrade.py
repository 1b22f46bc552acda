"""Degrade, never die: a device absent at start is a fault on record and on the LED, the box
records the rest from the first second, and the device joins when it appears; a worker thread
that raises is logged once, on record, retried; one that cannot recover stops the process with a
non-zero status. Real parts: a pseudo-terminal for the serial port, real PortAudio on alsa-lib
for the microphone, the picamera2 fake for the camera."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dualrec.config import MicrophoneProfile
from dualrec.devices.pyaudio_microphone import PyAudioMicrophone
from dualrec.diag import check_gateway
from dualrec.timebase import ClockWatcher, Timebase
from gatewaybox import Box, Sealed, wait_until
from helpers import ROOT, small_board, write_site

# Real-time devices (a pty read by pyserial, PortAudio, an encoder): one xdist worker.
pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("timing")]

NS = 1_000_000_000
FAKES = str(ROOT / "tests" / "fakes")


def session_segments(sealed: list[Sealed]) -> list[Sealed]:
    return [s for s in sealed if s.header["session"]]


def first_event(sealed: list[Sealed], kind: str, device: str) -> tuple[int, dict]:
    """(seq, event) of the first `kind` event of `device` on record."""
    for s in sealed:
        for e in s.events:
            if e["kind"] == kind and e["detail"].get("device") == device:
                return s.header["seq"], e
    raise AssertionError(f"no {kind} of {device} on record")


def assert_recorded_from_start(box: Box, sealed: list[Sealed], *, video: bool, audio: bool,
                               missing: str) -> None:
    """The session began at once (its first segment starts within the first second of the
    gateway's run: 0.05-0.08 s measured; 2 s allowed for a loaded 2-core test machine; the
    absent device is still absent then), its first segment says which stream is missing, and
    every segment recorded while the device was absent has the others."""
    seg = session_segments(sealed)
    first = seg[0]
    assert first.header["session_index"] == 0
    assert first.header["start"]["mono_ns"] - box.started_ns < 2 * NS
    notes = [e["detail"] for e in first.events if e["kind"] == "stream_missing"]
    assert [n["device"] for n in notes] == [missing], first.events
    for s in seg:
        assert (s.frames > 0) == video or s.header["final"], s.header["streams"]
        assert (s.samples > 0) == audio or s.header["final"], s.header["streams"]


# --- the serial port ------------------------------------------------------------------------


def test_serial_port_absent_at_start_joins_when_the_pty_appears(tmp_path, key_files):
    """Tried: the gateway started with its serial port a path that does not exist; about 10 s
    later the path appears (a symlink to a fresh pseudo-terminal, as udev makes for a USB
    adapter plugged in late) and the terminal writes two lines.
    Asserted: the run did not end; video and audio are sealed from the first second in 2 s
    segments; a `fault` {device: oplog} is on record (before the session or in its first
    segment), and that first segment says the oplog stream is missing; the fault LED shows
    the oplog pattern and `diag` the fault while it lasts; `fault_cleared` follows once the
    port opens, the lines written then are sealed byte for byte, the LED goes dark, diag
    passes, and the chain verifies."""
    link = tmp_path / "ttyCOUNTER"
    box = Box(tmp_path, key_files, port=str(link)).start()
    master = slave = -1
    try:
        panel = box.gw.devices.panel
        wait_until(lambda: panel.fault_pattern == "oplog", 30, "the oplog pattern", box)
        diag = wait_until(lambda: check_gateway(box.gw.site), 30, "the status file", box)
        assert not diag.ok and diag.detail.count("oplog: ") == 1 and str(link) in diag.detail
        # Recording goes on meanwhile: segments with video and audio keep being sealed.
        wait_until(lambda: len(session_segments(box.sealed())) >= 3, 60, "3 sealed segments",
                   box)
        wait_until(lambda: time.monotonic_ns() - box.started_ns >= 10 * NS, 30, "10 s")
        master, slave = os.openpty()
        link.symlink_to(os.ttyname(slave))
        wait_until(lambda: box.gw.runners["oplog"].running, 60, "the port opened", box)
        os.write(master, b"TXN 1001 OPEN\r\nTXN 1001 CLOSE\r\n")
        wait_until(lambda: sum(len(s.lines) for s in box.sealed()) >= 2, 60,
                   "the lines sealed", box)
        assert panel.fault_pattern is None
        assert check_gateway(box.gw.site).ok
    finally:
        box.stop()
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    assert check_gateway(box.gw.site) is None  # stopped: diag knows no gateway runs
    sealed = box.sealed()
    fault_seq, fault = first_event(sealed, "fault", "oplog")
    cleared_seq, cleared = first_event(sealed, "fault_cleared", "oplog")
    assert "No such file" in fault["detail"]["reason"]
    # on record before the session, or in its first segment (it may reach the queue after
    # the first samples), and cleared later
    assert fault_seq <= session_segments(sealed)[0].header["seq"] < cleared_seq
    assert cleared["detail"]["gap_ns"] >= 9 * NS
    assert_recorded_from_start(box, [s for s in sealed if s.header["seq"] < cleared_seq],
                               video=True, audio=True, missing="oplog")
    lines = [ln["text"] for s in sealed for ln in s.lines]
    assert lines == ["TXN 1001 OPEN", "TXN 1001 CLOSE"]
    box.verify()


def test_serial_adapter_unplugged_mid_run_and_replugged(tmp_path, key_files):
    """Tried: the serial port (a pty behind a by-id style symlink) vanishes mid-run (its master
    closed: reads fail with EIO, as with a USB adapter pulled), then comes back as another
    pty behind the same link. Asserted: `fault` {device: oplog} and `oplog_reconnected` are
    on record, the oplog LED pattern shows while it is gone and goes dark after, diag passes
    again, and a line written after the replug is sealed."""
    link = tmp_path / "ttyCOUNTER"
    fds: list[int] = []

    def plug() -> int:
        master, slave = os.openpty()
        fds.extend((master, slave))
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(slave))
        return master

    master = plug()
    box = Box(tmp_path, key_files, port=str(link)).start()
    try:
        panel = box.gw.devices.panel
        wait_until(lambda: "oplog" in box.gw.runners and box.gw.runners["oplog"].running, 30,
                   "the port open", box)
        for fd in fds:
            os.close(fd)
        fds.clear()
        wait_until(lambda: panel.fault_pattern == "oplog", 30, "the oplog pattern", box)
        master = plug()
        wait_until(lambda: panel.fault_pattern is None, 30, "the LED dark", box)
        assert check_gateway(box.gw.site).ok
        os.write(master, b"TXN 2002 OPEN\r\n")
        wait_until(lambda: any(s.lines for s in box.sealed()), 60, "the line sealed", box)
    finally:
        box.stop()
        for fd in fds:
            os.close(fd)
    sealed = box.sealed()
    _, fault = first_event(sealed, "fault", "oplog")
    assert fault["detail"]["port"] == str(link) and fault["detail"]["reason"]
    back = [e for s in sealed for e in s.events if e["kind"] == "oplog_reconnected"]
    assert len(back) == 1 and back[0]["detail"]["device"] == str(link)
    assert [ln["text"] for s in sealed for ln in s.lines] == ["TXN 2002 OPEN"]
    box.verify()


# --- the microphone -------------------------------------------------------------------------


def test_microphone_absent_at_start_joins_when_it_appears(tmp_path, key_files):
    """Tried: the gateway started with the real PortAudio microphone on alsa-lib whose
    capture PCM cannot open (its FIFO does not exist: PortAudio lists no such input, as with
    the USB microphone unplugged); about 4 s later the FIFO appears and an ADC-paced writer
    feeds it.
    Asserted: video is sealed from the first second without audio, the first session segment
    says audio is missing, `fault` {device: microphone} then `fault_cleared` are on record,
    and later segments hold the microphone's samples (the ramp the writer sent)."""
    from contract.test_microphone_contract import FifoSource, alsa_env

    fifo = tmp_path / "mic.fifo"
    mic = PyAudioMicrophone(MicrophoneProfile(backend="pyaudio", device="dualrec_mic",
                                              rate=48000, channels=1, block_frames=960))
    source = None
    with alsa_env(fifo):
        box = Box(tmp_path, key_files, microphone=mic).start()
        try:
            panel = box.gw.devices.panel
            wait_until(lambda: panel.fault_pattern == "microphone", 30, "the pattern", box)
            wait_until(lambda: len(session_segments(box.sealed())) >= 1, 60, "a segment", box)
            source = FifoSource(fifo)
            source.start()
            wait_until(lambda: box.gw.runners["microphone"].running, 60, "the mic joined", box)
            wait_until(lambda: any(s.samples > 48000 for s in box.sealed()), 60,
                       "a second of audio sealed", box)
        finally:
            box.stop()
            if source is not None:
                source.stop()
    sealed = box.sealed()
    fault_seq, fault = first_event(sealed, "fault", "microphone")
    cleared_seq, _ = first_event(sealed, "fault_cleared", "microphone")
    assert "no input device" in fault["detail"]["reason"]
    # on record before the session, or in its first segment (it may reach the queue after
    # the first samples), and cleared later
    assert fault_seq <= session_segments(sealed)[0].header["seq"] < cleared_seq
    assert_recorded_from_start(box, [s for s in sealed if s.header["seq"] < cleared_seq],
                               video=True, audio=False, missing="microphone")
    joined = [s for s in session_segments(sealed) if s.header["seq"] > cleared_seq]
    assert any(s.samples > 0 and s.frames > 0 for s in joined)
    box.verify()


# --- the camera -----------------------------------------------------------------------------


@pytest.fixture
def picam_fake() -> Iterator:
    """The picamera2 fake importable as picamera2 for one test, then gone again."""
    sys.path.insert(0, FAKES)
    try:
        import picamera2

        picamera2.fake_reset()
        yield picamera2
    finally:
        sys.path.remove(FAKES)
        for name in [n for n in sys.modules if n == "picamera2" or n.startswith("picamera2.")]:
            del sys.modules[name]


def test_camera_failing_at_start_joins_when_it_is_back(tmp_path, key_files, picam_fake):
    """Tried: the picamera2 backend started with no camera attached (the fake lists none:
    Picamera2() fails as on a Pi with a loose ribbon); after about 3 s the camera is there.
    Asserted: audio is sealed from the first second, cut by time into 2 s segments though no
    keyframe comes; the first session segment says video is missing; `fault` {device: camera}
    and `fault_cleared` are on record; later segments hold the camera's H.264 frames."""
    from dualrec.config import CameraProfile
    from dualrec.devices.picamera2_camera import PiCamera

    picam_fake.fake.cameras = []
    cam = PiCamera(CameraProfile(backend="picamera2", width=640, height=480, fps=10, gop=10,
                                 bitrate=300_000, encoder="libav"))
    box = Box(tmp_path, key_files, camera=cam).start()
    try:
        panel = box.gw.devices.panel
        wait_until(lambda: panel.fault_pattern == "camera", 30, "the camera pattern", box)
        wait_until(lambda: len(session_segments(box.sealed())) >= 2, 60,
                   "2 segments cut by time", box)
        picam_fake.fake.cameras = [picam_fake.FakeSensor()]
        wait_until(lambda: box.gw.runners["camera"].running, 60, "the camera joined", box)
        wait_until(lambda: any(s.frames >= 10 for s in box.sealed()), 60, "video sealed", box)
    finally:
        box.stop()
    sealed = box.sealed()
    fault_seq, fault = first_event(sealed, "fault", "camera")
    cleared_seq, _ = first_event(sealed, "fault_cleared", "camera")
    assert "no camera" in fault["detail"]["reason"]
    # on record before the session, or in its first segment (it may reach the queue after
    # the first samples), and cleared later
    assert fault_seq <= session_segments(sealed)[0].header["seq"] < cleared_seq
    before = [s for s in session_segments(sealed) if s.header["seq"] < cleared_seq]
    assert_recorded_from_start(box, before, video=False, audio=True, missing="camera")
    durations = [s.header["end"]["mono_ns"] - s.header["start"]["mono_ns"] for s in before
                 if not s.header["final"] and s.header["reason"] == "duration"]
    assert durations and all(d == 2 * NS for d in durations)
    assert any(s.frames > 0 for s in sealed if s.header["seq"] > cleared_seq)
    box.verify()


# --- worker threads -------------------------------------------------------------------------


class Flaky:
    """Timebase.check raising for the first `fails` calls (or forever with None)."""

    def __init__(self, check, fails: int | None) -> None:
        self.check, self.fails, self.calls = check, fails, 0

    def __call__(self):
        self.calls += 1
        if self.fails is None or self.calls <= self.fails:
            raise ZeroDivisionError(f"injected failure {self.calls}")
        return self.check()


def test_worker_exception_is_logged_once_on_record_and_retried(tmp_path, key_files, caplog):
    """Tried: the clock watcher's check raises an unexpected ZeroDivisionError twice in a row.
    Asserted: one ERROR with the traceback (the repeat is a one-line warning), a `fault`
    {device: internal, part: clock-watch} on record, the fault LED's internal pattern, the
    watcher retried and checking again, `fault_cleared` once it kept running, recording
    unaffected (video and audio sealed throughout)."""
    caplog.set_level(logging.WARNING, logger="dualrec.devices.runtime")
    box = Box(tmp_path, key_files)
    box.gw.supervisor.clear_after_s = 2.0
    flaky = Flaky(box.gw.timebase.check, fails=2)
    box.gw.timebase.check = flaky
    box.start()
    try:
        panel = box.gw.devices.panel
        wait_until(lambda: panel.fault_pattern == "internal", 30, "the internal pattern", box)
        wait_until(lambda: flaky.calls >= 6, 60, "checks after the retries", box)
        wait_until(lambda: panel.fault_pattern is None, 60, "the LED dark again", box)
        wait_until(lambda: any("fault_cleared" in s.kinds("internal") for s in box.sealed()),
                   60, "fault_cleared sealed", box)
    finally:
        box.stop()
    tracebacks = [r for r in caplog.records if r.exc_info and "clock-watch" in r.getMessage()]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is ZeroDivisionError
    sealed = box.sealed()
    _, fault = first_event(sealed, "fault", "internal")
    assert fault["detail"]["part"] == "clock-watch"
    assert "injected failure 1" in fault["detail"]["reason"]
    assert all(s.frames > 0 and s.samples > 0 for s in session_segments(sealed)
               if not s.header["final"])
    box.verify()


def test_worker_that_cannot_recover_stops_the_gateway_non_zero(tmp_path, key_files):
    """Tried: the clock watcher's check raises every time, and the supervisor gives a worker
    up after 3 failures. Asserted: the gateway stops by itself, says why (gw.fatal), puts a
    fatal fault on record, and what was recorded is sealed and verifies."""
    box = Box(tmp_path, key_files)
    box.gw.supervisor.fatal_after = 3
    box.gw.supervisor.backoff = (0.2, 0.4)
    box.gw.timebase.check = Flaky(box.gw.timebase.check, fails=None)
    box.start()
    wait_until(lambda: not box.running(), 60, "the gateway to give up")
    box.stop()
    assert box.gw.fatal and "clock-watch cannot recover after 3" in box.gw.fatal
    fatal = [e for s in box.sealed() for e in s.events
             if e["kind"] == "fault" and e["detail"].get("fatal")]
    assert [e["detail"]["part"] for e in fatal] == ["clock-watch"]
    box.verify()


def test_clock_watcher_stop_before_start_does_not_raise():
    """Tried: stop() on a watcher never started (a device failed before it). Asserted: no
    RuntimeError('cannot join thread before it is started') hides the first error."""
    ClockWatcher(Timebase(), lambda ev: None).stop()


# --- the whole process, as a technician runs it ---------------------------------------------


def test_run_without_its_serial_port_records_and_exits_zero(tmp_path, key_files):
    """Tried: `dualrec run --duration 5` with the site's serial port missing (the adapter in
    the wrong USB socket). Asserted: exit status 0, no traceback, one ERROR line naming the
    port, segments with video and audio sealed, and the fault in them."""
    board = small_board(tmp_path)
    site = write_site(tmp_path / "site.toml", key_files, port=str(tmp_path / "ttyMISSING"),
                      extra='min_free_mb = 0\n\n[recording]\nmode = "continuous"\n'
                            "segment_ms = 2000\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "firmware")}
    env.pop("NOTIFY_SOCKET", None)
    done = subprocess.run([sys.executable, "-m", "dualrec.cli", "run", "--board", str(board),
                           "--site", str(site), "--duration", "5"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if " ERROR " in ln]
    assert errors and all("ttyMISSING" in ln for ln in errors), done.stderr
    assert "sealed" in done.stdout
    spool = tmp_path / "spool"
    assert len(list(spool.glob("*.hdr.json"))) >= 2



# --- systemd: READY, STOPPING and the watchdog ---------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; keeps every message."""

    def __init__(self) -> None:
        import socket
        import tempfile
        import threading

        self.dir = Path(tempfile.mkdtemp(prefix="dr-notify-", dir="/tmp"))  # sun_path <= 107
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()


def test_watchdog_fed_only_while_healthy(tmp_path, key_files, monkeypatch):
    """Tried: the gateway under a notify socket with WatchdogSec=1 s; then the clock watcher
    hangs inside a check (alive, not progressing, no fault on record), then is released.
    Asserted: READY=1 comes first, WATCHDOG=1 follows while healthy; once the hang is seen
    the status says unhealthy and no WATCHDOG=1 is sent until the status says recording
    again; STOPPING=1 is the last message."""
    import threading

    import dualrec.gateway as gateway_mod

    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(gateway_mod, "CLOCK_STALL_S", 1.5)
    box = Box(tmp_path, key_files)
    hang, release = threading.Event(), threading.Event()
    check = box.gw.timebase.check

    def maybe_hang():
        if hang.is_set():
            release.wait(60)
            hang.clear()
        return check()

    box.gw.timebase.check = maybe_hang
    box.start()
    try:
        wait_until(lambda: notify.messages.count("WATCHDOG=1") >= 3, 60, "3 pings", box)
        hang.set()
        wait_until(lambda: any(m.startswith("STATUS=unhealthy") for m in notify.messages), 60,
                   "the hang seen", box)
        release.set()
        wait_until(lambda: "STATUS=recording" in notify.messages[
            next(i for i, m in enumerate(notify.messages) if m.startswith("STATUS=unhealthy")):],
            60, "healthy again", box)
        wait_until(lambda: notify.messages[-1] == "WATCHDOG=1", 60, "pings again", box)
    finally:
        box.stop()
        notify.close()
    msgs = notify.messages
    assert msgs[0] == "READY=1" and msgs[-1] == "STOPPING=1"
    bad = next(i for i, m in enumerate(msgs) if m.startswith("STATUS=unhealthy"))
    good = next(i for i, m in enumerate(msgs) if i > bad and m == "STATUS=recording")
    assert "clock watcher not checking" in msgs[bad]
    assert "WATCHDOG=1" not in msgs[bad:good]
    assert "WATCHDOG=1" in msgs[1:bad] and "WATCHDOG=1" in msgs[good:]


def test_camera_thread_dying_mid_run_is_restarted(tmp_path, key_files, monkeypatch):
    """Tried: the sim camera's capture thread dies mid-run (an injected MemoryError in its
    delivery; the camera records the fault and its thread ends, as a picamera2 encoder
    failure does), with restarts after 2 s of fault.
    Asserted: the fault is on record, segments go on being cut by time with audio while the
    camera is down, the gateway restarts the camera, `fault_cleared` follows, and video is
    sealed again after it; the chain verifies."""
    import dualrec.gateway as gateway_mod
    from dualrec.sim.camera import SimCamera

    monkeypatch.setattr(gateway_mod, "DEVICE_RESTART_AFTER_S", 2.0)
    deliver = SimCamera._deliver
    calls = [0]

    def dying(self, packets, sink):
        calls[0] += 1
        if calls[0] == 45:
            raise MemoryError("injected: encoder buffer gone")
        deliver(self, packets, sink)

    monkeypatch.setattr(SimCamera, "_deliver", dying)
    box = Box(tmp_path, key_files).start()
    try:
        def video_after_clear() -> bool:
            sealed = box.sealed()
            cleared = [s.header["seq"] for s in sealed if "fault_cleared" in s.kinds("camera")]
            return bool(cleared) and any(s.frames > 0 for s in sealed
                                         if s.header["seq"] > cleared[0])

        wait_until(lambda: "camera" in box.gw.runners, 30, "the devices started", box)
        wait_until(lambda: box.gw.runners["camera"].restarts >= 1, 60, "a restart", box)
        wait_until(video_after_clear, 60, "video sealed after the restart", box)
    finally:
        box.stop()
    sealed = box.sealed()
    fault_seq, fault = first_event(sealed, "fault", "camera")
    cleared_seq, cleared = first_event(sealed, "fault_cleared", "camera")
    assert "injected" in fault["detail"]["reason"] and fault_seq <= cleared_seq
    assert cleared["detail"]["gap_ns"] >= 2 * NS
    down = [s for s in session_segments(sealed) if fault_seq < s.header["seq"] < cleared_seq]
    assert all(s.samples > 0 for s in down)
    assert any(s.frames > 0 for s in sealed if s.header["seq"] > cleared_seq)
    box.verify()


# --- the panel, the clock and the recorder loop ----------------------------------------------


def test_panel_failing_at_start_joins_and_recording_goes_on(tmp_path, key_files):
    """Tried: the panel's GPIO refuses the first two starts (as RPi.GPIO does with the pins
    busy). Asserted: a `fault` {device: panel} on record, segments with video and audio sealed
    meanwhile, the panel joins (`fault_cleared`), and once it runs it lights the recording
    LED for the session."""
    from dualrec.devices.base import DeviceError
    from dualrec.sim.panel import SimPanel

    class BusyPanel(SimPanel):
        refusals = 2

        def start(self, events):
            if self.refusals:
                self.refusals -= 1
                raise DeviceError("panel: GPIO busy (Failed to add edge detection)")
            super().start(events)

    panel = BusyPanel()
    box = Box(tmp_path, key_files, panel=panel).start()
    try:
        wait_until(lambda: any("fault_cleared" in s.kinds("panel") for s in box.sealed()), 60,
                   "the panel joined", box)
        wait_until(lambda: panel.recording_led, 30, "the recording LED", box)
    finally:
        box.stop()
    sealed = box.sealed()
    fault_seq, fault = first_event(sealed, "fault", "panel")
    cleared_seq, cleared = first_event(sealed, "fault_cleared", "panel")
    assert "GPIO busy" in fault["detail"]["reason"] and cleared["detail"]["attempts"] == 3
    assert fault_seq < cleared_seq
    assert any(s.frames > 0 and s.samples > 0 for s in session_segments(sealed)
               if s.header["seq"] < cleared_seq)
    box.verify()


class FakeQuality:
    """A clock-quality source (the shape of devices.clock.ClockQuality) whose RTC can vanish."""

    def __init__(self) -> None:
        self.rtc_ok = False

    def report(self):
        from dualrec.devices.clock import ClockReport

        if self.rtc_ok:
            return ClockReport(True, -1, "rtc", "RTC agrees with the system clock")
        return ClockReport(False, -1, "rtc", "no RTC at /dev/rtc0")

    def sync_state(self) -> tuple[bool, int]:
        r = self.report()
        return r.synced, r.est_error_ns


def test_rtc_absent_is_a_clock_fault_until_it_is_back(tmp_path, key_files, monkeypatch):
    """Tried: a board whose clock quality comes from an RTC that is absent, then present.
    Asserted: a `fault` {device: clock} naming the RTC, the clock LED pattern, recording
    unaffected; `fault_cleared` and a dark LED once the RTC reads valid."""
    import dualrec.gateway as gateway_mod

    monkeypatch.setattr(gateway_mod, "CLOCK_POLL_NS", 200_000_000)
    quality = FakeQuality()
    box = Box(tmp_path, key_files, sync_state=quality.sync_state, clock_source="rtc").start()
    try:
        panel = box.gw.devices.panel
        wait_until(lambda: panel.fault_pattern == "clock", 30, "the clock pattern", box)
        quality.rtc_ok = True
        wait_until(lambda: panel.fault_pattern is None, 30, "the LED dark", box)
        wait_until(lambda: any("fault_cleared" in s.kinds("clock") for s in box.sealed()), 30,
                   "fault_cleared sealed", box)
    finally:
        box.stop()
    sealed = box.sealed()
    _, fault = first_event(sealed, "fault", "clock")
    assert fault["detail"]["reason"] == "no RTC at /dev/rtc0"
    assert all(s.frames > 0 and s.samples > 0 for s in session_segments(sealed)
               if not s.header["final"])
    box.verify()


def test_recorder_loop_exception_is_logged_once_on_record_and_retried(tmp_path, key_files,
                                                                      caplog):
    """Tried: the recorder loop's tick raises an unexpected KeyError once. Asserted: one
    traceback in the log, a `fault` {device: internal, part: recorder} on record, the loop
    goes on (segments keep being sealed after it) and `fault_cleared` follows."""
    caplog.set_level(logging.WARNING, logger="dualrec.devices.runtime")
    box = Box(tmp_path, key_files)
    box.gw.supervisor.clear_after_s = 1.0
    tick = box.gw.recorder.tick
    raised = []

    def tick_once_broken(now: int) -> None:
        if not raised and now - box.started_ns > 3 * NS:
            raised.append(now)
            raise KeyError("injected")
        tick(now)

    box.gw.recorder.tick = tick_once_broken
    box.start()
    try:
        wait_until(lambda: any("fault_cleared" in s.kinds("internal") for s in box.sealed()),
                   60, "fault_cleared sealed", box)
        n = len(box.sealed())
        wait_until(lambda: len(box.sealed()) > n, 30, "a segment sealed after that", box)
    finally:
        box.stop()
    assert len([r for r in caplog.records if r.exc_info and "recorder" in r.getMessage()]) == 1
    _, fault = first_event(box.sealed(), "fault", "internal")
    assert fault["detail"]["part"] == "recorder" and "KeyError" in fault["detail"]["reason"]
    box.verify()


def test_run_exits_70_when_a_part_cannot_recover(tmp_path, key_files, monkeypatch):
    """Tried: `dualrec run` (in-process) where the clock watcher's check always raises and the
    supervisor gives a part up after 2 failures. Asserted: the command ends by itself with
    exit status 70 (so systemd, which stops restarting only on 78, restarts it) and says why."""
    from click.testing import CliRunner

    import dualrec.devices.runtime as runtime_mod
    from dualrec.cli import main

    monkeypatch.setattr(runtime_mod, "FATAL_AFTER", 2)
    monkeypatch.setattr(runtime_mod, "BACKOFF_FIRST_S", 0.1)
    monkeypatch.setattr(Timebase, "check", lambda self: 1 / 0)
    board = small_board(tmp_path)
    site = write_site(tmp_path / "site.toml", key_files, extra="min_free_mb = 0\n")
    got = CliRunner().invoke(main, ["run", "--board", str(board), "--site", str(site),
                                    "--duration", "120"])
    assert got.exit_code == 70, got.output
    assert "clock-watch cannot recover after 2 failure(s): ZeroDivisionError" in got.output
