"""The simulated teller terminal: a separate process that writes an operation log into a pty.

Run as ``python -m dualrec.sim.terminal --link PATH --duration-s N --clap-period-ms P``. It opens
a pseudo-terminal, points the symlink PATH at the slave side (the gateway opens PATH as if it
were /dev/ttyUSB0), prints ``READY <slave>`` on stdout, and writes on the master side, in
GB18030 with CRLF line ends:

- a header, then scripted transactions paced like a teller at work, each from "交易开始" to
  "交易结束", with an ID-card number (valid GB 11643 check digit) and a bank-card number (valid
  Luhn digit): the data the box must seal and never show in clear;
- ``MARK <n> t=<ns>`` at every clapper instant (dualrec.sim.clapper), written as close to the
  instant as the scheduler allows, so log-to-A/V sync can be measured from a recording;
- with --garbage, now and then a line of line noise: invalid GB18030, NULs, an ESC sequence.

The script (and the duration) starts once a reader has opened the link, or after
--wait-reader-s anyway. It stops when the duration is over or on SIGTERM/SIGINT, closes the pty
and removes the link.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from dualrec.sim.clapper import next_clap

ENCODING = "gb18030"
LINE_END = "\r\n"
GARBAGE_PER_MINUTE = 4.0
# A reader that has the line open but does not read lets the pty buffer fill and the master
# would block; a line that cannot be written within this time is dropped (and counted) so the
# terminal keeps its schedule and can always be stopped. The gateway always reads, so in a
# normal run this never happens.
WRITE_TIMEOUT_S = 1.0
# pyserial flushes pending input while it opens a port: start writing only once that is over.
READER_SETTLE_S = 0.2
_SPIN_NS = 1_000_000  # the last millisecond before a clap is busy-waited: sleep overshoots

# Script data: small on purpose, just enough variety to look like a branch counter.
TELLERS = (("T0012", "张敏"), ("T0047", "李志强"), ("T0105", "陈晓燕"))
CUSTOMERS = (
    ("王建国", 1),
    ("刘芳", 0),
    ("赵德胜", 1),
    ("孙丽娟", 0),
    ("周海涛", 1),
    ("吴雅婷", 0),
)
AREA_CODES = ("110105", "310115", "440305", "320102", "510107", "330106")
CARD_BINS = ("622202", "621700", "622848", "621660", "622588", "621483")
TRANSACTION_TYPES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "理财购买": (
        ("JX2026-118", "稳盈增利180天", "R2"),
        ("JX2026-203", "安享添利1年期", "R2"),
        ("JX2026-317", "睿进混合3号", "R3"),
    ),
    "保险代销": (
        ("BX-88061", "金福年年两全保险(分红型)", "R2"),
        ("BX-88102", "康宁终身重大疾病保险", "R1"),
    ),
    "大额转账": (("ZZ-0001", "跨行大额实时汇款", "R1"),),
}
RISK_LEVELS = ("C2 谨慎型", "C3 稳健型", "C4 积极型")
GARBAGE = (
    b"\x80\xff\xfe\x81\x20\xa1",  # not valid GB18030: 0x80 and 0xFF never start a character
    b"\x00\x00",
    b"\x1b[2J\x1b[H",  # the terminal clearing its screen
    b"\x1b[0;31m\xd6\x00\xd0\x1b[0m",  # colour codes around a character broken by a NUL
)

ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK = "10X98765432"


def id_check_digit(first17: str) -> str:
    """GB 11643-1999 check character of an 18-character resident ID number."""
    return ID_CHECK[sum(int(c) * w for c, w in zip(first17, ID_WEIGHTS, strict=True)) % 11]


def make_id_number(rng: random.Random, male: bool) -> str:
    """A plausible resident ID number: area, birth date, sequence (odd for men), check."""
    birth = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 55))
    seq = rng.randrange(50) * 2 + (1 if male else 0)
    first17 = f"{rng.choice(AREA_CODES)}{birth:%Y%m%d}{rng.randrange(10)}{seq:02d}"
    return first17 + id_check_digit(first17)


def luhn_check_digit(payload: str) -> str:
    """The Luhn digit that makes payload + digit valid."""
    total = 0
    for i, c in enumerate(reversed(payload)):
        d = int(c)
        if i % 2 == 0:  # doubled: these sit at odd positions once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def make_card_number(rng: random.Random) -> str:
    """A plausible UnionPay debit card number: bank BIN, 16 to 19 digits, Luhn-valid."""
    length = rng.choice((16, 19))
    body = rng.choice(CARD_BINS) + "".join(str(rng.randrange(10)) for _ in range(length - 7))
    return body + luhn_check_digit(body)


@dataclass(frozen=True, slots=True)
class Planned:
    """A line due at offset_ns after the start; text is formatted when written (wall time)."""

    offset_ns: int
    body: str | None  # None: a garbage line
    garbage: bytes = b""


def transaction(rng: random.Random, txn: int, teller: str) -> list[str]:
    """One transaction's lines, without timestamps, from 交易开始 to 交易结束."""
    kind = rng.choice(sorted(TRANSACTION_TYPES))
    code, name, risk = rng.choice(TRANSACTION_TYPES[kind])
    customer, male = rng.choice(CUSTOMERS)
    amount = rng.randrange(5, 500) * 1000 if kind != "大额转账" else rng.randrange(50, 2000) * 1000
    who = f"[柜员{teller}]"
    lines = [
        f"{who} 交易开始 TXN={txn:06d} 类型={kind}",
        f"{who} 客户身份识别 姓名={customer} 证件类型=居民身份证 "
        f"证件号={make_id_number(rng, bool(male))}",
        f"{who} 联网核查 公民身份信息 结果=一致 照片比对=通过",
        f"{who} 读卡 卡号={make_card_number(rng)} 介质=IC芯片",
    ]
    if kind == "大额转账":
        lines += [
            f"{who} 收款人 户名=上海某某贸易有限公司 卡号={make_card_number(rng)}",
            f"{who} 金额 CNY {amount:,.2f} 用途=货款",
            f"{who} 风险提示 已告知防范电信网络诈骗 客户确认=是",
        ]
    else:
        lines += [
            f"{who} 风险评估 等级={rng.choice(RISK_LEVELS)} 有效期内",
            f"{who} 产品 代码={code} 名称={name} 风险等级={risk}",
            f"{who} 金额 CNY {amount:,.2f}",
            f"{who} 风险揭示 已宣读 产品说明书已交付 客户确认=是",
            f"{who} 冷静期告知 已告知 客户确认=是",
        ]
    lines += [
        f"{who} 客户签名 电子签名板 完成",
        f"{who} 交易结束 TXN={txn:06d} 结果=成功",
    ]
    return lines


