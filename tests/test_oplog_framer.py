"""LineFramer: byte-exact evidence under any chunking, first-byte stamps, flags, bounded memory."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualrec.oplog_framer import LineFramer
from dualrec.samples import LogLine

GB = "gb18030"


def run(framer: LineFramer, chunks: list[bytes], flush: bool = True) -> list[LogLine]:
    out: list[LogLine] = []
    for i, chunk in enumerate(chunks):
        out += framer.feed(chunk, 1000 + i)
    if flush:
        out += framer.flush(99_999)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# Text mixing 1-, 2- and 4-byte GB18030 characters, line ends and garbage bytes.
_pieces = st.sampled_from(
    [
        "交易开始".encode(GB),
        "€".encode(GB),  # 2 bytes
        "😀".encode(GB),  # 4 bytes
        "ǹ".encode(GB),  # 4 bytes
        b"TXN=000123 ",
        b"\r\n",
        b"\n",
        b"\r",
        b"\x00",
        b"\x1b[0m",
        b"\x80\xff",
        b"\x81",
    ]
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    parts=st.lists(_pieces, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    max_line=st.integers(min_value=1, max_value=40),
    line_end=st.sampled_from([b"\r\n", b"\n"]),
    encoding=st.sampled_from([GB, "utf-8"]),
)
def test_raw_concatenation_is_the_input_under_any_chunking(
    parts: list[bytes], cuts: list[int], max_line: int, line_end: bytes, encoding: str
) -> None:
    data = b"".join(parts)
    framer = LineFramer(encoding, line_end, max_line)
    lines = run(framer, split(data, cuts))
    assert b"".join(line.raw for line in lines) == data
    for line in lines:
        assert line.raw  # no empty lines invented
        assert list(line.flags) == sorted(set(line.flags))
        content = line.raw.removesuffix(b"\n")
        if line_end == b"\r\n" and (content != line.raw or "unterminated" in line.flags):
            content = content.removesuffix(b"\r")
        assert len(content) <= max_line
        assert len(line.raw) <= max_line + len(line_end)
    assert framer.flush(0) == []


@settings(max_examples=200, deadline=None, database=None)
@given(
    lines=st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=30).map(
            lambda s: s.replace("\n", "")
        ),
        max_size=10,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2_000), max_size=10),
)
def test_text_round_trips_for_valid_lines(lines: list[str], cuts: list[int]) -> None:
    data = b"".join(line.encode(GB) + b"\r\n" for line in lines)
    got = run(LineFramer(GB, b"\r\n", 4096), split(data, cuts))
    assert [line.text for line in got] == [line.replace("\x00", "") for line in lines]


def test_gb18030_text_and_crlf() -> None:
    text = "2026-11-28 10:01:02.123 [柜员T0012] 交易开始 TXN=000123 类型=理财购买"
    raw = text.encode(GB) + b"\r\n"
    (line,) = LineFramer(GB, b"\r\n", 4096).feed(raw, 5)
    assert line == LogLine(t_mono_ns=5, raw=raw, text=text, flags=())


def test_bare_lf_accepted_in_crlf_mode_and_cr_kept_in_lf_mode() -> None:
    got = LineFramer(GB, b"\r\n", 100).feed(b"a\r\nb\nc\r\n", 1)
    assert [(g.raw, g.text, g.flags) for g in got] == [
        (b"a\r\n", "a", ()),
        (b"b\n", "b", ()),
        (b"c\r\n", "c", ()),
    ]
    (lf,) = LineFramer(GB, b"\n", 100).feed(b"a\r\n", 1)
    assert (lf.raw, lf.text, lf.flags) == (b"a\r\n", "a\r", ("control",))


def test_crlf_split_between_chunks() -> None:
    framer = LineFramer(GB, b"\r\n", 100)
    assert framer.feed(b"abc\r", 1) == []
    (line,) = framer.feed(b"\ndef", 2)
    assert (line.raw, line.text, line.t_mono_ns) == (b"abc\r\n", "abc", 1)
    (rest,) = framer.flush(3)
    assert (rest.raw, rest.text, rest.t_mono_ns, rest.flags) == (
        b"def",
        "def",
        2,
        ("unterminated",),
    )


def test_timestamp_is_the_first_bytes_chunk() -> None:
    framer = LineFramer(GB, b"\r\n", 100)
    assert framer.feed(b"ab", 10) == []
    assert framer.feed(b"cd", 20) == []
    a, b = framer.feed(b"\r\nxy\r\nz", 30)
    assert (a.text, a.t_mono_ns) == ("abcd", 10)
    assert (b.text, b.t_mono_ns) == ("xy", 30)
    (c,) = framer.feed(b"\n", 40)
    assert (c.text, c.t_mono_ns) == ("z", 30)


def test_overlong_piece_stamped_with_its_own_first_byte() -> None:
    framer = LineFramer(GB, b"\r\n", 4)
    assert framer.feed(b"abc", 1) == []
    # 5 bytes and no terminator yet: not cut, the next byte could still end a 4-byte line...
    assert framer.feed(b"de", 2) == []
    pieces = framer.feed(b"fghi\r\n", 3)
    assert [(p.raw, p.t_mono_ns, p.flags) for p in pieces] == [
        (b"abcd", 1, ("overlong",)),
        (b"efgh", 2, ("continued", "overlong")),
        (b"i\r\n", 3, ("continued", "overlong")),
    ]
    (after,) = framer.feed(b"ok\r\n", 4)
    assert after.flags == ()


def test_line_of_exactly_max_line_is_not_overlong() -> None:
    framer = LineFramer(GB, b"\r\n", 4)
    assert framer.feed(b"abcd\r", 1) == []
    (line,) = framer.feed(b"\n", 2)
    assert (line.raw, line.flags) == (b"abcd\r\n", ())


def test_invalid_bytes_flagged_and_kept() -> None:
    raw = b"ok \x80\xff \xd6\xd0\r\n"
    (line,) = LineFramer(GB, b"\r\n", 100).feed(raw, 1)
    assert line.raw == raw
    assert "decode_error" in line.flags
    assert line.text.startswith("ok ") and line.text.endswith(" 中")
    assert "\ufffd" in line.text


def test_nul_and_control_flags() -> None:
    framer = LineFramer(GB, b"\r\n", 100)
    (nul,) = framer.feed(b"a\x00b\x00\r\n", 1)
    assert (nul.raw, nul.text, nul.flags) == (b"a\x00b\x00\r\n", "ab", ("nul",))
    (esc,) = framer.feed(b"\x1b[2J\x1b[Hx\r\n", 2)
    assert (esc.text, esc.flags) == ("\x1b[2J\x1b[Hx", ("control",))
    (tab,) = framer.feed(b"a\tb\r\n", 3)
    assert tab.flags == ()
    (both,) = framer.feed(b"\x00\x07\x80\r\n", 4)
    assert both.flags == ("control", "decode_error", "nul")


@pytest.mark.parametrize("encoding", [GB, "utf-8"])
def test_multibyte_character_never_split_by_a_cut(encoding: str) -> None:
    text = "交易开始😀€" * 50
    data = text.encode(encoding) + b"\r\n"
    for max_line in (5, 7, 64):
        framer = LineFramer(encoding, b"\r\n", max_line)
        lines = run(framer, [data[i : i + 3] for i in range(0, len(data), 3)])
        assert b"".join(line.raw for line in lines) == data
        assert "".join(line.text for line in lines) == text
        assert all("decode_error" not in line.flags for line in lines)
        assert all(len(line.raw) <= max_line + 2 for line in lines)


def test_megabyte_line_without_newline_stays_bounded() -> None:
    max_line = 4096
    framer = LineFramer(GB, b"\r\n", max_line)
    data = ("交易数据" * ((1 << 20) // 8 + 1)).encode(GB)[: 1 << 20] + b"x" * 7
    lines: list[LogLine] = []
    for i in range(0, len(data), 1000):
        lines += framer.feed(data[i : i + 1000], i)
        assert len(framer._buf) < max_line + 2  # what the framer keeps between calls
    lines += framer.flush(len(data))
    assert b"".join(line.raw for line in lines) == data
    assert all(len(line.raw) <= max_line for line in lines)
    assert len(lines) >= len(data) // max_line
    assert lines[0].flags == ("overlong",)
    assert all({"overlong", "continued"} <= set(line.flags) for line in lines[1:])
    assert all("decode_error" not in line.flags for line in lines)
    assert lines[-1].text.endswith("xxxxxxx")


def test_megabyte_single_feed() -> None:
    data = b"a" * (1 << 20)
    framer = LineFramer("utf-8", b"\n", 1000)
    lines = framer.feed(data, 1) + framer.flush(2)
    assert b"".join(line.raw for line in lines) == data
    assert max(len(line.raw) for line in lines) == 1000


def test_flush_strips_half_terminator_and_empty_flush() -> None:
    framer = LineFramer(GB, b"\r\n", 100)
    assert framer.flush(1) == []
    framer.feed(b"abc\r", 2)
    (line,) = framer.flush(3)
    assert (line.raw, line.text, line.flags) == (b"abc\r", "abc", ("unterminated",))
    assert framer.flush(4) == []


def test_bad_configuration_rejected() -> None:
    with pytest.raises(LookupError):
        LineFramer("no-such-codec", b"\r\n", 10)
    with pytest.raises(ValueError):
        LineFramer(GB, b"", 10)
    with pytest.raises(ValueError):
        LineFramer(GB, b"\r\n", 0)
