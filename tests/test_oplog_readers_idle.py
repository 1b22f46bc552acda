"""The serial and Pico-tap readers on real pseudo-terminals: a line without a terminator is
delivered after a pause (the readers poll the framer's idle timeout whenever a read returns
nothing), and a run of lines in the wrong encoding is a fault on record, cleared when lines
decode again.

Only liveness is bounded in time (wait_for with generous limits); nothing asserts how fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dualrec.config import TapProfile
from dualrec.devices.picotap import PicoTapOpLog
from dualrec.devices.serial_oplog import SerialOpLog
from dualrec.oplog_framer import LineFramer
from dualrec.supervision import FaultBoard
from test_oplog_serial import Collector, Pty, wait_for
from test_tap_firmware import Collector as TapCollector
from test_tap_firmware import FrameFeeder

START = "2026-11-28 10:01:02 [柜员T0012] 交易开始 TXN=000123 类型=理财购买"


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    p.close()


def framer(encoding: str = "auto", idle_ms: int = 200) -> LineFramer:
    return LineFramer(encoding, "any", 4096, idle_ms=idle_ms, decode_error_run=5)


@pytest.mark.timeout(20)
def test_serial_line_without_terminator_arrives_after_a_pause(pty: Pty) -> None:
    op = SerialOpLog(pty.path, 115200, framer())
    # A read returns at least every idle_ms / 2, so the pause is noticed without more bytes.
    assert op.read_timeout_s <= 0.1
    assert SerialOpLog(pty.path, 115200, framer(idle_ms=20)).read_timeout_s <= 0.01
    col = Collector()
    op.start(col.sink, col.on_event)
    try:
        before = time.monotonic_ns()
        pty.write(START.encode("gb18030"))  # and then nothing: the terminal stalled
        assert wait_for(lambda: len(col.lines) == 1, 10)
        (line,) = col.lines
        assert (line.text, line.flags) == (START, ("unterminated",))
        assert line.raw == START.encode("gb18030")
        assert before <= line.t_mono_ns <= time.monotonic_ns()
        pty.write(b"next line\r\n")
        assert wait_for(lambda: len(col.lines) == 2, 10)
        assert (col.lines[1].raw, col.lines[1].flags) == (b"next line\r\n", ())
    finally:
        op.stop()
    assert col.raw() == START.encode("gb18030") + b"next line\r\n"


@pytest.mark.timeout(20)
def test_serial_wrong_encoding_is_a_fault_until_lines_decode_again(pty: Pty) -> None:
    op = SerialOpLog(pty.path, 115200, framer("utf-8"))  # the terminal sends GB18030
    col = Collector()
    op.start(col.sink, col.on_event)
    try:
        pty.write(b"".join(f"{START} {i}\r\n".encode("gb18030") for i in range(5)))
        assert wait_for(lambda: "fault" in col.kinds(), 10)
        (fault,) = [e for e in col.events if e.kind == "fault"]
        assert fault.detail["device"] == "oplog" and fault.detail["port"] == pty.path
        assert "decode errors" in fault.detail["reason"]
        assert "wrong encoding?" in fault.detail["reason"]
        pty.write(b"".join(f"{START} {i}\r\n".encode() for i in range(5)))
        assert wait_for(lambda: "fault_cleared" in col.kinds(), 10)
    finally:
        op.stop()
    assert len(col.lines) == 10
    assert sum("decode_error" in ln.flags for ln in col.lines) == 5
    # The gateway's fault board lights the oplog pattern for it under its own key, apart
    # from the port's ("oplog"): the bytes still arrive and are recorded.
    lamp: list[tuple[str, bool]] = []
    board = FaultBoard(lambda key, on: lamp.append((key, on)), None)
    for event in col.events:
        board.see(event)
        if event.kind == "fault":
            assert set(board.active) == {"oplog:decode"}
    assert lamp == [("oplog:decode", True), ("oplog:decode", False)] and not board.active


@pytest.mark.timeout(20)
def test_tap_lines_without_terminator_arrive_after_a_pause_on_both_channels() -> None:
    feeder = FrameFeeder()
    op = PicoTapOpLog(TapProfile(port=feeder.pty.path), framer())
    assert op.read_timeout_s <= 0.1
    col = TapCollector()
    op.start(col.sink, col.on_event)
    try:
        feeder.hello()
        feeder.send(0, START.encode("gb18030"))
        feeder.send(1, b"ACK 000123")
        assert wait_for(lambda: len(col.lines) == 2, 10)
        by_raw = {ln.raw: ln.flags for ln in col.lines}
        assert by_raw == {START.encode("gb18030"): ("unterminated",),
                          b"ACK 000123": ("rx", "unterminated")}
    finally:
        op.stop()
        feeder.pty.close()
