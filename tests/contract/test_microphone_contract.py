"""The microphone contract, run against every implementation; then what only a fake can show.

Implementations under the one contract:

- ``sim``: SimMicrophone.
- ``alsa``: PyAudioMicrophone on real pyaudio, real PortAudio 19.6 and real alsa-lib. The ALSA
  configuration is tests/alsa/asoundrc (set as the whole configuration through
  ALSA_CONFIG_PATH): PCM ``dualrec_mic`` is alsa-lib's file plugin over its null plugin, reading
  a FIFO that a writer thread here fills in real time with a ramp. Nothing is mocked between
  the writer and the AudioBlocks.
- ``fake``: PyAudioMicrophone on tests/fakes/pyaudio_fake.py, with ADC times in CLOCK_REALTIME
  at an offset that is not this machine's.

Contract: the format; a 1.5 s run delivers rate * 1.5 frames within a few blocks; blocks are
contiguous (each starts where the previous ended, within 1 ms); t_mono_ns is CLOCK_MONOTONIC
(a block arrives after its last sample, and not long after); the PCM is whole; stop() is
bounded and nothing arrives after it; no fault on a healthy device.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import itertools
import os
import queue
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dualrec.config import MicrophoneProfile
from dualrec.devices import pyaudio_microphone as pm
from dualrec.devices.base import AudioFormat, DeviceError
from dualrec.devices.pyaudio_microphone import PyAudioMicrophone, SampleClock
from dualrec.samples import AudioBlock, Event
from dualrec.sim.microphone import SimMicrophone
from fakes.pyaudio_fake import FakeAudioWorld, FakeDevice

pytestmark = [pytest.mark.timeout(60), pytest.mark.xdist_group("timing")]  # real-time counts

NS = 1_000_000_000
RATE, CHANNELS, BLOCK = 48000, 1, 960
BLOCK_NS = BLOCK * NS // RATE
RUN_S = 1.5
STOP_BOUND_S = pm.STOP_TIMEOUT_S + 0.5
ASOUNDRC = Path(__file__).resolve().parents[1] / "alsa" / "asoundrc"
# The fake machine's CLOCK_REALTIME - CLOCK_MONOTONIC: nothing like this machine's, so a
# backend converting with the wrong clock is off by days.
FAKE_OFFSET_NS = 1_234_567_890_123_456_789


def profile(device: str, **kw: Any) -> MicrophoneProfile:
    return MicrophoneProfile(backend="pyaudio", device=device, rate=kw.get("rate", RATE),
                             channels=kw.get("channels", CHANNELS),
                             block_frames=kw.get("block_frames", BLOCK))


# --- the real ALSA device ------------------------------------------------------------------


class FifoSource:
    """Feeds the dualrec_mic PCM like an ADC: a ramp, one period at a time, in real time.

    A FIFO keeps what nobody read, and a stream starting on periods written long before would
    begin with a backlog no sound card has (ALSA empties its buffer when a stream starts). So
    the source writes one period and waits until it is read, which is the stream starting;
    from then on period k is written when its last sample is due, t0 + k * period, late ones
    at once (the pipe is the device's ring buffer: 64 KiB, 0.68 s at 48 kHz mono), none ever
    skipped. Whatever the load, the device's sample clock is CLOCK_MONOTONIC."""

    def __init__(self, path: Path, frames: int = BLOCK, channels: int = CHANNELS,
                 rate: int = RATE) -> None:
        self.path = path
        self.frames, self.channels, self.rate = frames, channels, rate
        os.mkfifo(path)
        # O_RDWR: the FIFO always has a writer, so ALSA's open(O_RDONLY) never blocks and a
        # reader closing (PortAudio probes every PCM at start-up) never breaks the pipe.
        # O_NONBLOCK: a full pipe after the stream stopped must not hang this thread.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fifo-source", daemon=True)
        self.written = 0  # frames
        self.started_ns: int | None = None  # when the stream read the first period

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self._fd)

    def _run(self) -> None:
        self._write()
        while self._unread() > 0:
            if self._stop.wait(0.001):
                return
        t0 = self.started_ns = time.monotonic_ns()
        period_ns = self.frames * NS / self.rate
        k = 1
        while not self._stop.is_set():
            wait = t0 + round(k * period_ns) - time.monotonic_ns()
            if wait > 0:
                self._stop.wait(wait / NS)
                continue
            self._write()
            k += 1

    def _write(self) -> None:
        first = self.written
        ramp = (np.arange(first, first + self.frames, dtype=np.int64) & 0xFFFF).astype("<u2")
        data = memoryview(np.repeat(ramp, self.channels).tobytes())
        while data and not self._stop.is_set():
            try:
                data = data[os.write(self._fd, data):]
            except BlockingIOError:
                self._stop.wait(0.005)  # the pipe is full: the stream has stopped reading
        self.written += self.frames

    def _unread(self) -> int:
        buf = array.array("i", [0])
        fcntl.ioctl(self._fd, termios.FIONREAD, buf)
        return buf[0]


