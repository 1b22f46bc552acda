"""Recorder and segmenter, driven with synthetic samples on a virtual clock (no threads)."""

from __future__ import annotations

import itertools

from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.recorder import Recorder
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.segment import Segment
from dualrec.segmenter import Segmenter, split_audio

S = 1_000_000_000
FPS, GOP, RATE, BLOCK = 10, 10, 8000, 800  # 100 ms frames, 1 s GOP, 100 ms audio blocks
VF, AF = VideoFormat("h264", 16, 16, FPS), AudioFormat(RATE, 1)


class Rig:
    def __init__(self, **kw):
        self.out: list[Segment] = []
        self.led: list[bool] = []
        seg = Segmenter(segment_ns=kw.pop("segment_ns", 3 * S), video_format=VF,
                        audio_format=AF, emit=self.out.append)
        args = dict(preroll_ns=2 * S, postroll_ns=1 * S, max_session_ns=3600 * S,
                    start_patterns=["BEGIN"], stop_patterns=["END"])
        args.update(kw)
        self.rec = Recorder(segmenter=seg, emit=self.out.append, to_utc_ns=lambda t: t,
                            on_recording=self.led.append, **args)
        self.t = 0
        self.frame = 0
        self.lines: list[tuple[int, str]] = []

    def run_until(self, t_end: int) -> None:
        """Feed video and audio in capture order, audio arriving at its block end."""
        while self.t < t_end:
            self.t += S // FPS
            while self.lines and self.lines[0][0] <= self.t:
                t, text = self.lines.pop(0)
                self.rec.handle(LogLine(t, text.encode(), text), self.t)
            t_frame = self.t - S // FPS
            self.rec.handle(VideoPacket(t_frame, b"f", self.frame % GOP == 0, self.frame), self.t)
            self.frame += 1
            self.rec.handle(AudioBlock(t_frame, b"\0\0" * BLOCK, BLOCK), self.t)
            self.rec.tick(self.t)


def all_samples(segs):
    return [s for seg in segs for s in seg.video + seg.audio + seg.lines]


def test_session_from_log_with_preroll_postroll_and_keyframe_cuts():
    rig = Rig()
    rig.lines = [(int(5.35 * S), "BEGIN 1"), (int(12.05 * S), "END 1")]
    rig.run_until(20 * S)
    segs = rig.out
    assert [s.index for s in segs] == list(range(len(segs))) and segs[-1].final
    assert all(not s.final for s in segs[:-1])
    first = segs[0]
    # pre-roll: 2 s before the trigger, starting at a keyframe (t = 4 s)
    assert first.start_ns == 4 * S and first.video[0].keyframe
    # every segment but the last starts on a keyframe and is >= 3 s long
    for a, b in itertools.pairwise(segs):
        assert b.video[0].keyframe and a.end_ns == b.start_ns and a.end_ns - a.start_ns >= 3 * S
    # post-roll: the session ends 1 s after the END line
    assert segs[-1].end_ns == int(13.05 * S)
    # no sample lost or duplicated at cuts; audio continuous sample by sample
    audio = [b for s in segs for b in s.audio]
    assert sum(b.frames for b in audio) == (segs[-1].end_ns - first.start_ns) * RATE // S
    for a, b in itertools.pairwise(audio):
        assert b.t_mono_ns == a.t_mono_ns + a.frames * S // RATE
    kinds = [e.kind for s in segs for e in s.events]
    assert kinds == ["session_start", "session_stop"]
    assert rig.led == [True, False]
    assert [line.text for s in segs for line in s.lines] == ["BEGIN 1", "END 1"]


def test_tamper_cuts_segment_at_once_and_idle_tamper_is_sealed():
    rig = Rig(segment_ns=10 * S)
    rig.lines = [(int(1.0 * S), "BEGIN")]
    rig.run_until(int(2.5 * S))
    rig.rec.handle(Event(int(2.5 * S), "tamper", {}), rig.t)
    rig.run_until(4 * S)
    assert rig.out and rig.out[0].end_ns == int(2.5 * S) + 1 and rig.out[0].reason == "tamper"
    assert rig.out[0].events[-1].kind == "tamper"  # on record in the segment it closed
    rig.rec.shutdown(rig.t)
    rig.out.clear()
    rig.rec.handle(Event(rig.t, "tamper", {}), rig.t)
    assert len(rig.out) == 1 and rig.out[0].session == "" and rig.out[0].events[0].kind == "tamper"


def test_button_starts_and_stops_and_continuous_mode():
    rig = Rig()
    rig.run_until(3 * S)
    rig.rec.handle(Event(3 * S, "button", {}), rig.t)
    rig.run_until(5 * S)
    rig.rec.handle(Event(5 * S, "button", {}), rig.t)
    rig.run_until(8 * S)
    assert rig.out[-1].final and rig.led == [True, False]
    cont = Rig(continuous=True)
    cont.run_until(2 * S)
    assert cont.rec.state == "recording"


def test_new_transaction_during_postroll_keeps_the_session():
    rig = Rig()
    rig.lines = [(1 * S, "BEGIN"), (3 * S, "END"), (int(3.5 * S), "BEGIN"), (6 * S, "END")]
    rig.run_until(10 * S)
    assert len({s.session for s in rig.out}) == 1 and rig.rec.sessions_started == 1


def test_split_audio_is_sample_exact():
    b = AudioBlock(1000, bytes(range(20)), 10)
    head, tail = split_audio(b, 1000 + 3 * S // RATE + 1, RATE, 1)
    assert head.frames == 4 and tail.frames == 6 and head.pcm + tail.pcm == b.pcm
    assert tail.t_mono_ns == 1000 + 4 * S // RATE
