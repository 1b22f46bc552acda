"""The Debian package (packaging/build_deb.py, `make deb`), built here for amd64/Bookworm: what
it holds, lintian without errors, and the offline install its postinst performs (a venv with
--system-site-packages from the shipped wheels only) run for real."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "packaging"))
import build_deb

pytestmark = pytest.mark.xdist_group("deb")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("dpkg-deb") and shutil.which("lintian"), "run make setup"
    # The wheel cache is the one `make deb` uses: only the first run downloads from PyPI.
    return build_deb.build("bookworm", "amd64", tmp_path_factory.mktemp("deb"),
                           ROOT / "build" / "wheels", compression="gzip")


def _contents(deb: Path) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    return {line.split()[5].removeprefix(".") for line in listing.splitlines()}


def test_control_and_contents(deb: Path) -> None:
    """Depends pins the Python minor version the wheels were built for and takes numpy from the
    distribution; the unit, sysusers.d, tmpfiles.d and the wheels are in; no numpy wheel."""
    info = subprocess.run(["dpkg-deb", "--field", str(deb)], capture_output=True, text=True,
                          check=True).stdout
    control = email.parser.Parser().parsestr(info)
    assert control["Package"] == "dualrec" and control["Architecture"] == "amd64"
    depends = control["Depends"]
    assert "python3 (>= 3.11~)" in depends and "python3 (<< 3.12)" in depends
    assert "python3-numpy" in depends and "python3-venv" in depends
    assert "python3-picamera2" in control["Recommends"]
    files = _contents(deb)
    for path in ("/lib/systemd/system/dualrec.service", "/usr/lib/sysusers.d/dualrec.conf",
                 "/usr/lib/tmpfiles.d/dualrec.conf", "/etc/dualrec/boards/rpi5.toml",
                 "/usr/share/doc/dualrec/copyright"):
        assert path in files
    wheels = {Path(f).name for f in files if f.startswith("/opt/dualrec/wheels/")}
    assert any(w.startswith("dualrec-0.1.0-") for w in wheels)
    assert any(w.startswith("av-") and "x86_64" in w for w in wheels)
    assert not any(w.startswith(("numpy-", "aiohttp-", "mpremote-")) for w in wheels), wheels
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert "/etc/dualrec/boards/rpi5.toml" in conffiles


def test_lintian_finds_no_error(deb: Path) -> None:
    done = subprocess.run(["lintian", "--fail-on", "error", "--tag-display-limit", "0",
                           str(deb)], capture_output=True, text=True, timeout=300)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\nE: " not in "\n" + done.stdout


def test_offline_install_as_postinst_does(deb: Path, tmp_path: Path) -> None:
    """The postinst's venv step against the package's own wheels, with no index: Debian's
    python3 (3.11 on Bookworm), its numpy seen through --system-site-packages, the gateway's
    command line answering. (Not dpkg --install: that would write this machine's /opt and
    /etc; `make arm64-check` does the real install in a Debian root.)"""
    python = Path("/usr/bin/python3")
    assert python.exists()
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(tmp_path / "root")], check=True)
    wheels = tmp_path / "root/opt/dualrec/wheels"
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    subprocess.run([str(venv / "bin/pip"), "install", "--quiet", "--no-index", "--find-links",
                    str(wheels), "--disable-pip-version-check", "--no-cache-dir",
                    "dualrec[box]"], check=True, timeout=300)
    probe = ("import numpy, av, dualrec.gateway; print(numpy.__file__)")
    where = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True,
                           text=True, check=True, timeout=60).stdout.strip()
    assert where.startswith("/usr/lib/python3/dist-packages/"), where  # Debian's, not a wheel
    done = subprocess.run([str(venv / "bin/dualrec"), "check-config", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
