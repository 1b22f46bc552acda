"""Build the dualrec Debian package for one Raspberry Pi OS release and architecture.

    python packaging/build_deb.py --suite bookworm --arch arm64 [--out build/deb]

The package carries the gateway as wheels, not as an installed tree: dualrec's own wheel and
every third-party wheel the box needs, downloaded here for the target (``pip download
--platform manylinux..._<arch> --python-version X.Y --only-binary=:all:``), so installing needs
no network. Its postinst builds /opt/dualrec/venv with ``--system-site-packages`` from them
(packaging/deb/postinst): picamera2, libcamera, rpi-lgpio, pyaudio and numpy stay the
distribution's. Wheels are tied to one CPython minor version (pydantic-core, av), so there is
one package per release: Bookworm has Python 3.11, Trixie 3.13; Depends pins the minor version.

What goes in: the wheels (/opt/dualrec/wheels), the unit (boards/os/dualrec.service), sysusers.d
and tmpfiles.d entries, the board profiles as conffiles (/etc/dualrec/boards/), the docs.
Built with dpkg-deb from a staging tree (no debhelper: nothing here needs it). Downloaded wheels
are cached in build/wheels/<suite>-<arch>, keyed by what was asked, so a rebuild is offline.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEB_DIR = Path(__file__).resolve().parent / "deb"
MAINTAINER = "Seed 0c00f111 maintainers <maintainers@users.noreply.r-seed-0c00f111.example>"


@dataclass(frozen=True)
class Target:
    suite: str
    python: str  # "3.11"
    debian_suffix: str  # "+deb12": part of the version, so both packages can sit side by side
    glibc_minor: int  # the release's glibc 2.N: the newest manylinux tag its wheels may carry


SUITES = {
    "bookworm": Target("bookworm", "3.11", "+deb12", 36),
    "trixie": Target("trixie", "3.13", "+deb13", 41),
}
# Debian architecture -> the machine name in wheel tags. armhf is absent: cryptography, av and
# pydantic-core publish no armv7l manylinux wheels, so it would mean building them from source.
ARCHES = {"arm64": "aarch64", "amd64": "x86_64"}
# Provided by the distribution, never shipped as a wheel (see pyproject.toml).
FROM_DISTRIBUTION = {"numpy"}
# Guard rails for the download: should anything pull numpy in after all, it must not be 2.x,
# which Bookworm's picamera2 (built against numpy 1.24) cannot use.
CONSTRAINTS = ["numpy<2"]


def requirement_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
    if not match:
        raise SystemExit(f"pyproject.toml: cannot read requirement {req!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def box_requirements(pyproject: dict) -> list[str]:
    """The third-party requirements of `dualrec[box]`, minus those the distribution provides."""
    project = pyproject["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["box"])
    return [r for r in reqs if requirement_name(r) not in FROM_DISTRIBUTION]


def platforms(arch: str, glibc_minor: int) -> list[str]:
    # pip does not widen an explicit --platform to older manylinux levels: list them all.
    machine = ARCHES[arch]
    tags = [f"manylinux_2_{n}_{machine}" for n in range(17, glibc_minor + 1)]
    return [*tags, f"manylinux2014_{machine}", "linux_" + machine, "any"]


def run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def download_wheels(target: Target, arch: str, reqs: list[str], cache: Path) -> list[Path]:
    """Third-party wheels for the target, from the cache when the same request was made."""
    py = target.python.replace(".", "")
    plats = platforms(arch, target.glibc_minor)
    key = hashlib.sha256(json.dumps([reqs, CONSTRAINTS, plats, py]).encode()).hexdigest()[:16]
    stamp = cache / "request.sha256"
    if stamp.exists() and stamp.read_text().strip() == key:
        print(f"wheels for {target.suite}/{arch} from the cache {cache}")
        return sorted(cache.glob("*.whl"))
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    (cache / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (cache / "constraints.txt").write_text("\n".join(CONSTRAINTS) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", target.python, "--implementation", "cp",
           "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none", "--dest", str(cache),
           "-r", str(cache / "requirements.txt"), "-c", str(cache / "constraints.txt")]
    for plat in plats:
        cmd += ["--platform", plat]
    run(cmd)
    stamp.write_text(key + "\n")
    return sorted(cache.glob("*.whl"))


def own_wheel(work: Path) -> Path:
    """dualrec's wheel, built from this checkout (pure Python: one for every target)."""
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--wheel-dir", str(work), str(ROOT)])
    (wheel,) = work.glob("dualrec-*.whl")
    return wheel


