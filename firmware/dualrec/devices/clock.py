"""Clock quality: where the box's UTC comes from (RTC, chrony, PPS) and how far to trust it.

The timeline is CLOCK_MONOTONIC (dualrec.timebase); UTC is attached to it by anchors, and each
anchor carries ``source``, ``synced`` and ``est_error_ns`` from here.

``ClockQuality.source`` names the chain UTC comes through, fixed at start (it is in every anchor
and header, so it must not change under a running recorder):

    ``rtc``              battery RTC only; nothing disciplines the clock
    ``system+chrony``    chrony (NTP) disciplines the system clock; no RTC
    ``rtc+chrony``       RTC at boot and while the branch network is down, chrony when it is up
    ``pps+chrony``       as system+chrony, with a PPS device present for chrony's refclock
    ``pps+rtc+chrony``   as rtc+chrony, with a PPS device present
    ``system``           neither (the factory uses adjtimex(2) directly then)

PPS counts only when chrony is on (nothing else on the box uses it) and the device is there:
the device node exists and its ``/sys/class/pps/ppsN/assert`` is readable.

``sync_state()`` is (synced, est_error_ns), est_error_ns -1 when unknown:

- chrony, from ``chronyc -c -n tracking``: synced when the leap status is Normal (or a leap
  second is announced, which only a synchronised server does), 0 < stratum < 16 and the
  reference is not chrony's own local clock (127.127.1.1). The error bound is chrony's own
  (chronyc(1), "Root dispersion"):
  ``est_error = |system time offset| + root dispersion + root delay / 2``.
- RTC (source ``rtc``, or chrony not synchronised/not answering on an RTC board): RTC_RD_TIME
  on the RTC device. Not synced when the RTC has no valid time (the driver refuses with EINVAL,
  or RTC_VL_READ reports RTC_VL_DATA_INVALID: the battery ran out or it was never set), when it
  reads an impossible date (before MIN_PLAUSIBLE_YEAR: the reset value of a never-set RTC), or
  when it disagrees with the system clock by more than RTC_AGREE_NS (fake-hwclock restored an
  old time, or someone set the clock by hand). Otherwise synced with est_error_ns -1: the RTC
  holds UTC that was once synchronised, but how far it drifted since (20 ppm is 1.7 s a day)
  nobody knows; a board that needs a bound runs chrony.
- neither answering on a board without RTC: the kernel's view (adjtimex), as with no
  ClockQuality at all.

The bound is reported rounded up to the 1-2-5 series (1 ms, 2 ms, 5 ms, 10 ms ...): chrony's
figure changes at every update, and the timebase takes a new anchor whenever the quality
changes, so an exact figure would add an anchor every few seconds for nothing. Rounding up
keeps it a bound.

sync_state() is called for every anchor (the clock watcher checks five times a second), so a
result is kept for CACHE_S; after chronyc fails it is not run again for CHRONY_RETRY_S, so a
dead chronyd costs at most CHRONYC_TIMEOUT_S now and then. Everything that touches the system
(the command runner, the RTC reader, file reads, the clocks) is injectable.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from dualrec.config import ClockProfile
from dualrec.timebase import kernel_sync_state

log = logging.getLogger(__name__)

NS = 1_000_000_000
CACHE_S = 5.0
CHRONY_RETRY_S = 30.0
CHRONYC_TIMEOUT_S = 1.0
MIN_PLAUSIBLE_YEAR = 2024  # no box of this design has seen an earlier date
RTC_AGREE_NS = 2 * NS  # the RTC counts whole seconds; reading both takes a little while
LOCAL_REFERENCE_ID = 0x7F7F0101  # chrony's "local" directive: the box believes itself


# --- chrony ------------------------------------------------------------------------------------


class ChronyUnavailable(RuntimeError):
    """chronyc cannot be run, or chronyd does not answer, or answers nonsense."""


@dataclass(frozen=True, slots=True)
class ChronyTracking:
    """One ``chronyc -c tracking`` line. Field order (chrony 4.x client.c, csv mode): reference
    ID (hex), reference name or address, stratum, reference time (UTC seconds.nanoseconds),
    system time offset (s, positive: system clock slow), last offset (s), RMS offset (s),
    frequency (ppm), residual frequency (ppm), skew (ppm), root delay (s), root dispersion (s),
    update interval (s), leap status."""

    ref_id: int
    ref_name: str
    stratum: int
    ref_time_ns: int
    system_offset_s: float
    last_offset_s: float
    rms_offset_s: float
    freq_ppm: float
    resid_freq_ppm: float
    skew_ppm: float
    root_delay_s: float
    root_dispersion_s: float
    update_interval_s: float
    leap: str

    @property
    def synced(self) -> bool:
        return (self.leap in ("Normal", "Insert second", "Delete second")
                and 0 < self.stratum < 16 and self.ref_id not in (0, LOCAL_REFERENCE_ID)
                and self.ref_time_ns > 0)

    @property
    def est_error_ns(self) -> int:
        return round((abs(self.system_offset_s) + self.root_dispersion_s
                      + self.root_delay_s / 2) * NS)


def parse_chronyc_tracking(text: str) -> ChronyTracking:
    """Parse ``chronyc -c tracking`` output; ValueError if it is not one such line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) != 1:
        raise ValueError(f"chronyc tracking: expected one CSV line, got {len(lines)}")
    f = lines[0].strip().split(",")
    if len(f) != 14:
        raise ValueError(f"chronyc tracking: expected 14 fields, got {len(f)}: {lines[0]!r}")
    secs, _, frac = f[3].partition(".")
    ref_time_ns = int(secs) * NS + int((frac + "000000000")[:9])
    return ChronyTracking(
        ref_id=int(f[0], 16), ref_name=f[1], stratum=int(f[2]), ref_time_ns=ref_time_ns,
        system_offset_s=float(f[4]), last_offset_s=float(f[5]), rms_offset_s=float(f[6]),
        freq_ppm=float(f[7]), resid_freq_ppm=float(f[8]), skew_ppm=float(f[9]),
        root_delay_s=float(f[10]), root_dispersion_s=float(f[11]),
        update_interval_s=float(f[12]), leap=f[13],
    )


