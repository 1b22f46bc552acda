"""`dualrec-tool tap`: put the serial tap's firmware on a Pico, check it, watch what it sends.

- ``flash``: copies the firmware of this checkout (firmware/tap/main.py, the dualrec_tap package
  and tapframe.py, the list taken from firmware/tap/package.json), installs its micropython-lib
  dependencies with ``mpremote mip install`` (usb-device-cdc), writes /tap.json from the board
  profile's [tap] table, then reads everything back: the SHA-256 of every file computed on the
  device with hashlib, and the firmware version the device actually imports. It prints a table and
  exits non-zero on any difference.
- ``verify``: only the read-back (is the tap running what this checkout holds?).
- ``fetch-deps``: copies the dependencies from the mip index (micropython.org) into a directory,
  where there is network, for ``flash --deps-from DIR`` where there is none.
- ``monitor``: a live, decoded view of the tap's data port: one line per frame, gaps in seq, link
  errors, a summary at the end.

How the Pico is driven, and why:

- mpremote's ``SerialTransport`` as a library for the REPL link (exec/eval over the raw REPL, its
  ``fs_writefile``): one connection, exceptions rather than text to parse. ``mip install`` runs as
  ``python -m mpremote ... mip install``: the command line is mpremote's only public interface to
  mip (the functions behind it are private).
- Never a soft reset (mpremote's default on its first raw-REPL entry; here as ``resume``): on a
  Pico whose tap is running, a soft reset drops the runtime USB interfaces and the whole USB device
  re-enumerates under the tool; on the MicroPython unix port a soft reset ends the process. The
  running tap is stopped with Ctrl-C instead (its main() turns off the watchdog when interrupted).
- Paths: on a Pico everything goes under "/" (main.py, /lib, /tap.json). Elsewhere (the unix port
  of MicroPython, used to test this tool) the device's current directory stands for "/", so a test
  never writes into the host's root.
- Every file is written as NAME.part and renamed over NAME, and main.py goes last: an interrupted
  flash leaves whole files, and the previous main.py until the new one is complete.
- Dependencies are installed as .py sources (``--no-mpy``): they load on any MicroPython version,
  and the local copy needs only one variant. A local copy (``--deps-from``) is served to mip on
  127.0.0.1 for the length of the install: an http:// index works with every mpremote version.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

from dualrec import tapframe
from dualrec.config import ConfigError, TapProfile, load_board

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = ROOT / "firmware" / "tap"
DEFAULT_INDEX = "https://micropython.org/pi/v2"
PICO_USB = "usb:2e8a:0005"  # MicroPython's VID:PID on a Pico (RPI_PICO, RPI_PICO2)
MIP_TIMEOUT_S = 600
SERIAL_TIMEOUT_S = 5.0
_U32 = 0xFFFFFFFF
_EEXIST = 17  # MicroPython's errno for "exists", on every port


class TapToolError(click.ClickException):
    """A step failed; the message says which and what to do."""


# --- the firmware of this checkout -------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareFile:
    local: Path
    device: str  # relative to the device's root: "main.py", "lib/dualrec_tap/app.py", ...


@dataclass(frozen=True)
class Firmware:
    files: tuple[FirmwareFile, ...]  # in the order they are written: main.py last
    deps: tuple[tuple[str, str], ...]  # (micropython-lib package, version)
    version: str  # app.NAME_VERSION, e.g. "dualrec-tap/0.1.0"


def load_firmware(fw_dir: Path = FIRMWARE_DIR) -> Firmware:
    """The files, dependencies and version of the tap firmware in fw_dir (firmware/tap).

    package.json is the one list of what goes into /lib (mip reads the same file); main.py is
    the entry point at the root.
    """
    try:
        pkg = json.loads((fw_dir / "package.json").read_text())
    except (OSError, ValueError) as exc:
        raise TapToolError(f"cannot read {fw_dir / 'package.json'}: {exc} (the tool runs from "
                           "a checkout: install it with pip install -e)") from None
    files = [FirmwareFile((fw_dir / url).resolve(), f"lib/{target}")
             for target, url in pkg.get("urls", ())]
    files.append(FirmwareFile(fw_dir / "main.py", "main.py"))
    missing = [str(f.local) for f in files if not f.local.is_file()]
    if missing:
        raise TapToolError(f"firmware files missing: {', '.join(missing)}")
    deps = tuple((str(name), str(version)) for name, version in pkg.get("deps", ()))
    return Firmware(tuple(files), deps, firmware_version(fw_dir / "dualrec_tap" / "app.py"))


def firmware_version(app_py: Path) -> str:
    """NAME_VERSION as written in app.py (read, not imported: it is MicroPython code)."""
    tree = ast.parse(app_py.read_text(), str(app_py))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "NAME_VERSION"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise TapToolError(f"{app_py}: no NAME_VERSION = '...' found")


def tap_profile(board_path: Path | None) -> TapProfile:
    """The [tap] table of a board profile, or the defaults without one."""
    if board_path is None:
        return TapProfile()
    try:
        board = load_board(board_path)
    except ConfigError as exc:
        raise TapToolError(str(exc)) from None
    if board.tap is None:
        raise TapToolError(f"{board_path}: no [tap] section (the board does not use the tap)")
    return board.tap


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the mip index (micropython.org/pi/v2 layout) ----------------------------------------------


@dataclass(frozen=True)
class IndexFile:
    package: str
    path: str  # relative to the install target: "usb/device/cdc.py"
    short_hash: str  # the first hex digits of its SHA-256; also its name in the index


def _is_url(index: str) -> bool:
    return urllib.parse.urlparse(index).scheme in ("http", "https")


def _index_get(index: str, rel: str) -> bytes:
    if _is_url(index):
        url = f"{index.rstrip('/')}/{rel}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return bytes(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            raise TapToolError(f"cannot fetch {url}: {exc}") from None
    path = Path(index) / rel
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TapToolError(f"{path}: {exc.strerror} (is {index} a copy made by "
                           "`dualrec-tool tap fetch-deps`?)") from None


def package_json_path(name: str, version: str) -> str:
    # Sources ("py"), not .mpy: see the module docstring.
    return f"package/py/{name}/{version}.json"


def index_files(index: str, deps: Iterable[tuple[str, str]],
                on_json: Callable[[str, bytes], None] | None = None) -> list[IndexFile]:
    """Every file the dependencies install (following their own deps), from an index.

    ``on_json(rel_path, raw)`` sees each package JSON read (fetch-deps keeps them).
    """
    out: list[IndexFile] = []
    seen: set[tuple[str, str]] = set()
    todo = list(deps)
    while todo:
        name, version = todo.pop(0)
        if (name, version) in seen:
            continue
        seen.add((name, version))
        rel = package_json_path(name, version)
        raw = _index_get(index, rel)
        try:
            pkg = json.loads(raw)
        except ValueError as exc:
            raise TapToolError(f"{index}/{rel}: not JSON: {exc}") from None
        if pkg.get("urls"):
            # micropython-lib packages have none; files fetched from elsewhere could not be
            # checked against the index, so they are refused rather than trusted.
            raise TapToolError(f"{name}: its package names URLs ({pkg['urls'][0][1]}, ...): "
                               "only index files are supported")
        if on_json is not None:
            on_json(rel, raw)
        out.extend(IndexFile(name, str(p), str(h)) for p, h in pkg.get("hashes", ()))
        todo.extend((str(n), str(v)) for n, v in pkg.get("deps", ()))
    return out


def index_file_path(short_hash: str) -> str:
    return f"file/{short_hash[:2]}/{short_hash}"


def fetch_deps(dest: Path, deps: Sequence[tuple[str, str]], index: str = DEFAULT_INDEX,
               echo: Callable[[str], None] = click.echo) -> list[IndexFile]:
    """Copy what ``mip install --no-mpy`` of deps would download from index into dest."""
    dest.mkdir(parents=True, exist_ok=True)

    def keep_json(rel: str, raw: bytes) -> None:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
        echo(f"  {rel}")

    files = index_files(index, deps, keep_json)
    for f in files:
        rel = index_file_path(f.short_hash)
        data = _index_get(index, rel)
        if not sha256_hex(data).startswith(f.short_hash):
            raise TapToolError(f"{index}/{rel} ({f.path} of {f.package}): its SHA-256 is "
                               f"{sha256_hex(data)[:16]}..., not {f.short_hash}...")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        echo(f"  {rel}  {f.package}: {f.path}")
    return files


# --- the device ---------------------------------------------------------------------------------


class Transport(Protocol):
    """What this tool uses of mpremote's transport (mpremote.transport_serial.SerialTransport)."""

    def enter_raw_repl(self, soft_reset: bool = True) -> None: ...
    def exit_raw_repl(self) -> None: ...
    def exec(self, command: str) -> bytes: ...
    def exec_raw_no_follow(self, command: str) -> None: ...
    def fs_writefile(self, dest: str, data: bytes) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceInfo:
    platform: str  # sys.platform: "rp2" on a Pico, "linux" for the unix port
    implementation: str
    version: str
    mpy: int
    cwd: str
    path: tuple[str, ...]
    has_sha256: bool
    machine: str

    @property
    def root(self) -> str:
        """Where "/" of the Pico's layout is: see the module docstring."""
        return "/" if self.platform == "rp2" else self.cwd


