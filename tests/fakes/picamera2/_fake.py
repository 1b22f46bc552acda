"""The fake's knobs and records (see the package docstring), apart so every module reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeSensor:
    model: str = "imx219"
    id: str = "/base/soc/i2c0mux/i2c@1/imx219@10"
    # (size, max fps) per sensor mode, as rpicam-hello --list-cameras shows an imx219's
    modes: list[tuple[tuple[int, int], float]] = field(
        default_factory=lambda: [
            ((640, 480), 103.33),
            ((1640, 1232), 41.85),
            ((1920, 1080), 47.57),
            ((3280, 2464), 21.19),
        ]
    )
    max_frame_duration_us: int = 11_766_829


@dataclass
class FakeSettings:
    cameras: list[FakeSensor] = field(default_factory=lambda: [FakeSensor()])
    busy: bool = False
    platform: str = "VC4"
    drop_frames: set[int] = field(default_factory=set)
    stall_after: int | None = None
    stall_s: float = 0.0
    encoder_error_after: int | None = None
    ignore_repeat: bool = False
    clock_offset_ns: int = 0
    sensor_timestamps: list[int] = field(default_factory=list)
    instances: list[Any] = field(default_factory=list)


fake = FakeSettings()


def fake_reset() -> None:
    """Every knob back to its default (call between tests)."""
    fresh = FakeSettings()
    for name in fresh.__dataclass_fields__:
        setattr(fake, name, getattr(fresh, name))
