"""A faithful fake of RPi.GPIO (0.7.x) for tests: same functions, constants, messages and failure
modes, with hooks to drive inputs and read outputs.

What is copied from the real library (RPi.GPIO's py_gpio.c / event_gpio.c, and rpi-lgpio, which
is bug-compatible with it), because the panel backend must survive exactly these:

- ``setmode(BCM|BOARD)`` comes first; any pin function before it raises RuntimeError("Please set
  pin numbering mode using GPIO.setmode(GPIO.BOARD) or GPIO.setmode(GPIO.BCM)"); a second,
  different mode raises ValueError("A different mode has already been set!").
- ``setup()`` rejects a pull on an output and an ``initial`` on an input (ValueError).
- ``output()`` on a pin that is not an output: RuntimeError("The GPIO channel has not been set up
  as an OUTPUT"); ``input()`` on a pin never set up: RuntimeError("You must setup() the GPIO
  channel first").
- ``add_event_detect()`` on a non-input: RuntimeError("You must setup() the GPIO channel as an
  input first"); a second time on the same pin: RuntimeError("Conflicting edge detection already
  enabled for this GPIO channel"); when the kernel refuses (sysfs numbering changed under
  RPi.GPIO 0.7.1 on kernel 6.6, a pin claimed elsewhere): RuntimeError("Failed to add edge
  detection") — simulated with ``fake_reset(edge_detect_fails=True)``.
- Callbacks run on one separate thread (RPi.GPIO's poll thread), one after another; an exception
  in a callback is printed to stderr and the thread goes on.
- Debounce: RPi.GPIO reports the first edge and drops edges within ``bouncetime`` ms of the last
  reported one; rpi-lgpio (lgpio) reports an edge only once the level has been stable for
  ``bouncetime`` ms, so its callbacks come that much later. ``fake_reset(debounce="lgpio")`` gives
  the second behaviour and, like rpi-lgpio, makes ``lgpio`` visible as a module attribute.
- On a Raspberry Pi 5 RPi.GPIO cannot map the GPIO registers: ``setup()``, ``input()`` and
  ``output()`` raise RuntimeError("Cannot determine SOC peripheral base address") — simulated
  with ``fake_reset(pi5=True)``.
- ``cleanup(channels)`` returns only those pins to inputs without pulls (an LED on such a pin goes
  dark); ``cleanup()`` with no argument returns every pin set up and forgets the numbering mode.

Test hooks (BCM numbers, whatever the numbering mode; all start with ``fake_``):
``fake_reset``, ``fake_drive`` (an external level, optionally bouncing first), ``fake_release``,
``fake_level``, ``fake_history`` (an output's level changes with CLOCK_MONOTONIC stamps),
``fake_pwm``, ``fake_callback_threads``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

VERSION = "0.7.1"
RPI_INFO = {"P1_REVISION": 3, "REVISION": "c03114", "TYPE": "Pi 4 Model B",
            "MANUFACTURER": "Sony UK", "PROCESSOR": "BCM2711", "RAM": "4GB"}
RPI_REVISION = 3

UNKNOWN = -1
BOARD = 10
BCM = 11
PUD_OFF = 20
PUD_DOWN = 21
PUD_UP = 22
OUT = 0
IN = 1
LOW = 0
HIGH = 1
RISING = 31
FALLING = 32
BOTH = 33
SERIAL = 40
SPI = 41
I2C = 42
HARD_PWM = 43

_MSG_MODE = ("Please set pin numbering mode using GPIO.setmode(GPIO.BOARD) or "
             "GPIO.setmode(GPIO.BCM)")
_MSG_PI5 = "Cannot determine SOC peripheral base address"
_MSG_CHANNEL = "The channel sent is invalid on a Raspberry Pi"

# Physical header pin -> BCM GPIO (40-pin header, B+ and later).
_BOARD_MAP = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24, 19: 10,
    21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 29: 5, 31: 6, 32: 12, 33: 13, 35: 19, 36: 16, 37: 26,
    38: 20, 40: 21,
}
_BCM_MAP = {gpio: board for board, gpio in _BOARD_MAP.items()}

Callback = Callable[[int], Any]


@dataclass
class _Pin:
    direction: int | None = None  # as set up by this process; None: not set up
    pull: int = PUD_OFF
    out: int = LOW
    drive: int | None = None  # an external level (switch, detector); None: not driven
    history: list[tuple[int, int]] = field(default_factory=list)
    edge: int | None = None
    bouncetime: int | None = None
    callbacks: list[Callback] = field(default_factory=list)
    generation: int = 0  # bumped when detection is removed: queued callbacks then lapse
    last_call_ns: int = 0  # RPi.GPIO debounce: the last reported edge
    last_change_ns: int = 0  # lgpio debounce: the last change of level
    reported: int = HIGH  # lgpio debounce: the last reported level
    detected: bool = False

    def level(self) -> int:
        if self.direction == OUT:
            return self.out
        if self.drive is not None:
            return self.drive
        return HIGH if self.pull == PUD_UP else LOW


_lock = threading.RLock()
_pins: dict[int, _Pin] = {}
_mode = UNKNOWN
_warnings = True
_pi5 = False
_edge_fails = False
_debounce = "rpigpio"
_pwms: dict[int, PWM] = {}
_jobs: list[tuple[int, int, Callable[[], None]]] = []
_job_seq = itertools.count()
_wake = threading.Condition(_lock)
_thread: threading.Thread | None = None
_callback_threads: set[str] = set()


# --- test hooks ------------------------------------------------------------------------------


def fake_reset(*, pi5: bool = False, edge_detect_fails: bool = False,
               debounce: str = "rpigpio") -> None:
    """Forget every pin, the mode and queued callbacks; choose which board and library to be."""
    global _mode, _warnings, _pi5, _edge_fails, _debounce
    if debounce not in ("rpigpio", "lgpio"):
        raise ValueError("debounce is 'rpigpio' or 'lgpio'")
    with _lock:
        _pins.clear()
        _pwms.clear()
        _jobs.clear()
        _callback_threads.clear()
        _mode, _warnings = UNKNOWN, True
        _pi5, _edge_fails, _debounce = pi5, edge_detect_fails, debounce
        module = sys.modules[__name__]
        # rpi-lgpio imports lgpio at module level; code can tell the two libraries apart by it.
        if debounce == "lgpio":
            module.lgpio = object()  # type: ignore[attr-defined]
        elif hasattr(module, "lgpio"):
            del module.lgpio  # type: ignore[attr-defined]


def fake_drive(gpio: int, level: int, bounce_ms: Sequence[float] = ()) -> int:
    """Drive an input from outside (a switch, a detector) to level; return the first edge's time.

    With bounce_ms the contact chatters first: it goes to level, then back after bounce_ms[0],
    to level again after bounce_ms[1], and so on, ending at level. This call sleeps through it.
    """
    t0 = _set_drive(gpio, int(bool(level)))
    current = int(bool(level))
    for i, ms in enumerate(bounce_ms):
        time.sleep(ms / 1000)
        current = 1 - int(bool(level)) if i % 2 == 0 else int(bool(level))
        _set_drive(gpio, current)
    if current != int(bool(level)):
        _set_drive(gpio, int(bool(level)))
    return t0


def fake_release(gpio: int) -> None:
    """Stop driving the pin from outside: its pull decides the level again."""
    with _lock:
        pin = _pins.setdefault(gpio, _Pin())
        before = pin.level()
        pin.drive = None
        _changed(gpio, pin, before, time.monotonic_ns())


def fake_level(gpio: int) -> int:
    """The level on the wire now, as a meter would read it."""
    with _lock:
        return _pins.setdefault(gpio, _Pin()).level()


def fake_history(gpio: int) -> list[tuple[int, int]]:
    """Every change of the pin's output level as (t_mono_ns, level), oldest first."""
    with _lock:
        return list(_pins.setdefault(gpio, _Pin()).history)


