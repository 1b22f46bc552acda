"""Key material on disk: a device's signing key, a branch's age identity, CA, receiver TLS
certificate and receipt key. Secret files are written 0600, atomically; existing keys are never
replaced silently, since a new key orphans everything sealed or provisioned with the old one."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dualrec_tools.pki import cert_pem, issue, key_pem, make_ca
from dualrec_tools.verify import device_pub_pem

# The same rule as the site config's device.id (dualrec.config.DeviceSection).
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
DEFAULT_RECEIVER_NAMES = ("127.0.0.1", "::1", "localhost")


class KeyExists(FileExistsError):
    """Keys are already there; replacing them needs force."""


def refuse_existing(paths: Sequence[Path], force: bool) -> None:
    # Checked for every file before any is written, so a refusal leaves the set as it was.
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyExists(
            f"{', '.join(existing)} already exist(s); a new key would orphan everything sealed "
            "or provisioned with the old one (--force replaces it)")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with exactly `mode` (fchmod, since the umask may not allow it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_device_key(directory: Path, device_id: str, force: bool) -> Path:
    """Write directory/device.key (Ed25519, PKCS#8 PEM, 0600) and directory/device.pub (the
    public key labelled with the device id); return the public key's path."""
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"device id {device_id!r}: letters, digits, '_', '.', '-'; at most 64; "
                         "starting with a letter or digit")
    key_path, pub_path = directory / "device.key", directory / "device.pub"
    refuse_existing([key_path, pub_path], force)
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_file(key_path, key_pem(key), SECRET_MODE)
    write_file(pub_path, device_pub_pem(key.public_key(), device_id), PUBLIC_MODE)
    return pub_path


def write_branch_identity(directory: Path, force: bool) -> str:
    """Write an age X25519 identity (branch.agekey, in age-keygen's format) and its recipient
    (branch.recipient); return the recipient."""
    key_path, rcpt_path = directory / "branch.agekey", directory / "branch.recipient"
    refuse_existing([key_path, rcpt_path], force)
    directory.mkdir(parents=True, exist_ok=True)
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    created = datetime.now(UTC).astimezone().isoformat(timespec="seconds")
    write_file(key_path, (f"# created: {created}\n# public key: {recipient}\n"
                          f"{identity}\n").encode(), SECRET_MODE)
    write_file(rcpt_path, f"{recipient}\n".encode(), PUBLIC_MODE)
    return recipient


BRANCH_FILES = ("ca.key", "ca.crt", "receiver.key", "receiver.crt", "receipt.key", "receipt.pub",
                "branch.agekey", "branch.recipient")


def write_branch(directory: Path, name: str, receiver_names: Sequence[str],
                 force: bool) -> str:
    """All of a branch's key material (see BRANCH_FILES); return the age recipient.

    The age identity decrypts recordings and belongs with the auditors, not on the receiver:
    the receiver needs only ca.crt, receiver.key/.crt and receipt.key.
    """
    refuse_existing([directory / f for f in BRANCH_FILES], force)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(name)
    srv_key, srv_cert = issue(ca_key, ca_cert, f"{name} receiver",
                              server_names=list(receiver_names))
    receipt = Ed25519PrivateKey.generate()
    write_file(directory / "ca.key", key_pem(ca_key), SECRET_MODE)
    write_file(directory / "ca.crt", cert_pem(ca_cert), PUBLIC_MODE)
    write_file(directory / "receiver.key", key_pem(srv_key), SECRET_MODE)
    write_file(directory / "receiver.crt", cert_pem(srv_cert), PUBLIC_MODE)
    write_file(directory / "receipt.key", key_pem(receipt), SECRET_MODE)
    write_file(directory / "receipt.pub", receipt.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), PUBLIC_MODE)
    return write_branch_identity(directory, force=True)
