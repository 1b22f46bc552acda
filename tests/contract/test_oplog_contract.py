"""The OpLog contract over SerialOpLog on a real pseudo-terminal and on pyserial's loop:// URL;
port specs (paths, by-id links, usb:VID:PID, URLs) resolved on every open, across a replug; line
errors marked by termios PARMRK decoded into events and flagged lines."""

from __future__ import annotations

import contextlib
import os
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import serial

from dualrec.devices import serial_oplog, serial_ports
from dualrec.devices.base import DeviceError
from dualrec.devices.serial_oplog import LINE_ERROR_FLAG, LineError, ParmrkDecoder, SerialOpLog
from dualrec.devices.serial_ports import parity_code, resolve_port
from dualrec.oplog_framer import LineFramer
from dualrec.samples import Event, LogLine

GB = "gb18030"


class Collector:
    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self.events: list[Event] = []

    def sink(self, line: LogLine) -> None:
        self.lines.append(line)

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def raw(self) -> bytes:
        return b"".join(line.raw for line in self.lines)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def wait_for(pred: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Pty:
    """A raw pty; the test writes on the master, SerialOpLog opens the slave by path."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        os.close(slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


def make_oplog(spec: str, **kw: Any) -> SerialOpLog:
    return SerialOpLog(spec, 115200, LineFramer(GB, b"\r\n", 4096), **kw)


class Line:
    """One transport under test: where the OpLog reads, and how the terminal writes into it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pty = Pty() if kind == "pty" else None
        self.op = make_oplog(self.pty.path if self.pty else "loop://")

    def write(self, data: bytes) -> None:
        if self.pty is not None:
            self.pty.write(data)
        else:
            ser = self.op.serial_port
            assert ser is not None
            ser.write(data)

    def close(self) -> None:
        self.op.stop()
        if self.pty is not None:
            self.pty.close()


@pytest.fixture(params=["pty", "loop"])
def line(request: pytest.FixtureRequest) -> Iterator[Line]:
    made = Line(request.param)
    yield made
    made.close()


# --- the contract ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_lines_in_raw_bytes_preserved(line: Line) -> None:
    col = Collector()
    line.op.start(col.sink, col.on_event)
    # GB18030 text, a bare LF, an 0xFF byte (doubled by PARMRK on the pty, undone by the
    # decoder) and invalid bytes: every byte must come out exactly as it went in.
    sent = ("交易开始 TXN=000123 金额 CNY 200,000.00\r\n".encode(GB) + b"\xff\xfe\x80 raw\r\n"
            + b"lf only\n" + b"tail \xff\xff\xff\r\n")
    line.write(sent)
    assert wait_for(lambda: len(col.raw()) >= len(sent))
    assert col.raw() == sent
    assert col.lines[0].text == "交易开始 TXN=000123 金额 CNY 200,000.00"
    assert all(LINE_ERROR_FLAG not in ln.flags for ln in col.lines)
    assert col.events == []
    # PARMRK is on where there is a tty under the port, and only there.
    assert (line.op._decoder is not None) == (line.kind == "pty")


@pytest.mark.timeout(10)
def test_lines_stamped_at_their_first_byte(line: Line) -> None:
    col = Collector()
    line.op.start(col.sink, col.on_event)
    text = "2026-11-28 10:01:02.123 [柜员T0012] 交易结束 TXN=000123".encode(GB)
    before = time.monotonic_ns()
    line.write(text[:8])
    time.sleep(0.25)  # the rest comes much later: the stamp stays at the first byte
    line.write(text[8:] + b"\r\n")
    assert wait_for(lambda: len(col.lines) == 1)
    assert before <= col.lines[0].t_mono_ns < before + 100_000_000


@pytest.mark.timeout(10)
def test_stop_is_bounded_and_delivers_the_partial_line(line: Line) -> None:
    col = Collector()
    line.op.start(col.sink, col.on_event)
    line.write("交易结束 TXN=7".encode(GB))
    time.sleep(0.3)
    assert col.lines == []
    t0 = time.monotonic()
    line.op.stop()
    assert time.monotonic() - t0 < 1.0
    (ln,) = col.lines
    assert (ln.text, ln.flags) == ("交易结束 TXN=7", ("unterminated",))


# --- port specs ------------------------------------------------------------------------------


def port(device: str, vid: int | None = None, pid: int | None = None, serial_number: str = "",
         location: str | None = None, description: str = "n/a") -> SimpleNamespace:
    return SimpleNamespace(device=device, vid=vid, pid=pid, serial_number=serial_number or None,
                           location=location, description=description)


@pytest.fixture
def comports(monkeypatch: pytest.MonkeyPatch) -> list[SimpleNamespace]:
    ports: list[SimpleNamespace] = []
    monkeypatch.setattr(serial_ports.list_ports, "comports", lambda: list(ports))
    return ports


def test_urls_and_plain_paths_pass_through() -> None:
    assert resolve_port("loop://") == "loop://"
    assert resolve_port("socket://127.0.0.1:7777") == "socket://127.0.0.1:7777"
    assert resolve_port("/dev/ttyAMA0") == "/dev/ttyAMA0"  # opening reports a missing one
    with pytest.raises(DeviceError, match="none set"):
        resolve_port("  ")


def test_by_id_link_resolves_or_lists_what_exists(tmp_path: Path) -> None:
    by_id = tmp_path / "serial" / "by-id"
    by_id.mkdir(parents=True)
    target = tmp_path / "ttyUSB3"
    target.touch()
    (by_id / "usb-FTDI_FT232R_USB_UART_A10KZP3J-if00-port0").symlink_to(target)
    assert resolve_port(str(by_id / "usb-FTDI_FT232R_USB_UART_A10KZP3J-if00-port0")) == str(
        target)
    missing = str(by_id / "usb-Prolific_PL2303-if00-port0")
    with pytest.raises(DeviceError) as err:
        resolve_port(missing)
    assert missing in str(err.value) and "usb-FTDI_FT232R_USB_UART_A10KZP3J" in str(err.value)
    with pytest.raises(DeviceError, match="no USB serial adapter is plugged in"):
        resolve_port(str(tmp_path / "nothing" / "by-id" / "usb-X"))


def test_usb_vid_pid_serial_and_interface(comports: list[SimpleNamespace]) -> None:
    comports += [
        port("/dev/ttyAMA0", description="ttyAMA0"),
        port("/dev/ttyUSB0", 0x0403, 0x6001, "A10KZP3J", "1-1.2", "FT232R USB UART"),
        port("/dev/ttyUSB1", 0x0403, 0x6001, "B77QQ1", "1-1.3", "FT232R USB UART"),
        port("/dev/ttyACM0", 0x2E8A, 0x0005, "E6614C311B7D8A2F", "1-1.4:1.0", "Board CDC"),
        port("/dev/ttyACM1", 0x2E8A, 0x0005, "E6614C311B7D8A2F", "1-1.4:1.2", "Board CDC"),
    ]
    assert resolve_port("usb:0403:6001:B77QQ1") == "/dev/ttyUSB1"
    assert resolve_port("usb:2e8a:0005#2") == "/dev/ttyACM1"
    assert resolve_port("usb:2E8A:0005:E6614C311B7D8A2F#0") == "/dev/ttyACM0"
    with pytest.raises(DeviceError) as several:
        resolve_port("usb:0403:6001")
    msg = str(several.value)
    assert "2 devices match" in msg and "/dev/ttyUSB0" in msg and "/dev/ttyUSB1" in msg
    assert "usb:0403:6001:A10KZP3J" in msg  # tells the technician what to write
    with pytest.raises(DeviceError) as none:
        resolve_port("usb:067b:2303")
    assert "no such USB device" in str(none.value) and "/dev/ttyACM1" in str(none.value)
    with pytest.raises(DeviceError, match="hexadecimal"):
        resolve_port("usb:FTDI")


def test_line_settings_by_name() -> None:
    assert parity_code("even") == serial.PARITY_EVEN and parity_code("N") == serial.PARITY_NONE
    with pytest.raises(ValueError, match="none, even, odd"):
        parity_code("sometimes")
    op = make_oplog("loop://", parity="odd", bytesize=7, stopbits=2)
    assert op.parity == serial.PARITY_ODD


@pytest.mark.timeout(15)
def test_replug_under_a_new_tty_is_found_again_by_id(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    link = by_id / "usb-FTDI_FT232R_USB_UART_A10KZP3J-if00-port0"
    first = Pty()
    link.symlink_to(first.path)
    col = Collector()
    op = make_oplog(str(link))
    op.start(col.sink, col.on_event)
    try:
        assert op.device == first.path
        first.write(b"before\r\n")
        assert wait_for(lambda: len(col.lines) == 1)
        first.close()  # unplugged: the tty goes away and udev removes the link
        link.unlink()
        assert wait_for(lambda: "fault" in col.kinds())
        time.sleep(0.7)  # a reopen attempt or two, each failing on the missing link
        second = Pty()  # plugged back in: another ttyUSBn, the same by-id name
        link.symlink_to(second.path)
        assert wait_for(lambda: "oplog_reconnected" in col.kinds(), 3)
        (ev,) = [e for e in col.events if e.kind == "oplog_reconnected"]
        assert ev.detail["device"] == second.path and ev.detail["gap_ns"] > 0
        second.write(b"after\r\n")
        assert wait_for(lambda: len(col.lines) == 2)
        assert [ln.text for ln in col.lines] == ["before", "after"]
    finally:
        op.stop()
        with contextlib.suppress(UnboundLocalError):
            second.close()


@pytest.mark.timeout(15)
def test_replug_is_found_again_by_vid_pid(comports: list[SimpleNamespace]) -> None:
    first = Pty()
    comports.append(port(first.path, 0x0403, 0x6001, "A10KZP3J", "1-1.2"))
    col = Collector()
    op = make_oplog("usb:0403:6001")
    op.start(col.sink, col.on_event)
    second = Pty()
    try:
        first.close()
        comports.clear()  # unplugged
        assert wait_for(lambda: "fault" in col.kinds())
        comports.append(port(second.path, 0x0403, 0x6001, "A10KZP3J", "1-1.2"))
        assert wait_for(lambda: "oplog_reconnected" in col.kinds(), 3)
        assert op.device == second.path
        second.write(b"after replug\r\n")
        assert wait_for(lambda: [ln.text for ln in col.lines] == ["after replug"])
    finally:
        op.stop()
        second.close()


def test_start_on_an_absent_usb_adapter_names_what_is_there(
    comports: list[SimpleNamespace],
) -> None:
    comports.append(port("/dev/ttyAMA0", description="ttyAMA0"))
    with pytest.raises(DeviceError, match=r"usb:0403:6001: no such USB device.*ttyAMA0"):
        make_oplog("usb:0403:6001").start(Collector().sink, Collector().on_event)


# --- line errors (termios PARMRK) ------------------------------------------------------------


def test_parmrk_decoder_across_any_chunking() -> None:
    stream = b"ab\xff\xffc\xff\x00\x00d\xff\x00\xe9e\r\n\xff\x07"
    for size in (1, 2, 3, len(stream)):
        dec = ParmrkDecoder()
        out, errors = b"", []
        for i in range(0, len(stream), size):
            chunk, errs = dec.feed(stream[i:i + size])
            errors += [LineError(len(out) + e.offset, e.byte, e.kind) for e in errs]
            out += chunk
        out += dec.flush()
        assert out == b"ab\xffc\x00d\xe9e\r\n\xff\x07", size
        assert errors == [LineError(4, 0, "break"), LineError(6, 0xE9, "parity_or_framing")]
    dec = ParmrkDecoder()
    assert dec.feed(b"x\xff\x00") == (b"x", [])
    assert dec.flush() == b"\xff\x00"  # cut inside a mark: its bytes kept as they came


@pytest.mark.timeout(10)
def test_marked_bytes_become_events_and_flagged_lines() -> None:
    # loop:// has no tty, so nothing marks bytes there; with line_errors=True the decoder runs
    # anyway and the test writes the marks n_tty would have produced.
    op = make_oplog("loop://", line_errors=True)
    col = Collector()
    op.start(col.sink, col.on_event)
    ser = op.serial_port
    assert ser is not None
    ser.write(b"ok\r\nbad\xff\x00\xe9x\r\n\xff\x00\x00\r\nfine \xff\xff\r\n")
    assert wait_for(lambda: len(col.lines) == 4)
    op.stop()
    assert [ln.raw for ln in col.lines] == [b"ok\r\n", b"bad\xe9x\r\n", b"\x00\r\n",
                                            b"fine \xff\r\n"]
    assert [LINE_ERROR_FLAG in ln.flags for ln in col.lines] == [False, True, True, False]
    assert "nul" in col.lines[2].flags
    errors = [e for e in col.events if e.kind == "oplog_line_error"]
    # No parity on the line: a marked byte can only be a framing error; a NUL mark a BREAK.
    assert [(e.detail["kind"], e.detail["count"]) for e in errors] == [("framing", 1),
                                                                     ("break", 1)]
    assert errors[0].detail["byte"] == 0xE9 and errors[0].detail["port"] == "loop://"


@pytest.mark.timeout(10)
def test_a_flood_of_breaks_is_counted_not_recorded_one_by_one() -> None:
    op = make_oplog("loop://", line_errors=True, parity="even")
    col = Collector()
    op.start(col.sink, col.on_event)
    ser = op.serial_port
    assert ser is not None
    for _ in range(50):  # a cut line: BREAK after BREAK
        ser.write(b"\xff\x00\x00")
        time.sleep(0.002)
    ser.write(b"x\xff\x00\x41\r\n")
    assert wait_for(lambda: len(col.lines) == 1)

    def breaks() -> list[dict[str, Any]]:
        return [e.detail for e in col.events
                if e.kind == "oplog_line_error" and e.detail["kind"] == "break"]

    # The count held back is recorded once its second is over, without waiting for stop().
    assert wait_for(lambda: sum(d["count"] for d in breaks()) == 50, 3)
    assert len(breaks()) == 2
    op.stop()
    errors = [e.detail for e in col.events if e.kind == "oplog_line_error"]
    # With parity on and no counters to ask, the kind cannot be narrowed down.
    assert [d["kind"] for d in errors if d["kind"] != "break"] == ["parity_or_framing"]


@pytest.mark.timeout(10)
def test_driver_counters_tell_parity_framing_break_and_overrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counters = {"frame": 0, "overrun": 0, "parity": 0, "brk": 0, "buf_overrun": 0}
    # As on a real UART: PARMRK set on a tty, TIOCGICOUNT answered by the driver.
    monkeypatch.setattr(serial_oplog, "_enable_parmrk", lambda ser: 99)
    monkeypatch.setattr(serial_oplog, "_icount", lambda fd: dict(counters) if fd else None)
    monkeypatch.setattr(serial_oplog, "LINE_ERROR_EVENT_INTERVAL_NS", 0)
    op = make_oplog("loop://", parity="even")
    col = Collector()
    op.start(col.sink, col.on_event)
    ser = op.serial_port
    assert ser is not None

    def send(data: bytes, **bump: int) -> None:
        for k, v in bump.items():
            counters[k] += v
        n = len(col.lines)
        ser.write(data)
        assert wait_for(lambda: len(col.lines) > n)

    send(b"p\xff\x00\x41\r\n", parity=1)
    send(b"f\xff\x00\x42\r\n", frame=1)
    send(b"\xff\x00\x00\r\n", brk=1)
    send(b"\xff\x00\x00nul with a parity error\r\n", parity=1)
    send(b"after lost bytes\r\n", overrun=3)
    send(b"clean\r\n")
    op.stop()
    kinds = [(e.detail["kind"], e.detail["count"]) for e in col.events
             if e.kind == "oplog_line_error"]
    assert kinds == [("parity", 1), ("framing", 1), ("break", 1), ("parity", 1), ("overrun", 3)]
    assert [LINE_ERROR_FLAG in ln.flags for ln in col.lines] == [True] * 5 + [False]
