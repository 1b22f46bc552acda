"""`make arm64-check`: the arm64 package on arm64 Debian, for real, under qemu-user emulation.

1. A Debian Bookworm arm64 root from Debian's packages (debootstrap --foreign, then its second
   stage run inside the root by qemu-aarch64 through binfmt_misc), with the package's Debian
   dependencies; built once into build/arm64-root and reused.
2. A bundle (a device key and a site config from dualrec-tool keys: no receiver here, so no
   enrollment and no uplink; the sim board's profile as board.toml) and `dualrec-tool image`
   of a synthetic Bookworm image with it and the .deb; the boot partition's files copied out.
3. The first boot, with no network at all (unshare --net): Bookworm's firstrun.sh, which runs
   dualrec/firstboot.sh: apt installs the .deb offline (the postinst builds /opt/dualrec/venv
   from the shipped wheels only), the bundle moves to /etc/dualrec, the unit is enabled.
4. `dualrec check-config` and `dualrec diag` as the service user, then `dualrec run` for 10 s,
   stopped with SIGTERM as systemd would; the spool is listed afterwards.

Every step prints its command, exit status and wall time. Needs root (debootstrap, chroot).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROOT = ROOT / "build" / "arm64-root"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ["python3", "python3-venv", "python3-numpy", "systemd", "init-system-helpers",
           "ca-certificates"]
TOOL = ROOT / ".venv" / "bin" / "dualrec-tool"
RUN_SECONDS = 10
# The simulated teller terminal (dualrec.sim.terminal, from the box's own venv) writes its
# transactions into a pty; the site's [oplog] port is this link to it.
TTY_LINK = "/tmp/dualrec-tty"
VENV_BIN = "/opt/dualrec/venv/bin"


# The chroot gets a clean environment: nothing of this PC's (PIP_*, proxies) leaks into it.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


def step(title: str, cmd: list[str], *, check: bool = True,
         timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    env = CLEAN_ENV if cmd[:1] in (["chroot"], ["unshare"]) else None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    elapsed = time.monotonic() - started
    out = (done.stdout + done.stderr).strip()
    lines = out.splitlines()
    print("\n".join(lines[-25:]) if lines else "(no output)")
    print(f"-> exit {done.returncode} in {elapsed:.1f} s", flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"{title} failed")
    return done


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev of this machine inside the root, for the length of the block."""
    done: list[Path] = []
    try:
        for src, fs in (("/proc", "proc"), ("/sys", "sysfs"), ("/dev", None)):
            target = root / src.lstrip("/")
            target.mkdir(exist_ok=True)
            cmd = ["mount", "--rbind", src, str(target)] if fs is None else \
                ["mount", "-t", fs, fs, str(target)]
            subprocess.run(cmd, check=True)
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False)


def chroot(*cmd: str, net: bool = False) -> list[str]:
    base = ["chroot", str(CHROOT), *cmd]
    return base if net else ["unshare", "--net", *base]


def build_root() -> None:
    stamp = CHROOT / ".dualrec-root-done"
    if stamp.exists():
        print(f"arm64 root: reusing {CHROOT} (delete it to rebuild)")
        return
    shutil.rmtree(CHROOT, ignore_errors=True)
    CHROOT.parent.mkdir(parents=True, exist_ok=True)
    step("debootstrap, first stage (downloads and unpacks on this PC)",
         ["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
          f"--include={','.join(INCLUDE)}", "bookworm", str(CHROOT), MIRROR])
    step("debootstrap, second stage (arm64 dpkg under qemu-aarch64)",
         chroot("/debootstrap/debootstrap", "--second-stage", net=True))
    stamp.write_text("ok\n")


