"""sd_notify for the gateway: tells systemd it is ready, stopping, what it is doing, and that it
is alive (the watchdog), with no library.

The protocol is systemd's documented one (sd_notify(3)): one datagram of newline-separated
`KEY=value` lines to the AF_UNIX SOCK_DGRAM socket named in $NOTIFY_SOCKET; a name starting
with '@' is in the abstract namespace (the '@' becomes a NUL byte). Without $NOTIFY_SOCKET (not
started by systemd, or Type= is not notify) every call does nothing. A notification is a
courtesy to the supervisor: no call ever raises into the gateway, whatever the socket does.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A send blocks only if systemd's receive queue is full; never stall the gateway's main loop
# for long over it (a late WATCHDOG=1 is no worse than a lost one).
SEND_TIMEOUT_S = 0.5


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """The gateway's side of Type=notify and WatchdogSec=.

    Reads the environment once, when created; opens its socket at the first message.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        # Only a path ("/run/...") or an abstract name ("@...") is a unix socket; anything else
        # (empty, or systemd's vsock: form, which a box never gets) means: no notifications.
        self._address = _address(name) if name[:1] in ("/", "@") and len(name) > 1 else None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when systemd listens (NOTIFY_SOCKET is set)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec=, as sd_watchdog_enabled(3)
        advises), or None when no watchdog is asked of this process."""
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            # The variables may have been inherited by a child: the watchdog is its parent's.
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2 / 1e6

    def ready(self) -> None:
        self._send("READY=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        # One line per assignment in the protocol: a newline in the text would end it early.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message.encode("utf-8", "replace"), self._address)
            return True
        except Exception as exc:  # never into the caller: systemd gone, queue full, bad name
            if not self._warned:  # once: a watchdog every 15 s must not flood the log
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                self._warned = True
            self.close()  # a fresh socket next time, in case this one is broken
            return False
