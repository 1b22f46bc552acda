"""The aiohttp application: configuration, the login guard (every route but /login needs a
session; every POST a CSRF token), security headers, login and logout. The pages themselves are
in pages.py.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from dualrec_tools.web.accounts import Accounts
from dualrec_tools.web.archive import Archive
from dualrec_tools.web.audit import AuditLog
from dualrec_tools.web.auth import COOKIE, PRE_COOKIE, LoginLimiter, LoginSession, Sessions, same
from dualrec_tools.web.dashboard import Faults
from dualrec_tools.web.media import MediaCache

log = logging.getLogger("dualrec.web")
HERE = Path(__file__).parent
LOGIN_STYLE = (HERE / "static" / "login.css").read_text()
# The login page has no session to fetch a stylesheet with: its style is inline, allowed by hash.
_LOGIN_STYLE_HASH = base64.b64encode(hashlib.sha256(LOGIN_STYLE.encode()).digest()).decode()
CSP = ("default-src 'none'; script-src 'self'; "
       f"style-src 'self' 'sha256-{_LOGIN_STYLE_HASH}'; "
       "media-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@dataclass
class WebConfig:
    data_dir: Path
    state_dir: Path
    identities: list[Any]
    tz: tzinfo
    tls: bool = False
    alert_after_s: float = 300.0
    refresh_s: float = 5.0
    unmask_s: float = 600.0
    watermark_max_age_s: float = 900.0
    counters: dict[str, str] = field(default_factory=dict)
    login_per_name: int = 5
    login_per_address: int = 20


@dataclass
class State:
    config: WebConfig
    archive: Archive
    accounts: Accounts
    audit: AuditLog
    sessions: Sessions
    limiter: LoginLimiter
    media: MediaCache
    faults: Faults
    templates: jinja2.Environment


STATE: web.AppKey[State] = web.AppKey("state", State)


def state(request: web.Request) -> State:
    return request.app[STATE]


def login_of(request: web.Request) -> LoginSession:
    return request["login"]


def render(request: web.Request, name: str, status: int = 200, **ctx: Any) -> web.Response:
    st = state(request)
    login = request.get("login")
    html = st.templates.get_template(name).render(
        login=login, csrf=login.csrf if login else "", **ctx)
    return web.Response(text=html, content_type="text/html", status=status)


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _refuse(request: web.Request, status: int, why: str) -> web.StreamResponse:
    if request.path.startswith(("/api/", "/media/")) or request.method != "GET":
        return web.json_response({"error": why}, status=status)
    if status == 401:
        return redirect("/login")
    return web.Response(text=why, status=status)


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await _guarded(request, handler)
    except web.HTTPException as exc:  # a 404 or 405 gets the same headers as any answer
        _security(exc)
        raise


async def _guarded(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path == "/login":
        response = await handler(request)
    else:
        login = state(request).sessions.get(request.cookies.get(COOKIE))
        if login is None:
            response = _refuse(request, 401, "login required")
        else:
            request["login"] = login
            if request.method == "POST":
                form = await request.post()
                token = form.get("csrf") or request.headers.get("X-CSRF-Token")
                if not same(str(token or ""), login.csrf):
                    log.warning("csrf refused user=%s path=%s", login.account.name,
                                request.path)
                    return _security(_refuse(request, 403, "bad or missing CSRF token"))
            response = await handler(request)
    return _security(response)


def _security(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _cookie(request: web.Request, response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(name, value, httponly=True, samesite="Strict", path="/",
                        secure=state(request).config.tls)


async def login_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    # Kept when the browser has one: a favicon request redirected here must not replace the
    # token of the form already on screen.
    pre = request.cookies.get(PRE_COOKIE, "")
    if len(pre) < 32:
        pre = secrets.token_urlsafe(24)
    response = render(request, "login.html", status=status, pre=pre, error=error,
                      style=LOGIN_STYLE)
    _cookie(request, response, PRE_COOKIE, pre)
    return response


async def login_post(request: web.Request) -> web.StreamResponse:
    st = state(request)
    form = await request.post()
    if not same(str(form.get("pre") or ""), request.cookies.get(PRE_COOKIE)):
        return await login_page(request, "The form expired; try again.", 403)
    name, password = str(form.get("name") or "")[:64], str(form.get("password") or "")[:1024]
    address = request.remote or "?"
    if st.limiter.blocked(name, address):
        log.warning("login refused (rate limit) name=%r from=%s", name, address)
        return await login_page(request, "Too many failed logins; wait a few minutes.", 429)
    account = st.accounts.check(name, password)
    if account is None:
        st.limiter.failed(name, address)
        log.warning("login failed name=%r from=%s", name, address)
        return await login_page(request, "Wrong name or password.", 401)
    token, _ = st.sessions.create(account)
    log.info("login user=%s role=%s from=%s", account.name, account.role, address)
    response = redirect("/sessions" if account.role == "auditor" else "/")
    _cookie(request, response, COOKIE, token)
    response.del_cookie(PRE_COOKIE, path="/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    state(request).sessions.drop(request.cookies.get(COOKIE))
    response = redirect("/login")
    response.del_cookie(COOKIE, path="/")
    return response


def make_app(config: WebConfig) -> web.Application:
    from dualrec_tools.web import pages

    archive = Archive(config.data_dir, config.identities, config.counters,
                      config.state_dir / "labels.db")
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                   autoescape=True, undefined=jinja2.StrictUndefined)
    st = State(config, archive, Accounts(config.state_dir / "web.db"),
               AuditLog(config.state_dir / "audit.log"), Sessions(),
               LoginLimiter(config.login_per_name, config.login_per_address),
               MediaCache(config.state_dir / "cache", config.watermark_max_age_s),
               Faults(archive), templates)
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[STATE] = st
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login_post)
    app.router.add_post("/logout", logout)
    pages.add_routes(app)

    async def close(_: web.Application) -> None:
        archive.close()

    app.on_cleanup.append(close)
    return app
