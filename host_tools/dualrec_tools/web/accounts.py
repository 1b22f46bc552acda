"""Local accounts of the web service: name, role (`it` or `auditor`), the `can-unmask`
permission, and an argon2id password hash (argon2-cffi's defaults, RFC 9106's second
recommended parameter set). Kept in the service's own SQLite file (state/web.db, 0600), never in
the receiver's data directory.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ROLES = ("it", "auditor")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 10
_hasher = PasswordHasher()
# Verified against when the name is unknown, so a wrong name costs as long as a wrong password
# (no telling which names exist from the response time).
_DUMMY = _hasher.hash("not a password of anyone")


class AccountError(ValueError):
    """The account cannot be created or changed; the message says why."""


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    can_unmask: bool


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, role TEXT NOT NULL,"
               " can_unmask INTEGER NOT NULL, hash TEXT NOT NULL)")
    return db


class Accounts:
    def __init__(self, path: Path) -> None:
        self.path = path
        _open(path).close()

    def add(self, name: str, role: str, password: str, *, can_unmask: bool = False,
            replace: bool = False) -> Account:
        if not NAME.match(name):
            raise AccountError(f"{name!r}: a name is letters, digits and _.@- (64 at most)")
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"a password has at least {MIN_PASSWORD} characters")
        db = _open(self.path)
        try:
            verb = "INSERT OR REPLACE" if replace else "INSERT"
            db.execute(f"{verb} INTO accounts VALUES (?, ?, ?, ?)",
                       (name, role, int(can_unmask), _hasher.hash(password)))
        except sqlite3.IntegrityError:
            raise AccountError(f"{name} exists (--replace to change it)") from None
        finally:
            db.close()
        return Account(name, role, can_unmask)

    def remove(self, name: str) -> bool:
        db = _open(self.path)
        try:
            return db.execute("DELETE FROM accounts WHERE name=?", (name,)).rowcount > 0
        finally:
            db.close()

    def list(self) -> list[Account]:
        db = _open(self.path)
        try:
            return [Account(r[0], r[1], bool(r[2])) for r in
                    db.execute("SELECT name, role, can_unmask FROM accounts ORDER BY name")]
        finally:
            db.close()

    def check(self, name: str, password: str) -> Account | None:
        """The account if the password is right, else None (same cost either way)."""
        db = _open(self.path)
        try:
            row = db.execute("SELECT name, role, can_unmask, hash FROM accounts WHERE name=?",
                             (name,)).fetchone()
        finally:
            db.close()
        try:
            _hasher.verify(row[3] if row else _DUMMY, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return Account(row[0], row[1], bool(row[2])) if row else None
