"""Builders for small, real segments (H.264 from libx264, PCM, log lines) used by tests."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.segment import Segment

VF = VideoFormat("h264", 160, 120, 10)
AF = AudioFormat(8000 * 6, 1)


def encode_frames(
    n: int, t0: int, fps: int = 10, white: frozenset[int] = frozenset()
) -> list[VideoPacket]:
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = VF.width, VF.height, "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(fps),
                   "keyint_min": str(fps), "sc_threshold": "0",
                   "x264-params": "repeat-headers=1"}
    out = []
    for i in range(n + 1):
        frame = None
        if i < n:
            level = 250 if i in white else (i * 7) % 120
            img = np.full((VF.height, VF.width, 3), level, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
        for p in enc.encode(frame):
            t = t0 + p.pts * 1_000_000_000 // fps
            out.append(VideoPacket(t, bytes(p), p.is_keyframe, p.pts))
    return out


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
