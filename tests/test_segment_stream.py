"""Segment.pack_chunks, the pieces the sealer streams into age: their concatenation is exactly
the tar tarfile writes for the same members (names, order, mode 0444, mtime, padding, the
end-of-archive blocks), so streaming changes nothing in the payload (docs/FORMAT.md §5.2)."""

from __future__ import annotations

import io
import tarfile

from dualrec.segment import (
    MEDIA_NAME,
    canonical_bytes,
    canonical_bytes_unchecked,
    event_record,
    line_record,
)
from dualrec.timebase import Timebase
from segments import make_segment


def reference_tar(seg, clock: dict, media: bytes | None) -> bytes:
    """The tar as Segment.pack built it before issue 14: tarfile.addfile, member by member."""
    members = [
        ("clock.json", canonical_bytes(clock) + b"\n"),
        ("events.jsonl", b"".join(canonical_bytes(event_record(e)) + b"\n" for e in seg.events)),
        ("oplog.jsonl", b"".join(canonical_bytes_unchecked(line_record(x)) + b"\n"
                                 for x in seg.lines)),
    ]
    if media is not None:
        members.append((MEDIA_NAME, media))
    out = io.BytesIO()
    mtime = clock["anchors"][0]["utc_ns"] // 1_000_000_000
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o444
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_chunks_are_the_tarfile_tar_byte_for_byte() -> None:
    for seconds in (1, 2, 3):
        seg = make_segment(seconds=seconds)
        clock = Timebase().clock_json(seg.start_ns, seg.end_ns)
        media = seg.mux()
        seg.mux = lambda media=media: media  # type: ignore[method-assign]  # one muxing, both
        assert b"".join(seg.pack_chunks(clock)) == reference_tar(seg, clock, media)
        assert seg.pack(clock) == reference_tar(seg, clock, media)


def test_event_only_segment_has_no_media_member() -> None:
    seg = make_segment(seconds=1)
    seg.video.clear()
    seg.audio.clear()
    clock = Timebase().clock_json(seg.start_ns, seg.end_ns)
    packed = b"".join(seg.pack_chunks(clock))
    assert packed == reference_tar(seg, clock, None)
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        assert [m.name for m in tar.getmembers()] == ["clock.json", "events.jsonl", "oplog.jsonl"]
