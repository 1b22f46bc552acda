"""The upload listener's connection guard: what aiohttp and asyncio do not bound on their own.

Instead of `loop.create_server(..., ssl=ctx)` (aiohttp's TCPSite) the listener accepts plain TCP
with GuardProtocol and upgrades each connection itself with `loop.start_tls`. That one change
gives the receiver every moment of a connection's life:

- at accept: the total cap (at the cap, the oldest unfinished handshake of the address with
  the most of them is dropped for the new one, so a box's brief handshake is never the one
  pushed out and authenticated connections never are) and a cap on unfinished handshakes per
  source address;
- memory: asyncio's SSLProtocol allocates a 256 KiB read buffer per connection at once, so
  1,000 idle sockets cost 256 MB; ours (_LeanSSLProtocol) reads 32 KiB at a time (two TLS
  records);
- the handshake: its timeout, and its failure with the reason (asyncio hides failed
  handshakes outside debug mode), counted and logged at a limited rate;
- after it: the client certificate, so a cap per certificate;
- then: request progress, from data_received and the tracking middleware, so a connection idle
  for idle_timeout_s or a request head not complete within header_timeout_s is closed by the
  once-a-second sweep. (A slow body is cut by the handlers' reader, bodies.py.)

aiohttp's RequestHandler is then attached behind a small proxy protocol and works as usual.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import hashlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dualrec_tools.receiver.limits import Limits
from dualrec_tools.receiver.ratelog import RateLimitedLog

log = logging.getLogger("dualrec.receiver")


@dataclass(eq=False)
class Conn:
    ip: str
    raw: asyncio.Transport
    opened: float
    state: str = "handshake"  # handshake | idle | busy
    since: float = 0.0  # when the connection became idle (or started its handshake)
    head_since: float | None = None  # first byte of a request not yet handed to a handler
    cert: str | None = None  # SHA-256 of the client certificate, once through TLS
    tls: asyncio.BaseTransport | None = None
    busy: int = 0
    released: bool = False


@dataclass
class GuardStats:
    """Counters since start, read by the metrics endpoint."""

    tls_refused: Counter[str] = field(default_factory=Counter)  # by reason
    conn_refused: Counter[str] = field(default_factory=Counter)  # total, per_ip, per_cert
    cut: Counter[str] = field(default_factory=Counter)  # idle, slow_header, evicted
    refused: Counter[str] = field(default_factory=Counter)  # HTTP refusals by error word
    accepted: int = 0
    authenticated: int = 0


def tls_reason(exc: BaseException | None) -> str:
    """A short, bounded word for why a handshake failed."""
    if exc is None:
        return "closed"
    if isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        words = (exc.reason or "ssl_error").lower()
        for known in ("certificate_required", "peer_did_not_return_a_certificate",
                      "unknown_ca", "certificate_verify_failed", "unsupported_protocol",
                      "no_shared_cipher", "http_request", "wrong_version_number",
                      "no_protocols_available", "version_too_low"):
            if known in words:
                return known
        return "ssl_error"
    if isinstance(exc, ConnectionError | OSError):
        return "reset"
    return "other"


class _LeanSSLProtocol(asyncio.sslproto.SSLProtocol):
    max_size = 32 * 1024  # asyncio's 256 KiB per connection is allocated before the handshake


async def _start_tls(loop: asyncio.AbstractEventLoop, raw: asyncio.Transport,
                     app: asyncio.Protocol, ctx: ssl.SSLContext,
                     timeout: float) -> asyncio.BaseTransport | None:
    """loop.start_tls (CPython 3.11-3.13) with _LeanSSLProtocol; None if the peer left."""
    waiter = loop.create_future()
    proto = _LeanSSLProtocol(loop, app, ctx, waiter, server_side=True,
                             call_connection_made=False, ssl_handshake_timeout=timeout)
    raw.pause_reading()
    raw.set_protocol(proto)
    conmade = loop.call_soon(proto.connection_made, raw)
    resume = loop.call_soon(raw.resume_reading)
    try:
        await waiter
    except BaseException:
        raw.close()
        conmade.cancel()
        resume.cancel()
        raise
    return proto._app_transport


class _AppProxy(asyncio.Protocol):
    """The TLS side's protocol: buffers what arrives before aiohttp's handler is attached (a
    request may come in the packet that ends the handshake), then forwards everything."""

    def __init__(self, guard: Guard, conn: Conn) -> None:
        self.guard, self.conn = guard, conn
        self.inner: asyncio.Protocol | None = None
        self.early: list[bytes] = []
        self.early_eof = False

    def attach(self, inner: asyncio.Protocol, transport: asyncio.BaseTransport) -> None:
        self.inner = inner
        inner.connection_made(transport)
        for chunk in self.early:
            inner.data_received(chunk)
        self.early.clear()
        if self.early_eof:
            inner.eof_received()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.state == "idle" and conn.head_since is None:
            conn.head_since = time.monotonic()
        if self.inner is None:
            self.early.append(data)
        else:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None:
            self.early_eof = True
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self.conn)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class GuardProtocol(asyncio.Protocol):
    """The plain TCP protocol of an accepted connection: admit it or drop it, then start TLS."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for the TLS layer, not for us
        self.guard.admit(transport)


