"""`dualrec diag` on the simulated counter: real checks of the sim devices, a real receiver."""

from __future__ import annotations

import os
import tty

from click.testing import CliRunner

from dualrec.cli import main
from helpers import small_board, write_site


def test_diag_passes_on_the_sim_board_and_names_what_fails(tmp_path, key_files):
    """Tried: diag with every sim device present, then with the serial port missing and a
    receiver URL where nothing listens. Asserted: all PASS at first; then FAIL lines that name
    the port and the receiver, and a non-zero exit."""
    master, slave = os.openpty()
    tty.setraw(slave)
    board = small_board(tmp_path)
    site = write_site(tmp_path / "site.toml", key_files, port=os.ttyname(slave))
    os.write(master, b"hello\r\nworld\r\n")
    ok = CliRunner().invoke(main, ["diag", "--board", str(board), "--site", str(site)])
    assert ok.exit_code == 0, ok.output
    for name in ("camera", "microphone", "oplog", "clock", "disk", "receiver"):
        assert f"PASS  {name}" in ok.output
    assert "6 passed, 0 failed" in ok.output
    os.close(master)
    os.close(slave)

    missing = tmp_path / "no-such-tty"
    bad = write_site(tmp_path / "bad.toml", key_files, port=str(missing), extra=f"""
[uplink]
url = "https://127.0.0.1:9"
ca = "{key_files['device_pub']}"
cert = "{key_files['device_pub']}"
key = "{key_files['device_key']}"
receipt_key = "{key_files['device_pub']}"
""")
    out = CliRunner().invoke(main, ["diag", "--board", str(board), "--site", str(bad)])
    assert out.exit_code == 1
    assert "FAIL  oplog" in out.output and str(missing) in out.output
    assert "FAIL  receiver" in out.output and "127.0.0.1:9" in out.output
