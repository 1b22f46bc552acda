"""`dualrec-tool flash IMAGE TARGET`: write a box's image to an SD card (or a file), with its
block map, then read the card back and check every mapped range against the map's SHA-256.

Why our own writer rather than `bmaptool copy`: the read-back check from the card itself (not
from the page cache: the written ranges are dropped from it first), one progress bar over both
passes, and the refusals below before anything is written. The map itself is bmaptool's
(bmap format 2.0: ranges of blocks, a SHA-256 each), written by `dualrec-tool image`; without a
.bmap the whole image is written and its SHA-256 compared.

Refused unless --force: a target that is, or has a partition that is, mounted (/proc/mounts);
the disk holding / or /boot; a disk the kernel does not call removable
(/sys/block/<disk>/removable), since a laptop's internal disk is never the SD card. A regular
file is always a fine target (it is truncated to the image's size).
"""

from __future__ import annotations

import hashlib
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from dualrec_tools.diskimage import bytes_progress

IO = 1 << 20
SYSTEM_MOUNTS = {"/", "/boot", "/boot/firmware", "/boot/efi", "/usr", "/var", "/home"}


class FlashError(click.ClickException):
    """Nothing was written, or the card does not hold the image; the message says which."""


@dataclass(frozen=True)
class BlockMap:
    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str], ...]  # (first byte, end byte, sha256 hex)

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.ranges)


def read_bmap(path: Path) -> BlockMap:
    root = ET.parse(path).getroot()
    version = root.get("version", "")
    kind = root.findtext("ChecksumType", "").strip()
    if not version.startswith("2.") or kind != "sha256":
        raise FlashError(f"{path}: bmap {version} with {kind or 'no'} checksums; "
                         "2.x with sha256 expected (bmap-tools 3.x writes it)")
    block = int(root.findtext("BlockSize", "4096"))
    size = int(root.findtext("ImageSize", "0"))
    ranges = []
    for node in root.iter("Range"):
        text = (node.text or "").strip()
        first, _, last = text.partition("-")
        start = int(first) * block
        end = min((int(last or first) + 1) * block, size)
        ranges.append((start, end, node.get("chksum", "")))
    return BlockMap(size, block, tuple(ranges))


def whole_image(image: Path) -> BlockMap:
    h = hashlib.sha256()
    with image.open("rb") as f:
        while chunk := f.read(IO):
            h.update(chunk)
    size = image.stat().st_size
    return BlockMap(size, IO, ((0, size, h.hexdigest()),))


# --- what the target is -------------------------------------------------------------------------


def _disk_of(dev_name: str, sys_block: Path) -> str | None:
    """The whole disk a block device name belongs to ("mmcblk0p1" -> "mmcblk0")."""
    if (sys_block / dev_name).exists():
        return dev_name
    for disk in sorted(p.name for p in sys_block.iterdir()) if sys_block.is_dir() else ():
        if (sys_block / disk / dev_name).exists():
            return disk
    return None


