"""A small TCP fault injector for tests: a proxy on 127.0.0.1 in front of a real server.

It forwards bytes both ways without looking into them, so it is transparent to TLS: the client
still authenticates the real server and the server the client. What it can see is how many
bytes went which way, and that is enough to tell a request body in flight from a small exchange
(a header PUT is a few KiB; a payload is hundreds of KiB sent before the server says anything).

Modes (FaultProxy.set_mode):

- ``pass``: forward everything.
- ``reset``: once more than ``after_bytes`` have gone client→server since the server last sent
  anything (a request body in flight), forward up to that many and reset both sides (RST:
  SO_LINGER 0, then close); for the next ``times`` such connections, then pass.
- ``lose_answer``: when the server starts answering after more than ``after_bytes`` went up (it
  has read a whole body and decided), drop the answer and reset both sides; ``times`` times.
- ``stall``: once more than ``after_bytes`` went client→server since the server last spoke,
  forward up to that many and stop forwarding on that connection, both ways; hold it (never read
  again, never closed) until close(). ``after_bytes=0`` holds a new connection at its first
  byte, so even the TLS handshake hangs. ``times`` connections are stalled, then new ones pass;
  a stalled one stays stalled (a hung server does not wake up for an old connection either).

Everything is bounded: at most ``max_conns`` connections at once (more are closed at accept),
one thread per connection, and close() stops and joins every thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "reset", "lose_answer", "stall"]

POLL_S = 0.05  # how soon a connection thread sees a mode change or close()
SEND_TIMEOUT_S = 10.0  # a peer that stops reading for this long is dropped
RECV = 64 * 1024


@dataclass
class Injected:
    """One fault the proxy caused: what, when (time.time_ns(), comparable with receipts), and
    how many bytes had gone client→server on that connection since the server last spoke."""

    kind: str
    at_ns: int
    up_bytes: int


@dataclass
class _Conn:
    client: socket.socket
    server: socket.socket
    up_since_down: int = 0
    frozen: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN: the peer sees
    # ECONNRESET, not an orderly end.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, max_conns: int = 32) -> None:
        self.target = (target_host, target_port)
        self.max_conns = max_conns
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)  # accept() wakes up to notice close()
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._after = 0
        self._times = 0
        self._closed = threading.Event()
        self._conns: list[_Conn] = []
        self.accepted = 0
        self.injected: list[Injected] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultnet-accept",
                                          daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode, *, after_bytes: int = 0, times: int = 0) -> None:
        with self._lock:
            self._mode, self._after, self._times = mode, after_bytes, times

    def faults_left(self) -> int:
        with self._lock:
            return self._times if self._mode != "pass" else 0

    def stalled(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.frozen)

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        self._acceptor.join(timeout)
        with self._lock:
            threads = [c.thread for c in self._conns if c.thread is not None]
        for t in threads:
            t.join(timeout)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _take(self, mode: Mode, up_bytes: int) -> bool:
        """Whether to inject `mode` now; counts it against the budget (under the lock, so two
        connections racing for the last fault do not both get it)."""
        with self._lock:
            if self._mode != mode or self._times <= 0 or up_bytes <= self._after:
                return False
            self._times -= 1
            self.injected.append(Injected(mode, time.time_ns(), up_bytes))
            return True

    def _accept_loop(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                with self._lock:
                    full = sum(1 for c in self._conns if c.thread and c.thread.is_alive()) \
                        >= self.max_conns
                if full:
                    _reset(client)
                    continue
                try:
                    server = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _reset(client)  # the real server is down: so is the proxy, to the client
                    continue
                for s in (client, server):
                    s.settimeout(SEND_TIMEOUT_S)  # bounds sendall; reads wait in select()
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(client, server)
                conn.thread = threading.Thread(target=self._serve, args=(conn,),
                                               name=f"faultnet-{self.accepted}", daemon=True)
                with self._lock:
                    self.accepted += 1
                    self._conns = [c for c in self._conns
                                   if c.thread is not None and c.thread.is_alive()]
                    self._conns.append(conn)
                conn.thread.start()
        finally:
            self._listener.close()

    def _serve(self, conn: _Conn) -> None:
        # All of one connection's socket calls happen on this thread, so no socket is closed
        # under another thread's select() or send().
        open_dirs = {conn.client: conn.server, conn.server: conn.client}
        try:
            while open_dirs and not self._closed.is_set():
                if conn.frozen:
                    self._closed.wait(POLL_S)
                    continue
                readable, _, _ = select.select(list(open_dirs), [], [], POLL_S)
                for src in readable:
                    dst = open_dirs.get(src)
                    if dst is None or conn.frozen:
                        continue
                    if not self._pump(conn, src, dst, open_dirs):
                        return
        except OSError:
            pass  # a peer reset or stopped reading: drop the connection
        finally:
            _reset(conn.client)
            _reset(conn.server)

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket,
              open_dirs: dict[socket.socket, socket.socket]) -> bool:
        """Move one read's worth from src to dst; False when the connection must end now."""
        data = src.recv(RECV)
        if not data:
            # Orderly end of one direction: pass the FIN on, keep the other direction open.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            del open_dirs[src]
            return True
        if src is conn.client:
            up = conn.up_since_down + len(data)
            keep = max(0, self._after - conn.up_since_down)
            if self._take("reset", up):
                dst.sendall(data[:keep])
                return False  # the finally of _serve sends the RSTs
            if self._take("stall", up):
                dst.sendall(data[:keep])
                conn.frozen = True  # the rest of this read is swallowed, like a hung server's
                return True
            dst.sendall(data)
            conn.up_since_down = up
        else:
            if self._take("lose_answer", conn.up_since_down):
                return False
            dst.sendall(data)
            conn.up_since_down = 0
        return True
