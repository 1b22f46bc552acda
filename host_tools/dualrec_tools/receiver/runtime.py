"""Running the receiver: its configuration, the two (or three) listeners started together with
the guard, the once-a-second sweep and the background jobs (extras.py), in the foreground until
SIGTERM for the CLI or on a background thread for tests and tools that embed it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec_tools.pki import device_id_of
from dualrec_tools.receiver import enroll_http, extras
from dualrec_tools.receiver.alerts import AlertConfig
from dualrec_tools.receiver.enrollment import CERT_DAYS, EnrollmentBook, Issuer
from dualrec_tools.receiver.guard import Guard, GuardedSite
from dualrec_tools.receiver.limits import Limits, check_nofile
from dualrec_tools.receiver.ratelog import RateLimitedLog, RateLimitFilter
from dualrec_tools.receiver.retention import RetentionPolicy
from dualrec_tools.receiver.server import (
    DEFAULT_MAX_PAYLOAD,
    build_ssl_context,
    make_admin_app,
    make_app,
)
from dualrec_tools.receiver.store import ReceiverStore

log = logging.getLogger("dualrec.receiver")


@dataclass
class ReceiverConfig:
    """keys_dir holds ca.crt, receiver.crt, receiver.key and receipt.key (`dualrec-tool keys
    branch`). Port 0 picks a free port; the running receiver reports the actual one."""

    data_dir: Path
    keys_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    admin_host: str = "127.0.0.1"
    admin_port: int = 8444
    max_payload: int = DEFAULT_MAX_PAYLOAD
    receiver_id: str | None = None  # None: the CN of receiver.crt
    shutdown_timeout: float = 5.0
    limits: Limits = field(default_factory=Limits)
    # /metrics is always on the admin listener; this adds a listener of its own (port 0: any).
    metrics_host: str | None = None
    metrics_port: int = 9464
    alerts: AlertConfig | None = None  # the webhook sender (alerts.py); None: off
    retention: RetentionPolicy | None = None  # None: keep everything (retention.py)
    # The enrollment listener (TLS, no client certificate: POST /v1/enroll); it runs only when
    # keys_dir holds ca.key, the issuing CA (enroll_http.py).
    enroll_host: str = "127.0.0.1"
    enroll_port: int | None = None  # None: 8445, or any free port when `port` is 0 (tests)
    cert_days: int = CERT_DAYS  # validity of the client certificates issued


def load_receipt_key(path: Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@dataclass
class RunningReceiver:
    store: ReceiverStore
    url: str  # https://HOST:PORT, the upload API
    admin_url: str  # http://HOST:PORT, the admin API (and /metrics)
    runners: list[web.AppRunner]
    guard: Guard
    events: RateLimitedLog
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics_url: str | None = None
    enroll_url: str | None = None  # https://HOST:PORT of POST /v1/enroll (None: no ca.key)
    book: EnrollmentBook | None = None

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for runner in self.runners:
            await runner.cleanup()
        self.store.close()
        if self.book is not None:
            self.book.close()


def _loop_errors(events: RateLimitedLog) -> Callable[[asyncio.AbstractEventLoop, dict], None]:
    """Whatever asyncio reports (an accept() out of descriptors, a protocol error) as one line
    per message and interval, without a traceback: never a flood."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = str(context.get("message", "error"))[:80]
        events.log(logging.ERROR, f"loop:{message}", "event loop: %s (%r)", message,
                   context.get("exception"))

    return handler


async def _every_second(guard: Guard, events: RateLimitedLog) -> None:
    while True:
        await asyncio.sleep(1.0)
        guard.sweep()
        events.flush()


def _enroll_port(config: ReceiverConfig) -> int:
    if config.enroll_port is not None:
        return config.enroll_port
    return 0 if config.port == 0 else 8445


