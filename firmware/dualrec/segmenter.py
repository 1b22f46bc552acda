"""The segmenter: cuts a session's sample stream into fixed-length segments.

A segment is cut at the first video keyframe at or after its nominal length, so each segment's
video starts decodable; events that must be on record at once (tamper, power fail, clock step)
cut early at their own instant. Samples are routed by t_mono_ns, not arrival order: an audio
block straddling a cut is split at the exact sample, and a segment is handed on only after a
short grace, since sources deliver a little after capture (an audio block after its last sample).
"""

from __future__ import annotations

from collections.abc import Callable

from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, Sample, VideoPacket
from dualrec.segment import Segment

GRACE_NS = 400_000_000


def split_audio(
    block: AudioBlock, at_ns: int, rate: int, channels: int
) -> tuple[AudioBlock | None, AudioBlock | None]:
    """Split a block into the part before at_ns and the part from at_ns on, at a sample edge."""
    if at_ns <= block.t_mono_ns:
        return None, block
    k = -(-(at_ns - block.t_mono_ns) * rate // 1_000_000_000)  # first sample at or after at_ns
    if k >= block.frames:
        return block, None
    width = 2 * channels
    head = AudioBlock(block.t_mono_ns, block.pcm[: k * width], k, block.overflow)
    tail = AudioBlock(block.t_mono_ns + k * 1_000_000_000 // rate, block.pcm[k * width:],
                      block.frames - k, False)
    return head, tail


class Segmenter:
    def __init__(
        self,
        *,
        segment_ns: int,
        video_format: VideoFormat | None,
        audio_format: AudioFormat | None,
        emit: Callable[[Segment], None],
        grace_ns: int = GRACE_NS,
        spill: Callable[[Sample], None] | None = None,
    ) -> None:
        self.segment_ns = segment_ns
        self.video_format = video_format
        self.audio_format = audio_format
        self._emit = emit
        # Log lines and events outside every open segment's [start, end) (before the session's
        # origin, or after its final cut) go back to the recorder: they are not this session's.
        self._spill = spill or (lambda sample: None)
        self.dropped_media = 0  # video packets and audio blocks outside the session, not filed
        self.last_end_ns = 0  # end of the newest segment handed on
        self.grace_ns = grace_ns
        self.cur: Segment | None = None
        self.nxt: Segment | None = None
        self.cut_at: int | None = None  # a cut chosen, waiting for its grace to pass
        self._cut_reason = ""
        self._final = False
        self._last_frame: int | None = None

    def set_spill(self, spill: Callable[[Sample], None]) -> None:
        self._spill = spill

    @property
    def active(self) -> bool:
        return self.cur is not None

    def open(self, session: str, origin_ns: int) -> None:
        self.flush()  # a previous session's final segment still in its grace
        self.cur = self._new(session, 0, origin_ns, origin_ns)
        self._last_frame = None

    def _new(self, session: str, index: int, origin_ns: int, start_ns: int) -> Segment:
        return Segment(session, index, origin_ns, start_ns,
                       video_format=self.video_format, audio_format=self.audio_format)

    def add(self, sample: Sample) -> None:
        """File a sample in the segment whose [start, end) holds its t_mono_ns."""
        if self.cur is None:
            raise RuntimeError("no open session")
        if sample.t_mono_ns < self.cur.start_ns:
            sample = self._before_start(sample)
            if sample is None:
                return
        if isinstance(sample, AudioBlock) and self.cut_at is not None and self.audio_format:
            head, tail = split_audio(sample, self.cut_at, self.audio_format.rate,
                                     self.audio_format.channels)
            if head:
                self.cur.audio.append(head)
            if tail and self.nxt:
                self.nxt.audio.append(tail)
            elif tail:
                self.dropped_media += 1
            return
        seg = self.cur if self.cut_at is None or sample.t_mono_ns < self.cut_at else self.nxt
        if seg is None:  # after the session's final cut: not this session's
            self._outside(sample)
            return
        if isinstance(sample, VideoPacket):
            if seg.index == 0 and not seg.video and not sample.keyframe:
                # a session's video starts decodable: frames before its first keyframe (only
                # when the pre-roll found none) cannot be shown and are not filed
                self.dropped_media += 1
                return
            if self._last_frame is not None and sample.frame_index > self._last_frame + 1:
                seg.video_drops += sample.frame_index - self._last_frame - 1
            self._last_frame = sample.frame_index
            if (self.cut_at is None and sample.keyframe and seg is self.cur
                    and sample.t_mono_ns >= seg.start_ns + self.segment_ns and seg.video):
                self._choose_cut(sample.t_mono_ns, "duration")
                seg = self.nxt
            seg.video.append(sample)
        elif isinstance(sample, AudioBlock):
            seg.audio.append(sample)
        elif isinstance(sample, LogLine):
            seg.lines.append(sample)
        elif isinstance(sample, Event):
            seg.events.append(sample)

    def _before_start(self, sample: Sample) -> Sample | None:
        """A sample stamped before the open segment's start (a late delivery): the part of an
        audio block from the start on is kept; anything else is not this segment's."""
        assert self.cur is not None
        if isinstance(sample, AudioBlock) and self.audio_format:
            _, tail = split_audio(sample, self.cur.start_ns, self.audio_format.rate,
                                  self.audio_format.channels)
            if tail is None:
                self.dropped_media += 1
            return tail
        if isinstance(sample, Event) and self.cur.index > 0:
            # An event delivered after the segment of its time was handed on (a slow device
            # thread): on record in the open segment, at its start, with its own time kept,
            # rather than in no segment (FORMAT.md §5.3).
            return Event(self.cur.start_ns, sample.kind,
                         {**sample.detail, "late_t_mono_ns": sample.t_mono_ns})
        self._outside(sample)
        return None

    def _outside(self, sample: Sample) -> None:
        if isinstance(sample, VideoPacket | AudioBlock):
            self.dropped_media += 1
        else:
            self._spill(sample)

    def _choose_cut(self, at_ns: int, reason: str, final: bool = False) -> None:
        assert self.cur is not None
        self.cut_at = at_ns
        self._cut_reason = reason
        self._final = final
        self.cur.end_ns = at_ns
        self.nxt = None if final else self._new(self.cur.session, self.cur.index + 1,
                                                  self.cur.origin_ns, at_ns)
        # samples already filed past the cut move to the next segment, or out of a session
        # that ends here: a segment holds exactly the samples of [start, end)
        for name in ("video", "lines", "events"):
            kept = [s for s in getattr(self.cur, name) if s.t_mono_ns < at_ns]
            moved = [s for s in getattr(self.cur, name) if s.t_mono_ns >= at_ns]
            setattr(self.cur, name, kept)
            if self.nxt is not None:
                getattr(self.nxt, name).extend(moved)
            else:
                for sample in moved:
                    self._outside(sample)
        audio = []
        for block in self.cur.audio:
            if self.audio_format:
                head, tail = split_audio(block, at_ns, self.audio_format.rate,
                                         self.audio_format.channels)
            else:
                head, tail = block, None
            if head:
                audio.append(head)
            if tail and self.nxt is not None:
                self.nxt.audio.append(tail)
            elif tail:
                self.dropped_media += 1
        self.cur.audio = audio

    def tick(self, now_ns: int) -> None:
        """Hand on the segment whose cut's grace has passed; start a time-based cut when the
        session has no video to give keyframes."""
        if self.cur is None:
            return
        if (self.cut_at is None and self.video_format is None
                and now_ns >= self.cur.start_ns + self.segment_ns):
            self._choose_cut(self.cur.start_ns + self.segment_ns, "duration")
        if self.cut_at is not None and now_ns >= self.cut_at + self.grace_ns:
            self._finish()

    def _finish(self) -> None:
        assert self.cur is not None
        seg = self.cur
        seg.reason = self._cut_reason
        seg.final = self._final
        self.cur, self.nxt, self.cut_at = self.nxt, None, None
        self.last_end_ns = max(self.last_end_ns, seg.end_ns)
        self._emit(seg)

    def cut(self, at_ns: int, reason: str, *, final: bool = False) -> None:
        """Cut early at at_ns (tamper, clock step, power fail) or finally (end of session)."""
        if self.cur is None:
            return
        if self.cut_at is not None:  # an earlier cut is still in its grace: finish it first
            self._finish()
            if self.cur is None:
                return
        self._choose_cut(self.earliest_cut(at_ns), reason, final)

    def earliest_cut(self, at_ns: int) -> int:
        """at_ns, or the first instant the next cut may be at: a segment is never empty
        (end > start). A cut still in its grace is finished first, so its next segment counts."""
        seg = self.nxt if self.cut_at is not None and self.nxt is not None else self.cur
        return at_ns if seg is None else max(at_ns, seg.start_ns + 1)

    def flush(self) -> None:
        """Hand on everything now (shutdown)."""
        if self.cut_at is not None:
            self._finish()
