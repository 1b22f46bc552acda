"""The receiver under the attacks of issue 12, on loopback with bounded loops. For each: what is
refused, that it is logged at a limited rate (a line and a count, never a traceback), that the
index and the log stay bounded, and that a legitimate box keeps delivering meanwhile.

The attacker connects from 127.0.0.2 (all of 127/8 is loopback on Linux), the box from
127.0.0.1, as on a branch LAN where the attacker's laptop has an address of its own."""
# ruff: noqa: F811 (the fixtures come from test_receiver)

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from dualrec_tools.receiver.limits import Limits
from test_receiver import (  # noqa: F401
    DEV,
    DEV2,
    World,
    admin_auth,
    client,
    put_header,
    put_payload,
    receiver,
    tls,
    world,
)

pytestmark = pytest.mark.timeout(90)
ATTACKER = "127.0.0.2"


def _addr(rx) -> tuple[str, int]:
    u = urlsplit(rx.url)
    return u.hostname or "127.0.0.1", u.port or 0


def _raw(rx, source: str = ATTACKER) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(_addr(rx))
    return s


def _tls_sock(rx, world: World, who: str = DEV, source: str = ATTACKER) -> ssl.SSLSocket:
    ctx = tls(world, who)
    return ctx.wrap_socket(_raw(rx, source), server_hostname="127.0.0.1")


def _closed(s: socket.socket, within: float) -> bool:
    """True if the peer closes s within `within` seconds (EOF or reset)."""
    s.settimeout(within)
    try:
        while True:
            if not s.recv(4096):
                return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _deliver(rx, world: World, seg_index: int = 0) -> int:
    with client(rx, world) as c:
        seg = world.a[seg_index]
        assert put_header(c, seg).status_code in (200, 202)
        return put_payload(c, seg).status_code


def _log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dualrec.receiver"]


def test_1100_idle_tcp_connections(receiver, world: World, caplog) -> None:
    """1,100 idle TCP connections (no TLS) against a cap of 1,000 and 16 handshakes per
    address: the box still connects and delivers at once; the attacker's are closed by the
    10 s handshake timeout (here 2 s); no traceback, a few log lines."""
    caplog.set_level(logging.INFO, "dualrec.receiver")
    rx = receiver(limits=Limits(handshake_timeout_s=2.0))
    socks: list[socket.socket] = []
    try:
        for _ in range(1100):
            try:
                socks.append(_raw(rx))
            except OSError:
                break
        assert len(socks) == 1100  # the kernel accepts them; the receiver drops most at once
        assert _wait(lambda: rx.running.guard.stats.conn_refused["per_ip"] >= 1000)
        assert len(rx.running.guard.conns) <= 16
        t0 = time.monotonic()
        assert _deliver(rx, world) == 200
        assert time.monotonic() - t0 < 3
        assert _wait(lambda: rx.running.guard.stats.tls_refused["timeout"] >= 16, 10)
        assert _wait(lambda: not rx.running.guard.conns, 5)
    finally:
        for s in socks:
            s.close()
    lines = _log_lines(caplog)
    assert len(lines) < 20, lines
    assert not any(r.exc_info for r in caplog.records)
    assert any("connection refused (per_ip)" in m for m in lines)
    assert any("TLS handshake refused" in m and "timeout" in m for m in lines)


def test_total_cap_evicts_unauthenticated_first(receiver, world: World) -> None:
    """At the total cap a new connection pushes out the oldest unfinished handshake of the
    address with the most of them, so idle sockets cannot lock the boxes out."""
    rx = receiver(limits=Limits(max_connections=40, max_handshakes_per_ip=64))
    socks = [_raw(rx) for _ in range(40)]
    try:
        assert _wait(lambda: len(rx.running.guard.conns) == 40)
        assert _deliver(rx, world) == 200
        assert rx.running.guard.stats.cut["evicted"] >= 1
    finally:
        for s in socks:
            s.close()


