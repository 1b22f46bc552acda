"""Serial port names as a technician writes them, resolved to what pyserial opens.

A port spec is one of:

- a pyserial URL (anything with "://": ``loop://``, ``socket://host:port``, ``rfc2217://``):
  passed through;
- a udev link under a ``by-id`` or ``by-path`` directory (``/dev/serial/by-id/usb-FTDI_...``):
  resolved to the device it points at now, so the same adapter is found again whichever
  ``/dev/ttyUSBn`` it gets after a replug; a missing link is a DeviceError listing the links
  that do exist;
- ``usb:VID:PID[:SERIAL][#IF]`` (hex ids, e.g. ``usb:0403:6001`` or
  ``usb:0403:6001:A10KZP3J``): the one port whose USB ids (and serial number) match, looked up
  with ``serial.tools.list_ports.comports()``. ``#IF`` picks a USB interface number, for
  devices with several serial functions under one serial number (a Pico running a second CDC
  port, an FT4232). None or several matches is a DeviceError listing what is plugged in;
- any other path (``/dev/ttyAMA0``, ``/dev/serial0``): as is.

resolve_port() is meant to be called on every (re)open, not once at start.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import serial
from serial.tools import list_ports

from dualrec.devices.base import DeviceError

_USB = re.compile(
    r"^usb:(?P<vid>[0-9a-fA-F]{1,4}):(?P<pid>[0-9a-fA-F]{1,4})"
    r"(?::(?P<serial>[^#]+))?(?:#(?P<iface>\d+))?$"
)

# Site-config names of the line settings and pyserial's constants for them.
PARITIES = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}
BYTESIZES = {5: serial.FIVEBITS, 6: serial.SIXBITS, 7: serial.SEVENBITS, 8: serial.EIGHTBITS}
STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}


def parity_code(parity: str) -> str:
    """A parity named as in the site config ("even") or as pyserial does ("E") -> pyserial's."""
    if parity in PARITIES.values():
        return parity
    try:
        return PARITIES[parity.lower()]
    except KeyError:
        raise ValueError(f"parity {parity!r}: use one of {', '.join(PARITIES)}") from None


def resolve_port(spec: str) -> str:
    """What pyserial should open for spec, now; see the module docstring."""
    spec = spec.strip()
    if not spec:
        raise DeviceError("serial port: none set")
    if "://" in spec:
        return spec
    m = _USB.match(spec)
    if m:
        return _resolve_usb(spec, m)
    if spec.lower().startswith("usb:"):
        raise DeviceError(f"serial port {spec!r}: write USB ports as usb:VID:PID[:SERIAL][#IF] "
                          "with hexadecimal ids, e.g. usb:0403:6001")
    path = Path(spec)
    if path.parent.name in ("by-id", "by-path"):
        return _resolve_link(spec, path)
    return spec


def _resolve_link(spec: str, path: Path) -> str:
    if path.exists():
        return os.path.realpath(path)
    try:
        present = sorted(p.name for p in path.parent.iterdir())
    except OSError:
        present = []
    listing = ", ".join(present) if present else "nothing (no USB serial adapter is plugged in)"
    raise DeviceError(f"serial port {spec}: no such device; {path.parent} holds: {listing}")


def _describe(port: Any) -> str:
    ids = (f"usb:{port.vid:04x}:{port.pid:04x}"
           + (f":{port.serial_number}" if port.serial_number else "")
           if port.vid is not None and port.pid is not None else "not USB")
    iface = _interface(port)
    where = f"#{iface}" if iface is not None else ""
    desc = f" {port.description}" if port.description and port.description != "n/a" else ""
    return f"{port.device} ({ids}{where}{desc})"


def _interface(port: Any) -> int | None:
    """The USB interface number from pyserial's location ("1-1.3:1.2" -> 2), if it has one."""
    location = getattr(port, "location", None) or ""
    m = re.search(r":\d+\.(\d+)$", location)
    return int(m.group(1)) if m else None


def _resolve_usb(spec: str, m: re.Match[str]) -> str:
    vid, pid = int(m["vid"], 16), int(m["pid"], 16)
    wanted_serial, iface = m["serial"], m["iface"]
    ports = list(list_ports.comports())
    matches = [
        p for p in ports
        if p.vid == vid and p.pid == pid
        and (wanted_serial is None or (p.serial_number or "") == wanted_serial)
        and (iface is None or _interface(p) == int(iface))
    ]
    if len(matches) == 1:
        return str(matches[0].device)
    plugged = "; ".join(_describe(p) for p in ports) or "no serial ports at all"
    if not matches:
        raise DeviceError(f"serial port {spec}: no such USB device is plugged in; "
                          f"present: {plugged}")
    raise DeviceError(
        f"serial port {spec}: {len(matches)} devices match "
        f"({'; '.join(_describe(p) for p in matches)}); add the serial number "
        "(usb:VID:PID:SERIAL), the interface (#IF) or use the /dev/serial/by-id link"
    )
