"""The seal worker: seals the recorder's segments in order on its own thread, and never dies.

Any failure of a seal is retried every SEAL_RETRY_S: a full, read-only or failing disk under the
spool or under the chain-state SQLite (OSError, sqlite3 errors), a muxer or encryption error, or
anything unexpected. Each distinct fault is logged once (with its traceback when it is not a plain
disk error), put on record as a `fault` event and shown on the fault LED; a fault that persists is
logged again at most once a minute; `fault_cleared` is recorded when sealing works again.

Unsealed segments wait in memory, oldest first, up to a stated bound (`spool.unsealed_max_mb`).
Beyond it the oldest unsealed *media* (video and audio) are dropped, segment by segment: the
segment keeps its place in its session, its log lines and its events, and gains a `gap` event
saying exactly what was dropped, so the loss is on record once it is sealed. Sealed data is never
touched. Dropping raises a `fault` event and an alarm line at most once a minute.

At stop the worker keeps trying for a bounded grace (STOP_GRACE_S), one attempt a second, then
reports exactly what is still unsealed (count, sessions, spans) in one line and in Stats.
"""

from __future__ import annotations

import bisect
import errno
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dualrec.ratelimit import Throttle
from dualrec.samples import Event
from dualrec.sealer import ChainLagError, Sealed, Sealer, SealError
from dualrec.segment import Segment

log = logging.getLogger("dualrec.seal")

SEAL_RETRY_S = 1.0
STOP_GRACE_S = 10.0
REPEAT_LOG_S = 60.0  # a fault that persists is logged again at most this often
ALARM_S = 60.0  # the "dropping media" alarm line, at most this often
# What a held sample costs beyond its bytes (the Python object, list slot): an estimate, so the
# bound is honest for audio's many small blocks too.
ITEM_OVERHEAD = 128
# Pi Zero 2 W: 512 MB RAM, of which the OS, the interpreter, picamera2 and the age worker use
# about 250 MB; 64 MiB is about 3 minutes of 1080p30 H.264 at 2 Mbit/s with 48 kHz PCM.
DEFAULT_UNSEALED_MAX_BYTES = 64 * 2**20


@dataclass
class Stats:
    # the most recent seals only: a box runs for months and must not grow without bound
    sealed: deque[Sealed] = field(default_factory=lambda: deque(maxlen=1000))
    sealed_total: int = 0
    seal_failures: int = 0
    # media dropped because sealing failed and memory reached its bound
    dropped_segments: int = 0
    dropped_video_frames: int = 0
    dropped_audio_samples: int = 0
    dropped_bytes: int = 0
    # what was still unsealed when the worker gave up at stop (one dict per segment)
    unsealed_at_stop: list[dict[str, Any]] = field(default_factory=list)


def segment_bytes(seg: Segment) -> int:
    """About what a queued segment holds in memory."""
    return (sum(len(p.data) + ITEM_OVERHEAD for p in seg.video)
            + sum(len(b.pcm) + ITEM_OVERHEAD for b in seg.audio)
            + sum(len(x.raw) + ITEM_OVERHEAD for x in seg.lines)
            + ITEM_OVERHEAD * (1 + len(seg.events)))


def fault_key(exc: BaseException) -> str:
    """What makes two failures "the same fault" for the log: the root cause's kind, not its
    text (which names a seq or a path that changes at every retry)."""
    seen: BaseException | None = exc
    key = type(exc).__name__
    while seen is not None:
        if isinstance(seen, sqlite3.Error):
            return f"sqlite3.{type(seen).__name__}: {seen}"
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"OSError {errno.errorcode.get(seen.errno, seen.errno)}"
        key = type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return key


def _expected(exc: BaseException) -> bool:
    """A plain disk error (full, read-only, I/O): its message says it all, no traceback."""
    cause = exc.__cause__
    return isinstance(exc, (SealError, ChainLagError)) and isinstance(
        cause, (OSError, sqlite3.OperationalError))