def fake_pwm(gpio: int) -> tuple[bool, float, float] | None:
    """(running, frequency, duty cycle) of the PWM object on the pin, if any."""
    with _lock:
        p = _pwms.get(gpio)
        return None if p is None else (p._running, p._frequency, p._dc)


def fake_callback_threads() -> set[str]:
    """Names of the threads that ran callbacks (never the thread that drove the input)."""
    with _lock:
        return set(_callback_threads)


def _set_drive(gpio: int, level: int) -> int:
    t = time.monotonic_ns()
    with _lock:
        pin = _pins.setdefault(gpio, _Pin())
        before = pin.level()
        pin.drive = level
        _changed(gpio, pin, before, t)
    return t


# --- edge detection machinery ----------------------------------------------------------------


def _changed(gpio: int, pin: _Pin, before: int, t: int) -> None:
    """The pin's level may have changed at t: report edges the way the chosen library would."""
    after = pin.level()
    if after == before or pin.edge is None or pin.direction != IN:
        return
    if _debounce == "lgpio":
        if pin.bouncetime:
            # lgpio: report only once the level has been stable for bouncetime.
            pin.last_change_ns = t
            due = t + pin.bouncetime * 1_000_000
            generation = pin.generation
            _schedule(due, lambda: _lgpio_settled(gpio, generation, due))
            return
        pin.reported = after
        if _edge_matches(pin.edge, after):
            _report(gpio, pin)
        return
    if not _edge_matches(pin.edge, after):
        return
    if pin.bouncetime and pin.last_call_ns and t - pin.last_call_ns <= pin.bouncetime * 1_000_000:
        return  # RPi.GPIO: within bouncetime of the last reported edge
    pin.last_call_ns = t
    _report(gpio, pin)


