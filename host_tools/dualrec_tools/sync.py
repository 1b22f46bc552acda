"""Measure audio/video/log sync at the clapper instants of an exported recording.

A clapper instant shows up three times: a (nearly) full-white video frame, the onset of a 1 kHz
beep in the audio, and a "MARK <n> ..." line in the operation log (dualrec.sim.clapper). This
module finds each in the recording itself, matches them by nearest time, and reports for every
clap the three times and their pairwise offsets. Times are integers: nanoseconds since the
session origin (media time zero), offsets in microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

NS = 1_000_000_000
WHITE_LUMA = 200  # mean luma of a clapper frame; the test pattern's mean stays far below
BEEP_THRESHOLD = 0.1  # of full scale: the sim beep peaks at 0.5, its room noise at ~0.01
# Within a 1 kHz burst the signal crosses the threshold every half cycle; an onset is the first
# crossing after this long without one.
QUIET_NS = 50_000_000
MAX_PAIR_NS = 500_000_000  # farther than this from a clap, a flash or beep is another event
MARK_PREFIX = "MARK "


def _us(ns: int) -> int:
    return round(Fraction(ns, 1000))


@dataclass(frozen=True)
class Clap:
    label: str
    log_ns: int | None
    video_ns: int | None
    audio_ns: int | None

    @property
    def offsets_us(self) -> dict[str, int | None]:
        """video-log, audio-log and audio-video, in µs (None where one side is missing)."""

        def diff(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else _us(a - b)

        return {
            "video_log": diff(self.video_ns, self.log_ns),
            "audio_log": diff(self.audio_ns, self.log_ns),
            "audio_video": diff(self.audio_ns, self.video_ns),
        }

    @property
    def complete(self) -> bool:
        return None not in (self.log_ns, self.video_ns, self.audio_ns)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "log_ns": self.log_ns, "video_ns": self.video_ns,
                "audio_ns": self.audio_ns, "offsets_us": self.offsets_us}


@dataclass(frozen=True)
class SyncReport:
    claps: list[Clap]
    unmatched_video: list[int] = field(default_factory=list)
    unmatched_audio: list[int] = field(default_factory=list)

    @property
    def max_abs_offset_us(self) -> int | None:
        offs = [abs(v) for c in self.claps for v in c.offsets_us.values() if v is not None]
        return max(offs) if offs else None

    def to_json(self) -> dict[str, Any]:
        return {"claps": [c.to_json() for c in self.claps],
                "unmatched_video_ns": self.unmatched_video,
                "unmatched_audio_ns": self.unmatched_audio,
                "max_abs_offset_us": self.max_abs_offset_us}

    def lines(self) -> list[str]:
        """Human-readable summary, offsets in ms."""

        def ms(v: int | None) -> str:
            return "   n/a" if v is None else f"{v / 1000:+7.1f}"

        def t(v: int | None) -> str:
            return "     n/a" if v is None else f"{v / NS:8.3f}"

        out = []
        for c in self.claps:
            o = c.offsets_us
            out.append(f"clap {c.label}: log {t(c.log_ns)} s video {t(c.video_ns)} s "
                       f"audio {t(c.audio_ns)} s | video-log {ms(o['video_log'])} ms "
                       f"audio-log {ms(o['audio_log'])} ms audio-video {ms(o['audio_video'])} ms")
        worst = self.max_abs_offset_us
        out.append(f"{len(self.claps)} claps, max |offset| "
                   + ("n/a" if worst is None else f"{worst / 1000:.1f} ms"))
        if self.unmatched_video or self.unmatched_audio:
            out.append(f"unmatched: {len(self.unmatched_video)} flashes, "
                       f"{len(self.unmatched_audio)} beeps")
        return out


def _ns(pts: int, time_base: Fraction) -> int:
    return pts * time_base.numerator * NS // time_base.denominator


def _mean_luma(frame: av.VideoFrame) -> float:
    if frame.format.name.startswith(("yuv", "yuvj", "nv", "gray")):
        plane = frame.planes[0]
        # plane rows are padded to line_size; only the first width bytes are picture
        rows = np.frombuffer(bytes(plane), np.uint8).reshape(-1, plane.line_size)
        return float(rows[: frame.height, : frame.width].mean())
    return float(frame.to_ndarray(format="gray").mean())


def _amplitude(frame: av.AudioFrame) -> npt.NDArray[np.float64]:
    """Per-sample peak over channels, as a fraction of full scale."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    per_channel = arr if frame.format.is_planar else arr.reshape(-1, channels).T
    peak = np.abs(per_channel.astype(np.float64)).max(axis=0)
    if np.issubdtype(arr.dtype, np.integer):
        peak /= float(2 ** (8 * arr.dtype.itemsize - 1))  # full scale of a signed sample
    return peak


