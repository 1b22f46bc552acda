"""LineFramer line ends and idle timeout, as properties over the whole class of inputs.

Any bytes, any chunking, any pauses between chunks, polls at any instants in the pauses, any
mix of CR, LF and CRLF, in every line_end mode: the lines' raw bytes concatenate to the input;
each line is stamped with the time of the chunk holding its first byte; a line ends only at a
terminator of its mode, at an overlong cut, at a pause of idle_ms or more, or at the end; a
pause of idle_ms or more always ends the line; CR and LF split across chunks without a pause
are one CRLF terminator; memory stays bounded.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from dualrec.oplog_framer import LINE_ENDS, LineFramer
from dualrec.samples import LogLine

IDLE_MS = 200
IDLE = IDLE_MS * 1_000_000
MS = 1_000_000

# Bytes with many line ends, multi-byte characters of three encodings, controls and garbage.
_pieces = st.one_of(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n"]),
    st.sampled_from(["交易开始", "客户确认", "😀", "€"]).flatmap(
        lambda s: st.sampled_from([s.encode("gb18030"), s.encode("utf-8")])),
    st.just("風險揭示".encode("big5")),
    st.sampled_from([b"\x1b@", b"\x1ba\x01", b"\x1dV\x00", b"\x00", b"\x80\xff", b"\xe4\xb8"]),
    st.binary(max_size=12),
)
# Gaps between chunks: exactly at, just under and over the idle timeout, and far either side.
_gaps = st.sampled_from([0, 1, MS, IDLE - 1, IDLE, IDLE + 1, 3 * IDLE])


@dataclass
class Played:
    data: bytes
    starts: list[int]  # offset of each chunk's first byte in data
    times: list[int]  # each chunk's time
    idle_cuts: set[int]  # offsets where a pause of idle_ms or more precedes the next byte
    lines: list[LogLine]
    max_kept: int  # most bytes the framer held between calls


@st.composite
def plays(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, int, int | None]]]:
    """(data, [(chunk, gap before it, poll at this fraction of the gap in 1/8, or None)])."""
    data = b"".join(draw(st.lists(_pieces, max_size=40)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=25))) | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    return data, [(c, draw(_gaps), draw(st.none() | st.integers(0, 8))) for c in chunks]


def play(framer: LineFramer, script: list[tuple[bytes, int, int | None]]) -> Played:
    lines: list[LogLine] = []
    starts: list[int] = []
    times: list[int] = []
    idle_cuts: set[int] = set()
    t, offset, kept = 10**12, 0, 0
    for chunk, gap, poll in script:
        if poll is not None:
            lines += framer.poll(t + gap * poll // 8)
            kept = max(kept, len(framer._buf))
        t += gap
        if gap >= IDLE and offset:
            idle_cuts.add(offset)
        starts.append(offset)
        times.append(t)
        lines += framer.feed(chunk, t)
        kept = max(kept, len(framer._buf))
        offset += len(chunk)
    lines += framer.flush(t + 1)
    return Played(b"".join(c for c, _, _ in script), starts, times, idle_cuts, lines, kept)


def ends_with_terminator(raw: bytes, mode: str) -> bool:
    if mode == "any":
        return raw.endswith((b"\r", b"\n"))
    return raw.endswith(mode.encode()[-1:])


@settings(max_examples=400, deadline=None, database=None)
@given(script=plays(), mode=st.sampled_from(LINE_ENDS), max_line=st.integers(1, 24),
       encoding=st.sampled_from(["auto", "gb18030", "utf-8", "big5"]))
def test_lines_are_the_input_split_only_where_allowed(
    script: tuple[bytes, list[tuple[bytes, int, int | None]]], mode: str, max_line: int,
    encoding: str,
) -> None:
    data, chunks = script
    got = play(LineFramer(encoding, mode, max_line, idle_ms=IDLE_MS), chunks)
    assert b"".join(line.raw for line in got.lines) == data
    assert got.max_kept <= max_line + 1
    ends: set[int] = set()
    offset = 0
    for line in got.lines:
        assert line.raw
        # The stamp is the time of the chunk that delivered the line's first byte.
        assert line.t_mono_ns == got.times[bisect.bisect_right(got.starts, offset) - 1]
        offset += len(line.raw)
        ends.add(offset)
        if "unterminated" in line.flags:
            assert offset in got.idle_cuts or offset == len(data)
        elif not ends_with_terminator(line.raw, mode):
            assert "overlong" in line.flags  # a cut piece of a long line
        if mode == "any" and line.raw.endswith(b"\r") and offset < len(data):
            # A bare CR ends a line only when no LF follows it without a pause.
            assert data[offset] != 0x0A or offset in got.idle_cuts
    # Every pause of idle_ms or more ended the line before it.
    assert got.idle_cuts <= ends


@settings(max_examples=200, deadline=None, database=None)
@given(before=st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
       after=st.binary(max_size=20), gap=st.integers(0, IDLE - 1),
       mode=st.sampled_from(["any", "\r\n"]))
def test_cr_and_lf_in_two_chunks_without_a_pause_are_one_terminator(
    before: bytes, after: bytes, gap: int, mode: str
) -> None:
    framer = LineFramer("auto", mode, 4096, idle_ms=IDLE_MS)
    assert framer.feed(before + b"\r", 1000) == []  # the CR waits for the next byte
    assert framer.poll(1000 + gap) == []  # ... however long, short of the idle timeout
    first, *_ = framer.feed(b"\n" + after, 1000 + gap)
    assert (first.raw, first.t_mono_ns, first.flags) == (before + b"\r\n", 1000, tuple(
        sorted(first.flags)))
    assert "unterminated" not in first.flags


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")).filter(bool),
    pause=st.integers(IDLE, 10 * IDLE), mode=st.sampled_from(LINE_ENDS))
def test_a_pause_of_idle_ms_completes_the_line(text: bytes, pause: int, mode: str) -> None:
    framer = LineFramer("auto", mode, 4096, idle_ms=IDLE_MS)
    assert framer.feed(text[:1], 5_000) == []
    assert framer.feed(text[1:], 5_000 + MS) == []
    last = 5_000 + MS if len(text) > 1 else 5_000  # the time of the line's last byte
    assert framer.poll(last + IDLE - 1) == []  # not yet: the pause is measured from it
    (line,) = framer.poll(last + pause)
    assert (line.raw, line.t_mono_ns, "unterminated" in line.flags) == (text, 5_000, True)
    assert framer.poll(10**15) == [] and framer.flush(0) == []


def test_a_pause_decided_by_stamps_even_when_the_reader_was_late() -> None:
    """The reader may not wake up during the pause (a busy box): the next chunk's stamp shows
    the pause, and the old line ends there all the same."""
    framer = LineFramer("auto", "any", 4096, idle_ms=IDLE_MS)
    assert framer.feed(b"TXN=1 part", 0) == []
    old, new = framer.feed(b" two\r\n", IDLE)
    assert (old.raw, old.flags, old.t_mono_ns) == (b"TXN=1 part", ("unterminated",), 0)
    assert (new.raw, new.flags, new.t_mono_ns) == (b" two\r\n", (), IDLE)


def test_cr_alone_ends_a_line_in_any_mode_once_the_next_byte_or_a_pause_says_so() -> None:
    framer = LineFramer("auto", "any", 4096, idle_ms=IDLE_MS)
    assert framer.feed(b"a\r", 1) == []
    (a,) = framer.feed(b"b\r\nc\nd\r", 2)[:1]
    assert (a.raw, a.text, a.flags) == (b"a\r", "a", ())
    (d,) = framer.poll(2 + IDLE)
    assert (d.raw, d.text, d.flags, d.t_mono_ns) == (b"d\r", "d", (), 2)  # CR: terminated
    got = framer.feed(b"x\n\ry\r\n", 3 + IDLE) + framer.flush(0)
    assert [g.raw for g in got] == [b"x\n", b"\r", b"y\r\n"]  # LF CR: an empty line between


def test_crlf_mode_keeps_a_bare_cr_as_content_and_a_paused_cr_as_half_a_terminator() -> None:
    framer = LineFramer("auto", "\r\n", 4096, idle_ms=IDLE_MS)
    (line,) = framer.feed(b"a\rb\r\n", 1)
    assert (line.text, line.flags) == ("a\rb", ("control",))
    assert framer.feed(b"c\r", 2) == []
    (c,) = framer.poll(2 + IDLE)
    assert (c.raw, c.text, c.flags) == (b"c\r", "c", ("unterminated",))


def test_no_idle_timeout_unless_configured() -> None:
    framer = LineFramer("auto", "any", 4096)
    framer.feed(b"abc", 0)
    assert framer.poll(10**15) == []
    assert framer.wake_interval_s(0.05) == 0.05
    assert LineFramer("auto", "any", 80, idle_ms=20).wake_interval_s(0.05) == 0.01


def test_fresh_copies_every_setting() -> None:
    framer = LineFramer("big5", "\r", 100, idle_ms=300, decode_error_run=7)
    twin = framer.fresh()
    assert (twin.encoding, twin.line_end, twin.max_line, twin.idle_ms, twin.decode_error_run) \
        == ("big5", "\r", 100, 300, 7)