def test_slow_header_and_idle_after_handshake_are_closed(receiver, world: World,
                                                         caplog) -> None:
    """A request head sent a byte at a time, and a connection idle after its handshake, are
    both closed (header 2 s, idle 3 s here; 10 s and 30 s by default), while a box delivers."""
    caplog.set_level(logging.INFO, "dualrec.receiver")
    rx = receiver(limits=Limits(header_timeout_s=2.0, idle_timeout_s=3.0))
    slow = _tls_sock(rx, world, DEV2)
    idle = _tls_sock(rx, world, DEV2)
    stop = threading.Event()

    def dribble() -> None:
        for b in b"GET /v1/devices/test-0002/status HTTP/1.1\r\nHost: x\r\n":
            if stop.wait(0.5):
                return
            try:
                slow.send(bytes([b]))
            except OSError:
                return

    t = threading.Thread(target=dribble)
    t.start()
    try:
        assert _deliver(rx, world) == 200
        t0 = time.monotonic()
        assert _closed(slow, 6)
        assert time.monotonic() - t0 < 5
        assert _closed(idle, 6)
    finally:
        stop.set()
        t.join(5)
        slow.close()
        idle.close()
    cuts = rx.running.guard.stats.cut
    assert cuts["slow_header"] == 1 and cuts["idle"] >= 1
    lines = _log_lines(caplog)
    assert any("request head not complete" in m for m in lines)
    assert any("no request for 3 s" in m for m in lines)


def test_70_slow_payload_uploads_from_one_cert(receiver, world: World, caplog) -> None:
    """One certificate opens 70 payload uploads that trickle: at most 8 connections per
    certificate get through TLS, at most 2 uploads per device stream (429 busy for the rest),
    and those are cut for going below 2 KiB/s (window 2 s here); another box delivers
    meanwhile, and the device itself delivers once the attack stops."""
    caplog.set_level(logging.INFO, "dualrec.receiver")
    rx = receiver(limits=Limits(body_rate_window_s=2.0))
    seg = world.a[0]
    with client(rx, world) as c:
        assert put_header(c, seg).status_code == 202
    answers: list[str] = []
    lock = threading.Lock()

    def attack(i: int) -> None:
        try:  # from ten addresses: the per-address handshake cap is not what is tested here
            s = _tls_sock(rx, world, DEV, source=f"127.0.2.{i % 10 + 1}")
            head = (f"PUT /v1/devices/{DEV}/segments/0/payload HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {len(seg.payload)}\r\n"
                    f"X-Dualrec-Header-SHA256: {seg.sha}\r\n\r\n").encode()
            s.sendall(head)
            s.settimeout(1)
            got = b""
            for i in range(12):  # a byte a second, at most 12 s
                try:
                    s.send(seg.payload[i:i + 1])
                    got += s.recv(4096)
                    if got:
                        break
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    break
            s.close()
            word = got.split(b"\r\n", 1)[0].decode() if got else "closed"
        except (OSError, ssl.SSLError):
            word = "refused"
        with lock:
            answers.append(word)

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(70)]
    for t in threads:
        t.start()
    time.sleep(1)
    with client(rx, world, DEV2) as c:  # another box, meanwhile
        seg2 = world.d2[0]
        assert put_header(c, seg2, DEV2).status_code == 202
        assert put_payload(c, seg2, DEV2).status_code == 200
    for t in threads:
        t.join(30)
    stats = rx.running.guard.stats
    assert stats.conn_refused["per_cert"] >= 40  # slots free up as the others are cut
    assert sum(1 for a in answers if "429" in a) >= 1
    assert sum(1 for a in answers if "408" in a) >= 1
    assert sum(1 for a in answers if "200" in a) == 0
    assert _deliver(rx, world) == 200  # the device itself, after
    lines = _log_lines(caplog)
    assert len(lines) < 25, lines
    assert not any(r.exc_info for r in caplog.records)


def test_400_status_requests_with_7kb_names(receiver, world: World, caplog,
                                           tmp_path: Path) -> None:
    """400 status requests for 7 KB device names: refused (414 past the path limit, with a
    64-character-and-over name 400) before anything is recorded; db and log stay small."""
    caplog.set_level(logging.INFO)
    rx = receiver()
    db = rx.store.data_dir / "receiver.db"
    size0 = db.stat().st_size + sum(p.stat().st_size for p in db.parent.glob("receiver.db-*"))
    codes: dict[int, int] = {}
    with client(rx, world, DEV2) as c:
        for i in range(400):
            name = f"{i:04d}" + "x" * 7000 if i % 2 else f"{i:04d}" + "y" * 200
            r = c.get(f"/v1/devices/{name}/status")
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
        assert c.get(f"/v1/devices/{DEV2}/status").status_code == 200
    assert set(codes) <= {400, 414}, codes
    size1 = db.stat().st_size + sum(p.stat().st_size for p in db.parent.glob("receiver.db-*"))
    assert size1 - size0 < 64 * 1024
    assert rx.store.status(DEV2)["problems"] == []
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records
                     if r.name.startswith(("dualrec", "aiohttp", "asyncio")))
    assert len(text) < 8 * 1024 and "xxxxxxxx" not in text, text[:2000]
    assert not any(r.exc_info for r in caplog.records)
    assert _deliver(rx, world) == 200


