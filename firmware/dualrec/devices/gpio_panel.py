"""The teller's panel on the Pi's GPIO header, through RPi.GPIO (rpi-lgpio on a Pi 5: same API).

Two LEDs out, three inputs in (BCM numbers from the board profile's [panel]):

- recording LED: lit exactly while recording. It is the customer's notice, so it is switched
  synchronously inside set_recording() (on before the recorder takes the first frame of the
  session, off only after it has stopped) and it is off after stop(), at interpreter exit, and,
  through ``python -m dualrec.devices.gpio_panel leds-off`` in the systemd unit's ExecStopPost,
  after a crash or kill -9.
- fault LED: one blink pattern per fault name (FAULT_PATTERNS; unknown names: steady on).
- button (to GND): a press shorter than long_press_ms is Event("button", press="short"), held
  that long it is Event("mark", press="long") as soon as the time is reached.
- tamper switch (to GND, closed while the case is shut): opening it is Event("tamper"), closing
  it again Event("tamper_cleared"). A cut wire reads as open: tamper.
- power-fail detector (open-drain, pulls low on failure): Event("power_fail"), and
  Event("power_restored") if the supply comes back before the hold-up runs out.

Inputs use the internal pull-up and are active low. Debounce is twofold: the library's own
``bouncetime`` on edge detection, then this module's check, which reads the level once the line
has been quiet for debounce_ms and reports a change only if the level really differs from the
last stable one, so chatter yields one event and a glitch none. Each event carries the
CLOCK_MONOTONIC time of the first edge of its burst. RPi.GPIO calls back at the first edge;
rpi-lgpio (lgpio) only once the level has been stable for bouncetime, so there the callback's time
is corrected by that delay. If the kernel refuses edge detection ("Failed to add edge
detection": RPi.GPIO 0.7.1 on kernels whose sysfs GPIO numbers moved), the inputs are polled
every 5 ms instead; either way a slow poll re-reads every input so a missed edge is found.

PanelCore holds all of this behaviour over a two-function pin layer (read, write); GpioPanel puts
it on RPi.GPIO and the simulated panel (dualrec.sim.panel) on simulated pins, so the same
contract tests cover both.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from dualrec.config import PanelProfile
from dualrec.devices.base import DeviceError, EventSink
from dualrec.samples import Event

log = logging.getLogger(__name__)

# Fault LED patterns: alternating on/off durations in ms, starting with on, repeated.
# Chosen so that a technician can tell them apart across a room without a manual.
FAULT_PATTERNS: dict[str, tuple[int, ...]] = {
    "seal": (125, 125),  # fast blink, 4 Hz: recordings cannot be written (disk full or failing)
    "spool_full": (150, 150, 150, 1050),  # double blink every 1.5 s: new sessions refused
    "uplink": (500, 500),  # slow blink, 1 Hz: the branch server has not been reached
    # A part of the gateway failed unexpectedly and is being retried: triple blink every 2 s.
    "internal": (125, 125, 125, 125, 125, 1375),
    # A device absent, failing or unplugged (recording goes on without it; it is retried):
    # one long flash, then 1 (camera), 2 (microphone), 3 (operation log), 4 (clock) short ones.
    "camera": (800, 300, 150, 1250),
    "microphone": (800, 300, 150, 300, 150, 1250),
    "oplog": (800, 300, 150, 300, 150, 300, 150, 1250),
    "clock": (800, 300, 150, 300, 150, 300, 150, 300, 150, 1250),
    # The session that just ended lacks a step its business type requires (risk disclosure,
    # customer confirmation...): four quick flashes every 1.6 s, while the customer is there.
    "incomplete": (100, 100, 100, 100, 100, 100, 100, 900),
    # The branch server refuses a segment for good (kept on the box, reported): two long
    # flashes every 2.5 s, so it is not taken for an unreachable server (slow blink).
    "quarantine": (700, 300, 700, 800),
}
# Any other fault name: steady on. No fault: off.

POLL_INTERVAL_NS = 5_000_000  # inputs polled when edge detection is unavailable
RECONCILE_INTERVAL_NS = 250_000_000  # with edge detection: re-read inputs to catch a lost edge
_JOIN_TIMEOUT_S = 1.0

_PI5_HINT = (
    "this looks like a Raspberry Pi 5, whose GPIO sit behind the RP1 chip where RPi.GPIO "
    "cannot reach them: install rpi-lgpio (apt install python3-rpi-lgpio, which replaces "
    "python3-rpi.gpio), which provides the same RPi.GPIO API"
)


class PinIO(Protocol):
    """The pin layer PanelCore drives: levels are True = high (3.3 V), False = low."""

    def read(self, pin: int) -> bool: ...
    def write(self, pin: int, high: bool) -> None: ...


@dataclass
class _Input:
    kind: str  # "button", "tamper", "power_fail"
    pin: int
    stable: bool = True  # last debounced level
    last_raw: bool = True  # last level seen by the poller
    first_edge_ns: int | None = None  # first edge of the burst being debounced
    check_at_ns: int = 0  # when the burst is considered over


@dataclass
class _Button:
    armed: bool = True  # False while a press held at start has not been released yet
    pressed_at_ns: int | None = None
    long_fired: bool = False


class PanelCore:
    """Panel behaviour over any PinIO: LEDs, fault patterns, debounce, presses, tamper, power."""

    def __init__(self, profile: PanelProfile, *, name: str = "panel") -> None:
        self.profile = profile
        self.name = name
        self.debounce_ns = profile.debounce_ms * 1_000_000
        self.long_press_ns = profile.long_press_ms * 1_000_000
        self._inputs = {
            profile.button: _Input("button", profile.button),
            profile.tamper: _Input("tamper", profile.tamper),
            profile.power_fail: _Input("power_fail", profile.power_fail),
        }
        self._button = _Button()
        self._io: PinIO | None = None
        self._events: EventSink | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._poll = False
        self._next_poll_ns = 0
        self._recording = False
        self._fault: str | None = None
        self._fault_steps: tuple[int, ...] = ()
        self._fault_step = 0
        self._fault_next_ns: int | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, io: PinIO, events: EventSink, *, poll: bool = False) -> None:
        """Take over the pins: LEDs to their state, inputs read; inputs already active at start
        (case open, power failing) are reported at once."""
        pending: list[Event] = []
        with self._lock:
            if self._thread is not None:
                raise DeviceError(f"{self.name}: already started")
            self._io, self._events, self._stopping, self._poll = io, events, False, poll
            now = time.monotonic_ns()
            io.write(self.profile.recording_led, self._recording)
            self._apply_fault(now)
            for inp in self._inputs.values():
                inp.stable = inp.last_raw = io.read(inp.pin)
                inp.first_edge_ns = None
            # A button held (or shorted) at start is not a press: it counts once released.
            self._button = _Button(armed=self._inputs[self.profile.button].stable)
            if self._inputs[self.profile.tamper].stable:
                pending.append(self._event(now, "tamper", switch="open", at_start=True))
            if not self._inputs[self.profile.power_fail].stable:
                pending.append(self._event(now, "power_fail", input="asserted", at_start=True))
            self._next_poll_ns = now
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._emit(pending)

    def set_polling(self, poll: bool) -> None:
        """Poll the inputs every 5 ms (edge detection unavailable) rather than every 250 ms."""
        with self._lock:
            self._poll = poll
            self._next_poll_ns = time.monotonic_ns()
            self._wake.notify()

    def stop(self) -> None:
        """Stop the thread and turn both LEDs off; idempotent."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)
        with self._lock:
            io, self._io = self._io, None
            self._recording, self._fault, self._fault_next_ns = False, None, None
            self._events = None
            if io is None:
                return  # never started, or stopped already
            for led in (self.profile.recording_led, self.profile.fault_led):
                try:
                    io.write(led, False)
                except Exception:  # the other LED and the caller's cleanup still matter
                    log.exception("%s: cannot turn GPIO%d off", self.name, led)

    # --- outputs --------------------------------------------------------------------------

    def set_recording(self, on: bool) -> None:
        with self._lock:
            self._recording = bool(on)
            if self._io is not None and not self._stopping:
                # Synchronous on purpose: when this returns the notice is lit (or dark).
                self._io.write(self.profile.recording_led, self._recording)

    @property
    def recording(self) -> bool:
        return self._recording

    def set_fault(self, pattern: str | None) -> None:
        with self._lock:
            if pattern == self._fault:
                return  # the lamp re-reports its state; restarting the pattern would stutter
            self._fault = pattern
            if self._io is not None and not self._stopping:
                self._apply_fault(time.monotonic_ns())
                self._wake.notify()

    @property
    def fault(self) -> str | None:
        return self._fault

    def _apply_fault(self, now: int) -> None:
        io = self._io
        assert io is not None
        if self._fault is None:
            self._fault_steps, self._fault_next_ns = (), None
            io.write(self.profile.fault_led, False)
            return
        self._fault_steps = FAULT_PATTERNS.get(self._fault, ())
        self._fault_step = 0
        io.write(self.profile.fault_led, True)
        self._fault_next_ns = now + self._fault_steps[0] * 1_000_000 if self._fault_steps else None

    # --- inputs ---------------------------------------------------------------------------

    def edge(self, pin: int, t_ns: int) -> None:
        """An edge on an input at t_ns (any thread): debounce it, then maybe report it."""
        with self._lock:
            inp = self._inputs.get(pin)
            if inp is None or self._thread is None:
                return
            self._edge_locked(inp, t_ns)
            self._wake.notify()

    def _edge_locked(self, inp: _Input, t_ns: int) -> None:
        # The burst is over once the line has been quiet for debounce_ms after its last edge;
        # the event will carry the time of its first edge.
        if inp.first_edge_ns is None:
            inp.first_edge_ns = t_ns
            inp.check_at_ns = t_ns + self.debounce_ns
        else:
            inp.check_at_ns = max(inp.check_at_ns, t_ns + self.debounce_ns)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                # Computing the deadline and waiting under one lock: no wake-up can be lost.
                wait_ns = self._next_wake_ns() - time.monotonic_ns()
                if wait_ns > 0:
                    self._wake.wait(wait_ns / 1e9)
                if self._stopping:
                    return
                pending = self._due(time.monotonic_ns())
            self._emit(pending)  # outside the lock: the sink may block or call back in

    def _next_wake_ns(self) -> int:
        wakes = [self._next_poll_ns]
        wakes += [i.check_at_ns for i in self._inputs.values() if i.first_edge_ns is not None]
        if self._button.pressed_at_ns is not None and not self._button.long_fired:
            wakes.append(self._button.pressed_at_ns + self.long_press_ns)
        if self._fault_next_ns is not None:
            wakes.append(self._fault_next_ns)
        return min(wakes)

    def _due(self, now: int) -> list[Event]:
        """Everything whose time has come; returns the events to send (outside the lock)."""
        io = self._io
        assert io is not None
        out: list[Event] = []
        if now >= self._next_poll_ns:
            self._next_poll_ns = now + (POLL_INTERVAL_NS if self._poll else RECONCILE_INTERVAL_NS)
            for inp in self._inputs.values():
                level = io.read(inp.pin)
                if self._poll and level != inp.last_raw:
                    self._edge_locked(inp, now)
                elif inp.first_edge_ns is None and level != inp.stable:
                    # With edge detection on, a change nobody reported: an edge was lost.
                    self._edge_locked(inp, now)
                inp.last_raw = level
        for inp in self._inputs.values():
            if inp.first_edge_ns is not None and now >= inp.check_at_ns:
                first, inp.first_edge_ns = inp.first_edge_ns, None
                level = io.read(inp.pin)
                inp.last_raw = level
                if level != inp.stable:
                    inp.stable = level
                    out += self._transition(inp, level, first, now)
        b = self._button
        if (b.pressed_at_ns is not None and not b.long_fired
                and now >= b.pressed_at_ns + self.long_press_ns):
            b.long_fired = True
            out.append(self._event(b.pressed_at_ns, "mark", press="long",
                                   held_ms=self.profile.long_press_ms))
        if self._fault_next_ns is not None and now >= self._fault_next_ns:
            steps = self._fault_steps
            # Scheduled from the pattern's own start, not from now: no drift over hours.
            while self._fault_next_ns <= now:
                self._fault_step = (self._fault_step + 1) % len(steps)
                self._fault_next_ns += steps[self._fault_step] * 1_000_000
            io.write(self.profile.fault_led, self._fault_step % 2 == 0)
        return out

    def _transition(self, inp: _Input, high: bool, t_ns: int, now: int) -> list[Event]:
        if inp.kind == "tamper":
            if high:
                return [self._event(t_ns, "tamper", switch="open")]
            return [self._event(t_ns, "tamper_cleared", switch="closed")]
        if inp.kind == "power_fail":
            if not high:
                return [self._event(t_ns, "power_fail", input="asserted")]
            return [self._event(t_ns, "power_restored", input="released")]
        b = self._button
        if not high:  # pressed
            if b.armed:
                b.pressed_at_ns, b.long_fired = t_ns, False
            return []
        out: list[Event] = []
        if b.pressed_at_ns is not None and not b.long_fired:
            held_ms = (t_ns - b.pressed_at_ns) // 1_000_000
            if held_ms >= self.profile.long_press_ms:
                # Released after the long-press time but before the thread saw it: still a mark.
                out.append(self._event(b.pressed_at_ns, "mark", press="long", held_ms=held_ms))
            else:
                out.append(self._event(b.pressed_at_ns, "button", press="short",
                                       duration_ms=held_ms))
        b.armed, b.pressed_at_ns, b.long_fired = True, None, False
        return out

    def _event(self, t_ns: int, kind: str, **detail: Any) -> Event:
        pin = {"button": self.profile.button, "mark": self.profile.button,
               "tamper": self.profile.tamper, "tamper_cleared": self.profile.tamper,
               "power_fail": self.profile.power_fail,
               "power_restored": self.profile.power_fail}[kind]
        return Event(t_mono_ns=t_ns, kind=kind, detail={**detail, "gpio": pin})

    def _emit(self, events: list[Event]) -> None:
        sink = self._events
        if sink is None:
            return
        for ev in events:
            try:
                sink(ev)
            except Exception:
                log.exception("%s: event sink failed on %s", self.name, ev.kind)


