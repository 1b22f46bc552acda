"""The simulated teller terminal, run as its own process and read through its pty with pyserial."""

from __future__ import annotations

import itertools
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from dualrec.oplog_framer import LineFramer
from dualrec.samples import LogLine
from dualrec.sim import terminal

ROOT = Path(__file__).resolve().parents[1]
GB = "gb18030"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(系统|柜员T\d{4})\] ")
MARK = re.compile(r"^MARK (\d+) t=(\d+)$")


def id_valid(number: str) -> bool:
    """GB 11643-1999, written out independently of the module under test."""
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    total = sum(int(d) * w for d, w in zip(number[:17], weights, strict=True))
    return number[17] == "10X98765432"[total % 11]


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


def start_terminal(link: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "firmware"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualrec.sim.terminal", "--link", str(link), *args],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready:
        proc.kill()
        pytest.fail("terminal did not print READY within 10 s")
    first = proc.stdout.readline().decode()
    assert first.startswith("READY /dev/"), first
    return proc, first.split()[1]


def read_all(port: serial.Serial, limit_s: float) -> list[LogLine]:
    """Read until the terminal closes its side (or limit_s), stamping like SerialOpLog does."""
    framer = LineFramer(GB, b"\r\n", 4096)
    lines: list[LogLine] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            first = port.read(1)
            if not first:
                continue
            t = time.monotonic_ns()
            waiting = port.in_waiting
            lines += framer.feed(first + port.read(waiting) if waiting else first, t)
        except serial.SerialException:
            break  # the terminal closed the pty: end of the run
    return lines + framer.flush(time.monotonic_ns())


@pytest.mark.timeout(30)
def test_terminal_run(tmp_path: Path) -> None:
    link = tmp_path / "ttyTELLER"
    period_ms = 2000
    proc, slave = start_terminal(
        link, "--duration-s", "6", "--clap-period-ms", str(period_ms), "--seed", "20", "--garbage"
    )
    try:
        assert os.path.realpath(link) == slave
        with serial.Serial(str(link), 115200, timeout=0.05) as port:
            lines = read_all(port, 15)
        assert proc.wait(timeout=5) == 0  # it ends by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not link.exists() and not link.is_symlink()

    log = [line for line in lines if LOG_LINE.match(line.text)]
    marks = [line for line in lines if MARK.match(line.text)]
    other = [line for line in lines if line not in log and line not in marks]
    assert all(line.raw.endswith(b"\r\n") for line in lines)
    assert all(line.flags == () for line in log + marks)  # clean GB18030, nothing odd
    assert all(line.flags for line in other), other  # anything else is flagged line noise
    assert len(other) == 2  # seed 20 puts two bursts of line noise in the first 6 s
    assert log[0].text.endswith("串口日志开启")

    # Transactions: begin/end pairs in order, never overlapping, same TXN number.
    texts = [line.text for line in log]
    begins = [(i, re.search(r"交易开始 TXN=(\d{6})", t)) for i, t in enumerate(texts)]
    ends = [(i, re.search(r"交易结束 TXN=(\d{6}) 结果=成功", t)) for i, t in enumerate(texts)]
    begin_at = [(i, m.group(1)) for i, m in begins if m]
    end_at = [(i, m.group(1)) for i, m in ends if m]
    assert len(begin_at) == len(end_at) == 3
    for (b, txn_b), (e, txn_e) in zip(begin_at, end_at, strict=True):
        assert b < e and txn_b == txn_e
    assert all(e < b for (e, _), (b, _) in zip(end_at, begin_at[1:], strict=False))

    ids = [m.group(1) for t in texts if (m := re.search(r"证件号=(\d{17}[\dX])(?!\d)", t))]
    cards = re.findall(r"卡号=(\d{16,19})(?!\d)", "\n".join(texts))
    assert len(ids) == 3 and all(id_valid(n) for n in ids)
    assert len(cards) >= 3 and all(luhn_valid(n) for n in cards)

    # Clapper marks: every instant in the run, numbered, received close to the instant.
    got = [
        (int(m.group(1)), int(m.group(2)), line.t_mono_ns)
        for line in marks
        if (m := MARK.match(line.text))
    ]
    assert [n for n, _, _ in got] == list(range(1, len(got) + 1))
    assert len(got) >= 2
    period_ns = period_ms * 1_000_000
    assert all(t % period_ns == 0 for _, t, _ in got)
    assert all(b - a == period_ns for (_, a, _), (_, b, _) in itertools.pairwise(got))
    lateness_ms = [(rx - t) / 1e6 for _, t, rx in got]
    print("MARK lateness (ms):", lateness_ms)
    assert all(0 <= late < 15 for late in lateness_ms), lateness_ms


@pytest.mark.timeout(20)
def test_sigterm_stops_it(tmp_path: Path) -> None:
    link = tmp_path / "tty"
    proc, _ = start_terminal(link, "--duration-s", "60", "--clap-period-ms", "500")
    try:
        with serial.Serial(str(link), 115200, timeout=0.05) as port:
            deadline = time.monotonic() + 5
            got = b""
            while b"\r\n" not in got and time.monotonic() < deadline:
                got += port.read(100)
            assert b"\r\n" in got
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not link.is_symlink()


@pytest.mark.timeout(20)
def test_runs_out_its_time_with_nobody_reading(tmp_path: Path) -> None:
    link = tmp_path / "tty"
    link.symlink_to("/nonexistent")  # a stale link from an earlier run is replaced
    proc, slave = start_terminal(
        link, "--duration-s", "1", "--clap-period-ms", "100", "--wait-reader-s", "0.2"
    )
    try:
        assert os.path.realpath(link) == slave
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_number_generators_are_valid() -> None:
    assert terminal.id_check_digit("11010519491231002") == "X"  # the GB 11643 example
    assert terminal.luhn_check_digit("7992739871") == "3"
    rng = random.Random(0)
    for _ in range(500):
        male = rng.random() < 0.5
        number = terminal.make_id_number(rng, male)
        assert len(number) == 18 and id_valid(number)
        assert int(number[16]) % 2 == (1 if male else 0)
        card = terminal.make_card_number(rng)
        assert 16 <= len(card) <= 19 and luhn_valid(card)


def test_plan_spreads_transactions_over_the_duration() -> None:
    duration_ns = 30_000_000_000
    script = terminal.plan(random.Random(1), duration_ns, 3, garbage=False)
    begins = [p.offset_ns for p in script if p.body and "交易开始" in p.body]
    ends = [p.offset_ns for p in script if p.body and "交易结束" in p.body]
    assert len(begins) == len(ends) == 3
    assert all(0 < b < e < duration_ns for b, e in zip(begins, ends, strict=True))
    assert all(e < b for e, b in zip(ends, begins[1:], strict=False))  # idle gaps between
    assert 6e9 < ends[0] - begins[0] < 9e9  # about 7 s of work in each 10 s slot
