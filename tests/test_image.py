"""`dualrec-tool image` and `dualrec-tool flash` on a synthetic image shaped like Raspberry Pi OS
Lite (MBR; FAT32 boot partition by mkfs.fat, ext4 root by mkfs.ext4 -d; no root, no mounts):
customised, flashed to a file over garbage, read back through the filesystems; the cloud-init
files checked against cloud-init's own schema (from Debian's cloud-init package, unpacked by
scripts/setup-system.sh, not installed: cloud-init would run at this machine's next boot)."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from dualrec_tools.cli import main as tool
from dualrec_tools.diskimage import FatPartition, boot_and_root
from dualrec_tools.flash import FlashError, check_target, disk_problems, flash, read_bmap
from dualrec_tools.image import MARK
from helpers import ROOT

MIB = 1 << 20
BOOT_START, BOOT_SIZE, ROOT_SIZE = 4 * MIB, 64 * MIB, 32 * MIB
CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=2504581d-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet\n")
CONFIG = "# stock config.txt\ndtparam=audio=on\ncamera_auto_detect=1\n\n[all]\n"
SCHEMA = ROOT / "build" / "cloud-init" / "schema-cloud-config-v1.json"


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def make_base(tmp: Path, codename: str) -> Path:
    """A 100 MiB Raspberry Pi OS look-alike, built as an ordinary user would."""
    for tool_name in ("sfdisk", "mkfs.fat", "mkfs.ext4", "mcopy", "bmaptool"):
        assert shutil.which(tool_name), f"{tool_name} missing: run make setup"
    img = tmp / f"{codename}.img"
    with img.open("wb") as f:
        f.truncate(BOOT_START + BOOT_SIZE + ROOT_SIZE)
    table = (f"label: dos\nstart={BOOT_START // 512}, size={BOOT_SIZE // 512}, type=c\n"
             f"start={(BOOT_START + BOOT_SIZE) // 512}, type=83\n")
    subprocess.run(["sfdisk", "-q", str(img)], input=table.encode(), check=True, timeout=60)
    _run("mkfs.fat", "-F", "32", "-s", "1", "-n", "bootfs", "--offset", str(BOOT_START // 512),
         str(img), str(BOOT_SIZE // 1024))
    rootfs = tmp / f"rootfs-{codename}"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/os-release").write_text(
        f'PRETTY_NAME="Raspbian GNU/Linux ({codename})"\nVERSION_CODENAME={codename}\n')
    (rootfs / "usr/lib").mkdir(parents=True)
    (rootfs / "usr/lib/blob").write_bytes(os.urandom(3 * MIB))  # data the map must carry
    _run("mkfs.ext4", "-q", "-L", "rootfs", "-d", str(rootfs), "-E",
         f"offset={BOOT_START + BOOT_SIZE}", str(img), f"{ROOT_SIZE // 1024}k")
    boot, _ = boot_and_root(img)
    fat = FatPartition(img, boot)
    fat.write("/config.txt", CONFIG.encode())
    fat.write("/cmdline.txt", CMDLINE.encode())
    return img


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "site.toml").write_text('[device]\nid = "box-7"\n')
    (b / "device.key").write_bytes(os.urandom(64))
    return b


@pytest.fixture()
def deb(tmp_path: Path) -> Path:
    d = tmp_path / "dualrec_0.1.0+deb12_arm64.deb"  # only copied: its bytes are what matters
    d.write_bytes(os.urandom(2 * MIB))
    return d


def _image(base: Path, out: Path, bundle: Path, deb: Path, *extra: str) -> str:
    done = CliRunner().invoke(tool, ["image", "--board", "rpi5", "--base", str(base),
                                     "--bundle", str(bundle), "--out", str(out),
                                     "--deb", str(deb), *extra])
    assert done.exit_code == 0, done.output
    return done.output


def test_bookworm_image_flashed_over_garbage(tmp_path: Path, bundle: Path, deb: Path) -> None:
    """Bookworm: config.txt keeps its lines and gains the board's, cmdline.txt the firstrun
    hook; the .deb, the bundle and the scripts are on the boot partition. Flashed with its
    bmap to a file full of garbage, the unmapped parts stay garbage, yet both filesystems read
    back whole (mtools, e2fsck -fn): the map covers everything they use."""
    base = make_base(tmp_path, "bookworm")
    out = tmp_path / "box.img"
    report = _image(base, out, bundle, deb)
    assert "bookworm, first boot by firstrun" in report
    bmap = read_bmap(out.with_name("box.img.bmap"))
    assert bmap.image_size == out.stat().st_size
    assert bmap.mapped_bytes < bmap.image_size // 2  # the holes were found

    target = tmp_path / "card.img"
    target.write_bytes(b"\xa5" * bmap.image_size)
    flash(out, target)
    boot, root = boot_and_root(target)
    fat = FatPartition(target, boot)
    config = fat.read("/config.txt").decode()
    assert config.startswith(CONFIG.rstrip("\n"))
    assert MARK in config and "dtoverlay=uart0-pi5" in config
    assert config.endswith((ROOT / "boards/os/config-rpi5.txt").read_text())
    cmdline = fat.read("/cmdline.txt").decode()
    assert cmdline.count("\n") == 1 and cmdline.startswith(CMDLINE.strip())
    assert "systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot" in cmdline
    assert b"dualrec/firstboot.sh" in fat.read("/firstrun.sh")
    assert fat.read(f"/dualrec/{deb.name}") == deb.read_bytes()
    assert fat.read("/dualrec/bundle/device.key") == (bundle / "device.key").read_bytes()
    assert fat.read("/dualrec/board") == b"rpi5\n"
    assert not fat.exists("/user-data")
    for script, shell in (("/dualrec/firstboot.sh", "sh"), ("/firstrun.sh", "bash")):
        (tmp_path / "s").write_bytes(fat.read(script))
        _run(shell, "-n", str(tmp_path / "s"))
    fsck = subprocess.run(["e2fsck", "-fn", f"{target}?offset={root.start}"],
                          capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    blob = subprocess.run(["debugfs", "-R", "cat /usr/lib/blob",
                           f"{target}?offset={root.start}"], capture_output=True,
                          timeout=60).stdout
    assert blob == (tmp_path / "rootfs-bookworm/usr/lib/blob").read_bytes()

    # Debian's bmaptool, given the same map, writes the same mapped bytes (to a file it
    # writes the holes as holes, so only the mapped ranges are compared).
    other = tmp_path / "card2.img"
    _run("bmaptool", "copy", "--bmap", str(out) + ".bmap", str(out), str(other))
    theirs, ours = other.read_bytes(), target.read_bytes()
    assert all(theirs[a:b] == ours[a:b] for a, b, _ in bmap.ranges)


def test_read_back_catches_a_bad_card(tmp_path: Path, bundle: Path, deb: Path) -> None:
    """One byte changed on the card inside a mapped range: the check names that range."""
    base = make_base(tmp_path, "bookworm")
    out = tmp_path / "box.img"
    _image(base, out, bundle, deb)
    target = tmp_path / "card.img"
    bmap = flash(out, target)
    start, end, _ = bmap.ranges[len(bmap.ranges) // 2]
    with target.open("r+b") as f:
        f.seek(start)
        byte = f.read(1)
        f.seek(start)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert check_target(target, bmap, lambda n: None) == [f"bytes {start}-{end}"]


def test_trixie_xz_image_cloud_init(tmp_path: Path, bundle: Path, deb: Path) -> None:
    """Trixie from a .img.xz: cloud-init's NoCloud files instead of the cmdline hook;
    user-data valid against cloud-init's schema (and a broken one is not, so the check
    bites); network-config and meta-data as cloud-init documents them."""
    assert SCHEMA.exists(), f"{SCHEMA} missing: run make setup (scripts/setup-system.sh)"
    base = make_base(tmp_path, "trixie")
    xz = base.with_suffix(".img.xz")
    with base.open("rb") as src, lzma.open(xz, "wb", preset=0) as dst:
        shutil.copyfileobj(src, dst, MIB)
    out = tmp_path / "box.img"
    report = _image(xz, out, bundle, deb.rename(tmp_path / "dualrec_0.1.0+deb13_arm64.deb"),
                    "--hostname", "box-7")
    assert "trixie, first boot by cloud-init" in report
    assert out.stat().st_size == base.stat().st_size
    boot, _ = boot_and_root(out)
    fat = FatPartition(out, boot)
    assert "systemd.run" not in fat.read("/cmdline.txt").decode()
    user_data_text = fat.read("/user-data").decode()
    assert user_data_text.startswith("#cloud-config\n")
    user_data = yaml.safe_load(user_data_text)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(user_data, schema)
    assert ["sh", "/boot/firmware/dualrec/firstboot.sh"] in user_data["runcmd"]
    assert user_data["hostname"] == "box-7"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**user_data, "runcmd": "not a list"}, schema)
    meta = yaml.safe_load(fat.read("/meta-data"))
    assert meta["instance-id"].startswith("dualrec-") and meta["local-hostname"] == "box-7"
    net = yaml.safe_load(fat.read("/network-config"))["network"]
    assert net["version"] == 2 and net["ethernets"]["eth0"]["dhcp4"] is True


def test_flash_refuses_system_mounted_and_fixed_disks(tmp_path: Path) -> None:
    """/sys/block and /proc/mounts as the kernel shows them: the disk holding /, a mounted
    card, an internal disk are refused; a card reader's idle disk and a built-in SD slot pass."""
    sys_block = tmp_path / "block"
    for disk, removable, parts in (("sda", "0", ["sda1", "sda2"]), ("sdb", "1", ["sdb1"]),
                                   ("sdc", "1", ["sdc1"]), ("nvme0n1", "0", ["nvme0n1p1"]),
                                   ("mmcblk0", "0", ["mmcblk0p1"])):
        (sys_block / disk).mkdir(parents=True)
        (sys_block / disk / "removable").write_text(removable + "\n")
        for part in parts:
            (sys_block / disk / part).mkdir()
    mounts = ("/dev/sda2 / ext4 rw 0 0\n/dev/sda1 /boot/efi vfat rw 0 0\n"
              "/dev/sdc1 /media/tech/bootfs vfat rw 0 0\nproc /proc proc rw 0 0\n")
    assert any("holds this system's /" in p for p in disk_problems("sda", mounts, sys_block))
    assert any("mounted on /media/tech/bootfs" in p
               for p in disk_problems("sdc", mounts, sys_block))
    assert any("not a removable disk" in p for p in disk_problems("nvme0n1", mounts, sys_block))
    assert any("partition of sdb" in p for p in disk_problems("sdb1", mounts, sys_block))
    assert disk_problems("sdb", mounts, sys_block) == []
    assert disk_problems("mmcblk0", mounts, sys_block) == []


def test_flash_refuses_a_map_of_another_image(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(os.urandom(MIB))
    _run("bmaptool", "create", "--output", str(image) + ".bmap", str(image))
    with image.open("ab") as f:
        f.write(b"x" * 4096)
    with pytest.raises(FlashError, match="is for an image of"):
        flash(image, tmp_path / "card.img")


def test_a_truncated_xz_base_is_refused_and_leaves_no_image(tmp_path: Path, bundle: Path,
                                                            deb: Path) -> None:
    """A download cut short: a clear refusal, and no half-made image to flash by mistake."""
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(4 * MIB))
    xz = tmp_path / "base.img.xz"
    xz.write_bytes(lzma.compress(base.read_bytes(), preset=0)[: 2 * MIB])
    out = tmp_path / "box.img"
    done = CliRunner().invoke(tool, ["image", "--board", "rpi5", "--base", str(xz), "--bundle",
                                     str(bundle), "--out", str(out), "--deb", str(deb)])
    assert done.exit_code == 1 and "truncated or corrupt" in done.output, done.output
    assert not out.exists() and not (tmp_path / "box.img.bmap").exists()
