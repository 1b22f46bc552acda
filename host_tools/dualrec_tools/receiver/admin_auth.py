"""Who may use the admin API: a middleware in front of every /admin/ route.

In order, each refusal a JSON answer that changes nothing:
- Host (on a loopback listener): a loopback name only, so a DNS-rebinding page cannot talk to it
  as "its own" origin (403 bad_host);
- Origin: absent (curl, httpx, the CLIs) or this listener's own; a web page's fetch from any
  other origin is refused before authentication (403 foreign_origin);
- Authorization: Bearer <admin token> made by `dualrec-receiver admin-token`, checked against
  its SHA-256 in enrollment.db (401 unauthenticated);
- a body only as application/json (415): a browser's no-preflight "simple" POST (text/plain,
  form encodings) never reaches a handler.

/metrics stays outside (read-only, for Prometheus on the same loopback listener).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from dualrec_tools.receiver.enrollment import EnrollmentBook

BOOK = web.AppKey("enrollment_book", EnrollmentBook)
ADMIN = web.RequestKey("admin_name", str)  # whose admin token (for the audit log)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, word: str, detail: str, **headers: str) -> web.Response:
    return web.json_response({"error": word, "detail": detail}, status=status, headers=headers)


def _on_loopback(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    try:
        return bool(sock) and ipaddress.ip_address(sock[0]).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    if host.startswith("["):  # [::1]:8444
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@web.middleware
async def admin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/admin/"):
        return await handler(request)
    host = request.headers.get("Host", "")
    if _on_loopback(request) and _host_name(host).lower() not in LOOPBACK_NAMES:
        return _error(403, "bad_host", "the admin API answers to a loopback host name only")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{host}":
        return _error(403, "foreign_origin", "requests from web pages are refused")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    name = None
    if scheme.lower() == "bearer" and token.strip():
        name = await asyncio.to_thread(request.app[BOOK].admin_name, token.strip())
    if name is None:
        return _error(401, "unauthenticated", "an admin token is needed (Authorization: Bearer "
                      "...; dualrec-receiver admin-token makes one)", **{
                          "WWW-Authenticate": 'Bearer realm="dualrec-admin"'})
    if request.method in BODY_METHODS and request.content_type != "application/json":
        return _error(415, "unsupported_media_type", "the admin API takes application/json "
                      "bodies only")
    request[ADMIN] = f"admin:{name}"
    return await handler(request)
