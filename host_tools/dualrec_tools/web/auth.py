"""Login sessions, CSRF tokens and the login rate limit.

A login session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure when the
service speaks TLS) naming server-side state: the account, its CSRF token, its unmasked
sessions. Every POST must carry the session's CSRF token (form field `csrf` or header
X-CSRF-Token); the login form carries a pre-login token bound to a cookie the same way. Every
route but the login page needs a session (the middleware in app.py). Failed logins are limited
per client address and per account name within a sliding window; past it, 429 until it slides.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from dualrec_tools.web.accounts import Account

COOKIE = "dualrec_web"
PRE_COOKIE = "dualrec_web_login"
IDLE_S = 30 * 60
ABSOLUTE_S = 12 * 3600


@dataclass
class LoginSession:
    account: Account
    csrf: str
    created: float
    seen: float
    # (device, session) -> monotonic time until which the viewer sees it unmasked
    unmasked: dict[tuple[str, str], float] = field(default_factory=dict)

    def is_unmasked(self, device: str, session: str) -> bool:
        until = self.unmasked.get((device, session))
        return until is not None and time.monotonic() < until


class Sessions:
    def __init__(self) -> None:
        self._by_token: dict[str, LoginSession] = {}

    def create(self, account: Account) -> tuple[str, LoginSession]:
        now = time.monotonic()
        if len(self._by_token) >= 1000:  # expired ones go only when looked up: bound them here
            for token in [t for t, s in self._by_token.items()
                          if now - s.seen > IDLE_S or now - s.created > ABSOLUTE_S]:
                del self._by_token[token]
        token = secrets.token_urlsafe(32)
        s = LoginSession(account, secrets.token_urlsafe(32), now, now)
        self._by_token[token] = s
        return token, s

    def get(self, token: str | None) -> LoginSession | None:
        if not token:
            return None
        s = self._by_token.get(token)
        now = time.monotonic()
        if s is None:
            return None
        if now - s.seen > IDLE_S or now - s.created > ABSOLUTE_S:
            del self._by_token[token]
            return None
        s.seen = now
        return s

    def drop(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class LoginLimiter:
    """At most `per_name` failures per account name and `per_address` per client address in
    `window_s`; a success does not clear them (an attacker who guessed one gains no retries)."""

    def __init__(self, per_name: int = 5, per_address: int = 20,
                 window_s: float = 300.0) -> None:
        self.per_name, self.per_address, self.window_s = per_name, per_address, window_s
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        cutoff = time.monotonic() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, name: str, address: str) -> bool:
        return (len(self._recent("n:" + name)) >= self.per_name
                or len(self._recent("a:" + address)) >= self.per_address)

    def failed(self, name: str, address: str) -> None:
        for key in ("n:" + name, "a:" + address):
            self._recent(key).append(time.monotonic())
        if len(self._fails) > 10_000:  # bounded whatever names an attacker tries
            for key in [k for k, q in self._fails.items() if not q][:5_000]:
                del self._fails[key]
