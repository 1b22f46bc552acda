"""The device runtime: delivery, supervision, retry with backoff and fault reporting, once.

Every backend and every worker thread of the gateway needs the same plumbing: put an event on
record from any thread without ever raising into the hardware code (EventEmitter); hand samples
to a sink that may fail (Delivery); read a byte port that may vanish (PortReader, in
devices/port_reader.py because only the serial-line backends need pyserial); retry what failed
with a capped exponential delay (Backoff); run a thread so that an unexpected exception is
logged once with its traceback, recorded, shown on the fault LED and the work retried, and so
that a part that cannot recover stops the process (Supervisor, Worker); start a device that is
absent or failing and keep starting it until it joins (DeviceRunner). A backend is then only
its hardware code.

Faults are events {device, reason} with `fault_cleared` {device, gap_ns} when they end; the
device name is also the fault LED pattern's name (dualrec.devices.gpio_panel.FAULT_PATTERNS).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from dualrec.devices.base import EventSink
from dualrec.samples import Event

log = logging.getLogger(__name__)

NS = 1_000_000_000
BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 30.0
# A restarted worker that has run this long without failing again has recovered.
CLEAR_AFTER_S = 5.0
# Consecutive failures with no recovery in between after which a worker is given up: about
# 1+2+4+8+16+30*4 = 2.5 minutes of retrying; then systemd restarts the whole process.
FATAL_AFTER = 10
# Whatever an unexpected exception's text, a fault reason on record stays readable.
REASON_MAX = 500

Lamp = Callable[[str, bool], None]  # (fault name, active)


class Backoff:
    """Delays for successive retries: first_s, doubling, at most cap_s; reset() on success."""

    def __init__(self, first_s: float = BACKOFF_FIRST_S, cap_s: float = BACKOFF_CAP_S) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self._next = first_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap_s, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.first_s


class EventEmitter:
    """Puts an event on record from any thread; a failing sink is logged, never raised: a
    backend's thread must not die because the gateway's queue misbehaved."""

    def __init__(self, name: str, events: EventSink | None = None) -> None:
        self.name = name
        self.events = events

    def __call__(self, kind: str, detail: dict[str, Any], t_ns: int | None = None) -> None:
        events = self.events
        if events is None:
            return
        try:
            events(Event(time.monotonic_ns() if t_ns is None else t_ns, kind, detail))
        except Exception:
            log.exception("%s: event sink failed on %s %s", self.name, kind, detail)


class Delivery:
    """Hands a backend's samples to the gateway's sink, from the backend's thread. A sink that
    raises is a fault event at most once a second (with how many failures it stands for),
    never an exception in the backend's thread, which must keep draining its hardware."""

    def __init__(self, emit: EventEmitter, detail: dict[str, Any],
                 interval_ns: int = NS) -> None:
        self.sink: Callable[[Any], None] | None = None
        self._emit = emit
        self._detail = detail  # what the fault says besides the reason: device, port ...
        self._interval_ns = interval_ns
        self._errors = 0
        self._last_fault_ns: int | None = None

    def __call__(self, sample: Any) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            sink(sample)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self._errors += 1
        now = time.monotonic_ns()
        last = self._last_fault_ns
        if last is not None and now - last < self._interval_ns:
            return
        self._last_fault_ns = now
        count, self._errors = self._errors, 0
        self._emit("fault", {**self._detail, "reason": f"sink failed: {exc!r}", "count": count})


def reason_of(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, RuntimeError) and text else f"{type(exc).__name__}: {text}"


class Worker:
    """One supervised thread: its target is run, and run again after a failure."""

    def __init__(self, sup: Supervisor, name: str, target: Callable[[], None], *,
                 critical: bool, fault_name: str, stall_s: float | None) -> None:
        self.sup = sup
        self.name = name
        self.target = target
        self.critical = critical
        self.fault_name = fault_name
        self.stall_s = stall_s  # None: liveness is enough (no progress to ask for)
        self.failures = 0  # consecutive, reset on recovery
        self.failed_total = 0
        self.faulted_since_ns: int | None = None
        self.restarted_ns = 0
        self.last_beat_ns = time.monotonic_ns()
        self.done = False
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.inline = False  # True: a loop on a thread not ours (the gateway's main loop)

    def beat(self) -> None:
        """The work made progress (the watchdog asks for it of workers with a stall_s)."""
        self.last_beat_ns = time.monotonic_ns()

    def alive(self) -> bool:
        return self.inline or self.thread.is_alive()

    def healthy(self, now_ns: int) -> bool:
        if not self.alive():
            return self.done
        if self.faulted_since_ns is not None:
            return True  # a recorded fault being retried is a known state, not a hang
        return self.stall_s is None or now_ns - self.last_beat_ns < self.stall_s * NS

    def _main(self) -> None:
        self.sup.run_supervised(self)


