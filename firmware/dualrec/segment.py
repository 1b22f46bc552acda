"""A segment's content and its packing into the payload tar, all in memory.

The tar holds media.mkv (H.264 video remuxed as the camera encoded it, PCM audio), oplog.jsonl,
events.jsonl and clock.json (docs/FORMAT.md). Media timestamps are nanoseconds since the session
origin, so a session's segments concatenate onto one timeline. Nothing here touches the disk:
plaintext exists only in memory until the sealer encrypts it.
"""

from __future__ import annotations

import base64
import io
import tarfile
from dataclasses import dataclass, field
from fractions import Fraction

import av

from dualrec.canonical import canonical_bytes, canonical_bytes_unchecked
from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket

NS = Fraction(1, 1_000_000_000)
MEDIA_NAME = "media.mkv"


@dataclass
class Segment:
    session: str
    index: int  # position within the session, from 0
    origin_ns: int  # the session's media time zero, CLOCK_MONOTONIC
    start_ns: int
    end_ns: int = 0
    reason: str = ""  # why the segment was cut: duration, session_end, tamper, ...
    final: bool = False
    video_format: VideoFormat | None = None
    audio_format: AudioFormat | None = None
    video: list[VideoPacket] = field(default_factory=list)
    audio: list[AudioBlock] = field(default_factory=list)
    lines: list[LogLine] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    video_drops: int = 0

    def streams_summary(self) -> dict:
        vf, af = self.video_format, self.audio_format
        return {
            "video": {
                "codec": vf.codec if vf else "none",
                "width": vf.width if vf else 0,
                "height": vf.height if vf else 0,
                "fps": vf.fps if vf else 0,
                "frames": len(self.video),
                "keyframes": sum(1 for p in self.video if p.keyframe),
                "drops": self.video_drops,
            },
            "audio": {
                "codec": "pcm_s16le" if af else "none",
                "rate": af.rate if af else 0,
                "channels": af.channels if af else 0,
                "samples": sum(b.frames for b in self.audio),
                "overflows": sum(1 for b in self.audio if b.overflow),
            },
            "oplog": {
                "lines": len(self.lines),
                "bytes": sum(len(line.raw) for line in self.lines),
                "flagged": sum(1 for line in self.lines if line.flags),
            },
            "events": {"count": len(self.events)},
        }

    def pack(self, clock: dict) -> bytes:
        """The payload plaintext: an uncompressed POSIX tar, built in memory."""
        return b"".join(self.pack_chunks(clock))

    def pack_chunks(self, clock: dict) -> list[bytes]:
        """The payload plaintext in pieces whose concatenation is the tar pack() returns: each
        member's header block, its data, its padding, then the end-of-archive blocks. The
        sealer streams them into the encryptor, so the tar (a segment's size) is never copied
        into one buffer. Built with tarfile's own header encoder and its block rules, so the
        bytes are those tarfile.open(mode="w", format=PAX_FORMAT).addfile() writes."""
        members = [
            ("clock.json", canonical_bytes(clock) + b"\n"),
            ("events.jsonl", b"".join(canonical_bytes(event_record(e)) + b"\n"
                                      for e in self.events)),
            # line records are built from LogLine's typed fields: no float can be in them
            ("oplog.jsonl", b"".join(canonical_bytes_unchecked(line_record(x)) + b"\n"
                                     for x in self.lines)),
        ]
        if self.video or self.audio:
            members.append((MEDIA_NAME, self.mux()))
        mtime = clock["anchors"][0]["utc_ns"] // 1_000_000_000 if clock.get("anchors") else 0
        pieces: list[bytes] = []
        size = 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o444
            header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
            pad = -len(data) % tarfile.BLOCKSIZE
            pieces += [header, data, b"\0" * pad] if pad else [header, data]
            size += len(header) + len(data) + pad
        # close(): two zero blocks, then zeros up to a whole record
        end = 2 * tarfile.BLOCKSIZE
        end += -(size + end) % tarfile.RECORDSIZE
        pieces.append(b"\0" * end)
        return pieces

    def mux(self) -> bytes:
        """Video and audio into one Matroska file in memory, timestamps kept exactly as stamped
        (Matroska stores milliseconds; the exact nanoseconds stay in the sample records)."""
        buf = io.BytesIO()
        with av.open(buf, "w", format="matroska") as out:
            vstream = astream = None
            if self.video and self.video_format:
                vf = self.video_format
                vstream = out.add_stream(vf.codec, rate=vf.fps)
                vstream.width, vstream.height = vf.width, vf.height
                vstream.pix_fmt = "yuv420p"
            if self.audio and self.audio_format:
                af = self.audio_format
                layout = "mono" if af.channels == 1 else "stereo"
                astream = out.add_stream("pcm_s16le", rate=af.rate, layout=layout)
            packets: list[tuple[int, int, av.Packet]] = []
            if vstream is not None:
                for p in self.video:
                    pkt = av.Packet(p.data)
                    pkt.is_keyframe = p.keyframe
                    rel = p.t_mono_ns - self.origin_ns
                    packets.append((p.t_mono_ns, 0, _stamp(pkt, vstream, rel)))
            if astream is not None:
                for b in self.audio:
                    pkt = av.Packet(b.pcm)
                    rel = b.t_mono_ns - self.origin_ns
                    packets.append((b.t_mono_ns, 1, _stamp(pkt, astream, rel)))
            packets.sort(key=lambda x: (x[0], x[1]))
            for _, _, pkt in packets:
                out.mux(pkt)
        return buf.getvalue()


def _stamp(pkt: av.Packet, stream: av.stream.Stream, rel_ns: int) -> av.Packet:
    pkt.stream = stream
    pkt.time_base = NS
    pkt.pts = pkt.dts = rel_ns
    return pkt


def line_record(line: LogLine) -> dict:
    return {
        "t_mono_ns": line.t_mono_ns,
        "raw": base64.b64encode(line.raw).decode(),
        "text": line.text,
        "flags": list(line.flags),
    }


def event_record(event: Event) -> dict:
    return {"t_mono_ns": event.t_mono_ns, "kind": event.kind, "detail": event.detail}
