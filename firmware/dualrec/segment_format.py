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
from dualrec.schema import FORMAT_VERSION, SchemaError, canonical_b64decode, check_header

__all__ = ["FORMAT_VERSION"]

GENESIS_PREV = "0" * 64
HEADER_SUFFIX = ".hdr.json"
PAYLOAD_SUFFIX = ".payload.age"
# ASCII digits only and no trailing newline: Python's \d and $ would accept both (FORMAT.md §1).
_NAME = re.compile(r"([0-9]{10})\.(hdr\.json|payload\.age)")
# the box's .NAME.tmp, and the receiver's .NAME.XXXXXXXXXXXX.tmp (a random part per upload)
_TMP_NAME = re.compile(r"\.([0-9]{10})\.(hdr\.json|payload\.age)(\.[0-9a-f]{12})?\.tmp")

AGE_CHUNK = 64 * 1024
AGE_TAG = 16
AGE_NONCE = 16
AGE_MAGIC = b"age-encryption.org/v1\n"


class FormatError(ValueError):
    """A header or payload does not follow the format; the message says which rule."""


def header_name(seq: int) -> str:
    return f"{seq:010d}{HEADER_SUFFIX}"


def payload_name(seq: int) -> str:
    return f"{seq:010d}{PAYLOAD_SUFFIX}"


def parse_name(name: str) -> tuple[int, str] | None:
    """(seq, "header" | "payload") for a segment file name, None for anything else."""
    m = _NAME.fullmatch(name)
    if not m:
        return None
    return int(m.group(1)), "header" if m.group(2) == "hdr.json" else "payload"


def is_temp_name(name: str) -> bool:
    """A segment file being written (`.NAME.tmp`, renamed to NAME when durable)."""
    return _TMP_NAME.fullmatch(name) is not None


def header_hash(header_bytes: bytes) -> str:
    """The chain link: SHA-256 of a header's full canonical bytes, signature included."""
    return hashlib.sha256(header_bytes).hexdigest()


def signed_part(header: dict[str, Any]) -> bytes:
    return canonical_bytes({k: v for k, v in header.items() if k != "sig"})


def sign_header(fields: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Return the canonical bytes of fields plus their Ed25519 signature. The fields are checked
    against the schema first: the box never signs a header the format does not allow."""
    if "sig" in fields:
        raise FormatError("fields to sign already carry a signature")
    try:
        check_header(fields, signed=False)
        data = canonical_bytes(fields)
    except (SchemaError, CanonicalError) as exc:
        raise FormatError(f"refusing to sign an invalid header: {exc}") from None
    sig = key.sign(data)
    return canonical_bytes({**fields, "sig": base64.b64encode(sig).decode()})


def parse_header(data: bytes) -> dict[str, Any]:
    """Parse and check a header's bytes against the schema (the signature is checked by
    verify_signature). Raises FormatError for anything else, never another exception."""
    try:
        header = parse_canonical(data)
    except CanonicalError as exc:
        raise FormatError(f"header is not canonical JSON: {exc}") from None
    try:
        check_header(header)
    except SchemaError as exc:
        raise FormatError(str(exc)) from None
    return header


def verify_signature(header: dict[str, Any], key: Ed25519PublicKey) -> bool:
    """Does header (as parse_header returned it) carry key's signature over its other fields?"""
    try:
        sig = canonical_b64decode(header["sig"], "sig")
        key.verify(sig, signed_part(header))
    except (InvalidSignature, ValueError, KeyError, TypeError):
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
