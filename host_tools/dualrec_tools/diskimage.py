"""Disk images without root and without loop mounts: the MBR partition table, a sparse copy
(of a raw or .xz image), the FAT boot partition through mtools, the root filesystem's files
through debugfs, and the block map (.bmap) through bmap-tools.

Why these tools: mtools (`mcopy -i image@@offset`) and e2fsprogs' debugfs (`image?offset=N`)
read and write a filesystem inside an image file as ordinary file I/O, so neither root nor a loop
device is needed, and both are Debian packages every technician's PC can have. bmaptool (Debian's
bmap-tools) writes the block map from the image's holes, which is why the copy is sparse: an
all-zero MiB of the base image becomes a hole, and the card keeps whatever it held there.
"""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress

SECTOR = 512
CHUNK = 1 << 20  # the copy's unit, and so the smallest hole it makes
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
LINUX_TYPE = 0x83


class ImageError(Exception):
    """The image, a tool or a filesystem inside it refused; the message says what to do."""


@dataclass(frozen=True)
class Partition:
    index: int  # 1-based, as in /dev/mmcblk0p1
    type: int
    start: int  # bytes
    size: int  # bytes


def partitions(image: Path) -> list[Partition]:
    """The four primary MBR entries that are in use (Raspberry Pi OS images are MBR)."""
    with image.open("rb") as f:
        mbr = f.read(SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise ImageError(f"{image}: no MBR partition table (not a Raspberry Pi OS image?)")
    out = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 462 + 16 * i]
        ptype = entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype and count:
            out.append(Partition(i + 1, ptype, start * SECTOR, count * SECTOR))
    return out


def boot_and_root(image: Path) -> tuple[Partition, Partition]:
    parts = partitions(image)
    boot = next((p for p in parts if p.type in FAT_TYPES), None)
    root = next((p for p in parts if p.type == LINUX_TYPE), None)
    if boot is None or root is None:
        raise ImageError(f"{image}: expected a FAT boot and a Linux root partition, found "
                         + ", ".join(f"{p.index}:0x{p.type:02x}" for p in parts))
    return boot, root


def sparse_copy(src: Path, dest: Path, progress: Callable[[int], None] | None = None) -> int:
    """Copy src (raw, or .xz decompressed on the fly) to dest, leaving all-zero MiBs as holes.

    Returns the image size. The holes are what bmaptool maps as unused.
    """
    opener = lzma.open if src.suffix == ".xz" else open
    zero = bytes(CHUNK)
    size = 0
    try:
        with opener(src, "rb") as fin, dest.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                if chunk == zero[:len(chunk)]:
                    fout.seek(len(chunk), os.SEEK_CUR)
                else:
                    fout.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
            fout.truncate(size)  # a trailing hole still counts
    except (EOFError, lzma.LZMAError) as exc:
        # a download cut short ends in EOFError: say so rather than build half an image
        raise ImageError(f"{src}: truncated or corrupt ({exc}); download it again") from None
    return size


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} not found: install the Debian package {package}")
    return path


def _run(cmd: list[str], what: str, data: bytes | None = None) -> bytes:
    # MTOOLS_SKIP_CHECK: mtools otherwise refuses FAT geometries it finds odd (mkfs.fat's are fine)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}
    done = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=600)
    if done.returncode != 0:
        raise ImageError(f"{what}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


class FatPartition:
    """The FAT filesystem of one partition of an image file, through mtools."""

    def __init__(self, image: Path, part: Partition) -> None:
        need("mcopy", "mtools")
        self.spec = f"{image}@@{part.start}"

    def _m(self, tool: str, *args: str, data: bytes | None = None) -> bytes:
        return _run([tool, "-i", self.spec, *args], f"{tool} {' '.join(args)}", data)

    def exists(self, path: str) -> bool:
        try:
            self._m("mdir", "-b", f"::{path}")
        except ImageError:
            return False
        return True

    def read(self, path: str) -> bytes:
        return self._m("mtype", f"::{path}")  # mtype without -t: the bytes as they are

    def write(self, path: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="dualrec-fat-") as tmp:
            local = Path(tmp) / "data"
            local.write_bytes(data)
            self.put(local, path)

    def put(self, local: Path, path: str) -> None:
        _run(["mcopy", "-o", "-D", "o", "-s", "-i", self.spec, str(local), f"::{path}"],
             f"copy {local} to {path}")

    def mkdir(self, path: str) -> None:
        if not self.exists(path):
            self._m("mmd", f"::{path}")

    def listdir(self, path: str = "/") -> list[str]:
        out = self._m("mdir", "-b", f"::{path}").decode(errors="replace")
        return sorted(line.rstrip("/").rsplit("/", 1)[-1] for line in out.splitlines()
                      if line.strip())

    def free_bytes(self) -> int:
        # mdir's last line: "   66 058 240 bytes free" (digits grouped by spaces)
        lines = self._m("mdir", "::/").decode(errors="replace").splitlines()
        summary = next(line for line in reversed(lines) if "bytes free" in line)
        return int("".join(c for c in summary.split("bytes free")[0] if c.isdigit()))


def read_root_file(image: Path, root: Partition, path: str) -> str | None:
    """A file of the ext4 root filesystem (debugfs reads it in place), or None if absent."""
    debugfs = need("debugfs", "e2fsprogs")
    done = subprocess.run([debugfs, "-R", f"cat {path}", f"{image}?offset={root.start}"],
                          capture_output=True, timeout=120)
    text = done.stdout.decode(errors="replace")
    return text if done.returncode == 0 and text else None


def os_codename(image: Path, root: Partition) -> str | None:
    """VERSION_CODENAME from the image's /etc/os-release (bookworm, trixie, ...)."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = read_root_file(image, root, path)
        if text:
            for line in text.splitlines():
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    return None


def write_bmap(image: Path) -> Path:
    """image.bmap beside the image, by bmaptool from its holes (SHA-256 per mapped range)."""
    bmaptool = need("bmaptool", "bmap-tools")
    bmap = image.with_name(image.name + ".bmap")
    _run([bmaptool, "create", "--output", str(bmap), str(image)], "bmaptool create")
    return bmap


def bytes_progress() -> Progress:
    """A progress bar in bytes (rich): used by image and flash. Imported here: rich is a host
    dependency, and the box's venv (which also holds dualrec_tools) has no use for it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
