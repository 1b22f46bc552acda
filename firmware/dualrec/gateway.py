"""The gateway daemon: wires sources → recorder → segmenter → sealer → spool and runs them.

Sources push samples from their own threads into one queue; one recorder thread consumes it, so
the session state machine and segmenter need no locks. Sealing runs on its own thread in seq
order; a segment that cannot be sealed (disk full) is kept in memory and retried, and the fault is
put on record and on the fault LED until it clears.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import BoardProfile, SiteConfig
from dualrec.devices.base import DeviceError
from dualrec.devices.factory import Devices, build_devices
from dualrec.recorder import Recorder
from dualrec.samples import Event, Sample
from dualrec.seal_worker import SealWorker, Stats
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segmenter import Segmenter
from dualrec.spool import Spool
from dualrec.timebase import ClockWatcher, Timebase

log = logging.getLogger("dualrec.gateway")

QUOTA_CHECK_NS = 1_000_000_000
# The fault LED shows the most urgent fault; the panel maps a name to a blink pattern.
FAULT_PRIORITY = ("seal", "spool_full", "quarantine", "uplink")


class FaultLamp:
    """Several parts report faults; the one LED shows the most urgent still active."""

    def __init__(self, set_fault: Callable[[str | None], None]) -> None:
        self._set = set_fault
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def set(self, name: str, active: bool) -> None:
        with self._lock:
            (self._active.add if active else self._active.discard)(name)
            shown = next((n for n in FAULT_PRIORITY if n in self._active), None)
        self._set(shown)

    def reporter(self, name: str) -> Callable[[str | None], None]:
        return lambda pattern: self.set(name, pattern is not None)


class QuotaWatch:
    """Stops new sessions before the spool fills; resumes below 90 % of the limits."""

    def __init__(self, spool: Spool, quota_bytes: int, min_free_bytes: int) -> None:
        self.spool = spool
        self.quota = quota_bytes
        self.min_free = min_free_bytes
        self.full = False
        self.unreadable = False

    def check(self) -> str | None:
        """None when nothing changed; else the new state's reason ("" = space is back)."""
        try:
            used, free = self.spool.usage()
        except OSError as exc:
            # A failing spool disk (EIO, gone) must not stop the recorder loop that calls this;
            # the seal worker puts that fault on record. Keep the last state, say it once.
            if not self.unreadable:
                self.unreadable = True
                log.error("spool usage unreadable: %s; quota state kept", exc)
            return None
        self.unreadable = False
        if not self.full and (used > self.quota or free < self.min_free):
            self.full = True
            return (f"spool nearly full: {used // 2**20} MiB held (quota "
                    f"{self.quota // 2**20} MiB), {free // 2**20} MiB free "
                    f"(minimum {self.min_free // 2**20} MiB)")
        if self.full and used < self.quota * 0.9 and free > self.min_free / 0.9:
            self.full = False
            return ""
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def load_device_key(path: Path):  # -> Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise DeviceError(
            f"device key {path}: file not found (run dualrec-tool keys device)"
        ) from None
    except ValueError as exc:
        raise DeviceError(f"device key {path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceError(f"device key {path}: not an Ed25519 key")
    return key


class Gateway:
    def __init__(self, board: BoardProfile, site: SiteConfig,
                 devices: Devices | None = None) -> None:
        self.board, self.site = board, site
        self.devices = devices or build_devices(board, site)
        tb_args = {"sync_state": self.devices.sync_state} if self.devices.sync_state else {}
        self.timebase = Timebase(source=self.devices.clock_source,
                                 step_threshold_ns=board.clock.step_threshold_ms * 1_000_000,
                                 **tb_args)
        self.chain = ChainState(site.spool.state)
        self.stats = Stats()
        self.sealer = Sealer(
            device_id=site.device.id, key=load_device_key(site.device.key),
            recipients=site.seal.recipients + ([site.seal.escrow] if site.seal.escrow else []),
            spool_dir=site.spool.dir, chain=self.chain, timebase=self.timebase,
            boot_id=boot_id(),
        )
        self.q: queue.Queue[Sample] = queue.Queue()
        panel = self.devices.panel
        self.lamp = FaultLamp(panel.set_fault)
        self.sealing = SealWorker(self.sealer, self.q.put, self.lamp.reporter("seal"),
                                  self.stats,
                                  max_unsealed_bytes=site.spool.unsealed_max_mb * 2**20)
        self.spool = Spool(site.spool.dir, site.spool.state)
        self.quota = QuotaWatch(self.spool, site.spool.quota_mb * 2**20,
                                site.spool.min_free_mb * 2**20)
        self._next_quota_check = 0
        self.uplink = None
        if site.uplink is not None:
            from dualrec.uplink import Uplink

            self.uplink = Uplink(self.spool, site.uplink, site.device.id, self.q.put,
                                 self.lamp.reporter("uplink"),
                                 on_quarantine=self.lamp.reporter("quarantine"))
        cam, mic = self.devices.camera, self.devices.microphone
        rec = site.recording
        self.segmenter = Segmenter(
            segment_ns=rec.segment_ms * 1_000_000,
            video_format=cam.format if cam else None,
            audio_format=mic.format if mic else None,
            emit=self.sealing.put,
        )
        self.recorder = Recorder(
            segmenter=self.segmenter, emit=self.sealing.put, to_utc_ns=self.timebase.to_utc_ns,
            on_recording=panel.set_recording, preroll_ns=rec.preroll_ms * 1_000_000,
            postroll_ns=rec.postroll_ms * 1_000_000, max_session_ns=rec.max_session_ms * 1_000_000,
            start_patterns=site.oplog.start_patterns, stop_patterns=site.oplog.stop_patterns,
            continuous=rec.mode == "continuous",
        )
        self.watcher = ClockWatcher(self.timebase, self.q.put)

    def _recover(self) -> str | None:
        """Adopt or clean what an unclean stop left; close a session it left open and return
        its id."""
        adopted, removed = self.sealer.recover()
        for seq in adopted:
            log.warning("adopted seq %d committed before an unclean stop", seq)
        for path in removed:
            log.warning("removed uncommitted %s", path.name)
        left = self.sealer.open_session()  # counts a header the state missed
        if left is None:
            return None
        session, prev_boot, next_index, _, last_end_utc = left
        now = time.monotonic_ns()
        ev = Event(now, "session_interrupted", {
            "previous_boot_id": prev_boot, "last_segment_end_utc_ns": last_end_utc,
            "same_boot": prev_boot == self.sealer.boot_id,
            "reason": "the gateway stopped without closing the session (crash, kill or power loss)",
        })
        seg = Segment(session=session, index=next_index, origin_ns=now, start_ns=now,
                      end_ns=now + 1, reason="interrupted", final=True, events=[ev])
        self.sealing.put(seg)  # first in the queue; the worker retries it if the disk is full
        log.warning("closing session %s, interrupted by an unclean stop", session)
        return session

    def run(self, stop: threading.Event, duration_s: float | None = None) -> Stats:
        interrupted = self._recover()
        self.sealing.start()
        if self.uplink is not None:
            self.uplink.start()
        d = self.devices
        d.panel.start(self.q.put)
        started = []
        try:
            for dev in (d.camera, d.microphone):
                if dev is not None:
                    dev.start(self.q.put, self.q.put)
                    started.append(dev)
            if d.oplog is not None:
                d.oplog.start(self.q.put, self.q.put)
                started.append(d.oplog)
            self.watcher.start()
            if interrupted is not None and self.recorder.state == "idle":
                # The teller was mid-transaction when the box went down and the start line is
                # gone: record again at once; the next stop line or button ends it.
                self.recorder.start(time.monotonic_ns(), "resume", resumes=interrupted)
            deadline = None if duration_s is None else time.monotonic() + duration_s
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._step(0.05)
        finally:
            for dev in started:
                dev.stop()
            self.watcher.stop()
            while not self.q.empty():
                self._step(0)
            self.recorder.shutdown(time.monotonic_ns())
            self.sealing.stop()
            self.sealer.close()
            if self.uplink is not None:
                self.uplink.stop()
            self.spool.close()
            d.panel.set_recording(False)
            d.panel.stop()
            self.chain.close()
        return self.stats

    def _step(self, timeout: float) -> None:
        try:
            sample = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            sample = None
        now = time.monotonic_ns()
        if sample is not None:
            if isinstance(sample, Event) and sample.kind == "fault":
                log.error("fault: %s", sample.detail)
            self.recorder.handle(sample, now)
        if now >= self._next_quota_check:
            self._next_quota_check = now + QUOTA_CHECK_NS
            self._check_quota(now)
        self.recorder.tick(now)

    def _check_quota(self, now: int) -> None:
        change = self.quota.check()
        if change is None:
            return
        self.recorder.inhibited = change
        self.lamp.set("spool_full", bool(change))
        if change:
            log.error("%s: new sessions stop until space returns", change)
            self.recorder.handle(Event(now, "fault", {"device": "spool", "reason": change}), now)
        else:
            log.warning("spool has space again: sessions may start")
            self.recorder.handle(Event(now, "fault_cleared", {"device": "spool"}), now)
