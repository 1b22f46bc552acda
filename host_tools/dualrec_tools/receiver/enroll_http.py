"""The enrollment endpoints over HTTP.

- `POST /v1/enroll` on the enrollment listener (TLS, server authentication only: a box on its
  first boot has no client certificate yet): {device, branch, token, csr_pem,
  signing_key_pem} -> {device, cert_pem, not_after}. The token decides (enrollment.py).
- `POST /v1/devices/{device}/renew` on the mutual-TLS upload listener: {csr_pem} -> the same
  answer; the connection's certificate (enrolled, not revoked) authenticates it.
- admin (admin_auth.py in front): `POST /admin/enrollment-tokens` {device, ttl_s?, replace?},
  `POST /admin/devices/{device}/revoke` {reason?}, and `POST /admin/devices` (enroll a
  certificate this CA issued, by hand; replace needs `replace: true`).

Every enrollment, replacement, renewal and revocation is a line in the audit log. A certificate
that stops counting (replaced, renewed, revoked) also loses its open upload connections, so a
stolen one is cut at once and a renewing box reconnects with its new one.

The enrollment listener runs behind a Guard of its own (the upload listener's caps and timeouts;
all connections there share one "certificate", none, so at most max_connections_per_cert
enrollments run at once: plenty for boxes that enroll once).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from aiohttp import web
from cryptography import x509

from dualrec_tools.receiver import safejson
from dualrec_tools.receiver.admin_auth import ADMIN, BOOK
from dualrec_tools.receiver.bodies import TooLarge, TooSlow, read_body
from dualrec_tools.receiver.enrollment import (
    DEFAULT_TOKEN_TTL_S,
    EnrollmentBook,
    EnrollRefused,
    Issuer,
    fingerprint,
    pem_of,
)
from dualrec_tools.receiver.guard import Guard, GuardedSite
from dualrec_tools.receiver.limits import Limits
from dualrec_tools.receiver.ratelog import RateLimitedLog
from dualrec_tools.receiver.store import DEVICE_ID, EnrollError, ReceiverStore, _signing_key

log = logging.getLogger("dualrec.receiver")

BODY_MAX = 16 * 1024
ISSUER = web.AppKey("issuer", Issuer)
STORE = web.AppKey("enroll_store", ReceiverStore)
GUARD = web.AppKey("upload_guard", Guard)  # whose connections of a dropped certificate close
LIMITS = web.AppKey("enroll_limits", Limits)


def _answer(exc: EnrollRefused, device: str = "-") -> web.Response:
    log.warning("enrollment refused device=%s error=%s: %.200s",
                device if DEVICE_ID.match(device) else "(invalid)", exc.word, exc)
    return web.json_response({"error": exc.word, "detail": str(exc)[:300]}, status=exc.status)


async def _json(request: web.Request, limits: Limits) -> dict:
    if request.content_type != "application/json":
        raise EnrollRefused("unsupported_media_type", "application/json bodies only", 415)
    try:
        body = safejson.loads(await read_body(request.content, BODY_MAX, limits),
                              limits.json_max_depth, limits.json_max_number)
    except (TooSlow, TooLarge, ValueError) as exc:
        raise EnrollRefused("bad_request", f"not a JSON body: {exc}", 400) from None
    if not isinstance(body, dict):
        raise EnrollRefused("bad_request", "the body must be a JSON object", 400)
    return body


def _strings(body: dict, *names: str) -> list[str]:
    values = [body.get(n) for n in names]
    if not all(isinstance(v, str) and v for v in values):
        raise EnrollRefused("bad_request", f"needs strings {', '.join(names)}", 400)
    return values  # type: ignore[return-value]


def drop_connections(app: web.Application, cert_sha256: str,
                     keep: web.Request | None = None) -> None:
    """Close the upload connections made with a certificate that no longer counts."""
    guard = app.get(GUARD)
    if guard is None:
        return
    own = guard.conn_of(keep.transport) if keep is not None else None
    for conn in [c for c in guard.conns if c.cert == cert_sha256 and c is not own]:
        (conn.tls or conn.raw).abort()  # type: ignore[union-attr]
        guard.release(conn)


def _issued(cert: x509.Certificate, device: str) -> web.Response:
    return web.json_response({"device": device, "cert_pem": pem_of(cert),
                              "not_after": cert.not_valid_after_utc.isoformat()})


# -- the box's first boot --------------------------------------------------------------------


async def enroll(request: web.Request) -> web.Response:
    app = request.app
    book, issuer, store = app[BOOK], app[ISSUER], app[STORE]
    device = "-"
    try:
        body = await _json(request, app[LIMITS])
        device, branch, token, csr, key_pem = _strings(body, "device", "branch", "token",
                                                       "csr_pem", "signing_key_pem")
        if not DEVICE_ID.match(device):
            raise EnrollRefused("bad_request", "not a device id", 400)
        row = await asyncio.to_thread(book.check, token, device, branch, issuer.branch)
        try:
            _signing_key(key_pem.encode())
        except EnrollError as exc:
            raise EnrollRefused("bad_request", str(exc), 400) from None
        cert = issuer.issue(csr, device)  # refuses a bad CSR before anything changes
        old = await asyncio.to_thread(store.device, device)
        if old is not None and not row.replace_ok:
            raise EnrollRefused("enrolled", f"{device} is enrolled; replacing it needs a token "
                                "minted with replace", 409)
        if not await asyncio.to_thread(book.claim, row):
            raise EnrollRefused("token_used", "this enrollment token was used already")
    except EnrollRefused as exc:
        return _answer(exc, device)
    fp = fingerprint(cert)
    try:
        await asyncio.to_thread(store.enroll, device, key_pem.encode(), pem_of(cert).encode(),
                                replace=row.replace_ok)
    except BaseException:
        await asyncio.to_thread(book.release, row)
        raise
    await asyncio.to_thread(book.finish, row, fp)
    what = "enroll" if old is None else "replace"
    await asyncio.to_thread(book.audit.write, f"token:{device}", what, device, fp,
                            f"certificate until {cert.not_valid_after_utc:%Y-%m-%d}")
    if old is not None:
        drop_connections(app, old.cert_sha256)
    log.info("%sd device=%s cert_sha256=%s", what, device, fp)
    return _issued(cert, device)


# -- renewal over mutual TLS -----------------------------------------------------------------


async def renew(request: web.Request) -> web.Response:
    from dualrec_tools.receiver.server import _authenticate

    device = await _authenticate(request)  # enrolled, this certificate, not revoked
    if isinstance(device, web.Response):
        return device
    app = request.app
    store, issuer = app[STORE], app[ISSUER]
    try:
        (csr,) = _strings(await _json(request, app[LIMITS]), "csr_pem")
        cert = issuer.issue(csr, device)
    except EnrollRefused as exc:
        return _answer(exc, device)
    old = await asyncio.to_thread(store.device, device)
    assert old is not None  # _authenticate found it
    fp = fingerprint(cert)
    await asyncio.to_thread(store.enroll, device, old.signing_key_pem, pem_of(cert).encode(),
                            replace=True)
    await asyncio.to_thread(app[BOOK].audit.write, f"device:{device}", "renew", device, fp,
                            f"replaces {old.cert_sha256[:16]}; until "
                            f"{cert.not_valid_after_utc:%Y-%m-%d}")
    drop_connections(app, old.cert_sha256, keep=request)
    log.info("renewed device=%s cert_sha256=%s", device, fp)
    answer = _issued(cert, device)
    answer.force_close()  # this connection carries the old certificate
    return answer


# -- admin -----------------------------------------------------------------------------------


async def admin_mint(request: web.Request) -> web.Response:
    app = request.app
    device = "-"
    try:
        body = await _json(request, app[LIMITS])
        (device,) = _strings(body, "device")
        ttl = body.get("ttl_s", DEFAULT_TOKEN_TTL_S)
        replace = body.get("replace", False)
        if not DEVICE_ID.match(device) or not isinstance(ttl, int) or \
                not isinstance(replace, bool):
            raise EnrollRefused("bad_request", "{device, ttl_s (int), replace (bool)}", 400)
        if not app[ISSUER].can_issue:  # a token nobody could redeem
            raise EnrollRefused("no_issuer", "this receiver holds no issuing CA (ca.key in its "
                                "keys directory); it cannot enroll boxes", 503)
        if not replace and await asyncio.to_thread(app[STORE].device, device) is not None:
            raise EnrollRefused("enrolled", f"{device} is enrolled; a token that replaces it "
                                "needs replace: true", 409)
        token, expires = await asyncio.to_thread(app[BOOK].mint, device, app[ISSUER].branch,
                                                 ttl_s=ttl, replace_ok=replace,
                                                 by=request[ADMIN])
    except EnrollRefused as exc:
        return _answer(exc, device)
    return web.json_response({"device": device, "branch": app[ISSUER].branch, "token": token,
                              "expires_utc_ns": expires})


async def admin_revoke(request: web.Request) -> web.Response:
    app = request.app
    device = request.match_info["device"]
    try:
        body = await _json(request, app[LIMITS])
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise EnrollRefused("bad_request", "reason must be a string", 400)
        enrolled = await asyncio.to_thread(app[STORE].device, device) \
            if DEVICE_ID.match(device) else None
        if enrolled is None:
            raise EnrollRefused("unknown_device", f"{device!r} is not enrolled", 404)
    except EnrollRefused as exc:
        return _answer(exc, device)
    await asyncio.to_thread(app[BOOK].revoke, enrolled.cert_sha256, device, request[ADMIN],
                            reason)
    drop_connections(app, enrolled.cert_sha256)
    log.warning("revoked device=%s cert_sha256=%s by %s", device, enrolled.cert_sha256,
                request[ADMIN])
    return web.json_response({"device": device, "revoked_cert_sha256": enrolled.cert_sha256})


async def admin_enroll(request: web.Request) -> web.Response:
    """Enroll a certificate by hand: it must be one this branch's CA issued, valid now."""
    app = request.app
    device = "-"
    try:
        body = await _json(request, app[LIMITS])
        device, key, cert_text = _strings(body, "device", "signing_key_pem", "cert_pem")
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise EnrollRefused("bad_request", "replace must be true or false", 400)
        if not DEVICE_ID.match(device):
            raise EnrollRefused("bad_request", "not a device id", 400)
        cert = app[ISSUER].check_client_cert(cert_text.encode(), device)
        if app[BOOK].is_revoked(fingerprint(cert)):
            raise EnrollRefused("revoked", "this certificate was revoked", 400)
        old = await asyncio.to_thread(app[STORE].device, device)
        try:
            done = await asyncio.to_thread(app[STORE].enroll, device, key.encode(),
                                           cert_text.encode(), replace=replace)
        except EnrollError as exc:
            conflict = type(exc).__name__ == "EnrollConflict"
            raise EnrollRefused("conflict" if conflict else "bad_request", str(exc),
                                409 if conflict else 400) from None
    except EnrollRefused as exc:
        return _answer(exc, device)
    if old is None or old.cert_sha256 != done.cert_sha256 or old.signing_key_pem != \
            done.signing_key_pem:
        what = "enroll" if old is None else "replace"
        await asyncio.to_thread(app[BOOK].audit.write, request[ADMIN], what, device,
                                done.cert_sha256, "by hand (admin API)")
        if old is not None and old.cert_sha256 != done.cert_sha256:
            drop_connections(app, old.cert_sha256)
    return web.json_response({"device": done.id, "cert_sha256": done.cert_sha256,
                              "enrolled_utc_ns": done.enrolled_at})


