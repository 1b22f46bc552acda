"""The gateway's reaction to a full disk: the segment waits in memory, the fault is recorded
and shown, and sealing resumes by itself when space returns, with nothing lost."""

from __future__ import annotations

import time

from dualrec.chain import ChainState
from dualrec.seal_worker import SealWorker, Stats
from dualrec.sealer import Sealer
from dualrec.segment_format import scan_dir
from dualrec.timebase import Timebase
from segments import BOOT_A, make_segment


def test_full_disk_fault_then_recovery(tmp_path, small_tmpfs, device_key, age_identity):
    """Tried: a filler file leaves too little space for one segment, then is removed.
    Asserted: no segment file appears while full, one `fault` event and the fault LED,
    then after space returns every queued segment is sealed in order, `fault_cleared`
    is recorded and the LED goes dark."""
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * 500_000)
    sealer = Sealer(device_id="test-0001", key=device_key,
                    recipients=[str(age_identity.to_public())], spool_dir=small_tmpfs / "spool",
                    chain=ChainState(tmp_path / "state.db"), timebase=Timebase(),
                    boot_id=BOOT_A)
    events, leds, stats = [], [], Stats()
    worker = SealWorker(sealer, events.append, leds.append, stats)
    worker.start()
    for i in range(3):
        worker.put(make_segment(index=i, seconds=1))
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.kind for e in events] == ["fault"] and leds == ["seal"]
    assert "No space left" in events[0].detail["reason"]
    assert scan_dir(small_tmpfs / "spool") == {}
    filler.unlink()
    deadline = time.monotonic() + 15
    while len(stats.sealed) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop()
    assert [s.seq for s in stats.sealed] == [0, 1, 2]
    assert [s.header["session_index"] for s in stats.sealed] == [0, 1, 2]
    assert [e.kind for e in events] == ["fault", "fault_cleared"] and leds == ["seal", None]
