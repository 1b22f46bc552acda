"""The uplink: moves sealed segments from the spool to the branch receiver (docs/UPLOAD.md).

Two threads, so headers are never stuck behind a payload: the header sender announces every
sealed header within about a second; the payload sender sends payloads oldest first under the
bandwidth cap. Every request is idempotent (device, seq, header hash), so any failure is simply
retried with backoff. A segment leaves the spool only after the receipt for exactly its header
has been verified with the pinned receipt key. The uplink knows nothing of what is inside a
segment: it moves opaque files.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from dualrec.config import UplinkSection
from dualrec.ratelimit import Backoff, TokenBucket
from dualrec.receipt import ReceiptError, verify_receipt
from dualrec.samples import Event
from dualrec.spool import Entry, Spool

log = logging.getLogger("dualrec.uplink")

CHUNK = 16 * 1024
HEADER_POLL_S = 0.5
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def client_ssl_context(cfg: UplinkSection) -> ssl.SSLContext:
    """TLS 1.2+ with modern suites, the branch CA pinned, our client certificate presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_verify_locations(cafile=str(cfg.ca))  # only the branch CA: no system store
    ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def load_receipt_key(cfg: UplinkSection) -> Ed25519PublicKey:
    key = load_pem_public_key(cfg.receipt_key.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{cfg.receipt_key}: not an Ed25519 public key")
    return key


class UploadError(Exception):
    """One attempt failed; the sender backs off and tries again."""


@dataclass
class UplinkStats:
    headers_delivered: int = 0
    payloads_delivered: int = 0
    bytes_sent: int = 0
    receipts: int = 0
    failures: int = 0


class Uplink:
    def __init__(self, spool: Spool, cfg: UplinkSection, device_id: str,
                 report: Callable[[Event], None],
                 on_fault: Callable[[str | None], None] = lambda _: None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.spool = spool
        self.cfg = cfg
        self.device = device_id
        self._report = report
        self._on_fault = on_fault
        self._receipt_key = load_receipt_key(cfg)
        self._base = cfg.url.rstrip("/") + f"/v1/devices/{device_id}/segments"
        self._stop = threading.Event()
        # Pacing waits on the stop event, so stop() never waits out a capped payload's pause.
        self._bucket = TokenBucket(cfg.bandwidth_bps, sleep=self._stop.wait)
        self._failing: set[str] = set()
        self._fault_lock = threading.Lock()
        self.stats = UplinkStats()
        self._stats_lock = threading.Lock()
        self._header_first: dict[int, int] = {}  # seq -> "send the header first" answers
        timeout = httpx.Timeout(cfg.timeout_s)
        verify = client_ssl_context(cfg)
        self._clients = [
            httpx.Client(verify=verify, timeout=timeout, transport=transport) for _ in range(2)
        ]
        self._threads = [
            threading.Thread(target=self._loop, args=(self._send_headers, self._clients[0]),
                             name="uplink-headers", daemon=True),
            threading.Thread(target=self._loop, args=(self._send_payload, self._clients[1]),
                             name="uplink-payloads", daemon=True),
        ]

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for seq in self.spool.finish_receipted():
            log.warning("seq %d: receipt was stored before an unclean stop; files removed", seq)
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        for c in self._clients:
            c.close()

    def _loop(self, step: Callable[[httpx.Client], bool], client: httpx.Client) -> None:
        backoff = Backoff(cap_s=self.cfg.backoff_max_s)
        name = threading.current_thread().name
        while not self._stop.is_set():
            try:
                busy = step(client)
            except (UploadError, httpx.HTTPError, OSError) as exc:
                if self._stop.is_set():
                    break  # an upload abandoned by stop() is no fault
                self._count(failures=1)
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.1f s", name, exc, delay)
                self._fault(name, str(exc))
                self._stop.wait(delay)
                continue
            backoff.reset()
            self._clear(name)
            if not busy:
                self._stop.wait(HEADER_POLL_S)

    def _count(self, **add: int) -> None:
        # both senders count (either may deliver a header or accept a receipt): += from two
        # threads can lose an update without the lock
        with self._stats_lock:
            for name, n in add.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _fault(self, who: str, reason: str) -> None:
        with self._fault_lock:
            first = not self._failing
            new = who not in self._failing
            self._failing.add(who)
        if new:
            self._report(Event(time.monotonic_ns(), "fault",
                               {"device": "uplink", "part": who, "reason": reason[:500]}))
        if first:
            self._on_fault("uplink")

    def _clear(self, who: str) -> None:
        with self._fault_lock:
            if who not in self._failing:
                return
            self._failing.discard(who)
            last = not self._failing
        self._report(Event(time.monotonic_ns(), "fault_cleared",
                           {"device": "uplink", "part": who}))
        if last:
            self._on_fault(None)

    # --- the two senders -------------------------------------------------------------------

    def _send_headers(self, client: httpx.Client) -> bool:
        """Announce every header not yet delivered; return False when there was nothing."""
        pending = [e for e in self.spool.entries() if not e.header_delivered]
        for entry in pending:
            if self._stop.is_set():
                break
            self._put_header(client, entry)
        return False

    def _put_header(self, client: httpx.Client, entry: Entry) -> None:
        r = client.put(f"{self._base}/{entry.seq}/header", content=entry.header_bytes,
                       headers={"Content-Type": "application/json"})
        if r.status_code == 202:
            self.spool.mark_header_delivered(entry)
            self._count(headers_delivered=1)
        elif r.status_code == 200:  # payload already there (a lost acknowledgement)
            # Only a verified receipt says the receiver holds it (it then completes the entry);
            # a 200 whose receipt is refused must not mark the header delivered either.
            self._accept_receipt(entry, r.content)
        else:
            raise UploadError(f"seq {entry.seq} header: {_describe(r)}")

    def _send_payload(self, client: httpx.Client) -> bool:
        """Send the oldest payload; return False when the spool is empty."""
        entries = self.spool.entries()
        if not entries:
            return False
        entry = entries[0]
        if not entry.header_delivered:
            self._put_header(client, entry)  # headers first, always
            if not self._still_there(entry):
                return True
        if entry.payload_path is None:
            raise UploadError(f"seq {entry.seq}: payload file missing from the spool")
        try:
            size = entry.payload_path.stat().st_size
        except FileNotFoundError:
            return True  # the header sender got its receipt meanwhile
        if size != entry.payload_size:
            raise UploadError(f"seq {entry.seq}: local payload is {size} bytes, header says "
                              f"{entry.payload_size} (corrupt spool file kept as evidence)")
        r = client.put(f"{self._base}/{entry.seq}/payload", content=self._paced(entry),
                       headers={"Content-Type": "application/octet-stream",
                                "Content-Length": str(size),
                                "X-Dualrec-Header-SHA256": entry.header_sha256})
        if r.status_code == 200:
            self._count(payloads_delivered=1)
            self._accept_receipt(entry, r.content)
            return True
        if r.status_code == 409 and _error(r) == "header_first":
            # The receiver lost our header (restored from a backup?): announce it again and go
            # on at once; only a receiver that keeps forgetting it counts as a fault.
            self.spool.mark_header_undelivered(entry)
            self._header_first[entry.seq] = self._header_first.get(entry.seq, 0) + 1
            if self._header_first[entry.seq] <= 2:
                self._put_header(client, entry)
                return True
        if r.status_code == 422:
            self._check_local(entry)
        raise UploadError(f"seq {entry.seq} payload: {_describe(r)}")

    def _still_there(self, entry: Entry) -> bool:
        return entry.header_path.exists()

    def _paced(self, entry: Entry) -> Iterator[bytes]:
        assert entry.payload_path is not None
        with entry.payload_path.open("rb") as f:
            while chunk := f.read(CHUNK):
                self._bucket.take(len(chunk))
                if self._stop.is_set():
                    # Abandon the body rather than hold stop() for the rest of a payload under
                    # the cap (stop() joins for 5 s, then the gateway closes the spool under
                    # us). The receiver drops a cut-off body; the next start sends it again.
                    raise UploadError(f"seq {entry.seq}: payload upload abandoned: stopping")
                self._count(bytes_sent=len(chunk))
                yield chunk

    def _check_local(self, entry: Entry) -> None:
        assert entry.payload_path is not None
        digest = hashlib.sha256(entry.payload_path.read_bytes()).hexdigest()
        if digest != entry.payload_sha256:
            raise UploadError(f"seq {entry.seq}: local payload does not match its header "
                              "(corrupt spool file kept as evidence)")

    def _accept_receipt(self, entry: Entry, body: bytes) -> None:
        try:
            verify_receipt(body, self._receipt_key, device=self.device, seq=entry.seq,
                           header_sha256=entry.header_sha256,
                           payload_sha256=entry.payload_sha256)
        except ReceiptError as exc:
            raise UploadError(f"seq {entry.seq}: receipt refused, segment kept: {exc}") from None
        self.spool.complete(entry, body)
        self._count(receipts=1)
        log.info("seq %d acknowledged by the receiver; removed from the spool", entry.seq)


def _error(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", ""))
    except ValueError:
        return ""


def _describe(r: httpx.Response) -> str:
    text = r.text[:200].replace("\n", " ") if r.content else ""
    return f"HTTP {r.status_code} {text}".strip()