def find_flashes_and_beeps(mkv_path: Path) -> tuple[list[int], list[int]]:
    """(white-frame onsets, beep onsets) in ns since media time zero, in one decoding pass."""
    flashes: list[int] = []
    beeps: list[int] = []
    was_white = False
    last_loud: int | None = None
    with av.open(str(mkv_path)) as container:
        streams = [*container.streams.video[:1], *container.streams.audio[:1]]
        for packet in container.demux(streams):
            for frame in packet.decode():
                if not isinstance(frame, av.VideoFrame | av.AudioFrame):
                    continue
                if frame.pts is None or frame.time_base is None:
                    continue
                t0 = _ns(frame.pts, frame.time_base)
                if isinstance(frame, av.VideoFrame):
                    white = _mean_luma(frame) > WHITE_LUMA
                    if white and not was_white:
                        flashes.append(t0)
                    was_white = white
                else:
                    loud = np.flatnonzero(_amplitude(frame) > BEEP_THRESHOLD)
                    if not loud.size:
                        continue
                    # sample-exact times of the loud samples, in integer ns
                    times = t0 + loud.astype(np.int64) * NS // frame.sample_rate
                    before = np.concatenate(([last_loud if last_loud is not None
                                              else times[0] - 2 * QUIET_NS], times[:-1]))
                    beeps.extend(int(t) for t in times[times - before > QUIET_NS])
                    last_loud = int(times[-1])
    return flashes, beeps


def marks(oplog_records: Iterable[dict[str, Any]], origin_ns: int) -> list[tuple[str, int]]:
    """(label, ns since origin) of the MARK lines of an operation log."""
    out = []
    for rec in oplog_records:
        text = rec.get("text", "").strip()
        if text.startswith(MARK_PREFIX):
            words = text[len(MARK_PREFIX):].split()
            out.append((words[0] if words else "?", rec["t_mono_ns"] - origin_ns))
    return out


def _take_nearest(pool: list[int], t: int) -> int | None:
    """Remove and return the time in pool nearest t, if within MAX_PAIR_NS."""
    if not pool:
        return None
    best = min(pool, key=lambda x: abs(x - t))
    if abs(best - t) > MAX_PAIR_NS:
        return None
    pool.remove(best)
    return best


def match_claps(mark_times: list[tuple[str, int]], flashes: list[int],
                beeps: list[int]) -> SyncReport:
    """Pair each MARK line with its nearest flash and beep; without MARK lines, each flash is a
    clap and is paired with its nearest beep."""
    video, audio = sorted(flashes), sorted(beeps)
    claps = []
    if mark_times:
        for label, t in sorted(mark_times, key=lambda m: m[1]):
            claps.append(Clap(label, t, _take_nearest(video, t), _take_nearest(audio, t)))
    else:
        for n, t in enumerate(list(video), 1):
            video.remove(t)
            claps.append(Clap(f"flash {n}", None, t, _take_nearest(audio, t)))
    return SyncReport(claps, video, audio)


def measure_sync(mkv_path: Path, oplog_records: Iterable[dict[str, Any]],
                 origin_ns: int) -> SyncReport:
    """Find the clapper instants in an exported recording and how far apart its streams put
    them. origin_ns: the session's media time zero on CLOCK_MONOTONIC (its session_start)."""
    flashes, beeps = find_flashes_and_beeps(Path(mkv_path))
    return match_claps(marks(oplog_records, origin_ns), flashes, beeps)
