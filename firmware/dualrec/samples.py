"""What sources hand to the recorder: timestamped video packets, audio blocks, log lines, events.

Every sample carries t_mono_ns, CLOCK_MONOTONIC nanoseconds at capture (docs/FORMAT.md §5.3).
Samples are immutable; the recorder and segmenter only pass them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class VideoPacket:
    """One encoded H.264 access unit (Annex B), stamped at sensor exposure."""

    t_mono_ns: int
    data: bytes
    keyframe: bool
    frame_index: int  # the camera's own frame counter: a jump means dropped frames


@dataclass(frozen=True, slots=True)
class AudioBlock:
    """Interleaved signed 16-bit little-endian PCM, stamped at its first sample."""

    t_mono_ns: int
    pcm: bytes
    frames: int
    overflow: bool = False  # the device lost samples just before this block


@dataclass(frozen=True, slots=True)
class LogLine:
    """One operation-log line: the raw bytes exactly as received, stamped at its first byte."""

    t_mono_ns: int
    raw: bytes
    text: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """Something that must be on record: session start/stop, button, tamper, clock step, fault."""

    t_mono_ns: int
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


Sample = VideoPacket | AudioBlock | LogLine | Event
