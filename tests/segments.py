"""Builders for small, real segments (H.264 from libx264, PCM, log lines) used by tests."""

from __future__ import annotations

import numpy as np

from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.segment import Segment
from dualrec_tools.vectors import encode_video

VF = VideoFormat("h264", 160, 120, 10)
AF = AudioFormat(8000 * 6, 1)


def encode_frames(
    n: int, t0: int, fps: int = 10, white: frozenset[int] = frozenset()
) -> list[VideoPacket]:
    """Real H.264 of VF's size at fps; the frames in white are white (clapper flashes)."""
    fmt = VideoFormat(VF.codec, VF.width, VF.height, fps)
    return encode_video(fmt, n, t0, lambda i: 250 if i in white else (i * 7) % 120)


def audio_blocks(seconds: int, t0: int, block: int = 480) -> list[AudioBlock]:
    rate = AF.rate
    pcm = (np.random.default_rng(1).normal(0, 100, rate * seconds)).astype("<i2")
    out = []
    for k in range(0, len(pcm), block):
        chunk = pcm[k:k + block]
        out.append(AudioBlock(t0 + k * 1_000_000_000 // rate, chunk.tobytes(), len(chunk)))
    return out


S1 = "20250301T090000Z-000001"  # session ids and a boot id of the form FORMAT.md §3 asks
BOOT_A = "00000000-0000-4000-8000-00000000000a"


def make_segment(session: str = S1, index: int = 0, t0: int = 10**12, seconds: int = 2,
                 final: bool = False) -> Segment:
    seg = Segment(session, index, t0, t0, end_ns=t0 + seconds * 10**9,
                  reason="session_end" if final else "duration",
                  final=final, video_format=VF, audio_format=AF)
    seg.video = encode_frames(seconds * VF.fps, t0)
    seg.audio = audio_blocks(seconds, t0)
    seg.lines = [LogLine(t0 + 5 * 10**8, "交易开始 TXN=1\r\n".encode("gb18030"), "交易开始 TXN=1")]
    seg.events = [Event(t0, "session_start", {"trigger": "test"})]
    return seg