class _RpiGpioPins:
    """PinIO on the RPi.GPIO module (BCM numbering)."""

    def __init__(self, gpio: ModuleType) -> None:
        self.gpio = gpio

    def read(self, pin: int) -> bool:
        return bool(self.gpio.input(pin))

    def write(self, pin: int, high: bool) -> None:
        self.gpio.output(pin, self.gpio.HIGH if high else self.gpio.LOW)


def import_gpio() -> ModuleType:
    """Import RPi.GPIO (or rpi-lgpio's module of the same name); DeviceError with what to do."""
    try:
        import RPi.GPIO as gpio  # imported here only: this module loads on any machine
    except ImportError as exc:
        raise DeviceError(
            "panel: the RPi.GPIO module is not installed: apt install python3-rpi-lgpio "
            "(any Pi, required on a Pi 5) or python3-rpi.gpio (Pi 4 and older)"
        ) from exc
    except RuntimeError as exc:
        raise explain_gpio_error(exc) from exc
    return gpio


def explain_gpio_error(exc: BaseException) -> DeviceError:
    """Turn the library's terse errors into what a technician can act on."""
    msg = str(exc)
    if "SOC peripheral base address" in msg:
        return DeviceError(f"panel: RPi.GPIO failed ({msg}): {_PI5_HINT}")
    if "busy" in msg.lower():
        return DeviceError(
            f"panel: a panel GPIO is held elsewhere ({msg}): another process, or a dtoverlay "
            "(w1-gpio, pps-gpio, a HAT) on the same pin; check the [panel] pins against "
            "config.txt"
        )
    if "/dev/mem" in msg or "gpiomem" in msg or "permission" in msg.lower() or "gpiochip" in msg:
        return DeviceError(
            f"panel: no access to the GPIO ({msg}): run the service as a user in the gpio group"
        )
    return DeviceError(f"panel: GPIO setup failed: {type(exc).__name__}: {msg}")


