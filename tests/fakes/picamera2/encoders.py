"""picamera2.encoders: Encoder, H264Encoder (the VideoCore's V4L2 encoder), LibavH264Encoder.

Same constructor arguments, attributes and threads as the real ones; libx264 (PyAV) does the
encoding behind both. ``H264Encoder`` is resolved per call like the real package's import-time
choice: on a Pi 5 (fake.platform "PISP") it *is* LibavH264Encoder.
"""

from __future__ import annotations

import errno
import queue
import threading
from enum import Enum
from fractions import Fraction
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from av.video.codeccontext import VideoCodecContext

from picamera2._fake import fake
from picamera2.outputs import Output

# H264Encoder comes from the module __getattr__ at the end (it depends on the platform).
__all__ = ["Encoder", "LibavH264Encoder", "Quality"]

_FORMATS = {"YUV420", "YVU420", "XBGR8888", "XRGB8888", "RGB888", "BGR888"}


class Quality(Enum):
    VERY_LOW = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    VERY_HIGH = 4


def _nal_types(data: bytes) -> list[tuple[int, int]]:
    """(start code offset, nal type) of each NAL unit in an Annex B buffer."""
    out = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(data):
        sc = i - 1 if i > 0 and data[i - 1] == 0 else i
        out.append((sc, data[i + 3] & 0x1F))
        i = data.find(b"\x00\x00\x01", i + 3)
    return out


def _strip_parameter_sets(data: bytes) -> bytes:
    """The access unit without its SPS and PPS NAL units."""
    nals = _nal_types(data)
    keep = []
    for k, (sc, kind) in enumerate(nals):
        end = nals[k + 1][0] if k + 1 < len(nals) else len(data)
        if kind not in (7, 8):
            keep.append(data[sc:end])
    return b"".join(keep)


