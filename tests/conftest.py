"""Shared fixtures: keys, a site config in a temp dir, segment building helpers."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helpers import ROOT

for sub in ("firmware", "host_tools"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))


@pytest.fixture
def small_tmpfs():
    """A real 600 KiB tmpfs: a disk that fills up for real (needs root, as CI has)."""
    mnt = Path(f"/tmp/dualrec-full-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
    mnt.rmdir()


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def age_identity() -> pyrage.x25519.Identity:
    return pyrage.x25519.Identity.generate()


@pytest.fixture
def key_files(tmp_path: Path, device_key: Ed25519PrivateKey, age_identity) -> dict[str, Path]:
    """Device key (PEM), its public key, and an age identity file, written under tmp_path."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "device.key").write_bytes(device_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (keys / "device.pub").write_bytes(device_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (keys / "branch.agekey").write_text(f"# test identity\n{age_identity}\n")
    return {"device_key": keys / "device.key", "device_pub": keys / "device.pub",
            "identity": keys / "branch.agekey", "recipient": str(age_identity.to_public())}
