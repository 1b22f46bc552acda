"""Clock quality: chronyc parsing, the RTC ioctl, and the judgement built on them.

The chronyc lines are in the exact format chrony 4.x prints with -c (client.c: print_report in
CSV mode; Debian 12 and Raspberry Pi OS bookworm ship chrony 4.3). The RTC cannot be opened on
a build machine, so the ioctl is checked against the kernel header values and a stand-in
ioctl on an ordinary file, and the decisions against injected readings.
"""

from __future__ import annotations

import errno
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dualrec.config import BoardProfile, ClockProfile
from dualrec.devices import clock as clk
from dualrec.devices.clock import (
    ChronyUnavailable,
    ClockQuality,
    RtcReading,
    RtcTime,
    judge_rtc,
    parse_chronyc_tracking,
    read_rtc,
)
from helpers import write_site

NS = 1_000_000_000

# chronyc -c -n tracking, synchronised to a branch NTP server two hops from stratum 1
SYNCED = ("C0A80A01,192.168.10.1,3,1767225600.123456789,-0.000012345,0.000001234,"
          "0.000023456,-12.345,0.001,0.012,0.012345678,0.000456789,64.5,Normal\n")
# right after chronyd started, before any measurement (root delay/dispersion start at 1 s)
UNSYNCED = ("00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,"
            "0.000,1.000000000,1.000000000,0.0,Not synchronised\n")
# a source that lost its own reference: stratum 16, leap status still "Normal"
STRATUM16 = ("C0A80A01,192.168.10.1,16,1767225600.000000000,0.000100000,0.000001234,"
             "0.000023456,-12.345,0.001,0.012,0.012345678,0.000456789,64.5,Normal\n")
# chronyd's "local stratum 10": the box believing its own clock
LOCAL = ("7F7F0101,,10,1767225600.000000000,0.000000000,0.000000000,0.000000000,-12.345,"
         "0.000,0.000,0.000000000,0.000010000,16.0,Normal\n")
# a PPS refclock on GPIO 18 (dtoverlay=pps-gpio), stratum 1
PPS = ("50505330,PPS0,1,1767225600.500000000,0.000000120,-0.000000050,0.000000300,-12.345,"
       "-0.000,0.002,0.000000001,0.000010000,16.0,Normal\n")


# --- chronyc -----------------------------------------------------------------------------------


def test_parse_synced_line() -> None:
    t = parse_chronyc_tracking(SYNCED)
    assert (t.ref_id, t.ref_name, t.stratum) == (0xC0A80A01, "192.168.10.1", 3)
    assert t.ref_time_ns == 1767225600_123456789
    assert t.system_offset_s == -0.000012345
    assert t.root_delay_s == 0.012345678 and t.root_dispersion_s == 0.000456789
    assert t.update_interval_s == 64.5 and t.leap == "Normal"
    assert t.synced
    # |system time offset| + root dispersion + root delay / 2 (chronyc(1))
    assert t.est_error_ns == round((0.000012345 + 0.000456789 + 0.012345678 / 2) * NS)
    assert t.est_error_ns == 6_641_973


@pytest.mark.parametrize("line, why", [(UNSYNCED, "not synchronised"),
                                       (STRATUM16, "stratum 16"),
                                       (LOCAL, "its own local clock")])
def test_parse_not_synced(line: str, why: str) -> None:
    assert not parse_chronyc_tracking(line).synced, why


def test_parse_pps_refclock() -> None:
    t = parse_chronyc_tracking(PPS)
    assert t.synced and t.ref_name == "PPS0" and t.stratum == 1
    assert t.est_error_ns == round((0.000000120 + 0.000010000 + 0.000000001 / 2) * NS)


@pytest.mark.parametrize("text", ["", "506 Cannot talk to daemon\n", SYNCED + SYNCED,
                                  SYNCED.replace(",Normal", ""),
                                  SYNCED.replace("C0A80A01", "nothex")])
def test_parse_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_chronyc_tracking(text)


def test_run_chronyc_missing_binary_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ChronyUnavailable):
        clk.run_chronyc()


# --- the RTC ioctl -----------------------------------------------------------------------------


def test_ioctl_numbers_are_the_kernels() -> None:
    # linux/rtc.h: RTC_RD_TIME _IOR('p', 0x09, struct rtc_time), RTC_VL_READ
    # _IOR('p', 0x13, unsigned int); the values a C program prints on arm64 and x86_64
    assert clk.RTC_RD_TIME == 0x80247009
    assert clk.RTC_VL_READ == 0x80047013
    assert len(RtcTime(0, 0, 0, 1, 0, 124).pack()) == 36  # sizeof(struct rtc_time)


def test_rtc_time_packs_like_struct_rtc_time() -> None:
    t = RtcTime.from_datetime(datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC))
    assert t == RtcTime(26, 9, 15, 14, 2, 126, 6, 72, 0)  # a Saturday, day 73 of the year
    assert t.pack() == struct.pack("=9i", 26, 9, 15, 14, 2, 126, 6, 72, 0)
    assert RtcTime.unpack(t.pack()) == t
    assert t.to_datetime() == datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


