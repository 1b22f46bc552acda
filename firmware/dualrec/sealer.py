"""The sealer: packs a segment, encrypts it with age to the configured recipients, signs its
header with the device key, links it into the chain and commits both files to the spool.

Commit order: payload (durable write), then header (durable write: the commit point), then the
chain state. A failure at any step leaves no file under a final name for an uncommitted seq, and
the same segment can be sealed again under the same seq. pyrage encrypts in memory (in a worker
process, see age_worker.py); the
ciphertext length is checked against what the age format implies before and after the write,
because pyrage's buffered writer has been seen to report success on a failed final flush.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec import __version__
from dualrec.age_worker import AgeWorker
from dualrec.chain import ChainState
from dualrec.durable import WriteError, write_durable
from dualrec.segment import Segment
from dualrec.segment_format import (
    FORMAT_VERSION,
    age_expected_size,
    age_header_length,
    header_name,
    payload_name,
    scan_dir,
    sign_header,
)
from dualrec.timebase import Timebase


class SealError(RuntimeError):
    """A segment could not be sealed; nothing was committed and it can be sealed again."""


@dataclass(frozen=True)
class Sealed:
    seq: int
    header: dict[str, Any]
    header_path: Path
    payload_path: Path


class Sealer:
    def __init__(
        self,
        *,
        device_id: str,
        key: Ed25519PrivateKey,
        recipients: list[str],
        spool_dir: Path,
        chain: ChainState,
        timebase: Timebase,
        boot_id: str,
    ) -> None:
        self.device_id = device_id
        self._key = key
        for r in recipients:  # refuse a bad recipient now, not at the first seal
            pyrage.x25519.Recipient.from_str(r)
        self._recipients = list(recipients)
        self._age = AgeWorker()
        self.spool_dir = spool_dir
        self._chain = chain
        self._tb = timebase
        self.boot_id = boot_id
        spool_dir.mkdir(parents=True, exist_ok=True)

    def recover(self) -> tuple[list[int], list[Path]]:
        """After a crash: adopt committed headers, remove payloads of uncommitted seqs."""
        adopted = self._chain.reconcile(self.spool_dir)
        next_seq = self._chain.head().next_seq
        removed = []
        for seq, files in scan_dir(self.spool_dir).items():
            if seq >= next_seq and files.payload is not None and files.header is None:
                files.payload.unlink()
                removed.append(files.payload)
        for tmp in self.spool_dir.glob(".*.tmp"):
            tmp.unlink()
            removed.append(tmp)
        return adopted, removed

    def seal(self, seg: Segment) -> Sealed:
        clock = self._tb.clock_json(seg.start_ns, seg.end_ns)
        try:
            plaintext = seg.pack(clock)
            ciphertext = self._age.encrypt(plaintext, self._recipients)
        except Exception as exc:  # a muxer or encryption failure must not stop the recorder
            raise SealError(f"packing segment {seg.session}/{seg.index}: {exc}") from exc
        expected = age_expected_size(age_header_length(ciphertext), len(plaintext))
        head = self._chain.head()
        seq = head.next_seq
        anchor = self._tb.current
        fields = {
            "format": FORMAT_VERSION,
            "device": self.device_id,
            "boot_id": self.boot_id,
            "firmware": __version__,
            "seq": seq,
            "session": seg.session,
            "session_index": seg.index,
            "final": seg.final,
            "reason": seg.reason,
            "start": {"mono_ns": seg.start_ns, "utc_ns": self._tb.to_utc_ns(seg.start_ns)},
            "end": {"mono_ns": seg.end_ns, "utc_ns": self._tb.to_utc_ns(seg.end_ns)},
            "clock": {"source": anchor.source, "synced": anchor.synced,
                      "est_error_ns": anchor.est_error_ns},
            "streams": seg.streams_summary(),
            "payload": {"size": len(ciphertext),
                        "sha256": hashlib.sha256(ciphertext).hexdigest()},
            "prev": head.prev,
        }
        header_bytes = sign_header(fields, self._key)
        payload_path = self.spool_dir / payload_name(seq)
        header_path = self.spool_dir / header_name(seq)
        try:
            write_durable(payload_path, ciphertext, expected_size=expected)
            try:
                write_durable(header_path, header_bytes)
            except WriteError:
                payload_path.unlink(missing_ok=True)
                raise
        except WriteError as exc:
            raise SealError(f"segment seq {seq} not committed: {exc}") from exc
        self._chain.advance(seq, header_bytes)
        return Sealed(seq, {**fields}, header_path, payload_path)

    def close(self) -> None:
        self._age.close()
