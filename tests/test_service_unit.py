"""boards/os/dualrec.service: the settings the gateway's lifecycle relies on, and systemd's own
parser (systemd-analyze verify) finding nothing to complain about."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

UNIT = ROOT / "boards" / "os" / "dualrec.service"
INSTALLED = ("/opt/dualrec/venv/bin/dualrec", "/opt/dualrec/venv/bin/python")


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_settings() -> None:
    """Type=notify with a watchdog only the gateway may feed; exit 78 (config error) is not
    restarted; spool and state are under the StateDirectory, nothing writable under /etc."""
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"] and s["RestartPreventExitStatus"] == ["78"]
    assert s["Restart"] == ["always"] and s["StateDirectory"] == ["dualrec"]
    assert not any("/etc/dualrec" in v for v in s.get("ReadWritePaths", []))
    assert s["ProtectSystem"] == ["strict"]


def _verify(unit_text: str, directory: Path) -> str:
    # verify needs the unit's file name to end in .service and its commands to exist here
    true = shutil.which("true")
    assert true is not None
    for path in INSTALLED:
        unit_text = unit_text.replace(path, true)
    unit = directory / "dualrec.service"
    unit.write_text(unit_text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=directory)
    # systemd-analyze exits 0 on "ignoring" warnings: the output is what tells
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else
                                                 f"\nexit status {done.returncode}")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify (the systemd package, installed by scripts/setup-system.sh) on the
    unit, with the installed paths pointed at an existing program: no output at all. The same
    check on a copy with a misspelt key must complain, so silence means parsed, not skipped."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run make setup"
    assert _verify(UNIT.read_text(), tmp_path) == ""
    bad = tmp_path / "bad"
    bad.mkdir()
    complaint = _verify(UNIT.read_text().replace("NotifyAccess=", "NotifyAcess="), bad)
    assert "NotifyAcess" in complaint


def test_provision_puts_spool_and_state_in_the_state_directory(tmp_path: Path) -> None:
    """`dualrec-tool provision` (the technician's command) writes a site config whose spool,
    chain state and (box-made) keys are under /var/lib/dualrec, where the unit lets the service
    write; the bundle holds no private key."""
    from click.testing import CliRunner

    from dualrec.config import load_site
    from dualrec_tools.cli import main as tool
    from dualrec_tools.receiver.cli import main as receiver

    runner = CliRunner()
    done = runner.invoke(tool, ["keys", "branch", str(tmp_path / "branch"), "--name", "b"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(receiver, ["enroll-token", "--data", str(tmp_path / "data"), "--keys",
                                    str(tmp_path / "branch"), "--device-id", "d-1", "--out",
                                    str(tmp_path / "token.json")])
    assert done.exit_code == 0, done.output
    done = runner.invoke(tool, ["provision", "--branch", str(tmp_path / "branch"), "--id", "d-1",
                                "--receiver-url", "https://127.0.0.1:8443",
                                "--token-file", str(tmp_path / "token.json"),
                                "--out", str(tmp_path / "dev")])
    assert done.exit_code == 0, done.output
    site = load_site(tmp_path / "dev" / "site.toml")
    assert site.spool.dir == Path("/var/lib/dualrec/spool")
    assert site.spool.state == Path("/var/lib/dualrec/state/state.db")
    assert site.uplink is not None
    assert (site.device.key, site.uplink.key, site.uplink.cert) == (
        Path("/var/lib/dualrec/keys/device.key"), Path("/var/lib/dualrec/keys/tls.key"),
        Path("/var/lib/dualrec/keys/tls.crt"))
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == [
        "ca.crt", "enroll.json", "receipt.pub", "site.toml"]


def _security_score(unit: Path) -> float:
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=unit.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def test_systemd_analyze_security_score(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` (systemd 252) scores the unit at or under 4.0,
    printed here; the same unit stripped of its hardening block scores worse, so the figure
    measures the block and not a parser that gave up."""
    unit = tmp_path / "dualrec.service"
    unit.write_text(UNIT.read_text())
    score = _security_score(unit)
    print(f"systemd-analyze security dualrec.service: {score}")
    assert score <= 4.0
    text = UNIT.read_text()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "dualrec.service").write_text(text[:text.index("# Hardening")] + "\n")
    assert _security_score(bare / "dualrec.service") > 8.0


def test_hardening_keeps_what_the_gateway_needs() -> None:
    """No capability at all, only the device drivers the boards use, and adjtimex(2) allowed:
    the gateway reads the kernel's sync state with it (timebase.kernel_sync_state), and both
    ProtectClock= and @system-service alone would deny it."""
    s = _settings(UNIT.read_text())
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert s["DevicePolicy"] == ["closed"] and "ProtectClock" not in s
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    for driver in ("video4linux", "media", "dma_heap", "gpiochip", "ttyUSB", "ttyACM", "ttyAMA",
                   "alsa", "rtc", "pps", "i2c"):
        assert f"char-{driver}" in allowed
    assert s["SystemCallFilter"] == ["@system-service adjtimex"]
    assert "PrivateUsers" not in s  # it would map away the device groups
    assert s["UMask"] == ["0077"]


def test_enroll_unit_verifies(tmp_path: Path) -> None:
    """boards/os/dualrec-enroll.service (first-boot enrollment) parses cleanly too, and does
    not retry what a technician must fix (refused token, bad bundle)."""
    text = (UNIT.parent / "dualrec-enroll.service").read_text()
    assert "RestartPreventExitStatus=1 78" in text and "User=dualrec" in text
    true = shutil.which("true")
    assert true is not None
    text = text.replace("/opt/dualrec/venv/bin/dualrec", true).replace("/bin/systemctl", true)
    unit = tmp_path / "dualrec-enroll.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert (done.stdout + done.stderr).strip() == "" and done.returncode == 0, done