def test_read_rtc_issues_rtc_rd_time(tmp_path: Path) -> None:
    dev = tmp_path / "rtc0"
    dev.write_bytes(b"")
    calls: list[tuple[int, int]] = []
    held = RtcTime.from_datetime(datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC))

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        calls.append((request, len(arg)))
        if request == clk.RTC_RD_TIME:
            return held.pack()
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    reading = read_rtc(str(dev), ioctl=ioctl, realtime_ns=lambda: 42)
    assert calls == [(0x80247009, 36), (0x80047013, 4)]
    assert reading == RtcReading(held, 42, None)


def test_read_rtc_passes_the_kernels_refusal(tmp_path: Path) -> None:
    dev = tmp_path / "rtc0"
    dev.write_bytes(b"")

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EINVAL, "Invalid argument")  # what a never-set RTC answers

    with pytest.raises(OSError) as err:
        read_rtc(str(dev), ioctl=ioctl)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        read_rtc(str(tmp_path / "rtc9"))


# --- judging the RTC ---------------------------------------------------------------------------


def reading(dt: datetime, system_offset_s: float = 0.3, vl: int | None = 0) -> RtcReading:
    """The RTC showing `dt` while the system clock is `system_offset_s` later."""
    return RtcReading(RtcTime.from_datetime(dt), int((dt.timestamp() + system_offset_s) * NS), vl)


NOW = datetime(2026, 5, 20, 9, 30, 0, tzinfo=UTC)


def test_rtc_that_agrees_is_synced_with_unknown_error() -> None:
    synced, why, offset = judge_rtc(reading(NOW))
    assert synced and "unknown" in why
    assert offset == 200_000_000  # the RTC's half second minus the 0.3 s the system is ahead


@pytest.mark.parametrize("r, words", [
    (reading(datetime(2000, 1, 1, tzinfo=UTC)), "never set"),
    (reading(datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)), "never set"),
    (reading(NOW, vl=clk.RTC_VL_DATA_INVALID), "invalid"),
    (reading(NOW, system_offset_s=-3 * 7 * 86400), "disagree"),  # fake-hwclock, weeks back
    (reading(NOW, system_offset_s=5), "disagree"),
    (RtcReading(RtcTime(0, 0, 0, 0, 0, 126), 0, None), "impossible"),  # day 0
])
def test_rtc_that_cannot_be_trusted_is_not_synced(r: RtcReading, words: str) -> None:
    synced, why, _ = judge_rtc(r)
    assert not synced and words in why


def test_rtc_voltage_low_but_valid_is_still_trusted() -> None:
    assert judge_rtc(reading(NOW, vl=clk.RTC_VL_BACKUP_LOW))[0]


# --- ClockQuality ------------------------------------------------------------------------------