@contextlib.contextmanager
def alsa_env(fifo: Path | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        # alsa-lib re-reads its configuration when ALSA_CONFIG_PATH names other files, so
        # this takes effect at the next PyAudio() even if PortAudio ran before in this process.
        mp.setenv("ALSA_CONFIG_PATH", str(ASOUNDRC))
        mp.setenv("JACK_NO_START_SERVER", "1")
        if fifo is None:
            mp.delenv("DUALREC_ALSA_FIFO", raising=False)
        else:
            mp.setenv("DUALREC_ALSA_FIFO", str(fifo))
        yield


# --- one recorded run per implementation ---------------------------------------------------


@dataclass
class Recording:
    kind: str
    format: AudioFormat
    blocks: list[tuple[int, AudioBlock]]  # (arrival CLOCK_MONOTONIC ns, block)
    events: list[Event]
    start_ns: int
    started_ns: int  # start() returned: the device runs
    stop_called_ns: int
    stop_returned_ns: int
    after_stop: list[AudioBlock]
    ramp: bool  # the source is a ramp: frame number modulo 2**16
    expect_adc_clock: str | None  # what the backend must detect and record; None: no such event


def record(kind: str, mic: Any, **kw: Any) -> Recording:
    q: queue.Queue[tuple[int, AudioBlock]] = queue.Queue()
    events: list[Event] = []
    start = time.monotonic_ns()
    mic.start(lambda b: q.put((time.monotonic_ns(), b)), events.append)
    started = time.monotonic_ns()
    time.sleep(RUN_S)
    stop_called = time.monotonic_ns()
    mic.stop()
    stop_returned = time.monotonic_ns()
    blocks: list[tuple[int, AudioBlock]] = []
    while not q.empty():
        blocks.append(q.get_nowait())
    time.sleep(0.3)
    after = [b for _, b in (q.get_nowait() for _ in range(q.qsize()))]
    return Recording(kind, mic.format, blocks, events, start, started, stop_called,
                     stop_returned, after, **kw)


@pytest.fixture(scope="module", params=["sim", "alsa", "fake"])
def rec(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    kind = request.param
    if kind == "sim":
        return record(kind, SimMicrophone(rate=RATE, channels=CHANNELS, block_frames=BLOCK),
                      ramp=False, expect_adc_clock=None)
    if kind == "alsa":
        fifo = tmp_path_factory.mktemp("alsa") / "mic.fifo"
        source = FifoSource(fifo)
        source.start()
        try:
            with alsa_env(fifo):
                return record(kind, PyAudioMicrophone(profile("dualrec_mic")), ramp=True,
                              expect_adc_clock="monotonic")
        finally:
            source.stop()
    world = FakeAudioWorld(realtime_offset_ns=FAKE_OFFSET_NS)
    world.device("USB PnP Sound Device: Audio (hw:1,0)").adc_clock = "realtime"
    mic = PyAudioMicrophone(profile("PnP"), pyaudio_module=world.module,
                            realtime_ns=world.realtime_ns)
    return record(kind, mic, ramp=True, expect_adc_clock="realtime")


def _blocks(rec: Recording) -> list[AudioBlock]:
    assert rec.blocks, f"{rec.kind}: no audio at all"
    return [b for _, b in rec.blocks]


# --- the contract --------------------------------------------------------------------------


def test_format(rec: Recording) -> None:
    assert rec.format == AudioFormat(rate=RATE, channels=CHANNELS)


def test_real_time_sample_count(rec: Recording) -> None:
    frames = sum(b.frames for b in _blocks(rec))
    ran_s = (rec.stop_called_ns - rec.started_ns) / NS
    assert abs(frames - ran_s * RATE) <= 3 * BLOCK, (
        f"{rec.kind}: {frames} frames in {ran_s:.3f} s, expected {ran_s * RATE:.0f} within "
        "3 blocks")


def test_blocks_are_contiguous(rec: Recording) -> None:
    blocks = _blocks(rec)
    for a, b in itertools.pairwise(blocks):
        gap = b.t_mono_ns - (a.t_mono_ns + a.frames * NS // RATE)
        assert abs(gap) <= 1_000_000, f"{rec.kind}: {gap / 1e6:.3f} ms between blocks"
        assert not b.overflow


def test_stamped_in_clock_monotonic(rec: Recording) -> None:
    for arrival, b in rec.blocks:
        end = b.t_mono_ns + b.frames * NS // RATE
        # delivered after its last sample (allowing the ADC anchor's error), and soon after
        assert end <= arrival + 50_000_000, f"{rec.kind}: block stamped in the future"
        assert arrival - end <= 300_000_000, f"{rec.kind}: stamp {(arrival - end) / 1e6} ms old"
    first = _blocks(rec)[0].t_mono_ns
    assert abs(first - rec.start_ns) <= 300_000_000


def test_pcm_is_whole(rec: Recording) -> None:
    blocks = _blocks(rec)
    for b in blocks:
        assert b.frames > 0 and len(b.pcm) == b.frames * CHANNELS * 2
    if rec.ramp:
        # every sample the device produced, in order, none twice
        pcm = np.frombuffer(b"".join(b.pcm for b in blocks), "<u2").astype(np.int64)
        steps = np.diff(pcm[::CHANNELS]) % 0x10000
        assert np.count_nonzero(steps != 1) == 0, f"{rec.kind}: samples lost or repeated"


def test_stop_is_bounded_and_final(rec: Recording) -> None:
    assert (rec.stop_returned_ns - rec.stop_called_ns) / NS < STOP_BOUND_S
    assert rec.after_stop == [], f"{rec.kind}: {len(rec.after_stop)} blocks after stop()"


def test_no_fault_on_a_healthy_device(rec: Recording) -> None:
    assert [e for e in rec.events if e.kind == "fault"] == []


def test_timestamp_clock_is_on_record(rec: Recording) -> None:
    clocks = [e.detail for e in rec.events
              if e.kind == "audio_clock" and "reanchor" not in e.detail]
    if rec.expect_adc_clock is None:
        assert clocks == []  # the simulated microphone has no ADC clock to report
        return
    assert [c["adc_clock"] for c in clocks] == [rec.expect_adc_clock]
    # the ADC stamp of the first block is at most a couple of blocks old when it arrives
    assert 0 <= clocks[0]["adc_age_ns"] < 3 * BLOCK_NS + 50_000_000


# --- real ALSA, beyond the contract --------------------------------------------------------


def test_alsa_null_pcm_stamps_realtime() -> None:
    """The bare null PCM (free-running, so not in the contract) is the real PCM whose ADC times
    are CLOCK_REALTIME: the backend must see that and still stamp in CLOCK_MONOTONIC."""
    events: list[Event] = []
    arrivals: list[tuple[int, int]] = []
    with alsa_env(None):
        mic = PyAudioMicrophone(profile("dualrec_null"))
        mic.start(lambda b: arrivals.append((time.monotonic_ns(), b.t_mono_ns))
                  if len(arrivals) < 5 else None, events.append)
        time.sleep(0.2)
        mic.stop()
    first = next(e.detail for e in events if e.kind == "audio_clock")
    assert first["adc_clock"] == "realtime"
    assert 0 <= first["adc_age_ns"] < 50_000_000
    arrival, t = arrivals[0]
    assert -1_000_000 <= arrival - t < 100_000_000  # the first block, in CLOCK_MONOTONIC


def test_alsa_no_matching_device_lists_the_devices() -> None:
    with alsa_env(None), pytest.raises(DeviceError) as err:
        PyAudioMicrophone(profile("USB Audio")).start(lambda b: None, lambda e: None)
    text = str(err.value)
    assert "'USB Audio'" in text and "'dualrec_null'" in text and "'default'" in text
    # without its FIFO the paced PCM does not open, so PortAudio does not list it
    assert "dualrec_mic" not in text


# --- the fake: what a real device will not do on demand -----------------------------------


@dataclass
class FakeRun:
    world: FakeAudioWorld
    mic: PyAudioMicrophone
    blocks: list[AudioBlock] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeRun:
        def sink(b: AudioBlock) -> None:
            with self.lock:
                self.blocks.append(b)

        self.mic.start(sink, self.events.append)
        return self

    def wait_blocks(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.blocks) >= n:
                    return
            time.sleep(0.01)
        raise AssertionError(f"only {len(self.blocks)} of {n} blocks")

    def wait_event(self, kind: str, timeout: float = 5.0) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if e.kind == kind:
                    return e
            time.sleep(0.01)
        raise AssertionError(f"no {kind} event in {self.events}")

    def stream(self) -> Any:
        return self.world.history[-1]


def fake_run(device: str = "PnP", world: FakeAudioWorld | None = None, **kw: Any) -> FakeRun:
    world = world or FakeAudioWorld(realtime_offset_ns=FAKE_OFFSET_NS)
    mic = PyAudioMicrophone(profile(device, **kw), pyaudio_module=world.module,
                            realtime_ns=world.realtime_ns)
    return FakeRun(world, mic)


def assert_matches_truth(run: FakeRun, tolerance_ns: int = 100_000) -> None:
    """Each block's t_mono_ns is the fake's true capture time of its first frame (one block
    per callback, in order: the n-th block is the n-th entry of the stream's log)."""
    log = run.stream().log
    assert len(run.blocks) >= 5 and len(run.blocks) <= len(log)
    for b, (frame, truth) in zip(run.blocks, log, strict=False):
        assert abs(b.t_mono_ns - truth) <= tolerance_ns, (
            f"device frame {frame}: {(b.t_mono_ns - truth) / 1e3:.1f} µs off")


def test_fake_overflow_marks_the_block_and_leaves_the_gap() -> None:
    run = fake_run().start()
    try:
        run.wait_blocks(5)
        skipped = 7 * BLOCK + 123  # not a whole number of blocks
        run.world.overflow(skipped)
        run.wait_blocks(len(run.blocks) + 5)
    finally:
        run.mic.stop()
    flagged = [i for i, b in enumerate(run.blocks) if b.overflow]
    assert len(flagged) == 1 and run.mic.overflows == 1
    i = flagged[0]
    before, after = run.blocks[i - 1], run.blocks[i]
    gap = after.t_mono_ns - (before.t_mono_ns + before.frames * NS // RATE)
    assert abs(gap - skipped * NS // RATE) <= 100_000, f"gap {gap} ns for {skipped} frames"
    # the PCM after the hole is the device's, from where it resumed
    first = int(np.frombuffer(after.pcm[:2], "<u2")[0])
    last = int(np.frombuffer(before.pcm[-2:], "<u2")[0])
    assert (first - last) % 0x10000 == skipped + 1
    jumps = [e.detail for e in run.events if e.detail.get("reanchor") == "overflow"]
    assert len(jumps) == 1 and abs(jumps[0]["jump_ns"] - skipped * NS // RATE) <= 100_000
    assert_matches_truth(run)


def test_fake_no_matching_device_lists_the_input_devices() -> None:
    run = fake_run("Blue Yeti")
    with pytest.raises(DeviceError) as err:
        run.mic.start(lambda b: None, lambda e: None)
    text = str(err.value)
    assert "'Blue Yeti'" in text
    assert "'USB PnP Sound Device: Audio (hw:1,0)' (1 ch)" in text and "'default'" in text
    assert "Headphones" not in text  # output-only devices are no microphones
    assert run.world.instances == 0  # PortAudio terminated again


@pytest.mark.parametrize("kw, why", [({"rate": 16000}, "16000 Hz.*Invalid sample rate"),
                                     ({"channels": 2}, "Invalid number of channels")])
def test_fake_unsupported_rate_or_channels(kw: dict[str, Any], why: str) -> None:
    run = fake_run(**kw)  # the USB microphone does 44.1 and 48 kHz, mono
    with pytest.raises(DeviceError, match=why):
        run.mic.start(lambda b: None, lambda e: None)
    assert run.world.instances == 0


def test_fake_empty_device_name_takes_the_default_input() -> None:
    run = fake_run("").start()
    try:
        run.wait_blocks(2)
    finally:
        run.mic.stop()
    assert run.mic.device_name == "default"


@pytest.mark.parametrize("adc_clock", ["realtime", "monotonic"])
def test_fake_adc_time_converted_exactly(adc_clock: str) -> None:
    """ADC times in either clock become the true CLOCK_MONOTONIC capture times, even with the
    callback 40 ms late (stamping on arrival would be off by that)."""
    run = fake_run()
    dev = run.world.device("USB PnP Sound Device: Audio (hw:1,0)")
    dev.adc_clock, dev.latency_ns = adc_clock, 40_000_000
    run.start()
    try:
        run.wait_blocks(10)
    finally:
        run.mic.stop()
    clock = run.wait_event("audio_clock").detail
    assert clock["adc_clock"] == adc_clock
    # a block's last sample plus the callback's lateness, plus what scheduling adds
    assert 0 <= clock["adc_age_ns"] - (BLOCK_NS + 40_000_000) < 250_000_000
    assert_matches_truth(run)


def test_fake_zero_adc_time_falls_back_to_arrival() -> None:
    run = fake_run()
    run.world.device("USB PnP Sound Device: Audio (hw:1,0)").adc_clock = "none"
    run.start()
    try:
        run.wait_blocks(10)
    finally:
        run.mic.stop()
    assert run.wait_event("audio_clock").detail["adc_clock"] == "none"
    # arrival minus one block: late by the callback latency (5 ms) plus scheduling
    assert_matches_truth(run, tolerance_ns=30_000_000)
    blocks = run.blocks
    for a, b in itertools.pairwise(blocks):
        assert abs(b.t_mono_ns - a.t_mono_ns - BLOCK_NS) <= 30_000


def test_fake_unplugged_device_is_a_fault_then_comes_back() -> None:
    run = fake_run().start()
    try:
        run.wait_blocks(5)
        name = "USB PnP Sound Device: Audio (hw:1,0)"
        dev = run.world.unplug(name)
        fault = run.wait_event("fault")
        assert fault.detail["device"] == "microphone" and fault.detail["name"] == name
        assert "stopped" in fault.detail["reason"]
        n = len(run.blocks)
        time.sleep(0.5)
        assert len(run.blocks) == n  # nothing while unplugged
        replugged_ns = time.monotonic_ns()
        run.world.plug(dev)
        cleared = run.wait_event("fault_cleared", timeout=pm.REOPEN_INTERVAL_S + 3)
        run.wait_blocks(n + 5)
    finally:
        run.mic.stop()
    assert cleared.detail["gap_ns"] >= 500_000_000
    before, after = run.blocks[n - 1], run.blocks[n]
    # the outage is a gap in the timeline, not absorbed: the device's new first block is
    # stamped after it came back
    assert after.t_mono_ns > replugged_ns
    assert after.t_mono_ns - (before.t_mono_ns + BLOCK_NS) >= 500_000_000
    assert_matches_truth(run.__class__(run.world, run.mic, run.blocks[n:]))
    assert run.world.instances == 0  # every PortAudio session, failed reopens too, terminated


def test_fake_stalled_stream_is_a_fault() -> None:
    run = fake_run().start()
    try:
        run.wait_blocks(3)
        run.world.stall(True)
        fault = run.wait_event("fault", timeout=3)
    finally:
        run.world.stall(False)
        run.mic.stop()
    assert "stalled" in fault.detail["reason"]


def test_fake_stop_is_bounded_when_portaudio_hangs() -> None:
    run = fake_run().start()
    try:
        run.wait_blocks(3)
        run.world.hang_stop(True)
        t0 = time.monotonic()
        run.mic.stop()
        took = time.monotonic() - t0
        n = len(run.blocks)
        time.sleep(0.2)
        assert len(run.blocks) == n  # the stream still runs in the fake, but delivers nothing
    finally:
        run.world.hang_stop(False)
    assert took < STOP_BOUND_S


def test_fake_failing_sink_does_not_kill_the_stream() -> None:
    world = FakeAudioWorld(realtime_offset_ns=FAKE_OFFSET_NS)
    mic = PyAudioMicrophone(profile("PnP"), pyaudio_module=world.module,
                            realtime_ns=world.realtime_ns)
    events: list[Event] = []
    calls = []

    def sink(b: AudioBlock) -> None:
        calls.append(b)
        raise RuntimeError("queue gone")

    mic.start(sink, events.append)
    try:
        time.sleep(0.3)
        assert world.history[-1].is_active()
    finally:
        mic.stop()
    assert len(calls) >= 5
    faults = [e for e in events if e.kind == "fault"]
    assert len(faults) == 1 and "queue gone" in faults[0].detail["reason"]


def test_fake_start_twice_is_refused() -> None:
    run = fake_run().start()
    try:
        with pytest.raises(DeviceError, match="already"):
            run.mic.start(lambda b: None, lambda e: None)
    finally:
        run.mic.stop()


def test_fake_fast_crystal_is_followed_without_breaking_blocks() -> None:
    run = fake_run()
    run.world.device("USB PnP Sound Device: Audio (hw:1,0)").rate_error_ppm = 500.0
    run.start()
    try:
        run.wait_blocks(int(2.5 * RATE / BLOCK))
    finally:
        run.mic.stop()
    log = run.stream().log
    _, truth = log[len(run.blocks) - 1]
    # after 2.5 s the 500 ppm device is 1.25 ms ahead of the nominal rate; the timeline follows
    assert abs(run.blocks[-1].t_mono_ns - truth) < 600_000
    for a, b in itertools.pairwise(run.blocks):
        assert abs(b.t_mono_ns - a.t_mono_ns - BLOCK_NS) <= 30_000


# --- the sample clock on its own -----------------------------------------------------------


def _simulate(clock: SampleClock[int], blocks: int, true_ns: Callable[[int], int],
              ref_ns: Callable[[int], int | None],
              lost: set[int] | None = None) -> list[tuple[int, int, int | None]]:
    """Feed `blocks` blocks; true_ns(k) / ref_ns(k): truth and reference of block k. Returns
    (stamp, truth, jump) per block, in order."""
    out = []
    for k in range(blocks):
        ready = clock.feed(BLOCK, ref_ns(k), true_ns(k) + BLOCK_NS, k, lost=k in (lost or set()))
        out += [(t, true_ns(i), jump) for t, i, jump in ready]
    out += [(t, true_ns(i), jump) for t, i, jump in clock.flush()]
    assert len(out) == blocks
    return out


def test_sample_clock_follows_drift_within_slew_limits() -> None:
    rng = np.random.default_rng(1)
    ppm = 100  # a cheap USB microphone against CLOCK_MONOTONIC
    frame_ns = NS / (RATE * (1 + ppm * 1e-6))
    blocks = 1200 * RATE // BLOCK  # twenty minutes
    jitter = rng.uniform(-500_000, 500_000, blocks)
    out = _simulate(SampleClock(RATE), blocks, lambda k: round(10 * NS + k * BLOCK * frame_ns),
                    lambda k: round(10 * NS + k * BLOCK * frame_ns + jitter[k]))
    assert all(j is None for _, _, j in out)
    steps = [b[0] - a[0] - BLOCK_NS for a, b in itertools.pairwise(out)]
    assert max(abs(s) for s in steps) <= pm.MAX_SLEW_PPM * 1e-6 * BLOCK_NS + 1
    errors = [abs(t - true) for t, true, _ in out]
    assert max(errors) < 1_500_000  # an uncorrected counter would be 120 ms off by the end


def test_sample_clock_first_anchor_ignores_an_outlier() -> None:
    """A device's first period stamped 36 ms late (what the ALSA file plugin does, measured)
    does not set the timeline."""
    out = _simulate(SampleClock(RATE), 40, lambda k: k * BLOCK_NS,
                    lambda k: k * BLOCK_NS + (36_000_000 if k == 0 else 0))
    assert [t for t, _, _ in out] == [k * BLOCK_NS for k in range(40)]


def test_sample_clock_unflagged_loss_is_a_jump_not_absorbed() -> None:
    def true(k: int) -> int:
        return k * BLOCK_NS + (100_000_000 if k >= 200 else 0)  # 100 ms lost at block 200

    out = _simulate(SampleClock(RATE), 400, true, true)
    jumps = [(k, j) for k, (_, _, j) in enumerate(out) if j is not None]
    assert len(jumps) == 1 and 200 <= jumps[0][0] < 200 + pm.WINDOW
    assert jumps[0][1] == 100_000_000
    assert all(t == true_t for t, true_t, _ in out[jumps[0][0]:])


def test_sample_clock_overflow_reanchors_at_the_hole() -> None:
    def true(k: int) -> int:
        return k * BLOCK_NS + (12_345_678 if k >= 50 else 0)

    def ref(k: int) -> int:  # the first period after the restart is an outlier
        return true(k) + (25_000_000 if k == 50 else 0)

    out = _simulate(SampleClock(RATE), 60, true, ref, lost={50})
    assert [j for _, _, j in out] == [None] * 50 + [12_345_678] + [None] * 9
    assert all(t == true_t for t, true_t, _ in out)


def test_sample_clock_is_exact_at_44100() -> None:
    clock: SampleClock[int] = SampleClock(44100)
    ts = [t for k in range(100_000)  # 10 ms blocks; references only for the first ones
          for t, _, _ in clock.feed(441, 5 * NS + k * NS // 100 if k < 5 else None, 0, k)]
    assert ts[-1] == 5 * NS + 99_999 * 441 * NS // 44100  # no rounding drift over 1000 s


def test_sample_clock_needs_a_first_reference() -> None:
    clock: SampleClock[int] = SampleClock(RATE)
    assert clock.feed(BLOCK, None, 0, 0) == []
    with pytest.raises(ValueError):
        clock.flush()


def test_fake_device_list_reflects_plugging_only_after_reinit() -> None:
    world = FakeAudioWorld(devices=[FakeDevice("default")])
    pa = world.module.PyAudio()
    world.plug(FakeDevice("USB Audio Device: - (hw:2,0)", max_input_channels=1))
    assert pa.get_device_count() == 1  # PortAudio enumerates at initialisation only
    assert world.module.PyAudio().get_device_count() == 2
    with pytest.raises(OSError) as err:
        pa.get_device_info_by_index(5)
    assert err.value.args == (-9996, "Invalid device info")
    with pytest.raises(ValueError) as verr:
        pa.is_format_supported(8000, input_device=0, input_channels=1,
                               input_format=world.module.paInt16)
    assert verr.value.args == ("Invalid sample rate", -9997)
