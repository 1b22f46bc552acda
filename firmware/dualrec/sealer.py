"""The sealer: packs a segment, encrypts it with age to the configured recipients, signs its
header with the device key, links it into the chain and commits both files to the spool.

Commit order: payload (durable write), then header (durable write: the commit point), then the
chain state. A failure at any step leaves no file under a final name for an uncommitted seq, and
the same segment can be sealed again under the same seq. A failure of the chain-state update
after the header is committed (its SQLite on a full or failing disk) does not undo the seal: the
segment is sealed, the sealer keeps the header's bytes and brings the state up to date before it
issues another seq, so a seq is never issued twice nor skipped.

Encryption streams (issue 14): the tar's pieces (Segment.pack_chunks) go into Debian's `age`
binary over a pipe and its output straight into the payload's temporary file, hashed on the way
(age_worker.py); neither the whole plaintext nor the ciphertext is ever one buffer, and the
plaintext is never on disk. The ciphertext's length is checked against what the age format
implies for the plaintext's before the file is made durable, and the size on disk after it,
because a writer has been seen to report success on a failed final flush (pyrage's, on ENOSPC).
The header's schema is checked with stand-ins for the payload's size and hash before anything is
written, then signed with the real ones.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec import __version__
from dualrec.age_worker import AgeWorker, Encrypted
from dualrec.chain import ChainState
from dualrec.durable import WriteError, write_durable, write_durable_from
from dualrec.segment import Segment
from dualrec.segment_format import (
    FORMAT_VERSION,
    FormatError,
    age_expected_size,
    header_hash,
    header_name,
    parse_header,
    payload_name,
    scan_dir,
    sign_header,
)
from dualrec.timebase import Timebase

# Space on the spool's filesystem that segments never take: room for the spool's and chain
# state's SQLite (a receipt and a state update are a few 4 KiB WAL pages each).
BOOKKEEPING_RESERVE = 128 * 1024
# Bound for an age header (~100 bytes and one ~90-byte stanza per recipient) and for a segment's
# header file (~1 KB): the room a seal asks for before the exact sizes are known.
HEADER_ROOM = 8192


class SealError(RuntimeError):
    """A segment could not be sealed; nothing was committed and it can be sealed again."""


class ChainLagError(RuntimeError):
    """The chain state is behind a committed header and could not be brought up to date;
    nothing new can be sealed until it is (catch_up() retries)."""


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
        # (seq, header bytes) of a committed header the chain state has not recorded yet
        self._lag: tuple[int, bytes] | None = None
        self.lag_error: BaseException | None = None
        self._hold_lock = threading.Lock()
        self._held: str | None = None  # why no seq may be issued yet (the head is unknown)
        self._first: list[Segment] = []
        spool_dir.mkdir(parents=True, exist_ok=True)

    def recover(self) -> tuple[list[int], list[Path]]:
        """After a crash: adopt committed headers, remove payloads of uncommitted seqs.

        A state database that cannot be written right now (full, read-only, I/O errors) does
        not stop the start: the one committed header it misses becomes the lag that catch_up()
        records before any new seq is issued. A spool that cannot be cleaned keeps its stray
        files (the next seal of that seq replaces an uncommitted payload)."""
        try:
            adopted = self._chain.reconcile(self.spool_dir)
        except Exception as exc:
            self._defer_adoption(exc)
            adopted = []
        next_seq = self._chain.head().next_seq
        removed = []
        for seq, files in scan_dir(self.spool_dir).items():
            if seq >= next_seq and files.payload is not None and files.header is None:
                with contextlib.suppress(OSError):
                    files.payload.unlink()
                    removed.append(files.payload)
        for tmp in self.spool_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
        return adopted, removed

    def open_session(self) -> tuple[str, str, int, int, int] | None:
        """The session a crash left open, as ChainState.open_session() gives it, counting the
        committed header the state has not adopted yet (its session index is taken)."""
        if self._lag is None:
            return self._chain.open_session()
        h = parse_header(self._lag[1])
        if h["final"]:
            return None
        return (h["session"], h["boot_id"], h["session_index"] + 1, h["end"]["mono_ns"],
                h["end"]["utc_ns"])

    def _defer_adoption(self, exc: Exception) -> None:
        """Keep the committed header the state could not adopt as the lag, if it is exactly
        the next one and links to the state; anything else is not a write failure: raise."""
        head = self._chain.head()
        spool = scan_dir(self.spool_dir)
        files = spool.get(head.next_seq)
        if files is None or files.header is None or head.next_seq + 1 in spool:
            raise exc
        data = files.header.read_bytes()
        if parse_header(data)["prev"] != head.prev:
            raise exc
        self._lag = (head.next_seq, data)
        self.lag_error = exc

    @property
    def lagging(self) -> bool:
        """A committed header is not in the chain state yet (catch_up() will record it)."""
        return self._lag is not None

    def catch_up(self) -> bool:
        """Record a committed header the chain state missed; True if there was one.

        Uses the header's bytes kept in memory, not the spool file: the uplink may already have
        delivered and removed it. Raises ChainLagError while the state cannot be written."""
        if self._lag is None:
            return False
        seq, header_bytes = self._lag
        try:
            head = self._chain.head()
            if head.next_seq == seq + 1 and head.prev == header_hash(header_bytes):
                pass  # the failed update had landed after all (an error reported late)
            elif head.next_seq == seq:
                self._chain.advance(seq, header_bytes)
            else:
                raise RuntimeError(f"chain state at seq {head.next_seq}, expected {seq}")
        except Exception as exc:
            self.lag_error = exc
            raise ChainLagError(f"chain state not updated for committed seq {seq}: "
                                f"{type(exc).__name__}: {exc}") from exc
        self._lag = None
        self.lag_error = None
        return True

    @property
    def public_key(self):  # -> Ed25519PublicKey: to recognise this device's own headers
        return self._key.public_key()

    def hold(self, reason: str) -> None:
        """Issue no seq until resume(): the chain's head is not known yet (dualrec.chain_resume);
        segments wait in memory, retried by the seal worker."""
        with self._hold_lock:
            self._held = reason

    def resume(self, head_header: bytes | None, first: list[Segment] | None = None) -> None:
        """Continue after head_header (proven to be this device's newest), or from genesis
        when None; `first` (the closing segment of the head's open session, the record of the
        resume) is sealed before anything else."""
        with self._hold_lock:
            if head_header is not None:
                self._chain.adopt(head_header)
            self._first = list(first or [])
            self._held = None

    def seal(self, seg: Segment) -> Sealed:
        with self._hold_lock:
            if self._held is not None:
                raise SealError(self._held)
        while self._first:  # sealed before anything else, also when a try fails
            self._seal(self._first[0])
            self._first.pop(0)
        return self._seal(seg)

    def _seal(self, seg: Segment) -> Sealed:
        # Never issue a seq while a committed one is missing from the state: it would be
        # issued twice (a fork) or, after a restart from a stale state, overwritten.
        self.catch_up()
        clock = self._tb.clock_json(seg.start_ns, seg.end_ns)
        try:
            pieces = seg.pack_chunks(clock)
        except Exception as exc:  # a muxer failure must not stop the recorder
            raise SealError(f"packing segment {seg.session}/{seg.index}: {exc}") from exc
        plain_size = sum(len(p) for p in pieces)
        head = self._chain.head()
        seq = head.next_seq
        # The quality of the anchor in force at the segment's end: clock.json's last, so a
        # verifier can check the header against the payload (FORMAT.md §3).
        anchor = clock["anchors"][-1]
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
            "clock": {"source": anchor["source"], "synced": anchor["synced"],
                      "est_error_ns": anchor["est_error_ns"]},
            "streams": seg.streams_summary(),
            # stand-ins until the ciphertext exists: the schema is checked before any write
            "payload": {"size": plain_size, "sha256": "0" * 64},
            "prev": head.prev,
        }
        try:
            sign_header(fields, self._key)  # checks the schema first
        except FormatError as exc:  # a bug, not the disk: on record, never a silent drop
            raise SealError(f"segment {seg.session}/{seg.index}: {exc}") from exc
        payload_path = self.spool_dir / payload_name(seq)
        header_path = self.spool_dir / header_name(seq)
        done: list[Encrypted] = []

        def encrypt(fd: int) -> tuple[int, int]:
            # The tar streams through age into the payload's temporary file: the plaintext
            # is never in one buffer, the ciphertext never in memory, hashed on the way.
            enc = self._age.encrypt_to(pieces, self._recipients, fd)
            done.append(enc)
            return enc.size, age_expected_size(enc.header_size, plain_size)

        try:
            # The ciphertext's exact size is known once age has written its header: room for
            # it with a generous header, and for the segment's header file.
            self._check_room(age_expected_size(HEADER_ROOM, plain_size) + HEADER_ROOM)
            write_durable_from(payload_path, encrypt)
        except WriteError as exc:
            raise SealError(f"segment seq {seq} not committed: {exc}") from exc
        except Exception as exc:  # age refused or died: nothing under a final name
            raise SealError(f"encrypting segment {seg.session}/{seg.index}: {exc}") from exc
        fields["payload"] = {"size": done[0].size, "sha256": done[0].sha256}
        try:
            header_bytes = sign_header(fields, self._key)
            write_durable(header_path, header_bytes)  # the commit point
        except (WriteError, FormatError) as exc:
            with contextlib.suppress(OSError):  # else recover() removes it at the next start
                payload_path.unlink(missing_ok=True)
            raise SealError(f"segment seq {seq} not committed: {exc}") from exc
        try:
            self._chain.advance(seq, header_bytes)
        except Exception as exc:
            # The header is committed (the commit point): the segment is sealed and must not
            # be sealed again. The state is brought up to date before the next seq.
            self._lag = (seq, header_bytes)
            self.lag_error = exc
        return Sealed(seq, {**fields}, header_path, payload_path)

    def _check_room(self, size: int) -> None:
        """Refuse to take the spool's last BOOKKEEPING_RESERVE bytes: with the disk filled to
        the last block by segments, the uplink could not record a receipt (SQLite needs room
        in its WAL), so it could never delete a delivered segment and free space: the box
        would stay full for good. Raised as ENOSPC, like the write itself would fail."""
        st = os.statvfs(self.spool_dir)
        free = st.f_bavail * st.f_frsize
        if free < size + BOOKKEEPING_RESERVE:
            raise WriteError(errno.ENOSPC, f"No space left on device for a segment of {size} "
                             f"bytes: {free} bytes free, {BOOKKEEPING_RESERVE} kept for the "
                             "spool's bookkeeping")

    def close(self) -> None:
        self._age.close()
