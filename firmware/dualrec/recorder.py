"""The recorder: decides when the box records and feeds the segmenter.

States: idle (samples kept only in the pre-roll ring), recording, closing (post-roll running).
A session starts on a start pattern in the operation log, a button press, or at once in
continuous mode; it stops on a stop pattern, a button press, the maximum session length or
shutdown. Pre-roll starts at a keyframe so the first segment decodes. Events that must be on
record at once cut the current segment early; when idle they are sealed in an event-only segment.
"""

from __future__ import annotations

import re
import secrets
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from dualrec.samples import Event, LogLine, Sample, VideoPacket
from dualrec.schema import IDLE_REASONS
from dualrec.segment import Segment
from dualrec.segmenter import Segmenter

IMMEDIATE = {"tamper", "power_fail", "clock_step"}  # cut the segment at once (DESIGN.md, Chain)
# Panel events: "button" (short press: start/stop), "mark" (long press: a note in the record),
# "tamper", "power_fail". A mark while recording is kept in the segment's events like any other.
# While idle these are sealed at once as event-only segments: a fault, or a loss on the log line
# that may have swallowed a transaction's start line, must be on record even with no session.
ON_RECORD_WHEN_IDLE = IMMEDIATE | {"fault", "session_interrupted", "fault_cleared", "tap_reset",
                                   "tap_gap"}


