"""Recorder and segmenter, driven with synthetic samples on a virtual clock (no threads)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

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
    # pre-roll: at least 2 s before the trigger (3.35 s), from the keyframe at or before (3 s)
    assert first.start_ns == 3 * S and first.video[0].keyframe
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
    assert kinds == ["session_start", "session_completeness", "session_stop"]
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


def _session_lines(segs: list[Segment]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for seg in segs:
        out.setdefault(seg.session, []).extend(x.text for x in seg.lines)
    return out


def test_a_new_transaction_during_postroll_is_a_new_session():
    """Tried: the next customer's start line 0.5 s after the end line, inside the post-roll.
    Asserted: two sessions, each holding exactly its own transaction's lines (the first ends at
    the second's start line; their media may overlap by the pre-roll)."""
    rig = Rig()
    rig.lines = [(1 * S, "BEGIN 1"), (3 * S, "END 1"), (int(3.5 * S), "BEGIN 2"), (6 * S, "END 2")]
    rig.run_until(10 * S)
    assert rig.rec.sessions_started == 2
    assert list(_session_lines(rig.out).values()) == [["BEGIN 1", "END 1"], ["BEGIN 2", "END 2"]]


def test_end_and_next_start_in_one_chunk_split_at_the_line() -> None:
    """Tried: an end line and the next start line delivered in one read (the same stamp).
    Asserted: the end line closes the first session, the start line opens the second."""
    rig = Rig()
    rig.lines = [(1 * S, "BEGIN 1"), (3 * S, "END 1"), (3 * S, "BEGIN 2"), (5 * S, "END 2")]
    rig.run_until(9 * S)
    assert list(_session_lines(rig.out).values()) == [["BEGIN 1", "END 1"], ["BEGIN 2", "END 2"]]


def test_lines_between_sessions_are_sealed_in_idle_segments() -> None:
    """Tried: chatter before, between and after two transactions, and an end line with no
    start. Asserted: every line is in exactly one segment; lines outside sessions are in idle
    segments (reason oplog), the orphan end line is on record, and no session holds a line from
    before its start line."""
    rig = Rig(idle_seal_ns=2 * S)
    texts = ["hello", "BEGIN 1", "step", "END 1", "between", "END 9", "BEGIN 2", "END 2", "bye"]
    rig.lines = [(int((1 + 1.3 * k) * S), t) for k, t in enumerate(texts)]
    rig.run_until(20 * S)
    rig.rec.shutdown(rig.t)
    sealed = [x.text for seg in rig.out for x in seg.lines]
    assert sorted(sealed) == sorted(texts)
    by = _session_lines([s for s in rig.out if s.session])
    assert list(by.values()) == [["BEGIN 1", "step", "END 1"], ["BEGIN 2", "END 2"]]
    idle = [s for s in rig.out if not s.session]
    assert {s.reason for s in idle} <= {"oplog", "event"} and idle
    assert any(e.kind == "transaction_end_without_start" for s in idle for e in s.events)
    ends = [s.end_ns for s in sorted(rig.out, key=lambda s: s.end_ns)]
    assert [s.end_ns for s in rig.out] == ends  # sealed in time order


