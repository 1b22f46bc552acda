"""Helpers shared by test modules (fixtures live in conftest.py): paths, a site config writer,
a small sim board, a bounded wait, a filler for a full disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_site(path: Path, key_files: dict[str, Path], *, port: str = "loop://",
               spool: Path | None = None, extra: str = "") -> Path:
    spool = spool or path.parent / "spool"
    path.write_text(f"""
[device]
id = "test-0001"
key = "{key_files['device_key']}"

[oplog]
port = "{port}"

[seal]
recipients = ["{key_files['recipient']}"]

[spool]
dir = "{spool}"
state = "{path.parent / 'state' / 'state.db'}"
{extra}
""")
    return path


def small_board(tmp_path: Path, clap_ms: int = 2000) -> Path:
    text = (ROOT / "boards" / "sim.toml").read_text()
    text = text.replace("width = 640", "width = 320").replace("height = 360", "height = 180")
    text = text.replace("clap_period_ms = 7000", f"clap_period_ms = {clap_ms}")
    board = tmp_path / "board.toml"
    board.write_text(text)
    return board


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def fill(directory: Path) -> Path:
    """A filler file that takes every free block (what the box sees with a full card)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler
