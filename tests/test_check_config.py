"""`dualrec check-config` checks everything `run` needs, and `run` refuses a config or device-key
error with one line and exit 78 (EX_CONFIG, the unit's RestartPreventExitStatus).

Each broken case starts from a real provisioning (dualrec-tool's keys, certificates and site
config), breaks one thing, and asserts the exit status and the one line naming the file, the key
and the reason."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec.cli import main
from dualrec.preflight import EX_CONFIG
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import provision
from helpers import ROOT

SIM = ROOT / "boards" / "sim.toml"


@pytest.fixture(scope="module")
def branch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("branch") / "branch"
    write_branch(path, "test-branch", DEFAULT_RECEIVER_NAMES, force=False)
    return path


@pytest.fixture
def device(tmp_path: Path, branch: Path) -> Path:
    """A provisioned device directory with [uplink]; spool and state under tmp_path/var."""
    out = tmp_path / "device"
    provision(branch, "ctr-0001", "https://127.0.0.1:8443", out, oplog_port="loop://",
              state_dir=str(tmp_path / "var"))
    return out


def check(site: Path) -> tuple[int, list[str], str]:
    done = CliRunner().invoke(main, ["check-config", "--board", str(SIM), "--site", str(site)])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    return done.exit_code, done.stderr.splitlines(), done.stdout


def pem_private(key: object, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, enc)


def set_key(site: Path, section: str, key: str, value: str) -> None:
    """Point site.toml's [section] key at another value."""
    text = site.read_text()
    block = text.index(f"[{section}]")
    start = text.index(f"\n{key} = ", block) + 1
    end = text.index("\n", start)
    site.write_text(text[:start] + f'{key} = "{value}"' + text[end:])


def test_a_good_provisioning_passes(device: Path) -> None:
    status, errors, out = check(device / "site.toml")
    assert (status, errors) == (0, []), errors
    assert "ok (device ctr-0001" in out


def _bad_recipient(site: Path) -> None:
    site.write_text(re.sub(r"recipients = \[.*\]", 'recipients = ["age1nonsense"]',
                           site.read_text()))


def _ec_key(d: Path) -> None:
    (d / "device.key").write_bytes(pem_private(ec.generate_private_key(ec.SECP256R1())))


BROKEN: list[tuple[str, Callable[[Path], None], int, str, str]] = [
    ("device key missing", lambda d: (d / "device.key").unlink(),
     EX_CONFIG, "device.key", "file not found"),
    ("device key of the wrong type", _ec_key, EX_CONFIG, "device.key", "not an Ed25519 key (EC)"),
    ("device key not PEM", lambda d: (d / "device.key").write_text("hello\n"),
     EX_CONFIG, "device.key", "not a PEM private key"),
    ("device key with a passphrase",
     lambda d: (d / "device.key").write_bytes(pem_private(Ed25519PrivateKey.generate(), b"pw")),
     EX_CONFIG, "device.key", "encrypted with a passphrase"),
    ("device key is a directory",
     lambda d: ((d / "device.key").unlink(), (d / "device.key").mkdir()),
     EX_CONFIG, "device.key", "is a directory"),
    ("CA certificate missing", lambda d: (d / "ca.crt").unlink(),
     EX_CONFIG, "uplink.ca", "file not found"),
    ("CA certificate garbled", lambda d: (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n"),
     EX_CONFIG, "uplink.ca", "not a PEM certificate"),
    ("client certificate missing", lambda d: (d / "tls.crt").unlink(),
     EX_CONFIG, "uplink.cert", "file not found"),
    ("TLS key of another certificate",
     lambda d: (d / "tls.key").write_bytes(pem_private(ec.generate_private_key(ec.SECP256R1()))),
     EX_CONFIG, "uplink.key", "does not match the certificate"),
    ("receipt key is not Ed25519",
     lambda d: (d / "receipt.pub").write_bytes(
         ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
             serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)),
     EX_CONFIG, "uplink.receipt_key", "not an Ed25519 public key"),
    ("receipt key missing", lambda d: (d / "receipt.pub").unlink(),
     EX_CONFIG, "uplink.receipt_key", "file not found"),
    ("certificate of another device",
     lambda d: set_key(d / "site.toml", "device", "id", "ctr-9999"),
     EX_CONFIG, "uplink.cert", "not to device ctr-9999"),
    ("bad recipient", lambda d: _bad_recipient(d / "site.toml"), EX_CONFIG, "seal.recipients",
     "'age1nonsense' is not an age X25519 recipient"),
    ("bad escrow recipient",
     lambda d: (d / "site.toml").write_text((d / "site.toml").read_text().replace(
         "[spool]", 'escrow = "age1nope"\n\n[spool]')),
     EX_CONFIG, "seal.escrow", "'age1nope' is not an age X25519 recipient"),
    ("spool dir under a file",
     lambda d: ((d / "blocker").write_text(""),
                set_key(d / "site.toml", "spool", "dir", str(d / "blocker" / "spool"))),
     1, "spool.dir", "blocker is not a directory"),
    ("state dir under a file",
     lambda d: ((d / "blocker").write_text(""),
                set_key(d / "site.toml", "spool", "state", str(d / "blocker" / "s" / "x.db"))),
     1, "spool.state", "blocker is not a directory"),
]


