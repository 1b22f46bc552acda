"""The tap's hardware layer: the only module that knows whether it runs on a Pico or on a PC.

app.py sees the same small objects on both, so the logic under test on the MicroPython unix
port is the logic that runs on the Pico:

- ``ticks_us()``/``ticks_diff()`` with the Pico's 2^30 µs wrap (the unix port's own ticks wrap
  at 2^62, so the stand-in masks them, starting at DUALREC_TAP_TICKS_OFFSET_US at "boot" the
  way a Pico's start near 0 at reset: a test can place the wrap seconds after start);
- ``UartIn.read(buf) -> n`` (never blocks) and ``UartIn.errors() -> tapframe flag bits``;
- ``Link.write(buf) -> n`` (may accept only part, never blocks for long);
- ``SyncIn.start(handler)``: handler(pin) is called per rising edge (hard IRQ on the Pico; from
  ``service()`` in the main loop on the PC, one edge per byte read from the sync path);
- ``Watchdog.feed()/disable()``, ``idle()``, ``reset_cause()``, ``count_boot()``.

On the Pico (sys.platform "rp2") the configuration comes from /tap.json, written by the
technician's flashing tool from the board profile's [tap] table: uart_baud, rx_pins, sync_pin,
wdt_ms. On a PC it comes from DUALREC_TAP_CONFIG (a JSON file with the same keys plus
uart_paths, usb_path, sync_path) and the environment variables DUALREC_TAP_UART0/1, _USB, _SYNC,
_BAUD, _STATE (a directory for the boot counter), _TICKS_OFFSET_US and _TICKS_PPM (the stand-in's
clock runs that many parts per million fast, or slow if negative: a crystal's drift, for the box's
clock fit to find); the paths are pseudo-terminals.
"""

import sys
import time

import tapframe

RP2 = sys.platform == "rp2"
TICKS_PERIOD = 1 << 30  # the Pico's ticks_us period (MicroPython small ints are 31-bit there)
_MASK = TICKS_PERIOD - 1
_HALF = TICKS_PERIOD >> 1

DEFAULTS = {
    "uart_baud": 115200,
    "rx_pins": [1],
    "sync_pin": 22,
    "wdt_ms": 5000,  # rp2's watchdog allows at most 8388 ms
    "rxbuf": 8192,  # per UART: 89 ms at 921600 baud before the ring (then the FIFO) overflows
    "chunk": 512,  # bytes per frame at most
    "txq": 32768,  # frames waiting for the host; beyond it new frames are dropped (and counted)
}

if RP2:
    import machine

    ticks_us = time.ticks_us
    ticks_diff = time.ticks_diff
else:
    import os
    import select
    import termios

    _OFFSET = int(os.getenv("DUALREC_TAP_TICKS_OFFSET_US") or 0)
    _PPM = int(os.getenv("DUALREC_TAP_TICKS_PPM") or 0)
    _BOOT = time.ticks_us()

    def ticks_us():
        # time.ticks_diff is exact here (the unix period is 2^62), then fold into 2^30.
        elapsed = time.ticks_diff(time.ticks_us(), _BOOT)
        # A Pico's crystal is off by some ppm: scaling the elapsed time (integer maths, exact
        # on the 64-bit port) gives the box a drift it must fit. Unset, it is 0 and costs nothing.
        if _PPM:
            elapsed += elapsed * _PPM // 1_000_000
        return (elapsed + _OFFSET) & _MASK

    def ticks_diff(a, b):
        return ((a - b + _HALF) & _MASK) - _HALF


def load_config():
    cfg = dict(DEFAULTS)
    path = "/tap.json" if RP2 else os.getenv("DUALREC_TAP_CONFIG")
    if path:
        try:
            import json

            with open(path) as f:
                cfg.update(json.load(f))
        except OSError:
            pass  # no file: defaults (a fresh Pico before the tool wrote its profile)
    if not RP2:
        paths = [p for p in (os.getenv("DUALREC_TAP_UART0"), os.getenv("DUALREC_TAP_UART1")) if p]
        if paths:
            cfg["uart_paths"] = paths
        for key, env in (("usb_path", "DUALREC_TAP_USB"), ("sync_path", "DUALREC_TAP_SYNC"),
                         ("state_dir", "DUALREC_TAP_STATE")):
            if os.getenv(env):
                cfg[key] = os.getenv(env)
        if os.getenv("DUALREC_TAP_BAUD"):
            cfg["uart_baud"] = int(os.getenv("DUALREC_TAP_BAUD"))
    return cfg


