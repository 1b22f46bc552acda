"""What the gateway knows about its own health: active faults, the clock's, the watchdog's.

FaultBoard follows the `fault` / `fault_cleared` events on their way to the record and keeps the
faults active now: it drives the fault LED for device and internal faults (seal, spool and uplink
drive it themselves) and writes them to a small status file that `dualrec diag` shows.
ClockHealth turns a failing or unsure clock-quality source (RTC absent or invalid, chrony
unreachable) into a `clock` fault instead of an exception. WatchdogFeeder sends WATCHDOG=1 only
while the gateway's health check finds nothing wrong.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dualrec.samples import Event

log = logging.getLogger(__name__)

# Devices whose faults the board shows on the LED; "internal" is a supervised thread failing.
LAMP_DEVICES = {"camera", "microphone", "oplog", "panel", "clock", "tap_sync", "internal"}
# The stream each device gives a session (a session recorded without it says so).
STREAMS = {"camera": "video", "microphone": "audio", "oplog": "oplog"}
STATUS_NAME = "faults.json"


def fault_key(detail: dict[str, Any]) -> str:
    device = str(detail.get("device", "?"))
    part = detail.get("part")
    return f"{device}:{part}" if part else device


class FaultBoard:
    """The faults active now, from the events that put them on record."""

    def __init__(self, lamp: Callable[[str, bool], None], status_path: Path | None) -> None:
        self._lamp = lamp
        self.status_path = status_path
        self.active: dict[str, dict[str, Any]] = {}  # key -> {device, reason, since_mono_ns}

    def see(self, ev: Event) -> None:
        """Note a fault event passing to the record (called on the recorder's thread)."""
        if not isinstance(ev.detail, dict):
            return
        if ev.kind == "oplog_reconnected":  # the port's own clear; "device" is its path
            if self.active.pop("oplog", None) is not None:
                self._lamp("oplog", False)
                self.write()
            return
        if "device" not in ev.detail:
            return
        key = fault_key(ev.detail)
        device = str(ev.detail["device"])
        if ev.kind == "fault":
            if key in self.active and not ev.detail.get("fatal"):
                return
            self.active[key] = {"device": device, "reason": str(ev.detail.get("reason", "")),
                                "since_mono_ns": ev.t_mono_ns, **(
                                    {"part": ev.detail["part"]} if "part" in ev.detail else {})}
            if device in LAMP_DEVICES:
                self._lamp(key, True)
        elif ev.kind == "fault_cleared":
            if self.active.pop(key, None) is None:
                return
            if key.split(":")[0] in LAMP_DEVICES:
                self._lamp(key, False)
        else:
            return
        self.write()

    def write(self) -> None:
        """The status file diag reads: replaced atomically, so a reader never sees half."""
        if self.status_path is None:
            return
        doc = {"pid": os.getpid(), "written_utc_ns": time.time_ns(),
               "faults": [{"key": k, **v} for k, v in sorted(self.active.items())]}
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, self.status_path)
        except OSError as exc:  # a full or read-only disk must not stop the recorder loop
            log.debug("fault status not written: %s", exc)


class ClockHealth:
    """Wraps the clock-quality source: never raises into the timebase, and says what is wrong
    (a reason) when the source cannot vouch for the clock because a part of it is missing."""

    def __init__(self, sync_state: Callable[[], tuple[bool, int]] | None) -> None:
        self._inner = sync_state
        self._quality = getattr(sync_state, "__self__", None)  # ClockQuality, when it is one
        self._error: str | None = None

    def sync_state(self) -> tuple[bool, int]:
        if self._inner is None:
            from dualrec.timebase import kernel_sync_state

            return kernel_sync_state()
        try:
            state = self._inner()
        except Exception as exc:  # a broken RTC driver or chronyc must not stop the timebase
            self._error = f"clock quality source failed: {type(exc).__name__}: {exc}"
            return False, -1
        self._error = None
        return state

    def problem(self) -> str | None:
        """Why the clock's own hardware or daemon is failing now, or None."""
        if self._error:
            return self._error
        report = getattr(self._quality, "report", None)
        if report is None:
            return None
        try:
            r = report()
        except Exception as exc:
            return f"clock quality source failed: {type(exc).__name__}: {exc}"
        reason = str(getattr(r, "reason", ""))
        if "chrony unavailable" in reason or (getattr(r, "via", "") == "rtc" and not r.synced):
            return reason
        return None


class WatchdogFeeder:
    """WATCHDOG=1 at the interval systemd asks for, only while check() finds no problem; a
    withheld ping is logged once per change of the problem list."""

    def __init__(self, notifier: Any, check: Callable[[], list[str]]) -> None:
        self.notifier = notifier
        self.check = check
        interval = getattr(notifier, "watchdog_interval_s", None) if notifier else None
        self.interval_s: float | None = interval
        self._next = 0.0
        self._withheld: list[str] = []
        self.pings = 0

    def tick(self, now: float) -> None:
        if self.interval_s is None or now < self._next:
            return
        self._next = now + min(self.interval_s, 1.0) if self._withheld else now + self.interval_s
        problems = self.check()
        if problems:
            if problems != self._withheld:
                log.error("watchdog withheld: %s", "; ".join(problems))
                self.notifier.status("unhealthy: " + "; ".join(problems))
            self._withheld = problems
            return
        if self._withheld:
            log.warning("watchdog resumed: healthy again")
            self.notifier.status("recording")
            self._withheld = []
        self.notifier.watchdog()
        self.pings += 1
