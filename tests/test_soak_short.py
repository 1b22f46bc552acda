"""The short version of `make soak` (tests/soak/run.py) that `make test` runs: a few kill -9
cycles of the real gateway and a small disk-full sweep, with the same figures asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from soak.run import disk_sweep, kill9_cycles

pytestmark = [pytest.mark.timeout(400), pytest.mark.xdist_group("timing")]


def test_kill9_cycles_lose_nothing_and_leave_no_process(tmp_path: Path, capsys) -> None:
    """Tried: 6 kill -9 of the real gateway at random moments (seeded: starting, just after a
    seal, just after a receipt), then an orderly run and a draining run. Asserted: sealed
    segments lost, torn, duplicated and out of chain are 0 over the receiver's copy and the
    spool; no descendant of a killed gateway is left running; both orderly runs exit 0."""
    fig = kill9_cycles(tmp_path, cycles=6, seed=7)
    with capsys.disabled():
        print("\n" + "\n".join(f"  {line}" for line in fig.lines()))
    assert (fig.lost, fig.torn, fig.duplicated, fig.out_of_chain) == ([], [], [], [])
    assert fig.leftover == 0, fig.leftover_cmds
    assert fig.exit_codes == [0, 0] and fig.drained
    assert fig.sealed >= 1


def test_disk_full_sweep(tmp_path: Path, capsys) -> None:
    """Tried: spool and state on a 1 MiB and a 2 MiB tmpfs filled by the segments themselves
    while the receiver is away, then drained; the state database alone on a 160 KiB tmpfs
    filled by a filler file, then freed. Asserted for each: the fault is on record, no silent
    stop (every thread alive), 0 sealed segments lost, sealing resumed after space returned,
    and the chain verifies."""
    rows = disk_sweep(tmp_path, ["1m", "2m"], ["160k"], say=lambda _: None)
    with capsys.disabled():
        print("\n" + "\n".join(r.line() for r in rows))
    for r in rows:
        assert r.fault_recorded and r.silent_stops == 0 and r.lost == 0 and r.chain_ok, r
        assert r.resume_s is not None, r  # its duration is the soak's figure, not asserted here
