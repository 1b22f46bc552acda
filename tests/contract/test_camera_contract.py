"""One contract for every Camera implementation, then the picamera2 backend's failure modes.

The contract runs against SimCamera, ReplayCamera (a tiny pre-encoded clip) and PiCamera on the
fake picamera2 with each encoder. The libav case runs with an encoder that puts SPS/PPS before
the first IDR only (fake.ignore_repeat), so PiCamera's prepending of parameter sets is what keeps
every keyframe decodable on its own. Each implementation records once (module-scoped fixture)
and the contract's clauses are checked on that recording.

The fake picamera2 (tests/fakes) is importable only inside `fake_picamera2()`, so no other test
can pick it up by accident. It lives here, not in a tests/contract/conftest.py: a second
conftest module would shadow tests/conftest.py for the `from conftest import ...` of other tests.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import av
import pytest

from bench.clip import encode_clip
from dualrec.config import CameraProfile
from dualrec.devices.base import Camera, DeviceError, VideoFormat
from dualrec.devices.picamera2_camera import PiCamera
from dualrec.samples import Event, VideoPacket
from dualrec.sim.camera import SimCamera
from dualrec.sim.replay_camera import ReplayCamera

FAKES = str(Path(__file__).resolve().parents[1] / "fakes")

W, H, FPS, GOP, BITRATE = 320, 240, 30, 15, 300_000
RUN_S = 2.0
LAG_MAX_NS = 200_000_000
NS = 1_000_000_000

pytestmark = pytest.mark.xdist_group("timing")  # real-time frame counts: not beside the e2e runs
MS = 1_000_000


def _picamera2_modules() -> dict[str, ModuleType]:
    return {k: m for k, m in sys.modules.items() if k == "picamera2" or k.startswith("picamera2.")}


@contextmanager
def fake_picamera2() -> Iterator[ModuleType]:
    """The fake picamera2 package importable as `picamera2`, its knobs at defaults; a real one,
    if installed, is hidden meanwhile."""
    saved = _picamera2_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, FAKES)
    try:
        import picamera2

        picamera2.fake_reset()
        yield picamera2
    finally:
        sys.path.remove(FAKES)
        for name in _picamera2_modules():
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture
def picam_fake() -> Iterator[ModuleType]:
    with fake_picamera2() as module:
        yield module


def profile(encoder: str = "hardware", **changes: int) -> CameraProfile:
    fields: dict[str, Any] = {"backend": "picamera2", "encoder": encoder, "width": W, "height": H,
                              "fps": FPS, "gop": GOP, "bitrate": BITRATE} | changes
    return CameraProfile(**fields)


@dataclass
class Recording:
    camera: Camera
    packets: list[VideoPacket] = field(default_factory=list)
    delivered_ns: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stop_s: float = 0.0
    after_stop: int = 0
    sensor_timestamps: list[int] | None = None

    def faults(self, kind: str = "fault") -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def record(camera: Camera, seconds: float,
           during: Callable[[Recording], None] | None = None) -> Recording:
    """Start, run `seconds` (calling `during` meanwhile), stop, and watch for stragglers."""
    rec = Recording(camera)
    lock = threading.Lock()

    def sink(p: VideoPacket) -> None:
        now = time.monotonic_ns()
        with lock:
            rec.packets.append(p)
            rec.delivered_ns.append(now)

    camera.start(sink, rec.events.append)
    deadline = time.monotonic() + seconds
    if during is not None:
        during(rec)
    time.sleep(max(0.0, deadline - time.monotonic()))
    t0 = time.perf_counter()
    camera.stop()
    rec.stop_s = time.perf_counter() - t0
    with lock:
        n = len(rec.packets)
    time.sleep(0.2)
    rec.after_stop = len(rec.packets) - n
    return rec


def nal_types(data: bytes) -> list[int]:
    types = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(data):
        types.append(data[i + 3] & 0x1F)
        i = data.find(b"\x00\x00\x01", i + 3)
    return types


def decode(packets: list[VideoPacket]) -> list[av.VideoFrame]:
    ctx = av.CodecContext.create("h264", "r")
    frames: list[av.VideoFrame] = []
    for p in packets:
        frames += ctx.decode(av.Packet(p.data))  # type: ignore[arg-type]
    frames += ctx.decode(None)  # type: ignore[arg-type]
    return frames


# -- the implementations ---------------------------------------------------------------------

_clip: list[bytes] = []


def make_camera(kind: str) -> tuple[Camera, AbstractContextManager[ModuleType | None]]:
    if kind == "sim":
        return SimCamera(width=W, height=H, fps=FPS, gop=GOP, bitrate=BITRATE), nullcontext()
    if kind == "replay":
        if not _clip:
            _clip.extend(encode_clip(seconds=1, width=W, height=H, fps=FPS, gop=GOP,
                                     bitrate=BITRATE))
        return ReplayCamera(_clip, W, H, FPS), nullcontext()
    encoder = kind.removeprefix("picamera2-")
    return PiCamera(profile(encoder)), fake_picamera2()


IMPLEMENTATIONS = ["sim", "replay", "picamera2-hardware", "picamera2-libav"]


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def recording(request: pytest.FixtureRequest) -> Iterator[Recording]:
    camera, fake_ctx = make_camera(request.param)
    with fake_ctx as fake:
        if fake is not None and request.param.endswith("libav"):
            fake.fake.ignore_repeat = True
        rec = record(camera, RUN_S)
        if fake is not None:
            rec.sensor_timestamps = list(fake.fake.sensor_timestamps)
    yield rec


# -- the contract ----------------------------------------------------------------------------


def test_format_is_the_configured_one(recording: Recording) -> None:
    assert recording.camera.format == VideoFormat(codec="h264", width=W, height=H, fps=FPS)


def test_delivers_the_frame_rate(recording: Recording) -> None:
    expected = FPS * RUN_S
    assert 0.85 * expected <= len(recording.packets) <= expected + 2


def test_timestamps_increase_and_are_capture_times(recording: Recording) -> None:
    stamps = [p.t_mono_ns for p in recording.packets]
    assert all(b > a for a, b in itertools.pairwise(stamps))
    lags = [d - t for d, t in zip(recording.delivered_ns, stamps, strict=True)]
    assert min(lags) >= 0, "a packet stamped after it was delivered"
    assert max(lags) <= LAG_MAX_NS, f"delivered {max(lags) / MS:.0f} ms after capture"


def test_first_packet_is_a_keyframe_with_sps(recording: Recording) -> None:
    first = recording.packets[0]
    assert first.keyframe
    assert nal_types(first.data)[0] == 7


def test_every_keyframe_starts_with_sps_and_pps(recording: Recording) -> None:
    keyframes = [p for p in recording.packets if p.keyframe]
    assert len(keyframes) >= RUN_S * FPS // GOP - 1
    for p in keyframes:
        assert nal_types(p.data)[:2] == [7, 8], f"keyframe {p.frame_index}"
        assert 5 in nal_types(p.data)


def test_packets_decode_at_the_configured_size(recording: Recording) -> None:
    frames = decode(recording.packets)
    assert len(frames) == len(recording.packets)
    assert {(f.width, f.height) for f in frames} == {(W, H)}


def test_every_keyframe_decodes_alone(recording: Recording) -> None:
    # What a segment cut at that keyframe needs: a fresh decoder, from there on.
    starts = [i for i, p in enumerate(recording.packets) if p.keyframe]
    for i in starts:
        frames = decode(recording.packets[i : i + 3])
        assert len(frames) == len(recording.packets[i : i + 3]), f"from packet {i}"


def test_frame_index_increases(recording: Recording) -> None:
    indices = [p.frame_index for p in recording.packets]
    assert all(b > a for a, b in itertools.pairwise(indices))


def test_stop_is_prompt_and_final(recording: Recording) -> None:
    assert recording.stop_s < 1.0
    assert recording.after_stop == 0


def test_no_faults_in_a_normal_run(recording: Recording) -> None:
    assert recording.faults() == []


def test_stamps_are_the_capture_instants(recording: Recording) -> None:
    pk = recording.packets
    if recording.sensor_timestamps is not None:
        # picamera2: the exact sensor nanoseconds, not the microseconds it hands to an Output
        assert {p.t_mono_ns for p in pk} <= set(recording.sensor_timestamps)
    else:
        # sim and replay: every frame on its exact capture instant of the frame grid
        t0 = pk[0].t_mono_ns - pk[0].frame_index * NS // FPS
        assert all(p.t_mono_ns == t0 + p.frame_index * NS // FPS for p in pk)


# -- PiCamera on the fake: failure modes -----------------------------------------------------


def test_no_camera_is_a_device_error(picam_fake: ModuleType) -> None:
    picam_fake.fake.cameras = []
    with pytest.raises(IndexError):  # the library's own behaviour, which the fake mirrors
        picam_fake.Picamera2()
    with pytest.raises(DeviceError, match=r"no camera at sensor index 0.*found: none"):
        PiCamera(profile()).start(lambda p: None, lambda e: None)


def test_missing_sensor_index_is_a_device_error(picam_fake: ModuleType) -> None:
    with pytest.raises(DeviceError, match=r"no camera at sensor index 1.*0: imx219"):
        PiCamera(profile(sensor_index=1)).start(lambda p: None, lambda e: None)


def test_busy_camera_is_a_device_error(picam_fake: ModuleType) -> None:
    picam_fake.fake.busy = True
    with pytest.raises(DeviceError, match=r"cannot open the camera.*busy"):
        PiCamera(profile()).start(lambda p: None, lambda e: None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 3840, "height": 2160}, r"can only give 3280x2160, not 3840x2160"),
        ({"width": 1920, "height": 1080, "fps": 60}, r"at most 47.6 fps"),
    ],
)
def test_impossible_mode_is_a_device_error(picam_fake: ModuleType, changes: dict[str, int],
                                           message: str) -> None:
    with pytest.raises(DeviceError, match=message) as caught:
        PiCamera(profile("hardware", **changes)).start(lambda p: None, lambda e: None)
    assert "sensor modes: 640x480@103fps" in str(caught.value)
    assert all(not cam.is_open for cam in picam_fake.fake.instances)  # released for a retry


def test_hardware_encoder_on_a_pi5_is_refused(picam_fake: ModuleType) -> None:
    picam_fake.fake.platform = "PISP"
    with pytest.raises(DeviceError, match=r"encoder = \"libav\""):
        PiCamera(profile("hardware")).start(lambda p: None, lambda e: None)
    rec = record(PiCamera(profile("libav")), 0.5)
    assert rec.packets and not rec.faults()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("encoder", ["hardware", "libav"])
def test_encoder_error_is_a_fault(picam_fake: ModuleType, encoder: str) -> None:
    picam_fake.fake.encoder_error_after = 10
    rec = record(PiCamera(profile(encoder)), 0.8)
    reasons = [e.detail["reason"] for e in rec.faults()]
    assert any("encoder error" in r and "Input/output error" in r for r in reasons), reasons
    assert all(e.detail["device"] == "camera" for e in rec.faults())
    # picamera2's stop() never returns once its event loop is dead or blocked: ours must.
    assert rec.stop_s < 1.0
    assert rec.after_stop == 0
    assert 5 <= len(rec.packets) <= 11


def test_stall_is_one_fault_then_cleared(picam_fake: ModuleType) -> None:
    picam_fake.fake.stall_after = 20
    picam_fake.fake.stall_s = 1.3
    rec = record(PiCamera(profile()), 2.3)
    stalls = rec.faults()
    assert len(stalls) == 1 and "stalled" in stalls[0].detail["reason"], rec.events
    cleared = rec.faults("fault_cleared")
    assert len(cleared) == 1 and cleared[0].t_mono_ns > stalls[0].t_mono_ns
    jumps = [b.frame_index - a.frame_index for a, b in itertools.pairwise(rec.packets)]
    assert max(jumps) - 1 in range(32, 46), "frames missed during a 1.3 s stall at 30 fps"


def test_dropped_frames_advance_frame_index(picam_fake: ModuleType) -> None:
    picam_fake.fake.drop_frames = {10, 11, 12, 30}
    rec = record(PiCamera(profile()), 1.2)
    indices = [p.frame_index for p in rec.packets]
    # frame_index 0 is the sensor's frame 0, so the gaps are exactly the frames lost
    missing = set(range(indices[-1])) - set(indices)
    assert missing == {10, 11, 12, 30}
    assert rec.faults() == []


def test_sensor_clock_off_monotonic_is_a_fault(picam_fake: ModuleType) -> None:
    picam_fake.fake.clock_offset_ns = -30 * 1_000_000_000
    rec = record(PiCamera(profile()), 0.3)
    assert any("not the monotonic clock" in e.detail["reason"] for e in rec.faults())
