"""Losing the chain state is a recorded, verifiable event, not a stall (FORMAT.md §4).

Real processes: the receiver, the teller terminal and the gateway, as in test_e2e_uplink."""

from __future__ import annotations

import pytest

from dualrec.config import load_site
from dualrec.segment_format import parse_header, scan_dir
from dualrec_tools.simcounter import Counter, receiver_status
from helpers import small_board, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("timing")]
CONTINUOUS = "[recording]\nmode = \"continuous\"\nsegment_ms = 2000\n"


def _sealed(counter: Counter) -> int:
    log = counter.workdir / "gateway.log"
    return log.read_text().count(" sealed seq ") if log.exists() else 0


def _run_for(counter: Counter, segments: int) -> None:
    gateway = counter.start_gateway()
    before = _sealed(counter)
    wait_for(lambda: _sealed(counter) >= before + segments, 90, f"{segments} sealed segments")
    assert counter.stop(gateway) == 0


def _headers(directory) -> list[dict]:
    return [parse_header(f.header.read_bytes()) for f in scan_dir(directory).values()
            if f.header is not None]


def test_state_lost_after_acknowledged_uploads_resumes_from_the_receiver(tmp_path):
    """Tried: a box records and every segment is acknowledged (its spool drains); then its
    state directory is wiped as a replaced SD card would leave it (chain state, spool database,
    spool), and it starts again. Asserted: no fork and no refused link at the receiver, the
    new segments continue the receiver's chain (seq after its head, prev its hash), a
    `chain_resumed` idle segment says so, and the receiver's copy verifies with its content."""
    counter = Counter(tmp_path / "run", small_board(tmp_path, clap_ms=5000), with_receiver=True,
                      bandwidth_bps=50_000_000, site_extra=CONTINUOUS)
    counter.prepare()
    try:
        terminal = counter.start_terminal(300, transactions=1, seed=9)
        _run_for(counter, 3)
        gateway = counter.start_gateway()  # drain what the orderly stop sealed
        assert counter.wait_spool_drained(60)
        assert counter.stop(gateway) == 0
        head_before = max(scan_dir(counter.received))
        site = load_site(counter.site)
        for p in [*site.spool.state.parent.glob(site.spool.state.name + "*"),
                  *site.spool.dir.iterdir()]:
            p.unlink()
        _run_for(counter, 3)
        # a last run only to drain: no new session, so what the stop sealed goes up too
        counter.site.write_text(counter.site.read_text().replace('mode = "continuous"',
                                                                 'mode = "session"'))
        gateway = counter.start_gateway()
        assert counter.wait_spool_drained(60)
        assert counter.stop(gateway) == 0
        counter.stop(terminal)
        status = receiver_status(counter)
    finally:
        counter.cleanup()
    assert status["devices"]["sim-0001"]["problems"] == []
    headers = sorted(_headers(counter.received), key=lambda h: h["seq"])
    assert headers[-1]["seq"] > head_before + 2
    resumed = [h for h in headers if h["reason"] == "chain_resumed"]
    assert len(resumed) == 1 and resumed[0]["seq"] > head_before
    report = counter.verify()
    assert report.passed(), [str(p) for p in report.problems]
    assert [p.kind for p in report.warnings] == ["chain_resumed"]


def test_state_lost_with_a_spool_resumes_after_the_spool(tmp_path):
    """Tried: a box with no receiver seals into its spool; its chain state file is deleted;
    it starts again. Asserted: it continues after the newest header in its spool (no seq
    issued twice), a `chain_resumed` segment names that head, and the spool verifies from
    seq 0 as one chain."""
    counter = Counter(tmp_path / "run", small_board(tmp_path, clap_ms=5000),
                      site_extra=CONTINUOUS)
    counter.prepare()
    try:
        terminal = counter.start_terminal(300, transactions=1, seed=9)
        _run_for(counter, 3)
        head_before = max(scan_dir(counter.spool))
        site = load_site(counter.site)
        for p in site.spool.state.parent.glob(site.spool.state.name + "*"):
            p.unlink()
        _run_for(counter, 2)
        counter.stop(terminal)
    finally:
        counter.cleanup()
    headers = sorted(_headers(counter.spool), key=lambda h: h["seq"])
    assert [h["seq"] for h in headers] == list(range(len(headers)))  # no seq twice, no gap
    resumed = [h for h in headers if h["reason"] == "chain_resumed"]
    assert len(resumed) == 1 and resumed[0]["seq"] == head_before + 1
    report = counter.verify()
    assert report.passed(), [str(p) for p in report.problems]
    assert [p.kind for p in report.warnings] == ["chain_resumed"]