class Supervisor:
    """Runs the gateway's worker threads; see the module docstring.

    events: where faults go on record; lamp: the fault LED; on_fatal: called once (from the
    failing thread) when a worker is given up, the gateway then stops and exits non-zero.
    """

    def __init__(self, events: EventSink, lamp: Lamp | None = None,
                 on_fatal: Callable[[str], None] | None = None, *,
                 backoff_first_s: float | None = None, backoff_cap_s: float | None = None,
                 fatal_after: int | None = None, clear_after_s: float | None = None) -> None:
        self.emit = EventEmitter("supervisor", events)
        self.lamp = lamp
        self.on_fatal = on_fatal
        # None: the module's figures as they are now (a test may change them)
        self.backoff = (BACKOFF_FIRST_S if backoff_first_s is None else backoff_first_s,
                        BACKOFF_CAP_S if backoff_cap_s is None else backoff_cap_s)
        self.fatal_after = FATAL_AFTER if fatal_after is None else fatal_after
        self.clear_after_s = CLEAR_AFTER_S if clear_after_s is None else clear_after_s
        self.stopping = threading.Event()
        self.workers: list[Worker] = []
        self.fatal: str | None = None
        self._lock = threading.Lock()

    def worker(self, name: str, target: Callable[[], None], *, critical: bool = True,
               fault_name: str = "internal", stall_s: float | None = None) -> Worker:
        """A worker for target, not started: its thread is worker.thread (start it, join it)."""
        w = Worker(self, name, target, critical=critical, fault_name=fault_name, stall_s=stall_s)
        with self._lock:
            self.workers.append(w)
        return w

    def start(self, name: str, target: Callable[[], None], **kw: Any) -> Worker:
        w = self.worker(name, target, **kw)
        w.thread.start()
        return w

    def wrap(self, name: str, target: Callable[[], None], **kw: Any) -> Callable[[], None]:
        """target as a thread target of its own kind (for threads another module creates)."""
        return self.worker(name, target, **kw)._main

    def adopt(self, thread: threading.Thread, **kw: Any) -> threading.Thread:
        """An unstarted thread another module made, remade to run its target under
        supervision (same name, same daemon flag): the owner's code needs no change. Its
        target is read from the Thread's own fields, since Thread.run forgets it after one
        call and a retry needs it again."""
        target = getattr(thread, "_target", None)
        if target is None or thread.ident is not None:
            log.warning("%s: cannot supervise this thread; it runs as it is", thread.name)
            return thread
        args, kwargs = getattr(thread, "_args", ()), getattr(thread, "_kwargs", {})
        w = self.worker(thread.name, lambda: target(*args, **kwargs), **kw)
        w.thread.daemon = thread.daemon
        return w.thread

    def inline(self, name: str, **kw: Any) -> Worker:
        """A worker for a loop the caller runs itself; it reports each failure with
        step_failed() and is cleared by poll() like the others."""
        w = self.worker(name, lambda: None, **kw)
        w.inline = True
        w.restarted_ns = time.monotonic_ns()
        return w

    def step_failed(self, w: Worker, exc: Exception, backoff: Backoff) -> bool:
        """An inline worker's step raised: as for a thread; False when it is given up."""
        return self._failed(w, exc, backoff)

    def run_supervised(self, w: Worker) -> None:
        backoff = Backoff(*self.backoff)
        w.restarted_ns = time.monotonic_ns()
        while True:
            try:
                w.target()
            except Exception as exc:
                if self._failed(w, exc, backoff):
                    continue
                return
            except BaseException as exc:  # SystemExit and the like: no retry can help
                log.critical("%s: ended by %r", w.name, exc)
                self._give_up(w, exc)
                return
            if not self.stopping.is_set() and w.critical:
                # A critical loop returning while the gateway runs is a bug too: do it again.
                if self._failed(w, RuntimeError(f"{w.name} returned while running"), backoff):
                    continue
                return
            w.done = True
            return

    def _failed(self, w: Worker, exc: Exception, backoff: Backoff) -> bool:
        """Log, record, light; True to run again after the backoff delay."""
        w.failures += 1
        w.failed_total += 1
        if w.faulted_since_ns is None:
            # Logged once per fault with its traceback; repeats are counted in the log line.
            log.error("%s failed; retrying with backoff", w.name, exc_info=exc)
            w.faulted_since_ns = time.monotonic_ns()
            self.emit("fault", {"device": w.fault_name, "part": w.name,
                                "reason": reason_of(exc)[:REASON_MAX]})
            if self.lamp is not None:
                self.lamp(w.fault_name + ":" + w.name, True)
        else:
            log.warning("%s failed again (%d in a row): %s", w.name, w.failures, reason_of(exc))
        if w.failures >= self.fatal_after:
            self._give_up(w, exc)
            return False
        delay = backoff.next()
        # Not "running without failing" while it waits: poll() must not clear the fault now.
        w.restarted_ns = time.monotonic_ns() + int(delay * NS)
        again = not self.stopping.wait(delay)
        w.restarted_ns = time.monotonic_ns()
        return again

    def _give_up(self, w: Worker, exc: BaseException) -> None:
        why = f"{w.name} cannot recover after {w.failures} failure(s): {reason_of(exc)}"
        log.critical("%s", why)
        self.emit("fault", {"device": w.fault_name, "part": w.name, "fatal": True,
                            "reason": why[:REASON_MAX]})
        with self._lock:
            first = self.fatal is None
            if first:
                self.fatal = why
        if first and self.on_fatal is not None:
            self.on_fatal(why)

    def poll(self) -> None:
        """Clear the faults of workers that have run CLEAR_AFTER_S since their restart (called
        from the gateway's loop: a healthy worker needs no help to say so)."""
        now = time.monotonic_ns()
        for w in list(self.workers):
            since = w.faulted_since_ns
            if (since is not None and w.alive()
                    and now - w.restarted_ns >= self.clear_after_s * NS):
                w.faulted_since_ns, w.failures = None, 0
                log.warning("%s recovered", w.name)
                self.emit("fault_cleared", {"device": w.fault_name, "part": w.name,
                                            "gap_ns": now - since})
                if self.lamp is not None:
                    self.lamp(w.fault_name + ":" + w.name, False)

    def unhealthy(self) -> list[str]:
        """Critical workers that are dead or not progressing (the watchdog's question)."""
        now = time.monotonic_ns()
        return [w.name for w in list(self.workers)
                if w.critical and (w.inline or w.thread.ident is not None)
                and not w.healthy(now)]