def install(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def write(dest: Path, text: str | bytes, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    dest.write_bytes(text)
    dest.chmod(mode)


def changelog(version: str) -> bytes:
    # A native package's changelog, gzip'd without a timestamp (reproducible; lintian wants -n).
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    text = (f"dualrec ({version}) unstable; urgency=medium\n\n"
            "  * Built from the dualrec repository (packaging/build_deb.py).\n\n"
            f" -- {MAINTAINER}  {stamp}\n")
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: dualrec
Comment: The dualrec repository carries no licence file; all rights reserved by its authors.
 The wheels in /opt/dualrec/wheels are third-party packages from PyPI under their own licences,
 each stated in the METADATA file inside its wheel.

Files: *
Copyright: Copyright 2026 dualrec authors
License: other
 All rights reserved.
"""


def control(target: Target, arch: str, version: str, installed_kib: int) -> str:
    major, minor = (int(x) for x in target.python.split("."))
    depends = ", ".join([f"python3 (>= {major}.{minor}~)", f"python3 (<< {major}.{minor + 1})",
                         "python3-venv", "python3-numpy (>= 1:1.24)", "systemd",
                         # the sealer streams each segment through age(1); setpriv ties it to
                         # the gateway's life (firmware/dualrec/age_worker.py)
                         "age"])  # setpriv: util-linux, essential
    return f"""Package: dualrec
Version: {version}
Architecture: {arch}
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Depends: {depends}
Recommends: python3-picamera2, python3-rpi-lgpio, python3-pyaudio, chrony
Section: misc
Priority: optional
Homepage: https://example.invalid/dualrec
Description: dual-record counter box: camera, microphone and teller log, sealed
 The recording gateway of the dualrec counter box, for Raspberry Pi OS
 {target.suite} (Python {target.python}). It records the counter's camera,
 microphone and teller operation log into sealed, encrypted segments and
 uploads them.
 .
 The gateway runs from /opt/dualrec/venv, built at install time without
 network from the wheels this package carries, on top of the distribution's
 picamera2, libcamera, rpi-lgpio, pyaudio and numpy.
"""


def stage(root: Path, target: Target, arch: str, version: str, wheels: list[Path]) -> None:
    for wheel in wheels:
        install(wheel, root / "opt/dualrec/wheels" / wheel.name)
    # /lib, not /usr/lib: Bookworm's lintian and dh still expect units there (usrmerge moves
    # them on Trixie; /lib is a link to usr/lib there, so the path works on both).
    for unit in ("dualrec.service", "dualrec-enroll.service"):
        install(ROOT / "boards/os" / unit, root / "lib/systemd/system" / unit)
    install(DEB_DIR / "sysusers.conf", root / "usr/lib/sysusers.d/dualrec.conf")
    install(DEB_DIR / "tmpfiles.conf", root / "usr/lib/tmpfiles.d/dualrec.conf")
    conffiles = []
    for board in sorted((ROOT / "boards").glob("*.toml")):
        dest = root / "etc/dualrec/boards" / board.name
        install(board, dest)
        conffiles.append("/" + str(dest.relative_to(root)))
    doc = root / "usr/share/doc/dualrec"
    for name in ("technician.md", "boards.md"):
        install(ROOT / "docs" / name, doc / name)
    write(doc / "copyright", COPYRIGHT)
    write(doc / "changelog.gz", changelog(version))
    install(DEB_DIR / "lintian-overrides", root / "usr/share/lintian/overrides/dualrec")

    files = sorted(p for p in root.rglob("*") if p.is_file())
    kib = sum((p.stat().st_size + 1023) // 1024 for p in files)
    debian = root / "DEBIAN"
    write(debian / "control", control(target, arch, version, kib))
    write(debian / "conffiles", "\n".join(conffiles) + "\n")
    for script in ("postinst", "prerm", "postrm"):
        install(DEB_DIR / script, debian / script, 0o755)
    md5 = "".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n"
                  for p in files)
    write(debian / "md5sums", md5)
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)


def build(suite: str, arch: str, out: Path, cache_root: Path, compression: str = "xz") -> Path:
    target = SUITES[suite]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = pyproject["project"]["version"] + target.debian_suffix
    started = time.monotonic()
    third_party = download_wheels(target, arch, box_requirements(pyproject),
                                  cache_root / f"{suite}-{arch}")
    if any(requirement_name(w.name.split("-")[0]) in FROM_DISTRIBUTION for w in third_party):
        raise SystemExit("a wheel of a distribution-provided package was downloaded")
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"dualrec_{version}_{arch}.deb"
    with tempfile.TemporaryDirectory(prefix="dualrec-deb-") as tmp:
        work = Path(tmp)
        wheels = [own_wheel(work / "own"), *third_party]
        stage(work / "root", target, arch, version, wheels)
        run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build",
             str(work / "root"), str(deb)],
            stdout=subprocess.DEVNULL)
    size = deb.stat().st_size / 1e6
    print(f"{deb}: {size:.1f} MB, {len(wheels)} wheels, {time.monotonic() - started:.0f} s")
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append",
                        help="Raspberry Pi OS release (repeatable; default both)")
    parser.add_argument("--arch", choices=sorted(ARCHES), action="append",
                        help="Debian architecture (repeatable; default arm64)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "deb")
    parser.add_argument("--wheel-cache", type=Path, default=ROOT / "build" / "wheels")
    # The wheels are compressed already; xz still saves a few MB on the card, gzip a minute.
    parser.add_argument("--compression", choices=["xz", "gzip"], default="xz")
    args = parser.parse_args(argv)
    for suite in args.suite or sorted(SUITES):
        for arch in args.arch or ["arm64"]:
            build(suite, arch, args.out, args.wheel_cache, args.compression)
    return 0


if __name__ == "__main__":
    sys.exit(main())