_INFO = """\
import sys, os
try:
    import hashlib
    _s = hasattr(hashlib, 'sha256')
except ImportError:
    _s = False
try:
    _m = os.uname().machine
except Exception:
    _m = ''
print(repr((sys.platform, sys.implementation.name,
            '.'.join([str(v) for v in sys.implementation.version[:3]]),
            getattr(sys.implementation, '_mpy', 0) & 0xff, os.getcwd(), list(sys.path), _s, _m)))
"""

_MKDIRS = """\
import os
for _d in {dirs!r}:
    try:
        os.mkdir(_d)
    except OSError as _e:
        if _e.args[0] != {eexist}:
            raise
"""

_RENAME = "import os\nos.rename({src!r}, {dst!r})\n"
# Missing files are fine: this only makes sure they are gone.
_REMOVE = """\
import os
for p in {paths!r}:
    try:
        os.remove(p)
    except OSError:
        pass
"""

# A missing file hashes to None; 512-byte reads keep the Pico's heap use small.
_HASHES = """\
import hashlib, binascii
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(512)
    m = memoryview(b)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(m[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
print(repr([_h(p) for p in {paths!r}]))
"""

# The version the device really runs: the modules as imported now (a running tap's are cached,
# so they are dropped first), from its own sys.path (a frozen copy would come before /lib).
_VERSION = """\
import sys
_p = list(sys.path)
for _n in ('dualrec_tap.app', 'dualrec_tap.port', 'dualrec_tap', 'tapframe'):
    if _n in sys.modules:
        del sys.modules[_n]
if {lib!r} not in sys.path:
    sys.path.append({lib!r})
try:
    from dualrec_tap import app as _a
    print(repr(('ok', _a.NAME_VERSION)))
except Exception as _e:
    print(repr(('error', repr(_e))))
sys.path.clear()
sys.path.extend(_p)
"""


