"""The receiver's storage interface: what the upload path, retention, metrics and (later) the
branch pages may ask of the place evidence is kept.

`ReceiverStore` (store.py: files under data_dir plus an SQLite index) is the embedded default
and the only implementation today. The interface is small on purpose, so that an archive tier
(an S3-compatible object store with object lock) and a PostgreSQL index can stand behind it
without the HTTP handlers, retention or the metrics changing: nothing outside an implementation
touches a path, a file or SQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # store.py implements this interface and imports the records below
    from dualrec_tools.receiver.store import Device, Outcome


@dataclass(frozen=True)
class Head:
    """The newest header the receiver holds for a device: how a box that lost its chain state
    learns where to resume (GET /v1/devices/{device}/head)."""

    seq: int
    header: bytes
    header_sha256: str


@dataclass(frozen=True)
class DeviceReport:
    """The latest state a box reported of itself (PUT /v1/devices/{device}/report), validated:
    byte counts are non-negative ints, faults short names; no customer data."""

    spool_used_bytes: int
    spool_quota_bytes: int
    spool_free_bytes: int
    unsealed_bytes: int | None
    faults: tuple[str, ...]
    firmware: str
    utc_ns: int  # the box's clock when it reported
    received_ns: int = 0  # the receiver's clock when it stored the report

    @property
    def used_ratio(self) -> float | None:
        """Spool use over its quota (None when the quota is 0)."""
        if self.spool_quota_bytes <= 0:
            return None
        return self.spool_used_bytes / self.spool_quota_bytes


@dataclass(frozen=True)
class DeviceFigures:
    """What metrics and alerts need per device, computed by the storage in one pass."""

    device: str
    enrolled: bool
    headers: int
    payloads: int
    backlog: int  # headers without their payload
    payload_bytes: int
    highest_seq: int | None
    missing: int  # seqs below the highest with no header (deleted by retention excluded)
    forks: int  # fork and bad_link problems, counted with repeats
    problems: dict[str, int]  # kind -> count (repeats included)
    last_contact_ns: int | None
    cert_not_after_ns: int | None  # the enrolled (= the only accepted) client certificate
    deleted: int  # segments deleted by retention
    clock_synced: bool | None  # from the newest header's `clock` (None: no header yet)
    clock_error_ns: int | None  # its est_error_ns (-1: unknown)
    firmware: str | None
    report: DeviceReport | None = None  # the box's own latest state report, if any


@dataclass(frozen=True)
class RetentionCandidate:
    """A segment retention may delete: payload stored and receipted, chain intact below it."""

    device: str
    seq: int
    header_sha256: str
    session: str | None
    end_utc_ns: int
    session_over: bool  # the next segment belongs to another session (or this one is idle)


@runtime_checkable
class Storage(Protocol):
    """Evidence and bookkeeping for the enrolled devices. Every upload call is idempotent on
    (device, seq, header SHA-256) and decides, records and answers in one go."""

    receiver_id: str

    # devices and contact
    def enroll(self, device_id: str, signing_pub_pem: bytes, cert_pem: bytes, *,
               replace: bool = False) -> Device: ...
    def device(self, device_id: str) -> Device | None: ...
    def devices(self) -> list[str]: ...
    def touch(self, device: str) -> None: ...

    # the upload path
    def put_header(self, device: str, seq: int, header_bytes: bytes) -> Outcome: ...
    def put_payload(self, device: str, seq: int, header_sha256: str, chunks: Iterable[bytes],
                    max_size: int) -> Outcome: ...
    def receipt(self, device: str, seq: int) -> bytes | None: ...
    def head(self, device: str) -> Head | None: ...

    # the box's own state: only the latest report per device is kept
    def put_report(self, device: str, report: DeviceReport) -> None: ...
    def report(self, device: str) -> DeviceReport | None: ...

    # problems: aggregated per (device, seq, kind), bounded whatever arrives
    def record_problem(self, device: str, seq: int | None, kind: str, detail: str,
                       evidence: bytes | None = None) -> None: ...

    # reading
    def status(self, device: str) -> dict[str, Any]: ...
    def status_all(self) -> dict[str, Any]: ...
    def figures(self) -> list[DeviceFigures]: ...

    # retention
    def retention_candidates(self, device: str, limit: int) -> list[RetentionCandidate]: ...
    def delete_segments(self, device: str, seqs: list[int]) -> None: ...
    def set_hold(self, device: str, session: str | None, held: bool, note: str = "") -> None: ...
    def holds(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...
