"""Replay camera: hands out pre-encoded H.264 access units in real time, looping a clip.

It stands in for a Raspberry Pi camera whose hardware encoder does the encoding: the gateway gets
Annex B access units (one per frame, SPS/PPS inline before each IDR) at the frame rate, each
stamped with the CLOCK_MONOTONIC time of its frame's capture, and spends no CPU of its own on
encoding. That makes it the camera for measuring the gateway's own cost (tests/bench) at full
resolution and bitrate, which SimCamera cannot do since it encodes in-process.

Pacing and stamping follow SimCamera: frames sit on an exact integer grid from a start time, a
frame is delivered once its time has come, and a thread that falls a frame or more behind jumps
to the newest due frame, so the gap in frame_index reads as dropped frames. The encoded stream
itself stays continuous across a drop (the next access unit of the clip is sent), as with a
hardware encoder that never saw the dropped frames: the recording stays decodable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence

from dualrec.devices.base import DeviceError, EventSink, VideoFormat, VideoSink
from dualrec.samples import Event, VideoPacket

NS = 1_000_000_000
STOP_TIMEOUT_S = 1.0

NAL_IDR = 5
_VCL = frozenset(range(1, 6))  # coded slice NAL unit types
# Non-VCL types that may only appear before the first slice of an access unit (H.264 7.4.1.2.3):
# SEI, SPS, PPS, access unit delimiter, and the reserved/prefix types 14..18.
_AU_PREFIX = frozenset({6, 7, 8, 9, 14, 15, 16, 17, 18})


def _nal_starts(data: bytes) -> list[tuple[int, int]]:
    """(start code offset, NAL header offset) of every NAL unit in an Annex B stream."""
    out = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        # A 4-byte start code (00 00 00 01) belongs to the NAL it introduces, not to the
        # trailing bytes of the previous one.
        sc = i - 1 if i > 0 and data[i - 1] == 0 else i
        out.append((sc, i + 3))
        i = data.find(b"\x00\x00\x01", i + 3)
    return out


def split_access_units(stream: bytes) -> list[bytes]:
    """Split an Annex B H.264 elementary stream into access units, byte-exact.

    A new access unit starts at an SPS/PPS/SEI/AUD that follows a slice, or at a slice whose
    first_mb_in_slice is 0 (its ue(v) code is the single bit 1) that follows a slice; this is
    the first-slice detection of H.264 7.4.1.2.4, enough for encoder output with one or many
    slices per picture.
    """
    nals = _nal_starts(stream)
    if not nals or nals[0][0] != 0:
        raise ValueError("not an Annex B stream: it does not begin with a start code")
    units: list[bytes] = []
    au_start = 0
    seen_slice = False
    for sc, hdr in nals:
        if hdr >= len(stream):
            break
        nal_type = stream[hdr] & 0x1F
        first_slice = nal_type in _VCL and hdr + 1 < len(stream) and stream[hdr + 1] & 0x80
        if seen_slice and (nal_type in _AU_PREFIX or first_slice):
            units.append(stream[au_start:sc])
            au_start = sc
            seen_slice = False
        if nal_type in _VCL:
            seen_slice = True
    units.append(stream[au_start:])
    return units


def is_idr(access_unit: bytes) -> bool:
    """Whether the access unit holds an IDR slice (a keyframe that decodes on its own)."""
    return any(
        hdr < len(access_unit) and access_unit[hdr] & 0x1F == NAL_IDR
        for _, hdr in _nal_starts(access_unit)
    )


def _has_parameter_sets(access_unit: bytes) -> bool:
    types = {
        access_unit[hdr] & 0x1F for _, hdr in _nal_starts(access_unit) if hdr < len(access_unit)
    }
    return {7, 8} <= types


class ReplayCamera:
    """Camera protocol implementation replaying pre-encoded access units; see the module doc."""

    def __init__(
        self, access_units: Sequence[bytes], width: int, height: int, fps: int = 30
    ) -> None:
        if not access_units:
            raise ValueError("replay camera: the clip has no access units")
        if fps <= 0 or width <= 0 or height <= 0:
            raise ValueError("replay camera: width, height and fps must be positive")
        self.units = [bytes(u) for u in access_units]
        self.keyframes = [is_idr(u) for u in self.units]
        # The clip loops, so it must start decodable: every loop restarts the decoder's state,
        # which an IDR with its parameter sets does.
        if not self.keyframes[0] or not _has_parameter_sets(self.units[0]):
            raise ValueError("replay camera: the clip must start with SPS, PPS and an IDR")
        self.format = VideoFormat(codec="h264", width=width, height=height, fps=fps)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0
        self.delivered = 0  # access units handed to the sink, for a bench's bookkeeping

    @classmethod
    def from_annexb(cls, stream: bytes, width: int, height: int, fps: int = 30) -> ReplayCamera:
        """A replay camera for a raw .h264 elementary stream (e.g. a capture from a Pi)."""
        return cls(split_access_units(stream), width, height, fps)

    def start(self, sink: VideoSink, events: EventSink) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError("camera: already started")
        fps = self.format.fps
        # Same grid as SimCamera: every frame time t0 + i*NS/fps is an exact integer.
        step = NS // math.gcd(fps, NS)
        self._t0 = -(-time.monotonic_ns() // step) * step
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(sink, events), name="replay-camera", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT_S)

    def _frame_time(self, index: int) -> int:
        return self._t0 + index * NS // self.format.fps

    def _run(self, sink: VideoSink, events: EventSink) -> None:
        fps = self.format.fps
        n_units = len(self.units)
        index = 0
        cursor = 0  # position in the clip: advances per delivered frame, not per frame index
        try:
            while not self._stop.is_set():
                delay = self._frame_time(index) - time.monotonic_ns()
                if delay > 0 and self._stop.wait(delay / NS):
                    break
                elapsed = time.monotonic_ns() - self._t0
                index = max(index, ((elapsed + 1) * fps - 1) // NS)
                unit = cursor % n_units
                sink(
                    VideoPacket(
                        t_mono_ns=self._frame_time(index),
                        data=self.units[unit],
                        keyframe=self.keyframes[unit],
                        frame_index=index,
                    )
                )
                self.delivered += 1
                cursor += 1
                index += 1
        except Exception as e:  # a dead camera thread must be on record, whatever killed it
            events(
                Event(
                    t_mono_ns=time.monotonic_ns(),
                    kind="fault",
                    detail={"device": "camera", "reason": f"{type(e).__name__}: {e}"},
                )
            )