class Encoder:
    """Base class: takes requests from the camera, hands encoded frames to its outputs."""

    def __init__(self, framerate: float | None = 30) -> None:
        self._width = 0
        self._height = 0
        self._stride = 0
        self._format: str | None = None
        self._output: list[Output] = []
        self._running = False
        self._name: str | None = None
        self._framerate = framerate
        self._lock = threading.Lock()
        self.firsttimestamp: int | None = None
        self.frame_skip_count = 1
        self._skip_count = 0
        self._output_lock = threading.Lock()
        self.frames_encoded = 0
        self._headers_sent = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def width(self) -> int:
        return self._width

    @width.setter
    def width(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Width must be integer")
        self._width = value

    @property
    def height(self) -> int:
        return self._height

    @height.setter
    def height(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Height must be integer")
        self._height = value

    @property
    def stride(self) -> int:
        return self._stride

    @stride.setter
    def stride(self, value: int) -> None:
        if not isinstance(value, int):
            raise RuntimeError("Stride must be integer")
        self._stride = value

    @property
    def format(self) -> str | None:
        return self._format

    @format.setter
    def format(self, value: str) -> None:
        if value not in _FORMATS:
            raise ValueError(f"Invalid format: {value}")
        self._format = value

    @property
    def output(self) -> Output | list[Output]:
        return self._output[0] if len(self._output) == 1 else self._output

    @output.setter
    def output(self, value: Output | list[Output]) -> None:
        if isinstance(value, list):
            if not all(isinstance(o, Output) for o in value):
                raise RuntimeError("Must pass Output")
        elif isinstance(value, Output):
            value = [value]
        else:
            raise RuntimeError("Must pass Output")
        self._output = value

    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str):
            raise RuntimeError("Name must be string")
        self._name = value

    def encode(self, stream: Any, request: Any) -> None:
        if self._skip_count == 0:
            with self._lock:
                if not self._running:
                    return
                self._encode(stream, request)
        self._skip_count = (self._skip_count + 1) % self.frame_skip_count
        self.frames_encoded += 1

    def _encode(self, stream: Any, request: Any) -> None:
        self.outputframe(request.make_array(stream).tobytes(), True, self._timestamp(request))

    def start(self, quality: Quality | None = None) -> None:
        with self._lock:
            if self._running:
                raise RuntimeError("Encoder already running")
            self.frames_encoded = 0
            self._setup(quality)
            self._running = True
            self.firsttimestamp = None
            self._headers_sent = False
            for out in self._output:
                out.start()
            self._start()

    def _start(self) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            if not self._running:
                raise RuntimeError("Encoder already stopped")
            self._running = False
            self._stop()
            for out in self._output:
                out.stop()

    def _stop(self) -> None:
        pass

    def _setup(self, quality: Quality | None) -> None:
        pass

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        with self._output_lock:
            for out in self._output:
                out.outputframe(frame, keyframe, timestamp, packet, audio)

    def _timestamp(self, request: Any) -> int:
        # As the real one: SensorTimestamp ns -> us, relative to the first frame encoded.
        ts = int(request.get_metadata()["SensorTimestamp"] / 1000)
        if self.firsttimestamp is None:
            self.firsttimestamp = ts
            return 0
        return ts - self.firsttimestamp

    # -- the fake's shared libx264 plumbing ----------------------------------------------

    def _open_x264(self, gop: int, bitrate: int | None, fixed_gop: bool) -> VideoCodecContext:
        ctx = av.CodecContext.create("libx264", "w")
        assert isinstance(ctx, VideoCodecContext)
        ctx.width, ctx.height, ctx.pix_fmt = self._width, self._height, "yuv420p"
        ctx.time_base = Fraction(1, 1_000_000)
        ctx.framerate = Fraction(round(float(self._framerate or 30) * 1000), 1000)
        ctx.bit_rate = bitrate or 2_000_000
        ctx.gop_size = gop
        options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0",
                   "x264-params": "repeat-headers=1:annexb=1"}
        if fixed_gop:  # a hardware encoder puts IDRs on its I-period, never at scene cuts
            options |= {"keyint_min": str(gop), "sc_threshold": "0"}
        ctx.options = options
        ctx.open()
        return ctx

    def _picture(self, image: npt.NDArray[np.uint8]) -> av.VideoFrame:
        if self._format not in ("YUV420", "YVU420"):
            raise RuntimeError(f"fake encoder: only YUV420 input is modelled, not {self._format}")
        return av.VideoFrame.from_ndarray(
            np.ascontiguousarray(image[:, : self._width]), format="yuv420p")

    def _with_headers(self, data: bytes, keyframe: bool, repeat: bool) -> bytes:
        """SPS/PPS as this encoder would emit them: libx264 repeats them; undo that where the
        real encoder would not (V4L2 repeat=False or fake.ignore_repeat: first IDR only)."""
        if not keyframe:
            return data
        first = not self._headers_sent
        self._headers_sent = True
        if (repeat and not fake.ignore_repeat) or first:
            return data
        return _strip_parameter_sets(data)


