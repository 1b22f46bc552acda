"""A faithful stand-in for picamera2, so the real camera backend runs in tests on any machine.

Put ``tests/fakes`` first on ``sys.path`` to use it (tests/contract/test_camera_contract.py
does, only around the real-backend tests). Names, signatures, call order, threads and failure
modes follow raspberrypi/picamera2 (picamera2/picamera2.py, encoders/encoder.py,
encoders/v4l2_encoder.py, encoders/h264_encoder.py, encoders/libav_h264_encoder.py,
outputs/output.py, previews/null_preview.py); behind them the frames are real pictures and the
encoders produce real H.264 with PyAV's libx264.

What it reproduces:

- ``Picamera2.global_camera_info()`` lists the cameras; ``Picamera2(camera_num)`` indexes that
  list first thing, so with no camera (or a number past the end) it raises ``IndexError: list
  index out of range``. A camera another process holds raises ``RuntimeError("Camera __init__
  sequence did not complete.")``.
- ``create_video_configuration(main=..., controls=...)`` returns the real dict shape and defaults
  (main XBGR8888 1280x720, FrameDurationLimits (33333, 33333), buffer_count 6).
- ``configure()`` raises RuntimeError for a malformed configuration but, like libcamera's
  validate(), silently *adjusts* a size the sensor cannot deliver (clamped to its largest mode);
  frame durations are clamped to the sensor mode's limits, which ``camera_controls
  ["FrameDurationLimits"]`` reports after configure. ``sensor_modes`` lists the modes with fps.
- ``start_recording(encoder, output)`` is ``start_encoder`` then ``start``. A "libcamera" thread
  completes one request per frame duration, stamped ``SensorTimestamp`` = CLOCK_MONOTONIC ns at
  frame start (the V4L2 buffer timestamp) on the sensor's exact grid, however late the thread
  runs; a frame more than buffer_count frames late is lost, as with no free buffer on a real Pi.
  A NullPreview-like event loop thread runs ``pre_callback``, ``post_callback`` and
  ``encoder.encode(name, request)`` for each request. An exception there is logged and
  re-raised, which ends the loop, as in the real NullPreview.
- ``stop()`` sends the stop to the event loop and waits without a timeout, so with a dead or
  blocked loop it never returns (the real ``dispatch_functions(wait=True)``). ``close()`` stops
  the loop first and does not hang on a dead one.
- Encoders call ``output.outputframe(frame_bytes, keyframe, timestamp_us)`` with the timestamp
  relative to the first frame (``Encoder._timestamp``; the absolute first one is kept in
  ``encoder.firsttimestamp``). ``H264Encoder`` (V4L2) encodes on its own poll thread, with 16
  input buffers that only that thread returns, and drops buffers holding no picture;
  ``LibavH264Encoder`` encodes in the event loop thread. ``H264Encoder(repeat=True)`` puts SPS/PPS
  before every IDR; with repeat=False only before the first. ``LibavH264Encoder`` repeats them
  with repeat=True (no global header) and keeps them out of the stream with repeat=False.
- On a Pi 5 (``fake.platform = "PISP"``) ``picamera2.encoders.H264Encoder`` *is*
  ``LibavH264Encoder``, and the V4L2 encoder cannot open /dev/video11.

Knobs, on ``picamera2.fake`` (a FakeSettings; ``picamera2.fake_reset()`` restores defaults):

- ``cameras``: the attached sensors (default one imx219); empty means no camera.
- ``busy``: the camera is held by another process.
- ``platform``: "VC4" (Pi 4, CM4, Zero 2 W) or "PISP" (Pi 5).
- ``drop_frames``: sensor frame numbers (0-based) whose requests fail and are discarded before
  the encoder, as process_requests does with a non-Success buffer.
- ``stall_after`` / ``stall_s``: after that many sensor frames no frame completes for stall_s
  seconds (a loose ribbon, a wedged ISP), then frames resume.
- ``encoder_error_after``: the encoder fails after that many encoded frames: the V4L2 poll thread
  dies on an EIO ioctl error; LibavH264Encoder raises from encode(), killing the event loop.
- ``ignore_repeat``: the encoder puts SPS/PPS before the first IDR only, whatever ``repeat``.
- ``clock_offset_ns``: added to every SensorTimestamp (a sensor clock that is not MONOTONIC).

Outputs for tests: ``fake.sensor_timestamps`` records every SensorTimestamp handed out;
``fake.instances`` every Picamera2 made.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from picamera2._fake import FakeSensor, FakeSettings, fake, fake_reset
from picamera2.encoders import Encoder
from picamera2.outputs import FileOutput, Output

__all__ = ["CompletedRequest", "FakeSensor", "FakeSettings", "Picamera2", "fake", "fake_reset"]

_log = logging.getLogger("picamera2.picamera2")


_RAW_FORMAT = "SRGGB10_CSI2P"
_FORMATS = {"YUV420", "YVU420", "XBGR8888", "XRGB8888", "RGB888", "BGR888"}


class CompletedRequest:
    """One finished capture: the image of each stream and its metadata."""

    def __init__(self, picam2: Picamera2, metadata: dict[str, Any],
                 image: npt.NDArray[np.uint8]) -> None:
        self.picam2 = picam2
        self._metadata = metadata
        self._image = image
        self.stream_map = {"main": "main"}

    def get_metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def make_array(self, name: str) -> npt.NDArray[np.uint8]:
        return self._image

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class _Pattern:
    """A moving test picture in planar YUV 4:2:0, cheap enough for 30 fps in a test."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        ramp = (np.arange(2 * width) * 219 // (2 * width) + 16).astype(np.uint8)
        self.luma = np.tile(ramp, (height, 1))
        self.buf = np.full((height * 3 // 2, width), 128, dtype=np.uint8)

    def render(self, n: int) -> npt.NDArray[np.uint8]:
        w, h = self.width, self.height
        shift = (4 * n) % w
        self.buf[:h] = self.luma[:, shift : shift + w]
        x = (8 * n) % max(1, w - 32)
        self.buf[h // 3 : h // 3 + 32, x : x + 32] = 235  # a block crossing the picture
        return self.buf.copy()


class _NullPreview:
    """The event loop a real NullPreview runs: wait for completed requests, process them."""

    def __init__(self) -> None:
        self._abort = threading.Event()
        self.thread: threading.Thread | None = None
        self.picam2: Picamera2 | None = None

    def start(self, picam2: Picamera2) -> None:
        self.picam2 = picam2
        picam2.attach_preview(self)
        self._abort.clear()
        self.thread = threading.Thread(target=self.thread_func, args=(picam2,), daemon=True,
                                       name="picamera2-null-preview")
        self.thread.start()

    def thread_func(self, picam2: Picamera2) -> None:
        while not self._abort.is_set():
            try:
                item = picam2._completed.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                picam2.process_requests(item)
            except Exception as e:
                _log.exception("Exception during process_requests()", exc_info=e)
                raise

    def stop(self) -> None:
        self._abort.set()
        if self.thread is not None:
            self.thread.join()
        assert self.picam2 is not None
        self.picam2.detach_preview()
        self.picam2 = None


class Picamera2:
    """The camera: configure, start_recording(encoder, output), stop_recording, close."""

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        return [
            {"Model": s.model, "Location": 2, "Rotation": 0, "Id": s.id, "Num": i}
            for i, s in enumerate(fake.cameras)
        ]

    def __init__(self, camera_num: int = 0, verbose_console: Any = None, tuning: Any = None,
                 allocator: Any = None) -> None:
        self._preview: _NullPreview | None = None
        self.is_open = False
        # Exactly the real first step: an empty list (no camera) raises IndexError here.
        camera_num = self.global_camera_info()[camera_num]["Num"]
        self.camera_idx = camera_num
        self.sensor = fake.cameras[camera_num]
        self.pre_callback: Any = None
        self.post_callback: Any = None
        self.started = False
        self._event_loop_running = False
        self._encoders: set[Encoder] = set()
        self.camera_config: dict[str, Any] = {}
        self.sensor_modes_: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._completed: queue.Queue[CompletedRequest] = queue.Queue()
        self._sensor_stop = threading.Event()
        self._sensor_thread: threading.Thread | None = None
        self._never = threading.Event()
        native = max(self.sensor.modes, key=lambda m: m[0][0] * m[0][1])
        self._mode = native
        try:
            if fake.busy:
                raise RuntimeError("Failed to acquire camera: Device or resource busy")
            self.is_open = True
        except Exception as e:
            _log.error("Camera __init__ sequence did not complete.")
            raise RuntimeError("Camera __init__ sequence did not complete.") from e
        fake.instances.append(self)

    # -- configuration -------------------------------------------------------------------

    @property
    def camera_controls(self) -> dict[str, tuple[Any, Any, Any]]:
        min_us = round(1e6 / self._mode[1])
        return {
            "FrameDurationLimits": (min_us, self.sensor.max_frame_duration_us, 33333),
            "ExposureTime": (1, 66666, 20000),
            "NoiseReductionMode": (0, 4, 0),
            "ScalerCrop": ((0, 0, 0, 0), (0, 0, *self._mode[0]), (0, 0, *self._mode[0])),
        }

    @property
    def sensor_modes(self) -> list[dict[str, Any]]:
        # The real property reconfigures the camera once per mode to learn each one's fps,
        # which wipes an existing configuration; the fake does the same.
        if not self.sensor_modes_:
            self.camera_config = {}
            self.sensor_modes_ = [
                {"format": _RAW_FORMAT, "unpacked": "SRGGB10", "bit_depth": 10, "size": size,
                 "fps": fps, "crop_limits": (0, 0, *size), "exposure_limits": (1, 66666)}
                for size, fps in self.sensor.modes
            ]
        return self.sensor_modes_

    def create_video_configuration(self, main: dict[str, Any] | None = None, lores: Any = None,
                                   raw: dict[str, Any] | None = None, transform: Any = None,
                                   colour_space: Any = None, buffer_count: int = 6,
                                   controls: dict[str, Any] | None = None, display: Any = "main",
                                   encode: Any = "main", queue: bool = True,
                                   sensor: dict[str, Any] | None = None,
                                   use_case: str = "video") -> dict[str, Any]:
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        main = {"format": "XBGR8888", "size": (1280, 720), "preserve_ar": True, **(main or {})}
        size = main["size"]
        main["size"] = (size[0] - size[0] % 2, size[1] - size[1] % 2)  # align_stream(optimal=False)
        raw = {"format": _RAW_FORMAT, "size": main["size"]} | (raw or {})
        defaults = {"NoiseReductionMode": 1, "FrameDurationLimits": (33333, 33333)}
        controls = defaults | (controls or {})
        return {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": main, "lores": lores,
                "raw": raw, "controls": controls, "sensor": sensor or {}, "display": display,
                "encode": encode}

    def configure(self, camera_config: Any = None) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        if not isinstance(camera_config, dict):
            raise TypeError("Invalid type for `camera_config` given")
        config = dict(camera_config)
        main = dict(config["main"])
        if "format" not in main or "size" not in main:
            raise RuntimeError("format not found in main stream")
        if main["format"] not in _FORMATS:
            raise RuntimeError(f"Bad format {main['format']} in stream main")
        size = main["size"]
        if not isinstance(size, tuple) or len(size) != 2:
            raise RuntimeError("size in main stream should be (width, height)")
        if size[0] % 2 or size[1] % 2:
            raise RuntimeError("width and height should be even")
        # libcamera's validate(): the smallest mode covering the output, else the largest mode
        # with the output clamped to it ("Camera configuration has been adjusted!").
        covering = [m for m in self.sensor.modes if m[0][0] >= size[0] and m[0][1] >= size[1]]
        if covering:
            self._mode = min(covering, key=lambda m: m[0][0] * m[0][1])
        else:
            self._mode = max(self.sensor.modes, key=lambda m: m[0][0] * m[0][1])
            size = (min(size[0], self._mode[0][0]), min(size[1], self._mode[0][1]))
            _log.info("Camera configuration has been adjusted!")
        main["size"] = size
        # YUV420 rows are 64-byte aligned on the ISP output.
        main["stride"] = -(-size[0] // 64) * 64 if main["format"] in ("YUV420", "YVU420") \
            else size[0] * 4
        main["framesize"] = main["stride"] * size[1] * 3 // 2
        config["main"] = main
        config["raw"] = {"format": _RAW_FORMAT, "size": self._mode[0], "stride": 0,
                         "framesize": 0}
        config["controls"] = dict(config.get("controls") or {})
        self.camera_config = config

    def camera_configuration(self) -> dict[str, Any]:
        return self.camera_config

    def stream_configuration(self, name: str = "main") -> dict[str, Any]:
        return self.camera_config[name]  # type: ignore[no-any-return]

    def _frame_duration_us(self) -> int:
        lo, hi, default = self.camera_controls["FrameDurationLimits"]
        want = self.camera_config.get("controls", {}).get("FrameDurationLimits", (default, default))
        # The sensor cannot run faster than its mode allows: libcamera clamps, silently.
        return int(min(max(want[0], lo), hi))

    # -- encoders ------------------------------------------------------------------------

    @property
    def encoders(self) -> set[Encoder]:
        return self._encoders

    def start_encoder(self, encoder: Encoder | None = None, output: Any = None, pts: Any = None,
                      quality: Any = None, name: str | None = None) -> None:
        if encoder is None:
            if len(self._encoders) != 1:
                raise RuntimeError("No encoder specified")
            encoder = next(iter(self._encoders))
        if output is not None:
            if isinstance(output, str):
                output = FileOutput(output, pts=pts)
            encoder.output = output
        streams = self.camera_configuration()
        if not streams:
            raise RuntimeError("Camera has not been configured")
        name = name or streams.get("encode", "main")
        if streams.get(name) is None:
            raise RuntimeError(f"Encode stream {name} was not defined")
        encoder.name = name
        encoder.width, encoder.height = streams[name]["size"]
        encoder.format = streams[name]["format"]
        encoder.stride = streams[name]["stride"]
        min_frame_duration = max(self.camera_controls["FrameDurationLimits"][0], 33333)
        if getattr(encoder, "framerate", 0) is None:
            encoder.framerate = 1000000 / min_frame_duration  # type: ignore[attr-defined]
        encoder.start(quality=quality)
        with self.lock:
            self._encoders.add(encoder)

    def stop_encoder(self, encoders: Any = None) -> None:
        remove = list(self._encoders) if encoders is None else (
            [encoders] if isinstance(encoders, Encoder) else list(encoders))
        for encoder in remove:
            encoder.stop()
        with self.lock:
            for encoder in remove:
                self._encoders.discard(encoder)

    def start_recording(self, encoder: Encoder, output: Output | str, pts: Any = None,
                        config: Any = None, quality: Any = None, name: str | None = None) -> None:
        if not self.camera_config and config is None:
            config = self.create_video_configuration()
        if config is not None:
            self.configure(config)
        self.start_encoder(encoder, output, pts=pts, quality=quality, name=name)
        self.start()

    def stop_recording(self) -> None:
        self.stop()
        self.stop_encoder()

    # -- running -------------------------------------------------------------------------

    def attach_preview(self, preview: _NullPreview) -> None:
        if self._preview:
            raise RuntimeError("Preview is already running")
        self._preview = preview
        self._event_loop_running = True

    def detach_preview(self) -> None:
        self._preview = None
        self._event_loop_running = False

    def start_preview(self, preview: Any = None) -> None:
        if self._event_loop_running:
            raise RuntimeError("An event loop is already running")
        _NullPreview().start(self)

    def stop_preview(self) -> None:
        if self._preview is None:
            raise RuntimeError("No preview specified.")
        self._preview.stop()

    def start(self, config: Any = None, show_preview: Any = False) -> None:
        if config is not None:
            self.configure(config)
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        if show_preview is not None and not self._event_loop_running:
            self.start_preview(show_preview)
        if self.started:
            return
        self._sensor_stop.clear()
        self._sensor_thread = threading.Thread(target=self._sensor_loop, daemon=True,
                                               name="libcamera-sensor")
        self._sensor_thread.start()
        self.started = True

    def stop_(self) -> None:
        if self.started:
            self._sensor_stop.set()
            if self._sensor_thread is not None:
                self._sensor_thread.join()
            self.started = False
            while not self._completed.empty():
                self._completed.get_nowait()

    def stop(self) -> None:
        if not self.started:
            return
        if self._preview is not None and self._event_loop_running:
            # The real one dispatches stop_ to the event loop and waits with no timeout.
            preview_thread = self._preview.thread
            if preview_thread is None or not preview_thread.is_alive():
                self._never.wait()
            assert preview_thread is not None
            done = threading.Event()
            self._completed.put(_StopJob(self, done))  # type: ignore[arg-type]
            while not done.wait(0.2):
                if not preview_thread.is_alive():
                    self._never.wait()
        else:
            self.stop_()

    def close(self) -> None:
        if self._preview:
            self.stop_preview()
        if not self.is_open:
            return
        self.stop()
        self.is_open = False
        self.camera_config = {}

    def process_requests(self, item: CompletedRequest) -> None:
        if isinstance(item, _StopJob):
            item.run()
            return
        request = item
        if self.pre_callback:
            self.pre_callback(request)
        if self.post_callback:
            self.post_callback(request)
        for encoder in list(self._encoders):
            if encoder.name in ("main",):
                encoder.encode(encoder.name, request)
        request.release()

    def _sensor_loop(self) -> None:
        """libcamera's side: one completed request per frame duration, stamped at frame start.

        Frame starts sit on the sensor's exact grid, whatever this thread's scheduling: a late
        thread delivers late, with the true stamp. Only when it falls further behind than the
        request buffers cover are frames lost (no buffer to capture into), as on a real Pi.
        """
        width, height = self.camera_config["main"]["size"]
        buffers = int(self.camera_config.get("buffer_count", 6))
        pattern = _Pattern(width, height)
        duration_ns = self._frame_duration_us() * 1000
        exposure_us = min(20000, duration_ns // 1000 - 100)
        sof = time.monotonic_ns()
        n = 0
        while not self._sensor_stop.is_set():
            delay = sof - time.monotonic_ns()
            if delay > 0 and self._sensor_stop.wait(delay / 1e9):
                break
            frame_no, ts_grid = n, sof
            n += 1
            sof += duration_ns
            if fake.stall_after is not None and frame_no == fake.stall_after:
                if self._sensor_stop.wait(fake.stall_s):
                    break
                skipped = (time.monotonic_ns() - sof) // duration_ns + 1
                n += skipped
                sof += skipped * duration_ns
                continue
            if time.monotonic_ns() - ts_grid > buffers * duration_ns:
                continue  # no free buffer: the frame was never captured
            if frame_no in fake.drop_frames:
                continue  # the request completed with an error status: discarded unseen
            ts = ts_grid + fake.clock_offset_ns
            fake.sensor_timestamps.append(ts)
            metadata = {"SensorTimestamp": ts, "ExposureTime": exposure_us,
                        "FrameDuration": duration_ns // 1000, "AnalogueGain": 1.0}
            self._completed.put(CompletedRequest(self, metadata, pattern.render(frame_no)))


class _StopJob:
    """stop_ run by the event loop, as dispatch_functions([stop_], wait=True) does."""

    def __init__(self, picam2: Picamera2, done: threading.Event) -> None:
        self.picam2, self.done = picam2, done

    def run(self) -> None:
        self.picam2.stop_()
        self.done.set()
