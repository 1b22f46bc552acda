"""Clapper instants shared by the simulated camera, microphone and teller terminal.

The instants are the CLOCK_MONOTONIC times that are whole multiples of the period. CLOCK_MONOTONIC
is one clock for every process on the machine, so the terminal (a separate process) and the
gateway's sim devices agree on the instants without talking to each other.
"""

from __future__ import annotations

import math
import time

BEEP_HZ = 1000
BEEP_MS = 100


def next_clap(after_ns: int, period_ns: int) -> int:
    """The first clapper instant at or after after_ns."""
    return -(-after_ns // period_ns) * period_ns


def claps_between(start_ns: int, end_ns: int, period_ns: int) -> list[int]:
    """Clapper instants t with start_ns <= t < end_ns."""
    out = []
    t = next_clap(start_ns, period_ns)
    while t < end_ns:
        out.append(t)
        t += period_ns
    return out


def grid_start(rate: int) -> int:
    """The first CLOCK_MONOTONIC instant on the coarsest grid where t0 + i*1e9/rate is an exact
    integer for every i: sample and frame times are then exact, and whole-ms clapper instants
    fall exactly on a frame or sample."""
    step = 1_000_000_000 // math.gcd(rate, 1_000_000_000)
    return -(-time.monotonic_ns() // step) * step
