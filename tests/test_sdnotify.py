"""sd_notify against a real unix datagram socket: what systemd would receive, in both address
forms, and that nothing ever raises into the gateway."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from dualrec.sdnotify import Notifier


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)  # a bound on a lost datagram, not a timing assertion
    return sock


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_reach_the_socket(tmp_path: Path, abstract: bool) -> None:
    """Sent: ready, status with a newline, watchdog, stopping, over a path socket and over an
    abstract one ('@name'). Asserted: each arrives as one datagram with the documented
    assignment, the status on one line."""
    if abstract:
        name = f"dualrec-test-{uuid.uuid4().hex}"
        sock, env_name = _receiver(b"\0" + name.encode()), "@" + name
    else:
        path = tmp_path / "notify"
        sock, env_name = _receiver(str(path)), str(path)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": env_name})
        assert n.enabled
        n.ready()
        n.status("recording\nsession 3")
        n.watchdog()
        n.stopping()
        got = [sock.recv(4096) for _ in range(4)]
        n.close()
    assert got == [b"READY=1", b"STATUS=recording session 3", b"WATCHDOG=1", b"STOPPING=1"]


def test_no_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    n.ready()
    n.watchdog()
    n.status("x")
    n.stopping()


def test_failures_never_raise(tmp_path: Path) -> None:
    """A socket that is gone (systemd restarted, a wrong path) or a name that cannot exist:
    every call returns quietly, and works again once the socket is back."""
    path = tmp_path / "notify"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    n.ready()  # nobody listens: ENOENT
    n.watchdog()
    Notifier({"NOTIFY_SOCKET": "@" + "x" * 200}).ready()  # longer than sun_path
    Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).ready()  # not a unix socket: ignored
    with _receiver(str(path)) as sock:
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC, only when the watchdog is this process's (WATCHDOG_PID unset or
    ours), else None."""
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval_s == expected


def test_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with _receiver(str(path)) as sock:
        n = Notifier()
        n.ready()
        assert sock.recv(4096) == b"READY=1" and n.watchdog_interval_s == 2.0
