"""Everything `dualrec run` needs from the files and the disk, checked before it runs
(`dualrec check-config`, and the device key at `run` start).

The config models check the shape of the files (config.py); this checks what they point at:
the device key (present, readable, an unencrypted Ed25519 PEM private key), the uplink's pinned
CA, client certificate and key, the receiver's receipt key, the spool and state directories
(creatable and writable) and the free space. Every problem is one line naming the site file,
the key and the reason. Nothing is created or changed: a check run as root must not leave
root-owned directories the service cannot write.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from dualrec.config import SiteConfig

EX_CONFIG = 78  # sysexits.h: a configuration error; the unit's RestartPreventExitStatus
EX_FAILURE = 1  # something on the box (a directory, free space), not in the configuration


@dataclass(frozen=True)
class Problem:
    key: str  # the site config key, e.g. "device.key"
    path: Path | None
    reason: str
    config: bool = True  # False: the box's disk, not the configuration, is at fault

    def line(self, site: Path) -> str:
        where = f"{self.key} ({self.path})" if self.path is not None else self.key
        return f"{site}: {where}: {self.reason}"


def exit_status(problems: list[Problem]) -> int:
    if not problems:
        return 0
    return EX_CONFIG if any(p.config for p in problems) else EX_FAILURE


def _read(key: str, path: Path) -> bytes | Problem:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return Problem(key, path, "file not found")
    except IsADirectoryError:
        return Problem(key, path, "is a directory, not a file")
    except PermissionError:
        return Problem(key, path, f"not readable by uid {os.getuid()} (permission denied)")
    except OSError as exc:
        return Problem(key, path, f"cannot read: {exc.strerror}")


def _private_key(key: str, path: Path) -> object | Problem:
    data = _read(key, path)
    if isinstance(data, Problem):
        return data
    try:
        return load_pem_private_key(data, password=None)
    except TypeError:  # cryptography says so for a key with a passphrase
        return Problem(key, path, "encrypted with a passphrase: the box needs it unencrypted")
    except ValueError as exc:
        return Problem(key, path, f"not a PEM private key ({_first_line(exc)})")
    except UnsupportedAlgorithm as exc:
        return Problem(key, path, f"a key type this box cannot use ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace(
        "PublicKey", "") or "unknown"


def check_device_key(site: SiteConfig) -> list[Problem]:
    """The segment signing key: what `run` refuses to start without (exit 78)."""
    key = _private_key("device.key", site.device.key)
    if isinstance(key, Problem):
        return [key]
    if not isinstance(key, Ed25519PrivateKey):
        return [Problem("device.key", site.device.key,
                        f"not an Ed25519 key ({_kind(key)}); make one with "
                        "`dualrec-tool keys device`")]
    return []


def _certificates(key: str, path: Path) -> list[x509.Certificate] | Problem:
    data = _read(key, path)
    if isinstance(data, Problem):
        return data
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        return Problem(key, path, f"not a PEM certificate ({_first_line(exc)})")
    return certs


def check_uplink(site: SiteConfig) -> list[Problem]:
    up = site.uplink
    if up is None:
        return []
    problems: list[Problem] = []
    ca = _certificates("uplink.ca", up.ca)
    if isinstance(ca, Problem):
        problems.append(ca)
    cert = _certificates("uplink.cert", up.cert)
    if isinstance(cert, Problem):
        problems.append(cert)
    tls_key = _private_key("uplink.key", up.key)
    if isinstance(tls_key, Problem):
        problems.append(tls_key)
    elif not isinstance(cert, Problem) and not _same_public_key(cert[0], tls_key):
        problems.append(Problem("uplink.key", up.key, f"does not match the certificate {up.cert}"))
    if not isinstance(cert, Problem):
        cn = [a.value for a in cert[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if cn != [site.device.id]:
            problems.append(Problem("uplink.cert", up.cert,
                                    f"issued to {', '.join(map(str, cn)) or 'no CN'}, not to "
                                    f"device {site.device.id}: the receiver will refuse it"))
    receipt = _read("uplink.receipt_key", up.receipt_key)
    if isinstance(receipt, Problem):
        problems.append(receipt)
    else:
        try:
            pub = load_pem_public_key(receipt)
        except ValueError as exc:
            problems.append(Problem("uplink.receipt_key", up.receipt_key,
                                    f"not a PEM public key ({_first_line(exc)})"))
        else:
            if not isinstance(pub, Ed25519PublicKey):
                problems.append(Problem("uplink.receipt_key", up.receipt_key,
                                        f"not an Ed25519 public key ({_kind(pub)})"))
    return problems


def _same_public_key(cert: x509.Certificate, private: object) -> bool:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        mine = private.public_key().public_bytes(  # type: ignore[attr-defined]
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        theirs = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # a key type with no public half, or none a certificate can carry
        return False
    return mine == theirs


def _writable_dir(key: str, path: Path) -> Problem | None:
    """`path` is a writable directory, or the nearest existing ancestor is one (run creates
    the rest). In an existing directory a real file is tried too: os.access says yes to root
    whatever the mode, and nothing of a full filesystem."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            return Problem(key, path, f"{probe} is a dangling symbolic link", config=False)
        probe = probe.parent
    if not probe.is_dir():
        return Problem(key, path, f"{probe} is not a directory", config=False)
    if os.statvfs(probe).f_flag & os.ST_RDONLY:
        return Problem(key, path, f"{probe} is on a read-only filesystem", config=False)
    if not os.access(probe, os.W_OK | os.X_OK):
        return Problem(key, path, f"{probe} is not writable by uid {os.getuid()}", config=False)
    if probe != path:
        return None  # creatable; run makes it (with the service's owner)
    name = probe / f".check-config-{os.getpid()}.tmp"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        what = {errno.EROFS: "on a read-only filesystem", errno.ENOSPC: "on a full filesystem",
                errno.EACCES: "not writable (permission denied)"}.get(exc.errno, exc.strerror)
        return Problem(key, path, f"cannot create a file in it: {what}", config=False)
    os.close(fd)
    os.unlink(name)
    return None


def check_storage(site: SiteConfig) -> list[Problem]:
    sp = site.spool
    problems = [p for p in (_writable_dir("spool.dir", sp.dir),
                            _writable_dir("spool.state", sp.state.parent)) if p is not None]
    if sp.state.exists():
        if not sp.state.is_file():
            problems.append(Problem("spool.state", sp.state, "is not a file", config=False))
        elif not os.access(sp.state, os.R_OK | os.W_OK):
            problems.append(Problem("spool.state", sp.state,
                                    f"not readable and writable by uid {os.getuid()}",
                                    config=False))
    existing = sp.dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        free = shutil.disk_usage(existing).free
        if free < sp.min_free_mb * 2**20:
            problems.append(Problem(
                "spool.min_free_mb", sp.dir,
                f"{free / 2**20:.0f} MiB free on its filesystem, below the minimum of "
                f"{sp.min_free_mb} MiB: new sessions would be refused", config=False))
    return problems


def check_site(site: SiteConfig) -> list[Problem]:
    """Every check `check-config` makes of a loaded site config."""
    return check_device_key(site) + check_uplink(site) + check_storage(site)