class World:
    """What ClockQuality sees of the machine: chronyc, the RTC, sysfs, adjtimex, time."""

    def __init__(self, chronyc: str | Exception = SYNCED,
                 rtc: RtcReading | Exception | None = None,
                 files: dict[str, str] | None = None,
                 kernel: tuple[bool, int] = (False, -1)) -> None:
        self.chronyc = chronyc
        self.rtc = reading(NOW) if rtc is None else rtc
        self.files = files or {}
        self.kernel = kernel
        self.now = 1000.0
        self.chronyc_runs = 0
        self.rtc_reads: list[str] = []

    def quality(self, **profile: Any) -> ClockQuality:
        return ClockQuality(ClockProfile(**profile), run_chronyc=self.run_chronyc,
                            read_rtc=self.read_rtc, path_exists=lambda p: p in self.files,
                            read_text=self.read_text, kernel_state=lambda: self.kernel,
                            monotonic=lambda: self.now)

    def run_chronyc(self) -> str:
        self.chronyc_runs += 1
        if isinstance(self.chronyc, Exception):
            raise self.chronyc
        return self.chronyc

    def read_rtc(self, path: str) -> RtcReading:
        self.rtc_reads.append(path)
        if isinstance(self.rtc, Exception):
            raise self.rtc
        return self.rtc

    def read_text(self, path: str) -> str:
        try:
            return self.files[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None


PPS_FILES = {"/dev/pps0": "", "/sys/class/pps/pps0/assert": "1767225600.000000123#42\n"}


@pytest.mark.parametrize("profile, files, source", [
    ({"source": "rtc"}, {}, "rtc"),
    ({"source": "rtc", "chrony": True}, {}, "rtc+chrony"),
    ({"chrony": True}, {}, "system+chrony"),
    ({"chrony": True, "pps": "/dev/pps0"}, PPS_FILES, "pps+chrony"),
    ({"source": "rtc", "chrony": True, "pps": "/dev/pps0"}, PPS_FILES, "pps+rtc+chrony"),
    # configured but absent, or nothing to use it: not in the name
    ({"source": "rtc", "chrony": True, "pps": "/dev/pps0"}, {"/dev/pps0": ""}, "rtc+chrony"),
    ({"source": "rtc", "pps": "/dev/pps0"}, PPS_FILES, "rtc"),
    ({}, {}, "system"),
])
def test_source_names(profile: dict[str, Any], files: dict[str, str], source: str) -> None:
    assert World(files=files).quality(**profile).source == source


def test_chrony_synced_gives_chronys_bound_rounded_up() -> None:
    w = World()
    q = w.quality(source="rtc", chrony=True)
    assert q.sync_state() == (True, 10_000_000)  # 6.64 ms, on the 1-2-5 series
    assert q.report().via == "chrony" and w.rtc_reads == []


def test_chrony_not_synced_on_rtc_board_falls_back_to_the_rtc() -> None:
    w = World(chronyc=UNSYNCED)
    q = w.quality(source="rtc", chrony=True)
    assert q.sync_state() == (True, -1)
    report = q.report()
    assert report.via == "rtc" and "chrony not synchronised" in report.reason
    assert w.rtc_reads == ["/dev/rtc0"]


def test_chrony_not_synced_without_rtc_is_not_synced() -> None:
    q = World(chronyc=STRATUM16, kernel=(True, 1000)).quality(chrony=True)
    assert q.sync_state() == (False, -1)


def test_chrony_down_without_rtc_asks_the_kernel() -> None:
    w = World(chronyc=ChronyUnavailable("506 Cannot talk to daemon"), kernel=(True, 16_000))
    q = w.quality(chrony=True)
    assert q.sync_state() == (True, 16_000)
    assert q.report().via == "kernel"


def test_never_synced_rtc_box_says_so() -> None:
    w = World(chronyc=ChronyUnavailable("no chronyd"),
              rtc=OSError(errno.EINVAL, "Invalid argument"))
    q = w.quality(source="rtc", chrony=True)
    assert q.sync_state() == (False, -1)
    assert "holds no valid time" in q.report().reason
    w2 = World(rtc=reading(datetime(2000, 1, 1, 0, 3, tzinfo=UTC)))
    assert w2.quality(source="rtc").sync_state() == (False, -1)


def test_missing_rtc_is_not_synced() -> None:
    q = World(rtc=FileNotFoundError(errno.ENOENT, "No such file")).quality(source="rtc",
                                                                         rtc="/dev/rtc1")
    assert q.sync_state() == (False, -1) and "no RTC at /dev/rtc1" in q.report().reason


@pytest.mark.parametrize("ns, up", [(0, 0), (1, 1), (2, 2), (3, 5), (5, 5), (6, 10),
                                     (10, 10), (11, 20), (6_641_973, 10_000_000),
                                     (20_000_001, 50_000_000), (50_000_001, 100_000_000)])
def test_round_up_125(ns: int, up: int) -> None:
    assert clk.round_up_125(ns) == up


def test_result_is_cached_and_a_dead_chronyd_is_not_hammered() -> None:
    w = World()
    q = w.quality(chrony=True)
    for _ in range(50):
        q.sync_state()
    assert w.chronyc_runs == 1
    w.now += clk.CACHE_S
    q.sync_state()
    assert w.chronyc_runs == 2
    w.chronyc = ChronyUnavailable("timed out")
    w.now += clk.CACHE_S
    q.sync_state()
    assert w.chronyc_runs == 3
    for _ in range(int(clk.CHRONY_RETRY_S / clk.CACHE_S) - 1):
        w.now += clk.CACHE_S
        q.sync_state()
    assert w.chronyc_runs == 3  # backed off
    w.chronyc = SYNCED
    w.now += clk.CACHE_S
    assert q.sync_state()[0] and w.chronyc_runs == 4


def test_the_factory_and_the_timebase_take_it(tmp_path: Path,
                                              key_files: dict[str, Path]) -> None:
    """With no RTC device and no chronyd, an RTC board builds and reports unsynced."""
    from dualrec.config import load_site
    from dualrec.devices.factory import build_devices
    from dualrec.timebase import Timebase

    board = BoardProfile.model_validate({
        "board": {"name": "t"}, "camera": {"backend": "none"}, "microphone": {"backend": "none"},
        "oplog": {"backend": "none"}, "clock": {"source": "rtc", "rtc": "/nonexistent/rtc0"},
    })
    devices = build_devices(board, load_site(write_site(tmp_path / "site.toml", key_files)))
    assert devices.clock_source == "rtc"
    assert devices.sync_state is not None and devices.sync_state() == (False, -1)
    anchor = Timebase(source=devices.clock_source, sync_state=devices.sync_state).current
    assert (anchor.source, anchor.synced, anchor.est_error_ns) == ("rtc", False, -1)