def plan(rng: random.Random, duration_ns: int, transactions: int, garbage: bool) -> list[Planned]:
    """The whole script, sorted by offset: header, transactions with idle gaps, garbage."""
    teller, teller_name = rng.choice(TELLERS)
    out = [
        Planned(0, "[系统] 柜面业务系统 V3.2.1 终端号=TRM-0107 网点=0321 串口日志开启"),
        Planned(1, f"[系统] 柜员签到 工号={teller} 姓名={teller_name}"),
    ]
    slot = duration_ns // max(transactions, 1)
    txn = rng.randrange(100, 900)
    for i in range(transactions):
        # Work during ~70% of each slot, idle (customer thinking, paperwork) for the rest; the
        # last line is well before the end so a session can close inside the run.
        begin = i * slot + slot // 10
        lines = transaction(rng, txn + i, teller)
        weights = [rng.uniform(0.5, 1.5) for _ in lines]
        scale = (slot * 7 // 10) / sum(weights)
        at = float(begin)
        for body, w in zip(lines, weights, strict=True):
            out.append(Planned(int(at), body))
            at += w * scale
    if garbage:
        at = rng.expovariate(GARBAGE_PER_MINUTE / 60.0)
        while at * 1e9 < duration_ns:
            out.append(Planned(int(at * 1e9), None, rng.choice(GARBAGE)))
            at += rng.expovariate(GARBAGE_PER_MINUTE / 60.0)
    out.sort(key=lambda p: p.offset_ns)
    return out


def stamp_line(body: str) -> bytes:
    """A log line as the terminal prints it: local wall time (decorative), body, CRLF."""
    now = dt.datetime.now()
    return f"{now:%Y-%m-%d %H:%M:%S}.{now.microsecond // 1000:03d} {body}{LINE_END}".encode(
        ENCODING
    )


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


class Pty:
    """The master side of a raw pseudo-terminal, written without ever blocking for long.

    The terminal holds no slave descriptor itself, so the master reports POLLHUP exactly when
    no reader has the line open; what is written then is dropped, as on a real serial line
    with nothing plugged in (and pyserial discards pending input when it opens a port anyway).
    """

    def __init__(self, baud: int) -> None:
        self.master, slave = os.openpty()
        try:
            # Raw: no echo back into the master, no CR/LF translation, bytes pass untouched.
            # The settings stay with the pty while the master is open, across reader reopens.
            tty.setraw(slave, termios.TCSANOW)
            attrs = termios.tcgetattr(slave)
            speed = getattr(termios, f"B{baud}", None)
            if speed is not None:  # a pty has no baud rate, but tools that look should see ours
                attrs[4] = attrs[5] = speed
                termios.tcsetattr(slave, termios.TCSANOW, attrs)
            self.slave_name = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLHUP)
        self.dropped = 0  # lines lost: a reader was attached but did not read in time
        self.unheard = 0  # lines written while no reader was attached

    def reader_attached(self) -> bool:
        return not any(ev & select.POLLHUP for _, ev in self._poll.poll(0))

    def wait_reader(self, timeout_s: float) -> bool:
        """Wait until a reader opens the slave; False if none came within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self.reader_attached():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def write(self, data: bytes) -> None:
        """Write data whole, waiting at most WRITE_TIMEOUT_S for room; else drop the rest."""
        if not self.reader_attached():
            self.unheard += 1
            return
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                self.dropped += 1
                return
            select.select([], [self.master], [], min(left, 0.1))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)


def replace_link(link: str, target: str) -> None:
    """Point link at target atomically, replacing whatever was there."""
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def sleep_until(t_ns: int) -> None:
    """Sleep until CLOCK_MONOTONIC reaches t_ns, spinning the last millisecond for precision."""
    while True:
        left = t_ns - time.monotonic_ns()
        if left <= 0:
            return
        if left > _SPIN_NS:
            # Short naps keep SIGTERM handling prompt during long idle gaps.
            time.sleep(min(left - _SPIN_NS, 100_000_000) / 1e9)


def run(
    link: str,
    duration_s: float,
    clap_period_ms: int,
    seed: int | None,
    baud: int,
    garbage: bool,
    transactions: int,
    wait_reader_s: float = 10.0,
    hold: bool = False,
) -> int:
    """Run the terminal; return the process exit status."""
    rng = random.Random(seed)
    try:
        pty = Pty(baud)
    except Stopped:
        return 0
    try:
        replace_link(link, pty.slave_name)
        print(f"READY {pty.slave_name}", flush=True)
        # The teller's session begins once the box listens, so a run's first transaction is
        # not lost to start-up order; with no reader after wait_reader_s it begins anyway.
        if wait_reader_s > 0 and pty.wait_reader(wait_reader_s):
            time.sleep(READER_SETTLE_S)
        start = time.monotonic_ns()
        end = start + int(duration_s * 1e9)
        script = plan(rng, end - start, transactions, garbage)
        period_ns = clap_period_ms * 1_000_000
        clap = next_clap(start, period_ns)
        mark_n = 0
        line_free_ns = start  # a real serial line carries baud/10 bytes per second
        i = 0
        while True:
            due_script = start + script[i].offset_ns if i < len(script) else None
            due_script = max(due_script, line_free_ns) if due_script is not None else None
            if due_script is not None and due_script < clap:
                if due_script >= end:
                    break
                sleep_until(due_script)
                item = script[i]
                i += 1
                data = stamp_line(item.body) if item.body is not None else item.garbage + b"\r\n"
                pty.write(data)
                if baud > 0:
                    line_free_ns = time.monotonic_ns() + len(data) * 10 * 1_000_000_000 // baud
                continue
            if clap >= end:
                break
            mark_n += 1
            # Built before the instant, sent in one os.write: the first byte leaves at the clap.
            mark = f"MARK {mark_n} t={clap}{LINE_END}".encode(ENCODING)
            sleep_until(clap)
            pty.write(mark)
            clap += period_ns
        sleep_until(end)
        print("DONE", flush=True)
        while hold:  # idle, the line stays open and the clapper goes on until told to stop
            mark_n += 1
            mark = f"MARK {mark_n} t={clap}{LINE_END}".encode(ENCODING)
            sleep_until(clap)
            pty.write(mark)
            clap += period_ns
    except Stopped:
        pass
    finally:
        _state.cleaning = True  # a second signal must not cut the cleanup short
        if pty.dropped or pty.unheard:
            print(
                f"lines lost: {pty.dropped} not read in time, {pty.unheard} with no reader",
                file=sys.stderr,
            )
        pty.close()
        with contextlib.suppress(OSError):
            if os.readlink(link) == pty.slave_name:
                os.unlink(link)
    return 0


class _State:
    cleaning = False


_state = _State()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Raising unwinds whatever sleep or write is in progress, so the stop is immediate.
    if not _state.cleaning:
        raise Stopped


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualrec.sim.terminal", description=__doc__)
    ap.add_argument("--link", required=True, help="symlink to create, pointing at the pty slave")
    ap.add_argument("--duration-s", type=float, required=True)
    ap.add_argument("--clap-period-ms", type=int, required=True)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--baud", type=int, default=115200, help="pace lines as this line would")
    ap.add_argument("--garbage", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--transactions", type=int, default=3)
    ap.add_argument(
        "--wait-reader-s",
        type=float,
        default=10.0,
        help="hold the script until a reader opens the link, at most this long (0: don't)",
    )
    ap.add_argument("--hold", action="store_true",
                    help="after the script, print DONE and keep the line open until SIGTERM")
    args = ap.parse_args(argv)
    if args.clap_period_ms <= 0 or args.duration_s < 0 or args.transactions < 0:
        ap.error("clap period must be positive, duration and transactions not negative")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return run(
        args.link,
        args.duration_s,
        args.clap_period_ms,
        args.seed,
        args.baud,
        args.garbage,
        args.transactions,
        args.wait_reader_s,
        args.hold,
    )


if __name__ == "__main__":
    sys.exit(main())
