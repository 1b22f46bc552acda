"""Receipts: the receiver's signed word that it stored a segment (docs/UPLOAD.md).

Shared by the receiver, which signs them, and the box, which verifies one before deleting the
segment it names."""

from __future__ import annotations

import base64
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dualrec.canonical import CanonicalError, canonical_bytes, parse_canonical
from dualrec.schema import Receipt, SchemaError, validate

RECEIPT_FORMAT = 1
RECEIPT_KEYS = {"device", "format", "header_sha256", "payload_sha256", "payload_size",
                "received_utc_ns", "receiver", "seq", "sig"}


class ReceiptError(ValueError):
    """A receipt is malformed, not signed by the pinned key, or names another segment."""


def sign_receipt(*, device: str, seq: int, header_sha256: str, payload_sha256: str,
                 payload_size: int, received_utc_ns: int, receiver: str,
                 key: Ed25519PrivateKey) -> bytes:
    fields = {"device": device, "format": RECEIPT_FORMAT, "header_sha256": header_sha256,
              "payload_sha256": payload_sha256, "payload_size": payload_size,
              "received_utc_ns": received_utc_ns, "receiver": receiver, "seq": seq}
    sig = base64.b64encode(key.sign(canonical_bytes(fields))).decode()
    return canonical_bytes({**fields, "sig": sig})


def verify_receipt(data: bytes, key: Ed25519PublicKey, *, device: str, seq: int,
                   header_sha256: str, payload_sha256: str) -> dict[str, Any]:
    """Return the receipt if it is signed by key and names exactly this segment; else raise."""
    try:
        receipt = parse_canonical(data)
    except CanonicalError as exc:
        raise ReceiptError(f"receipt is not canonical JSON: {exc}") from None
    try:
        validate(Receipt, receipt)  # types, ranges, canonical base64: one schema for all
    except SchemaError as exc:
        raise ReceiptError(f"receipt breaks the schema: {exc}") from None
    try:
        sig = base64.b64decode(receipt["sig"], validate=True)
        key.verify(sig, canonical_bytes({k: v for k, v in receipt.items() if k != "sig"}))
    except (InvalidSignature, ValueError, TypeError):
        raise ReceiptError("receipt signature does not verify with the pinned receipt key") \
            from None
    expected = {"device": device, "seq": seq, "header_sha256": header_sha256,
                "payload_sha256": payload_sha256, "format": RECEIPT_FORMAT}
    wrong = [k for k, v in expected.items() if receipt[k] != v]
    if wrong:
        raise ReceiptError(f"receipt names another segment ({', '.join(sorted(wrong))} differ)")
    return receipt
