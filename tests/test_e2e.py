"""End to end on the simulated counter: the gateway and the teller terminal as real processes
on a real pseudo-terminal, then verify, export and measure, as an auditor would."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pyrage
import pytest
from click.testing import CliRunner

from dualrec.config import load_board, load_site
from dualrec.gateway import Gateway
from dualrec.segment_format import parse_header
from dualrec_tools.cli import main as tool_main
from dualrec_tools.export import load_identities
from dualrec_tools.simcounter import Counter
from helpers import small_board, wait_for

# Timing-sensitive: the "timing" group runs on one xdist worker, never beside its own kind.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("timing")]


def headers(spool: Path) -> list[dict]:
    return [parse_header(p.read_bytes()) for p in sorted(spool.glob("*.hdr.json"))]


def payload_members(counter: Counter, seq: int) -> dict[str, bytes]:
    ids = load_identities(counter.identity)
    blob = (counter.spool / f"{seq:010d}.payload.age").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(blob, ids))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_recorded_sessions_verify_export_and_stay_in_sync(tmp_path):
    """Ran: terminal and gateway processes for 14 s, two transactions, claps every 2 s.
    Asserted: the chain verifies; each session exports to an MKV with video, audio and subtitle
    streams; every clap is found in all three streams within one frame (33 ms); the `age` CLI
    decrypts a payload; garbage lines were kept raw and flagged."""
    counter = Counter(tmp_path / "run", small_board(tmp_path))
    counter.prepare()
    try:
        terminal = counter.start_terminal(14, transactions=2, seed=7)
        gateway = counter.start_gateway()
        counter.wait_terminal_done(terminal, 60)
        time.sleep(0.5)
        assert counter.stop(gateway) == 0
        counter.stop(terminal)
    finally:
        counter.cleanup()
    report = counter.verify()
    assert report.passed(strict=True), [str(p) for p in report.problems]
    assert len(report.sessions) == 2 and all(s.status == "complete" for s in report.sessions)
    claps = 0
    for session in report.sessions:
        mkv, sync = counter.export(session.session)
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type",
                                "-of", "json", str(mkv)], capture_output=True, check=True)
        kinds = sorted(s["codec_type"] for s in json.loads(probe.stdout)["streams"])
        assert kinds == ["audio", "subtitle", "subtitle", "video"]  # the log, the time code
        # A clap in the pre-roll from before the terminal began its script has a flash and a
        # beep but no MARK line: those two must still agree, and come before every MARK.
        assert len(sync.unmatched_video) == len(sync.unmatched_audio)
        first_mark = min(c.log_ns for c in sync.claps if c.log_ns is not None)
        for v, a in zip(sync.unmatched_video, sync.unmatched_audio, strict=True):
            assert abs(v - a) <= 33_000_000 and v < first_mark
        for clap in sync.claps:
            assert clap.complete, clap
            assert all(abs(v) <= 33_000 for v in clap.offsets_us.values()), clap
        claps += len(sync.claps)
    assert claps >= 4
    # every transaction's labels and completeness are on record (the sim teller does every
    # step), and `sessions` filters on them
    listed = CliRunner().invoke(tool_main, ["sessions", "--spool", str(counter.store()),
                                            "--identity", str(counter.identity)])
    assert listed.exit_code == 0, listed.output
    rows = [r for r in listed.output.splitlines()[1:] if r.strip()]
    assert len(rows) == 2 and all(r.rstrip().endswith(" complete") for r in rows), rows
    txn = rows[0].split()[7]
    assert txn.isdigit() and len(txn) == 6, rows  # TXN=000123 from the start line
    only = CliRunner().invoke(tool_main, ["sessions", "--spool", str(counter.store()),
                                          "--identity", str(counter.identity), "--txn", txn])
    assert len([r for r in only.output.splitlines()[1:] if r.strip()]) == 1, only.output
    ident = counter.identity
    first = counter.spool / "0000000000.payload.age"
    plain = subprocess.run(["age", "-d", "-i", str(ident), str(first)],
                           capture_output=True, check=True).stdout
    assert plain == pyrage.decrypt(first.read_bytes(), load_identities(ident))


def test_kill9_mid_session_then_restart_continues_chain(tmp_path):
    """Tried: kill -9 of the gateway twice in the middle of a session (2 s segments), each
    followed by a restart. Asserted: everything sealed before each kill still verifies, the chain
    has no gap or fork, each interrupted session is closed by a final segment whose events say
    `session_interrupted`, and recording goes on after the restart."""
    counter = Counter(tmp_path / "run", small_board(tmp_path, clap_ms=5000),
                      site_extra="[recording]\nsegment_ms = 2000\npreroll_ms = 1000\n")
    counter.prepare()
    try:
        terminal = counter.start_terminal(40, transactions=1, seed=3)
        for round_ in range(2):
            sealed_before = len(headers(counter.spool))
            gateway = counter.start_gateway()

            def open_segment_sealed(sealed_before: int = sealed_before) -> bool:
                hs = headers(counter.spool)[sealed_before:]  # sealed by this process
                return bool(hs) and not hs[-1]["final"] and hs[-1]["session_index"] >= 1

            wait_for(open_segment_sealed, 30, f"a sealed mid-session segment (round {round_})")
            before = {p.name: p.read_bytes() for p in counter.spool.iterdir()}
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(10)
            report = counter.verify()
            assert not report.errors, [str(p) for p in report.errors]
            # what was committed before the kill is on disk, byte for byte
            assert all((counter.spool / n).read_bytes() == b for n, b in before.items()
                       if not n.startswith("."))
        gateway = counter.start_gateway()
        def resumed() -> bool:
            hs = headers(counter.spool)
            cuts = [h["seq"] for h in hs if h["reason"] == "interrupted"]
            return len(cuts) == 2 and any(h["seq"] > cuts[-1] and h["session"] for h in hs)

        wait_for(resumed, 30, "recording after the last restart")
        assert counter.stop(gateway) == 0
        counter.stop(terminal)
    finally:
        counter.cleanup()
    report = counter.verify()
    assert not report.errors, [str(p) for p in report.errors]
    hs = headers(counter.spool)
    assert [h["seq"] for h in hs] == list(range(len(hs)))
    interrupted = [h for h in hs if h["reason"] == "interrupted"]
    assert len(interrupted) == 2 and all(h["final"] for h in interrupted)
    for h in interrupted:
        events = payload_members(counter, h["seq"])["events.jsonl"].decode().splitlines()
        assert json.loads(events[0])["kind"] == "session_interrupted"
    after_last = [h for h in hs if h["seq"] > interrupted[-1]["seq"] and h["session"]]
    assert after_last and after_last[0]["streams"]["video"]["frames"] > 0
    first = payload_members(counter, after_last[0]["seq"])["events.jsonl"].decode().splitlines()
    start = json.loads(first[0])
    assert start["kind"] == "session_start" and start["detail"]["trigger"] == "resume"
    assert start["detail"]["resumes"] == interrupted[-1]["session"]


def test_oplog_garbage_is_kept_raw_flagged_bounded_and_recording_goes_on(tmp_path, key_files):
    """Tried: during a session, invalid GB18030 and UTF-8, NUL bytes, a 1 MiB line with no
    newline and a 2 s flood at full speed, written into a real pty read by the gateway.
    Asserted: the sealed oplog records concatenate to exactly the bytes written, every record
    is at most max_line (+ terminator) bytes, the bad ones are flagged, and the session went on
    to a normal end with video and audio throughout."""
    from helpers import write_site

    master, slave = os.openpty()
    import tty

    tty.setraw(slave)
    port = os.ttyname(slave)
    site = load_site(write_site(tmp_path / "site.toml", key_files, port=port,
                                extra="[recording]\npostroll_ms = 500\n"))
    gw = Gateway(load_board(small_board(tmp_path)), site)
    stop = threading.Event()
    runner = threading.Thread(target=gw.run, args=(stop,), daemon=True)
    runner.start()
    time.sleep(1.5)
    sent = bytearray()

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(master, view[:4096])
            view = view[n:]
        sent.extend(data)

    send("交易开始 TXN=9\r\n".encode("gb18030"))
    send(b"\x81\x30\xff\xfe bad gb18030\r\n")
    send(b"\xc3\x28 bad utf-8 \x00\x00 nul\r\n")
    send(b"A" * (1 << 20) + b"\r\n")
    flood_end = time.monotonic() + 2
    i = 0
    while time.monotonic() < flood_end:
        send(f"{i:08d} 流水 {'x' * 80}\r\n".encode("gb18030"))
        i += 1
    time.sleep(1)
    send("交易结束 TXN=9\r\n".encode("gb18030"))
    time.sleep(2.5)
    stop.set()
    runner.join(60)
    os.close(master)
    os.close(slave)
    hs = [parse_header(p.read_bytes()) for p in sorted(site.spool.dir.glob("*.hdr.json"))]
    ids = [pyrage.x25519.Identity.from_str(key_files["identity"].read_text().split("\n")[1])]
    records = []
    for h in hs:
        blob = (site.spool.dir / f"{h['seq']:010d}.payload.age").read_bytes()
        with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(blob, ids))) as tar:
            records += [json.loads(x) for x in tar.extractfile("oplog.jsonl").read().splitlines()]
    raw = b"".join(base64.b64decode(r["raw"]) for r in records)
    assert raw == bytes(sent)
    assert max(len(base64.b64decode(r["raw"])) for r in records) <= site.oplog.max_line + 2
    flags = {f for r in records for f in r["flags"]}
    assert {"decode_error", "nul", "overlong"} <= flags
    assert hs[-1]["final"] and hs[-1]["reason"] == "session_end"
    assert sum(h["streams"]["video"]["frames"] for h in hs) > 0
    assert i > 1000  # the flood really was one
