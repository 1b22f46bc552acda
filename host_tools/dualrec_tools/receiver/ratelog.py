"""Logging that a flood cannot turn into a flood of log lines: per reason, the first line of an
interval is written, the rest are counted and summed up in one line when the interval is over
(flush, called by the receiver's once-a-second sweep). Never a traceback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

OTHER_KEY = "(other)"


@dataclass
class _Slot:
    opened: float
    level: int
    held: int = 0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval_s
        self.max_keys = max_keys  # keys are reasons (x device ids): bounded all the same
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Write msg unless key already had its line this interval; True if written."""
        now = self._clock()
        with self._lock:
            if key not in self._slots and len(self._slots) >= self.max_keys:
                key = OTHER_KEY
            slot = self._slots.get(key)
            if slot is not None and now - slot.opened < self.interval:
                slot.held += 1
                return False
            self._summary(key, slot)
            self._slots[key] = _Slot(now, level)
        self.logger.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """Sum up and forget the keys whose interval is over."""
        now = self._clock()
        with self._lock:
            for key in [k for k, s in self._slots.items() if now - s.opened >= self.interval]:
                self._summary(key, self._slots.pop(key))

    def _summary(self, key: str, slot: _Slot | None) -> None:
        if slot is not None and slot.held:
            self.logger.log(slot.level, "%s: %d more in the last %.0f s (not logged one by one)",
                            key, slot.held, self.interval)


class RateLimitFilter(logging.Filter):
    """For loggers the receiver does not write itself (aiohttp.server logs every unparsable
    request with a traceback): the same rate limit per message, and the traceback replaced by
    the exception's one-line repr."""

    def __init__(self, events: RateLimitedLog) -> None:
        super().__init__()
        self.events = events

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = f"{record.name}:{str(record.msg)[:40]}:{type(exc).__name__}"
        now = self.events._clock()
        with self.events._lock:
            slot = self.events._slots.get(key)
            if slot is not None and now - slot.opened < self.events.interval:
                slot.held += 1
                return False
            if slot is None and len(self.events._slots) >= self.events.max_keys:
                return False
            self.events._summary(key, slot)
            self.events._slots[key] = _Slot(now, record.levelno)
        if exc is not None:
            record.msg = f"{record.getMessage()}: {type(exc).__name__}"  # no request bytes
            record.args = None
            record.exc_info = record.exc_text = None
        return True