class _V4L2H264Encoder(Encoder):
    """The VideoCore's hardware H.264 encoder (/dev/video11), driven like V4L2Encoder: frames go
    in from the camera's event loop, a poll thread takes encoded buffers out."""

    NUM_OUTPUT_BUFFERS = 16

    def __init__(self, bitrate: int | None = None, repeat: bool = True, iperiod: int | None = None,
                 framerate: float | None = None, enable_sps_framerate: bool = False,
                 qp: int | None = None, profile: str | None = None) -> None:
        super().__init__()
        self.bitrate = bitrate
        self.repeat = repeat
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self._enable_framerate = enable_sps_framerate
        self.thread: threading.Thread | None = None

    def _start(self) -> None:
        if fake.platform != "VC4":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/dev/video11")
        self._framerate = self.framerate
        self._ctx = self._open_x264(self.iperiod or 60, self.bitrate, fixed_gop=True)
        self._fail_after = fake.encoder_error_after
        self.buf_available: queue.Queue[int] = queue.Queue()
        for i in range(self.NUM_OUTPUT_BUFFERS):
            self.buf_available.put(i)
        self.buf_frame: queue.Queue[tuple[int, npt.NDArray[np.uint8], int]] = queue.Queue()
        self.thread = threading.Thread(target=self.thread_poll, args=(self.buf_available,),
                                       daemon=True, name="v4l2-encoder-poll")
        self.thread.start()

    def _encode(self, stream: Any, request: Any) -> None:
        timestamp_us = self._timestamp(request)
        # Blocks for good once the poll thread stops returning buffers (as the real one does).
        index = self.buf_available.get()
        self.buf_frame.put((index, request.make_array(stream).copy(), timestamp_us))

    def thread_poll(self, buf_available: queue.Queue[int]) -> None:
        encoded = 0
        while self._running or self.buf_frame.qsize() > 0:
            try:
                index, image, timestamp_us = self.buf_frame.get(timeout=0.4)
            except queue.Empty:
                if not self._running:
                    break
                continue
            if self._fail_after is not None and encoded >= self._fail_after:
                raise OSError(errno.EIO, "Input/output error")  # VIDIOC_DQBUF failing
            frame = self._picture(image)
            frame.pts = timestamp_us
            packets = self._ctx.encode(frame)
            buf_available.put(index)
            encoded += 1
            for packet in packets:
                data = self._with_headers(bytes(packet), packet.is_keyframe, self.repeat)
                if self._check_for_picture(data):
                    self.outputframe(data, packet.is_keyframe, packet.pts)

    @staticmethod
    def _check_for_picture(buf: bytes) -> bool:
        """A buffer with only SPS/PPS (an encoder-skipped frame) is not passed on."""
        return len(buf) > 64 or any(kind in (1, 5) for _, kind in _nal_types(buf))

    def _stop(self) -> None:
        if self.thread is not None:
            self.thread.join()


_V4L2H264Encoder.__name__ = _V4L2H264Encoder.__qualname__ = "H264Encoder"


class LibavH264Encoder(Encoder):
    """libx264 through PyAV, in the camera's event loop thread (the Pi 5 has no H.264 block)."""

    def __init__(self, bitrate: int | None = None, repeat: bool = True, iperiod: int | None = 30,
                 framerate: float | None = 30, qp: int | None = None,
                 profile: str | None = None) -> None:
        super().__init__()
        self._codec = "h264"
        self.repeat = repeat
        self.bitrate = bitrate
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self.preset: str | None = None
        self.threads = 0

    def _start(self) -> None:
        self._framerate = self.framerate
        # gop 0 means "no I-frames but the first", as in the real one.
        self._ctx = self._open_x264(self.iperiod or (1 << 31) - 1, self.bitrate, fixed_gop=False)
        self._fail_after = fake.encoder_error_after
        self._encoded = 0

    def _encode(self, stream: Any, request: Any) -> None:
        if self._fail_after is not None and self._encoded >= self._fail_after:
            raise av.error.OSError(errno.EIO, "Input/output error")
        timestamp_us = self._timestamp(request)
        frame = self._picture(request.make_array(stream))
        frame.pts = timestamp_us
        self._encoded += 1
        for packet in self._ctx.encode(frame):
            self._output_packet(packet)

    def _output_packet(self, packet: av.Packet) -> None:
        data = bytes(packet)
        if not self.repeat:  # global header: SPS/PPS live in extradata, never in the stream
            data = _strip_parameter_sets(data)
        else:
            data = self._with_headers(data, packet.is_keyframe, True)
        self.outputframe(data, packet.is_keyframe, timestamp=packet.pts, packet=packet)

    def _stop(self) -> None:
        for packet in self._ctx.encode(None):
            self._output_packet(packet)


def __getattr__(name: str) -> Any:
    # The real package decides at import: `H264Encoder` is the V4L2 one on VC4 platforms and
    # LibavH264Encoder everywhere else (a Pi 5), with no warning.
    if name == "H264Encoder":
        return _V4L2H264Encoder if fake.platform == "VC4" else LibavH264Encoder
    raise AttributeError(name)
