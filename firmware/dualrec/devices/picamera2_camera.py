"""The Raspberry Pi camera through picamera2: H.264 access units stamped at the sensor.

picamera2 is imported in start(), never at module import, so this module imports anywhere.

Pipeline: a video configuration at the profile's size with a fixed frame duration
(FrameDurationLimits min = max), the main stream in YUV420 (what both encoders take without a
colour conversion), an encoder feeding our own Output subclass, which turns each encoded frame
into a VideoPacket in the encoder's thread. Muxing stays in dualrec; FfmpegOutput is not used
(it restamps frames by wall clock).

- Encoder: profile.encoder "hardware" is picamera2's H264Encoder (the VideoCore's V4L2 encoder on
  a Pi 4, CM4, Zero 2 W); "libav" is LibavH264Encoder, libx264 in software, for a Pi 5, which has
  no H.264 block: it costs CPU (boards/rpi5.toml budgets about a core at 720p30). On a Pi 5
  picamera2 quietly makes H264Encoder *be* LibavH264Encoder; we refuse that, so a profile says
  which encoder (and CPU budget) it really gets. Both get repeat=True (SPS/PPS before every
  IDR), iperiod=gop, the bitrate and the frame rate (libx264's rate control needs the latter).
- Time: the timestamp picamera2 hands an Output is in microseconds *relative to the first frame*
  (Encoder._timestamp subtracts encoder.firsttimestamp). The exact SensorTimestamp (ns) is taken
  from each request in post_callback, which the camera's event loop runs just before
  encoder.encode() for the same request, and matched back by its microsecond value. On a Pi,
  SensorTimestamp is the V4L2 buffer timestamp of the sensor's frame start (CLOCK_MONOTONIC,
  whatever libcamera's documentation says about CLOCK_BOOTTIME), so it is t_mono_ns as it is. It
  marks the end of the first row's exposure; picamera2 itself subtracts ExposureTime from it to
  get the exposure start. We keep it unshifted: exact, steady, and within a frame of the
  picture's mid-exposure. A first frame far from CLOCK_MONOTONIC is reported as a fault.
- Drops: a gap between sensor timestamps of more than 1.5 frame intervals advances frame_index
  by the number of intervals it spans, so the segmenter counts the frames that never came
  (sensor request errors, frames the encoder skipped, a stall).
- Keyframes: a packet is a keyframe when it holds an IDR slice; each keyframe starts with
  SPS+PPS (the latest seen are prepended when the encoder did not repeat them), so any segment
  cut at a keyframe decodes alone. Header-only buffers (older picamera2 passes them on when the
  encoder skips an IDR) are held and prepended to the next keyframe, not delivered as frames.
- Faults: an exception that kills one of picamera2's threads (the V4L2 poll thread, the event
  loop running a software encoder) is caught by a chained threading.excepthook and reported;
  a watchdog reports "encoder stalled" once when no frame came for max(1 s, 5 frames), and
  "fault_cleared" when frames come again.
- stop(): picamera2's stop() waits with no timeout on its event loop, so a dead or blocked loop
  would hang it for good; stop_recording() and close() run in a helper thread that stop() waits
  for at most STOP_TIMEOUT_S. A camera that did not stop stays held until the process exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from dualrec.config import CameraProfile
from dualrec.devices.base import DeviceError, EventSink, VideoFormat, VideoSink
from dualrec.devices.runtime import EventEmitter
from dualrec.h264 import NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, START_CODE, VCL, nal_units
from dualrec.samples import VideoPacket

log = logging.getLogger(__name__)

NS = 1_000_000_000
STOP_TIMEOUT_S = 0.9  # inside the Camera contract's 1 s
STALL_MIN_NS = NS
STALL_FRAMES = 5
FIRST_FRAME_GRACE_NS = 3 * NS  # libcamera's start, AGC settling frames and the first encode
WATCHDOG_TICK_S = 0.05
CLOCK_SANITY_NS = 2 * NS  # a first frame further than this from "now" is on another clock
_SENSOR_NS_KEEP = 128  # request timestamps awaiting their encoded frame (16 in flight at most)

def _board_model() -> str:
    try:
        with open("/proc/device-tree/model", "rb") as f:
            return f.read().rstrip(b"\0").decode(errors="replace") or "unknown board"
    except OSError:
        return "unknown board (no /proc/device-tree/model)"


def _make_output_class(base: type) -> type:
    """An Output subclass (picamera2 insists on one) handing each encoded frame to `handler`."""

    class _PacketOutput(base):  # type: ignore[misc, valid-type]
        def __init__(self, handler: Callable[[Any, bool, int | None], None]) -> None:
            super().__init__()
            self._handler = handler

        def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                        packet: Any = None, audio: bool = False) -> None:
            if audio or frame is None:
                return
            self._handler(frame, keyframe, timestamp)

    return _PacketOutput


# One chained threading.excepthook serves every running PiCamera: an exception escaping a
# picamera2 thread is otherwise only printed, and the camera silently stops.
_hook_lock = threading.Lock()
_hooked: set[PiCamera] = set()
_previous_hook: Callable[[threading.ExceptHookArgs], Any] | None = None


def _excepthook(args: threading.ExceptHookArgs) -> None:
    for cam in list(_hooked):
        cam._library_thread_died(args)
    (_previous_hook or threading.__excepthook__)(args)


def _hook_install(cam: PiCamera) -> None:
    global _previous_hook
    with _hook_lock:
        _hooked.add(cam)
        if threading.excepthook is not _excepthook:
            _previous_hook = threading.excepthook
            threading.excepthook = _excepthook


def _hook_remove(cam: PiCamera) -> None:
    global _previous_hook
    with _hook_lock:
        _hooked.discard(cam)
        # Put the previous hook back only if nobody chained after us meanwhile.
        if not _hooked and threading.excepthook is _excepthook:
            threading.excepthook = _previous_hook or threading.__excepthook__
            _previous_hook = None


class PiCamera:
    """Camera protocol implementation on picamera2; see the module docstring."""

    def __init__(self, profile: CameraProfile) -> None:
        self.profile = profile
        self.format = VideoFormat(codec="h264", width=profile.width, height=profile.height,
                                  fps=profile.fps)
        # libcamera takes frame durations in whole microseconds; gaps are measured against it.
        self.frame_us = round(1_000_000 / profile.fps)
        self.stall_ns = max(STALL_MIN_NS, STALL_FRAMES * self.frame_us * 1000)
        self._lock = threading.Lock()  # frame state, fault flag, request timestamps
        self._gate = threading.Lock()  # held while a packet goes into the sink; see stop()
        self._open = False
        self._picam2: Any = None
        self._encoder: Any = None
        self._watchdog: threading.Thread | None = None
        self._halt = threading.Event()
        self._sink: VideoSink | None = None
        self._emit = EventEmitter("camera")  # events on record, from any thread
        self._library_dir = ""
        self._reset_stream_state()

    def _reset_stream_state(self) -> None:
        self._sensor_ns: OrderedDict[int, int] = OrderedDict()  # us -> exact ns, per request
        self._first_request_us: int | None = None
        self._last_t: int | None = None
        self._index = -1
        self._sps_pps: list[bytes] = []
        self._pending_headers: list[bytes] = []
        self._started_keyframe = False
        self._last_delivery_ns = 0
        self._frames = 0
        self._faulted = False
        self._reported: set[str] = set()

    # -- Camera protocol -------------------------------------------------------------------

    def start(self, sink: VideoSink, events: EventSink) -> None:
        if self._picam2 is not None:
            raise DeviceError("camera: already started")
        p = self.profile
        mode = f"{p.width}x{p.height}@{p.fps}fps"
        where = f"camera: {_board_model()}, sensor {p.sensor_index}, {mode}"
        try:
            import picamera2
            import picamera2.encoders as encoders
            from picamera2 import Picamera2
            from picamera2.outputs import Output
        except Exception as e:  # ImportError, or libcamera's bindings failing to load
            raise DeviceError(f"{where}: picamera2 is not usable ({type(e).__name__}: {e}); "
                              "install python3-picamera2 from Raspberry Pi OS") from e
        hardware: Any = encoders.H264Encoder
        libav: Any = getattr(encoders, "LibavH264Encoder", None)  # since picamera2 0.3.13
        if p.encoder == "libav" and libav is None:
            raise DeviceError(f"{where}: this picamera2 has no LibavH264Encoder; update "
                              "python3-picamera2")
        if p.encoder == "hardware" and libav is not None and issubclass(hardware, libav):
            # picamera2 aliases H264Encoder to LibavH264Encoder on a Pi 5, and (older versions)
            # whenever /dev/video11 could not be probed at import.
            raise DeviceError(f"{where}: the board profile asks for the hardware H.264 encoder, "
                              "but picamera2 found none (no /dev/video11; a Pi 5 has no H.264 "
                              "block) and would silently encode with libx264 on the CPU; on a "
                              "Pi 5 set [camera] encoder = \"libav\"")

        cameras = Picamera2.global_camera_info()
        if p.sensor_index >= len(cameras):
            found = ", ".join(f"{c.get('Num')}: {c.get('Model')} ({c.get('Id')})"
                              for c in cameras) or "none"
            raise DeviceError(f"{where}: no camera at sensor index {p.sensor_index}; cameras "
                              f"found: {found} (check the ribbon cable and camera_auto_detect)")
        try:
            picam2 = Picamera2(p.sensor_index)
        except Exception as e:  # IndexError (no such camera), RuntimeError (busy, broken)
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            raise DeviceError(f"{where}: cannot open the camera: {e}{cause} (is another "
                              "process using it?)") from e
        try:
            self._configure(picam2, where)
            make_encoder = libav if p.encoder == "libav" else hardware
            encoder = make_encoder(bitrate=p.bitrate, repeat=True, iperiod=p.gop,
                                   framerate=p.fps)
            output = _make_output_class(Output)(self._on_frame)
        except BaseException:
            self._close_quietly(picam2)
            raise

        self._reset_stream_state()
        self._sink, self._emit.events = sink, events
        # Frames of a dying thread's traceback under this directory make it a picamera2 thread.
        self._library_dir = os.path.dirname(os.path.abspath(picamera2.__file__ or "")) + os.sep
        self._picam2, self._encoder = picam2, encoder
        self._open = True
        self._halt.clear()
        self._last_delivery_ns = time.monotonic_ns()
        _hook_install(self)
        picam2.post_callback = self._on_request
        try:
            picam2.start_recording(encoder, output)
        except Exception as e:
            self._open = False
            self._picam2 = self._encoder = None
            _hook_remove(self)
            self._shutdown_bounded(picam2)
            raise DeviceError(f"{where}: cannot start recording with the {p.encoder} H.264 "
                              f"encoder: {type(e).__name__}: {e}") from e
        self._watchdog = threading.Thread(target=self._watch, name="picamera-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        picam2 = self._picam2
        if picam2 is None:
            return
        self._halt.set()
        stopped = self._shutdown_bounded(picam2)
        # From here on no packet reaches the sink: a frame still inside the sink finishes first.
        with self._gate:
            self._open = False
        self._picam2 = self._encoder = None
        _hook_remove(self)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(0.1)
        if not stopped:
            self._fault("did not stop within "
                        f"{STOP_TIMEOUT_S:.1f} s; the camera stays held until the process "
                        "restarts", key="stop")
        # Threads left behind (a hung stop) must not reach the gateway any more.
        self._sink = self._emit.events = None

    # -- setup helpers ---------------------------------------------------------------------

    def _configure(self, picam2: Any, where: str) -> None:
        p = self.profile
        config = picam2.create_video_configuration(
            main={"size": (p.width, p.height), "format": "YUV420"},
            controls={"FrameDurationLimits": (self.frame_us, self.frame_us)},
        )
        try:
            picam2.configure(config)
        except Exception as e:
            raise DeviceError(f"{where}: the camera refused the mode: {e}; sensor modes: "
                              f"{self._modes(picam2)}") from e
        got = tuple(picam2.camera_configuration()["main"]["size"])
        # libcamera adjusts an impossible size instead of refusing it: the recording's declared
        # format would then be false, so it is an error here.
        if got != (p.width, p.height):
            modes = self._modes(picam2)
            raise DeviceError(f"{where}: the camera can only give {got[0]}x{got[1]}, not "
                              f"{p.width}x{p.height}; sensor modes: {modes}")
        fastest_us = picam2.camera_controls["FrameDurationLimits"][0]
        if self.frame_us < fastest_us:
            raise DeviceError(f"{where}: the sensor mode for {p.width}x{p.height} runs at most "
                              f"{1e6 / fastest_us:.1f} fps; sensor modes: {self._modes(picam2)}")

    @staticmethod
    def _modes(picam2: Any) -> str:
        # Only on the error path: reading sensor_modes reconfigures the camera once per mode.
        try:
            modes = picam2.sensor_modes
            return ", ".join(f"{m['size'][0]}x{m['size'][1]}@{float(m['fps']):.0f}fps"
                             for m in modes) or "none listed"
        except Exception as e:
            return f"unknown ({type(e).__name__}: {e})"

    @staticmethod
    def _close_quietly(picam2: Any) -> None:
        try:
            picam2.close()
        except Exception:
            log.exception("camera: close failed")

    def _shutdown_bounded(self, picam2: Any) -> bool:
        """stop_recording and close in a helper thread, waited for STOP_TIMEOUT_S at most."""

        def shutdown() -> None:
            try:
                picam2.stop_recording()
            except Exception:
                log.exception("camera: stop_recording failed")
            self._close_quietly(picam2)

        helper = threading.Thread(target=shutdown, name="picamera-stop", daemon=True)
        helper.start()
        helper.join(STOP_TIMEOUT_S)
        return not helper.is_alive()

    # -- library threads -------------------------------------------------------------------

    def _on_request(self, request: Any) -> None:
        """post_callback, in the camera's event loop, just before the encoder takes `request`.
        It must never raise: an exception here would end the event loop."""
        try:
            ts = request.get_metadata().get("SensorTimestamp")
            if not isinstance(ts, int):
                return
            with self._lock:
                if self._first_request_us is None:
                    self._first_request_us = ts // 1000
                self._sensor_ns[ts // 1000] = ts
                while len(self._sensor_ns) > _SENSOR_NS_KEEP:
                    self._sensor_ns.popitem(last=False)
        except Exception as e:
            self._fault(f"reading request metadata: {type(e).__name__}: {e}", key="metadata")

    def _on_frame(self, frame: Any, keyframe: bool, timestamp: int | None) -> None:
        """Output.outputframe, in the encoder's thread. It must never raise: an exception here
        would kill the encoder's thread."""
        try:
            self._handle_frame(bytes(frame), timestamp)
        except Exception as e:
            self._fault(f"handling an encoded frame: {type(e).__name__}: {e}", key="frame")

    def _sensor_time(self, timestamp_us: int) -> int | None:
        first = getattr(self._encoder, "firsttimestamp", None)
        with self._lock:
            if first is None:
                first = self._first_request_us
            if first is None:
                return None
            absolute_us = first + timestamp_us
            exact = self._sensor_ns.pop(absolute_us, None)
            # Requests older than this one never produced a frame (encoder-skipped): forget them.
            while self._sensor_ns and next(iter(self._sensor_ns)) < absolute_us:
                self._sensor_ns.popitem(last=False)
        return exact if exact is not None else absolute_us * 1000

    def _handle_frame(self, data: bytes, timestamp_us: int | None) -> None:
        now = time.monotonic_ns()
        if timestamp_us is None:
            self._fault("encoder gave a frame without a timestamp", key="no-timestamp")
            return
        t = self._sensor_time(timestamp_us)
        if t is None:
            self._fault("encoder gave a frame before any request was seen", key="no-request")
            return
        nals = nal_units(data)
        kinds = {k for k, _ in nals}
        if not kinds & VCL:
            # SPS/PPS with no picture (an IDR the encoder skipped): keep for the next keyframe.
            self._pending_headers = [u for k, u in nals if k in (NAL_SPS, NAL_PPS)]
            return
        is_key = NAL_IDR in kinds
        if kinds & {NAL_SPS, NAL_PPS}:
            self._sps_pps = [u for k, u in nals if k in (NAL_SPS, NAL_PPS)]
        elif self._pending_headers:
            self._sps_pps = self._pending_headers
        self._pending_headers = []
        if is_key:
            complete = self._with_parameter_sets(data, nals)
            if complete is None:
                self._fault("encoder gave a keyframe without SPS/PPS and none were seen before",
                            key="no-sps")
                return
            data = complete
            self._started_keyframe = True
        elif not self._started_keyframe:
            return  # nothing decodes before the first keyframe

        if self._last_t is not None and t <= self._last_t:
            self._fault(f"sensor timestamp went back by {self._last_t - t} ns", key="backwards")
            return
        if self._last_t is None:
            lag = now - t
            if not -CLOCK_SANITY_NS < lag < CLOCK_SANITY_NS:
                self._fault(f"SensorTimestamp is {lag / 1e6:.0f} ms from CLOCK_MONOTONIC; the "
                            "sensor clock is not the monotonic clock", key="clock")
            self._index = 0
        else:
            gap = t - self._last_t
            frame_ns = self.frame_us * 1000
            # More than 1.5 intervals: frames were lost; count the intervals the gap spans.
            self._index += (2 * gap + frame_ns) // (2 * frame_ns) if 2 * gap > 3 * frame_ns else 1
        self._last_t = t
        packet = VideoPacket(t_mono_ns=t, data=data, keyframe=is_key, frame_index=self._index)
        with self._gate:
            if not self._open or self._sink is None:
                return
            self._sink(packet)
        self._frame_arrived(now)

    def _with_parameter_sets(self, data: bytes, nals: list[tuple[int, bytes]]) -> bytes | None:
        """The keyframe starting with SPS+PPS: as is when it does, else rebuilt around the
        latest parameter sets (an access unit delimiter is dropped: it must come first and is
        optional)."""
        if len(nals) >= 2 and nals[0][0] == NAL_SPS and nals[1][0] == NAL_PPS:
            return data
        if not self._sps_pps:
            return None
        rest = [u for k, u in nals if k not in (NAL_SPS, NAL_PPS, NAL_AUD)]
        sets = [START_CODE + u.lstrip(b"\x00")[1:] for u in self._sps_pps]
        return b"".join(sets + rest)

    # -- faults and the watchdog -----------------------------------------------------------

    def _frame_arrived(self, now: int) -> None:
        with self._lock:
            self._last_delivery_ns = now
            self._frames += 1
            recovered = self._faulted
            self._faulted = False
        if recovered:
            self._emit("fault_cleared", {"device": "camera"})

    def _watch(self) -> None:
        while not self._halt.wait(WATCHDOG_TICK_S):
            with self._lock:
                limit = self.stall_ns if self._frames else FIRST_FRAME_GRACE_NS
                silent = time.monotonic_ns() - self._last_delivery_ns
            if silent > limit:
                what = "since the last frame" if self._frames else "since start"
                self._outage(f"encoder stalled: no frame for {silent // 1_000_000} ms {what}")

    def _library_thread_died(self, args: threading.ExceptHookArgs) -> None:
        if not self._library_dir or self._picam2 is None:
            return
        tb: TracebackType | None = args.exc_traceback
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(self._library_dir):
                name = args.thread.name if args.thread is not None else "?"
                self._outage(f"encoder error in picamera2 thread {name}: "
                             f"{args.exc_type.__name__}: {args.exc_value}", cause=True)
                return
            tb = tb.tb_next

    def _outage(self, reason: str, *, cause: bool = False) -> None:
        """Frames stopped: reported once until frames flow again (then "fault_cleared"). A
        `cause` (the exception that stopped them) is reported even during an outage."""
        with self._lock:
            if self._faulted and not cause:
                return
            self._faulted = True
        log.warning("camera: %s", reason)
        self._emit("fault", {"device": "camera", "reason": reason})

    def _fault(self, reason: str, *, key: str) -> None:
        """A fault that does not stop the frames: reported once per kind (`key`) per start."""
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        log.warning("camera: %s", reason)
        self._emit("fault", {"device": "camera", "reason": reason})
