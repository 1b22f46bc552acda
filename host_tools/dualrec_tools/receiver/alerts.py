"""Alerts for sites without Prometheus: the receiver evaluates the conditions of alerts.yml
itself every interval and POSTs JSON to a configured webhook on each transition (firing,
resolved), with bounded retries. The same constants as alerts.yml (opening hours, 5 minutes
silent, 30 days of certificate) so both agree on when a box is in trouble.

Body: {"alert": NAME, "device": ID, "status": "firing"|"resolved", "summary": TEXT,
"utc_ns": N, "receiver": ID}. Only device ids and figures: no customer data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from dualrec_tools.receiver.ratelog import RateLimitedLog
from dualrec_tools.receiver.storage import DeviceFigures, Storage

log = logging.getLogger("dualrec.receiver")

# 08:00-18:00 UTC, Monday (0) to Saturday (5): alerts.yml's dualrec:opening_hours.
OPENING_HOURS = (8, 18, frozenset(range(6)))


@dataclass(frozen=True)
class AlertConfig:
    webhook_url: str
    interval_s: float = 30.0
    silent_s: float = 300.0
    cert_days: float = 30.0
    fork_window_s: float = 3600.0
    opening_hours: tuple[int, int, frozenset[int]] = OPENING_HOURS
    retries: int = 3  # attempts per transition, then it is dropped (and logged)
    timeout_s: float = 5.0
    backoff_s: float = 1.0


def is_open(now_s: float, hours: tuple[int, int, frozenset[int]]) -> bool:
    t = dt.datetime.fromtimestamp(now_s, dt.UTC)
    return hours[0] <= t.hour < hours[1] and t.weekday() in hours[2]


@dataclass
class _ForkMemory:
    counts: dict[str, int] = field(default_factory=dict)
    last_rise: dict[str, float] = field(default_factory=dict)


def evaluate(figures: list[DeviceFigures], now_s: float, cfg: AlertConfig,
             forks: _ForkMemory) -> dict[tuple[str, str], str]:
    """(alert, device) -> summary for every alert firing now."""
    out: dict[tuple[str, str], str] = {}
    open_now = is_open(now_s, cfg.opening_hours)
    for f in figures:
        d = f.device
        if open_now and f.last_contact_ns is not None and \
                now_s - f.last_contact_ns / 1e9 > cfg.silent_s:
            out["DualrecBoxSilent", d] = f"Box {d} silent for more than " \
                                         f"{cfg.silent_s / 60:g} minutes during opening hours"
        if f.missing > 0:
            out["DualrecChainGap", d] = f"Box {d}: {f.missing} segments missing below the newest"
        prev = forks.counts.get(d)  # forks from before the receiver started do not fire
        if prev is not None and f.forks > prev:
            forks.last_rise[d] = now_s
        forks.counts[d] = f.forks
        if now_s - forks.last_rise.get(d, -1e18) < cfg.fork_window_s:
            out["DualrecChainFork", d] = f"Box {d} offered a forked or mislinked segment"
        if f.clock_synced is False:
            out["DualrecClockUnsynced", d] = f"Box {d} records with an unsynced clock"
        if f.cert_not_after_ns is not None and \
                f.cert_not_after_ns / 1e9 - now_s < cfg.cert_days * 86400:
            out["DualrecCertificateExpiring", d] = f"Box {d}: client certificate expires " \
                                                   f"within {cfg.cert_days:g} days"
    return out


Post = Callable[[dict[str, object]], Awaitable[bool]]


class Alerter:
    def __init__(self, store: Storage, cfg: AlertConfig, events: RateLimitedLog,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.cfg, self.events, self.clock = store, cfg, events, clock
        self.firing: dict[tuple[str, str], str] = {}
        self.forks = _ForkMemory()
        self.sent = 0
        self.failed = 0

    async def run(self) -> None:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)) as session:
            while True:
                await self.step(lambda body: self._post(session, body))
                await asyncio.sleep(self.cfg.interval_s)

    async def step(self, post: Post) -> None:
        figures = await asyncio.to_thread(self.store.figures)
        now = self.clock()
        firing = evaluate(figures, now, self.cfg, self.forks)
        changes = [(k, s, "firing") for k, s in firing.items() if k not in self.firing]
        changes += [(k, s, "resolved") for k, s in self.firing.items() if k not in firing]
        self.firing = firing
        for (alert, device), summary, status in changes:
            body = {"alert": alert, "device": device, "status": status, "summary": summary,
                    "utc_ns": int(now * 1e9), "receiver": self.store.receiver_id}
            if await self._deliver(post, body):
                self.sent += 1
            else:
                self.failed += 1

    async def _deliver(self, post: Post, body: dict[str, object]) -> bool:
        for attempt in range(self.cfg.retries):
            if await post(body):
                return True
            if attempt + 1 < self.cfg.retries:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** attempt)
        self.events.log(logging.WARNING, "webhook_failed", "alert webhook: %s %s for %s not "
                        "delivered after %d attempts", body["alert"], body["status"],
                        body["device"], self.cfg.retries)
        return False

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, object]) -> bool:
        try:
            async with session.post(self.cfg.webhook_url, data=json.dumps(body),
                                    headers={"Content-Type": "application/json"}) as r:
                return 200 <= r.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
