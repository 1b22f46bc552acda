"""Simulated camera: a real-time H.264 test pattern with burned-in frame numbers and white
clapper frames.

A daemon thread draws one frame per frame period (scrolling colour bars, a moving ramp and the
frame number in large 5x7-bitmap digits), turns the frame nearest each clapper instant full
white, and encodes with libx264 into self-contained Annex B access units (SPS/PPS inline before
every IDR), the way a Pi's hardware encoder hands them out. Each packet is stamped with the
CLOCK_MONOTONIC time of its frame's capture. `burned_frame_number` reads the digits back from a
decoded picture, so tests and sync tools can identify frames in a recording by sight.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType

from dualrec.devices.base import DeviceError, EventSink, VideoFormat, VideoSink
from dualrec.samples import Event, VideoPacket
from dualrec.sim.clapper import claps_between, grid_start

NS = 1_000_000_000
STOP_TIMEOUT_S = 1.0

WHITE_Y = 235  # limited-range (BT.601) white: what a real sensor+ISP gives for a flash
BLACK_Y = 16
NEUTRAL_C = 128

# 75 % colour bars in limited-range BT.601 (Y, Cb, Cr): mean luma ~110, never near white.
_BARS = (
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
)
_SCROLL_PX = 4  # per frame; even, so the half-resolution chroma scrolls in step with luma

_FONT_5X7 = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
_GLYPHS = {
    d: np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    for d, rows in _FONT_5X7.items()
}
# Seven digits cover 3.8 days at 30 fps; a longer run wraps, which is fine for a test pattern.
_DIGITS = 7
_CELL_W = 6  # 5 pixel columns + 1 spacing, in font pixels

U8Array = npt.NDArray[np.uint8]


def _even(n: int) -> int:
    return n + (n & 1)


def _digit_layout(width: int, height: int) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """(scale, x0, y0, box) of the frame-number overlay; one function for writer and reader."""
    scale = max(1, min(height // 60, width // (_DIGITS * _CELL_W + 6)))
    x0 = y0 = 4 * scale
    # Box edges even, so the chroma planes (half resolution) cover exactly the same area.
    box = (
        2 * scale & ~1,
        2 * scale & ~1,
        _even(x0 + (_DIGITS * _CELL_W - 1) * scale + 2 * scale),
        _even(y0 + 7 * scale + 2 * scale),
    )
    return scale, x0, y0, box


def burned_frame_number(luma: npt.NDArray[np.uint8]) -> int | None:
    """Read the frame number burned into a decoded picture's luma plane (None if unreadable).

    Samples the centre of every font pixel, so encoder blur at glyph edges does not matter.
    """
    height, width = luma.shape
    scale, x0, y0, _ = _digit_layout(width, height)
    centre = scale // 2
    ys = y0 + np.arange(7) * scale + centre
    value = 0
    for j in range(_DIGITS):
        xs = x0 + j * _CELL_W * scale + np.arange(5) * scale + centre
        bits = luma[np.ix_(ys, xs)] > (WHITE_Y + BLACK_Y) // 2
        match = [d for d, g in _GLYPHS.items() if np.array_equal(g, bits)]
        if len(match) != 1:
            return None
        value = value * 10 + match[0]
    return value


class _Pattern:
    """Draws yuv420p pictures straight into PyAV's planar layout (no colour conversion per
    frame: the bars, ramp and glyphs are precomputed and only shifted or stamped)."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.bars_h = _even(height * 3 // 4)
        bar_of_x = np.arange(width) * len(_BARS) // width
        self.bars_y = np.array([_BARS[b][0] for b in bar_of_x], dtype=np.uint8)
        cx = bar_of_x[::2]
        self.bars_u = np.array([_BARS[b][1] for b in cx], dtype=np.uint8)
        self.bars_v = np.array([_BARS[b][2] for b in cx], dtype=np.uint8)
        self.ramp_y = np.linspace(BLACK_Y, WHITE_Y, width).astype(np.uint8)
        self.scale, self.x0, self.y0, self.box = _digit_layout(width, height)
        ones = np.ones((self.scale, self.scale), dtype=bool)
        self.glyphs = {d: np.kron(g, ones).astype(bool) for d, g in _GLYPHS.items()}
        self.white = np.full((height * 3 // 2, width), NEUTRAL_C, dtype=np.uint8)
        self.white[:height] = WHITE_Y
        self.buf = np.empty((height * 3 // 2, width), dtype=np.uint8)

    def _planes(self) -> tuple[U8Array, U8Array, U8Array]:
        w, h = self.width, self.height
        flat = self.buf.reshape(-1)
        q = w * h // 4
        return (
            flat[: w * h].reshape(h, w),
            flat[w * h : w * h + q].reshape(h // 2, w // 2),
            flat[w * h + q :].reshape(h // 2, w // 2),
        )

    def render(self, index: int) -> U8Array:
        """The test picture for frame `index`; the returned buffer is reused by the next call."""
        y, u, v = self._planes()
        shift = index * _SCROLL_PX % self.width
        bh = self.bars_h
        y[:bh] = np.roll(self.bars_y, shift)
        u[: bh // 2] = np.roll(self.bars_u, shift // 2)
        v[: bh // 2] = np.roll(self.bars_v, shift // 2)
        y[bh:] = np.roll(self.ramp_y, -shift)
        u[bh // 2 :] = NEUTRAL_C
        v[bh // 2 :] = NEUTRAL_C
        bx0, by0, bx1, by1 = self.box
        y[by0:by1, bx0:bx1] = BLACK_Y
        u[by0 // 2 : by1 // 2, bx0 // 2 : bx1 // 2] = NEUTRAL_C
        v[by0 // 2 : by1 // 2, bx0 // 2 : bx1 // 2] = NEUTRAL_C
        s = self.scale
        digits = f"{index % 10**_DIGITS:0{_DIGITS}d}"
        for j, ch in enumerate(digits):
            mask = self.glyphs[int(ch)]
            x = self.x0 + j * _CELL_W * s
            y[self.y0 : self.y0 + 7 * s, x : x + 5 * s][mask] = WHITE_Y
        return self.buf


def _open_encoder(fmt: VideoFormat, gop: int, bitrate: int) -> VideoCodecContext:
    ctx = av.CodecContext.create("libx264", "w")
    if not isinstance(ctx, VideoCodecContext):
        raise DeviceError("camera: libx264 is not a video encoder")
    ctx.width = fmt.width
    ctx.height = fmt.height
    ctx.pix_fmt = "yuv420p"
    # pts counts frames, so a packet's pts is its frame index: capture time follows exactly.
    ctx.time_base = Fraction(1, fmt.fps)
    ctx.framerate = Fraction(fmt.fps, 1)
    ctx.bit_rate = bitrate
    ctx.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "g": str(gop),
        "keyint_min": str(gop),
        "sc_threshold": "0",  # no scene-cut IDRs: a white clapper frame would trigger one
        "bf": "0",  # no reordering: one packet out per frame in, pts == dts
        "forced-idr": "1",
        # No global header is requested, so libx264 repeats SPS/PPS before every IDR anyway;
        # said explicitly because a keyframe must stand alone at a segment start.
        "x264-params": "repeat-headers=1:annexb=1",
    }
    ctx.open()
    return ctx


class SimCamera:
    """Camera protocol implementation producing a real-time H.264 test pattern."""

    # Its thread renders and encodes every frame (software H.264): not one to run real-time
    # (dualrec.devices.runtime.capture_priority).
    capture_realtime = False

    def __init__(
        self,
        width: int = 640,
        height: int = 360,
        fps: int = 30,
        gop: int = 30,
        bitrate: int = 800_000,
        clap_period_ms: int = 7000,
    ) -> None:
        if width % 2 or height % 2 or width < 64 or height < 64:
            raise ValueError(f"camera: {width}x{height} must be even and at least 64x64")
        if fps <= 0 or gop <= 0 or bitrate <= 0 or clap_period_ms <= 0:
            raise ValueError("camera: fps, gop, bitrate and clap period must be positive")
        self.format = VideoFormat(codec="h264", width=width, height=height, fps=fps)
        self.gop = gop
        self.bitrate = bitrate
        self.clap_period_ns = clap_period_ms * 1_000_000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0

    def start(self, sink: VideoSink, events: EventSink) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError("camera: already started")
        try:
            encoder = _open_encoder(self.format, self.gop, self.bitrate)
        except (av.FFmpegError, ValueError) as e:
            raise DeviceError(f"camera: cannot open libx264: {e}") from e
        fps = self.format.fps
        # Start on the coarsest grid where t0 + i*NS/fps is an integer for every i, so each
        # frame time is one exact integer and clapper instants (whole ms) hit frames exactly.
        self._t0 = grid_start(fps)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(encoder, sink, events), name="sim-camera", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT_S)

    def _frame_time(self, index: int) -> int:
        return self._t0 + index * NS // self.format.fps

    def _is_clap_frame(self, index: int) -> bool:
        # Frame i owns [t_i - half, t_i + half) with t_i exact (rational); in integer ns a clap c
        # is inside iff ceil(lo) <= c < ceil(hi), which is what claps_between takes.
        two_fps = 2 * self.format.fps
        lo = -(-(two_fps * self._t0 + (2 * index - 1) * NS) // two_fps)
        hi = -(-(two_fps * self._t0 + (2 * index + 1) * NS) // two_fps)
        return bool(claps_between(lo, hi, self.clap_period_ns))

    def _run(self, encoder: VideoCodecContext, sink: VideoSink, events: EventSink) -> None:
        fps = self.format.fps
        pattern = _Pattern(self.format.width, self.format.height)
        index = 0
        last_gop = -1
        try:
            while not self._stop.is_set():
                delay = self._frame_time(index) - time.monotonic_ns()
                if delay > 0 and self._stop.wait(delay / NS):
                    break
                # Behind by a frame or more: jump to the newest frame whose time has come. The
                # skipped indices are never encoded, so the gap reads as dropped frames.
                elapsed = time.monotonic_ns() - self._t0
                index = max(index, ((elapsed + 1) * fps - 1) // NS)
                picture = pattern.white if self._is_clap_frame(index) else pattern.render(index)
                frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
                frame.pts = index
                # IDR on the first frame of every gop by frame index, not by encoded count, so
                # keyframes stay on the gop grid after drops.
                if index // self.gop != last_gop:
                    frame.pict_type = PictureType.I
                    last_gop = index // self.gop
                self._deliver(encoder.encode(frame), sink)
                index += 1
            self._deliver(encoder.encode(None), sink)
        except Exception as e:  # a dead camera thread must be on record, whatever killed it
            events(
                Event(
                    t_mono_ns=time.monotonic_ns(),
                    kind="fault",
                    detail={"device": "camera", "reason": f"{type(e).__name__}: {e}"},
                )
            )

    def _deliver(self, packets: list[av.Packet[Any]], sink: VideoSink) -> None:
        for packet in packets:
            if packet.pts is None:
                raise DeviceError("camera: encoder returned a packet without pts")
            sink(
                VideoPacket(
                    t_mono_ns=self._frame_time(packet.pts),
                    data=bytes(packet),
                    keyframe=packet.is_keyframe,
                    frame_index=packet.pts,
                )
            )