def _lgpio_settled(gpio: int, generation: int, due: int) -> None:
    with _lock:
        pin = _pins[gpio]
        if pin.generation != generation or pin.edge is None or pin.bouncetime is None:
            return
        if pin.last_change_ns + pin.bouncetime * 1_000_000 > due:
            return  # it changed again since: that change's own check decides
        level = pin.level()
        if level == pin.reported:
            return
        pin.reported = level
        if _edge_matches(pin.edge, level):
            _report(gpio, pin)


def _edge_matches(edge: int, level: int) -> bool:
    return edge == BOTH or (edge == RISING and level == HIGH) or (edge == FALLING and level == LOW)


def _report(gpio: int, pin: _Pin) -> None:
    pin.detected = True
    channel = gpio if _mode != BOARD else _BCM_MAP[gpio]
    generation = pin.generation
    for cb in list(pin.callbacks):
        _schedule(0, functools.partial(_run_callback, gpio, generation, cb, channel))


def _run_callback(gpio: int, generation: int, cb: Callback, channel: int) -> None:
    with _lock:
        if _pins[gpio].generation != generation:
            return  # detection was removed after the edge: RPi.GPIO no longer calls back
        _callback_threads.add(threading.current_thread().name)
    _call_outside_lock(cb, channel)


def _call_outside_lock(cb: Callback, channel: int) -> None:
    try:
        cb(channel)
    except Exception:
        traceback.print_exc()  # as RPi.GPIO: printed, and the poll thread goes on


def _schedule(due_ns: int, job: Callable[[], None]) -> None:
    global _thread
    with _lock:
        heapq.heappush(_jobs, (due_ns, next(_job_seq), job))
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_dispatch, name="GPIO-poll", daemon=True)
            _thread.start()
        _wake.notify()


def _dispatch() -> None:
    while True:
        with _lock:
            while not _jobs or _jobs[0][0] > time.monotonic_ns():
                timeout = None if not _jobs else (_jobs[0][0] - time.monotonic_ns()) / 1e9
                _wake.wait(timeout)
            _, _, job = heapq.heappop(_jobs)
        # A callback runs outside the lock, so it may itself call input() and output().
        job()


# --- the RPi.GPIO API ------------------------------------------------------------------------


def _gpio(channel: int) -> int:
    if _mode == UNKNOWN:
        raise RuntimeError(_MSG_MODE)
    if not isinstance(channel, int):
        raise ValueError("Channel must be an integer or list/tuple of integers")
    if _mode == BCM:
        if not 0 <= channel <= 27:
            raise ValueError(_MSG_CHANNEL)
        return channel
    try:
        return _BOARD_MAP[channel]
    except KeyError:
        raise ValueError(_MSG_CHANNEL) from None


def _channels(chanlist: int | Iterable[int]) -> list[int]:
    if isinstance(chanlist, int):
        return [_gpio(chanlist)]
    return [_gpio(c) for c in chanlist]


