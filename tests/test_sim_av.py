"""The simulated camera and microphone: real-time pacing, exact timestamps, H.264 structure,
clapper frames and beeps on the clapper instants, drops and faults."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np
import numpy.typing as npt
import pytest

from dualrec.samples import AudioBlock, Event, VideoPacket
from dualrec.sim.camera import SimCamera, burned_frame_number
from dualrec.sim.clapper import BEEP_HZ, BEEP_MS, claps_between
from dualrec.sim.microphone import SimMicrophone

NS = 1_000_000_000
CLAP_MS = 1000


@dataclass
class Run:
    """What a device produced, with the monotonic time each sample reached the sink."""

    samples: list[tuple[int, object]]
    events: list[Event]
    stop_called_ns: int
    stop_took_s: float
    cpu_s: float
    wall_s: float


def run_device(
    device: SimCamera | SimMicrophone,
    seconds: float,
    on_sample: Callable[[int], None] | None = None,
) -> Run:
    """Run the device for `seconds`; on_sample(n) is called in the device's thread after the
    n-th sample, to play a slow consumer."""
    samples: list[tuple[int, object]] = []
    events: list[Event] = []
    lock = threading.Lock()

    def sink(sample: object) -> None:
        with lock:
            samples.append((time.monotonic_ns(), sample))
            n = len(samples)
        if on_sample is not None:
            on_sample(n)

    cpu0, wall0 = time.process_time(), time.monotonic()
    device.start(sink, events.append)
    time.sleep(seconds)
    stop_called = time.monotonic_ns()
    device.stop()
    stop_took = (time.monotonic_ns() - stop_called) / NS
    return Run(
        samples=samples,
        events=events,
        stop_called_ns=stop_called,
        stop_took_s=stop_took,
        cpu_s=time.process_time() - cpu0,
        wall_s=time.monotonic() - wall0,
    )


T = TypeVar("T")


def samples_of(run: Run, kind: type[T]) -> list[T]:
    out = [s for _, s in run.samples if isinstance(s, kind)]
    assert len(out) == len(run.samples)
    return out


def nal_types(data: bytes) -> list[int]:
    """NAL unit types of an Annex B access unit, in order."""
    types = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        types.append(data[i + 3] & 0x1F)
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def decode_luma(packets: list[VideoPacket]) -> dict[int, npt.NDArray[np.uint8]]:
    """Decode with FFmpeg's h264 decoder; luma plane (limited range, as coded) by frame_index."""
    decoder = av.CodecContext.create("h264", "r")
    out: dict[int, npt.NDArray[np.uint8]] = {}
    for p in [*packets, None]:
        if p is None:
            frames = decoder.decode(None)
        else:
            packet = av.Packet(p.data)
            packet.pts = p.frame_index
            frames = decoder.decode(packet)
        for f in frames:
            assert isinstance(f, av.VideoFrame) and f.pts is not None
            planes = f.to_ndarray()
            assert planes.dtype == np.uint8
            out[f.pts] = planes[: f.height].astype(np.uint8)
    return out


def nearest_index(t_ns: int, t0_ns: int, rate: int) -> int:
    """Index of the frame/sample nearest t_ns on the grid t0 + i/rate (halves round up)."""
    return int(Fraction(t_ns - t0_ns) * rate / NS + Fraction(1, 2))


