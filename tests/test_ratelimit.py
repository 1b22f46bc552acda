"""Token bucket and backoff on a virtual clock: exact, no sleeping."""

from __future__ import annotations

import random

import pytest

from dualrec.ratelimit import Backoff, TokenBucket


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.mark.parametrize("rate_bps", [64_000, 4_000_000, 100_000_000])
def test_average_rate_holds_to_the_burst(rate_bps):
    clock = VirtualClock()
    bucket = TokenBucket(rate_bps, burst_bytes=16_384, clock=clock, sleep=clock.sleep)
    sent = 0
    for _ in range(2000):
        bucket.take(16_384)
        sent += 16_384
    # after the initial burst, time elapsed is exactly what the rate allows
    assert clock.t == pytest.approx((sent - 16_384) * 8 / rate_bps, rel=1e-9)


def test_large_takes_are_split_and_idle_credit_is_capped():
    clock = VirtualClock()
    bucket = TokenBucket(8_000, burst_bytes=1000, clock=clock, sleep=clock.sleep)
    clock.t = 1000.0  # a long idle time earns no more than one burst
    bucket.take(3000)
    assert clock.t == pytest.approx(1002.0)


def test_backoff_grows_to_cap_with_jitter_and_resets():
    b = Backoff(base_s=0.5, cap_s=8, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 <= d <= min(8, 0.5 * 2**i) for i, d in enumerate(delays))
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 0.5