def test_unknown_names_and_problem_rows_are_bounded(tmp_path: Path, world: World) -> None:
    from dualrec_tools.receiver import store as store_mod
    from dualrec_tools.receiver.store import ReceiverStore

    with ReceiverStore(tmp_path / "d") as st:
        for i in range(200):
            st.record_problem(f"ghost-{i:04d}", None, "unknown_device", "x" * 5000)
        for i in range(700):
            st.record_problem("ghost-0000", i, "bad_signature", "y")
        names = {r[0] for r in st._rows("SELECT DISTINCT device FROM problems")}
        assert len(names) == store_mod.MAX_UNKNOWN_NAMES + 1 and store_mod.OTHER in names
        rows = st._rows("SELECT count(*), max(length(detail)) FROM problems")[0]
        assert rows[0] <= store_mod.MAX_UNKNOWN_NAMES + store_mod.MAX_PROBLEM_ROWS + 2
        assert rows[1] <= store_mod.DETAIL_MAX


@pytest.mark.parametrize("body", [b"[" * 10_000 + b"]" * 10_000, b"1" * 5000,
                                  b'{"device": ' + b"9" * 5000 + b"}"])
def test_hostile_json_is_400_without_traceback(receiver, world: World, caplog,
                                               body: bytes) -> None:
    caplog.set_level(logging.INFO)
    rx = receiver()
    with client(rx, world) as c:
        r = put_header(c, type(world.a[0])(0, body, b""))
    assert r.status_code == 400 and r.json()["error"] == "malformed"
    admin = httpx.post(f"{rx.admin_url}/admin/devices", content=body, timeout=5,
                       headers={**admin_auth(rx), "Content-Type": "application/json"})
    assert admin.status_code == 400 and admin.json()["error"] == "bad_request"
    assert not any(r.exc_info for r in caplog.records)
    assert rx.store.status(DEV)["headers"] == 0


def test_refused_tls_handshakes_are_counted_and_logged(receiver, world: World, caplog) -> None:
    caplog.set_level(logging.INFO, "dualrec.receiver")
    rx = receiver()
    for _ in range(30):  # a certificate of another CA: TLS 1.3 fails it after the client's end
        try:
            with _tls_sock(rx, world, "rogue") as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                got = s.recv(10)
        except (ssl.SSLError, OSError):
            got = b""
        assert got == b""
    assert _wait(lambda: sum(rx.running.guard.stats.tls_refused.values()) >= 30)
    lines = [m for m in _log_lines(caplog) if "TLS handshake refused" in m]
    assert 1 <= len(lines) <= 3, lines


def test_file_modes(receiver, world: World, tmp_path: Path) -> None:
    rx = receiver()
    assert _deliver(rx, world) == 200
    data = rx.store.data_dir
    private = [data / "receiver.db", *data.glob("receiver.db-*"),
               *rx.store.device_dir(DEV).iterdir()]
    assert len(private) >= 4
    for p in private:  # 0640 at most: the group (dualrec-web) reads, others nothing
        assert stat.S_IMODE(p.stat().st_mode) & 0o037 == 0, p
    for d in (data, data / "devices", rx.store.device_dir(DEV)):
        assert stat.S_IMODE(d.stat().st_mode) & 0o007 == 0, d


def test_box_state_and_spool_dbs_are_private(tmp_path: Path) -> None:
    from dualrec.chain import ChainState
    from dualrec.spool import Spool

    old = os.umask(0o022)
    try:
        ChainState(tmp_path / "state.db")
        Spool(tmp_path / "spool", tmp_path / "spool.db")
    finally:
        os.umask(old)
    for p in (tmp_path / "state.db", tmp_path / "spool.db"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def test_open_files_limit_checked_at_start(monkeypatch) -> None:
    import resource

    from dualrec_tools.receiver.limits import LimitError, check_nofile

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with pytest.raises(LimitError, match="open-files limit too low"):
        check_nofile(Limits(max_connections=hard + 10))
    assert check_nofile(Limits(max_connections=100)) >= 356
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_open_files_soft_limit_raised_when_the_hard_one_allows() -> None:
    import subprocess
    import sys

    code = ("import resource\n"
            "from dualrec_tools.receiver.limits import Limits, check_nofile\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))\n"
            "check_nofile(Limits())\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == Limits().fds_needed() == 1256
