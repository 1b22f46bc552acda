"""Token bucket, backoff and throttle: how the uplink paces itself and how repeated faults are
kept from flooding the log.

The bucket holds at most `burst` bytes of credit and fills at `rate_bps` bits per second, so over
any stretch longer than burst/rate the average stays at the cap (the teller's network is shared).
Backoff is exponential with full jitter, so a branch of boxes does not retry in lockstep.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_bps: int, burst_bytes: int = 32 * 1024,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if rate_bps <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate_bps / 8  # bytes per second
        self.burst = burst_bytes
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst_bytes)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until n bytes may be sent (n may exceed the burst: it is taken in parts)."""
        while n > 0:
            part = min(n, self.burst)
            with self._lock:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                self._tokens -= part
                wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                self._sleep(wait)
            n -= part


class Backoff:
    """Delays after consecutive failures: uniform in [0, min(cap, base * 2**n)]."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap = base_s, cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0


class Throttle:
    """At most one go-ahead per `interval_s` per key: how a fault that repeats every retry is
    logged without flooding the journal. Counts what it held back, so the next line can say."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str = "") -> int | None:
        """None: hold this one back; else how many were held back since the last go-ahead."""
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def reset(self, key: str = "") -> None:
        with self._lock:
            self._last.pop(key, None)
            self._held.pop(key, None)