class GpioPanel:
    """The Panel interface on RPi.GPIO / rpi-lgpio; see the module docstring."""

    def __init__(self, profile: PanelProfile) -> None:
        self.profile = profile
        self.core = PanelCore(profile, name="gpio-panel")
        self._gpio: ModuleType | None = None
        self._edge_lag_ns = 0
        self._detecting: list[int] = []
        self.polling = False  # True when edge detection was refused and inputs are polled

    @property
    def leds(self) -> tuple[int, int]:
        return (self.profile.recording_led, self.profile.fault_led)

    @property
    def inputs(self) -> tuple[int, int, int]:
        return (self.profile.button, self.profile.tamper, self.profile.power_fail)

    def start(self, events: EventSink) -> None:
        if self._gpio is not None:
            raise DeviceError("panel: already started")
        gpio = import_gpio()
        try:
            self._claim(gpio)
        except DeviceError:
            raise
        except Exception as exc:  # RuntimeError from RPi.GPIO, lgpio.error from rpi-lgpio
            with contextlib.suppress(Exception):
                gpio.cleanup([*self.leds, *self.inputs])
            raise explain_gpio_error(exc) from exc
        self._gpio = gpio
        # rpi-lgpio calls back only once the level has been stable for bouncetime (lgpio's
        # debounce); RPi.GPIO at the first edge. rpi-lgpio's module holds the lgpio module.
        self._edge_lag_ns = self.core.debounce_ns if hasattr(gpio, "lgpio") else 0
        self.core.start(_RpiGpioPins(gpio), events)
        refused: list[str] = []
        for pin in self.inputs:
            try:
                gpio.add_event_detect(pin, gpio.BOTH, callback=self._on_edge,
                                      bouncetime=self.profile.debounce_ms)
                self._detecting.append(pin)
            except RuntimeError as exc:
                refused.append(f"GPIO{pin}: {exc}")
        if refused:
            # Inputs still work, polled every 5 ms: a late button is better than none.
            self.polling = True
            self.core.set_polling(True)
            log.warning("panel: edge detection refused (%s); polling the inputs instead",
                        "; ".join(refused))
        atexit.register(self._at_exit)

    def _claim(self, gpio: ModuleType) -> None:
        # Our pins may still be outputs left by a killed run; that warning is expected noise.
        gpio.setwarnings(False)
        mode = gpio.getmode()
        if mode is None:
            gpio.setmode(gpio.BCM)
        elif mode != gpio.BCM:
            raise DeviceError("panel: something else in this process set BOARD pin numbering; "
                              "the board profile uses BCM numbers")
        # Off first, before anything else can happen: the notice must never light by accident.
        gpio.setup(list(self.leds), gpio.OUT, initial=gpio.LOW)
        gpio.setup(list(self.inputs), gpio.IN, pull_up_down=gpio.PUD_UP)

    def _on_edge(self, channel: int) -> None:
        # Runs on the library's callback thread: stamp first, everything else later.
        t = time.monotonic_ns() - self._edge_lag_ns
        self.core.edge(channel, t)

    def set_recording(self, on: bool) -> None:
        self.core.set_recording(on)

    def set_fault(self, pattern: str | None) -> None:
        self.core.set_fault(pattern)

    def stop(self) -> None:
        self.core.stop()  # LEDs off first
        gpio, self._gpio = self._gpio, None
        if gpio is None:
            return
        atexit.unregister(self._at_exit)
        for pin in self._detecting:
            with contextlib.suppress(Exception):
                gpio.remove_event_detect(pin)
        self._detecting.clear()
        with contextlib.suppress(Exception):
            # Only our pins: other code in the process (a PPS or sync output) keeps its own.
            gpio.cleanup([*self.leds, *self.inputs])

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def leds_off(profile: PanelProfile, gpio: ModuleType | None = None) -> None:
    """Drive both LEDs low and leave them so: for the service's ExecStopPost after a crash."""
    gpio = gpio or import_gpio()
    try:
        gpio.setwarnings(False)
        if gpio.getmode() is None:
            gpio.setmode(gpio.BCM)
        gpio.setup([profile.recording_led, profile.fault_led], gpio.OUT, initial=gpio.LOW)
    except Exception as exc:
        raise explain_gpio_error(exc) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dualrec.devices.gpio_panel leds-off --board board.toml``."""
    from dualrec.config import ConfigError, load_board

    parser = argparse.ArgumentParser(prog="python -m dualrec.devices.gpio_panel")
    parser.add_argument("command", choices=["leds-off"])
    parser.add_argument("--board", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        board = load_board(args.board)
        if board.panel.backend == "rpigpio":
            leds_off(board.panel)
    except (ConfigError, DeviceError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
