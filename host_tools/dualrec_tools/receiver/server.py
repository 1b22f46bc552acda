"""The receiver's HTTP side: the mutual-TLS upload API of docs/UPLOAD.md for the boxes, a plain
HTTP admin API on loopback for branch IT, and the ways to run them (foreground until SIGTERM for
the CLI, or a background thread for tests and tools that embed the receiver).

Who is asking comes from the client certificate on the connection, never from the request: its CN
must be the {device} in the path and the certificate must be the one enrolled for it. The store
does the checking and keeping; handlers call it from worker threads, because it fsyncs.

The upload listener runs behind guard.Guard (connection caps, TLS handshake, idle and header
timeouts); bodies are read at a minimum rate (bodies.py); every refusal is logged at a limited
rate per reason (ratelog.py); the limits and their defaults are in limits.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import signal
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aiohttp import StreamReader, web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec_tools.pki import device_id_of
from dualrec_tools.receiver import safejson
from dualrec_tools.receiver.alerts import AlertConfig
from dualrec_tools.receiver.bodies import RateCheck, TooLarge, TooSlow, read_body
from dualrec_tools.receiver.guard import Guard, GuardedSite, GuardStats
from dualrec_tools.receiver.limits import Limits, check_nofile
from dualrec_tools.receiver.ratelog import RateLimitedLog, RateLimitFilter
from dualrec_tools.receiver.retention import RetentionPolicy
from dualrec_tools.receiver.store import (
    DEVICE_ID,
    EnrollConflict,
    EnrollError,
    Outcome,
    ReceiverStore,
    cert_fingerprint,
    head_json,
)

log = logging.getLogger("dualrec.receiver")

HEADER_MAX = 64 * 1024
ENROLL_MAX = 64 * 1024
DEFAULT_MAX_PAYLOAD = 512 * 1024 * 1024
CHUNK = 64 * 1024
# A payload upload that sends nothing for this long is abandoned (its worker thread freed).
CHUNK_TIMEOUT_S = 300.0
HEADER_SHA = re.compile(r"^[0-9a-f]{64}$")
SEQ = re.compile(r"^(0|[1-9][0-9]{0,17})$")  # decimal, below 2^63

# docs/UPLOAD.md status codes by the store's outcome (error word).
STATUS = {
    "stored": 200, "awaiting_payload": 202,
    "malformed": 400, "seq_mismatch": 400, "bad_seq": 400, "bad_request": 400,
    "incomplete": 400,
    "unknown_device": 403, "device_mismatch": 403, "cert_mismatch": 403, "bad_signature": 403,
    "not_stored": 404,
    "fork": 409, "bad_link": 409, "header_first": 409,
    "too_slow": 408, "busy": 429, "uri_too_long": 414, "bad_device": 400,
    "oversized": 413,
    "payload_mismatch": 422, "bad_payload": 422,
}

# Each payload upload holds a worker thread for as long as it streams; they get their own
# pool, so slow uploads never starve the short store calls (headers first) of the default one.
PAYLOAD_WORKERS = 64

STORE = web.AppKey("store", ReceiverStore)
MAX_PAYLOAD = web.AppKey("max_payload", int)
LIMITS = web.AppKey("limits", Limits)
EVENTS = web.AppKey("events", RateLimitedLog)
UPLOADS = web.AppKey("uploads", Counter)  # device -> payload uploads in progress
GUARD_STATS = web.AppKey("guard_stats", GuardStats)
PAYLOAD_POOL = web.AppKey("payload_pool", concurrent.futures.ThreadPoolExecutor)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_ssl_context(ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Server side of docs/UPLOAD.md "Transport": TLS 1.2+, ECDHE with AEAD only, a client
    certificate from the branch CA required (the system trust store is never loaded)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 only; 1.3 suites are all AEAD
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def refuse(request: web.Request, device: str, seq: object, error: str, detail: str,
           code: int | None = None) -> web.Response:
    """The JSON refusal, logged once per (word, device) and interval, then counted. A name
    that is not a device id is never written to the log (7 KB names were a flood)."""
    code = code or STATUS[error]
    if (stats := request.app.get(GUARD_STATS)) is not None:
        stats.refused[error] += 1
    shown = device if DEVICE_ID.match(device) or device == "-" else "(invalid)"
    request.app[EVENTS].log(logging.WARNING, f"{error}:{shown}",
                            "refused device=%s seq=%.24s code=%d error=%s: %.300s", shown, seq,
                            code, error, detail)
    return web.json_response({"error": error, "detail": detail[:300]}, status=code)


@web.middleware
async def request_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The path length, before any handler can record or log it."""
    if len(request.raw_path) > request.app[LIMITS].max_path:
        return refuse(request, "-", "-", "uri_too_long",
                      f"path of {len(request.raw_path)} bytes, the limit is "
                      f"{request.app[LIMITS].max_path}")
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) as JSON, logged."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        word = (exc.reason or "error").lower().replace(" ", "_")[:40]
        return refuse(request, request.match_info.get("device", "-"),
                      request.match_info.get("seq", "-"), word,
                      f"{request.method} {request.path[:200]}: {exc.reason}", exc.status)
    except ConnectionError:
        raise  # the client went away; nobody to answer
    except OSError as exc:  # the store could not write (disk full, I/O error): retry later
        request.app[EVENTS].log(logging.ERROR, f"storage:{type(exc).__name__}",
                                "storage failure on %s: %r", request.method, exc)
        return web.json_response({"error": "storage", "detail": str(exc)}, status=503)


