"""A busy teller terminal for the bench: GB18030 log lines into a pty at a fixed rate.

Run as ``python -m tests.bench.oplog_writer --link PATH --rate 200 --duration-s N``. It reuses the
simulated terminal's pty, line format and transaction script (dualrec.sim.terminal), but writes
transactions back to back at `rate` lines per second instead of at a teller's pace, so the
operation-log path (pyserial reads, framing, decoding, pattern matching, JSON records) carries a
load far above a real counter's. It prints ``READY <slave>`` once the link exists, starts when a
reader opens it, stops on SIGTERM/SIGINT or after the duration, and prints a JSON summary line.

With --clap-period-ms P it also writes ``MARK <n> t=<ns>`` at every clapper instant (the sim
microphone beeps at the same instants, dualrec.sim.clapper), like the simulated terminal: the
bench reads the log's stamp of each MARK and the beep's onset in the recording to measure sync.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator, Sequence
from types import FrameType

from dualrec.sim.clapper import next_clap
from dualrec.sim.terminal import (
    ENCODING,
    LINE_END,
    READER_SETTLE_S,
    Pty,
    replace_link,
    sleep_until,
    stamp_line,
    transaction,
)

NS = 1_000_000_000


def bodies(seed: int = 0) -> Iterator[str]:
    """Transaction lines without end: one scripted transaction after another."""
    rng = random.Random(seed)
    txn = 100
    while True:
        yield from transaction(rng, txn, "T0012")
        txn += 1


def log_bytes(lines: int, seed: int = 0) -> bytes:
    """`lines` terminal lines as the writer sends them (for the baseline's input file)."""
    source = bodies(seed)
    return b"".join(stamp_line(next(source)) for _ in range(lines))


class _Stop:
    requested = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _Stop.requested = True


def run(link: str, rate: float, duration_s: float, wait_reader_s: float, seed: int,
        clap_period_ms: int = 0) -> dict:
    # The baud only labels the pty (it has no line speed); B0 would mean "hang up".
    pty = Pty(baud=921600)
    written = marks = 0
    nbytes = 0
    try:
        replace_link(link, pty.slave_name)
        print(f"READY {pty.slave_name}", flush=True)
        if pty.wait_reader(wait_reader_s):
            time.sleep(READER_SETTLE_S)
        source = bodies(seed)
        start = time.monotonic_ns()
        end = start + int(duration_s * NS)
        period_ns = clap_period_ms * 1_000_000
        clap = next_clap(start, period_ns) if period_ns else end
        while not _Stop.requested:
            due = start + int(written * NS / rate)
            if clap <= due and clap < end:
                marks += 1
                # Built before the instant, sent in one write: the first byte leaves at the clap.
                mark = f"MARK {marks} t={clap}{LINE_END}".encode(ENCODING)
                sleep_until(clap)
                pty.write(mark)
                nbytes += len(mark)
                clap += period_ns
                continue
            if due >= end:
                break
            left = due - time.monotonic_ns()
            if left > 0:
                # Plain sleep, no spin: the writer must leave the CPU to the gateway it feeds.
                time.sleep(left / NS)
            data = stamp_line(next(source))
            pty.write(data)
            written += 1
            nbytes += len(data)
    finally:
        pty.close()
        with contextlib.suppress(OSError):
            if os.readlink(link) == pty.slave_name:
                os.unlink(link)
    return {"lines": written, "marks": marks, "bytes": nbytes, "dropped": pty.dropped,
            "unheard": pty.unheard}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.oplog_writer", description=__doc__)
    ap.add_argument("--link", required=True)
    ap.add_argument("--rate", type=float, default=200.0, help="lines per second")
    ap.add_argument("--duration-s", type=float, required=True)
    ap.add_argument("--wait-reader-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clap-period-ms", type=int, default=0,
                    help="also write MARK lines at the clapper instants (0: none)")
    args = ap.parse_args(argv)
    if args.rate <= 0:
        ap.error("--rate must be positive")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    summary = run(args.link, args.rate, args.duration_s, args.wait_reader_s, args.seed,
                  args.clap_period_ms)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