def run_chronyc(timeout_s: float = CHRONYC_TIMEOUT_S) -> str:
    """The output of ``chronyc -c -n tracking``; ChronyUnavailable when there is none.

    -n: no reverse DNS for the reference's address (with the branch network down a lookup
    would take seconds)."""
    try:
        done = subprocess.run(["chronyc", "-c", "-n", "tracking"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ChronyUnavailable(f"chronyc: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise ChronyUnavailable(f"chronyc: {why}")
    return done.stdout


# --- RTC ---------------------------------------------------------------------------------------


def _ior(kind: str, nr: int, size: int) -> int:
    # _IOR from asm-generic/ioctl.h (arm, arm64, x86): dir READ (2) << 30 | size << 16 |
    # type << 8 | nr. (alpha, mips, powerpc and sparc encode differently; no Pi runs those.)
    return (2 << 30) | (size << 16) | (ord(kind) << 8) | nr


_RTC_TIME = struct.Struct("=9i")  # struct rtc_time: nine ints, tm_sec ... tm_isdst
RTC_RD_TIME = _ior("p", 0x09, _RTC_TIME.size)  # 0x80247009
RTC_VL_READ = _ior("p", 0x13, 4)  # 0x80047013, unsigned int
RTC_VL_DATA_INVALID = 0x1
RTC_VL_BACKUP_LOW = 0x2
RTC_VL_BACKUP_EMPTY = 0x4
RTC_VL_ACCURACY_LOW = 0x8


class RtcTime(NamedTuple):
    """struct rtc_time (linux/rtc.h): struct tm's fields; year since 1900, month 0-11, UTC."""

    tm_sec: int
    tm_min: int
    tm_hour: int
    tm_mday: int
    tm_mon: int
    tm_year: int
    tm_wday: int = 0
    tm_yday: int = 0
    tm_isdst: int = 0

    def pack(self) -> bytes:
        return _RTC_TIME.pack(*self)

    @classmethod
    def unpack(cls, buf: bytes) -> RtcTime:
        return cls(*_RTC_TIME.unpack(buf))

    def to_datetime(self) -> datetime:
        """The instant it names (ValueError for an impossible date, e.g. day 0)."""
        return datetime(self.tm_year + 1900, self.tm_mon + 1, self.tm_mday, self.tm_hour,
                        self.tm_min, self.tm_sec, tzinfo=UTC)

    @classmethod
    def from_datetime(cls, dt: datetime) -> RtcTime:
        dt = dt.astimezone(UTC)
        tt = dt.timetuple()
        return cls(dt.second, dt.minute, dt.hour, dt.day, dt.month - 1, dt.year - 1900,
                   (tt.tm_wday + 1) % 7, tt.tm_yday - 1, 0)


@dataclass(frozen=True, slots=True)
class RtcReading:
    time: RtcTime
    system_ns: int  # CLOCK_REALTIME read right after the RTC
    vl: int | None  # RTC_VL_READ flags; None when the driver has no such ioctl


def read_rtc(path: str, *, ioctl: Callable[..., Any] = fcntl.ioctl,
             realtime_ns: Callable[[], int] = time.time_ns) -> RtcReading:
    """Read the RTC with RTC_RD_TIME (and RTC_VL_READ where the driver has it); OSError as the
    kernel gives it (ENOENT: no RTC; EINVAL: the RTC holds no valid time; EBUSY: another
    process holds the device open, the rtc character device allows one at a time)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = ioctl(fd, RTC_RD_TIME, bytes(_RTC_TIME.size))
        system = realtime_ns()
        try:
            vl: int | None = struct.unpack("=I", ioctl(fd, RTC_VL_READ, bytes(4)))[0]
        except OSError:
            vl = None  # ENOTTY/EINVAL: this driver cannot tell
    finally:
        os.close(fd)
    return RtcReading(RtcTime.unpack(buf), system, vl)


def judge_rtc(reading: RtcReading) -> tuple[bool, str, int | None]:
    """(synced, why, RTC minus system clock in ns when it could be compared)."""
    if reading.vl is not None and reading.vl & RTC_VL_DATA_INVALID:
        return False, "RTC reports its time invalid (battery empty or never set)", None
    try:
        rtc = reading.time.to_datetime()
    except ValueError:
        return False, f"RTC holds an impossible date {tuple(reading.time)[:6]}", None
    if rtc.year < MIN_PLAUSIBLE_YEAR:
        return False, f"RTC reads {rtc:%Y-%m-%d %H:%M:%S}: never set or reset", None
    rtc_ns = int(rtc.timestamp()) * NS
    # the RTC shows whole seconds: the true RTC time is in [rtc, rtc + 1 s)
    offset = rtc_ns + NS // 2 - reading.system_ns
    if abs(offset) > RTC_AGREE_NS:
        return False, (f"RTC and system clock disagree by {offset / NS:+.1f} s "
                       "(fake-hwclock or a manual change?)"), offset
    return True, "UTC from the RTC (error since it was last set unknown)", offset


# --- the quality -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockReport:
    synced: bool
    est_error_ns: int  # -1: unknown
    via: str  # "chrony" | "rtc" | "kernel"
    reason: str
    chrony: ChronyTracking | None = None
    rtc_offset_ns: int | None = None  # RTC minus system clock


def round_up_125(ns: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50 ... ns that is >= ns (an error bound stays one)."""
    if ns <= 0:
        return 0
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= ns:
                return m * step
        step *= 10


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


class ClockQuality:
    """Clock source name and sync state for a board's [clock] profile; see the module doc."""

    def __init__(
        self,
        profile: ClockProfile,
        *,
        run_chronyc: Callable[[], str] = run_chronyc,
        read_rtc: Callable[[str], RtcReading] = read_rtc,
        path_exists: Callable[[str], bool] = os.path.exists,
        read_text: Callable[[str], str] = _read_text,
        kernel_state: Callable[[], tuple[bool, int]] = kernel_sync_state,
        monotonic: Callable[[], float] = time.monotonic,
        cache_s: float = CACHE_S,
    ) -> None:
        self.profile = profile
        self._run_chronyc = run_chronyc
        self._read_rtc = read_rtc
        self._path_exists = path_exists
        self._read_text = read_text
        self._kernel_state = kernel_state
        self._monotonic = monotonic
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._report: ClockReport | None = None
        self._report_at = 0.0
        self._chrony_down_until = 0.0
        self.pps_present = self._pps_present() if profile.chrony else False
        self.source = self._source_name()

    def _pps_present(self) -> bool:
        dev = self.profile.pps
        if not dev:
            return False
        assert_file = f"/sys/class/pps/{os.path.basename(dev)}/assert"
        try:
            ok = self._path_exists(dev) and bool(self._read_text(assert_file).strip())
        except OSError:
            ok = False
        if not ok:
            log.warning("clock: PPS %s configured but not present (%s unreadable)",
                        dev, assert_file)
        return ok

    def _source_name(self) -> str:
        parts = ["pps"] if self.pps_present else []
        if self.profile.source == "rtc":
            parts.append("rtc")
        parts = parts or ["system"]
        if self.profile.chrony:
            parts.append("chrony")
        return "+".join(parts)

    def sync_state(self) -> tuple[bool, int]:
        report = self.report()
        return report.synced, report.est_error_ns

    def report(self) -> ClockReport:
        """The current judgement, at most CACHE_S old."""
        with self._lock:
            now = self._monotonic()
            if self._report is None or now - self._report_at >= self._cache_s:
                self._report = self._judge(now)
                self._report_at = now
            return self._report

    def _judge(self, now: float) -> ClockReport:
        chrony_why = ""
        if self.profile.chrony:
            if now >= self._chrony_down_until:
                try:
                    tracking = parse_chronyc_tracking(self._run_chronyc())
                except (ChronyUnavailable, ValueError) as exc:
                    self._chrony_down_until = now + CHRONY_RETRY_S
                    chrony_why = f"chrony unavailable: {exc}"
                    log.warning("clock: %s", chrony_why)
                else:
                    if tracking.synced:
                        ref = tracking.ref_name or f"{tracking.ref_id:08X}"
                        return ClockReport(True, round_up_125(tracking.est_error_ns), "chrony",
                                           f"chrony synchronised to {ref} "
                                           f"(stratum {tracking.stratum})", tracking)
                    chrony_why = (f"chrony not synchronised (leap status {tracking.leap}, "
                                  f"stratum {tracking.stratum})")
                    if self.profile.source != "rtc":
                        return ClockReport(False, -1, "chrony", chrony_why, tracking)
            else:
                chrony_why = "chrony unavailable (retrying later)"
        if self.profile.source == "rtc":
            return self._judge_rtc(chrony_why)
        synced, err = self._kernel_state()
        why = "kernel clock " + ("synchronised" if synced else "not synchronised")
        return ClockReport(synced, err, "kernel", f"{chrony_why}; {why}" if chrony_why else why)

    def _judge_rtc(self, before: str) -> ClockReport:
        try:
            reading = self._read_rtc(self.profile.rtc)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                why = f"RTC {self.profile.rtc} holds no valid time (never set or lost power)"
            elif exc.errno == errno.ENOENT:
                why = f"no RTC at {self.profile.rtc}"
            elif exc.errno == errno.EBUSY:
                why = f"RTC {self.profile.rtc} busy (another process holds it open)"
            else:
                why = f"RTC {self.profile.rtc} unreadable: {exc.strerror or exc}"
            return ClockReport(False, -1, "rtc", f"{before}; {why}" if before else why)
        synced, why, offset = judge_rtc(reading)
        return ClockReport(synced, -1, "rtc", f"{before}; {why}" if before else why,
                           rtc_offset_ns=offset)