def _error_text(exc: Exception) -> str:
    """The device's own error (its traceback's last line) from a failed exec, else the error."""
    out = getattr(exc, "error_output", None)  # mpremote >= 1.24: TransportExecError
    if out is None and len(exc.args) == 3 and exc.args[0] == "exception":
        out = exc.args[2]  # older mpremote: TransportError("exception", stdout, stderr)
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    lines = str(out or "").strip().splitlines()
    return lines[-1] if lines else str(exc)


def _literal(out: bytes) -> Any:
    try:
        return ast.literal_eval(out.decode().strip())
    except (ValueError, SyntaxError, UnicodeDecodeError) as exc:
        raise TapToolError(f"unexpected answer from the device: {out[:200]!r}") from exc


class Device:
    """A MicroPython board at its REPL, in raw-REPL mode for as long as this object is open."""

    def __init__(self, transport: Transport, name: str) -> None:
        self.t = transport
        self.name = name
        self._info: DeviceInfo | None = None

    @classmethod
    def connect(cls, port: str) -> Device:
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        try:
            transport = SerialTransport(port, baudrate=115200)
        except TransportError as exc:
            raise TapToolError(f"{port}: {exc} (in use by another program?)") from None
        # mpremote reads a pseudo-terminal (a board behind QEMU, the unix port) with blocking
        # reads and no timeout: a silent device would hang the tool for ever. With one, its
        # own per-character timeouts apply, as they do on a USB port.
        transport.serial.timeout = SERIAL_TIMEOUT_S
        return cls(transport, port)

    def open(self) -> bool:
        """Stop whatever runs (Ctrl-C) and enter the raw REPL; True if a program was stopped."""
        from mpremote.transport import TransportError

        interrupted = self._interrupt()
        for attempt in (1, 2):
            try:
                # No soft reset: see the module docstring.
                self.t.enter_raw_repl(soft_reset=False)
                return interrupted
            except TransportError as exc:
                if attempt == 2:
                    raise TapToolError(f"{self.name}: no MicroPython REPL answers ({exc}); is "
                                       "this the Pico's REPL port (interface 0)?") from None
                time.sleep(0.5)  # a program that took long to stop: try once more
        return interrupted

    def _interrupt(self) -> bool:
        """Ctrl-C twice, and what the REPL said: a traceback means a program was running."""
        ser = getattr(self.t, "serial", None)
        if ser is None:
            return False
        ser.write(b"\r\x03")
        time.sleep(0.1)
        ser.write(b"\x03")
        seen = b""
        quiet_until = time.monotonic() + 0.3
        deadline = time.monotonic() + 2.0
        while time.monotonic() < min(quiet_until, deadline):
            waiting = ser.in_waiting
            if waiting:
                seen += ser.read(waiting)
                quiet_until = time.monotonic() + 0.3
            else:
                time.sleep(0.02)
        return b"KeyboardInterrupt" in seen

    def close(self) -> None:
        from mpremote.transport import TransportError

        with contextlib.suppress(TransportError, OSError):  # the port is gone (a reset)
            self.t.exit_raw_repl()
        self.t.close()

    def exec(self, code: str) -> bytes:
        # TransportError covers both a traceback on the device and a lost link (and is the
        # base of TransportExecError where that exists): the text tells which.
        from mpremote.transport import TransportError

        try:
            return self.t.exec(code)
        except TransportError as exc:
            raise TapToolError(f"{self.name}: {_error_text(exc)}") from None

    def info(self) -> DeviceInfo:
        if self._info is None:
            got = _literal(self.exec(_INFO))
            self._info = DeviceInfo(str(got[0]), str(got[1]), str(got[2]), int(got[3]),
                                    str(got[4]), tuple(got[5]), bool(got[6]), str(got[7]))
        return self._info

    def path(self, rel: str) -> str:
        root = self.info().root.rstrip("/")
        return f"{root}/{rel}"

    def makedirs(self, rels: Iterable[str]) -> None:
        dirs: list[str] = []
        for rel in rels:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = self.path("/".join(parts[:i]))
                if d not in dirs:
                    dirs.append(d)
        if dirs:
            self.exec(_MKDIRS.format(dirs=dirs, eexist=_EEXIST))

    def write(self, rel: str, data: bytes) -> None:
        from mpremote.transport import TransportError

        dest = self.path(rel)
        try:
            self.t.fs_writefile(dest + ".part", data)
        except (TransportError, OSError) as exc:
            raise TapToolError(f"writing {dest}: {_error_text(exc)}") from None
        self.exec(_RENAME.format(src=dest + ".part", dst=dest))

    def remove(self, rels: Sequence[str]) -> None:
        if rels:
            self.exec(_REMOVE.format(paths=[self.path(r) for r in rels]))

    def hashes(self, rels: Sequence[str]) -> dict[str, str | None]:
        if not self.info().has_sha256:
            raise TapToolError(f"{self.name}: this MicroPython has no hashlib.sha256: the files "
                               "cannot be checked on the device")
        got = _literal(self.exec(_HASHES.format(paths=[self.path(r) for r in rels])))
        return dict(zip(rels, got, strict=True))

    def firmware_version(self) -> tuple[bool, str]:
        ok, value = _literal(self.exec(_VERSION.format(lib=self.path("lib"))))
        return ok == "ok", str(value)

    def reset(self) -> None:
        """A hard reset (machine.reset): the new main.py starts on a clean USB device."""
        from mpremote.transport import TransportError

        with contextlib.suppress(TransportError, OSError):  # it went away mid-answer: right
            self.t.exec_raw_no_follow("import machine\nmachine.reset()")