def target_problems(target: Path, mounts: str, sys_block: Path) -> list[str]:
    """Why writing to target would be wrong: [] for a regular file or a safe removable disk."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return []  # a new regular file
    if stat.S_ISREG(st.st_mode):
        return []
    if not stat.S_ISBLK(st.st_mode):
        return [f"{target} is neither a block device nor a regular file"]
    return disk_problems(target.resolve().name, mounts, sys_block)


def disk_problems(name: str, mounts: str, sys_block: Path) -> list[str]:
    """Why the block device `name` (sdb, mmcblk0, sdb1...) must not be written."""
    disk = _disk_of(name, sys_block) or name
    problems = []
    if name != disk:
        problems.append(f"/dev/{name} is a partition of {disk}: give the whole disk /dev/{disk}")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("/dev/"):
            continue
        dev = Path(fields[0]).resolve().name
        if _disk_of(dev, sys_block) == disk:
            where = fields[1].replace("\\040", " ")
            if where in SYSTEM_MOUNTS:
                problems.append(f"/dev/{disk} holds this system's {where}")
            else:
                problems.append(f"/dev/{dev} is mounted on {where}: unmount it first")
    removable = sys_block / disk / "removable"
    # A built-in SD slot (an MMC host: mmcblkN) reports removable=0 but is the card reader of
    # many laptops; on a Pi, mmcblk0 is the system disk and is refused as such above.
    if not (disk.startswith("mmcblk")
            or (removable.exists() and removable.read_text().strip() == "1")):
        problems.append(f"/dev/{disk} is not a removable disk (an internal disk, not a card "
                        "reader?)")
    return problems


# --- write and check ----------------------------------------------------------------------------


def _chunks(start: int, end: int) -> Iterator[tuple[int, int]]:
    pos = start
    while pos < end:
        yield pos, min(end - pos, IO)
        pos += IO


def write_image(image: Path, target: Path, bmap: BlockMap,
                advance: Callable[[int], None]) -> None:
    is_file = not target.exists() or target.is_file()
    flags = os.O_WRONLY | (os.O_CREAT if is_file else 0)
    fd = os.open(target, flags, 0o644)
    try:
        if is_file:
            os.ftruncate(fd, bmap.image_size)
        with image.open("rb") as src:
            for start, end, _ in bmap.ranges:
                for pos, length in _chunks(start, end):
                    src.seek(pos)
                    data = src.read(length)
                    os.pwrite(fd, data, pos)
                    advance(len(data))
        os.fsync(fd)
        # Drop what was written from the page cache: the check must read the card, not memory.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_target(target: Path, bmap: BlockMap, advance: Callable[[int], None]) -> list[str]:
    """The ranges whose SHA-256 on the target differs from the map's."""
    bad = []
    fd = os.open(target, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for start, end, want in bmap.ranges:
            h = hashlib.sha256()
            for pos, length in _chunks(start, end):
                data = os.pread(fd, length, pos)
                h.update(data)
                advance(len(data))
            if h.hexdigest() != want:
                bad.append(f"bytes {start}-{end}")
    finally:
        os.close(fd)
    return bad


def flash(image: Path, target: Path, *, force: bool = False, mounts: str | None = None,
          sys_block: Path = Path("/sys/block")) -> BlockMap:
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    problems = target_problems(target, mounts, sys_block)
    if problems and not force:
        raise FlashError("refusing to write " + str(target) + ":\n  " + "\n  ".join(problems)
                         + "\n(--force writes anyway)")
    bmap_path = image.with_name(image.name + ".bmap")
    bmap = read_bmap(bmap_path) if bmap_path.exists() else whole_image(image)
    if bmap.image_size != image.stat().st_size:
        raise FlashError(f"{bmap_path} is for an image of {bmap.image_size} bytes, "
                         f"{image} has {image.stat().st_size}")
    with bytes_progress() as bar:
        w = bar.add_task("writing", total=bmap.mapped_bytes)
        write_image(image, target, bmap, lambda n: bar.advance(w, n))
        c = bar.add_task("reading back", total=bmap.mapped_bytes)
        bad = check_target(target, bmap, lambda n: bar.advance(c, n))
    if bad:
        raise FlashError(f"{target} differs from {image} after writing ({len(bad)} ranges, "
                         f"first {bad[0]}): the card may be failing")
    return bmap


@click.command("flash")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Write even to a mounted, system or non-removable "
              "disk.")
def flash_command(image: Path, target: Path, force: bool) -> None:
    """Write IMAGE (with IMAGE.bmap) to TARGET, an SD card's disk or a file, and check it."""
    bmap = flash(image, target, force=force)
    click.echo(f"{target}: {bmap.mapped_bytes / 1e6:.0f} MB of {bmap.image_size / 1e6:.0f} MB "
               f"written and read back, {len(bmap.ranges)} ranges, SHA-256 ok")
