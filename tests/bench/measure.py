"""Run a command and report its resource use, from a small process: the bench's stopwatch.

Run as ``python -m tests.bench.measure --out R.json --timeout S -- CMD ARGS...``; stdin, stdout and
stderr pass through to CMD. R.json gets wall time, user and system CPU, and peak RSS of CMD
with every descendant it waited for (wait4).

Why a separate process: Linux carries a process's peak RSS over exec() from the address space
it was forked (or vforked) from. A command started straight from the bench, which holds the
clip and the baseline's inputs, would report the bench's own size as its peak. Started from this
small interpreter, a command's peak RSS can only be inflated up to this process's own (~10 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.measure", description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, required=True, help="kill CMD after this long")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    # A runaway command is killed, so the bench always ends by itself.
    killer = threading.Timer(args.timeout, proc.kill)
    killer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    wall = time.monotonic() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    args.out.write_text(json.dumps({
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "maxrss_kib": ru.ru_maxrss,
        "exit_code": code,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