class Guard:
    def __init__(self, limits: Limits, ssl_ctx: ssl.SSLContext,
                 handler_factory: Callable[[], asyncio.Protocol], events: RateLimitedLog) -> None:
        self.limits = limits
        self.ssl_ctx = ssl_ctx
        self.handler_factory = handler_factory
        self.events = events
        self.stats = GuardStats()
        self.conns: set[Conn] = set()
        self.pending_by_ip: Counter[str] = Counter()
        self.by_cert: Counter[str] = Counter()
        self._by_tls: dict[int, Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- accepting ---------------------------------------------------------------------------

    def admit(self, raw: asyncio.Transport) -> None:
        peer = raw.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        lim = self.limits
        if self.pending_by_ip[ip] >= lim.max_handshakes_per_ip:
            self._refuse_conn(raw, "per_ip", f"{ip} has {lim.max_handshakes_per_ip} "
                              "connections in their TLS handshake")
            return
        if len(self.conns) >= lim.max_connections and not self._evict_oldest_handshake():
            self._refuse_conn(raw, "total", f"{lim.max_connections} connections open")
            return
        now = time.monotonic()
        conn = Conn(ip, raw, now, since=now)
        self.conns.add(conn)
        self.pending_by_ip[ip] += 1
        self.stats.accepted += 1
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse_conn(self, raw: asyncio.Transport, reason: str, detail: str) -> None:
        raw.abort()
        self.stats.conn_refused[reason] += 1
        self.events.log(logging.WARNING, f"connection_refused:{reason}",
                        "connection refused (%s): %s", reason, detail)

    def _evict_oldest_handshake(self) -> bool:
        if not self.pending_by_ip:
            return False
        worst = max(self.pending_by_ip, key=self.pending_by_ip.__getitem__)
        pending = [c for c in self.conns if c.state == "handshake" and c.ip == worst]
        if not pending:
            return False
        oldest = min(pending, key=lambda c: c.opened)
        self.stats.cut["evicted"] += 1
        self.events.log(logging.WARNING, "connection_cut:evicted", "connection cap reached: "
                        "dropped the oldest unfinished TLS handshake of %s (the address with "
                        "the most)",
                        oldest.ip)
        oldest.raw.abort()
        self.release(oldest)
        return True

    async def _handshake(self, conn: Conn) -> None:
        loop = asyncio.get_running_loop()
        proxy = _AppProxy(self, conn)
        try:
            tls = await _start_tls(loop, conn.raw, proxy, self.ssl_ctx,
                                   self.limits.handshake_timeout_s)
        except (OSError, ssl.SSLError, asyncio.CancelledError, RuntimeError) as exc:
            self._tls_refused(conn, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if tls is None or conn.released:  # closed during the handshake
            self._tls_refused(conn, None)
            with contextlib.suppress(Exception):
                (tls or conn.raw).abort()
            return
        self.pending_by_ip[conn.ip] -= 1
        if not self.pending_by_ip[conn.ip]:
            del self.pending_by_ip[conn.ip]
        ssl_obj = tls.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
        cert = hashlib.sha256(der or b"").hexdigest()
        if self.by_cert[cert] >= self.limits.max_connections_per_cert:
            conn.state = "refused"
            self._refuse_conn(tls, "per_cert",  # type: ignore[arg-type]
                              f"a client certificate already has "
                              f"{self.limits.max_connections_per_cert} connections")
            self.release(conn)
            return
        conn.cert, conn.tls = cert, tls
        self.by_cert[cert] += 1
        conn.state, conn.since = "idle", time.monotonic()
        self._by_tls[id(tls)] = conn
        self.stats.authenticated += 1
        proxy.attach(self.handler_factory(), tls)

    def _tls_refused(self, conn: Conn, exc: BaseException | None) -> None:
        if conn.released:  # evicted or shut down: already counted
            return
        reason = tls_reason(exc)
        self.stats.tls_refused[reason] += 1
        self.events.log(logging.WARNING, f"tls_refused:{reason}",
                        "TLS handshake refused from %s: %s", conn.ip, reason)
        self.release(conn)

    def release(self, conn: Conn) -> None:
        """Forget a connection (idempotent: the handshake and connection_lost both call it)."""
        if conn.released:
            return
        conn.released = True
        self.conns.discard(conn)
        if conn.state == "handshake":
            self.pending_by_ip[conn.ip] -= 1
            if self.pending_by_ip[conn.ip] <= 0:
                del self.pending_by_ip[conn.ip]
        if conn.cert is not None:
            self.by_cert[conn.cert] -= 1
            if self.by_cert[conn.cert] <= 0:
                del self.by_cert[conn.cert]
        if conn.tls is not None:
            self._by_tls.pop(id(conn.tls), None)

    # -- requests ----------------------------------------------------------------------------

    def conn_of(self, transport: Any) -> Conn | None:
        return self._by_tls.get(id(transport)) if transport is not None else None

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def track(request: web.Request, handler: Callable[[web.Request],
                        Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            conn = self.conn_of(request.transport)
            if conn is None:
                return await handler(request)
            conn.busy += 1
            conn.state, conn.head_since = "busy", None
            try:
                return await handler(request)
            finally:
                conn.busy -= 1
                if conn.busy == 0:
                    conn.state, conn.since = "idle", time.monotonic()

        return track

    def sweep(self) -> None:
        """Once a second: close connections idle too long or slow to send a request head."""
        now = time.monotonic()
        lim = self.limits
        for conn in list(self.conns):
            if conn.state != "idle":
                continue
            if conn.head_since is not None and now - conn.head_since > lim.header_timeout_s:
                self._cut(conn, "slow_header", f"request head not complete within "
                          f"{lim.header_timeout_s:g} s")
            elif conn.head_since is None and now - conn.since > lim.idle_timeout_s:
                self._cut(conn, "idle", f"no request for {lim.idle_timeout_s:g} s")

    def _cut(self, conn: Conn, reason: str, detail: str) -> None:
        self.stats.cut[reason] += 1
        self.events.log(logging.INFO, f"connection_cut:{reason}", "connection from %s closed: %s",
                        conn.ip, detail)
        (conn.tls or conn.raw).abort()  # type: ignore[union-attr]
        self.release(conn)

    def close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.conns):
            conn.raw.abort()
            self.release(conn)


class GuardedSite(web.BaseSite):
    """aiohttp site that listens through a Guard (instead of TCPSite's create_server(ssl=))."""

    __slots__ = ("_bound_port", "_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: Guard,
                 backlog: int = 512) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard
        self._bound_port = port

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._bound_port}"

    @property
    def port(self) -> int:
        return self._bound_port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GuardProtocol(self._guard), self._host,
                                                self._port, backlog=self._backlog,
                                                reuse_address=True)
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        self._guard.close_all()
