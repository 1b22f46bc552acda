"""The segment format (docs/FORMAT.md): file names, the signed canonical-JSON header, the hash
chain and the age ciphertext length check. Shared by the gateway, the receiver and the host tools,
so the format lives in one place."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dualrec.canonical import CanonicalError, canonical_bytes, parse_canonical

FORMAT_VERSION = 1
GENESIS_PREV = "0" * 64
HEADER_SUFFIX = ".hdr.json"
PAYLOAD_SUFFIX = ".payload.age"
_NAME = re.compile(r"^(\d{10})\.(hdr\.json|payload\.age)$")

AGE_CHUNK = 64 * 1024
AGE_TAG = 16
AGE_NONCE = 16
AGE_MAGIC = b"age-encryption.org/v1\n"

# Header keys and their types; anything else in a header is refused.
HEADER_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "device": str,
    "boot_id": str,
    "firmware": str,
    "seq": int,
    "session": str,
    "session_index": int,
    "final": bool,
    "reason": str,
    "start": dict,
    "end": dict,
    "clock": dict,
    "streams": dict,
    "payload": dict,
    "prev": str,
    "sig": str,
}


class FormatError(ValueError):
    """A header or payload does not follow the format; the message says which rule."""


def header_name(seq: int) -> str:
    return f"{seq:010d}{HEADER_SUFFIX}"


def payload_name(seq: int) -> str:
    return f"{seq:010d}{PAYLOAD_SUFFIX}"


def parse_name(name: str) -> tuple[int, str] | None:
    """(seq, "header" | "payload") for a segment file name, None for anything else."""
    m = _NAME.match(name)
    if not m:
        return None
    return int(m.group(1)), "header" if m.group(2) == "hdr.json" else "payload"


def header_hash(header_bytes: bytes) -> str:
    """The chain link: SHA-256 of a header's full canonical bytes, signature included."""
    return hashlib.sha256(header_bytes).hexdigest()


def signed_part(header: dict[str, Any]) -> bytes:
    return canonical_bytes({k: v for k, v in header.items() if k != "sig"})


def sign_header(fields: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Return the canonical bytes of fields plus their Ed25519 signature."""
    if "sig" in fields:
        raise FormatError("fields to sign already carry a signature")
    sig = key.sign(canonical_bytes(fields))
    return canonical_bytes({**fields, "sig": base64.b64encode(sig).decode()})


def parse_header(data: bytes) -> dict[str, Any]:
    """Parse and type-check a header's bytes (the signature is checked by verify_signature)."""
    try:
        header = parse_canonical(data)
    except CanonicalError as exc:
        raise FormatError(f"header is not canonical JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    missing = HEADER_KEYS.keys() - header.keys()
    extra = header.keys() - HEADER_KEYS.keys()
    if missing:
        raise FormatError(f"header lacks {sorted(missing)}")
    if extra:
        raise FormatError(f"header has unknown keys {sorted(extra)}")
    for key, kind in HEADER_KEYS.items():
        value = header[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"header field {key!r} has the wrong type")
    if header["format"] != FORMAT_VERSION:
        raise FormatError(f"format version {header['format']} is not supported")
    payload = header["payload"]
    if not isinstance(payload.get("size"), int) or not isinstance(payload.get("sha256"), str):
        raise FormatError("header field 'payload' needs integer size and sha256")
    return header


def verify_signature(header: dict[str, Any], key: Ed25519PublicKey) -> bool:
    try:
        sig = base64.b64decode(header["sig"], validate=True)
        key.verify(sig, signed_part(header))
    except (InvalidSignature, ValueError):
        return False
    return True


def age_header_length(ciphertext: bytes) -> int:
    """Length of the age header, up to and including the MAC line."""
    if not ciphertext.startswith(AGE_MAGIC):
        raise FormatError("payload is not an age v1 file")
    end = ciphertext.find(b"\n--- ")
    if end < 0:
        raise FormatError("age header has no MAC line")
    eol = ciphertext.find(b"\n", end + 1)
    if eol < 0:
        raise FormatError("age header MAC line is not terminated")
    return eol + 1


def age_expected_size(header_len: int, plaintext_len: int) -> int:
    """The exact ciphertext length the age v1 STREAM format implies for a plaintext length."""
    chunks = max(1, -(-plaintext_len // AGE_CHUNK))
    return header_len + AGE_NONCE + plaintext_len + chunks * AGE_TAG


def age_plaintext_size(ciphertext_len: int, header_len: int) -> int | None:
    """Inverse of age_expected_size: the plaintext length, or None if no length fits."""
    body = ciphertext_len - header_len - AGE_NONCE
    if body < AGE_TAG:
        return None
    full, rest = divmod(body, AGE_CHUNK + AGE_TAG)
    if rest == 0:
        return full * AGE_CHUNK
    if rest < AGE_TAG or (rest == AGE_TAG and full > 0):  # an empty last chunk is forbidden
        return None
    return full * AGE_CHUNK + rest - AGE_TAG


@dataclass(frozen=True)
class SegmentFiles:
    seq: int
    header: Path | None
    payload: Path | None


def scan_dir(directory: Path) -> dict[int, SegmentFiles]:
    """Segment files in a directory by seq; files of other names are ignored."""
    found: dict[int, dict[str, Path]] = {}
    for p in directory.iterdir():
        parsed = parse_name(p.name)
        if parsed:
            found.setdefault(parsed[0], {})[parsed[1]] = p
    return {
        seq: SegmentFiles(seq, kinds.get("header"), kinds.get("payload"))
        for seq, kinds in sorted(found.items())
    }
