"""The receiver's HTTP side: the mutual-TLS upload API of docs/UPLOAD.md for the boxes and a
plain HTTP admin API on loopback for branch IT (runtime.py runs them).

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
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import StreamReader, web
from cryptography import x509

from dualrec_tools.pki import device_id_of
from dualrec_tools.receiver import safejson
from dualrec_tools.receiver.admin_auth import BOOK, admin_only
from dualrec_tools.receiver.bodies import RateCheck, TooLarge, TooSlow, read_body
from dualrec_tools.receiver.guard import Guard, GuardStats
from dualrec_tools.receiver.limits import Limits
from dualrec_tools.receiver.ratelog import RateLimitedLog
from dualrec_tools.receiver.report import REPORT_MAX, BadReport, parse_report
from dualrec_tools.receiver.store import (
    DEVICE_ID,
    Outcome,
    ReceiverStore,
    cert_fingerprint,
    head_json,
)

log = logging.getLogger("dualrec.receiver")

HEADER_MAX = 64 * 1024
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
    "revoked": 403,
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
        elif (book := request.app.get(BOOK)) is not None and \
                await asyncio.to_thread(book.is_revoked, device.cert_sha256):
            problem = "revoked", "client certificate was revoked (dualrec-tool revoke)"
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


async def put_report(request: web.Request) -> web.Response:
    """The box's own state (spool use, quota, active fault names, firmware): the device on the
    connection only; the latest report is kept; 204, or 400 malformed and nothing stored."""
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    limits = request.app[LIMITS]
    try:
        body = await read_body(request.content, REPORT_MAX, limits)
    except TooLarge:
        answer = refuse(request, device, "-", "oversized",
                        f"report larger than {REPORT_MAX} bytes")
        answer.force_close()
        return answer
    except TooSlow as exc:
        return _too_slow(request, device, "-", exc)
    try:
        report = parse_report(body, limits)
    except BadReport as exc:
        return refuse(request, device, "-", "malformed", str(exc))
    await asyncio.to_thread(request.app[STORE].put_report, device, report)
    return web.Response(status=204)


async def admin_status(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].status_all))


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
    app.router.add_put("/v1/devices/{device}/report", put_report)
    return app


def make_admin_app(store: ReceiverStore, limits: Limits | None = None,
                   events: RateLimitedLog | None = None) -> web.Application:
    limits = limits or Limits()
    # admin_only: every /admin/ route needs an admin token, JSON bodies, no foreign Origin
    # (admin_auth.py); the enrollment, token and revocation routes are in enroll_http.py.
    app = web.Application(middlewares=[request_limits, json_errors, admin_only])
    app[STORE] = store
    app[LIMITS] = limits
    app[EVENTS] = events or RateLimitedLog(log, limits.log_interval_s)
    app.router.add_get("/admin/status", admin_status)
    return app


# What runs the apps (config, start, stop, the thread for tests) lives in runtime.py; these names
# are still importable from here, as they were before the split.
_RUNTIME = {"ReceiverConfig", "RunningReceiver", "ReceiverThread", "start_receiver", "serve",
            "load_receipt_key"}


def __getattr__(name: str) -> object:
    if name in _RUNTIME:
        from dualrec_tools.receiver import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