def _seq(request: web.Request) -> int | None:
    raw = request.match_info["seq"]
    return int(raw) if SEQ.match(raw) else None


def _peer_cert(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
    return ssl_obj.getpeercert(binary_form=True) if ssl_obj else None


async def _authenticate(request: web.Request) -> str | web.Response:
    """The device id on the connection, if it may act for the {device} in the path."""
    store = request.app[STORE]
    claimed = request.match_info["device"]
    seq = _seq(request) if "seq" in request.match_info else None
    if not DEVICE_ID.match(claimed):  # refused before anything is recorded
        return refuse(request, "-", seq, "bad_device", "the path's device is not a device id")
    der = _peer_cert(request)
    if der is None:  # cannot happen behind CERT_REQUIRED; refuse rather than trust the path
        return refuse(request, claimed, seq, "unknown_device",
                      "no client certificate on the connection")
    try:
        cn = device_id_of(x509.load_der_x509_certificate(der))
    except (ValueError, IndexError):
        return refuse(request, claimed, seq, "unknown_device", "client certificate has no CN")
    problem: tuple[str, str] | None = None
    if cn != claimed:
        problem = "device_mismatch", f"certificate of {cn} used for device {claimed!r}"
    else:
        device = await asyncio.to_thread(store.device, cn)
        if device is None:
            problem = "unknown_device", "device is not enrolled"
        elif device.cert_sha256 != cert_fingerprint(der):
            problem = "cert_mismatch", "client certificate is not the one enrolled"
    if problem:
        await asyncio.to_thread(store.record_problem, cn, seq, *problem)
        return refuse(request, cn, seq, *problem)
    await asyncio.to_thread(store.touch, cn)
    return cn


def _answer(request: web.Request, device: str, seq: int, outcome: Outcome) -> web.Response:
    if outcome.kind == "stored":
        assert outcome.receipt is not None
        return web.Response(body=outcome.receipt, content_type="application/json")
    if outcome.kind == "awaiting_payload":
        return web.json_response({"status": "awaiting_payload"}, status=202)
    return refuse(request, device, seq, outcome.kind, outcome.detail)


async def put_header(request: web.Request) -> web.Response:
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    seq = _seq(request)
    if seq is None:
        return refuse(request, device, request.match_info["seq"], "bad_seq",
                      "seq is not decimal")
    store, limits = request.app[STORE], request.app[LIMITS]
    try:
        body = await read_body(request.content, HEADER_MAX, limits)
    except TooLarge:
        detail = f"header larger than {HEADER_MAX} bytes"
        await asyncio.to_thread(store.record_problem, device, seq, "oversized", detail)
        answer = refuse(request, device, seq, "oversized", detail)
        answer.force_close()
        return answer
    except TooSlow as exc:
        return _too_slow(request, device, seq, exc)
    try:
        safejson.check(body, limits.json_max_depth, limits.json_max_number)
    except safejson.JsonLimitError as exc:
        await asyncio.to_thread(store.record_problem, device, seq, "malformed", str(exc))
        return refuse(request, device, seq, "malformed", str(exc))
    outcome = await asyncio.to_thread(store.put_header, device, seq, body)
    if outcome.kind == "awaiting_payload":
        log.debug("header stored device=%s seq=%d", device, seq)
    return _answer(request, device, seq, outcome)


def _too_slow(request: web.Request, device: str, seq: object, exc: Exception) -> web.Response:
    answer = refuse(request, device, seq, "too_slow", str(exc))
    answer.force_close()
    return answer


class ClientGone(Exception):
    """The payload upload stopped before its end (reset, timeout, short body)."""


class SlowBody(ClientGone):
    """The payload came slower than the minimum rate."""


def _chunks(content: StreamReader, loop: asyncio.AbstractEventLoop,
            limits: Limits) -> Iterator[bytes]:
    """The request body as a blocking iterator for the store's worker thread: each chunk is
    fetched on the event loop, so nothing is buffered beyond one chunk and the loop never
    waits on the disk. Slower than the minimum rate: SlowBody."""
    check = RateCheck(limits)

    async def next_chunk() -> bytes:
        try:
            return await check.next(content)
        except TooSlow as exc:
            raise SlowBody(str(exc)) from None

    while True:
        fut = asyncio.run_coroutine_threadsafe(next_chunk(), loop)
        try:
            chunk = fut.result(CHUNK_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise ClientGone(f"no payload data for {CHUNK_TIMEOUT_S:.0f} s") from None
        except SlowBody:
            raise
        except (Exception, concurrent.futures.CancelledError) as exc:
            raise ClientGone(f"payload upload cut off: {exc!r}") from exc
        if not chunk:
            return
        yield chunk


async def put_payload(request: web.Request) -> web.Response:
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    seq = _seq(request)
    if seq is None:
        return refuse(request, device, request.match_info["seq"], "bad_seq",
                      "seq is not decimal")
    header_sha = request.headers.get("X-Dualrec-Header-SHA256", "")
    if not HEADER_SHA.match(header_sha):
        return refuse(request, device, seq, "bad_request",
                      "X-Dualrec-Header-SHA256 missing or not 64 lowercase hex digits")
    store, limit = request.app[STORE], request.app[MAX_PAYLOAD]
    if request.content_length is not None and request.content_length > limit:
        detail = f"body of {request.content_length} bytes, the limit is {limit}"
        await asyncio.to_thread(store.record_problem, device, seq, "oversized", detail)
        return refuse(request, device, seq, "oversized", detail)
    uploads, limits = request.app[UPLOADS], request.app[LIMITS]
    if uploads[device] >= limits.max_uploads_per_device:
        answer = refuse(request, device, seq, "busy", f"{uploads[device]} payload uploads of "
                        "this device in progress already")
        answer.force_close()  # its body is not read
        return answer
    uploads[device] += 1
    try:
        return await _store_payload(request, device, seq, header_sha)
    finally:
        uploads[device] -= 1
        if uploads[device] <= 0:
            del uploads[device]


async def _store_payload(request: web.Request, device: str, seq: int,
                         header_sha: str) -> web.Response:
    store, limit = request.app[STORE], request.app[MAX_PAYLOAD]
    loop = asyncio.get_running_loop()
    body = _chunks(request.content, loop, request.app[LIMITS])
    try:
        outcome = await loop.run_in_executor(request.app[PAYLOAD_POOL], store.put_payload,
                                             device, seq, header_sha, body, limit)
    except SlowBody as exc:
        return _too_slow(request, device, seq, exc)
    except ClientGone as exc:
        return refuse(request, device, seq, "incomplete", str(exc))
    if outcome.kind == "stored":
        log.debug("payload stored device=%s seq=%d", device, seq)
    response = _answer(request, device, seq, outcome)
    if not await _drain(request.content, limit, request.app[LIMITS]):
        response.force_close()
    return response


async def _drain(content: StreamReader, limit: int, limits: Limits) -> bool:
    """Read and drop what the store did not need (a repeat of a stored payload, or one refused
    before its end), up to limit bytes; True if the body was read to its end.

    An HTTP/1.1 client without 100-continue (httpx) reads the answer only after sending its
    whole body. Left to aiohttp, an unread body is drained for 10 s and the connection then
    reset: a retry of a large payload over a slow link would never see its receipt. The same
    minimum rate as for any body: a trickle here would hold the connection for ever."""
    total = 0
    check = RateCheck(limits)
    while total <= limit:
        try:
            chunk = await check.next(content)
        except TooSlow:
            return False
        if not chunk:
            return True
        total += len(chunk)
    return False


async def get_receipt(request: web.Request) -> web.Response:
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    seq = _seq(request)
    if seq is None:
        return refuse(request, device, request.match_info["seq"], "bad_seq",
                      "seq is not decimal")
    receipt = await asyncio.to_thread(request.app[STORE].receipt, device, seq)
    if receipt is None:
        return refuse(request, device, seq, "not_stored", "no payload stored for this seq")
    return web.Response(body=receipt, content_type="application/json")


async def get_status(request: web.Request) -> web.Response:
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    return web.json_response(await asyncio.to_thread(request.app[STORE].status, device))


async def get_head(request: web.Request) -> web.Response:
    """The newest header held for the device on the connection (a box resuming its chain after
    losing its state), or 404 not_stored."""
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    head = await asyncio.to_thread(request.app[STORE].head, device)
    if head is None:
        return refuse(request, device, "-", "not_stored", "no header stored for this device")
    return web.json_response(head_json(head))


async def admin_status(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].status_all))


