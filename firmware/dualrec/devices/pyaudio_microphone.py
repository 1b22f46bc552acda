"""Microphone on PortAudio through pyaudio (the Microphone interface), stamped in CLOCK_MONOTONIC.

Capture runs in PortAudio's callback thread: the callback stamps the block, wraps the bytes
PortAudio handed it (pyaudio already copied them) and puts the block into the sink (a queue
put). Nothing in it blocks or logs; the only lock it takes is its own, uncontended.

Timestamps. A sound card's sample clock is the best clock for the samples themselves, so a block
is stamped from a running sample counter: t = anchor + frames_so_far * 1e9 / rate. The anchor
comes from the ADC times (PortAudio's ``input_buffer_adc_time``) of the first callbacks,
converted to CLOCK_MONOTONIC: their median, as one period's stamp can be an outlier (see
SampleClock). Which clock an ADC time is in is not PortAudio's choice but the ALSA PCM's
timestamp type: a ``hw`` device (and plug/dsnoop on top of it) stamps CLOCK_MONOTONIC, the
``null`` plugin and ioplug plugins without the monotonic flag stamp CLOCK_REALTIME, some hosts
give 0. So the clock is detected at run time from the first callback, by which of
CLOCK_REALTIME and CLOCK_MONOTONIC the value is near, and recorded in an ``audio_clock`` event;
with no usable ADC time the callback's arrival minus one block stands in.

A counter alone drifts: a USB microphone's crystal is off by 20-100 ppm against CLOCK_MONOTONIC,
over a 4-hour session up to 1.4 s of lip-sync error. Every callback therefore compares the
counter with the (converted) ADC time; the median of the last WINDOW differences is slewed
out by at most MAX_SLEW_PPM, so consecutive blocks stay contiguous to the microsecond while the
timeline follows CLOCK_MONOTONIC. Lost samples must never be absorbed: PortAudio's
paInputOverflow (set on the first buffer after discarded input) marks that block
``overflow=True`` and re-anchors the counter from the ADC times from that callback on, so the
loss shows as a gap in t_mono_ns; a jump the device did not flag (larger than the re-anchor
threshold) re-anchors too. Every re-anchor is an ``audio_clock`` event with the jump.

Faults. A watchdog thread notices a stream that stopped (device unplugged, ALSA error) or
stalled (no callback for a second), records a ``fault`` event, and reopens the device every
REOPEN_INTERVAL_S until stop(); a reopened device gets a fresh anchor, so the outage is a gap in
the timeline, and ``fault_cleared`` records its length. stop() returns within STOP_TIMEOUT_S
even when PortAudio's stop hangs on a wedged device, and no block is delivered after it.

pyaudio is imported in start(), so this module imports on any machine; tests pass a stand-in
module with the same API (tests/fakes/pyaudio_fake.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from dualrec.config import MicrophoneProfile
from dualrec.devices.base import AudioFormat, AudioSink, DeviceError, EventSink
from dualrec.devices.runtime import EventEmitter
from dualrec.samples import AudioBlock

log = logging.getLogger(__name__)

T = TypeVar("T")
_Item = tuple[int, bytes, int, bool]  # first frame number, PCM, frames, overflow

NS = 1_000_000_000
SAMPLE_BYTES = 2  # paInt16

# Callbacks whose clock differences are compared (0.62 s at 960 frames, 48 kHz); odd, so the
# median is a measured value: a step shows at its full size once it fills half the window.
WINDOW = 31
SLEW_GAIN = 0.02  # fraction of the measured error corrected per callback (~1 s time constant)
MAX_SLEW_PPM = 1000  # corrections never stretch the timeline faster than this
# A difference larger than this is a jump, not drift: re-anchor and put it on record. ADC times
# jitter well under a millisecond; arrival times carry the host's buffering (tens of ms).
REANCHOR_ADC_NS = 30_000_000
REANCHOR_ARRIVAL_NS = 150_000_000
REANCHOR_MIN_INTERVAL_NS = NS  # a free-running source would otherwise re-anchor per callback
# An anchor is the median of this many blocks' references (fewer when they hold SETTLE_NS).
SETTLE_BLOCKS = 5
SETTLE_NS = 200_000_000
# Realtime and monotonic clocks closer than this cannot tell an ADC time's clock apart.
AMBIGUOUS_CLOCKS_NS = 60 * NS
# An ADC time further than this from now is nonsense for one callback (a clock step in between).
ADC_PLAUSIBLE_NS = 5 * NS

WATCH_PERIOD_S = 0.2
START_GRACE_NS = 2 * NS  # PortAudio may take a while to deliver the first callback
STALL_MIN_NS = NS
STALL_BLOCKS = 10
REOPEN_INTERVAL_S = 2.0
STOP_TIMEOUT_S = 2.0  # the whole of stop(); also the bound on one teardown by the watchdog
EVENT_INTERVAL_NS = NS  # repeated faults and overflows: at most one event a second, with a count


class SampleClock(Generic[T]):
    """CLOCK_MONOTONIC time of each block from a sample counter, disciplined by a reference.

    Pure arithmetic, no threads. ``feed`` takes the blocks in order, each with its reference
    time (converted ADC time, or arrival minus one block) and an opaque item, and returns the
    blocks whose time is known, as (t_ns, item, jump_ns); jump_ns is set on the first block
    after a re-anchor: the new timeline minus where the old one would have put that block.

    An anchor is never one measurement: the first blocks of a stream, and the first after a
    loss, are held until SETTLE_BLOCKS references (or SETTLE_NS of audio) are in, and the
    anchor is their median. A device's first period is often an outlier: ALSA PCMs that report
    no delay (null, file) stamp it when it is read, not when it was captured, and PortAudio
    restarts the PCM after an overrun. The hold delays those blocks by about 100 ms.
    """

    def __init__(self, rate: int, reanchor_ns: int = REANCHOR_ADC_NS) -> None:
        self.rate = rate
        self.reanchor_ns = reanchor_ns
        self.frame = 0  # number of the next frame
        self._anchor_ns: int | None = None
        self._anchor_frame = 0
        self._correction_ns = 0.0
        # reference minus the uncorrected counter time; the correction is judged against these
        self._raw: deque[float] = deque(maxlen=WINDOW)
        self._last_reanchor_ns: int | None = None
        self._pending: list[tuple[int, int | None, T]] = []  # (frame, reference, item)
        self._pending_frames = 0
        self._old_ns: int | None = None  # where the old timeline put the first pending block

    @property
    def anchored(self) -> bool:
        return self._anchor_ns is not None

    def _base(self, frame: int) -> int:
        assert self._anchor_ns is not None
        # integer arithmetic: exact at any rate, no accumulated rounding
        return self._anchor_ns + (frame - self._anchor_frame) * NS // self.rate

    def time_of(self, frame: int) -> int:
        return self._base(frame) + round(self._correction_ns)

    def _anchor(self, frame: int, t_ns: int) -> None:
        self._anchor_ns, self._anchor_frame = t_ns, frame
        self._correction_ns = 0.0
        self._raw.clear()

    def feed(self, frames: int, ref_ns: int | None, now_ns: int, item: T, *,
             lost: bool = False) -> list[tuple[int, T, int | None]]:
        out: list[tuple[int, T, int | None]] = []
        frame = self.frame
        self.frame += frames
        if lost and self._pending:
            out += self.flush()  # the blocks before the loss keep the anchor they had
        if lost or self._pending or self._anchor_ns is None:
            if not self._pending:
                self._old_ns = self.time_of(frame) if self._anchor_ns is not None else None
            self._pending.append((frame, ref_ns, item))
            self._pending_frames += frames
            held_ns = self._pending_frames * NS // self.rate
            if len(self._pending) >= SETTLE_BLOCKS or (len(self._pending) >= 2
                                                       and held_ns >= SETTLE_NS):
                out += self.flush()
            return out
        jump = None if ref_ns is None else self._discipline(frame, frames, ref_ns, now_ns)
        out.append((self.time_of(frame), item, jump))
        return out

    def flush(self) -> list[tuple[int, T, int | None]]:
        """Anchor on what is held and release it (also at stop: held audio is still audio)."""
        pending, self._pending, self._pending_frames = self._pending, [], 0
        if not pending:
            return []
        f0 = pending[0][0]
        starts = [r - (f - f0) * NS // self.rate for f, r, _ in pending if r is not None]
        if starts:
            self._anchor(f0, round(statistics.median(starts)))
            for f, r, _ in pending:
                if r is not None:
                    self._raw.append(r - self._base(f))
        elif self._anchor_ns is None:
            raise ValueError("the first blocks of a stream need a reference time")
        old, self._old_ns = self._old_ns, None
        jump = None if old is None else self.time_of(f0) - old
        return [(self.time_of(f), item, jump if i == 0 else None)
                for i, (f, _, item) in enumerate(pending)]

    def _discipline(self, frame: int, frames: int, ref_ns: int, now_ns: int) -> int | None:
        base = self._base(frame)
        self._raw.append(ref_ns - base)
        if len(self._raw) < WINDOW:
            return None
        error = statistics.median(self._raw) - self._correction_ns
        if abs(error) > self.reanchor_ns:
            last = self._last_reanchor_ns
            if last is None or now_ns - last >= REANCHOR_MIN_INTERVAL_NS:
                # the window's median already is a robust anchor: no need to hold blocks
                self._anchor(frame, round(base + self._correction_ns + error))
                self._last_reanchor_ns = now_ns
                return round(error)
        # Slew: a bounded share of the error per callback. The bound is per frame, so a long
        # block may move further than a short one, never faster than MAX_SLEW_PPM.
        limit = MAX_SLEW_PPM * 1e-6 * frames * NS / self.rate
        self._correction_ns += max(-limit, min(limit, SLEW_GAIN * error))
        return None


class PyAudioMicrophone:
    """Microphone protocol on pyaudio; see the module docstring."""

    def __init__(
        self,
        profile: MicrophoneProfile,
        *,
        pyaudio_module: Any = None,
        realtime_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.profile = profile
        self.format = AudioFormat(rate=profile.rate, channels=profile.channels)
        self.block_frames = profile.block_frames
        self._pyaudio = pyaudio_module
        self._realtime_ns = realtime_ns
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._capture: _Capture | None = None
        self._sink: AudioSink | None = None
        self._emit = EventEmitter("microphone")  # events on record, from any thread
        self._watch: threading.Thread | None = None
        self.overflows = 0
        self.device_name: str | None = None
        self._fault_since_ns: int | None = None
        self._next_open_ns = 0
        self._last_fault: str | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, sink: AudioSink, events: EventSink) -> None:
        """Open the device (DeviceError if it is missing or cannot do the format) and run."""
        if self._watch is not None:
            raise DeviceError("microphone: already started")
        if self._pyaudio is None:
            # Enumerating ALSA devices makes libjack try to launch a JACK server; a recorder
            # must never spawn an audio server as a side effect.
            os.environ.setdefault("JACK_NO_START_SERVER", "1")
            try:
                import pyaudio
            except ImportError as exc:
                raise DeviceError(f"microphone: pyaudio is not installed: {exc}") from exc
            self._pyaudio = pyaudio
        self._sink, self._emit.events = sink, events
        self._stop.clear()
        self._activate(self._open())
        self._watch = threading.Thread(target=self._watch_loop, name="mic-watch", daemon=True)
        self._watch.start()

    def stop(self) -> None:
        """Stop within STOP_TIMEOUT_S, whatever the device does; no block after."""
        deadline = time.monotonic() + STOP_TIMEOUT_S

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop.set()
        watch, self._watch = self._watch, None
        if watch is not None and watch is not threading.current_thread():
            watch.join(left())
        with self._lock:
            capture = self._capture
        # held blocks are delivered only once no callback can run, to keep the order
        if capture is not None and capture.close(left()):
            capture.drain(left())
        with self._lock:
            self._capture = None

    # --- opening -------------------------------------------------------------------------

    def _activate(self, capture: _Capture) -> None:
        """Make it the current capture, then start it (so no first block is refused)."""
        with self._lock:
            self._capture = capture
        try:
            capture.begin()
        except DeviceError:
            with self._lock:
                if self._capture is capture:
                    self._capture = None
            raise

    def _open(self) -> _Capture:
        pa_mod = self._pyaudio
        try:
            pa = pa_mod.PyAudio()
        except (OSError, RuntimeError) as exc:
            raise DeviceError(f"microphone: PortAudio does not initialise: {exc}") from exc
        try:
            index, name = self._find_device(pa)
            rate, channels = self.format.rate, self.format.channels
            try:
                pa.is_format_supported(rate, input_device=index, input_channels=channels,
                                       input_format=pa_mod.paInt16)
            except ValueError as exc:
                why = exc.args[0] if exc.args else exc
                raise DeviceError(f"microphone {name!r}: {rate} Hz, {channels} channel(s), "
                                  f"16-bit is not supported: {why}") from exc
            capture = _Capture(self, pa, name)
            try:
                # start=False: the callback must not run before the capture is fully set up
                capture.stream = pa.open(
                    format=pa_mod.paInt16, channels=channels, rate=rate, input=True,
                    input_device_index=index, frames_per_buffer=self.block_frames,
                    stream_callback=capture.callback, start=False,
                )
            except (OSError, ValueError) as exc:
                raise DeviceError(f"microphone {name!r}: cannot open: {exc}") from exc
        except BaseException:
            with contextlib.suppress(Exception):
                pa.terminate()
            raise
        self.device_name = name
        return capture

    def _find_device(self, pa: Any) -> tuple[int, str]:
        want = self.profile.device
        inputs: list[tuple[int, str, int]] = []
        for i in range(pa.get_device_count()):
            try:
                info = pa.get_device_info_by_index(i)
            except OSError:
                continue  # PortAudio lists devices it then cannot describe
            if info.get("maxInputChannels", 0) > 0:
                inputs.append((i, str(info["name"]), int(info["maxInputChannels"])))
        if not want:
            try:
                info = pa.get_default_input_device_info()
                return int(info["index"]), str(info["name"])
            except OSError:
                pass
        else:
            exact = [d for d in inputs if d[1] == want]
            near = [d for d in inputs if want.lower() in d[1].lower()]
            if exact or near:
                i, name, _ = (exact or near)[0]
                return i, name
        listing = ", ".join(f"{n!r} ({c} ch)" for _, n, c in inputs) or "none"
        what = f"matching {want!r}" if want else "(no default input device)"
        raise DeviceError(f"microphone: no input device {what}; input devices: {listing}")

    # --- delivery (called from PortAudio's thread) ---------------------------------------

    def _deliver(self, capture: _Capture, block: AudioBlock) -> None:
        sink = self._sink
        with self._lock:
            # Only the current stream delivers, and nothing after stop(): the lock makes the
            # check and the put one step against stop() and the watchdog's teardown.
            if capture is not self._capture or sink is None:
                return
            sink(block)

    # --- watchdog ------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.wait(WATCH_PERIOD_S):
            try:
                self._check()
            except Exception:
                log.exception("microphone: watchdog step failed")

    def _check(self) -> None:
        now = time.monotonic_ns()
        with self._lock:
            capture = self._capture
        if capture is None:
            if self._stop.is_set() or now < self._next_open_ns:
                return
            self._reopen(now)
            return
        capture.flush_events(now)
        reason = capture.health(now)
        if reason is None:
            return
        self._fault_since_ns = now
        self._next_open_ns = now + int(REOPEN_INTERVAL_S * NS)
        self._emit("fault", {"device": "microphone", "name": capture.name, "reason": reason})
        if capture.close(STOP_TIMEOUT_S):
            capture.drain(STOP_TIMEOUT_S)  # the audio before the fault is good audio
        with self._lock:
            if self._capture is capture:
                self._capture = None

    def _reopen(self, now: int) -> None:
        self._next_open_ns = now + int(REOPEN_INTERVAL_S * NS)
        try:
            capture = self._open()
        except DeviceError as exc:
            if str(exc) != self._last_fault:  # say each new reason once, not every 2 s
                self._last_fault = str(exc)
                log.warning("%s", exc)
            return
        if self._stop.is_set():
            capture.close(STOP_TIMEOUT_S)
            return
        try:
            self._activate(capture)
        except DeviceError as exc:
            log.warning("%s", exc)
            return
        self._last_fault = None
        since = self._fault_since_ns or now
        self._emit("fault_cleared", {"device": "microphone", "name": capture.name,
                                     "gap_ns": time.monotonic_ns() - since})


class _Capture:
    """One opened stream with its own timeline, from open to teardown."""

    def __init__(self, mic: PyAudioMicrophone, pa: Any, name: str) -> None:
        self.mic = mic
        self.pa = pa
        self.name = name
        self.stream: Any = None
        self.rate = mic.format.rate
        self.frame_bytes = SAMPLE_BYTES * mic.format.channels
        self.block_ns = mic.block_frames * NS // self.rate
        self.continue_flag = int(mic._pyaudio.paContinue)
        self.overflow_flag = int(mic._pyaudio.paInputOverflow)
        self.clock: SampleClock[_Item] = SampleClock(self.rate)
        self.lock = threading.Lock()  # the clock and the order of delivery
        self.adc_clock: str | None = None  # "realtime" | "monotonic" | "none", from callback 1
        self.opened_ns = time.monotonic_ns()
        self.last_callback_ns: int | None = None
        self.callback_errors = 0
        self._teardown: threading.Thread | None = None
        self._close_lock = threading.Lock()
        self._reanchors: list[dict[str, Any]] = []  # waiting to be recorded (rate limit)
        self._last_event_ns: int | None = None
        self._event_lock = threading.Lock()

    def begin(self) -> None:
        self.opened_ns = time.monotonic_ns()
        try:
            self.stream.start_stream()
        except OSError as exc:
            self.close(STOP_TIMEOUT_S)
            raise DeviceError(f"microphone {self.name!r}: cannot start: {exc}") from exc

    # --- PortAudio's thread --------------------------------------------------------------

    def callback(self, in_data: bytes | None, frame_count: int, time_info: dict[str, float],
                 status: int) -> tuple[None, int]:
        # Must never raise: pyaudio turns an exception into paAbort and the stream dies.
        now = time.monotonic_ns()
        self.last_callback_ns = now
        try:
            data = in_data or b""
            frames = len(data) // self.frame_bytes
            # PortAudio flags the buffer that follows discarded input: this block is the first
            # after the loss, and its ADC time says how long the loss was.
            lost = bool(status & self.overflow_flag)
            adc = time_info.get("input_buffer_adc_time", 0.0) if time_info else 0.0
            if self.adc_clock is None:
                self._detect(adc, now)
            ref = self._reference(adc, frames, now)
            if lost:
                self.mic.overflows += 1
            with self.lock:
                item = (self.clock.frame, data, frames, lost)
                self._release(self.clock.feed(frames, ref, now, item, lost=lost), now)
        except Exception as exc:
            self.callback_errors += 1
            if self.callback_errors == 1:  # once per stream: a bug here would repeat per block
                self.mic._emit("fault", {"device": "microphone", "name": self.name,
                                         "reason": f"callback failed: {exc!r}"})
        return None, self.continue_flag

    def _detect(self, adc: float, now: int) -> None:
        rt = self.mic._realtime_ns()
        detail: dict[str, Any] = {"device": "microphone", "name": self.name,
                                  "rate": self.rate, "channels": self.mic.format.channels,
                                  "block_frames": self.mic.block_frames}
        if not adc or not math.isfinite(adc) or adc <= 0:
            self.adc_clock = "none"
        elif abs(rt - now) < AMBIGUOUS_CLOCKS_NS:
            self.adc_clock = "none"
            detail["why"] = "CLOCK_REALTIME is too close to CLOCK_MONOTONIC to tell them apart"
        else:
            adc_ns = round(adc * NS)
            self.adc_clock = "realtime" if abs(adc_ns - rt) < abs(adc_ns - now) else "monotonic"
            # how long before the callback the first sample was taken: a sanity figure
            detail["adc_age_ns"] = (rt if self.adc_clock == "realtime" else now) - adc_ns
        detail["adc_clock"] = self.adc_clock
        if self.adc_clock == "none":
            self.clock.reanchor_ns = REANCHOR_ARRIVAL_NS
        self.mic._emit("audio_clock", detail)

    def _reference(self, adc: float, frames: int, now: int) -> int:
        """CLOCK_MONOTONIC time of this block's first frame, as well as can be told now."""
        if self.adc_clock != "none" and adc and math.isfinite(adc):
            adc_ns = round(adc * NS)
            if self.adc_clock == "realtime":
                # The offset is read now, next to the ADC stamp, so a UTC step between two
                # callbacks does not move the audio.
                adc_ns -= self.mic._realtime_ns() - time.monotonic_ns()
            if abs(adc_ns - now) < ADC_PLAUSIBLE_NS:
                return adc_ns
        return now - frames * NS // self.rate

    def _release(self, ready: list[tuple[int, _Item, int | None]], now: int) -> None:
        """Hand stamped blocks to the sink, in order (the caller holds self.lock)."""
        for t, (frame, data, frames, lost), jump in ready:
            if jump is not None:
                with self._event_lock:
                    self._reanchors.append({"reason": "overflow" if lost else "jump",
                                            "jump_ns": jump, "frame": frame})
                self.flush_events(now)
            self.mic._deliver(self, AudioBlock(t, data, frames, lost))

    def drain(self, timeout_s: float) -> None:
        """Deliver the blocks held for anchoring: once the stream is stopped, they are final."""
        if not self.lock.acquire(timeout=timeout_s):
            return  # a callback is stuck in the sink; what it holds is lost with it
        try:
            self._release(self.clock.flush(), time.monotonic_ns())
        finally:
            self.lock.release()

    def flush_events(self, now: int) -> None:
        """Record waiting re-anchors: at once, or gathered into one event a second."""
        with self._event_lock:
            if not self._reanchors:
                return
            last = self._last_event_ns
            if last is not None and now - last < EVENT_INTERVAL_NS:
                return
            items, self._reanchors = self._reanchors, []
            self._last_event_ns = now
        first = items[0]
        detail: dict[str, Any] = {"device": "microphone", "name": self.name,
                                  "adc_clock": self.adc_clock, "reanchor": first["reason"],
                                  "jump_ns": first["jump_ns"], "frame": first["frame"],
                                  "overflows": self.mic.overflows}
        if len(items) > 1:
            detail["more"] = [{k: it[k] for k in ("reason", "jump_ns")} for it in items[1:]]
        self.mic._emit("audio_clock", detail)

    # --- watchdog's thread ---------------------------------------------------------------

    def health(self, now: int) -> str | None:
        """None while the stream runs; otherwise why it is dead."""
        try:
            active = bool(self.stream.is_active())
        except Exception as exc:
            return f"stream failed: {exc!r}"
        if not active:
            return "stream stopped (device error or unplugged)"
        last = self.last_callback_ns
        if last is None:
            if now - self.opened_ns > START_GRACE_NS:
                return f"no audio within {START_GRACE_NS // 1_000_000} ms of start"
            return None
        stall = max(STALL_MIN_NS, STALL_BLOCKS * self.block_ns)
        if now - last > stall:
            return f"no audio for {(now - last) // 1_000_000} ms (stalled)"
        return None

    def close(self, timeout_s: float) -> bool:
        """Stop, close and terminate in a helper thread: a wedged device cannot hold us.
        True when PortAudio stopped (no callback runs any more). Once only: stop() and the
        watchdog may both get here, and a second Pa_Terminate would end another session's."""

        def teardown() -> None:
            stream = self.stream
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.stop_stream()
                with contextlib.suppress(Exception):
                    stream.close()
            with contextlib.suppress(Exception):
                self.pa.terminate()

        with self._close_lock:
            t = self._teardown
            if t is None:
                t = self._teardown = threading.Thread(target=teardown, name="mic-close",
                                                      daemon=True)
                t.start()
        t.join(timeout_s)
        if t.is_alive():
            log.error("microphone %r: PortAudio did not stop within %.1f s; abandoned",
                      self.name, timeout_s)
            return False
        return True
