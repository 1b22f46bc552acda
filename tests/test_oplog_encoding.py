"""Operation-log encodings (auto, gb18030, utf-8, big5) and the decode-error fault.

What auto does is asserted for each encoding a terminal may send, including the case it cannot
tell apart (Big5 reads as GB18030 without a decode error), which docs/config.md states.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualrec.oplog_decode import DecodeWatch, decode_line
from dualrec.oplog_framer import LineFramer
from dualrec.samples import LogLine

START = "交易开始"
LOG = [f"2026-11-28 10:01:02 [柜员T0012] {START} TXN=000123 类型=理财购买",
       "2026-11-28 10:01:09 风险揭示 已阅读 客户确认",
       "2026-11-28 10:02:30 交易结束 TXN=000123"]
BIG5_LOG = ["2026-11-28 10:01:02 [櫃員T0012] 交易開始 TXN=000123",
            "2026-11-28 10:01:09 風險揭示 已閱讀 客戶確認"]


def lines_of(encoding: str, data: bytes, run: int | None = None) -> list[LogLine]:
    framer = LineFramer(encoding, "any", 4096, decode_error_run=run)
    return framer.feed(data, 1) + framer.flush(2)


@pytest.mark.parametrize("sent", ["utf-8", "gb18030"])
def test_auto_reads_utf8_and_gb18030_terminals(sent: str) -> None:
    data = b"".join(t.encode(sent) + b"\r\n" for t in LOG)
    got = lines_of("auto", data)
    assert [(g.text, g.flags) for g in got] == [(t, ()) for t in LOG]
    assert b"".join(g.raw for g in got) == data


def test_big5_needs_big5_and_auto_reads_it_as_gb18030_without_a_flag() -> None:
    data = b"".join(t.encode("big5") + b"\n" for t in BIG5_LOG)
    assert [(g.text, g.flags) for g in lines_of("big5", data)] == [(t, ()) for t in BIG5_LOG]
    auto = lines_of("auto", data)
    # Every Big5 character is a valid GB18030 code: the wrong characters, and no flag to say
    # so. Nothing matches 交易開始 then; `dualrec diag` reports that (tests/test_oplog_diag.py).
    assert [(g.text, g.flags) for g in auto] == [
        (t.encode("big5").decode("gb18030"), ()) for t in BIG5_LOG]
    assert all("交易開始" not in g.text and START not in g.text for g in auto)
    assert b"".join(g.raw for g in auto) == data


@settings(max_examples=300, deadline=None, database=None)
@given(before=st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
       after=st.text(st.characters(exclude_categories=["Cs"]), max_size=20))
def test_auto_never_mistakes_a_gb18030_start_line_for_utf8(before: str, after: str) -> None:
    """Whatever surrounds it, 交易开始 in GB18030 makes the line invalid UTF-8 (its first byte,
    0xBD, can only continue a UTF-8 sequence and the next, 0xBB, cannot follow it), so auto
    reads the line as GB18030 and the start pattern matches."""
    text, bad = decode_line((before + START + after).encode("gb18030"), "auto")
    assert START in text and not bad


def test_a_short_gb18030_line_can_read_as_utf8() -> None:
    """The documented limit of per-line auto: 职 in GB18030 (D6 B0) is also valid UTF-8."""
    assert decode_line("职".encode("gb18030"), "auto") == ("\u05b0", False)
    assert decode_line("职".encode("gb18030"), "gb18030") == ("职", False)


@pytest.mark.parametrize("encoding, data, text", [
    ("utf-8", "客户确认".encode("gb18030"), None),
    ("gb18030", b"\x81", None),
    ("big5", "客户确认".encode() + b"\xff", None),
    ("auto", b"ok \x80\xff", "ok \ufffd\ufffd"),
])
def test_bytes_invalid_in_the_encoding_are_flagged_and_kept(
    encoding: str, data: bytes, text: str | None
) -> None:
    (line,) = lines_of(encoding, data + b"\r\n")
    assert line.raw == data + b"\r\n" and "decode_error" in line.flags
    assert "\ufffd" in line.text and (text is None or line.text == text)


def test_overlong_cut_never_splits_a_character_in_auto_mode() -> None:
    for sent in ("utf-8", "gb18030"):
        text = (START + "客户确认😀") * 40
        data = text.encode(sent) + b"\n"
        framer = LineFramer("auto", "any", 7)
        got = [x for i in range(0, len(data), 5) for x in framer.feed(data[i:i + 5], i)]
        got += framer.flush(0)
        assert "".join(g.text for g in got) == text
        assert not any("decode_error" in g.flags for g in got)


# --- the decode-error fault ---------------------------------------------------------------


_clock = itertools.count(1_000, 1_000)


def events_of(framer: LineFramer, lines: list[bytes]) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for raw in lines:
        framer.feed(raw + b"\r\n", next(_clock))
        out += framer.take_events()
    return out


def test_a_run_of_decode_errors_is_a_fault_and_clean_lines_clear_it() -> None:
    framer = LineFramer("utf-8", "any", 4096, decode_error_run=5)
    gb = [t.encode("gb18030") for t in LOG]
    utf8 = [t.encode("utf-8") for t in LOG]
    # Four bad lines, ASCII lines between them (neutral: ASCII reads the same everywhere).
    assert events_of(framer, [gb[0], b"-----", gb[1], b"", gb[2], gb[0]]) == []
    (fault,) = events_of(framer, [gb[1], gb[2]])  # the 5th in a row; the 6th adds nothing
    kind, detail = fault
    assert kind == "fault" and detail["device"] == "oplog" and detail["part"] == "decode"
    assert "decode errors" in detail["reason"] and "wrong encoding?" in detail["reason"]
    assert detail["encoding"] == "utf-8" and detail["lines"] == 5
    # One line that decodes by chance among garbage does not clear it ...
    assert events_of(framer, [utf8[0], gb[0], utf8[1], utf8[2], utf8[0], utf8[1]]) == []
    # ... as many clean lines in a row as the run do.
    (cleared,) = events_of(framer, [utf8[2]])
    assert cleared[0] == "fault_cleared" and cleared[1]["part"] == "decode"
    assert cleared[1]["gap_ns"] > 0
    assert events_of(framer, [gb[0]] * 4) == []  # a new fault needs a whole new run


def test_no_fault_without_a_threshold_and_the_threshold_is_checked() -> None:
    framer = LineFramer("utf-8", "any", 4096)
    assert events_of(framer, ["客户".encode("gb18030")] * 50) == []
    with pytest.raises(ValueError):
        DecodeWatch("utf-8", 0)


@settings(max_examples=200, deadline=None, database=None)
@given(flags=st.lists(st.sampled_from(["bad", "good", "ascii"]), max_size=60),
       run=st.integers(1, 6))
def test_fault_events_alternate_and_follow_the_runs(flags: list[str], run: int) -> None:
    watch = DecodeWatch("auto", run)
    kinds = []
    bad = good = 0
    for f in flags:
        event = watch.see(b"x" if f == "ascii" else b"\xe4", f == "bad", 0)
        if f != "ascii":
            bad, good = (bad + 1, 0) if f == "bad" else (0, good + 1)
        if event is not None:
            kinds.append(event[0])
            assert (bad if event[0] == "fault" else good) == run
    assert kinds == ["fault", "fault_cleared"] * (len(kinds) // 2) + ["fault"] * (len(kinds) % 2)