def start_terminal() -> subprocess.Popen[str]:
    """The simulated teller terminal, as the service user, on TTY_LINK; its script starts when
    a reader opens the link."""
    terminal = subprocess.Popen(
        chroot("setpriv", "--reuid=dualrec", "--regid=dualrec", "--init-groups",
               f"{VENV_BIN}/python", "-m", "dualrec.sim.terminal", "--link", TTY_LINK,
               "--duration-s", str(RUN_SECONDS), "--transactions", "2", "--clap-period-ms",
               "7000", "--wait-reader-s", "300"),
        env=CLEAN_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert terminal.stdout is not None
    print(f"simulated teller terminal: {terminal.stdout.readline().strip()}", flush=True)
    return terminal


def record(args: list[str]) -> None:
    """`dualrec run` as the service user, for RUN_SECONDS after it says READY=1 (sd_notify, on
    a socket inside the root, as systemd would listen), then SIGTERM, as systemd stops it."""
    sock_path = CHROOT / "run" / "dualrec-notify.sock"
    sock_path.parent.mkdir(exist_ok=True)
    sock_path.unlink(missing_ok=True)
    cmd = chroot("setpriv", "--reuid=dualrec", "--regid=dualrec", "--init-groups",
                 f"{VENV_BIN}/dualrec", "run", *args)
    print(f"\n== dualrec run on the sim board, {RUN_SECONDS} s from READY=1, then SIGTERM\n$ "
          + " ".join(cmd), flush=True)
    terminal = start_terminal()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        os.chmod(sock_path, 0o666)
        sock.settimeout(1.0)
        started = time.monotonic()
        # unshare and chroot exec: the Popen's pid is the gateway's
        proc = subprocess.Popen(cmd, env={**CLEAN_ENV, "NOTIFY_SOCKET": "/run/dualrec-notify.sock"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready_at = None
        deadline = started + 600
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in sock.recv(4096) and ready_at is None:
                    ready_at = time.monotonic()
                    print(f"READY=1 after {ready_at - started:.1f} s", flush=True)
            if ready_at is not None and time.monotonic() - ready_at >= RUN_SECONDS:
                break
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        out, _ = proc.communicate(timeout=180)
    terminal.terminate()
    terminal.wait(timeout=60)
    lines = out.strip().splitlines()
    print("\n".join(lines[-30:]) if lines else "(no output)")
    recorded = 0.0 if ready_at is None else stopping - ready_at
    stopped = time.monotonic() - stopping
    print(f"-> exit {proc.returncode}; recorded {recorded:.1f} s after READY, stopped in "
          f"{stopped:.1f} s, {time.monotonic() - started:.1f} s in all", flush=True)


def first_boot_files(deb: Path, bundle: Path) -> Path:
    """The FAT boot partition of a box's image, as `dualrec-tool image` writes it: made from a
    synthetic Raspberry Pi OS Bookworm image (tests/test_image.py builds the same), then copied
    out with mtools into a directory."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "host_tools")]
    from dualrec_tools.diskimage import boot_and_root
    from test_image import make_base  # the synthetic MBR + FAT32 + ext4 image of the tests

    work = ROOT / "build" / "arm64-image"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = make_base(work, "bookworm")
    out = work / "box.img"
    step("dualrec-tool image (rpi5, the bundle, the arm64 package)",
         [str(TOOL), "image", "--board", "rpi5", "--base", str(base), "--bundle", str(bundle),
          "--out", str(out), "--deb", str(deb)])
    boot, _ = boot_and_root(out)
    files = work / "boot"
    files.mkdir()
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name in ("dualrec", "firstrun.sh", "cmdline.txt", "config.txt"):
        subprocess.run(["mcopy", "-s", "-n", "-i", f"{out}@@{boot.start}", f"::/{name}",
                        str(files)], check=True, env=env)
    return files


def find_deb() -> Path:
    debs = sorted((ROOT / "build" / "deb").glob("dualrec_*+deb12_arm64.deb"))
    if not debs:
        raise SystemExit("no arm64 bookworm package in build/deb: run make deb")
    return debs[-1]


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("make arm64-check needs root (debootstrap, chroot, mount)")
    started = time.monotonic()
    build_root()
    deb = find_deb()
    bundle = CHROOT / "tmp" / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(CHROOT / "tmp" / "branch", ignore_errors=True)
    # The bundle: a device key and a site config as the box uses them, made with dualrec-tool's
    # key commands (no receiver here, so no enrollment and no [uplink]: the box spools).
    step("a device key (dualrec-tool keys device)",
         [str(TOOL), "keys", "device", str(bundle), "--id", "arm64-sim"])
    step("the branch's age recipient (dualrec-tool keys branch)",
         [str(TOOL), "keys", "branch", str(CHROOT / "tmp" / "branch"), "--name", "arm64"])
    recipient = (CHROOT / "tmp" / "branch" / "branch.recipient").read_text().split()[-1]
    (bundle / "site.toml").write_text(f"""[device]
id = "arm64-sim"
key = "device.key"

[oplog]
port = "{TTY_LINK}"

[seal]
recipients = ["{recipient}"]

[spool]
dir = "/var/lib/dualrec/spool"
state = "/var/lib/dualrec/state/state.db"
""")
    # The sim board's profile travels in the bundle: firstboot.sh keeps a bundle's board.toml
    # (the image itself is made for a real board, rpi5, whose config.txt lines it appends).
    shutil.copyfile(ROOT / "boards" / "sim.toml", bundle / "board.toml")
    boot = first_boot_files(deb, bundle)
    with mounted(CHROOT):
        step("a fresh box: no dualrec package, no /etc/dualrec, no spool", chroot(
            "sh", "-c", "dpkg --purge dualrec >/dev/null 2>&1; rm -rf /etc/dualrec "
            "/var/lib/dualrec /opt/dualrec /boot/firmware; mkdir -p /boot/firmware"))
        shutil.copytree(boot, CHROOT / "boot" / "firmware", dirs_exist_ok=True)
        step("first boot, no network: firstrun.sh (Bookworm's hook) as the kernel command line "
             "would run it", chroot("bash", "/boot/firmware/firstrun.sh"), timeout=3600)
        step("what the first boot left", chroot("sh", "-c", (
            "tail -n 8 /boot/firmware/dualrec/firstboot.log; echo; "
            "echo done: $(cat /boot/firmware/dualrec/firstboot.done); "
            "echo boot partition: $(ls /boot/firmware /boot/firmware/dualrec); "
            "echo cmdline.txt: $(cat /boot/firmware/cmdline.txt); "
            "echo unit: $(systemctl is-enabled dualrec.service); ls -l /etc/dualrec")))
        args = ["--board", "/etc/dualrec/board.toml", "--site", "/etc/dualrec/site.toml"]
        step("python and numpy the venv sees", chroot(
            f"{VENV_BIN}/python", "-c", "import sys, numpy, av, platform; print(sys.version, "
            "platform.machine(), 'numpy', numpy.__version__, numpy.__file__, 'av', "
            "av.__version__)"), check=False)
        step("dualrec check-config (as the service user)",
             chroot("runuser", "-u", "dualrec", "--", f"{VENV_BIN}/dualrec", "check-config",
                    *args), check=False, timeout=600)
        terminal = start_terminal()
        step("dualrec diag (as the service user), the simulated terminal writing",
             chroot("runuser", "-u", "dualrec", "--", f"{VENV_BIN}/dualrec", "diag", *args),
             check=False, timeout=600)
        terminal.terminate()
        terminal.wait(timeout=60)
        record(args)
        step("what the gateway left in the spool and state", chroot(
            "sh", "-c", "find /var/lib/dualrec -type f -printf '%M %u %s %p\\n' | sort"),
            check=False)
    step("dualrec-tool verify (on this PC) of the spool the arm64 gateway wrote",
         [str(TOOL), "verify", str(CHROOT / "var/lib/dualrec/spool"), "--device-key",
          str(bundle / "device.pub")], check=False)
    print(f"\narm64-check: {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
