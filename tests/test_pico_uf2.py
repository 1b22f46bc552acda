"""`dualrec-tool tap firmware`: the pinned MicroPython UF2 checked and copied to a Pico's boot
drive (here a directory with the INFO_UF2.TXT a real RPI-RP2 volume holds), and synthetic UF2
files built here to the UF2 specification (512-byte blocks, RP2040 family id)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrec_tools import tap_firmware as tf
from dualrec_tools.cli import main
from dualrec_tools.tap import TapToolError

INFO = "UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\nBoard-ID: RPI-RP2\n"


def uf2(payload: bytes, family: int = tf.RP2040_FAMILY) -> bytes:
    chunks = [payload[i:i + 256] for i in range(0, len(payload), 256)] or [b""]
    blocks = []
    for n, chunk in enumerate(chunks):
        head = struct.pack("<8I", 0x0A324655, 0x9E5D5157, 0x2000, 0x10000000 + 256 * n, 256, n,
                           len(chunks), family)
        blocks.append(head + chunk.ljust(476, b"\0") + struct.pack("<I", 0x0AB16F30))
    return b"".join(blocks)


@pytest.fixture()
def drive(tmp_path: Path) -> Path:
    d = tmp_path / "RPI-RP2"
    d.mkdir()
    (d / "INFO_UF2.TXT").write_text(INFO)
    return d


def firmware(tmp_path: Path, family: int = tf.RP2040_FAMILY, version: str = "") -> Path:
    text = f"MicroPython v{version or tf.MICROPYTHON_VERSION} on 2026-04-06; Raspberry Pi Pico"
    f = tmp_path / "fw.uf2"
    f.write_bytes(uf2(text.encode() * 40, family))
    return f


def test_a_file_matching_the_pin_is_copied_to_the_boot_drive(tmp_path: Path,
                                                             drive: Path) -> None:
    fw = firmware(tmp_path)
    pin = hashlib.sha256(fw.read_bytes()).hexdigest()
    assert tf.install_uf2(fw, drive, expected_sha256=pin) == pin
    assert (drive / tf.UF2_NAME).read_bytes() == fw.read_bytes()


def test_a_mismatch_is_refused_and_nothing_is_copied(tmp_path: Path, drive: Path) -> None:
    fw = firmware(tmp_path)
    with pytest.raises(TapToolError, match="is not the pinned"):
        tf.install_uf2(fw, drive, expected_sha256="0" * 64)
    assert not (drive / tf.UF2_NAME).exists()


def test_the_command_checks_against_the_pin_in_the_code(tmp_path: Path, drive: Path) -> None:
    """Through the command line: the pin in the code decides; a synthetic UF2 is not the
    pinned file, so it is refused and nothing is copied."""
    fw = firmware(tmp_path)
    res = CliRunner().invoke(main, ["tap", "firmware", "--uf2", str(fw), "--drive", str(drive)])
    assert res.exit_code != 0
    digest = hashlib.sha256(fw.read_bytes()).hexdigest()
    assert len(tf.UF2_SHA256) == 64
    assert "is not the pinned" in res.output and digest in res.output
    assert not (drive / tf.UF2_NAME).exists()


@pytest.mark.parametrize(("data", "message"), [
    (b"not a uf2", "multiple of 512"),
    (b"\0" * 512, "bad magic"),
])
def test_what_is_not_a_uf2_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(TapToolError, match=message):
        tf.check_uf2(data, expected_sha256=hashlib.sha256(data).hexdigest())


def test_another_chip_or_release_is_refused_before_the_hash(tmp_path: Path) -> None:
    rp2350 = firmware(tmp_path, family=0xE48BFF59).read_bytes()
    with pytest.raises(TapToolError, match="not for the RP2040"):
        tf.check_uf2(rp2350, hashlib.sha256(rp2350).hexdigest())
    old = firmware(tmp_path, version="1.22.0").read_bytes()
    with pytest.raises(TapToolError, match=r"not MicroPython v1\.28\.0"):
        tf.check_uf2(old, hashlib.sha256(old).hexdigest())


def test_the_boot_drive_is_found_in_proc_mounts(tmp_path: Path, drive: Path) -> None:
    other = tmp_path / "usbstick"
    other.mkdir()
    mounts = (f"/dev/sda2 / ext4 rw 0 0\n/dev/sdb1 {other} vfat rw 0 0\n"
              f"/dev/sdc1 {drive} vfat rw 0 0\n")
    assert tf.find_boot_drive(mounts) == drive
    with pytest.raises(TapToolError, match="no Pico boot drive"):
        tf.find_boot_drive(f"/dev/sdb1 {other} vfat rw 0 0\n")
    with pytest.raises(TapToolError, match="not a Pico boot drive"):
        tf.install_uf2(firmware(tmp_path), other, expected_sha256="")


def test_mpy_cross_is_the_firmware_release() -> None:
    assert tf.mpy_cross_version().startswith(tf.MICROPYTHON_VERSION)
