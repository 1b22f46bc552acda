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
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import BoardProfile, SiteConfig
from dualrec.devices.base import DeviceError
from dualrec.devices.factory import Devices, build_devices
from dualrec.devices.runtime import Backoff, DeviceRunner, Supervisor
from dualrec.recorder import Recorder
from dualrec.samples import Event, Sample
from dualrec.seal_worker import SealWorker, Stats
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segmenter import Segmenter
from dualrec.spool import Spool
from dualrec.supervision import STATUS_NAME, STREAMS, ClockHealth, FaultBoard, WatchdogFeeder
from dualrec.timebase import ClockWatcher, Timebase
from dualrec.transactions import TransactionRules

log = logging.getLogger("dualrec.gateway")

QUOTA_CHECK_NS = 1_000_000_000
# The fault LED shows the most urgent fault; the panel maps a name to a blink pattern.
FAULT_PRIORITY = ("seal", "internal", "incomplete", "spool_full", "camera", "microphone",
                  "oplog", "clock", "quarantine", "uplink")
# Health figures for the watchdog (generous: a busy Pi must not be restarted for being slow).
SOURCE_STALL_S = 10.0  # a camera or microphone running with no sample and no recorded fault
CLOCK_STALL_S = 10.0
SEAL_STUCK_S = 120.0  # segments waiting, none sealed, and no recorded sealing fault
QUEUE_BACKLOG = 20_000  # samples waiting for the recorder loop
CLOCK_POLL_NS = 5_000_000_000
# A camera or microphone in its own fault this long is stopped and started again (the serial
# line reopens by itself every 0.5 s and is left alone).
DEVICE_RESTART_AFTER_S = 10.0
EXIT_FATAL = 70  # EX_SOFTWARE: a part could not recover; systemd restarts the process


def _closing_segment(session: str, index: int, prev_boot: str, last_end_utc_ns: int,
                     boot: str, reason: str, at_ns: int | None = None) -> Segment:
    """The final `interrupted` segment that closes a session left open (FORMAT.md §3)."""
    now = time.monotonic_ns() if at_ns is None else at_ns
    ev = Event(now, "session_interrupted", {
        "previous_boot_id": prev_boot, "last_segment_end_utc_ns": last_end_utc_ns,
        "same_boot": prev_boot == boot, "reason": reason})
    return Segment(session=session, index=index, origin_ns=now, start_ns=now, end_ns=now + 1,
                   reason="interrupted", final=True, events=[ev])


def _idle_record(ev: Event, at_ns: int | None = None) -> Segment:
    """An idle segment holding one event, sealed for its kind (chain_resumed, chain_restart),
    at at_ns or now: after whatever was sealed before it."""
    t = max(ev.t_mono_ns, time.monotonic_ns()) if at_ns is None else at_ns
    ev = Event(t, ev.kind, ev.detail)
    return Segment(session="", index=0, origin_ns=t, start_ns=t, end_ns=t + 1, reason=ev.kind,
                   final=True, events=[ev])


