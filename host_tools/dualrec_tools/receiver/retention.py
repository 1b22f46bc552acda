"""Retention: a branch's policy for how long segments are kept, run periodically in the receiver
with bounded work per pass.

A segment may go once its session ended more than keep_days ago, unless the device or the
session is on legal hold, and only if it is verified and received: payload stored and
receipted, every seq below it present (the store checked each link on the way in), and not the
device's newest (the head a box resumes from). A session is deleted whole, and only once a later
segment shows it is over. Every deletion is first written to the signed, hash-chained deletion
log (dualrec_tools.deletion_log), then the files go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec_tools.deletion_log import append_entry
from dualrec_tools.receiver import safejson
from dualrec_tools.receiver.ratelog import RateLimitedLog
from dualrec_tools.receiver.storage import RetentionCandidate, Storage

log = logging.getLogger("dualrec.receiver")
DELETION_LOG = "deletion-log.jsonl"
DAY_NS = 86400 * 10**9


@dataclass(frozen=True)
class RetentionPolicy:
    keep_days: float = 90.0
    interval_s: float = 300.0
    batch: int = 10_000  # segments looked at per device and pass (a long day of 10 s segments)


def plan(cands: list[RetentionCandidate], cutoff_ns: int, held_sessions: set[str]
         ) -> list[list[RetentionCandidate]]:
    """Runs of one session (idle segments: one each) that may go, lowest first: the session is
    over (a later segment is another's), not held, ended before cutoff. Stops at the first run
    that may not go: what lies above it stays too, so the deleted part is a prefix."""
    runs: list[list[RetentionCandidate]] = []
    for c in cands:
        if runs and c.session is not None and runs[-1][-1].session == c.session:
            runs[-1].append(c)
        else:
            runs.append([c])
    out = []
    for run in runs:
        session = run[0].session
        if not run[-1].session_over or session in held_sessions or \
                max(c.end_utc_ns for c in run) > cutoff_ns:
            break
        out.append(run)
    return out


class Retention:
    def __init__(self, store: Storage, policy: RetentionPolicy, log_path: Path,
                 key: Ed25519PrivateKey, events: RateLimitedLog) -> None:
        self.store, self.policy, self.log_path, self.key = store, policy, log_path, key
        self.events = events
        self.deleted = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.pass_once)
            except OSError as exc:  # a full disk must not stop the receiver; try next time
                self.events.log(logging.ERROR, "retention", "retention pass failed: %r", exc)
            await asyncio.sleep(self.policy.interval_s)

    def pass_once(self, now_ns: int | None = None) -> int:
        """One bounded pass over every device; returns how many segments it deleted."""
        now_ns = now_ns or time.time_ns()
        cutoff = now_ns - int(self.policy.keep_days * DAY_NS)
        holds = self.store.holds()
        held_devices = {h["device"] for h in holds if h["session"] is None}
        deleted = 0
        for device in self.store.devices():
            if device in held_devices:
                continue
            sessions = {h["session"] for h in holds if h["device"] == device and h["session"]}
            cands = self.store.retention_candidates(device, self.policy.batch)
            for run in plan(cands, cutoff, sessions):
                append_entry(self.log_path, self.key, device=device, first_seq=run[0].seq,
                             header_sha256=[c.header_sha256 for c in run],
                             session=run[0].session,
                             reason=f"retention: {self.policy.keep_days:g} days after the "
                                    "session", utc_ns=time.time_ns(),
                             receiver=self.store.receiver_id)
                self.store.delete_segments(device, [c.seq for c in run])
                deleted += len(run)
        if deleted:
            log.info("retention deleted %d segments (deletion log %s)", deleted, self.log_path)
        self.deleted += deleted
        return deleted


HOLDS = web.AppKey("holds_store", object)


async def _get_holds(request: web.Request) -> web.Response:
    store: Any = request.app[HOLDS]
    return web.json_response({"holds": await asyncio.to_thread(store.holds)})


async def _post_hold(request: web.Request) -> web.Response:
    """{"device", "session"?: str|null, "held": bool, "note"?: str}"""
    store: Any = request.app[HOLDS]
    try:
        body = safejson.loads(await request.content.read(16 * 1024 + 1))
        device, session = body["device"], body.get("session")
        held, note = bool(body.get("held", True)), str(body.get("note", ""))
        if not isinstance(device, str) or not (session is None or isinstance(session, str)):
            raise TypeError("device must be a string, session a string or null")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return web.json_response({"error": "bad_request", "detail": repr(exc)[:300]},
                                 status=400)
    await asyncio.to_thread(store.set_hold, device, session, held, note)
    return web.json_response({"device": device, "session": session, "held": held})


def add_admin_routes(app: web.Application, store: Storage) -> None:
    app[HOLDS] = store
    app.router.add_get("/admin/holds", _get_holds)
    app.router.add_post("/admin/holds", _post_hold)