class SealWorker:
    """Seals segments in order on its own thread, retrying what fails; drops only unsealed media,
    only beyond the memory bound, and only on record."""

    def __init__(self, sealer: Sealer, report: Callable[[Event], None],
                 on_fault: Callable[[str | None], None], stats: Stats, *,
                 max_unsealed_bytes: int = DEFAULT_UNSEALED_MAX_BYTES,
                 retry_s: float = SEAL_RETRY_S, stop_grace_s: float = STOP_GRACE_S) -> None:
        self._sealer = sealer
        self._report = report
        self._on_fault = on_fault
        self._stats = stats
        self._max = max_unsealed_bytes
        self._retry_s = retry_s
        self._grace = stop_grace_s
        self._cv = threading.Condition()
        self._pending: deque[list[Any]] = deque()  # [segment, bytes held], oldest first
        self._bytes = 0
        self._busy = False  # the worker is sealing _pending[0]: put() must not touch it
        self._stopping = False
        self._stop_deadline = 0.0
        self._failing = False
        self._fault_keys: set[str] = set()  # the faults already on record in this episode
        self._attempts = 0
        self._repeat = Throttle(REPEAT_LOG_S)
        self._alarm = Throttle(ALARM_S)
        self._dropping = False  # a memory fault is on record in this episode
        self._thread = threading.Thread(target=self._run, name="sealer", daemon=True)

    # --- the recorder's side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def put(self, seg: Segment) -> None:
        with self._cv:
            size = segment_bytes(seg)
            self._pending.append([seg, size])
            self._bytes += size
            self._enforce_bound(include_head=not self._busy)
            self._cv.notify()

    def backlog(self) -> tuple[int, int]:
        """(segments waiting to be sealed, bytes they hold)."""
        with self._cv:
            return len(self._pending), self._bytes

    def stop(self, timeout: float = 30) -> None:
        with self._cv:
            self._stopping = True
            self._stop_deadline = time.monotonic() + self._grace
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            n, size = self.backlog()
            log.error("sealer still busy after %.0f s at stop: %d segment(s), %d bytes "
                      "left unsealed", timeout, n, size)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping and not self._sealer.lagging:
                    self._cv.wait()
                if self._pending:
                    seg: Segment | None = self._pending[0][0]
                    self._busy = True
                elif self._stopping and not self._sealer.lagging:
                    return
                else:
                    seg = None  # nothing to seal, but the chain state is behind: catch up
            try:
                sealed = self._sealer.seal(seg) if seg is not None else None
                if seg is None:
                    self._sealer.catch_up()
            except Exception as exc:  # any failure: retry; the thread must not die
                with self._cv:
                    self._busy = False
                self._failed(exc)
                if self._stopping and time.monotonic() >= self._stop_deadline:
                    self._give_up(exc)
                    return
                # A plain sleep, not a wait on the stop: stopping must not turn the retries
                # into a busy loop (it once logged ~2,900 lines in a 10 s grace).
                time.sleep(self._retry_s)
                with self._cv:
                    self._enforce_bound(include_head=True)
                continue
            with self._cv:
                self._busy = False
                if seg is not None:
                    _, size = self._pending.popleft()
                    self._bytes -= size
            if sealed is not None and seg is not None:
                self._sealed(sealed, seg)
            if self._sealer.lagging:
                err = self._sealer.lag_error
                lag = ChainLagError(f"chain state not updated for committed seq "
                                    f"{sealed.seq if sealed else '?'}: "
                                    f"{type(err).__name__}: {err}")
                lag.__cause__ = err
                self._failed(lag)
                time.sleep(self._retry_s)
            else:
                self._cleared()

    def _sealed(self, sealed: Sealed, seg: Segment) -> None:
        self._stats.sealed.append(sealed)
        self._stats.sealed_total += 1
        log.info("sealed seq %d session %s#%d (%s, %d bytes)", sealed.seq, seg.session,
                 seg.index, seg.reason, sealed.header["payload"]["size"])

    def _failed(self, exc: BaseException) -> None:
        self._stats.seal_failures += 1
        self._attempts += 1
        key = fault_key(exc)
        n, size = self.backlog()
        if key not in self._fault_keys:
            self._fault_keys.add(key)
            self._repeat.allow(key)  # starts this fault's quiet period
            log.error("sealing failed: %s; %d segment(s) (%.1f MiB) wait in memory, retried "
                      "every %.0f s", exc, n, size / 2**20, self._retry_s,
                      exc_info=None if _expected(exc) else exc)
            self._report(Event(time.monotonic_ns(), "fault", {
                "device": "spool", "part": "seal", "reason": str(exc)[:500]}))
        else:
            held = self._repeat.allow(key)
            if held is not None:
                log.error("sealing still failing (%d attempts): %s; %d segment(s) (%.1f MiB) "
                          "wait in memory", self._attempts, exc, n, size / 2**20)
        if not self._failing:
            self._failing = True
            self._on_fault("seal")

    def _cleared(self) -> None:
        if not self._failing:
            return
        log.warning("sealing works again after %d failed attempt(s)", self._attempts)
        self._failing = False
        self._attempts = 0
        for key in self._fault_keys:
            self._repeat.reset(key)
        self._fault_keys.clear()
        now = time.monotonic_ns()
        if self._dropping:
            self._dropping = False
            self._report(Event(now, "fault_cleared", {"device": "memory"}))
        self._report(Event(now, "fault_cleared", {"device": "spool"}))
        self._on_fault(None)

    # --- the memory bound ------------------------------------------------------------------

    def _enforce_bound(self, include_head: bool) -> None:
        """Drop the oldest unsealed media until the backlog fits (caller holds the lock)."""
        if self._bytes <= self._max:
            return
        items = list(self._pending)
        if not include_head:
            # The head is being sealed right now (and may well succeed): leave it, and leave
            # the newest too, so the worker's own pass after a failed attempt can still drop
            # the oldest first. Memory then exceeds the bound by at most those two segments.
            items = items[1:-1]
        for item in items:
            if self._bytes <= self._max:
                break
            freed = self._strip(item[0])
            item[1] -= freed
            self._bytes -= freed
        # Log lines and events stay: kilobytes a minute, and the teller's log is the evidence
        # the recording exists for. Only media is dropped.

    def _strip(self, seg: Segment) -> int:
        if not seg.video and not seg.audio:
            return 0
        video, audio = seg.video, seg.audio
        freed = (sum(len(p.data) + ITEM_OVERHEAD for p in video)
                 + sum(len(b.pcm) + ITEM_OVERHEAD for b in audio))
        samples = sum(b.frames for b in audio)
        first = min([p.t_mono_ns for p in video[:1]] + [b.t_mono_ns for b in audio[:1]])
        last = max([p.t_mono_ns for p in video[-1:]] + [b.t_mono_ns for b in audio[-1:]])
        detail = {
            "reason": "sealing failed and unsealed media reached the memory bound",
            "bound_bytes": self._max, "bytes": freed,
            "session": seg.session, "session_index": seg.index,
            "from_mono_ns": first, "to_mono_ns": max(last, seg.end_ns),
            "video_frames": len(video), "audio_samples": samples,
        }
        seg.video, seg.audio = [], []
        seg.video_drops += len(video)
        gap = Event(seg.start_ns, "gap", detail)
        seg.events.insert(bisect.bisect_right([e.t_mono_ns for e in seg.events], gap.t_mono_ns),
                          gap)
        st = self._stats
        st.dropped_segments += 1
        st.dropped_video_frames += len(video)
        st.dropped_audio_samples += samples
        st.dropped_bytes += freed
        if not self._dropping:
            self._dropping = True
            self._report(Event(time.monotonic_ns(), "fault", {
                "device": "memory", "reason": f"sealing is failing and {self._max // 2**20} MiB "
                "of unsealed recording is held: the oldest unsealed media are being dropped "
                "(each drop is a gap event in its segment)"}))
        if self._alarm.allow("drop") is not None:
            log.error("ALARM: sealing is failing and the unsealed backlog reached %d MiB: "
                      "dropped the media of %s#%d (%d frames, %d audio samples); %d segment(s) "
                      "dropped so far", self._max // 2**20, seg.session, seg.index, len(video),
                      samples, st.dropped_segments)
        return freed

    # --- stop while sealing fails ----------------------------------------------------------

    def _give_up(self, exc: BaseException) -> None:
        with self._cv:
            segs = [item[0] for item in self._pending]
        lost = [{"session": s.session, "index": s.index, "reason": s.reason,
                 "start_mono_ns": s.start_ns, "end_mono_ns": s.end_ns,
                 "video_frames": len(s.video), "audio_samples": sum(b.frames for b in s.audio),
                 "lines": len(s.lines), "events": len(s.events)} for s in segs]
        self._stats.unsealed_at_stop = lost
        spans: dict[str, list[Segment]] = {}
        for s in segs:
            spans.setdefault(s.session or "(events)", []).append(s)
        text = "; ".join(
            f"{name} #{ss[0].index}..#{ss[-1].index} ({len(ss)} segment(s), "
            f"{(ss[-1].end_ns - ss[0].start_ns) / 1e9:.1f} s from mono "
            f"{ss[0].start_ns / 1e9:.3f} s, {sum(len(s.video) for s in ss)} frames, "
            f"{sum(len(s.lines) for s in ss)} log lines, {sum(len(s.events) for s in ss)} events)"
            for name, ss in spans.items())
        lag = " The chain state misses the last committed header; the next start adopts it " \
              "from the spool." if self._sealer.lagging else ""
        log.error("stopping after a %.0f s grace with %d segment(s) unsealed, lost with this "
                  "process: %s. Cause: %s.%s", self._grace, len(segs), text or "none", exc, lag)