# Capture threads (whatever thread a device delivers its samples on: our own loops, picamera2's,
# PortAudio's callback thread) run SCHED_RR at the lowest real-time priority where permitted
# (root, CAP_SYS_NICE or the unit's LimitRTPRIO=1): with every core busy at normal priority,
# nice -5 alone left the microphone up to 340 ms late and dropped 28 of 900 frames in 30 s;
# SCHED_RR 1, 0 drops and 37 ms (docs/decisions.md, Lean). A thread waiting for the GIL
# sleeps, so it cannot starve the others; a runaway one is held to the kernel's real-time
# throttle (sched_rt_runtime_us, 95 % of a core by default). A device whose capture thread does
# heavy work itself (the simulated camera renders and encodes there) says capture_realtime =
# False and is left alone.
CAPTURE_RT_PRIORITY = 1
_capture = threading.local()
_rt_refused = False


def capture_priority() -> None:
    """Put the calling thread in SCHED_RR once; a refusal is logged once and not retried."""
    global _rt_refused
    if getattr(_capture, "done", False):
        return
    _capture.done = True
    if _rt_refused or not hasattr(os, "sched_setscheduler"):
        return
    try:
        # RESET_ON_FORK: threads this one creates (an encoder's workers) are not real-time.
        policy = os.SCHED_RR | getattr(os, "SCHED_RESET_ON_FORK", 0)
        os.sched_setscheduler(0, policy, os.sched_param(CAPTURE_RT_PRIORITY))
    except OSError as exc:
        _rt_refused = True
        log.info("capture threads keep normal scheduling (SCHED_RR refused: %s)", exc)


