"""The receiver's HTTP side: the mutual-TLS upload API of docs/UPLOAD.md for the boxes, a plain
HTTP admin API on loopback for branch IT, and the ways to run them (foreground until SIGTERM for
the CLI, or a background thread for tests and tools that embed the receiver).

Who is asking comes from the client certificate on the connection, never from the request: its CN
must be the {device} in the path and the certificate must be the one enrolled for it. The store
does the checking and keeping; handlers call it from worker threads, because it fsyncs.
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from aiohttp import StreamReader, web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec_tools.pki import device_id_of
from dualrec_tools.receiver.store import (
    EnrollConflict,
    EnrollError,
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
    "not_stored": 404,
    "fork": 409, "bad_link": 409, "header_first": 409,
    "oversized": 413,
    "payload_mismatch": 422, "bad_payload": 422,
}

# Each payload upload holds a worker thread for as long as it streams; they get their own
# pool, so slow uploads never starve the short store calls (headers first) of the default one.
PAYLOAD_WORKERS = 64

STORE = web.AppKey("store", ReceiverStore)
MAX_PAYLOAD = web.AppKey("max_payload", int)
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


def refuse(device: str, seq: object, error: str, detail: str,
           code: int | None = None) -> web.Response:
    code = code or STATUS[error]
    log.warning("refused device=%s seq=%s code=%d error=%s: %s", device, seq, code, error, detail)
    return web.json_response({"error": error, "detail": detail}, status=code)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) as JSON, logged."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        word = (exc.reason or "error").lower().replace(" ", "_")
        return refuse(request.match_info.get("device", "-"), request.match_info.get("seq", "-"),
                      word, f"{request.method} {request.path}: {exc.reason}", exc.status)
    except ConnectionError:
        raise  # the client went away; nobody to answer
    except OSError as exc:  # the store could not write (disk full, I/O error): retry later
        log.exception("storage failure on %s %s", request.method, request.path)
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
    der = _peer_cert(request)
    if der is None:  # cannot happen behind CERT_REQUIRED; refuse rather than trust the path
        return refuse(claimed, seq, "unknown_device", "no client certificate on the connection")
    try:
        cn = device_id_of(x509.load_der_x509_certificate(der))
    except (ValueError, IndexError):
        return refuse(claimed, seq, "unknown_device", "client certificate has no CN")
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
        return refuse(cn, seq, *problem)
    await asyncio.to_thread(store.touch, cn)
    return cn


def _answer(device: str, seq: int, outcome: Outcome) -> web.Response:
    if outcome.kind == "stored":
        assert outcome.receipt is not None
        return web.Response(body=outcome.receipt, content_type="application/json")
    if outcome.kind == "awaiting_payload":
        return web.json_response({"status": "awaiting_payload"}, status=202)
    return refuse(device, seq, outcome.kind, outcome.detail)


async def put_header(request: web.Request) -> web.Response:
    device = await _authenticate(request)
    if isinstance(device, web.Response):
        return device
    seq = _seq(request)
    if seq is None:
        return refuse(device, request.match_info["seq"], "bad_seq", "seq is not decimal")
    store = request.app[STORE]
    try:
        body = await request.read()  # bounded by client_max_size = HEADER_MAX
    except web.HTTPRequestEntityTooLarge:
        detail = f"header larger than {HEADER_MAX} bytes"
        await asyncio.to_thread(store.record_problem, device, seq, "oversized", detail)
        return refuse(device, seq, "oversized", detail)
    outcome = await asyncio.to_thread(store.put_header, device, seq, body)
    if outcome.kind == "awaiting_payload":
        log.info("header stored device=%s seq=%d", device, seq)
    return _answer(device, seq, outcome)


class ClientGone(Exception):
    """The payload upload stopped before its end (reset, timeout, short body)."""


def _chunks(content: StreamReader, loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The request body as a blocking iterator for the store's worker thread: each chunk is
    fetched on the event loop, so nothing is buffered beyond one chunk and the loop never
    waits on the disk."""
    it = content.iter_chunked(CHUNK)

    async def next_chunk() -> bytes:
        return await anext(it, b"")

    while True:
        fut = asyncio.run_coroutine_threadsafe(next_chunk(), loop)
        try:
            chunk = fut.result(CHUNK_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise ClientGone(f"no payload data for {CHUNK_TIMEOUT_S:.0f} s") from None
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
        return refuse(device, request.match_info["seq"], "bad_seq", "seq is not decimal")
    header_sha = request.headers.get("X-Dualrec-Header-SHA256", "")
    if not HEADER_SHA.match(header_sha):
        return refuse(device, seq, "bad_request",
                      "X-Dualrec-Header-SHA256 missing or not 64 lowercase hex digits")
    store, limit = request.app[STORE], request.app[MAX_PAYLOAD]
    if request.content_length is not None and request.content_length > limit:
        detail = f"body of {request.content_length} bytes, the limit is {limit}"
        await asyncio.to_thread(store.record_problem, device, seq, "oversized", detail)
        return refuse(device, seq, "oversized", detail)
    loop = asyncio.get_running_loop()
    body = _chunks(request.content, loop)
    try:
        outcome = await loop.run_in_executor(request.app[PAYLOAD_POOL], store.put_payload,
                                             device, seq, header_sha, body, limit)
    except ClientGone as exc:
        return refuse(device, seq, "incomplete", str(exc))
    if outcome.kind == "stored":
        log.info("payload stored device=%s seq=%d", device, seq)
    response = _answer(device, seq, outcome)
    if not await _drain(request.content, limit):
        response.force_close()
    return response


async def _drain(content: StreamReader, limit: int) -> bool:
    """Read and drop what the store did not need (a repeat of a stored payload, or one refused
    before its end), up to limit bytes; True if the body was read to its end.

    An HTTP/1.1 client without 100-continue (httpx) reads the answer only after sending its
    whole body. Left to aiohttp, an unread body is drained for 10 s and the connection then
    reset: a retry of a large payload over a slow link would never see its receipt."""
    total = 0
    while total <= limit:
        chunk = await content.readany()
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
        return refuse(device, request.match_info["seq"], "bad_seq", "seq is not decimal")
    receipt = await asyncio.to_thread(request.app[STORE].receipt, device, seq)
    if receipt is None:
        return refuse(device, seq, "not_stored", "no payload stored for this seq")
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
        return refuse(device, "-", "not_stored", "no header stored for this device")
    return web.json_response(head_json(head))


async def admin_status(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(request.app[STORE].status_all))


async def admin_enroll(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        device, key, cert = body["device"], body["signing_key_pem"], body["cert_pem"]
        replace = bool(body.get("replace", False))
        if not all(isinstance(v, str) for v in (device, key, cert)):
            raise TypeError("device, signing_key_pem and cert_pem must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return refuse("-", "-", "bad_request", f"enroll needs JSON {{device, signing_key_pem, "
                      f"cert_pem[, replace]}}: {exc!r}")
    try:
        enrolled = await asyncio.to_thread(request.app[STORE].enroll, device, key.encode(),
                                           cert.encode(), replace=replace)
    except EnrollConflict as exc:
        return refuse(device, "-", "conflict", str(exc), 409)
    except EnrollError as exc:
        return refuse(device, "-", "bad_request", str(exc))
    log.info("enrolled device=%s cert_sha256=%s", enrolled.id, enrolled.cert_sha256)
    return web.json_response({"device": enrolled.id, "cert_sha256": enrolled.cert_sha256,
                              "enrolled_utc_ns": enrolled.enrolled_at})


def make_app(store: ReceiverStore, max_payload: int = DEFAULT_MAX_PAYLOAD) -> web.Application:
    # client_max_size bounds request.read(), used for headers only; payloads are streamed.
    app = web.Application(client_max_size=HEADER_MAX, middlewares=[json_errors])
    app[STORE] = store
    app[MAX_PAYLOAD] = max_payload
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


def make_admin_app(store: ReceiverStore) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[STORE] = store
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
    admin_url: str  # http://HOST:PORT, the admin API
    runners: list[web.AppRunner]

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.store.close()


async def start_receiver(config: ReceiverConfig) -> RunningReceiver:
    keys = config.keys_dir
    ssl_ctx = build_ssl_context(keys / "ca.crt", keys / "receiver.crt", keys / "receiver.key")
    receiver_id = config.receiver_id or device_id_of(
        x509.load_pem_x509_certificate((keys / "receiver.crt").read_bytes()))
    store = ReceiverStore(config.data_dir, receipt_key=load_receipt_key(keys / "receipt.key"),
                          receiver_id=receiver_id)
    for stale in store.remove_stale_temp():
        log.info("removed %s, an upload cut off by a stop", stale)
    runners: list[web.AppRunner] = []
    try:
        for app, host, port, ctx in (
                (make_app(store, config.max_payload), config.host, config.port, ssl_ctx),
                (make_admin_app(store), config.admin_host, config.admin_port, None)):
            runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        store.close()
        raise
    main, admin = (r.addresses[0][1] for r in runners)
    running = RunningReceiver(store, _url("https", config.host, main),
                              _url("http", config.admin_host, admin), runners)
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
