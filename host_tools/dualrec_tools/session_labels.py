"""A session's transaction labels and completeness, read from its sealed events.

The recorder puts `session_labels` {txn, teller, business} and `session_completeness`
{business, required, missing, complete} events into a session's segments (docs/FORMAT.md §5.3);
they are inside the encrypted payloads, so reading them needs the branch identity. Used by
`dualrec-tool sessions --identity` to show and filter, and by export.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyrage

from dualrec.canonical import CanonicalError, parse_canonical
from dualrec_tools.verify import HeaderFile, SessionInfo


@dataclass
class Transaction:
    labels: dict[str, str] = field(default_factory=dict)
    complete: bool | None = None  # None: no completeness on record (the session is open)
    missing: list[str] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # seqs whose events could not be read

    @property
    def completeness(self) -> str:
        if self.complete is None:
            return "unknown"
        return "complete" if self.complete else "incomplete: " + ", ".join(self.missing)


def _events(ciphertext: bytes, identities: Sequence[Any]) -> list[dict[str, Any]]:
    plaintext = pyrage.decrypt(ciphertext, list(identities))
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        member = tar.extractfile("events.jsonl")
        data = member.read() if member is not None else b""
    return [parse_canonical(line) for line in data.splitlines() if line]


def read_transaction(info: SessionInfo, chain: dict[int, HeaderFile],
                     identities: Sequence[Any]) -> Transaction:
    out = Transaction()
    for seq in info.seqs:
        hf = chain.get(seq)
        try:
            if hf is None or hf.payload is None:
                raise OSError("no payload")
            events = _events(hf.payload.read_bytes(), identities)
        except (OSError, pyrage.DecryptError, tarfile.TarError, CanonicalError, KeyError,
                ValueError):
            out.unreadable.append(seq)
            continue
        for ev in events:
            detail = ev.get("detail") if isinstance(ev, dict) else None
            if not isinstance(detail, dict):
                continue
            if ev.get("kind") == "session_labels":
                out.labels.update({k: str(v) for k, v in detail.items()
                                   if k in ("txn", "teller", "business")})
            elif ev.get("kind") == "session_completeness":
                out.complete = detail.get("complete") is True
                out.missing = [str(m) for m in detail.get("missing", [])
                               if isinstance(m, str)]
    return out