# --- the Pico ------------------------------------------------------------------------------

# PL011 receive status register (UARTRSR/UARTECR, offset 4) of UART0 and UART1. MicroPython's rp2
# UART driver reads the error bits of every byte and ignores them, so this register is the only
# way to learn of overruns and line errors: polled after each read, cleared by writing it.
_UART_BASES_RP2040 = (0x40034000, 0x40038000)
_UART_BASES_RP2350 = (0x40070000, 0x40078000)
_WATCHDOG_CTRL_RP2040 = 0x40058000
_WATCHDOG_CTRL_RP2350 = 0x400D8000
_ATOMIC_CLEAR = 0x3000  # register alias: writing 1 bits clears them
_WATCHDOG_ENABLE = 0x40000000
_RSR_FLAGS = (  # RSR bit, tapframe flag, is it an overrun
    (8, tapframe.FLAG_OVERRUN),
    (1, tapframe.FLAG_FRAMING),
    (2, tapframe.FLAG_PARITY),
    (4, tapframe.FLAG_BREAK),
)


def _rp2350():
    return "RP2350" in sys.implementation._machine


class _PicoUart:
    def __init__(self, rx_pin, baud, rxbuf):
        uart_id = ((rx_pin + 4) & 8) >> 3  # the pin's UART (rp2 pin map; bad pins raise below)
        # rp2's UART always claims a TX pin; give it the TX pin of the RX pin's group and turn
        # that pin straight back into an input, so the tap never drives a line (leave that
        # Pico pin unconnected).
        tx_pin = rx_pin & ~3
        self.uart = machine.UART(uart_id, baudrate=baud, tx=machine.Pin(tx_pin),
                                 rx=machine.Pin(rx_pin), rxbuf=rxbuf, timeout=0, timeout_char=0)
        machine.Pin(tx_pin, machine.Pin.IN)
        bases = _UART_BASES_RP2350 if _rp2350() else _UART_BASES_RP2040
        self._rsr = bases[uart_id] + 4
        machine.mem32[self._rsr] = 0  # forget errors from before we listened

    def read(self, buf):
        n = self.uart.any()  # also drains the hardware FIFO into the ring
        if not n:
            return 0
        if n > len(buf):
            n = len(buf)
        return self.uart.readinto(buf, n) or 0

    def errors(self):
        rsr = machine.mem32[self._rsr] & 0xF
        if not rsr:
            return 0
        machine.mem32[self._rsr] = 0
        flags = 0
        for bit, flag in _RSR_FLAGS:
            if rsr & bit:
                flags |= flag
        return flags


class _PicoLink:
    """A CDC data interface of our own; the built-in one keeps the REPL (builtin_driver=True)."""

    def __init__(self, txbuf=8192):
        import usb.device
        from usb.device.cdc import CDCInterface

        # timeout=0: write() takes what fits in the buffer and returns, never stalls the loop.
        self.cdc = CDCInterface(timeout=0, txbuf=txbuf, rxbuf=64)
        usb.device.get().init(self.cdc, builtin_driver=True)

    def write(self, buf):
        if not self.cdc.is_open():
            return 0
        return self.cdc.write(buf) or 0


class _PicoSync:
    def __init__(self, pin):
        self.pin = machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_DOWN)

    def start(self, handler):
        # Hard IRQ: the stamp is taken within microseconds of the edge, not when the scheduler
        # gets round to it; the handler must not allocate (it writes a preallocated ring).
        self.pin.irq(handler=handler, trigger=machine.Pin.IRQ_RISING, hard=True)

    def service(self):
        pass


class _PicoWatchdog:
    def __init__(self, timeout_ms):
        self.wdt = machine.WDT(timeout=timeout_ms)

    def feed(self):
        self.wdt.feed()

    def disable(self):
        # MicroPython cannot stop the watchdog; the register can. Used when a technician breaks
        # into the REPL with Ctrl-C, which would otherwise reset the Pico under them.
        base = _WATCHDOG_CTRL_RP2350 if _rp2350() else _WATCHDOG_CTRL_RP2040
        machine.mem32[base + _ATOMIC_CLEAR] = _WATCHDOG_ENABLE


