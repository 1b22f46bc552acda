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

import threading
import time
from collections.abc import Sequence

from dualrec.devices.base import DeviceError, EventSink, VideoFormat, VideoSink
from dualrec.h264 import has_parameter_sets, is_idr, split_access_units
from dualrec.samples import Event, VideoPacket
from dualrec.sim.clapper import grid_start

NS = 1_000_000_000
STOP_TIMEOUT_S = 1.0

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
        if not self.keyframes[0] or not has_parameter_sets(self.units[0]):
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
        self._t0 = grid_start(fps)
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
