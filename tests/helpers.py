"""Helpers shared by test modules (fixtures live in conftest.py): paths, a site config writer,
a small sim board, a bounded wait."""

from __future__ import annotations

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