async def admin_enroll(request: web.Request) -> web.Response:
    try:
        body = safejson.loads(await read_body(request.content, ENROLL_MAX, request.app[LIMITS]),
                              request.app[LIMITS].json_max_depth,
                              request.app[LIMITS].json_max_number)
        device, key, cert = body["device"], body["signing_key_pem"], body["cert_pem"]
        replace = bool(body.get("replace", False))
        if not all(isinstance(v, str) for v in (device, key, cert)):
            raise TypeError("device, signing_key_pem and cert_pem must be strings")
    except (TooSlow, TooLarge) as exc:
        return refuse(request, "-", "-", "bad_request", str(exc))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return refuse(request, "-", "-", "bad_request", f"enroll needs JSON {{device, "
                      f"signing_key_pem, cert_pem[, replace]}}: {exc!r}")
    try:
        enrolled = await asyncio.to_thread(request.app[STORE].enroll, device, key.encode(),
                                           cert.encode(), replace=replace)
    except EnrollConflict as exc:
        return refuse(request, device, "-", "conflict", str(exc), 409)
    except EnrollError as exc:
        return refuse(request, device, "-", "bad_request", str(exc))
    log.info("enrolled device=%s cert_sha256=%s", enrolled.id, enrolled.cert_sha256)
    return web.json_response({"device": enrolled.id, "cert_sha256": enrolled.cert_sha256,
                              "enrolled_utc_ns": enrolled.enrolled_at})