def test_split_audio_is_sample_exact():
    b = AudioBlock(1000, bytes(range(20)), 10)
    head, tail = split_audio(b, 1000 + 3 * S // RATE + 1, RATE, 1)
    assert head.frames == 4 and tail.frames == 6 and head.pcm + tail.pcm == b.pcm
    assert tail.t_mono_ns == 1000 + 4 * S // RATE


def _inside(seg: Segment) -> list[str]:
    """Every sample of the segment that lies outside its [start, end) (FORMAT.md §5.3)."""
    bad = [f"{type(s).__name__} at {s.t_mono_ns}" for s in seg.video + seg.lines + seg.events
           + seg.audio if not seg.start_ns <= s.t_mono_ns < seg.end_ns]
    if seg.end_ns <= seg.start_ns:
        bad.append(f"empty span {seg.start_ns}..{seg.end_ns}")
    return bad


@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300), st.sampled_from(
    ["", "tamper", "clock_step", "button"])), min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_every_sample_lies_inside_its_segment(plan: list[tuple[int, int, str]]) -> None:
    """Tried: transactions whose start and end lines come at arbitrary 100 ms steps (back to
    back, inside pre- and post-roll, while a cut is in its grace), with tamper, clock-step and
    button events mixed in. Asserted: every frame, audio block, line and event of every sealed
    segment lies in that segment's [start, end), and no segment is empty; a session's final
    cut moves out what was filed past it (the box once sealed a frame 0.66 ms past the end)."""
    rig = Rig(postroll_ns=S // 3)
    t = 3 * S
    events = []
    for gap, length, event in plan:
        t += gap * S // 100
        rig.lines.append((t, f"BEGIN {t}"))
        if event:
            events.append((t + length * S // 200, event))
        t += length * S // 100
        rig.lines.append((t, f"END {t}"))
    end = t + 5 * S
    for when, kind in sorted(events):
        rig.run_until(when)
        rig.rec.handle(Event(when, kind, {}), rig.t)
    rig.run_until(end)
    rig.rec.shutdown(rig.t)
    assert rig.out, "nothing was sealed"
    for seg in rig.out:
        assert not _inside(seg), (seg.session, seg.index, seg.reason, _inside(seg)[:3])


def test_final_cut_moves_out_what_was_filed_past_it() -> None:
    """A final cut chosen after frames beyond it were already filed (the post-roll ended
    between two recorder passes): those frames are not in the final segment, and a log line
    past the cut goes back to the recorder instead of into the ended session."""
    spilled: list = []
    out: list[Segment] = []
    seg = Segmenter(segment_ns=10 * S, video_format=VF, audio_format=AF, emit=out.append)
    seg.set_spill(spilled.append)
    seg.open("s", 0)
    for k in range(20):
        seg.add(VideoPacket(k * S // 10, b"f", k % 10 == 0, k))
        seg.add(AudioBlock(k * S // 10, b"\0\0" * BLOCK, BLOCK))
    seg.add(LogLine(1_950_000_000, b"late\r\n", "late"))
    seg.cut(1_234_000_000, "session_end", final=True)
    seg.flush()
    assert len(out) == 1 and out[0].end_ns == 1_234_000_000
    assert not _inside(out[0])
    assert [x.text for x in spilled] == ["late"]
    assert sum(b.frames for b in out[0].audio) == 1_234_000_000 * RATE // S  # split exactly
    assert seg.dropped_media > 0


def test_a_cut_at_the_segment_start_still_gives_it_a_span() -> None:
    out: list[Segment] = []
    seg = Segmenter(segment_ns=10 * S, video_format=VF, audio_format=AF, emit=out.append)
    seg.open("s", 5 * S)
    seg.cut(5 * S, "session_end", final=True)
    seg.flush()
    assert out[0].start_ns == 5 * S and out[0].end_ns == 5 * S + 1


def test_labels_and_an_incomplete_session_on_record_and_on_the_panel() -> None:
    """Tried: a transaction whose business type requires a step that never comes. Asserted:
    its labels and completeness are events of the session, and the panel is told what is
    missing at the end line (before the post-roll ends), then cleared by the next session."""
    from dualrec.transactions import TransactionRules

    shown: list[list[str] | None] = []
    rules = TransactionRules.build([r"TXN=(?P<txn>\d+) TYPE=(?P<business>\w+)"],
                                   {"loan": {"disclosure": "DISCLOSED"}})
    rig = Rig(rules=rules, on_incomplete=shown.append)
    rig.lines = [(1 * S, "BEGIN TXN=7 TYPE=loan"), (2 * S, "STEP"), (3 * S, "END"),
                 (8 * S, "BEGIN TXN=8 TYPE=loan"), (9 * S, "DISCLOSED"), (10 * S, "END")]
    rig.run_until(int(3.2 * S))
    assert shown[-1] == ["disclosure"]  # at the end line, the post-roll still running
    rig.run_until(14 * S)
    events = {}
    for seg in rig.out:
        for e in seg.events:
            events.setdefault(seg.session, []).append((e.kind, e.detail))
    first, second = list(events.values())
    assert ("session_labels", {"txn": "7", "business": "loan"}) in first
    assert ("session_completeness", {"business": "loan", "required": ["disclosure"],
                                     "missing": ["disclosure"], "complete": False}) in first
    assert any(k == "session_completeness" and d["complete"] for k, d in second)
    assert shown[-1] is None
