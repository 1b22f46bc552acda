"""`dualrec diag`'s operation-log check on a real pseudo-terminal: it passes when a start or
stop line is read, and fails, saying which, when most lines do not decode or when lines came
but none matched a start or stop pattern (the terminal would record no session at all)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from dualrec.config import load_board, load_site
from dualrec.diag import check_oplog
from helpers import small_board, write_site

LOG = ["2026-11-28 10:01:02 [柜员T0012] 交易开始 TXN=000123 类型=理财购买",
       "2026-11-28 10:01:09 风险揭示 已阅读 客户确认 签名",
       "2026-11-28 10:02:30 交易结束 TXN=000123 业务完成"]
BIG5_LOG = ["2026-11-28 10:01:02 [櫃員T0012] 交易開始 TXN=000123",
            "2026-11-28 10:02:30 交易結束 TXN=000123"]


@pytest.fixture
def tty_pair() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def run_check(tmp_path: Path, key_files: dict[str, Path], port: str, encoding: str | None,
              data: bytes, master: int, seconds: float = 3):
    site_path = write_site(tmp_path / "site.toml", key_files, port=port)
    if encoding is not None:
        text = site_path.read_text().replace(f'port = "{port}"',
                                             f'port = "{port}"\nencoding = "{encoding}"')
        site_path.write_text(text)
    board, site = load_board(small_board(tmp_path)), load_site(site_path)
    # The terminal keeps logging: opening the port discards what was sent before.
    stop = threading.Event()
    os.set_blocking(master, False)

    def terminal() -> None:
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                os.write(master, data)
            if stop.wait(0.2):
                return

    writer = threading.Thread(target=terminal, daemon=True)
    if data:
        writer.start()
    try:
        return check_oplog(board, site, seconds)
    finally:
        stop.set()
        if data:
            writer.join(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sent, encoding", [("gb18030", None), ("utf-8", None),
                                            ("gb18030", "gb18030")])
def test_passes_when_a_start_line_is_read(tmp_path, key_files, tty_pair, sent, encoding):
    master, port = tty_pair
    data = b"".join(t.encode(sent) + b"\r\n" for t in LOG)
    check = run_check(tmp_path, key_files, port, encoding, data, master)
    assert check.ok, check.detail
    assert "start or stop line" in check.detail


@pytest.mark.timeout(30)
def test_fails_when_most_lines_do_not_decode(tmp_path, key_files, tty_pair):
    """A GB18030 terminal with `encoding = "utf-8"` configured."""
    master, port = tty_pair
    data = b"".join(t.encode("gb18030") + b"\r\n" for t in LOG)
    check = run_check(tmp_path, key_files, port, "utf-8", data, master)
    assert not check.ok
    assert re.search(r"(\d+) of \1 lines with non-ASCII bytes do not decode as utf-8",
                     check.detail), check.detail
    assert "wrong encoding?" in check.detail


@pytest.mark.timeout(30)
def test_fails_when_no_line_matches_a_pattern_and_does_not_show_the_lines(
        tmp_path, key_files, tty_pair):
    """A Big5 terminal left on auto: every line reads (as GB18030, wrongly), no flag, and no
    line matches 交易开始 or 交易结束."""
    master, port = tty_pair
    data = b"".join(t.encode("big5") + b"\r\n" for t in BIG5_LOG)
    check = run_check(tmp_path, key_files, port, None, data, master, seconds=2)
    assert not check.ok
    assert re.search(r"[1-9]\d* lines \(0 flagged\)", check.detail), check.detail
    assert "none matches a start or stop pattern read as auto" in check.detail
    assert "TXN" not in check.detail  # a log line may hold a customer's numbers


@pytest.mark.timeout(30)
def test_an_idle_terminal_passes_with_a_hint(tmp_path, key_files, tty_pair):
    master, port = tty_pair
    check = run_check(tmp_path, key_files, port, None, b"", master, seconds=1)
    assert check.ok and "no lines" in check.detail and "run a transaction" in check.detail
