"""The device runtime on its own: backoff, a device joining late, supervised threads, an event
sink that fails."""

from __future__ import annotations

import logging
import threading
import time

from dualrec.devices.base import DeviceError
from dualrec.devices.runtime import Backoff, DeviceRunner, EventEmitter, Supervisor
from dualrec.samples import Event
from helpers import wait_for


def test_backoff_doubles_up_to_its_cap_and_resets():
    b = Backoff(1.0, 30.0)
    assert [b.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 1


class LateDevice:
    """start() fails `absent` times (DeviceError), then runs and delivers one sample."""

    def __init__(self, absent: int) -> None:
        self.absent = absent
        self.starts = self.stops = 0

    def start(self, sink, events) -> None:
        self.starts += 1
        if self.starts <= self.absent:
            raise DeviceError(f"no such device (try {self.starts})")
        sink("sample")

    def stop(self) -> None:
        self.stops += 1


def test_device_runner_records_one_fault_retries_and_clears():
    """Tried: a device absent for its first three starts. Asserted: one `fault` (the first
    reason), retried until it runs, `fault_cleared` with the attempts, its sample delivered,
    no fault left; stop() stops it."""
    events: list[Event] = []
    samples: list[str] = []
    dev = LateDevice(absent=3)
    runner = DeviceRunner("camera", dev, samples.append, events.append,
                          backoff_first_s=0.05, backoff_cap_s=0.1)
    assert runner.start() is False
    wait_for(lambda: runner.running, 10, "the device to join")
    runner.stop()
    assert [e.kind for e in events] == ["fault", "fault_cleared"]
    assert events[0].detail == {"device": "camera", "reason": "no such device (try 1)",
                                "at": "start"}
    assert events[1].detail["attempts"] == 4
    assert samples == ["sample"] and runner.delivered == 1 and runner.fault is None
    assert dev.starts == 4 and dev.stops == 3 + 1  # each failed start released, then the stop


def test_device_runner_follows_the_device_own_faults():
    """A fault the running device reports itself (unplugged) is its fault state until it
    reports fault_cleared; the events go on unchanged."""
    events: list[Event] = []
    runner = DeviceRunner("microphone", LateDevice(0), lambda s: None, events.append)
    runner.start()
    runner.report(Event(1, "fault", {"device": "microphone", "reason": "unplugged"}))
    assert runner.fault == "unplugged" and runner.healthy(10**18, 1.0)
    runner.report(Event(2, "fault_cleared", {"device": "microphone"}))
    assert runner.fault is None and not runner.healthy(10**18, 1.0)
    assert [e.kind for e in events] == ["fault", "fault_cleared"]
    runner.stop()


def test_adopted_thread_is_retried_logged_once_and_cleared(caplog):
    """Tried: another module's unstarted thread whose target raises KeyError twice, then
    works until stopped. Asserted: adopted, it keeps its name; one traceback in the log, one
    `fault` on record, the LED lit then dark, `fault_cleared` after it kept running."""
    caplog.set_level(logging.WARNING, logger="dualrec.devices.runtime")
    events: list[Event] = []
    lamp: list[tuple[str, bool]] = []
    stop = threading.Event()
    calls = []

    def target(x: int) -> None:
        calls.append(x)
        if len(calls) <= 2:
            raise KeyError("boom")
        stop.wait(30)

    sup = Supervisor(events.append, lambda n, a: lamp.append((n, a)),
                     backoff_first_s=0.05, backoff_cap_s=0.1, clear_after_s=0.2)
    theirs = threading.Thread(target=target, args=(7,), name="uplink-headers", daemon=True)
    mine = sup.adopt(theirs)
    assert mine.name == "uplink-headers" and mine.daemon
    mine.start()
    wait_for(lambda: len(calls) == 3, 10, "the third run")
    wait_for(lambda: (sup.poll() or True) and len(events) == 2, 10, "the fault cleared")
    sup.stopping.set()
    stop.set()
    mine.join(5)
    assert calls == [7, 7, 7]
    assert [e.kind for e in events] == ["fault", "fault_cleared"]
    assert events[0].detail == {"device": "internal", "part": "uplink-headers",
                                "reason": "KeyError: 'boom'"}
    assert lamp == [("internal:uplink-headers", True), ("internal:uplink-headers", False)]
    assert len([r for r in caplog.records if r.exc_info]) == 1
    assert sup.unhealthy() == []


def test_event_emitter_never_raises_into_the_backend(caplog):
    def broken(ev: Event) -> None:
        raise OSError("queue gone")

    EventEmitter("oplog", broken)("fault", {"device": "oplog"})
    assert "event sink failed" in caplog.text


class DyingDevice:
    """Runs, then its capture thread 'dies' on the first start: a fault it never clears."""

    def __init__(self) -> None:
        self.starts = self.stops = 0

    def start(self, sink, events) -> None:
        self.starts += 1
        if self.starts == 1:
            events(Event(1, "fault", {"device": "camera", "reason": "encoder thread died"}))
        else:
            sink("frame")

    def stop(self) -> None:
        self.stops += 1


def test_device_stuck_in_its_own_fault_is_restarted():
    """Tried: a camera whose encoder dies right after its first start and never recovers by
    itself. Asserted: after restart_after_s the runner stops it and starts it again, the
    restart clears the fault on record (one fault, one fault_cleared), frames flow again."""
    events: list[Event] = []
    frames: list[str] = []
    dev = DyingDevice()
    runner = DeviceRunner("camera", dev, frames.append, events.append, restart_after_s=0.0,
                          backoff_first_s=0.05)
    assert runner.start() is True and runner.fault == "encoder thread died"
    wait_for(lambda: (runner.check(10**18) or True) and frames == ["frame"], 10, "the restart")
    runner.stop()
    assert [e.kind for e in events] == ["fault", "fault_cleared"]
    assert dev.starts == 2 and dev.stops == 2 and runner.restarts == 1 and runner.fault is None


def test_a_part_fault_does_not_mark_the_device_down():
    """The oplog's decode fault {device: oplog, part: decode} leaves lines flowing: the runner
    neither marks the device down for it nor lets its clearing end a real fault."""
    runner = DeviceRunner("oplog", LateDevice(0), lambda s: None, lambda ev: None)
    runner.start()
    runner.report(Event(1, "fault", {"device": "oplog", "part": "decode", "reason": "GB18030?"}))
    assert runner.fault is None
    runner.report(Event(2, "fault", {"device": "oplog", "reason": "port gone"}))
    runner.report(Event(3, "fault_cleared", {"device": "oplog", "part": "decode"}))
    assert runner.fault == "port gone"
    # the serial line's reconnection names the port's path as its "device"
    runner.report(Event(4, "oplog_reconnected", {"gap_ns": 5, "device": "/dev/ttyUSB1"}))
    assert runner.fault is None
    runner.stop()


def test_fault_board_follows_faults_and_the_serial_reconnection(tmp_path):
    """The board keeps what is active now for the LED and diag: a device fault, a part's
    fault under its own key, a lost port cleared by the line's own oplog_reconnected."""
    import json

    from dualrec.supervision import FaultBoard

    lamp: list[tuple[str, bool]] = []
    board = FaultBoard(lambda n, a: lamp.append((n, a)), tmp_path / "faults.json")
    board.see(Event(1, "fault", {"device": "oplog", "port": "usb:0403:6001", "reason": "gone"}))
    board.see(Event(2, "fault", {"device": "oplog", "part": "decode", "reason": "GB18030?"}))
    board.see(Event(3, "fault", {"device": "uplink", "part": "uplink-headers", "reason": "x"}))
    keys = [f["key"] for f in json.loads((tmp_path / "faults.json").read_text())["faults"]]
    assert keys == ["oplog", "oplog:decode", "uplink:uplink-headers"]
    board.see(Event(4, "oplog_reconnected", {"gap_ns": 3, "device": "/dev/ttyUSB1"}))
    board.see(Event(5, "fault_cleared", {"device": "oplog", "part": "decode"}))
    assert list(board.active) == ["uplink:uplink-headers"]
    # the uplink drives its own LED pattern: the board only lists it
    assert lamp == [("oplog", True), ("oplog:decode", True), ("oplog", False),
                    ("oplog:decode", False)]


def test_a_worker_waiting_out_its_backoff_is_not_cleared():
    """Tried: a worker failing every time, polled while it waits out its backoff (longer
    than the clear delay). Asserted: one fault, never a fault_cleared, until it is given up
    with a fatal fault and on_fatal called once."""
    events: list[Event] = []
    fatal: list[str] = []
    sup = Supervisor(events.append, None, fatal.append, backoff_first_s=0.3, backoff_cap_s=0.3,
                     fatal_after=3, clear_after_s=0.05)
    w = sup.start("flaky", lambda: 1 / 0)
    deadline = time.monotonic() + 30
    while w.thread.is_alive() and time.monotonic() < deadline:
        sup.poll()
        w.thread.join(0.01)
    assert [e.kind for e in events] == ["fault", "fault"]
    assert events[1].detail["fatal"] is True and len(fatal) == 1
    assert sup.unhealthy() == ["flaky"]