async def start_receiver(config: ReceiverConfig) -> RunningReceiver:
    limits = config.limits
    check_nofile(limits)  # LimitError: one line, before anything listens
    keys = config.keys_dir
    ssl_ctx = build_ssl_context(keys / "ca.crt", keys / "receiver.crt", keys / "receiver.key")
    receiver_id = config.receiver_id or device_id_of(
        x509.load_pem_x509_certificate((keys / "receiver.crt").read_bytes()))
    store = ReceiverStore(config.data_dir, receipt_key=load_receipt_key(keys / "receipt.key"),
                          receiver_id=receiver_id)
    for stale in store.remove_stale_temp():
        log.info("removed %s, an upload cut off by a stop", stale)
    events = RateLimitedLog(log, limits.log_interval_s)
    book = EnrollmentBook(config.data_dir)
    issuer = Issuer.from_keys_dir(keys, config.cert_days)
    http_log = logging.getLogger(f"aiohttp.server.{receiver_id}.{id(events):x}")
    http_log.addFilter(RateLimitFilter(events))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_errors(events))
    runners: list[web.AppRunner] = []
    try:
        # access_log=None: one line per request is a flood under attack; refusals are logged
        # (rate-limited) by the handlers, the rest is in the metrics.
        # aiohttp's keep-alive close is a backstop behind the guard's logged idle cut.
        handler_args = {"access_log": None, "logger": http_log,
                        "keepalive_timeout": limits.idle_timeout_s + 5,
                        "max_line_size": limits.max_request_line,
                        "max_field_size": limits.max_field_size,
                        "max_headers": limits.max_headers, "lingering_time": 2.0}
        # The guard makes aiohttp's request handlers through the runner (set up just below).
        guard = Guard(limits, ssl_ctx, lambda: runner.server(), events)  # type: ignore[misc]
        upload_app = make_app(store, config.max_payload, limits, events, guard)
        admin_app = make_admin_app(store, limits, events)
        enroll_http.install(upload_app, admin_app, store, book, issuer, guard, limits)
        runner = web.AppRunner(upload_app, shutdown_timeout=config.shutdown_timeout, **handler_args)
        await runner.setup()
        runners.append(runner)
        await GuardedSite(runner, config.host, config.port, guard).start()
        running_extras = extras.install(admin_app, store, guard, config, events,
                                        load_receipt_key(keys / "receipt.key"))
        admin = web.AppRunner(admin_app, shutdown_timeout=config.shutdown_timeout,
                              access_log=None)
        await admin.setup()
        runners.append(admin)
        await web.TCPSite(admin, config.admin_host, config.admin_port).start()
        metrics_url = None
        if config.metrics_host is not None:
            mrunner = web.AppRunner(extras.metrics_app(admin_app), access_log=None)
            await mrunner.setup()
            runners.append(mrunner)
            await web.TCPSite(mrunner, config.metrics_host, config.metrics_port).start()
            metrics_url = _url("http", config.metrics_host, mrunner.addresses[0][1]) + \
                "/metrics"
        enroll_url, enroll_guard = None, None
        if issuer.can_issue:
            erunner, enroll_guard, eport = await enroll_http.start_listener(
                keys, config.enroll_host, _enroll_port(config), store, book, issuer, guard,
                limits, events, config.shutdown_timeout)
            runners.append(erunner)
            enroll_url = _url("https", config.enroll_host, eport)
    except BaseException:
        for r in runners:
            await r.cleanup()
        store.close()
        book.close()
        raise
    main, admin_port = (r.addresses[0][1] for r in runners[:2])
    running = RunningReceiver(store, _url("https", config.host, main),
                              _url("http", config.admin_host, admin_port), runners, guard,
                              events, metrics_url=metrics_url, enroll_url=enroll_url,
                              book=book)
    running.tasks.append(loop.create_task(_every_second(guard, events)))
    if enroll_guard is not None:
        running.tasks.append(loop.create_task(_every_second(enroll_guard, events)))
    running.tasks.extend(loop.create_task(t) for t in running_extras)
    log.info("receiver %s listening on %s, admin %s", receiver_id, running.url,
             running.admin_url)
    return running


def serve(config: ReceiverConfig, out: TextIO = sys.stdout) -> None:
    """Run until SIGTERM or SIGINT; print the LISTENING line once both listeners are up."""
    asyncio.run(_serve(config, out))


async def _serve(config: ReceiverConfig, out: TextIO) -> None:
    running = await start_receiver(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {running.url} admin {running.admin_url}", file=out, flush=True)
    # A line of its own: readers of the LISTENING line expect exactly its four words.
    print(f"ENROLL {running.enroll_url or 'off (no ca.key)'}", file=out, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await running.stop()


class ReceiverThread:
    """The receiver on its own event loop in a background thread (tests, embedding):

        with ReceiverThread(ReceiverConfig(data, keys, port=0, admin_port=0)) as rx:
            httpx.put(f"{rx.url}/v1/devices/...", ...)
    """

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="dualrec-receiver", daemon=True)
        self._running: RunningReceiver | None = None

    def start(self, timeout: float = 10.0) -> ReceiverThread:
        self._thread.start()
        try:
            self._running = asyncio.run_coroutine_threadsafe(
                start_receiver(self.config), self._loop).result(timeout)
        except BaseException:
            self._halt(timeout)
            raise
        return self

    @property
    def running(self) -> RunningReceiver:
        if self._running is None:
            raise RuntimeError("the receiver is not running")
        return self._running

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def admin_url(self) -> str:
        return self.running.admin_url

    @property
    def store(self) -> ReceiverStore:
        return self.running.store

    @property
    def enroll_url(self) -> str | None:
        return self.running.enroll_url

    @property
    def book(self) -> EnrollmentBook:
        assert self.running.book is not None
        return self.running.book

    def stop(self, timeout: float = 10.0) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            asyncio.run_coroutine_threadsafe(running.stop(), self._loop).result(timeout)
        if self._thread.is_alive():
            self._halt(timeout)

    def _halt(self, timeout: float) -> None:
        asyncio.run_coroutine_threadsafe(self._loop.shutdown_default_executor(),
                                         self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()

    def __enter__(self) -> ReceiverThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