def resolve_repl_port(port: str, comports: Callable[[], Iterable[Any]] | None = None) -> str:
    """The REPL port for a path, or for "usb:VID:PID[:SERIAL]" the Pico's interface 0.

    A Pico running the tap shows two CDC interfaces under one VID:PID: MicroPython's REPL (the
    lowest interface number) and the tap's data port (picotap.resolve_port picks the highest).
    """
    if not port.startswith("usb:"):
        return port
    import serial.tools.list_ports

    parts = port[4:].split(":")
    try:
        vid, pid = int(parts[0], 16), int(parts[1], 16)
    except (IndexError, ValueError):
        raise TapToolError(f"port {port!r}: expected usb:VID:PID[:SERIAL] or a path") from None
    want = parts[2] if len(parts) > 2 and parts[2] else None
    found = [p for p in (comports or serial.tools.list_ports.comports)()
             if p.vid == vid and p.pid == pid and (want is None or p.serial_number == want)]
    if not found:
        raise TapToolError(f"no USB serial device {vid:04x}:{pid:04x} is connected (a Pico "
                           "in BOOTSEL mode is a USB drive: put MicroPython on it first)")
    if len({(p.location or "").partition(":")[0] for p in found}) > 1:
        serials = sorted(str(p.serial_number) for p in found)
        raise TapToolError(f"several devices match {port} (serials {serials}): name one as "
                           "usb:VID:PID:SERIAL or give the path")

    def interface(p: Any) -> int:
        try:
            return int((p.location or "").partition(":")[2].rpartition(".")[2])
        except ValueError:
            return 0

    return str(min(found, key=interface).device)


# --- flash and verify ---------------------------------------------------------------------------


