"""The interface of each device kind. Sources push samples into a sink callable from their own
thread; the gateway owns the threads' lifetime through start()/stop()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket

VideoSink = Callable[[VideoPacket], None]
AudioSink = Callable[[AudioBlock], None]
LogSink = Callable[[LogLine], None]
EventSink = Callable[[Event], None]


class DeviceError(RuntimeError):
    """A device cannot start or has failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class VideoFormat:
    codec: str  # "h264"
    width: int
    height: int
    fps: int


@dataclass(frozen=True, slots=True)
class AudioFormat:
    rate: int
    channels: int  # samples are s16le interleaved


class Camera(Protocol):
    format: VideoFormat

    def start(self, sink: VideoSink, events: EventSink) -> None: ...
    def stop(self) -> None: ...


class Microphone(Protocol):
    format: AudioFormat

    def start(self, sink: AudioSink, events: EventSink) -> None: ...
    def stop(self) -> None: ...


class OpLog(Protocol):
    def start(self, sink: LogSink, events: EventSink) -> None: ...
    def stop(self) -> None: ...


class Panel(Protocol):
    """LEDs out; button, tamper and power-fail in (reported as events)."""

    def start(self, events: EventSink) -> None: ...
    def set_recording(self, on: bool) -> None: ...
    def set_fault(self, pattern: str | None) -> None: ...
    def stop(self) -> None: ...