class FaultLamp:
    """Several parts report faults; the one LED shows the most urgent still active.

    A name is a pattern name, optionally with ":part" (two threads failing are two faults of
    one pattern; the lamp goes dark only when both cleared)."""

    def __init__(self, set_fault: Callable[[str | None], None]) -> None:
        self._set = set_fault
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def set(self, name: str, active: bool) -> None:
        with self._lock:
            (self._active.add if active else self._active.discard)(name)
            patterns = {n.split(":")[0] for n in self._active}
            shown = next((n for n in FAULT_PRIORITY if n in patterns), None)
            if shown is None and patterns:
                shown = min(patterns)  # a name without a pattern: the panel shows it steady
        self._set_quietly(shown)

    def _set_quietly(self, shown: str | None) -> None:
        try:
            self._set(shown)
        except Exception:  # a failing panel must not take the reporting part down with it
            log.exception("fault LED: cannot show %r", shown)

    def active(self) -> set[str]:
        with self._lock:
            return {n.split(":")[0] for n in self._active}

    def refresh(self) -> None:
        """Show the current state again (a panel that was not there has missed it)."""
        with self._lock:
            name = next(iter(self._active), None)
        if name is None:
            self._set_quietly(None)
        else:  # re-adding an active name recomputes and shows the most urgent
            self.set(name, True)

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
        # The clock-quality source (RTC, chrony) is a device too: failing, it is a fault.
        self.clock_health = ClockHealth(self.devices.sync_state)
        self.timebase = Timebase(source=self.devices.clock_source,
                                 step_threshold_ns=board.clock.step_threshold_ms * 1_000_000,
                                 sync_state=self.clock_health.sync_state)
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
        self.fatal: str | None = None  # why a part could not recover: exit non-zero
        self._fatal = threading.Event()
        self.supervisor = Supervisor(self.q.put, None, self._on_fatal)
        self.faults = FaultBoard(self.lamp.set, site.spool.state.parent / STATUS_NAME)
        self.sealing = SealWorker(self.sealer, self.q.put, self.lamp.reporter("seal"),
                                  self.stats,
                                  max_unsealed_bytes=site.spool.unsealed_max_mb * 2**20)
        # The seal worker and the uplink own their threads; the supervisor remakes them
        # (unstarted) to run the same targets under supervision.
        if hasattr(self.sealing, "_thread"):
            self.sealing._thread = self.supervisor.adopt(self.sealing._thread)
        self.spool = Spool(site.spool.dir, site.spool.state)
        self.quota = QuotaWatch(self.spool, site.spool.quota_mb * 2**20,
                                site.spool.min_free_mb * 2**20)
        self._next_quota_check = 0
        self.uplink = None
        if site.uplink is not None and not site.uplink.cert.exists():
            # Not enrolled yet (`dualrec enroll` could not reach the receiver on the first
            # boot): record anyway, segments wait in the spool; the uplink starts with the
            # first run after enrollment wrote the certificate.
            log.error("no client certificate at %s: not enrolled yet (dualrec enroll); "
                      "recording to the spool only", site.uplink.cert)
        elif site.uplink is not None:
            from dualrec.uplink import Uplink

            self.uplink = Uplink(self.spool, site.uplink, site.device.id, self.q.put,
                                 self.lamp.reporter("uplink"),
                                 on_quarantine=self.lamp.reporter("quarantine"),
                                 state=self._report_state)
            if hasattr(self.uplink, "_threads"):
                self.uplink._threads = [self.supervisor.adopt(t) for t in self.uplink._threads]
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
            on_recording=self._set_recording, preroll_ns=rec.preroll_ms * 1_000_000,
            postroll_ns=rec.postroll_ms * 1_000_000, max_session_ns=rec.max_session_ms * 1_000_000,
            start_patterns=site.oplog.start_patterns, stop_patterns=site.oplog.stop_patterns,
            continuous=rec.mode == "continuous",
            rules=TransactionRules.build(site.transactions.labels,
                                         site.transactions.required_steps),
            on_incomplete=self._show_incomplete,
            idle_seal_ns=site.transactions.idle_seal_ms * 1_000_000,
        )
        self._incomplete_until: float | None = None
        self.watcher = ClockWatcher(self.timebase, self.q.put)
        self.runners: dict[str, DeviceRunner] = {}
        self._session_seen: str | None = None
        self._next_clock_poll = 0
        self._clock_fault: str | None = None
        self.watchdog: WatchdogFeeder | None = None
        self._chain_resume = None  # asking the receiver for the head after a lost chain state
        self._resume_t0 = 0
        self._sealed_seen = 0
        self._seal_progress_ns = time.monotonic_ns()

    def _on_fatal(self, why: str) -> None:
        self.fatal = why
        self._fatal.set()

    def _set_recording(self, on: bool) -> None:
        # The recording LED is the customer's notice, but a failing panel must not stop the
        # recording it announces; the panel's fault is on record.
        try:
            self.devices.panel.set_recording(on)
        except Exception:
            log.exception("panel: cannot switch the recording LED %s", "on" if on else "off")

    def _recover(self) -> str | None:
        """Adopt or clean what an unclean stop left; close a session it left open and return
        its id; resume a chain whose state was lost."""
        adopted, removed = self.sealer.recover()
        for seq in adopted:
            log.warning("adopted seq %d committed before an unclean stop", seq)
        for path in removed:
            log.warning("removed uncommitted %s", path.name)
        resumed = self._resume_lost_chain(adopted)
        left = self.sealer.open_session()  # counts a header the state missed
        session = None
        if left is not None:
            session, prev_boot, next_index, _, last_end_utc = left
            self.sealing.put(_closing_segment(
                session, next_index, prev_boot, last_end_utc, self.sealer.boot_id,
                "the gateway stopped without closing the session (crash, kill or power loss)"))
            log.warning("closing session %s, interrupted by an unclean stop", session)
        if resumed is not None:  # after the closing segment: seqs follow time
            self.sealing.put(_idle_record(resumed))
        return session

    def _resume_lost_chain(self, adopted: list[int]) -> Event | None:
        """With no chain state on disk, continue after the newest header this device can prove
        is its own: from the spool at once (the event to put on record is returned), else from
        the receiver, holding the sealer while it asks (dualrec.chain_resume; FORMAT.md §4)."""
        from dualrec import chain_resume

        if not self.chain.fresh:
            return None
        device, pub = self.site.device.id, self.sealer.public_key
        own = chain_resume.newest_in_spool(self.site.spool.dir, device, pub)
        if own is not None:
            if not adopted:  # the spool does not start at seq 0 (uploads deleted the rest)
                self.chain.adopt(own)
            ev = chain_resume.resumed_event(
                "spool", own, "chain state lost; resumed after the newest segment in the spool")
            log.warning("chain state lost: resumed after seq %d from the spool", ev.detail["seq"])
            return ev
        uplink = self.site.uplink
        if uplink is None or not uplink.cert.exists():
            # nothing sealed anywhere else (no receiver, or never enrolled with one): a new
            # chain from genesis is the chain
            return None
        self.sealer.hold("chain state lost: asking the receiver for this device's newest segment")
        # what the answer puts on record is dated now, before anything recorded meanwhile
        self._resume_t0 = time.monotonic_ns()
        self.lamp.set("seal:resume", True)
        self._chain_resume = chain_resume.ReceiverResume(
            lambda: chain_resume.receiver_head(uplink, device, pub), self._chain_resumed,
            uplink.resume_wait_s)
        self._chain_resume.start()
        return None

    def _chain_resumed(self, head: bytes | None, ev: Event | None) -> None:
        """The receiver answered (or could not be reached in time): continue the chain, close
        the head's session if it was left open, and put what happened on record, before any
        segment recorded meanwhile."""
        from dualrec.segment_format import parse_header

        first = []
        if head is not None and not (h := parse_header(head))["final"]:
            first.append(_closing_segment(
                h["session"], h["session_index"] + 1, h["boot_id"], h["end"]["utc_ns"],
                self.sealer.boot_id, "the box lost its chain state with this session open",
                at_ns=self._resume_t0))
        if ev is not None:
            first.append(_idle_record(ev, at_ns=self._resume_t0 + 1))
        self.sealer.resume(head, first)
        self.lamp.set("seal:resume", False)
        if ev is None:
            return  # the receiver holds nothing of this device: a new chain, nothing lost
        if ev.kind == "chain_restart":
            log.error("%s", ev.detail["reason"])
            self.lamp.set("internal:chain", True)
        else:
            log.warning("%s (seq %d)", ev.detail["reason"], ev.detail["seq"])

    def _start_device(self, name: str, dev: object, start_args: int = 2) -> None:
        """Start a device now or, absent or failing, record the fault and keep trying in the
        background: recording goes on with the rest."""
        restart = DEVICE_RESTART_AFTER_S if name in ("camera", "microphone") else None
        runner = DeviceRunner(name, dev, self.q.put, self.q.put, start_args=start_args,
                              restart_after_s=restart,
                              on_start=self._panel_joined if name == "panel" else None)
        self.runners[name] = runner
        runner.start()

    def _panel_joined(self) -> None:
        # A panel that joins late (or after a failed start, which resets its LEDs) is told
        # what to show now: the customer's recording notice first, then the fault.
        self._set_recording(self.recorder.state != "idle")
        self.lamp.refresh()

    def _notifier(self):  # -> dualrec.sdnotify.Notifier, or a stand-in that does nothing
        try:
            from dualrec.sdnotify import Notifier
        except ImportError:
            log.warning("no dualrec.sdnotify: systemd is not told READY or fed its watchdog")
            return _NoNotifier()
        return Notifier()

    def run(self, stop: threading.Event, duration_s: float | None = None) -> Stats:
        notifier = self._notifier()
        interrupted = self._recover()
        self.sealing.start()
        if self.uplink is not None:
            self.uplink.start()
        d = self.devices
        self._start_device("panel", d.panel, start_args=1)
        try:
            for name, dev in (("camera", d.camera), ("microphone", d.microphone),
                              ("oplog", d.oplog)):
                if dev is not None:
                    self._start_device(name, dev)
            self.watcher.start(lambda name, target: self.supervisor.start(name, target).thread)
            if interrupted is not None and self.recorder.state == "idle":
                # The teller was mid-transaction when the box went down and the start line is
                # gone: record again at once; the next stop line or button ends it.
                self.recorder.start(time.monotonic_ns(), "resume", resumes=interrupted)
            self.faults.write()
            self.watchdog = WatchdogFeeder(notifier, self.health_problems)
            notifier.ready()
            notifier.status("recording")
            self._loop(stop, duration_s)
        finally:
            notifier.stopping()
            self.supervisor.stopping.set()
            for name in ("oplog", "microphone", "camera"):
                if name in self.runners:
                    self.runners[name].stop()
            self.watcher.stop()
            if self._chain_resume is not None:
                self._chain_resume.stop()
            try:
                while not self.q.empty():
                    self._step(0)
            except Exception:  # what is already segmented must still go to the sealer
                log.exception("recorder loop failed while draining at stop")
            self.recorder.shutdown(time.monotonic_ns())
            self.sealing.stop()
            self.sealer.close()
            if self.uplink is not None:
                self.uplink.stop()
            self.spool.close()
            self._set_recording(False)
            self.runners["panel"].stop()
            self.chain.close()
            if self.faults.status_path is not None:  # no file: diag knows no gateway runs
                self.faults.status_path.unlink(missing_ok=True)
            if self.fatal:
                log.critical("stopped: %s", self.fatal)
        return self.stats

    def _loop(self, stop: threading.Event, duration_s: float | None) -> None:
        """The recorder loop, on the calling thread, under supervision like every thread."""
        worker = self.supervisor.inline("recorder")
        backoff = Backoff(0.5, 5.0)  # short: a SIGTERM waits for the delay to run out
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not stop.is_set() and not self._fatal.is_set() and (
                deadline is None or time.monotonic() < deadline):
            try:
                self._step(0.05)
            except Exception as exc:
                if not self.supervisor.step_failed(worker, exc, backoff):
                    return

    def _step(self, timeout: float) -> None:
        try:
            sample = self.q.get(timeout=timeout) if timeout else self.q.get_nowait()
        except queue.Empty:
            sample = None
        now = time.monotonic_ns()
        if sample is not None:
            if isinstance(sample, Event):
                if sample.kind == "fault":
                    log.error("fault: %s", sample.detail)
                self.faults.see(sample)
            self.recorder.handle(sample, now)
        if now >= self._next_quota_check:
            self._next_quota_check = now + QUOTA_CHECK_NS
            self._check_quota(now)
        self.recorder.tick(now)
        if self._incomplete_until is not None and time.monotonic() > self._incomplete_until:
            self._show_incomplete(None)
        self._note_session_streams()
        self._cut_without_video(now)
        if now >= self._next_clock_poll:
            self._next_clock_poll = now + CLOCK_POLL_NS
            self._poll_clock(now)
        self.supervisor.poll()
        for runner in self.runners.values():
            runner.check(now)
        if self.watchdog is not None:
            self.watchdog.tick(time.monotonic())

    def _show_incomplete(self, missing: list[str] | None) -> None:
        """An incomplete session on the fault LED until the next session or the configured
        time runs out: the teller can still do the missing step while the customer is there."""
        self.lamp.set("incomplete", bool(missing))
        if missing:
            log.warning("session incomplete: missing %s", ", ".join(missing))
            self._incomplete_until = (time.monotonic()
                                      + self.site.transactions.incomplete_led_ms / 1000)
        else:
            self._incomplete_until = None

    def _note_session_streams(self) -> None:
        """A session that starts while a stream's device is in a fault says so in its first
        segment: one `stream_missing` event per missing stream, at the session's origin."""
        session = self.recorder.session
        if session == self._session_seen:
            return
        self._session_seen = session
        if session is None or not self.segmenter.active:
            return
        # From the runners, not from the fault events: those may still wait in the queue.
        for device, stream in STREAMS.items():
            r = self.runners.get(device)
            if r is None or r.fault is None:
                continue
            self.segmenter.add(Event(self.recorder.session_start_ns, "stream_missing", {
                "device": device, "stream": stream, "reason": r.fault,
                "fault_since_mono_ns": r.fault_since_ns}))

    def _cut_without_video(self, now: int) -> None:
        """Segments are cut at keyframes; with the camera in a fault there are none, so cut
        by time, as for a board without a camera (the segmenter does that only when the
        session has no video format at all)."""
        cam = self.runners.get("camera")
        seg = self.segmenter
        cur = seg.cur
        if (cam is None or cam.fault is None or cur is None or seg.cut_at is not None
                or cur.video or now < cur.start_ns + seg.segment_ns):
            return
        seg.cut(cur.start_ns + seg.segment_ns, "duration")

    def _poll_clock(self, now: int) -> None:
        problem = self.clock_health.problem()
        if problem == self._clock_fault or (problem and self._clock_fault):
            return
        if problem:
            self.q.put(Event(now, "fault", {"device": "clock", "reason": problem}))
        else:
            self.q.put(Event(now, "fault_cleared", {"device": "clock"}))
        self._clock_fault = problem

    def health_problems(self) -> list[str]:
        """What keeps the watchdog from being fed: every critical thread alive and making
        progress, or in a fault that is on record."""
        now = time.monotonic_ns()
        problems = [f"thread {n} dead or stuck" for n in self.supervisor.unhealthy()]
        for name in ("camera", "microphone"):
            r = self.runners.get(name)
            if r is not None and r.running and not r.healthy(now, SOURCE_STALL_S):
                problems.append(f"{name}: no sample for {SOURCE_STALL_S:.0f} s and no fault")
        if now - self.watcher.last_check_ns > CLOCK_STALL_S * 1e9:
            problems.append("clock watcher not checking")
        if self.q.qsize() > QUEUE_BACKLOG:
            problems.append(f"recorder loop behind: {self.q.qsize()} samples waiting")
        pending = self.sealing.backlog()[0] if hasattr(self.sealing, "backlog") else 0
        if not pending or self.stats.sealed_total != self._sealed_seen:
            self._sealed_seen, self._seal_progress_ns = self.stats.sealed_total, now
        elif "seal" not in self.lamp.active() and now - self._seal_progress_ns > SEAL_STUCK_S * 1e9:
            problems.append(f"sealer stuck: {pending} segment(s) waiting, none sealed for "
                            f"{SEAL_STUCK_S:.0f} s and no fault")
        return problems

    def _report_state(self) -> dict[str, Any]:
        """The box's own figures for the uplink's state report (no customer data)."""
        used, free = self.spool.usage()
        backlog = getattr(self.sealing, "backlog", None)
        return {"spool_used_bytes": used, "spool_quota_bytes": self.quota.quota,
                "spool_free_bytes": free,
                "unsealed_bytes": backlog()[1] if backlog is not None else None,
                "faults": sorted(list(self.faults.active))}

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


class _NoNotifier:
    """Stands in for dualrec.sdnotify.Notifier where that module is missing."""

    watchdog_interval_s = None

    def ready(self) -> None: ...
    def stopping(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
