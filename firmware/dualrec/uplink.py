"""The uplink: moves sealed segments from the spool to the branch receiver (docs/UPLOAD.md).

Two threads, so headers are never stuck behind a payload: the header sender announces every
sealed header within about a second; the payload sender sends payloads oldest first under the
bandwidth cap. Every request is idempotent (device, seq, header hash), so any failure is simply
retried with backoff. A segment leaves the spool only after the receipt for exactly its header
has been verified with the pinned receipt key. The uplink knows nothing of what is inside a
segment: it moves opaque files.

No segment holds up the others (docs/UPLOAD.md "Refusals"): a refusal that will not change (fork,
bad link, malformed, bad signature, oversized, a corrupt local payload) quarantines the segment
(kept on the box, on record as `upload_quarantined`, on the LED, in status(); offered again once an
hour and at each start); a refusal of one segment that may pass later (5xx, 429, 422 on an intact
file) holds that segment back with its own backoff while the rest flow. Any other error of either
sender, of any type (a spool SQLite on a full disk included), is retried with backoff.

When the gateway gives it a `state` callable, a light third loop also reports the box's own state
(spool use, quota, active fault names, firmware; no customer data) to
`PUT /v1/devices/{id}/report` at start and every REPORT_INTERVAL_S, on a client of its own. A
failed report is logged at a limited rate and retried at the next interval: it is never a fault
and never touches the senders.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from dualrec import __version__, renew
from dualrec.config import UplinkSection
from dualrec.ratelimit import Backoff, TokenBucket
from dualrec.receipt import ReceiptError, verify_receipt
from dualrec.samples import Event
from dualrec.spool import Entry, Spool

log = logging.getLogger("dualrec.uplink")

CHUNK = 16 * 1024
HEADER_POLL_S = 0.5
QUARANTINE_RETRY_S = 3600.0  # a quarantined segment is offered again this often (branch fixes)
INTACT_422_LIMIT = 3  # 422s on a payload that checks out locally before it is quarantined

# docs/UPLOAD.md: the receiver's refusal words, by what retrying can change.
PERMANENT = frozenset({"fork", "bad_link", "malformed", "seq_mismatch", "bad_seq",
                       "bad_request", "bad_signature", "oversized"})
DEVICE_WIDE = frozenset({"unknown_device", "device_mismatch", "cert_mismatch"})
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
REPORT_INTERVAL_S = 60.0  # the box's state report (docs/UPLOAD.md "State report")
REPORT_LOG_S = 600.0  # at most one warning per this many seconds about failing reports
REPORT_FIELDS = ("spool_used_bytes", "spool_quota_bytes", "spool_free_bytes", "unsealed_bytes")
MAX_REPORT_FAULTS = 32  # the receiver's limits on the faults list
FAULT_NAME_MAX = 64
_NOT_NAME = re.compile(r"[^a-z0-9_:.-]")


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


class SegmentRefused(UploadError):
    """The receiver refused this one segment. permanent: retrying cannot change the answer
    (quarantine it); else hold it back with its own backoff. sender_backoff: the refusal says
    the receiver itself is in trouble (5xx, 429), so the sender backs off as well."""

    def __init__(self, seq: int, text: str, word: str, *, permanent: bool,
                 sender_backoff: bool = False) -> None:
        super().__init__(text)
        self.seq, self.word = seq, word
        self.permanent, self.sender_backoff = permanent, sender_backoff


def classify(seq: int, what: str, r: httpx.Response) -> UploadError:
    """The error for a refusal of `what` (header, payload) of seq: docs/UPLOAD.md "Refusals"."""
    word = _error(r)
    text = f"seq {seq} {what}: {_describe(r)}"
    code = r.status_code
    if word in DEVICE_WIDE or (code == 403 and word != "bad_signature"):
        return UploadError(text)  # this box is not recognised: no segment can pass
    if word in PERMANENT or code == 413:
        return SegmentRefused(seq, text, word or str(code), permanent=True)
    return SegmentRefused(seq, text, word or str(code), permanent=False,
                          sender_backoff=code >= 500 or code == 429)


@dataclass
class UplinkStats:
    headers_delivered: int = 0
    payloads_delivered: int = 0
    bytes_sent: int = 0
    receipts: int = 0
    failures: int = 0
    quarantined: int = 0  # segments quarantined now (kept on the box, refused for good)
    held_back: int = 0  # refusals of one segment that held it back while the others went on


class Uplink:
    def __init__(self, spool: Spool, cfg: UplinkSection, device_id: str,
                 report: Callable[[Event], None],
                 on_fault: Callable[[str | None], None] = lambda _: None,
                 transport: httpx.BaseTransport | None = None,
                 on_quarantine: Callable[[str | None], None] = lambda _: None,
                 state: Callable[[], dict[str, Any]] | None = None,
                 report_interval_s: float = REPORT_INTERVAL_S) -> None:
        self.spool = spool
        self.cfg = cfg
        self.device = device_id
        self._report = report
        self._on_fault = on_fault
        self._on_quarantine = on_quarantine
        self._receipt_key = load_receipt_key(cfg)
        self._base = cfg.url.rstrip("/") + f"/v1/devices/{device_id}/segments"
        self._report_url = cfg.url.rstrip("/") + f"/v1/devices/{device_id}/report"
        self._state = state
        self._report_interval = report_interval_s
        self.reports_sent = 0  # state reports the receiver accepted (tests, diag)
        self._stop = threading.Event()
        # Pacing waits on the stop event, so stop() never waits out a capped payload's pause.
        self._bucket = TokenBucket(cfg.bandwidth_bps, sleep=self._stop.wait)
        self._failing: set[str] = set()
        self._fault_lock = threading.Lock()
        self.stats = UplinkStats()
        self._stats_lock = threading.Lock()
        self._header_first: dict[int, int] = {}  # seq -> "send the header first" answers
        # Per-segment state, shared by both senders (under _seg_lock): when a held-back or
        # quarantined segment may be offered again, its own backoff, and 422s on intact files.
        self._seg_lock = threading.Lock()
        self._not_before: dict[int, float] = {}
        self._seg_backoff: dict[int, Backoff] = {}
        self._intact_422: dict[int, int] = {}
        self._quarantine: dict[int, str] = {}  # seq -> reason, as last seen in the spool
        self._receipted_left = False  # files of receipted segments still to remove
        self._quarantine_shown = False
        self._unexpected: set[tuple[str, str]] = set()  # (sender, type): traceback logged
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
            # Renews the client certificate before it runs out, into the same TLS context
            # (renew.py); idle otherwise.
            threading.Thread(target=renew.run, args=(self._stop, cfg, device_id, verify,
                                                     transport),
                             name="uplink-renew", daemon=True),
        ]
        if state is not None:
            self._clients.append(httpx.Client(verify=verify, timeout=timeout,
                                              transport=transport))
            self._threads.append(threading.Thread(target=self._report_loop,
                                                  args=(self._clients[2],),
                                                  name="uplink-report", daemon=True))

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        # Segments whose receipt was stored before an unclean stop are finished by the payload
        # sender (retried like any step: the spool's disk may be failing right now).
        self._receipted_left = True
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
            except Exception as exc:  # any type: a sender thread must never die
                if self._stop.is_set():
                    break  # an upload abandoned by stop() is no fault
                self._count(failures=1)
                delay = backoff.next_delay()
                expected = isinstance(exc, (UploadError, httpx.HTTPError, OSError))
                if not expected and (name, type(exc).__name__) not in self._unexpected:
                    # first of its kind: the traceback once (a SQLite error on a full disk, a
                    # bug); later ones are the one-line warning below
                    self._unexpected.add((name, type(exc).__name__))
                    log.error("%s: unexpected %s; retrying with backoff", name,
                              type(exc).__name__, exc_info=exc)
                log.warning("%s: %s: %s; retrying in %.1f s", name, type(exc).__name__, exc,
                            delay)
                self._fault(name, str(exc) if expected else f"{type(exc).__name__}: {exc}")
                self._stop.wait(delay)
                continue
            backoff.reset()
            self._clear(name)
            if not busy:
                self._stop.wait(HEADER_POLL_S)

    # --- the state report ------------------------------------------------------------------

    def _report_loop(self, client: httpx.Client) -> None:
        """Report at start and every interval; a failure is a rate-limited warning, no more."""
        last_warned = -REPORT_LOG_S
        missed = 0
        while not self._stop.is_set():
            try:
                self._send_report(client)
                if missed:
                    log.info("state report delivered again after %d failed attempt(s)", missed)
                missed = 0
            except Exception as exc:  # any type: this thread must never die, nor disturb
                if self._stop.is_set():
                    break
                missed += 1
                now = time.monotonic()
                if now - last_warned >= REPORT_LOG_S:
                    last_warned = now
                    log.warning("state report not delivered (%d in a row): %s: %s", missed,
                                type(exc).__name__, exc)
            self._stop.wait(self._report_interval)

    def report_body(self) -> dict[str, Any]:
        """The state report: the gateway's figures (non-negative ints), the active fault names
        made safe for the receiver, the firmware and the UTC time. No customer data."""
        assert self._state is not None
        figures = self._state()
        body: dict[str, Any] = {k: max(0, int(figures[k])) for k in REPORT_FIELDS
                                if figures.get(k) is not None}
        names = []
        for raw in figures.get("faults", []):
            name = _NOT_NAME.sub("_", str(raw).lower())[:FAULT_NAME_MAX]
            if name and name not in names:
                names.append(name)
        body["faults"] = names[:MAX_REPORT_FAULTS]
        body["firmware"] = __version__
        body["utc_ns"] = time.time_ns()
        return body

    def _send_report(self, client: httpx.Client) -> None:
        r = client.put(self._report_url, json=self.report_body())
        if r.status_code != 204:
            raise UploadError(f"report: {_describe(r)}")
        self.reports_sent += 1

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

    def _ready(self, entry: Entry, now: float) -> bool:
        """Whether a sender may offer this segment now (not done, not held back or quarantined
        until later)."""
        if entry.receipted:
            return False  # delivered; only its files are left to remove
        with self._seg_lock:
            return now >= self._not_before.get(entry.seq, 0.0)

    def _send_headers(self, client: httpx.Client) -> bool:
        """Announce every header not yet delivered; return False when there was nothing."""
        entries = self.spool.entries()
        self._note_quarantine(entries)
        now = time.monotonic()
        for entry in entries:
            if self._stop.is_set():
                break
            if entry.header_delivered or not self._ready(entry, now):
                continue
            try:
                self._put_header(client, entry)
            except SegmentRefused as exc:
                self._refused(entry, exc)
                if exc.sender_backoff:
                    raise  # the receiver is in trouble: the whole sender backs off
        return False

    def _put_header(self, client: httpx.Client, entry: Entry) -> None:
        r = client.put(f"{self._base}/{entry.seq}/header", content=entry.header_bytes,
                       headers={"Content-Type": "application/json"})
        if r.status_code == 202:
            self.spool.mark_header_delivered(entry)
            self._count(headers_delivered=1)
            with self._seg_lock:  # its payload may follow at once (a quarantine lifted)
                self._not_before.pop(entry.seq, None)
                self._seg_backoff.pop(entry.seq, None)
        elif r.status_code == 200:  # payload already there (a lost acknowledgement)
            # Only a verified receipt says the receiver holds it (it then completes the entry);
            # a 200 whose receipt is refused must not mark the header delivered either.
            self._accept_receipt(entry, r.content)
        else:
            raise classify(entry.seq, "header", r)

    def _send_payload(self, client: httpx.Client) -> bool:
        """Send the oldest payload that may go now; return False when there is none."""
        if self._receipted_left:
            for seq in self.spool.finish_receipted():
                log.warning("seq %d: receipt was stored before; its files are removed now", seq)
            self._receipted_left = False
        entries = self.spool.entries()
        self._note_quarantine(entries)
        self._receipted_left = any(e.receipted for e in entries)
        now = time.monotonic()
        ready = [e for e in entries if self._ready(e, now)]
        if not ready:
            return False
        entry = ready[0]
        try:
            self._deliver(client, entry)
        except SegmentRefused as exc:
            self._refused(entry, exc)
            if exc.sender_backoff:
                raise
        return True

    def _deliver(self, client: httpx.Client, entry: Entry) -> None:
        if not entry.header_delivered:
            self._put_header(client, entry)  # headers first, always
            if not self._still_there(entry):
                return
        if entry.payload_path is None:
            raise SegmentRefused(entry.seq, f"seq {entry.seq}: payload file missing from the "
                                 "spool", "local_missing", permanent=True)
        try:
            size = entry.payload_path.stat().st_size
        except FileNotFoundError:
            return  # the header sender got its receipt meanwhile
        if size != entry.payload_size:
            raise SegmentRefused(
                entry.seq, f"seq {entry.seq}: local payload is {size} bytes, header says "
                f"{entry.payload_size} (corrupt spool file kept as evidence)", "local_corrupt",
                permanent=True)
        r = client.put(f"{self._base}/{entry.seq}/payload", content=self._paced(entry),
                       headers={"Content-Type": "application/octet-stream",
                                "Content-Length": str(size),
                                "X-Dualrec-Header-SHA256": entry.header_sha256})
        if r.status_code == 200:
            self._count(payloads_delivered=1)
            self._accept_receipt(entry, r.content)
            return
        if r.status_code == 409 and _error(r) == "header_first":
            # The receiver lost our header (restored from a backup?): announce it again and go
            # on at once; only a receiver that keeps forgetting it counts as a fault.
            self.spool.mark_header_undelivered(entry)
            self._header_first[entry.seq] = self._header_first.get(entry.seq, 0) + 1
            if self._header_first[entry.seq] <= 2:
                self._put_header(client, entry)
                return
        if r.status_code == 422:
            self._check_local(entry)
            with self._seg_lock:
                n = self._intact_422[entry.seq] = self._intact_422.get(entry.seq, 0) + 1
            if n >= INTACT_422_LIMIT:
                raise SegmentRefused(entry.seq, f"seq {entry.seq} payload: {_describe(r)} "
                                     f"{n} times for a payload that matches its header",
                                     _error(r) or "422", permanent=True)
        raise classify(entry.seq, "payload", r)

    def _refused(self, entry: Entry, exc: SegmentRefused) -> None:
        """Set one refused segment aside (quarantine or hold back); the others go on."""
        now = time.monotonic()
        if exc.permanent:
            new = self.spool.quarantine(entry, str(exc)[:500])
            with self._seg_lock:
                self._not_before[entry.seq] = now + QUARANTINE_RETRY_S
                self._seg_backoff.pop(entry.seq, None)
                self._quarantine[entry.seq] = str(exc)
                self._show_quarantine()
            self._count(failures=1)
            if new:
                log.error("seq %d quarantined: %s; kept on the box (never deleted), offered "
                          "again in %.0f min; the other segments go on", entry.seq, exc,
                          QUARANTINE_RETRY_S / 60)
                self._report(Event(time.monotonic_ns(), "upload_quarantined", {
                    "device": "uplink", "seq": entry.seq, "header_sha256": entry.header_sha256,
                    "error": exc.word, "reason": str(exc)[:500]}))
            else:
                log.warning("seq %d still refused for good: %s; offered again in %.0f min",
                            entry.seq, exc, QUARANTINE_RETRY_S / 60)
            return
        with self._seg_lock:
            backoff = self._seg_backoff.setdefault(entry.seq,
                                                   Backoff(cap_s=self.cfg.backoff_max_s))
            # at least the base delay: full jitter alone could retry at once, in a tight loop
            delay = max(backoff.base, backoff.next_delay())
            self._not_before[entry.seq] = now + delay
        self._count(held_back=1, failures=1)
        log.warning("seq %d held back %.1f s: %s; the other segments go on", entry.seq, delay,
                    exc)

    def _note_quarantine(self, entries: list[Entry]) -> None:
        """Quarantine as the spool has it (after a restart, or a segment delivered at last)."""
        q = {e.seq: e.quarantined for e in entries if e.quarantined and not e.receipted}
        with self._seg_lock:
            self._quarantine = q
            self._show_quarantine()

    def _show_quarantine(self) -> None:
        # Caller holds _seg_lock: both senders update, and the LED must end in the last state.
        shown = bool(self._quarantine)
        with self._stats_lock:
            self.stats.quarantined = len(self._quarantine)
        if shown != self._quarantine_shown:
            self._quarantine_shown = shown
            self._on_quarantine("quarantine" if shown else None)
            # also a standing fault, so the gateway's fault board (and `dualrec diag`) lists it
            now = time.monotonic_ns()
            if shown:
                seqs = ", ".join(str(s) for s in sorted(self._quarantine)[:20])
                self._report(Event(now, "fault", {
                    "device": "uplink", "part": "quarantine",
                    "reason": f"{len(self._quarantine)} segment(s) refused for good by the "
                              f"receiver, kept on the box: seq {seqs}"}))
            else:
                self._report(Event(now, "fault_cleared",
                                   {"device": "uplink", "part": "quarantine"}))

    def status(self) -> dict[str, Any]:
        """For diag and tests: what is failing, quarantined and held back, and the counters."""
        now = time.monotonic()
        with self._seg_lock:
            quarantined = [{"seq": s, "reason": r} for s, r in sorted(self._quarantine.items())]
            held = sorted(s for s, t in self._not_before.items()
                          if t > now and s not in self._quarantine)
        with self._fault_lock:
            failing = sorted(self._failing)
        with self._stats_lock:
            counters = asdict(self.stats)
        return {"failing": failing, "quarantined": quarantined, "held_back": held,
                "stats": counters}

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
            raise SegmentRefused(entry.seq, f"seq {entry.seq}: local payload does not match its "
                                 "header (corrupt spool file kept as evidence)", "local_corrupt",
                                 permanent=True)

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
        with self._seg_lock:
            for state in (self._not_before, self._seg_backoff, self._intact_422):
                state.pop(entry.seq, None)
            self._header_first.pop(entry.seq, None)
            released = self._quarantine.pop(entry.seq, None) is not None
            if released:
                self._show_quarantine()
        if released or entry.quarantined:
            log.warning("seq %d: quarantined before, taken by the receiver now", entry.seq)
            self._report(Event(time.monotonic_ns(), "upload_quarantine_cleared",
                               {"device": "uplink", "seq": entry.seq}))


def _error(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", ""))
    except ValueError:
        return ""


def _describe(r: httpx.Response) -> str:
    text = r.text[:200].replace("\n", " ") if r.content else ""
    return f"HTTP {r.status_code} {text}".strip()