@dataclass
class Check:
    path: str
    expected: str  # hex SHA-256 (or a prefix of it, for index files)
    got: str | None

    @property
    def status(self) -> str:
        if self.got is None:
            return "MISSING"
        return "ok" if self.got.startswith(self.expected) else "MISMATCH"


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    version_expected: str = ""
    version_got: str = ""
    version_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.version_ok and all(c.status == "ok" for c in self.checks)

    def lines(self) -> list[str]:
        width = max([len(c.path) for c in self.checks] + [4])
        out = [f"{'FILE':<{width}}  {'EXPECTED':<16}  {'ON DEVICE':<16}  STATUS"]
        for c in self.checks:
            got = "-" if c.got is None else c.got[:16]
            out.append(f"{c.path:<{width}}  {c.expected[:16]:<16}  {got:<16}  {c.status}")
        mark = "ok" if self.version_ok else "MISMATCH"
        out.append(f"firmware version: expected {self.version_expected}, device "
                   f"{self.version_got or '-'}  {mark}")
        bad = sum(c.status != "ok" for c in self.checks) + (not self.version_ok)
        out.append("verified: everything matches" if self.passed
                   else f"verification FAILED: {bad} difference(s)")
        return out


def verify_device(dev: Device, fw: Firmware, config: bytes | None,
                  deps: Sequence[IndexFile] = ()) -> Report:
    """Hash every file on the device and import its firmware version; compare with fw."""
    expected: list[tuple[str, str]] = [(f.device, sha256_hex(f.local.read_bytes()))
                                       for f in fw.files]
    if config is not None:
        expected.append(("tap.json", sha256_hex(config)))
    expected += [(f"lib/{d.path}", d.short_hash) for d in deps]
    got = dev.hashes([rel for rel, _ in expected])
    report = Report([Check(rel, want, got[rel]) for rel, want in expected],
                    version_expected=fw.version)
    ok, value = dev.firmware_version()
    report.version_got = value if ok else f"(import failed: {value})"
    report.version_ok = ok and value == fw.version
    return report


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # mip's own output says what was fetched


@contextlib.contextmanager
def serve_dir(directory: Path) -> Iterator[str]:
    """directory over HTTP on 127.0.0.1, for as long as the block runs; yields its URL.

    How mpremote's mip opens an index named by a path differs by version (1.22 passes every
    location to urllib, so only file:// works there; recent ones open a plain path and refuse
    file://); an http:// URL works on all of them.
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="deps-index", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(1)


def run_mip(port: str, target: str, deps: Sequence[tuple[str, str]], index: str | None,
            echo: Callable[[str], None]) -> None:
    """``mpremote mip install`` of deps into target, without a soft reset (``resume``)."""
    specs = [name if version == "latest" else f"{name}@{version}" for name, version in deps]
    cmd = [sys.executable, "-m", "mpremote", "connect", port, "resume", "mip", "install",
           "--no-mpy", "--target", target]
    if index is not None:
        cmd += ["--index", index]
    cmd += specs
    echo(f"mip: {' '.join(cmd[3:])}")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=MIP_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise TapToolError(f"mpremote mip install took over {MIP_TIMEOUT_S} s") from None
    for line in done.stdout.splitlines():
        echo(f"  {line}")
    if done.returncode != 0:
        hint = "" if index is not None else (
            " (no network to micropython.org? copy the dependencies where there is with "
            "`dualrec-tool tap fetch-deps DIR` and flash with --deps-from DIR)")
        raise TapToolError(f"mpremote mip install failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}{hint}")


def flash(port: str, tap: TapProfile, *, deps_from: Path | None = None, no_deps: bool = False,
          reset: bool = True, fw: Firmware | None = None,
          echo: Callable[[str], None] = click.echo) -> Report:
    """Copy the firmware, install its dependencies, write tap.json, read it all back."""
    fw = fw or load_firmware()
    config = tap_config(tap)
    index = None if deps_from is None else str(deps_from)
    deps: list[IndexFile] = []
    if not no_deps and index is not None:
        deps = index_files(index, fw.deps)  # before touching the device: is the copy usable?

    dev = Device.connect(port)
    try:
        if dev.open():
            echo("stopped the program that was running (the tap) with Ctrl-C")
        info = dev.info()
        echo(f"device: MicroPython {info.version} on {info.platform}"
             f"{f' ({info.machine})' if info.machine else ''}; files under {info.root}")
        if not info.has_sha256:
            raise TapToolError(f"{port}: this MicroPython has no hashlib.sha256: the copy could "
                               "not be checked; use a standard MicroPython build for the Pico")
        lib_files = [f for f in fw.files if f.device != "main.py"]
        dev.makedirs([f.device for f in fw.files])
        for f in [*lib_files, FirmwareFile(Path("tap.json"), "tap.json")]:
            data = config if f.device == "tap.json" else f.local.read_bytes()
            dev.write(f.device, data)
            echo(f"  wrote {dev.path(f.device)} ({len(data)} bytes)")
        # MicroPython imports NAME.py before NAME.mpy: the other form of each file must go.
        dev.remove([other_form(f.device) for f in lib_files if other_form(f.device)])
        target = dev.path("lib")
    finally:
        dev.close()

    if no_deps:
        echo("dependencies: not installed (--no-deps)")
    elif deps_from is not None:
        echo(f"dependencies from {deps_from} (served on loopback for mip)")
        with serve_dir(deps_from) as url:
            run_mip(port, target, fw.deps, url, echo)
    else:
        run_mip(port, target, fw.deps, None, echo)
        deps = index_files(DEFAULT_INDEX, fw.deps)  # mip just reached it: so can we

    dev = Device.connect(port)
    try:
        dev.open()
        # main.py last: until here the previous one (or none) starts at boot.
        main_py = next(f for f in fw.files if f.device == "main.py")
        dev.write(main_py.device, main_py.local.read_bytes())
        echo(f"  wrote {dev.path(main_py.device)}")
        report = verify_device(dev, fw, config, deps)
        if report.passed and reset:
            if dev.info().platform == "rp2":
                dev.reset()
                report.notes.append("reset: the Pico restarts and runs the new firmware")
            else:
                report.notes.append(f"reset: not on {dev.info().platform} (only a Pico is "
                                    "reset); start main.py yourself")
    finally:
        dev.close()
    return report


def other_form(device_path: str) -> str:
    """lib/x.py <-> lib/x.mpy ("" for anything else)."""
    if device_path.endswith(".mpy"):
        return device_path[:-4] + ".py"
    if device_path.endswith(".py"):
        return device_path[:-3] + ".mpy"
    return ""


@contextlib.contextmanager
def firmware_for(mpy: bool) -> Iterator[Firmware]:
    """This checkout's tap firmware, its library compiled to .mpy (mpy-cross) if mpy."""
    fw = load_firmware()
    if not mpy:
        yield fw
        return
    import tempfile

    from dualrec_tools.tap_firmware import compile_firmware

    with tempfile.TemporaryDirectory(prefix="dualrec-tap-mpy-") as tmp:
        yield compile_firmware(fw, Path(tmp))