class DeviceRunner:
    """Starts one device (start(sink, events)/stop()) and, while it is absent or failing at
    start, records the fault and tries again with backoff until it joins or stop().

    The runner counts what the device delivers (the watchdog's "sources delivering") and keeps
    the device's fault state from the events it reports itself (unplugged, stalled): a device
    in a recorded fault is a known state, not a hang.
    """

    def __init__(self, name: str, device: Any, sink: Callable[[Any], None], events: EventSink,
                 *, backoff_first_s: float = BACKOFF_FIRST_S,
                 backoff_cap_s: float = BACKOFF_CAP_S, start_args: int = 2,
                 restart_after_s: float | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self._on_start = on_start  # the device runs (again): give it the state it missed
        self.device = device
        self._sink = sink
        self._events = events
        self.emit = EventEmitter(name, events)
        self._backoff = Backoff(backoff_first_s, backoff_cap_s)
        self._start_args = start_args  # a panel starts with (events) only
        self._realtime = bool(getattr(device, "capture_realtime", True))
        # A running device whose own fault lasts this long is stopped and started again
        # (None: the backend heals itself, as the serial line reopening every 0.5 s does).
        self.restart_after_s = restart_after_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.running = False
        self.fault: str | None = None  # why the device is not delivering now, or None
        self.fault_since_ns: int | None = None
        self.attempts = 0
        self.delivered = 0
        self.last_delivery_ns = time.monotonic_ns()

    # --- what the device is handed --------------------------------------------------------

    def deliver(self, sample: Any) -> None:
        if self._realtime:
            capture_priority()  # on the device's capture thread: the first sample raises it
        self.delivered += 1
        self.last_delivery_ns = time.monotonic_ns()
        self._sink(sample)

    def report(self, ev: Event) -> None:
        """The device's own events, noted on the way (fault state), then on record. A fault of
        a part of the device (the oplog's decoding) leaves the stream flowing: not noted."""
        detail = ev.detail if isinstance(ev.detail, dict) else {}
        device = detail.get("device") if "part" not in detail else "-"
        if ev.kind == "fault" and device in (self.name, None):
            with self._lock:
                if self.fault is None:
                    self.fault, self.fault_since_ns = str(ev.detail.get("reason", "")), ev.t_mono_ns
        elif ((ev.kind == "fault_cleared" and device in (self.name, None))
              or ev.kind == f"{self.name}_reconnected"):  # its "device" is the port's path
            with self._lock:
                self.fault = self.fault_since_ns = None
        self._events(ev)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> bool:
        """Try once now; on failure record the fault and keep trying in the background.
        True when the device runs."""
        if self._try_start():
            return True
        self._thread = threading.Thread(target=self._retry_loop, name=f"join-{self.name}",
                                        daemon=True)
        self._thread.start()
        return False

    def _try_start(self) -> bool:
        self.attempts += 1
        prior = self.fault_since_ns  # the fault this start would end
        try:
            if self._start_args == 1:
                self.device.start(self.report)
            else:
                self.device.start(self.deliver, self.report)
        except Exception as exc:  # DeviceError, and whatever a half-broken library raises
            reason = reason_of(exc)[:REASON_MAX]
            try:
                self.device.stop()  # release what a half-done start took, for the next try
            except Exception:
                log.debug("%s: stop after a failed start", self.name, exc_info=True)
            with self._lock:
                first = self.fault_since_ns is None
                new_reason = reason != self.fault
                if first:
                    self.fault_since_ns = time.monotonic_ns()
                self.fault = reason
            if first:
                log.error("%s: %s; recording goes on without it, retrying", self.name, reason)
                self.emit("fault", {"device": self.name, "reason": reason, "at": "start"})
            elif new_reason:
                log.warning("%s: %s", self.name, reason)
            return False
        with self._lock:
            since = prior
            if self.fault_since_ns == prior:
                self.fault = self.fault_since_ns = None
            else:  # the device reported a new fault while starting: it stands
                since = None
            self.running = True
            self.last_delivery_ns = time.monotonic_ns()
        self._backoff.reset()
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:
                log.exception("%s: bringing it up to date failed", self.name)
        if since is not None:
            log.warning("%s: joined after %d attempt(s)", self.name, self.attempts)
            self.emit("fault_cleared", {"device": self.name, "gap_ns": time.monotonic_ns() - since,
                                        "attempts": self.attempts})
        return True

    def check(self, now_ns: int) -> None:
        """Restart a running device stuck in its own fault (a capture thread that died, an
        encoder that failed): called from the gateway's loop; the stop and the retries run on
        the runner's thread, so the loop never waits for a wedged driver."""
        since = self.fault_since_ns
        if (self.restart_after_s is None or not self.running or since is None
                or now_ns - since < self.restart_after_s * NS or self._stop.is_set()
                or (self._thread is not None and self._thread.is_alive())):
            return
        self.restarts += 1
        log.warning("%s: in a fault for %.0f s (%s); restarting it", self.name,
                    (now_ns - since) / NS, self.fault)
        self._backoff.reset()
        self._thread = threading.Thread(target=self._restart, name=f"join-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _restart(self) -> None:
        self._stop_device()
        if not self._try_start():
            self._retry_loop()

    def _retry_loop(self) -> None:
        while not self._stop.wait(self._backoff.next()):
            try:
                if self._try_start():
                    if self._stop.is_set():  # stop() came while it was starting
                        self._stop_device()
                    return
            except Exception:  # the runner itself must not die silently either
                log.exception("%s: retry loop step failed", self.name)

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._stop_device()

    def _stop_device(self) -> None:
        with self._lock:
            running, self.running = self.running, False
        if running:
            try:
                self.device.stop()
            except Exception:
                log.exception("%s: stop failed", self.name)

    def healthy(self, now_ns: int, stall_s: float) -> bool:
        """Delivering, or in a recorded fault (absent, unplugged, stalled and retried)."""
        if self.fault is not None:
            return True
        return now_ns - self.last_delivery_ns < stall_s * NS