def _check_pi() -> None:
    if _pi5:
        raise RuntimeError(_MSG_PI5)


def setmode(mode: int) -> None:
    global _mode
    with _lock:
        if _mode != UNKNOWN and mode != _mode:
            raise ValueError("A different mode has already been set!")
        if mode not in (BOARD, BCM):
            raise ValueError("An invalid mode was passed to setmode()")
        _mode = mode


def getmode() -> int | None:
    return None if _mode == UNKNOWN else _mode


def setwarnings(flag: bool) -> None:
    global _warnings
    _warnings = bool(flag)


def setup(channel: int | Iterable[int], direction: int, pull_up_down: int = PUD_OFF,
          initial: int | None = None) -> None:
    if direction not in (IN, OUT):
        raise ValueError("An invalid direction was passed to setup()")
    if direction == OUT and pull_up_down != PUD_OFF:
        raise ValueError("pull_up_down parameter is not valid for outputs")
    if direction == IN and initial is not None:
        raise ValueError("initial parameter is not valid for inputs")
    if pull_up_down not in (PUD_OFF, PUD_DOWN, PUD_UP):
        raise ValueError("Invalid value for pull_up_down - should be either PUD_OFF, PUD_UP or "
                         "PUD_DOWN")
    with _lock:
        gpios = _channels(channel)
        _check_pi()
        for gpio in gpios:
            pin = _pins.setdefault(gpio, _Pin())
            if _warnings and gpio in (2, 3) and pull_up_down != PUD_OFF:
                warnings.warn("A physical pull up resistor is fitted on this channel!",
                              RuntimeWarning, stacklevel=2)
            before = pin.level()
            if direction == OUT:
                _remove_detection(pin)
                if initial is not None:
                    pin.out = int(bool(initial))
                pin.direction, pin.pull = OUT, PUD_OFF
                if pin.out != before or not pin.history:
                    pin.history.append((time.monotonic_ns(), pin.out))
            else:
                pin.direction, pin.pull = IN, pull_up_down
                _changed(gpio, pin, before, time.monotonic_ns())


def output(channel: int | Iterable[int], value: int | bool | Iterable[int | bool]) -> None:
    with _lock:
        gpios = _channels(channel)
        values = [int(bool(v)) for v in value] if isinstance(value, list | tuple) else [
            int(bool(value))]
        if len(values) == 1 and len(gpios) > 1:
            values *= len(gpios)
        if len(values) != len(gpios):
            raise RuntimeError("Number of channels != number of values")
        _check_pi()
        for gpio, v in zip(gpios, values, strict=True):
            pin = _pins.setdefault(gpio, _Pin())
            if pin.direction != OUT:
                raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
            if pin.out != v:
                pin.out = v
                pin.history.append((time.monotonic_ns(), v))


def input(channel: int) -> int:  # shadows the builtin, as the real module does
    with _lock:
        gpio = _gpio(channel)
        _check_pi()
        pin = _pins.setdefault(gpio, _Pin())
        if pin.direction is None:
            raise RuntimeError("You must setup() the GPIO channel first")
        return pin.level()


def gpio_function(channel: int) -> int:
    with _lock:
        pin = _pins.setdefault(_gpio(channel), _Pin())
        return OUT if pin.direction == OUT else IN


def add_event_detect(channel: int, edge: int, callback: Callback | None = None,
                     bouncetime: int | None = None) -> None:
    if callback is not None and not callable(callback):
        raise TypeError("Parameter must be callable")
    with _lock:
        gpio = _gpio(channel)
        pin = _pins.setdefault(gpio, _Pin())
        if pin.direction != IN:
            raise RuntimeError("You must setup() the GPIO channel as an input first")
        if edge not in (RISING, FALLING, BOTH):
            raise ValueError("The edge must be set to RISING, FALLING or BOTH")
        if bouncetime is not None and bouncetime <= 0:
            raise ValueError("Bouncetime must be greater than 0")
        if pin.edge is not None:
            raise RuntimeError("Conflicting edge detection already enabled for this GPIO "
                               "channel")
        if _edge_fails:
            raise RuntimeError("Failed to add edge detection")
        pin.edge, pin.bouncetime = edge, bouncetime
        pin.callbacks = [callback] if callback is not None else []
        pin.last_call_ns, pin.reported, pin.detected = 0, pin.level(), False