def tap_config(tap: TapProfile) -> bytes:
    """The /tap.json bytes for a [tap] table (picotap.tap_config_json, checked there)."""
    from dualrec.devices.picotap import tap_config_json

    try:
        return tap_config_json(tap).encode()
    except ValueError as exc:
        raise TapToolError(str(exc)) from None


# --- monitor ------------------------------------------------------------------------------------


_CHANNELS = {tapframe.CH_UART0: "tx", tapframe.CH_UART1: "rx", tapframe.CH_SYNC: "sync",
             tapframe.CH_HEARTBEAT: "hb", tapframe.CH_HELLO: "hello"}
_SHOW = 160  # payload characters per line


def show_bytes(data: bytes, encoding: str) -> str:
    """Payload as quoted text when it reads as text, otherwise hex; long ones are cut."""
    try:
        text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        shown = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
        shown = shown.replace("\t", "\\t")
        if len(shown) > _SHOW:
            return f'"{shown[:_SHOW]}"... ({len(data)} bytes)'
        return f'"{shown}"'
    shown = data[: _SHOW // 3].hex(" ")
    return f"hex {shown}" + (f" ... ({len(data)} bytes)" if len(data) > _SHOW // 3 else "")


class MonitorView:
    """Decodes the tap's stream into display lines; pure, so it is tested without a port."""

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = encoding
        self.decoder = tapframe.Decoder()
        self.decoder.reset(joining=True)  # the tap may be mid-frame when we open the port
        self.frames: Counter[str] = Counter()
        self.missing = 0
        self.resets = 0
        self.heartbeat: dict[str, int] = {}
        self.hello = ""
        self._last_seq: int | None = None
        self._errors = dict(self.decoder.errors)

    def feed(self, data: bytes, t_s: float) -> list[str]:
        out: list[str] = []
        for f in self.decoder.feed(data):
            out.extend(self._frame(f, t_s))
        if self.decoder.errors != self._errors:
            delta = {k: v - self._errors[k] for k, v in self.decoder.errors.items()
                     if v != self._errors[k]}
            self._errors = dict(self.decoder.errors)
            out.append(f"{t_s:9.3f}  !! link errors: "
                       + ", ".join(f"{k} +{n}" for k, n in delta.items())
                       + f" (total {self.decoder.error_count()})")
        return out

    def _frame(self, f: tapframe.Frame, t_s: float) -> list[str]:
        out: list[str] = []
        first = f.channel == tapframe.CH_HELLO or bool(f.flags & tapframe.FLAG_FIRST)
        if first:
            self.resets += 1
        elif self._last_seq is not None:
            step = (f.seq - self._last_seq) & _U32
            if step >= 1 << 31:
                out.append(f"{t_s:9.3f}  !! seq went back ({self._last_seq} -> {f.seq}): "
                           "the tap restarted and its hello was lost")
            elif step > 1:
                self.missing += step - 1
                out.append(f"{t_s:9.3f}  !! gap: {step - 1} frame(s) missing "
                           f"(seq {self._last_seq} -> {f.seq})")
        self._last_seq = f.seq
        name = _CHANNELS.get(f.channel, f"ch{f.channel}")
        self.frames[name] += 1
        if f.channel in (tapframe.CH_UART0, tapframe.CH_UART1):
            payload = show_bytes(f.payload, self.encoding)
        elif f.channel == tapframe.CH_SYNC and len(f.payload) >= 4:
            payload = f"edge #{int.from_bytes(f.payload[:4], 'little')}"
        elif f.channel == tapframe.CH_HEARTBEAT:
            self.heartbeat = tapframe.parse_heartbeat(f.payload)
            payload = " ".join(f"{k}={v}" for k, v in self.heartbeat.items())
        elif f.channel == tapframe.CH_HELLO:
            self.hello = bytes(f.payload).decode("ascii", "replace")
            payload = self.hello
        else:
            payload = show_bytes(f.payload, self.encoding)
        flags = ",".join(tapframe.flag_names(f.flags)) or "-"
        out.append(f"{t_s:9.3f}  {name:<5} seq {f.seq:<8} ticks {f.ticks:<13} {flags:<8} "
                   f"{payload}")
        return out

    def summary(self) -> list[str]:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(self.frames.items())) or "none"
        errors = ", ".join(f"{k} {n}" for k, n in self.decoder.errors.items() if n) or "none"
        out = [f"frames: {self.decoder.frames} ({counts}); missing (seq gaps): {self.missing}; "
               f"resets seen: {self.resets}",
               f"link errors: {errors}; partial frame dropped on joining: "
               f"{self.decoder.joined_partial}"]
        if self.heartbeat:
            out.append("last heartbeat: " + " ".join(f"{k}={v}" for k, v in
                                                     self.heartbeat.items()))
        if self.hello:
            out.append(f"hello: {self.hello}")
        return out


def monitor(port: str, seconds: float | None, encoding: str = "utf-8",
            echo: Callable[[str], None] = click.echo,
            stop: Callable[[], bool] | None = None) -> MonitorView:
    """Print the tap's frames as they come, for seconds (None: until Ctrl-C or stop())."""
    import serial

    from dualrec.devices.base import DeviceError
    from dualrec.devices.picotap import resolve_port
    from dualrec.shield import shield

    try:
        path = resolve_port(port)
        ser = serial.serial_for_url(path, baudrate=115200, timeout=0.2)
    except (DeviceError, serial.SerialException, OSError, ValueError) as exc:
        raise TapToolError(f"cannot open the tap's port {port}: {exc}") from None
    view = MonitorView(encoding)
    echo(f"monitoring {path}" + (f" for {seconds:g} s" if seconds else " (Ctrl-C ends)"))
    t0 = time.monotonic()
    try:
        while (seconds is None or time.monotonic() - t0 < seconds) and not (stop and stop()):
            first = ser.read(1)
            if not first:
                continue
            waiting = ser.in_waiting
            data = first + ser.read(waiting) if waiting else first
            for line in view.feed(data, time.monotonic() - t0):
                echo(shield(line))  # the teller's lines carry customer numbers
    except KeyboardInterrupt:
        pass
    except (serial.SerialException, OSError) as exc:
        echo(f"!! port lost: {exc}")
    finally:
        ser.close()
    for line in view.summary():
        echo(line)
    return view


# --- the command group --------------------------------------------------------------------------


BOARD_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def tap() -> None:
    """The Pico serial tap: flash and check its firmware, watch its frames (docs/tap.md)."""


def _echo_report(report: Report) -> None:
    for line in report.lines():
        click.echo(line)
    for note in report.notes:
        click.echo(note)
    if not report.passed:
        raise TapToolError("the device does not hold this checkout's tap firmware")


@tap.command("flash")
@click.option("--port", default=PICO_USB, show_default=True,
              help="The Pico's REPL: a path, or usb:VID:PID[:SERIAL] (interface 0 is taken).")
@click.option("--board", "board_path", type=BOARD_FILE, default=None,
              help="Board profile whose [tap] table becomes /tap.json (default: the defaults).")
@click.option("--deps-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="A local copy of the mip index (made by fetch-deps) instead "
              "of micropython.org.")
@click.option("--no-deps", is_flag=True,
              help="Do not install usb-device-cdc (already there, or frozen into the firmware).")
@click.option("--no-reset", is_flag=True, help="Do not reset the Pico afterwards.")
@click.option("--mpy/--py", default=True, show_default=True, help="The library as bytecode "
              "compiled by mpy-cross (pinned to the firmware's MicroPython), or as source.")
def flash_cmd(port: str, board_path: Path | None, deps_from: Path | None, no_deps: bool,
              no_reset: bool, mpy: bool) -> None:
    """Copy the tap firmware, its dependencies and /tap.json to a Pico and check the copy.

    Exits non-zero if any file's SHA-256 (computed on the device) or the firmware version the
    device imports differs from this checkout."""
    tap_ = tap_profile(board_path)
    with firmware_for(mpy) as fw:
        report = flash(resolve_repl_port(port), tap_, deps_from=deps_from, no_deps=no_deps,
                       reset=not no_reset, fw=fw)
    _echo_report(report)


@tap.command("verify")
@click.option("--port", default=PICO_USB, show_default=True,
              help="The Pico's REPL: a path, or usb:VID:PID[:SERIAL].")
@click.option("--board", "board_path", type=BOARD_FILE, default=None,
              help="Also check /tap.json against this board profile's [tap] table.")
@click.option("--deps-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Also check the dependencies against this copy of the index.")
@click.option("--no-reset", is_flag=True, help="Leave the Pico at its REPL afterwards.")
@click.option("--mpy/--py", default=True, show_default=True,
              help="Expect the library compiled to .mpy (as flash writes it), or as source.")
def verify_cmd(port: str, board_path: Path | None, deps_from: Path | None,
               no_reset: bool, mpy: bool) -> None:
    """Check, without writing anything, that a Pico holds this checkout's tap firmware.

    The running tap is stopped (Ctrl-C) to reach the REPL; a Pico is reset afterwards, so its
    firmware, whatever the verdict, starts again."""
    config = tap_config(tap_profile(board_path)) if board_path is not None else None
    with firmware_for(mpy) as fw:
        deps = index_files(str(deps_from), fw.deps) if deps_from is not None else []
        dev = Device.connect(resolve_repl_port(port))
        report = _verify_cmd(dev, fw, config, deps, no_reset)
    _echo_report(report)


def _verify_cmd(dev: Device, fw: Firmware, config: bytes | None, deps: Sequence[IndexFile],
                no_reset: bool) -> Report:
    try:
        if dev.open():
            click.echo("stopped the program that was running (the tap) with Ctrl-C")
        report = verify_device(dev, fw, config, deps)
        if not no_reset and dev.info().platform == "rp2":
            dev.reset()
            report.notes.append("reset: the Pico restarts its firmware")
    finally:
        dev.close()
    return report


@tap.command("firmware")
@click.option("--uf2", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="MicroPython for the Pico, the pinned release "
              "(dualrec_tools/tap_firmware.py: UF2_NAME, from UF2_URL).")
@click.option("--drive", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="The Pico's boot drive (default: the one RPI-RP2 volume "
              "mounted, from /proc/mounts).")
def firmware_cmd(uf2: Path, drive: Path | None) -> None:
    """Install the pinned MicroPython on a Pico in BOOTSEL mode (checked by SHA-256).

    Then `dualrec-tool tap flash` puts the tap on it."""
    from dualrec_tools import tap_firmware

    drive = drive or tap_firmware.find_boot_drive(Path("/proc/mounts").read_text())
    digest = tap_firmware.install_uf2(uf2, drive)
    click.echo(f"{drive / tap_firmware.UF2_NAME}: MicroPython "
               f"{tap_firmware.MICROPYTHON_VERSION}, SHA-256 {digest} (pinned); the Pico "
               "reboots into it")


@tap.command("fetch-deps")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--index", default=DEFAULT_INDEX, show_default=True, help="The mip index to copy "
              "from.")
