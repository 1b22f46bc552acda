"""SerialOpLog on a real pseudo-terminal: exact bytes, first-byte stamps, faults, reconnects."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dualrec.devices.base import DeviceError, OpLog
from dualrec.devices.serial_oplog import SerialOpLog
from dualrec.oplog_framer import LineFramer
from dualrec.samples import Event, LogLine

GB = "gb18030"


class Pty:
    """A raw pty; the test writes on the master, SerialOpLog opens the slave by path."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)  # SerialOpLog must be the only reader

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


class Collector:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.events: list[Event] = []
        self.received = 0

    def sink(self, line: LogLine) -> None:
        self.lines.append(line)
        self.received += len(line.raw)

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def raw(self) -> bytes:
        return b"".join(line.raw for line in self.lines)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def wait_for(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    p.close()


@pytest.fixture
def oplog_factory() -> Iterator[Callable[[str], SerialOpLog]]:
    made: list[SerialOpLog] = []

    def make(port: str) -> SerialOpLog:
        op = SerialOpLog(port, 115200, LineFramer(GB, b"\r\n", 4096))
        made.append(op)
        return op

    yield make
    for op in made:
        op.stop()


def test_is_an_oplog() -> None:
    op: OpLog = SerialOpLog("loop://", 115200, LineFramer(GB, b"\r\n", 64))
    col = Collector()
    op.start(col.sink, col.on_event)
    op.stop()
    assert col.lines == [] and col.events == []


@pytest.mark.timeout(10)
def test_lines_arrive_stamped_at_first_byte(
    pty: Pty, oplog_factory: Callable[[str], SerialOpLog]
) -> None:
    col = Collector()
    op = oplog_factory(pty.path)
    op.start(col.sink, col.on_event)
    text = "2026-11-28 10:01:02.123 [柜员T0012] 交易开始 TXN=000123 类型=理财购买"
    before = time.monotonic_ns()
    pty.write(text.encode(GB)[:10])
    time.sleep(0.2)  # the rest comes much later: the stamp must stay at the first byte
    pty.write(text.encode(GB)[10:] + b"\r\n")
    assert wait_for(lambda: len(col.lines) == 1, 2)
    (line,) = col.lines
    assert line.text == text and line.flags == ()
    assert before <= line.t_mono_ns < before + 100_000_000


@pytest.mark.timeout(20)
def test_flood_loses_no_bytes(pty: Pty, oplog_factory: Callable[[str], SerialOpLog]) -> None:
    col = Collector()
    op = oplog_factory(pty.path)
    op.start(col.sink, col.on_event)
    rng = random.Random(7)
    words = ["交易开始", "TXN=000123", "证件号=110105198503127714", "金额 CNY 200,000.00", "😀"]
    block = b"".join(
        " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12))).encode(GB) + b"\r\n"
        for _ in range(2000)
    )
    sent = bytearray()
    deadline = time.monotonic() + 2.0
    # Full speed for 2 s (capped at 8 MB): far beyond any serial line (115200 baud = 11.5 kB/s).
    while time.monotonic() < deadline and len(sent) < 8 << 20:
        pty.write(block)
        sent += block
    assert len(sent) > 23_000  # at least 2 s worth of 115200 baud
    assert wait_for(lambda: col.received >= len(sent), 10)
    assert col.raw() == sent
    assert all(line.flags == () for line in col.lines)
    assert col.events == []


@pytest.mark.timeout(10)
def test_garbage_kept_raw_and_flagged(
    pty: Pty, oplog_factory: Callable[[str], SerialOpLog]
) -> None:
    col = Collector()
    op = oplog_factory(pty.path)
    op.start(col.sink, col.on_event)
    garbage = [b"\x80\xff\xfe\x81\x20\xa1\r\n", b"ab\x00\x00cd\r\n", b"\x1b[2J\x1b[Hok\r\n"]
    pty.write(b"".join(garbage))
    assert wait_for(lambda: len(col.lines) == 3, 2)
    assert [line.raw for line in col.lines] == garbage
    assert [line.flags for line in col.lines] == [("decode_error",), ("nul",), ("control",)]
    assert col.lines[1].text == "abcd"


@pytest.mark.timeout(10)
def test_stop_is_prompt_and_flushes_partial_line(
    pty: Pty, oplog_factory: Callable[[str], SerialOpLog]
) -> None:
    col = Collector()
    op = oplog_factory(pty.path)
    op.start(col.sink, col.on_event)
    pty.write("交易结束 TXN=000123".encode(GB))
    time.sleep(0.6)  # idle: a partial line stays buffered, it is not flushed on a timer
    assert col.lines == []
    t0 = time.monotonic()
    op.stop()
    assert time.monotonic() - t0 < 1.0
    (line,) = col.lines
    assert (line.text, line.flags) == ("交易结束 TXN=000123", ("unterminated",))
    op.stop()  # idempotent


def test_missing_port_raises_device_error(tmp_path: Path) -> None:
    path = str(tmp_path / "ttyNOPE")
    op = SerialOpLog(path, 115200, LineFramer(GB, b"\r\n", 64))
    with pytest.raises(DeviceError, match="ttyNOPE"):
        op.start(Collector().sink, Collector().on_event)


@pytest.mark.timeout(10)
def test_vanishing_port_is_a_fault_not_a_crash(oplog_factory: Callable[[str], SerialOpLog]) -> None:
    pty = Pty()
    col = Collector()
    op = oplog_factory(pty.path)
    op.start(col.sink, col.on_event)
    pty.write(b"first\r\nhalf")
    assert wait_for(lambda: len(col.lines) == 1, 2)
    time.sleep(0.05)
    pty.close()  # the terminal goes away: the slave reads EIO and /dev/pts/N disappears
    assert wait_for(lambda: "fault" in col.kinds(), 2)
    fault = next(e for e in col.events if e.kind == "fault")
    assert fault.detail["device"] == "oplog" and fault.detail["reason"]
    # The partial line is closed at the gap rather than glued to whatever comes after it.
    assert [line.raw for line in col.lines] == [b"first\r\n", b"half"]
    time.sleep(1.2)  # a few reopen attempts, all failing, none crashing
    assert op._thread is not None and op._thread.is_alive()
    t0 = time.monotonic()
    op.stop()
    assert time.monotonic() - t0 < 1.0
    assert col.kinds() == ["fault"]


@pytest.mark.timeout(10)
def test_reconnects_when_the_port_comes_back(
    tmp_path: Path, oplog_factory: Callable[[str], SerialOpLog]
) -> None:
    link = tmp_path / "ttyTERM"
    first = Pty()
    link.symlink_to(first.path)
    col = Collector()
    op = oplog_factory(str(link))
    op.start(col.sink, col.on_event)
    first.write(b"before\r\n")
    assert wait_for(lambda: len(col.lines) == 1, 2)
    # The link goes first: a closed pty's number is soon reused (another test worker), and a
    # stale link would let the box reopen someone else's pty.
    link.unlink()
    first.close()
    assert wait_for(lambda: "fault" in col.kinds(), 2)
    second = Pty()  # the terminal restarts on a new pty; the link follows it
    try:
        link.symlink_to(second.path)
        assert wait_for(lambda: "oplog_reconnected" in col.kinds(), 3)
        (reconnected,) = [e for e in col.events if e.kind == "oplog_reconnected"]
        assert reconnected.detail["gap_ns"] > 0
        second.write(b"after\r\n")
        assert wait_for(lambda: len(col.lines) == 2, 2)
        assert [line.text for line in col.lines] == ["before", "after"]
    finally:
        op.stop()
        second.close()


@pytest.mark.timeout(10)
def test_failing_sink_is_reported_and_reading_goes_on(
    pty: Pty, oplog_factory: Callable[[str], SerialOpLog]
) -> None:
    got: list[LogLine] = []
    events: list[Event] = []
    lock = threading.Lock()

    def sink(line: LogLine) -> None:
        with lock:
            got.append(line)
        if line.text.startswith("bad"):
            raise RuntimeError("sink is broken")

    op = oplog_factory(pty.path)
    op.start(sink, events.append)
    pty.write(b"bad 1\r\nbad 2\r\nbad 3\r\ngood\r\n")
    assert wait_for(lambda: len(got) == 4, 2)
    faults = [e for e in events if e.kind == "fault"]
    assert len(faults) == 1  # rate-limited: one event per second, not one per line
    assert "sink is broken" in faults[0].detail["reason"]
