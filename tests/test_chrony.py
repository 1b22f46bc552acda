"""Every board's chrony fragment (`dualrec chrony-conf`) started for real by Debian's chronyd.

Each fragment runs in a private chronyd (foreground, -x: never touches the clock; its own pid
file, command socket and drift file in a temporary directory) with one loopback NTP source: a
second chronyd on 127.0.0.1 serving `local stratum 8` on a free port. Passing means chronyd is
still running once it has reached that source (chronyc on the private socket shows it with a
non-zero reach register), and its log has no fatal error.

Limit: this machine has no PPS device. For a board whose profile declares one ([clock] pps),
the generated text is checked to hold the PPS refclock, and chronyd is run with that one line
stripped; a separate test shows that, unstripped and with the device absent, chronyd exits
"Could not open" (the fault this generator removes from the boards without a PPS line).
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrec.chronyconf import render
from dualrec.cli import main
from dualrec.config import load_board
from helpers import ROOT

BOARDS = sorted((ROOT / "boards").glob("*.toml"))
CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
CHRONYC = shutil.which("chronyc") or "/usr/bin/chronyc"
REACH_TIMEOUT_S = 60  # a bound for a busy machine; iburst needs a few seconds


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chronyd(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    assert os.access(CHRONYD, os.X_OK), "chronyd missing: run make setup (scripts/setup-system.sh)"
    user = pwd.getpwuid(os.getuid()).pw_name  # no privilege drop to Debian's _chrony user
    with log.open("wb") as out:
        return subprocess.Popen([CHRONYD, "-d", "-x", "-u", user, "-f", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # short: a unix socket path must fit in 108 bytes; 0700: chronyd checks its socket dir
    d = Path(tempfile.mkdtemp(prefix="dualrec-chrony-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ntp_server() -> Iterator[int]:
    """A loopback NTP server: chronyd serving its own clock at stratum 8. Yields its port."""
    d = Path(tempfile.mkdtemp(prefix="dualrec-ntpd-"))
    port = _free_udp_port()
    conf = d / "server.conf"
    conf.write_text(f"local stratum 8\nallow 127.0.0.1\nbindaddress 127.0.0.1\nport {port}\n"
                    f"cmdport 0\nbindcmdaddress {d}/server.sock\npidfile {d}/server.pid\n")
    proc = _chronyd(conf, d / "server.log")
    try:
        yield port
        assert proc.poll() is None, (d / "server.log").read_text()
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def _client_conf(fragment: str, d: Path, port: int) -> Path:
    conf = d / "client.conf"
    conf.write_text(fragment + f"""
# --- test harness: a loopback source and private paths ---
server 127.0.0.1 port {port} iburst minpoll -2 maxpoll 0
port 0
cmdport 0
bindcmdaddress {d}/client.sock
pidfile {d}/client.pid
driftfile {d}/client.drift
""")
    return conf


def _loopback_reach(sock: Path) -> int | None:
    """The reach register of the 127.0.0.1 source as chronyc shows it, or None if absent."""
    done = subprocess.run([CHRONYC, "-c", "-n", "-h", str(sock), "sources"],
                          capture_output=True, text=True, timeout=20)
    for line in done.stdout.splitlines():
        fields = line.split(",")
        if len(fields) > 5 and fields[2] == "127.0.0.1":
            return int(fields[5], 8)
    return None


def _strip_pps(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("refclock PPS"))


@pytest.mark.parametrize("board_path", BOARDS, ids=[b.stem for b in BOARDS])
def test_board_fragment_runs_in_chronyd(board_path: Path, workdir: Path, ntp_server: int) -> None:
    """The board's fragment (PPS line stripped where the profile declares one: see the module
    docstring) plus a loopback server: chronyd reaches the server, is still running, and
    logged no fatal error."""
    board = load_board(board_path)
    fragment = render(board)
    has_pps = "refclock PPS" in fragment
    assert has_pps == bool(board.clock.pps)
    if has_pps:
        assert f"\nrefclock PPS {board.clock.pps} refid PPS prefer\n" in fragment
        fragment = _strip_pps(fragment)
    _assert_runs_and_reaches(fragment, workdir, ntp_server)


def _assert_runs_and_reaches(fragment: str, workdir: Path, port: int) -> None:
    proc = _chronyd(_client_conf(fragment, workdir, port), workdir / "client.log")
    try:
        reach = None
        deadline = time.monotonic() + REACH_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            reach = _loopback_reach(workdir / "client.sock")
            if reach:
                break
            time.sleep(0.5)
        log = (workdir / "client.log").read_text()
        assert proc.poll() is None, f"chronyd exited {proc.returncode}:\n{log}"
        assert reach, f"loopback source not reached (reach {reach}):\n{log}"
        assert "Fatal error" not in log and "Could not open" not in log, log
    finally:
        _stop(proc)


def test_pps_without_the_device_stops_chronyd(workdir: Path, ntp_server: int) -> None:
    """The fault the generator removes, shown on this machine: a PPS refclock whose device is
    absent makes chronyd exit at start. (With the device present, it must run instead.)"""
    board = load_board(ROOT / "boards" / "rpi4b.toml")
    pps = Path(board.clock.pps)
    if pps.exists():  # a machine with a PPS device: the whole fragment must simply run
        _assert_runs_and_reaches(render(board), workdir, ntp_server)
        return
    proc = _chronyd(_client_conf(render(board), workdir, ntp_server), workdir / "client.log")
    try:
        assert proc.wait(30) != 0
    finally:
        _stop(proc)
    assert f"Could not open {pps}" in (workdir / "client.log").read_text()


@pytest.mark.parametrize("board_path", BOARDS, ids=[b.stem for b in BOARDS])
def test_cli_prints_the_fragment(board_path: Path) -> None:
    done = CliRunner().invoke(main, ["chrony-conf", "--board", str(board_path),
                                     "--server", "10.1.2.3"])
    assert done.exit_code == 0, done.output
    board = load_board(board_path)
    assert done.stdout == render(board, "10.1.2.3")
    assert "\nserver 10.1.2.3 iburst minpoll 4 maxpoll 8\n" in done.stdout
    assert ("refclock PPS" in done.stdout) == bool(board.clock.pps)
    assert ("\nrtcsync\n" in done.stdout) == (board.clock.source == "rtc")


def test_pps_follows_the_profile(tmp_path: Path) -> None:
    """Declaring a PPS line in a profile is what adds the refclock, with the declared device."""
    text = (ROOT / "boards" / "sim.toml").read_text().replace(
        'source = "system"', 'source = "system"\npps = "/dev/pps1"\npps_gpio = 4')
    board = tmp_path / "board.toml"
    board.write_text(text)
    assert "\nrefclock PPS /dev/pps1 refid PPS prefer\n" in render(load_board(board))
    sim = render(load_board(ROOT / "boards" / "sim.toml")).splitlines()
    assert not [line for line in sim if line.startswith("refclock")]


def test_bad_server_name_is_refused() -> None:
    done = CliRunner().invoke(main, ["chrony-conf", "--board", str(BOARDS[0]),
                                     "--server", "x iburst\nrefclock"])
    assert done.exit_code == 78 and "not a host name or address" in done.stderr
