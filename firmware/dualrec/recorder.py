"""The recorder: decides when the box records and feeds the segmenter.

States: idle, recording, closing (post-roll running). A session starts on a start pattern in the
operation log, a button press, or at once in continuous mode; it stops on a stop pattern, a
button press, the maximum session length or shutdown. Rules (docs/FORMAT.md §4, docs/config.md):

- One transaction per session: a start line while a session records or closes ends it at that
  line, and the line starts the next session. A session's log lines begin at its trigger; lines
  before it are never in it, though its media pre-roll reaches back (sessions' media may
  overlap by up to the pre-roll, their lines and events never).
- Times are stamps, never arrival: the trigger is the line's stamp; pre-roll begins at the
  latest keyframe at or before trigger − pre-roll; when the ring no longer reaches back that
  far (a line that arrived late), a `preroll_short` event says by how much.
- The whole log is evidence: lines and events outside every session are sealed in idle
  segments (reason `oplog`, or the event's kind for events that must be on record at once) at a
  bounded interval, before the next session opens, and at shutdown.
- Labels and completeness (dualrec.transactions) go on record as `session_labels` and
  `session_completeness` events; an incomplete session is signalled at its end line, before the
  customer leaves.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime

from dualrec.samples import AudioBlock, Event, LogLine, Sample, VideoPacket
from dualrec.schema import IDLE_REASONS
from dualrec.segment import Segment
from dualrec.segmenter import Segmenter
from dualrec.transactions import Transaction, TransactionRules

IMMEDIATE = {"tamper", "power_fail", "clock_step"}  # cut the segment at once (FORMAT.md §3)
# Panel events: "button" (short press: start/stop), "mark" (long press: a note in the record),
# "tamper", "power_fail". While idle these kinds are sealed at once in an idle segment: a fault,
# or a loss on the log line that may have swallowed a transaction's start line, must be on
# record even with no session.
ON_RECORD_WHEN_IDLE = IMMEDIATE | {"fault", "session_interrupted", "fault_cleared", "tap_reset",
                                   "tap_gap", "chain_resumed", "chain_restart"}
IDLE_SEAL_NS = 10_000_000_000  # lines outside sessions wait at most this long to be sealed
IDLE_MAX_BYTES = 256 * 1024  # ... or this much
NO_RULES = TransactionRules.build([], {})


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
        rules: TransactionRules = NO_RULES,
        on_incomplete: Callable[[list[str] | None], None] = lambda missing: None,
        idle_seal_ns: int = IDLE_SEAL_NS,
    ) -> None:
        self.seg = segmenter
        segmenter.set_spill(self._outside_session)
        self._emit_segment = emit
        self._to_utc = to_utc_ns
        self._on_recording = on_recording
        self._on_incomplete = on_incomplete
        self.preroll_ns = preroll_ns
        self.postroll_ns = postroll_ns
        self.max_session_ns = max_session_ns
        self._start = [re.compile(p) for p in start_patterns]
        self._stop = [re.compile(p) for p in stop_patterns]
        self.continuous = continuous
        self.rules = rules
        self.idle_seal_ns = idle_seal_ns
        self.state = "idle"
        self.session: str | None = None
        self.session_start_ns = 0
        self.trigger_ns = 0
        self.stop_at: int | None = None
        self._stop_trigger = ""
        self._txn: Transaction | None = None
        self._completeness_done = False
        # Media for pre-roll; lines and events only to find what a late start line missed.
        self._ring: list[Sample] = []
        self._ring_keep_ns = preroll_ns + 3_000_000_000  # a keyframe interval of slack
        self._idle_lines: list[LogLine] = []  # outside every session, to seal in an idle segment
        self._idle_events: list[Event] = []
        # kept as they come, so a tick (every 50 ms) does not walk the pending records
        self._idle_oldest: int | None = None  # the earliest of their stamps
        self._idle_urgent: str | None = None  # an event kind to seal at once, if one came
        self._idle_bytes = 0
        self._last_orphan_txn = ""
        self._last_end_ns = 0  # end of the newest segment this recorder emitted
        self.sessions_started = 0
        self.inhibited = ""  # why new sessions may not start now (spool full), or ""

    # --- input -----------------------------------------------------------------------------

    def handle(self, sample: Sample, now_ns: int) -> None:
        if isinstance(sample, VideoPacket | AudioBlock):
            self._ring.append(sample)
            if len(self._ring) > 64 and self._ring[0].t_mono_ns < now_ns - self._ring_keep_ns:
                cut = 0
                while self._ring[cut].t_mono_ns < now_ns - self._ring_keep_ns:
                    cut += 1
                del self._ring[:cut]
        if isinstance(sample, LogLine):
            self._on_line(sample)
        elif isinstance(sample, Event):
            self._on_event(sample)
        elif self.seg.active:  # also after a final cut, for late samples from before it
            self.seg.add(sample)

    def _file(self, sample: LogLine | Event) -> None:
        """A line or event into the session (the segmenter spills what lies outside it) or,
        with no session, into the next idle segment."""
        if self.seg.active:
            self.seg.add(sample)
        else:
            self._outside_session(sample)

    def _on_line(self, line: LogLine) -> None:
        text = line.text
        if any(p.search(text) for p in self._start) and not self.continuous:
            if self.state != "idle":
                # the next transaction: end this session just after the lines it has had, so
                # the start line (of the same stamp, maybe) opens the next one and no other
                self._finish(line.t_mono_ns + 1, "next_transaction")
            self.start(line.t_mono_ns, "oplog", line=line)
            return
        if self.state == "idle" or self._txn is None:
            self._file(line)
            if self.state == "idle":
                self._note_orphan(line)
            return
        self._file(line)
        added = self._txn.feed(text)
        if added:
            self._file(Event(line.t_mono_ns, "session_labels", dict(self._txn.labels)))
        if (any(p.search(text) for p in self._stop) and self.state == "recording"
                and not self.continuous):
            self._completeness(line.t_mono_ns)
            self.request_stop(line.t_mono_ns, "oplog")

    def _note_orphan(self, line: LogLine) -> None:
        """An end line, or a transaction id, with no session open: on record."""
        labels = self.rules.labels_in(line.text)
        txn = labels.get("txn", "")
        if any(p.search(line.text) for p in self._stop):
            self._outside_session(Event(line.t_mono_ns, "transaction_end_without_start",
                                        {"line_t_mono_ns": line.t_mono_ns, **labels}))
            self._last_orphan_txn = txn
        elif txn and txn != self._last_orphan_txn:
            self._outside_session(Event(line.t_mono_ns, "transaction_without_start",
                                        {"line_t_mono_ns": line.t_mono_ns, **labels}))
            self._last_orphan_txn = txn

    def _on_event(self, ev: Event) -> None:
        if ev.kind == "button":
            if self.state == "idle":
                self.start(ev.t_mono_ns, "button")
                self._file(ev)
                return
            self._file(ev)
            if self.state == "recording" and not self.continuous:
                self._completeness(ev.t_mono_ns)
                self.request_stop(ev.t_mono_ns, "button")
            return
        self._file(ev)
        if ev.kind in IMMEDIATE and self.state != "idle":
            # cut just after the event, so the segment it closes carries it on record
            self.seg.cut(ev.t_mono_ns + 1, ev.kind)
            if ev.kind == "power_fail":
                # The hold-up time is short: hand the segment to the sealer now rather than
                # wait for late samples (an audio block in flight is the price).
                self.seg.flush()
        elif ev.kind in ON_RECORD_WHEN_IDLE and self.state == "idle":
            self._seal_idle(ev.kind)

    # --- state changes ---------------------------------------------------------------------

    def start(self, trigger_ns: int, trigger: str, line: LogLine | None = None,
              **detail: object) -> None:
        if self.inhibited:  # the refusal itself is on record, so the gap is explained
            if line is not None:
                self._outside_session(line)
            self._outside_session(Event(trigger_ns, "session_refused",
                                        {"trigger": trigger, "reason": self.inhibited}))
            self._seal_idle("session_refused")
            return
        self.seg.flush()  # the previous session's final segment first: seqs follow time
        self._seal_idle("oplog")  # lines from before this session are not its lines
        # A trigger delivered after the previous segment ended past it (a late button event)
        # counts from that end: the pre-roll alone overlaps the previous segment (FORMAT.md §4)
        trigger_ns = max(trigger_ns, max(self.seg.last_end_ns, self._last_end_ns) - 1)
        origin, short = self._preroll_origin(trigger_ns)
        utc = datetime.fromtimestamp(self._to_utc(trigger_ns) / 1e9, UTC)
        self.session = f"{utc:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self.session_start_ns, self.trigger_ns = origin, trigger_ns
        self.state, self.stop_at = "recording", None
        self.sessions_started += 1
        self._txn = Transaction(self.rules)
        self._completeness_done = False
        self._on_incomplete(None)
        self.seg.open(self.session, origin)
        self.seg.add(Event(origin, "session_start",
                           {"trigger": trigger, "trigger_mono_ns": trigger_ns,
                            "preroll_ns": trigger_ns - origin, **detail}))
        if short:
            self.seg.add(Event(trigger_ns, "preroll_short", {
                "wanted_ns": self.preroll_ns, "got_ns": trigger_ns - origin,
                "reason": "the pre-roll buffer no longer reached back (a line that arrived "
                          "late, or the box just started)"}))
        for s in self._ring:
            if s.t_mono_ns >= origin:
                self.seg.add(s)
        if line is not None:
            self.seg.add(line)
            if self._txn.feed(line.text):
                self.seg.add(Event(trigger_ns, "session_labels", dict(self._txn.labels)))
        self._on_recording(True)

    def _preroll_origin(self, trigger_ns: int) -> tuple[int, bool]:
        """The session's origin: the latest keyframe at or before trigger − pre-roll, and
        whether the ring fell short of that."""
        earliest = trigger_ns - self.preroll_ns
        keys = [s.t_mono_ns for s in self._ring if isinstance(s, VideoPacket) and s.keyframe]
        before = [t for t in keys if t <= earliest]
        if before:
            return max(before), False
        inside = [t for t in keys if earliest < t <= trigger_ns]
        if inside:  # the ring does not reach back far enough: the earliest it has
            return min(inside), True
        media = [s.t_mono_ns for s in self._ring if earliest <= s.t_mono_ns <= trigger_ns]
        if keys or not media:  # video with no keyframe yet: start at the trigger
            return trigger_ns, self.preroll_ns > 0
        return min(media), min(media) > earliest  # no video at all: audio from the window

    def request_stop(self, t_ns: int, trigger: str) -> None:
        self.state = "closing"
        self.stop_at = t_ns + self.postroll_ns
        self._stop_trigger = trigger

    def _completeness(self, t_ns: int) -> None:
        """Put the session's completeness on record once, and signal an incomplete one."""
        if self._txn is None or self._completeness_done or self.continuous:
            return
        self._completeness_done = True
        result = self._txn.completeness()
        self._file(Event(t_ns, "session_completeness", result))
        missing = result["missing"]
        self._on_incomplete(list(missing) if missing else None)  # type: ignore[call-overload]

    def _outside_session(self, sample: Sample) -> None:
        if isinstance(sample, LogLine):
            self._idle_lines.append(sample)
            self._idle_bytes += len(sample.raw)
        elif isinstance(sample, Event):
            self._idle_events.append(sample)
            if sample.kind in ON_RECORD_WHEN_IDLE and self._idle_urgent is None:
                self._idle_urgent = sample.kind
        else:
            return
        if self._idle_oldest is None or sample.t_mono_ns < self._idle_oldest:
            self._idle_oldest = sample.t_mono_ns

    def tick(self, now_ns: int) -> None:
        self.seg.tick(now_ns)  # also when idle: a final segment may still be in its grace
        if self.state == "idle" and not self.seg.active:
            urgent, oldest = self._idle_urgent, self._idle_oldest
            if urgent is not None:
                self._seal_idle(urgent)
            elif oldest is not None and (now_ns - oldest >= self.idle_seal_ns
                                         or self._idle_bytes >= IDLE_MAX_BYTES):
                self._seal_idle("oplog")
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
        # at_ns - 1 is the instant of the line that ended it, or the post-roll's last
        self._completeness(at_ns - 1)
        self.seg.add(Event(at_ns - 1, "session_stop", {"trigger": trigger}))
        self.seg.cut(at_ns, "session_end", final=True)
        self.state, self.stop_at, self.session, self._txn = "idle", None, None, None
        self._on_recording(False)

    def shutdown(self, now_ns: int) -> None:
        """Close any session now and hand on everything (orderly stop)."""
        if self.state != "idle":
            self._finish(now_ns, "shutdown")
        self.seg.flush()
        self._seal_idle("oplog")

    def _emit(self, seg: Segment) -> None:
        self._last_end_ns = max(self._last_end_ns, seg.end_ns)
        self._emit_segment(seg)

    def _seal_idle(self, reason: str) -> None:
        """Seal the lines and events outside every session as one idle segment. Its span runs
        from the first of them to just past the last, or to the end of the newest segment
        sealed, whichever is later: ends never run backwards (FORMAT.md §4)."""
        if not self._idle_lines and not self._idle_events:
            return
        self.seg.flush()  # a final segment still in its grace goes first: seqs follow time
        lines = sorted(self._idle_lines, key=lambda x: x.t_mono_ns)
        events = list(self._idle_events)
        self._idle_lines, self._idle_events, self._idle_bytes = [], [], 0
        self._idle_oldest = self._idle_urgent = None
        times = [x.t_mono_ns for x in lines] + [e.t_mono_ns for e in events]
        start = min(times)
        end = max(max(times) + 1, self._last_end_ns, self.seg.last_end_ns)
        if reason == "oplog" and not lines:
            reason = "event"
        if reason not in ("oplog", "event") and not any(e.kind == reason for e in events):
            reason = "event"
        seg = Segment(session="", index=0, origin_ns=start, start_ns=start, end_ns=end,
                      reason=reason if reason in IDLE_REASONS else "event", final=True,
                      lines=lines, events=events)
        self._emit(seg)
