"""`dualrec-tool image`: a stock Raspberry Pi OS Lite image (.img or .img.xz) turned into the
image of one box, without root and without loop mounts.

Steps: sparse copy of the base (diskimage.sparse_copy); the release read from the root
filesystem's /etc/os-release (debugfs); on the FAT boot partition (mtools): the board's
config.txt lines (boards/os/config-<board>.txt) appended, the first-boot hook of the release
(firstboot.py), and in dualrec/: the .deb built for that release, the provisioning bundle, the
board's name; last, the .bmap beside the image (bmaptool).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from dualrec_tools import firstboot
from dualrec_tools.diskimage import (
    FatPartition,
    ImageError,
    boot_and_root,
    bytes_progress,
    os_codename,
    sparse_copy,
    write_bmap,
)

ROOT = Path(__file__).resolve().parents[2]
BOARDS_OS = ROOT / "boards" / "os"
DEB_DIR = ROOT / "build" / "deb"
# The release decides the first-boot mechanism and which .deb (Python 3.11 or 3.13) fits.
RELEASES = {"bookworm": ("firstrun", "+deb12"), "trixie": ("cloud-init", "+deb13")}
MARK = "# --- dualrec"


@dataclass(frozen=True)
class ImageResult:
    image: Path
    bmap: Path
    release: str
    mechanism: str
    size: int
    written: tuple[str, ...]  # paths on the boot partition


def board_fragment(board: str) -> str:
    path = BOARDS_OS / f"config-{board}.txt"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("config-") for p in BOARDS_OS.glob("config-*.txt"))
        raise ImageError(f"no config.txt lines for board {board!r} ({path}); boards: "
                         + ", ".join(known))
    return path.read_text()


def find_deb(release: str, arch: str = "arm64") -> Path:
    suffix = RELEASES[release][1]
    debs = sorted(DEB_DIR.glob(f"dualrec_*{suffix}_{arch}.deb"))
    if not debs:
        raise ImageError(f"no {release} package in {DEB_DIR}: run `make deb` (or give --deb)")
    return debs[-1]


def _check_name(hostname: str | None) -> None:
    if hostname and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", hostname):
        raise ImageError(f"--hostname {hostname!r}: lowercase letters, digits and dashes only")


def customise(base: Path, out: Path, board: str, bundle: Path, *, deb: Path | None = None,
              release: str | None = None, hostname: str | None = None, ntp_server: str = "",
              progress: Callable[[int], None] | None = None) -> ImageResult:
    fragment = board_fragment(board)
    _check_name(hostname)
    if not bundle.is_dir():
        raise ImageError(f"--bundle {bundle}: not a directory (dualrec-tool provision writes it)")
    if out.resolve() == base.resolve():
        raise ImageError("--out must differ from --base: the base image stays as it came")
    size = sparse_copy(base, out, progress)
    boot, root = boot_and_root(out)
    release = release or os_codename(out, root)
    if release not in RELEASES:
        raise ImageError(f"Raspberry Pi OS release {release!r} not supported (Bookworm or "
                         "Trixie; give --release if /etc/os-release could not be read)")
    mechanism = RELEASES[release][0]
    deb = deb or find_deb(release)
    fat = FatPartition(out, boot)
    need = deb.stat().st_size + sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    if fat.free_bytes() < need + (1 << 20):
        raise ImageError(f"boot partition has {fat.free_bytes()} bytes free, {need} needed")

    written: list[str] = []

    def write(path: str, text: str) -> None:
        fat.write(path, text.encode())
        written.append(path)

    config = fat.read("/config.txt").decode(errors="replace")
    if MARK in config:  # a base that was customised already: start from its original lines
        config = config[:config.index(MARK)].rstrip("\n") + "\n"
    write("/config.txt", f"{config.rstrip(chr(10))}\n\n{MARK} board {board} (dualrec-tool "
          f"image) ---\n{fragment}")
    fat.mkdir("/dualrec")
    write("/dualrec/firstboot.sh", firstboot.FIRSTBOOT_SH)
    write("/dualrec/board", board + "\n")
    if ntp_server:
        write("/dualrec/ntp-server", ntp_server + "\n")
    fat.put(deb, f"/dualrec/{deb.name}")
    written.append(f"/dualrec/{deb.name}")
    fat.mkdir("/dualrec/bundle")
    for item in sorted(bundle.iterdir()):
        fat.put(item, f"/dualrec/bundle/{item.name}")
        written.append(f"/dualrec/bundle/{item.name}")
    if mechanism == "firstrun":
        write("/firstrun.sh", firstboot.FIRSTRUN_SH)
        cmdline = fat.read("/cmdline.txt").decode(errors="replace")
        write("/cmdline.txt", firstboot.cmdline_with_hook(cmdline))
    else:
        write("/user-data", firstboot.user_data(hostname))
        write("/meta-data", firstboot.meta_data(hostname))
        write("/network-config", firstboot.NETWORK_CONFIG)
    bmap = write_bmap(out)
    return ImageResult(out, bmap, release, mechanism, size, tuple(written))


@click.command("image")
@click.option("--board", required=True, help="Board profile name (rpi5, rpi4b, cm4, zero2w).")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Stock Raspberry Pi OS Lite image, .img or .img.xz.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The box's provisioning directory; every file in it goes "
              "to /etc/dualrec on the first boot.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The box's image; OUT.bmap is written beside it.")
@click.option("--deb", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The dualrec package (default: build/deb/ for the image's release).")
@click.option("--release", type=click.Choice(sorted(RELEASES)),
              help="Override the release read from the image's /etc/os-release.")
@click.option("--hostname", help="Host name (Trixie, through cloud-init).")
@click.option("--ntp-server", default="", help="The branch NTP server for chrony.")
def image(board: str, base: Path, bundle: Path, out: Path, deb: Path | None,
          release: str | None, hostname: str | None, ntp_server: str) -> None:
    """Customise a Raspberry Pi OS Lite image into one box's image (no root, no mounts)."""
    total = None if base.suffix == ".xz" else base.stat().st_size  # .xz: size unknown ahead
    try:
        with bytes_progress() as bar:
            task = bar.add_task("copying base image", total=total)
            result = customise(base, out, board, bundle, deb=deb, release=release,
                               hostname=hostname, ntp_server=ntp_server,
                               progress=lambda n: bar.advance(task, n))
    except ImageError as exc:
        # never leave a half-made image that could be flashed by mistake
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".bmap").unlink(missing_ok=True)
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result.image}: {result.size / 1e9:.2f} GB, Raspberry Pi OS "
               f"{result.release}, first boot by {result.mechanism}")
    for path in result.written:
        click.echo(f"  boot:{path}")
    click.echo(f"{result.bmap}: block map (flash with `dualrec-tool flash {result.image} "
               "TARGET`)")