@pytest.mark.xdist_group("timing")  # real-time pacing: not beside the end-to-end runs
@pytest.mark.timeout(20)
def test_camera_stream() -> None:
    fps, gop = 30, 30
    cam = SimCamera(width=640, height=360, fps=fps, gop=gop, clap_period_ms=CLAP_MS)
    run = run_device(cam, 3.5)
    print(
        f"\nsim camera 640x360@{fps}: cpu {run.cpu_s:.3f} s over {run.wall_s:.2f} s wall "
        f"= {100 * run.cpu_s / run.wall_s:.1f} % of one core"
    )
    assert run.events == []
    assert run.stop_took_s < 1.0
    delivered = [d for d, _ in run.samples]
    pk = samples_of(run, VideoPacket)

    # Timestamps: exact frame grid t0 + i*NS//fps, strictly increasing, never in the future.
    t0 = pk[0].t_mono_ns - pk[0].frame_index * NS // fps
    for p in pk:
        assert p.t_mono_ns == t0 + p.frame_index * NS // fps
    for a, b in itertools.pairwise(pk):
        assert b.frame_index > a.frame_index
        assert abs((b.t_mono_ns - a.t_mono_ns) - (b.frame_index - a.frame_index) * NS / fps) <= 1
    for d, p in zip(delivered, pk, strict=True):
        assert p.t_mono_ns <= d < p.t_mono_ns + NS // 2

    # Count: one frame index per period from t0 until stop; frames the machine was too busy to
    # encode are skipped (counted as drops), a few on a loaded CI, never most.
    expected = (run.stop_called_ns - t0) * fps / NS
    assert abs(pk[-1].frame_index + 1 - expected) <= 2
    assert len(pk) >= 0.9 * expected

    # GOP: an IDR on the first frame of every gop (by frame index), with SPS/PPS inline first.
    last_gop = -1
    for p in pk:
        assert p.keyframe == (p.frame_index // gop != last_gop), p.frame_index
        last_gop = p.frame_index // gop
        types = nal_types(p.data)
        assert p.data.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))
        if p.keyframe:
            assert types[0] == 7 and 8 in types and 5 in types, types
        else:
            assert 5 not in types and 7 not in types, types
    assert pk[0].frame_index == 0 and pk[0].keyframe

    # Pictures: white exactly on the frames nearest each clapper instant, readable numbers
    # everywhere else.
    luma = decode_luma(pk)
    assert sorted(luma) == [p.frame_index for p in pk]
    half = NS // (2 * fps)
    claps = claps_between(pk[0].t_mono_ns - half, pk[-1].t_mono_ns + half + 1, cam.clap_period_ns)
    assert len(claps) >= 3
    white_expected = {nearest_index(c, t0, fps) for c in claps} & set(luma)
    white_seen = set()
    for i, y in luma.items():
        if y.min() >= 225:
            white_seen.add(i)
        else:
            assert y.mean() < 200, i
            assert burned_frame_number(y) == i
    assert white_seen == white_expected
    region = (slice(0, 100), slice(0, 300))
    first, second = sorted(i for i in luma if i not in white_seen)[:2]  # a loaded CI may drop
    assert not np.array_equal(luma[first][region], luma[second][region])