def add_event_callback(channel: int, callback: Callback) -> None:
    if not callable(callback):
        raise TypeError("Parameter must be callable")
    with _lock:
        pin = _pins.setdefault(_gpio(channel), _Pin())
        if pin.edge is None:
            raise RuntimeError("Add event detection using add_event_detect first before adding "
                               "a callback")
        pin.callbacks.append(callback)


def remove_event_detect(channel: int) -> None:
    with _lock:
        _remove_detection(_pins.setdefault(_gpio(channel), _Pin()))


def _remove_detection(pin: _Pin) -> None:
    pin.edge, pin.bouncetime, pin.callbacks = None, None, []
    pin.generation += 1


def event_detected(channel: int) -> bool:
    with _lock:
        pin = _pins.setdefault(_gpio(channel), _Pin())
        seen, pin.detected = pin.detected, False
        return seen


def wait_for_edge(channel: int, edge: int, bouncetime: int | None = None,
                  timeout: int | None = None) -> int | None:
    """Block until edge (or timeout ms); the channel, or None on timeout."""
    done = threading.Event()
    with _lock:
        pin = _pins.setdefault(_gpio(channel), _Pin())
        if pin.edge is not None:
            raise RuntimeError("Conflicting edge detection already enabled for this GPIO "
                               "channel")
    add_event_detect(channel, edge, lambda _c: done.set(), bouncetime)
    try:
        return channel if done.wait(None if timeout is None else timeout / 1000) else None
    finally:
        remove_event_detect(channel)


def cleanup(chanlist: int | Iterable[int] | None = None) -> None:
    global _mode
    with _lock:
        if _mode == UNKNOWN and chanlist is None:
            gpios: list[int] = []
        elif chanlist is None:
            gpios = [g for g, p in _pins.items() if p.direction is not None]
        else:
            gpios = _channels(chanlist)
        if not gpios and _warnings:
            warnings.warn("No channels have been set up yet - nothing to clean up!  Try "
                          "cleaning up at the end of your program instead!", RuntimeWarning,
                          stacklevel=2)
        for gpio in gpios:
            pin = _pins.setdefault(gpio, _Pin())
            before = pin.level()
            _remove_detection(pin)
            if gpio in _pwms:
                _pwms.pop(gpio)._running = False
            was_out = pin.direction == OUT
            pin.direction, pin.pull = None, PUD_OFF
            if was_out and before != LOW:
                # An input without pull no longer sources current: the LED goes dark.
                pin.out = LOW
                pin.history.append((time.monotonic_ns(), LOW))
        if chanlist is None:
            _mode = UNKNOWN


class PWM:
    """Software PWM on an output (RPi.GPIO runs it on a thread of its own; here it is state)."""

    def __init__(self, channel: int, frequency: float) -> None:
        with _lock:
            gpio = _gpio(channel)
            if _pins.setdefault(gpio, _Pin()).direction != OUT:
                raise RuntimeError("You must setup() the GPIO channel as an output first")
            if gpio in _pwms:
                raise RuntimeError("A PWM object already exists for this GPIO channel")
            if frequency <= 0.0:
                raise ValueError("frequency must be greater than 0.0")
            self._gpio, self._frequency = gpio, float(frequency)
            self._dc, self._running = 0.0, False
            _pwms[gpio] = self

    def start(self, dutycycle: float) -> None:
        self.ChangeDutyCycle(dutycycle)
        self._running = True

    def ChangeDutyCycle(self, dutycycle: float) -> None:
        if not 0.0 <= dutycycle <= 100.0:
            raise ValueError("dutycycle must have a value from 0.0 to 100.0")
        self._dc = float(dutycycle)

    def ChangeFrequency(self, frequency: float) -> None:
        if frequency <= 0.0:
            raise ValueError("frequency must be greater than 0.0")
        self._frequency = float(frequency)

    def stop(self) -> None:
        with _lock:
            self._running = False
            pin = _pins[self._gpio]
            if pin.direction == OUT and pin.out != LOW:
                pin.out = LOW
                pin.history.append((time.monotonic_ns(), LOW))