def make_app(store: ReceiverStore, max_payload: int = DEFAULT_MAX_PAYLOAD,
             limits: Limits | None = None, events: RateLimitedLog | None = None,
             guard: Guard | None = None) -> web.Application:
    limits = limits or Limits()
    middlewares = [request_limits, json_errors]
    if guard is not None:
        middlewares.insert(0, guard.middleware())
    app = web.Application(client_max_size=HEADER_MAX, middlewares=middlewares)
    app[STORE] = store
    app[MAX_PAYLOAD] = max_payload
    app[LIMITS] = limits
    app[EVENTS] = events or RateLimitedLog(log, limits.log_interval_s)
    app[UPLOADS] = Counter()
    if guard is not None:
        app[GUARD_STATS] = guard.stats
    app[PAYLOAD_POOL] = concurrent.futures.ThreadPoolExecutor(PAYLOAD_WORKERS, "payload")

    async def stop_pool(app: web.Application) -> None:
        app[PAYLOAD_POOL].shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(stop_pool)
    seg = "/v1/devices/{device}/segments/{seq}"
    app.router.add_put(f"{seg}/header", put_header)
    app.router.add_put(f"{seg}/payload", put_payload)
    app.router.add_get(f"{seg}/receipt", get_receipt)
    app.router.add_get("/v1/devices/{device}/status", get_status)
    app.router.add_get("/v1/devices/{device}/head", get_head)
    return app


def make_admin_app(store: ReceiverStore, limits: Limits | None = None,
                   events: RateLimitedLog | None = None) -> web.Application:
    limits = limits or Limits()
    app = web.Application(middlewares=[request_limits, json_errors])
    app[STORE] = store
    app[LIMITS] = limits
    app[EVENTS] = events or RateLimitedLog(log, limits.log_interval_s)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_post("/admin/devices", admin_enroll)
    return app


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

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for runner in self.runners:
            await runner.cleanup()
        self.store.close()


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
        runner = web.AppRunner(make_app(store, config.max_payload, limits, events, guard),
                               shutdown_timeout=config.shutdown_timeout, **handler_args)
        await runner.setup()
        runners.append(runner)
        await GuardedSite(runner, config.host, config.port, guard).start()
        admin_app = make_admin_app(store, limits, events)
        from dualrec_tools.receiver import extras  # metrics, retention, alerts

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
    except BaseException:
        for r in runners:
            await r.cleanup()
        store.close()
        raise
    main, admin_port = (r.addresses[0][1] for r in runners[:2])
    running = RunningReceiver(store, _url("https", config.host, main),
                              _url("http", config.admin_host, admin_port), runners, guard,
                              events, metrics_url=metrics_url)
    running.tasks.append(loop.create_task(_every_second(guard, events)))
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