# -- wiring ----------------------------------------------------------------------------------


def install(upload_app: web.Application, admin_app: web.Application, store: ReceiverStore,
            book: EnrollmentBook, issuer: Issuer, guard: Guard, limits: Limits) -> None:
    """The renewal route on the upload app, the admin routes; before the apps are frozen."""
    for app in (upload_app, admin_app):
        app[BOOK], app[ISSUER], app[STORE], app[GUARD], app[LIMITS] = \
            book, issuer, store, guard, limits
    upload_app.router.add_post("/v1/devices/{device}/renew", renew)
    admin_app.router.add_post("/admin/enrollment-tokens", admin_mint)
    admin_app.router.add_post("/admin/devices/{device}/revoke", admin_revoke)
    admin_app.router.add_post("/admin/devices", admin_enroll)


def enroll_ssl_context(keys: Path) -> ssl.SSLContext:
    """Server authentication only (the box pins the branch CA), the upload listener's suites."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(keys / "receiver.crt"), str(keys / "receiver.key"))
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


async def start_listener(keys: Path, host: str, port: int, store: ReceiverStore,
                         book: EnrollmentBook, issuer: Issuer, upload_guard: Guard,
                         limits: Limits, events: RateLimitedLog,
                         shutdown_timeout: float) -> tuple[web.AppRunner, Guard, int]:
    """The enrollment listener (POST /v1/enroll only); returns its runner, guard and port."""
    from dualrec_tools.receiver.server import json_errors, request_limits

    guard = Guard(limits, enroll_ssl_context(keys), lambda: runner.server(),  # type: ignore
                  events)
    app = web.Application(client_max_size=BODY_MAX,
                          middlewares=[guard.middleware(), request_limits, json_errors])
    app[BOOK], app[ISSUER], app[STORE], app[GUARD], app[LIMITS] = \
        book, issuer, store, upload_guard, limits
    from dualrec_tools.receiver.server import EVENTS
    from dualrec_tools.receiver.server import LIMITS as SERVER_LIMITS

    app[EVENTS], app[SERVER_LIMITS] = events, limits
    app.router.add_post("/v1/enroll", enroll)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard)
    await site.start()
    return runner, guard, site.port