@pytest.mark.parametrize("name, breaks, status, key, reason", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_case_is_one_line(device: Path, name: str, breaks: Callable[[Path], None],
                                      status: int, key: str, reason: str) -> None:
    """One thing broken: check-config exits with its status (78 for configuration and keys,
    1 for the box's disk) and prints exactly one line on stderr, naming the site file, the key
    and the reason."""
    site = device / "site.toml"
    breaks(device)
    got, errors, out = check(site)
    assert got == status, (name, errors)
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith(f"{site}: {key}") and reason in line, line
    assert "Traceback" not in out


def test_several_problems_are_all_listed(device: Path) -> None:
    (device / "device.key").unlink()
    (device / "ca.crt").unlink()
    status, errors, _ = check(device / "site.toml")
    assert status == EX_CONFIG
    assert [re.sub(r" \(.*", "", e.split(": ", 1)[1]) for e in errors] == ["device.key",
                                                                          "uplink.ca"]


def test_bad_board_and_site_are_both_reported(device: Path, tmp_path: Path) -> None:
    board = tmp_path / "board.toml"
    board.write_text(SIM.read_text().replace("fps = 30", "fps = 500"))
    site = device / "site.toml"
    site.write_text(site.read_text() + "\n[bogus]\n")
    done = CliRunner().invoke(main, ["check-config", "--board", str(board), "--site", str(site)])
    assert done.exit_code == EX_CONFIG
    assert done.stderr.splitlines() == [
        f"{board}: camera.fps: Input should be less than or equal to 60",
        f"{site}: bogus: unknown key"]


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[str], Path]]:
    """Real tmpfs mounts (the tests run as root, as `make test` does): a read-only one, a
    small one that is full in the sense of min_free_mb."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        mnt = Path(f"/tmp/dualrec-check-{uuid.uuid4().hex[:8]}")
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True,
                       capture_output=True)
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def test_spool_on_a_read_only_filesystem(device: Path, mount_tmpfs) -> None:
    ro = mount_tmpfs("ro,size=1m")
    site = device / "site.toml"
    set_key(site, "spool", "dir", str(ro))
    site.write_text(site.read_text().replace("[spool]", "[spool]\nmin_free_mb = 0"))
    status, errors, _ = check(site)
    assert status == 1 and len(errors) == 1
    assert errors[0].startswith(f"{site}: spool.dir ({ro})") and "read-only" in errors[0]


def test_free_space_below_the_minimum(device: Path, mount_tmpfs) -> None:
    small = mount_tmpfs("size=512k")
    site = device / "site.toml"
    set_key(site, "spool", "dir", str(small / "spool"))
    site.write_text(site.read_text().replace("[spool]", "[spool]\nmin_free_mb = 1"))
    status, errors, _ = check(site)
    assert status == 1 and len(errors) == 1
    assert errors[0].startswith(f"{site}: spool.min_free_mb") and "below the minimum of 1 MiB" \
        in errors[0]


def test_check_creates_nothing(device: Path, tmp_path: Path) -> None:
    """Run as root by a technician, a check must not leave root-owned directories behind."""
    assert check(device / "site.toml")[0] == 0
    assert not (tmp_path / "var").exists()


def run_gateway(site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualrec.cli", "run", "--board", str(SIM),
                           "--site", str(site), "--duration", "1"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("breaks, expected", [
    (lambda d: (d / "device.key").unlink(), "device.key ({d}/device.key): file not found"),
    (_ec_key, "device.key ({d}/device.key): not an Ed25519 key (EC)"),
    (lambda d: (d / "site.toml").write_text((d / "site.toml").read_text() + "\n[bogus]\n"),
     "bogus: unknown key"),
], ids=["missing device key", "wrong device key type", "config error"])
def test_run_refuses_with_one_line_and_78(device: Path, breaks, expected: str) -> None:
    """`dualrec run` as a real process: exit 78, exactly one line on stderr, no traceback,
    before any device is opened."""
    breaks(device)
    done = run_gateway(device / "site.toml")
    assert done.returncode == EX_CONFIG, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"{device / 'site.toml'}: " + expected.format(d=device)), lines