# --- the PC stand-in -------------------------------------------------------------------------


def _open_tty(path):
    f = open(path, "r+b")  # noqa: SIM115 - lives as long as the process
    fd = f.fileno()
    termios.setraw(fd)
    attrs = termios.tcgetattr(fd)
    # VMIN = VTIME = 0: read() returns what is there, at once (MicroPython's file readinto
    # otherwise waits until the buffer is full; it has no os.read and no O_NONBLOCK).
    attrs[6][6] = 0
    attrs[6][5] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return f


class _PtyUart:
    def __init__(self, path):
        self.f = _open_tty(path)

    def read(self, buf):
        return self.f.readinto(buf) or 0

    def errors(self):
        return 0  # a pty has no line errors


class _PtyLink:
    """Like the CDC link, takes what fits now and returns at once when the host is not reading.

    A MicroPython file write blocks until all is written, so the stand-in writes 64-byte
    pieces (a USB packet) only while poll() says the pty has room: a stalled reader fills the
    pty and then the tap's own queue, and the tap drops and counts frames as on the Pico.
    """

    PIECE = 64

    def __init__(self, path):
        self.f = _open_tty(path)
        self._poll = select.poll()
        self._poll.register(self.f, select.POLLOUT)

    def write(self, buf):
        n = 0
        total = len(buf)
        while n < total:
            ready = self._poll.poll(0)
            if not ready or not ready[0][1] & select.POLLOUT:
                break
            n += self.f.write(buf[n : n + self.PIECE]) or 0
        return n


class _PtySync:
    """Each byte arriving on the sync path is one rising edge, stamped when the loop reads it."""

    def __init__(self, path):
        self.f = _open_tty(path)
        self._buf = bytearray(64)
        self._handler = None

    def start(self, handler):
        self._handler = handler

    def service(self):
        n = self.f.readinto(self._buf) or 0
        for _ in range(n):
            self._handler(None)


class _NoWatchdog:
    def feed(self):
        pass

    def disable(self):
        pass


class Hardware:
    """Everything app.py touches, built from a configuration dict (load_config())."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.baud = cfg["uart_baud"]
        if RP2:
            self.uarts = [_PicoUart(p, self.baud, cfg["rxbuf"]) for p in cfg["rx_pins"]]
            self.link = _PicoLink()
            sync = cfg.get("sync_pin")
            self.sync = _PicoSync(sync) if sync is not None else None
            self.wdt = _PicoWatchdog(cfg["wdt_ms"]) if cfg["wdt_ms"] else _NoWatchdog()
            self._poll = None
        else:
            if not cfg.get("uart_paths") or not cfg.get("usb_path"):
                raise ValueError("set DUALREC_TAP_UART0 and DUALREC_TAP_USB (pty paths)")
            self.uarts = [_PtyUart(p) for p in cfg["uart_paths"]]
            self.link = _PtyLink(cfg["usb_path"])
            self.sync = _PtySync(cfg["sync_path"]) if cfg.get("sync_path") else None
            self.wdt = _NoWatchdog()
            # idle() sleeps in poll() on every input, so the stand-in wakes (and stamps) as soon
            # as bytes arrive instead of spinning or sleeping blind.
            self._poll = select.poll()
            for u in self.uarts:
                self._poll.register(u.f, select.POLLIN)
            if self.sync is not None:
                self._poll.register(self.sync.f, select.POLLIN)
        if len(self.uarts) > 2:
            raise ValueError("at most two tapped lines")

    def idle(self):
        if self._poll is not None:
            self._poll.poll(1)
        else:
            machine.idle()

    def reset_cause(self):
        return machine.reset_cause() if RP2 else 1

    def count_boot(self):
        """Increment and return the boot counter kept in flash (0 when there is nowhere to)."""
        if RP2:
            path = "/tap_boots"
        elif self.cfg.get("state_dir"):
            path = self.cfg["state_dir"] + "/tap_boots"
        else:
            return 0
        try:
            with open(path) as f:
                boots = int(f.read().strip() or 0)
        except (OSError, ValueError):
            boots = 0
        boots += 1
        try:
            with open(path, "w") as f:
                f.write(str(boots))
        except OSError:
            pass  # a full or read-only flash must not stop the tap
        return boots