@pytest.mark.timeout(20)
def test_camera_skips_frames_when_late_and_keeps_gop_grid() -> None:
    fps, gop = 30, 10
    cam = SimCamera(width=320, height=180, fps=fps, gop=gop, clap_period_ms=CLAP_MS)

    def stall(n: int) -> None:
        if n == 4:  # hold the camera thread ~12 frames, across a gop boundary
            time.sleep(0.4)

    run = run_device(cam, 1.0, stall)
    assert run.events == []  # drops show as frame_index gaps, not as events
    pk = samples_of(run, VideoPacket)
    idx = [p.frame_index for p in pk]
    gaps = [(a, b) for a, b in itertools.pairwise(idx) if b - a > 1]
    assert gaps and gaps[0][0] == 3 and gaps[0][1] - gaps[0][0] >= 10
    t0 = pk[0].t_mono_ns
    last_gop = -1
    for p in pk:
        assert p.t_mono_ns == t0 + p.frame_index * NS // fps
        assert p.keyframe == (p.frame_index // gop != last_gop), p.frame_index
        last_gop = p.frame_index // gop
    # The stream stays decodable across the gap and the numbers still match.
    for i, y in decode_luma(pk).items():
        assert y.min() >= 225 or burned_frame_number(y) == i


@pytest.mark.timeout(20)
def test_camera_sink_error_is_a_fault_and_stops_the_thread() -> None:
    cam = SimCamera(width=320, height=180)
    calls: list[VideoPacket] = []
    events: list[Event] = []
    done = threading.Event()

    def sink(p: VideoPacket) -> None:
        calls.append(p)
        raise RuntimeError("boom")

    def on_event(e: Event) -> None:
        events.append(e)
        done.set()

    cam.start(sink, on_event)
    assert done.wait(2.0)
    time.sleep(0.2)
    cam.stop()
    assert len(calls) == 1
    assert [(e.kind, e.detail["device"]) for e in events] == [("fault", "camera")]
    assert "boom" in events[0].detail["reason"]


@pytest.mark.xdist_group("timing")
@pytest.mark.timeout(20)
def test_microphone_stream() -> None:
    rate, channels, block = 48000, 2, 960
    noise = 0.002
    mic = SimMicrophone(
        rate=rate, channels=channels, block_frames=block, clap_period_ms=CLAP_MS, noise_level=noise
    )

    def stall(n: int) -> None:
        if n == 3:  # a late consumer: the microphone must catch up, not skip
            time.sleep(0.1)

    run = run_device(mic, 2.5, stall)
    assert run.events == []
    assert run.stop_took_s < 1.0
    blocks = samples_of(run, AudioBlock)
    t0 = blocks[0].t_mono_ns

    # Every block full size; timestamps contiguous on the exact sample grid.
    for k, b in enumerate(blocks):
        assert b.frames == block and len(b.pcm) == block * channels * 2 and not b.overflow
        assert b.t_mono_ns == t0 + k * block * NS // rate
    for a, b in itertools.pairwise(blocks):
        assert abs((b.t_mono_ns - a.t_mono_ns) - block * NS / rate) <= 1
    # Delivered once the block's last sample has been "recorded", not before.
    for (d, _), b in zip(run.samples, blocks, strict=True):
        assert d >= b.t_mono_ns + block * NS // rate

    # Real time: every sample up to stop, to within one block (plus scheduling slack).
    total = len(blocks) * block
    due = (run.stop_called_ns - t0) * rate // NS
    assert 0 <= due - total < block + rate // 100

    x = np.frombuffer(b"".join(b.pcm for b in blocks), dtype="<i2").reshape(-1, channels)
    x = x.astype(np.float64)
    noise_rms = noise * 32767
    beep_n = BEEP_MS * rate // 1000
    t_end = t0 + len(x) * NS // rate
    claps = claps_between(t0 + 5_000_000, t_end - BEEP_MS * 1_000_000, mic.clap_period_ns)
    assert len(claps) >= 2

    # Envelope detection: onsets of |x| > 0.25 FS after at least 5 ms of quiet.
    loud = np.abs(x[:, 0]) > 0.25 * 32767
    onsets = []
    quiet_for = 0
    for n, is_loud in enumerate(loud):
        if is_loud and quiet_for >= rate // 200:
            onsets.append(n)
        quiet_for = 0 if is_loud else quiet_for + 1
    onset_times = [t0 + n * NS // rate for n in onsets]
    assert len(onset_times) == len(claps)
    for t, c in zip(onset_times, claps, strict=True):
        assert abs(t - c) <= 1_000_000

    # Sample accuracy: each beep is the reference sine starting on the sample nearest its clap,
    # on every channel; one sample off would leave a residual ~20x the noise.
    m = np.arange(beep_n)
    ref = 0.5 * 32767 * np.sin(2 * np.pi * BEEP_HZ * m / rate)
    for c in claps:
        n = nearest_index(c, t0, rate)
        for ch in range(channels):
            residual = x[n : n + beep_n, ch] - ref
            assert np.sqrt(np.mean(residual**2)) < 3 * noise_rms
            assert np.sqrt(np.mean(x[n - 48 : n, ch] ** 2)) < 3 * noise_rms
            assert np.sqrt(np.mean(x[n + beep_n : n + beep_n + 48, ch] ** 2)) < 3 * noise_rms


@pytest.mark.timeout(20)
def test_microphone_sink_error_is_a_fault_and_stops_the_thread() -> None:
    mic = SimMicrophone()
    calls: list[AudioBlock] = []
    events: list[Event] = []
    done = threading.Event()

    def sink(b: AudioBlock) -> None:
        calls.append(b)
        raise RuntimeError("boom")

    def on_event(e: Event) -> None:
        events.append(e)
        done.set()

    mic.start(sink, on_event)
    assert done.wait(2.0)
    time.sleep(0.1)
    mic.stop()
    assert len(calls) == 1
    assert [(e.kind, e.detail["device"]) for e in events] == [("fault", "microphone")]
    assert "boom" in events[0].detail["reason"]
