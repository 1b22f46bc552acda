"""The receiver's limits against a hostile branch LAN, with their defaults (docs/UPLOAD.md,
"Limits"), and the open-files check made before it listens.

Every connection costs one file descriptor; with the common soft limit of 1,024 an attacker's
idle sockets used to exhaust it. The caps here keep the count below what RLIMIT_NOFILE allows,
and check_nofile makes sure at start that it does.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors the receiver needs besides its connections: SQLite and its WAL, the listeners, a
# payload temp file per streaming upload (bounded by the payload pool), logs, the loop.
FD_RESERVE = 256


@dataclass(frozen=True)
class Limits:
    handshake_timeout_s: float = 10.0  # TCP accept to finished TLS handshake
    header_timeout_s: float = 10.0  # first byte of a request to its last header line
    idle_timeout_s: float = 30.0  # a connection with no request in progress
    min_body_rate_bps: int = 2048  # bytes/s a body must average over each window...
    body_rate_window_s: float = 10.0  # ...of this length, or it is cut (408 too_slow)
    max_connections: int = 1000  # upload listener, every state
    max_handshakes_per_ip: int = 16  # connections of one address not yet through TLS
    max_connections_per_cert: int = 8  # a box uses two; retries and overlap need a few more
    max_uploads_per_device: int = 2  # concurrent payload uploads of one device (then 429)
    max_request_line: int = 2048  # bytes of "PUT /path HTTP/1.1" (aiohttp: 400)
    max_path: int = 256  # bytes of the path, checked before anything is recorded (414)
    max_field_size: int = 4096  # bytes of one request header line
    max_headers: int = 32
    json_max_depth: int = 32  # nesting of any JSON the receiver parses
    json_max_number: int = 24  # digits (and sign, point, exponent) of a JSON number
    log_interval_s: float = 10.0  # one log line per reason per interval, then a count

    def fds_needed(self) -> int:
        return self.max_connections + FD_RESERVE


class LimitError(RuntimeError):
    """The configuration cannot be served on this system (one line for the operator)."""


def check_nofile(limits: Limits) -> int:
    """Raise the soft RLIMIT_NOFILE to what the caps need if the hard limit allows; else
    LimitError. Returns the soft limit in force."""
    need = limits.fds_needed()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise LimitError(
            f"open-files limit too low: max_connections {limits.max_connections} + "
            f"{FD_RESERVE} reserved need {need} descriptors, the hard RLIMIT_NOFILE is {hard} "
            f"(raise LimitNOFILE or lower --max-connections)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need
