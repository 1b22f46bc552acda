"""Resuming the chain after the box lost its state (FORMAT.md §4, "Chain state lost").

A box whose chain state is gone (a replaced or restored SD card, a deleted file) must not start
again at seq 0: its receiver already holds that seq, and every upload would be refused as a
fork. It resumes from the newest header it can prove is its own, checked with its own public
key: first from its spool, else from the receiver's head (GET /v1/devices/{id}/head,
docs/UPLOAD.md). While it asks, the sealer holds (recording goes on in memory, the seal fault
shows); the answer is put on record as a `chain_resumed` event. A receiver that holds nothing
means a new chain from genesis. A receiver that cannot be reached for `resume_wait_s` leaves
no choice but genesis: that is a `chain_restart` event and a fault, and the receiver will refuse
the new chain as a fork until a technician resolves it (docs/technician.md).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dualrec.samples import Event
from dualrec.segment_format import (
    FormatError,
    header_hash,
    parse_header,
    scan_dir,
    verify_signature,
)

if TYPE_CHECKING:
    from dualrec.config import UplinkSection

log = logging.getLogger("dualrec.chain_resume")


class HeadUnavailable(Exception):
    """The receiver could not be asked (network, TLS, a server error): ask again later."""


def own_header(data: bytes, device_id: str, key: Ed25519PublicKey) -> dict | None:
    """The parsed header if it is this device's, signed by its key; else None."""
    try:
        header = parse_header(data)
    except FormatError:
        return None
    if header["device"] != device_id or not verify_signature(header, key):
        return None
    return header


def newest_in_spool(spool_dir: Path, device_id: str, key: Ed25519PublicKey) -> bytes | None:
    """The newest committed header in the spool that is provably this device's."""
    files = scan_dir(spool_dir) if spool_dir.exists() else {}
    for seq in sorted(files, reverse=True):
        path = files[seq].header
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        header = own_header(data, device_id, key)
        if header is not None and header["seq"] == seq:
            return data
    return None


def receiver_head(cfg: UplinkSection, device_id: str, key: Ed25519PublicKey,
                  timeout_s: float = 10.0) -> bytes | None:
    """The receiver's newest header for this device (checked as our own), None when it holds
    none; HeadUnavailable when it cannot be asked or answers with something we cannot trust."""
    import httpx

    from dualrec.uplink import client_ssl_context

    url = f"{cfg.url.rstrip('/')}/v1/devices/{device_id}/head"
    try:
        with httpx.Client(verify=client_ssl_context(cfg), timeout=timeout_s) as client:
            r = client.get(url)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        raise HeadUnavailable(f"{url}: {exc}") from None
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise HeadUnavailable(f"{url}: HTTP {r.status_code}")
    try:
        body = r.json()
        data = base64.b64decode(body["header"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise HeadUnavailable(f"{url}: not a head answer ({exc})") from None
    header = own_header(data, device_id, key)
    if header is None or header["seq"] != body.get("seq"):
        raise HeadUnavailable(f"{url}: the head is not a header this device signed")
    return data


def resumed_event(source: str, data: bytes | None, reason: str) -> Event:
    seq = parse_header(data)["seq"] if data is not None else -1
    return Event(time.monotonic_ns(), "chain_resumed", {
        "source": source, "seq": seq, "header_sha256": header_hash(data) if data else "",
        "reason": reason})


class ReceiverResume:
    """Asks the receiver for the head in a thread, with backoff, until it answers or
    resume_wait_s pass; then calls done(header bytes or None, the event to put on record or
    None)."""

    def __init__(self, ask: Callable[[], bytes | None],
                 done: Callable[[bytes | None, Event | None], None],
                 resume_wait_s: float) -> None:
        self._ask = ask
        self._done = done
        self._wait_s = resume_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chain-resume", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def _run(self) -> None:
        deadline = time.monotonic() + self._wait_s
        delay = 1.0
        last = ""
        while not self._stop.is_set():
            try:
                data = self._ask()
            except HeadUnavailable as exc:
                if str(exc) != last:
                    log.warning("chain state lost; cannot ask the receiver for the head yet: %s",
                                exc)
                    last = str(exc)
                if time.monotonic() >= deadline:
                    self._done(None, Event(time.monotonic_ns(), "chain_restart", {
                        "reason": f"chain state lost and the receiver unreachable for "
                                  f"{self._wait_s:g} s ({last}): a new chain from genesis, "
                                  "which the receiver will refuse as a fork until resolved"}))
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            except Exception as exc:  # never a silent death: on record, then genesis
                log.exception("asking the receiver for the head failed")
                self._done(None, Event(time.monotonic_ns(), "chain_restart", {
                    "reason": f"chain state lost; asking the receiver failed: {exc}"}))
                return
            # A receiver that holds nothing of this device: a new box, or one never heard of,
            # so genesis is its chain and nothing was lost to put on record.
            self._done(data, None if data is None else resumed_event(
                "receiver", data, "chain state lost; resumed after the receiver's newest "
                                  "segment of this device"))
            return
