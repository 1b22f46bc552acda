"""The bench's media: a pre-encoded 1080p H.264 clip and matching PCM, made once per bench run.

The clip is encoded with libx264 the way a Pi's hardware encoder delivers its stream (Annex B,
SPS/PPS before every IDR, no B-frames, a fixed GOP, VBV-capped constant bitrate), from content
that needs the bits: a finely textured scene panning behind a moving block, with per-frame
sensor noise. A flat or static picture would compress to almost nothing and make every
per-byte cost look free.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
from av.video.codeccontext import VideoCodecContext

from dualrec.h264 import split_access_units

_PAN = 64  # the texture is this much larger than the frame, to pan across without wrapping


def _encoder(width: int, height: int, fps: int, gop: int, bitrate: int) -> VideoCodecContext:
    ctx = av.CodecContext.create("libx264", "w")
    if not isinstance(ctx, VideoCodecContext):
        raise RuntimeError("libx264 is not a video encoder")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, fps)
    ctx.framerate = Fraction(fps, 1)
    ctx.bit_rate = bitrate
    kbit = bitrate // 1000
    ctx.options = {
        "preset": "veryfast",
        "g": str(gop),
        "keyint_min": str(gop),
        "sc_threshold": "0",
        "bf": "0",
        # A hardware encoder runs at a capped rate with a buffer of about a second; x264's VBV
        # with the same numbers gives packet sizes of the same shape (large IDRs, even Ps).
        "x264-params": f"repeat-headers=1:annexb=1:vbv-maxrate={kbit}:vbv-bufsize={kbit}",
    }
    ctx.open()
    return ctx


def _scene(width: int, height: int, rng: np.random.Generator) -> tuple[
    npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]
]:
    """Luma and chroma textures (limited range), _PAN pixels larger than the frame."""
    yy, xx = np.mgrid[0 : height + _PAN, 0 : width + _PAN].astype(np.float32)
    luma = (
        128
        + 40 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
        + 30 * np.sin((xx + yy) / 23.0)
        + rng.normal(0, 12, xx.shape)
    )
    cy, cx = np.mgrid[0 : (height + _PAN) // 2, 0 : (width + _PAN) // 2].astype(np.float32)
    cb = 128 + 20 * np.sin(cx / 9.0) + 10 * np.cos(cy / 13.0)
    cr = 128 + 20 * np.cos(cx / 17.0) - 10 * np.sin(cy / 5.0)
    return (
        luma.clip(16, 235).astype(np.uint8),
        cb.clip(16, 240).astype(np.uint8),
        cr.clip(16, 240).astype(np.uint8),
    )


def encode_clip(
    seconds: int = 4,
    width: int = 1920,
    height: int = 1080,
    fps: int = 30,
    gop: int = 30,
    bitrate: int = 8_000_000,
    seed: int = 0,
) -> list[bytes]:
    """The clip's access units in order; its length is a whole number of GOPs, so a loop of
    it keeps the keyframe cadence."""
    frames = -(-seconds * fps // gop) * gop
    rng = np.random.default_rng(seed)
    luma, cb, cr = _scene(width, height, rng)
    enc = _encoder(width, height, fps, gop, bitrate)
    buf = np.empty((height * 3 // 2, width), dtype=np.uint8)
    y = buf[:height]
    chroma = buf[height:].reshape(-1)
    q = width * height // 4
    block_w, block_h = width // 6, height // 4
    stream = bytearray()
    for i in range(frames + 1):
        frame = None
        if i < frames:
            dx, dy = (2 * i) % _PAN, i % _PAN  # even, so chroma pans in step
            noisy = luma[dy : dy + height, dx : dx + width].astype(np.int16)
            noisy += rng.integers(-3, 4, (height, width), dtype=np.int16)
            bx = (i * 13) % (width - block_w)
            noisy[height // 3 : height // 3 + block_h, bx : bx + block_w] = 200
            np.clip(noisy, 16, 235, out=noisy)
            y[:] = noisy
            cdx, cdy = dx // 2, dy // 2
            chroma[:q] = cb[cdy : cdy + height // 2, cdx : cdx + width // 2].reshape(-1)
            chroma[q:] = cr[cdy : cdy + height // 2, cdx : cdx + width // 2].reshape(-1)
            frame = av.VideoFrame.from_ndarray(buf, format="yuv420p")
            frame.pts = i
        for packet in enc.encode(frame):
            stream += bytes(packet)
    # Split the byte stream rather than keep the encoder's packets: the replay camera is meant
    # to take any Annex B capture, and this exercises the same path.
    units = split_access_units(bytes(stream))
    if len(units) != frames:
        raise RuntimeError(f"clip: {len(units)} access units for {frames} frames")
    return units


def looped(units: list[bytes], frames: int) -> list[bytes]:
    """The first `frames` access units of the clip played in a loop, as the camera sends them."""
    return [units[i % len(units)] for i in range(frames)]


def noise_pcm(seconds: int, rate: int = 48000, level: float = 0.002, seed: int = 0) -> bytes:
    """Mono s16le quiet-room noise, the same size and kind as SimMicrophone's."""
    rng = np.random.default_rng(seed)
    return np.rint(rng.normal(0.0, level * 32767, seconds * rate)).astype("<i2").tobytes()