def fetch_deps_cmd(directory: Path, index: str) -> None:
    """Copy the tap's micropython-lib dependencies from the mip index into DIRECTORY.

    Run it where there is network; then `tap flash --deps-from DIRECTORY` where there is none."""
    fw = load_firmware()
    click.echo(f"copying {', '.join(n for n, _ in fw.deps)} from {index} to {directory}:")
    files = fetch_deps(directory, fw.deps, index)
    click.echo(f"{len(files)} file(s); flash with --deps-from {directory}")


@tap.command("monitor")
@click.option("--port", default=None, help="The tap's data port: a path, or usb:VID:PID[:SERIAL] "
              "(the highest interface is taken). Default: the board's, else usb:2e8a:0005.")
@click.option("--board", "board_path", type=BOARD_FILE, default=None,
              help="Take the port from this board profile's [tap] table.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this long (default: until Ctrl-C).")
@click.option("--encoding", default="utf-8", show_default=True,
              help="How to show the tapped bytes as text (e.g. gb18030).")
def monitor_cmd(port: str | None, board_path: Path | None, seconds: float | None,
                encoding: str) -> None:
    """Show every frame the tap sends, decoded: channel, seq, ticks, flags, payload."""
    if port is None:
        port = tap_profile(board_path).port
    view = monitor(port, seconds, encoding)
    if view.decoder.frames == 0:
        raise TapToolError("no frames decoded: is this the tap's data port (not the REPL), "
                           "and is the tap firmware running?")
