"""The pages and their JSON: the dashboard (roles it and auditor), the session list with its
filters, a session with its player, log and timeline, the player's WebM, and unmasking (role
auditor; unmasking needs can-unmask and a typed reason, written to the audit log first).

Blocking work (verifying, decrypting, transcoding) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from dualrec.shield import shield
from dualrec_tools.web import dashboard, review
from dualrec_tools.web.app import HERE, login_of, redirect, render, state
from dualrec_tools.web.archive import NS, SessionRow

log = logging.getLogger("dualrec.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REASON_MIN = 10
STATIC = {"app.js": "application/javascript", "style.css": "text/css"}
SESSION_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def need(*roles: str) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        async def inner(request: web.Request) -> web.StreamResponse:
            if login_of(request).account.role not in roles:
                if request.path.startswith(("/api/", "/media/")):
                    return web.json_response({"error": "not for your role"}, status=403)
                return web.Response(text="not for your role", status=403)
            return await handler(request)
        return inner
    return wrap


def _ids(request: web.Request) -> tuple[str, str]:
    device, session = request.match_info["device"], request.match_info["session"]
    if not DEVICE_ID.match(device) or not SESSION_ID.match(session):
        raise web.HTTPNotFound()
    return device, session


# --- dashboard ---------------------------------------------------------------------------------


@need("it", "auditor")
async def dashboard_page(request: web.Request) -> web.StreamResponse:
    cfg = state(request).config
    return render(request, "dashboard.html", refresh_ms=int(cfg.refresh_s * 1000),
                  alert_after_s=cfg.alert_after_s)


@need("it", "auditor")
async def devices_api(request: web.Request) -> web.StreamResponse:
    st = state(request)
    rows = await asyncio.to_thread(dashboard.rows, st.archive, st.faults,
                                   st.config.alert_after_s, st.config.tz)
    return web.json_response({"alert_after_s": st.config.alert_after_s, "devices": rows})


# --- the session list ------------------------------------------------------------------------


def _day(value: str) -> datetime | None:
    try:
        return datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        return None


def _matches(row: SessionRow, q: dict[str, str], tz: Any) -> bool:
    local = datetime.fromtimestamp(row.start_utc_ns / NS, UTC).astimezone(tz)
    lo, hi = _day(q.get("from", "")), _day(q.get("to", ""))
    if lo and local.date() < lo.date():
        return False
    if hi and local.date() > hi.date():
        return False
    counter = q.get("counter", "").strip().lower()
    if counter and counter not in row.device.lower() and counter not in (row.counter or "").lower():
        return False
    for key in ("teller", "txn", "business"):
        want = q.get(key, "").strip().lower()
        if want and want not in row.txn.labels.get(key, "").lower():
            return False
    done = q.get("completeness", "")
    return not done or row.txn.completeness.split(":")[0] == done


def _row(row: SessionRow, tz: Any) -> dict[str, Any]:
    utc = datetime.fromtimestamp(row.start_utc_ns / NS, UTC)
    return {"device": row.device, "counter": row.counter, "session": row.info.session,
            "start_local": utc.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z"),
            "start_utc": utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "duration_s": round(row.info.duration_ns / NS, 1),
            "teller": shield(row.txn.labels.get("teller", "")),
            "txn": shield(row.txn.labels.get("txn", "")),
            "business": shield(row.txn.labels.get("business", "")),
            "completeness": shield(row.txn.completeness), "status": row.info.status,
            "verdict": row.verdict}


async def _listed(request: web.Request) -> list[dict[str, Any]]:
    st = state(request)
    rows = await asyncio.to_thread(st.archive.sessions)
    q = {k: v[:100] for k, v in request.query.items()}
    return [_row(r, st.config.tz) for r in rows if _matches(r, q, st.config.tz)]


@need("auditor")
async def sessions_page(request: web.Request) -> web.StreamResponse:
    q = {k: request.query.get(k, "")[:100] for k in
         ("from", "to", "counter", "teller", "txn", "business", "completeness")}
    return render(request, "sessions.html", sessions=await _listed(request), q=q)


@need("auditor")
async def sessions_api(request: web.Request) -> web.StreamResponse:
    return web.json_response({"sessions": await _listed(request)})


# --- one session -----------------------------------------------------------------------------


async def _view(request: web.Request) -> tuple[review.SessionView, bool]:
    st = state(request)
    device, session = _ids(request)
    unmasked = login_of(request).is_unmasked(device, session)
    view = await asyncio.to_thread(review.load, st.archive, device, session, unmasked=unmasked)
    if view is None:
        raise web.HTTPNotFound()
    return view, unmasked


@need("auditor")
async def session_page(request: web.Request) -> web.StreamResponse:
    st = state(request)
    view, unmasked = await _view(request)
    login = login_of(request)
    st.audit.append(login.account.name, "view", device=view.row.device,
                    session=view.row.info.session, unmasked=unmasked)
    until = login.unmasked.get((view.row.device, view.row.info.session))
    return render(request, "session.html", s=review.summary(view, st.config.tz),
                  unmasked=unmasked, can_unmask=login.account.can_unmask,
                  unmask_minutes=int((until - time.monotonic()) / 60) + 1 if unmasked and until
                  else 0, viewer=login.account.name, has_media=view.has_media,
                  media_ready=st.media.fresh(st.media.path(view.row.device, view.row.info.session,
                                                           login.account.name)))


@need("auditor")
async def session_api(request: web.Request) -> web.StreamResponse:
    view, unmasked = await _view(request)
    return web.json_response(review.summary(view, state(request).config.tz)
                             | {"unmasked": unmasked})


MP4 = {"Content-Type": "video/mp4", "Cache-Control": "private, no-store"}


def _loader(st: Any, device: str, session: str) -> Callable[[], tuple[list[Any], int]]:
    return lambda: review.media_of(st.archive, device, session)


@need("auditor")
async def media(request: web.Request) -> web.StreamResponse:
    """The player's file: the cached one (ranges, seekable) when fresh, else the transcode
    streamed as it is written (plays at once; the page switches to the cached file when
    /api/.../media says it is ready)."""
    st = state(request)
    device, session = _ids(request)
    login = login_of(request)
    cached = st.media.path(device, session, login.account.name)
    if st.media.fresh(cached):
        return web.FileResponse(cached, headers=MP4)
    if not await asyncio.to_thread(st.archive.has_session, device, session):
        raise web.HTTPNotFound()
    job = st.media.job(device, session, login.account.name, _loader(st, device, session))
    await asyncio.to_thread(job.started.wait, 600)
    if job.error or not job.partial.exists():
        log.warning("media failed device=%s session=%s: %s", device, session, job.error)
        return web.json_response({"error": "the session's media cannot be played"}, status=500)
    response = web.StreamResponse(headers=MP4 | {"Accept-Ranges": "none"})
    await response.prepare(request)
    with job.partial.open("rb") as f:
        while True:
            done = job.streamed.is_set()  # read before the file: nothing written after is lost
            chunk = f.read(256 * 1024)
            if chunk:
                await response.write(chunk)
            elif done:
                break
            else:
                await asyncio.sleep(0.1)
    await response.write_eof()
    return response


@need("auditor")
async def media_state(request: web.Request) -> web.StreamResponse:
    st = state(request)
    device, session = _ids(request)
    cached = st.media.path(device, session, login_of(request).account.name)
    return web.json_response({"ready": st.media.fresh(cached)})


@need("auditor")
async def unmask(request: web.Request) -> web.StreamResponse:
    st = state(request)
    device, session = _ids(request)
    login = login_of(request)
    if not login.account.can_unmask:
        return web.Response(text="your account may not unmask", status=403)
    reason = str((await request.post()).get("reason") or "").strip()
    if len(reason) < REASON_MIN:
        return web.Response(text=f"a reason of at least {REASON_MIN} characters is needed",
                            status=400)
    chain = await asyncio.to_thread(st.archive.chain, device)
    if chain is None or chain.report.session(session) is None:
        raise web.HTTPNotFound()
    # on disk before anything is shown
    st.audit.append(login.account.name, "unmask", device=device, session=session,
                    reason=reason[:1000], minutes=round(st.config.unmask_s / 60, 1),
                    client=request.remote or "?")
    login.unmasked[(device, session)] = time.monotonic() + st.config.unmask_s
    log.info("unmask user=%s device=%s session=%s", login.account.name, device, session)
    return redirect(f"/sessions/{device}/{session}")


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=(HERE / "static" / name).read_bytes(), content_type=STATIC[name],
                        headers={"Cache-Control": "private, max-age=300"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", dashboard_page)
    r.add_get("/api/devices", devices_api)
    r.add_get("/sessions", sessions_page)
    r.add_get("/api/sessions", sessions_api)
    r.add_get("/sessions/{device}/{session}", session_page)
    r.add_get("/api/sessions/{device}/{session}", session_api)
    r.add_get("/media/{device}/{session}.mp4", media)
    r.add_get("/api/sessions/{device}/{session}/media", media_state)
    r.add_post("/sessions/{device}/{session}/unmask", unmask)
    r.add_get("/static/{name}", static)