class Recorder:
    def __init__(
        self,
        *,
        segmenter: Segmenter,
        emit: Callable[[Segment], None],
        to_utc_ns: Callable[[int], int],
        on_recording: Callable[[bool], None],
        preroll_ns: int,
        postroll_ns: int,
        max_session_ns: int,
        start_patterns: list[str],
        stop_patterns: list[str],
        continuous: bool = False,
    ) -> None:
        self.seg = segmenter
        segmenter.set_spill(self._outside_session)
        # Events and log lines stamped outside the session being cut (after its final cut);
        # on-record events among them are sealed once the recorder is idle.
        self._outside: deque[Sample] = deque(maxlen=10_000)
        self._emit = emit
        self._to_utc = to_utc_ns
        self._on_recording = on_recording
        self.preroll_ns = preroll_ns
        self.postroll_ns = postroll_ns
        self.max_session_ns = max_session_ns
        self._start = [re.compile(p) for p in start_patterns]
        self._stop = [re.compile(p) for p in stop_patterns]
        self.continuous = continuous
        self.state = "idle"
        self.session: str | None = None
        self.session_start_ns = 0
        self.stop_at: int | None = None
        self._stop_trigger = ""
        self._ring: deque[Sample] = deque()
        self._ring_keep_ns = preroll_ns + 3_000_000_000  # a keyframe interval of slack
        self.sessions_started = 0
        self.inhibited = ""  # why new sessions may not start now (spool full), or ""

    # --- input -----------------------------------------------------------------------------

    def handle(self, sample: Sample, now_ns: int) -> None:
        self._ring.append(sample)
        while self._ring and self._ring[0].t_mono_ns < now_ns - self._ring_keep_ns:
            self._ring.popleft()
        if self.seg.active:  # also after a final cut, for late samples from before it
            self.seg.add(sample)
        if isinstance(sample, LogLine):
            self._on_line(sample)
        elif isinstance(sample, Event):
            self._on_event(sample)

    def _on_line(self, line: LogLine) -> None:
        if any(p.search(line.text) for p in self._start):
            if self.state == "idle":
                self.start(line.t_mono_ns, "oplog")
            elif self.state == "closing":  # a new transaction during post-roll: keep going
                self.state, self.stop_at = "recording", None
        elif (any(p.search(line.text) for p in self._stop) and self.state == "recording"
              and not self.continuous):
            self.request_stop(line.t_mono_ns, "oplog")

    def _on_event(self, ev: Event) -> None:
        if ev.kind == "button":
            if self.state == "idle":
                self.start(ev.t_mono_ns, "button")
            elif self.state == "recording" and not self.continuous:
                self.request_stop(ev.t_mono_ns, "button")
        elif ev.kind in IMMEDIATE and self.state != "idle":
            # cut just after the event, so the segment it closes carries it on record
            self.seg.cut(ev.t_mono_ns + 1, ev.kind)
            if ev.kind == "power_fail":
                # The hold-up time is short: hand the segment to the sealer now rather than
                # wait for late samples (an audio block in flight is the price).
                self.seg.flush()
        elif ev.kind in ON_RECORD_WHEN_IDLE and self.state == "idle":
            self._seal_events_only([ev], ev.kind)

    # --- state changes ---------------------------------------------------------------------

    def start(self, trigger_ns: int, trigger: str, **detail: object) -> None:
        if self.inhibited:  # the refusal itself is on record, so the gap is explained
            self._seal_events_only([Event(trigger_ns, "session_refused",
                                          {"trigger": trigger, "reason": self.inhibited})],
                                   "session_refused")
            return
        origin = self._preroll_origin(trigger_ns)
        utc = datetime.fromtimestamp(self._to_utc(trigger_ns) / 1e9, UTC)
        self.session = f"{utc:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self.session_start_ns = origin
        self.state, self.stop_at = "recording", None
        self.sessions_started += 1
        self.seg.open(self.session, origin)
        self.seg.add(Event(origin, "session_start",
                           {"trigger": trigger, "trigger_mono_ns": trigger_ns,
                            "preroll_ns": trigger_ns - origin, **detail}))
        for s in self._ring:
            if s.t_mono_ns >= origin:
                self.seg.add(s)
        self._on_recording(True)

    def _preroll_origin(self, trigger_ns: int) -> int:
        earliest = trigger_ns - self.preroll_ns
        keys = [s.t_mono_ns for s in self._ring if isinstance(s, VideoPacket) and s.keyframe]
        after = [t for t in keys if earliest <= t <= trigger_ns]
        if after:
            return min(after)
        before = [t for t in keys if t < earliest]
        if before:  # pre-roll a little longer rather than start on an undecodable frame
            return max(before)
        if self._ring:
            return max(earliest, self._ring[0].t_mono_ns)
        return trigger_ns

    def request_stop(self, t_ns: int, trigger: str) -> None:
        self.state = "closing"
        self.stop_at = t_ns + self.postroll_ns
        self._stop_trigger = trigger

    def _outside_session(self, sample: Sample) -> None:
        self._outside.append(sample)

    def tick(self, now_ns: int) -> None:
        self.seg.tick(now_ns)  # also when idle: a final segment may still be in its grace
        if self.state == "idle" and self._outside:
            events = [s for s in self._outside
                      if isinstance(s, Event) and s.kind in ON_RECORD_WHEN_IDLE]
            self._outside.clear()
            for ev in events:
                self._seal_events_only([ev], ev.kind)
        if self.state == "idle":
            if self.continuous and not self.inhibited:
                self.start(now_ns, "continuous")
            return
        if self.state == "recording" and now_ns - self.session_start_ns >= self.max_session_ns:
            self.request_stop(now_ns, "max_session")
        if self.state == "closing" and self.stop_at is not None and now_ns >= self.stop_at:
            self._finish(self.stop_at, self._stop_trigger)

    def _finish(self, at_ns: int, trigger: str) -> None:
        at_ns = self.seg.earliest_cut(at_ns)
        self.seg.add(Event(at_ns - 1, "session_stop", {"trigger": trigger}))
        self.seg.cut(at_ns, "session_end", final=True)
        self.state, self.stop_at, self.session = "idle", None, None
        self._on_recording(False)

    def shutdown(self, now_ns: int) -> None:
        """Close any session now and hand on everything (orderly stop)."""
        if self.state != "idle":
            self._finish(now_ns, "shutdown")
        self.seg.flush()

    def _seal_events_only(self, events: list[Event], reason: str) -> None:
        self.seg.flush()  # a final segment still in its grace goes first: seqs follow time
        t = events[0].t_mono_ns
        seg = Segment(session="", index=0, origin_ns=t, start_ns=t, end_ns=t + 1,
                      reason=reason if reason in IDLE_REASONS else "event", final=True,
                      events=list(events))
        self._emit(seg)
