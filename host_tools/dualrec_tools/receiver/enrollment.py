"""Enrollment bookkeeping at the receiver: single-use enrollment tokens, admin tokens, revoked
certificates, the issuing CA and the append-only audit log.

Tokens are never stored, only their SHA-256: a copy of enrollment.db (or a backup of it) lets
nobody enroll a box or act as an admin. An enrollment token is bound to one device id and to the
branch (the SHA-256 of the branch CA certificate, so a bundle made for another branch is refused
even if its token were known here), expires, and is claimed in one UPDATE, so two requests racing
with the same token cannot both enroll.

enrollment.db is separate from receiver.db (the store's index, storage.Storage): the store stays
the place evidence is kept; this is who may join. The enrollment sequence is claim token ->
issue -> store.enroll -> finish; a failure after the claim releases it, a crash there leaves a
used token and no enrollment (the safe side: the admin mints a new one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dualrec_tools.pki import cert_pem, device_id_of

DB_NAME = "enrollment.db"
AUDIT_NAME = "audit.jsonl"
CERT_DAYS = 90  # client certificates are short-lived; boxes renew under RENEW_DAYS left
DEFAULT_TOKEN_TTL_S = 7 * 24 * 3600  # a week between provisioning and the box's first boot
MAX_TOKEN_TTL_S = 90 * 24 * 3600
ADMIN_PREFIX = "dra_"  # makes an admin token recognisable in a leaked log or file
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_sha256 TEXT PRIMARY KEY, device TEXT NOT NULL, branch TEXT NOT NULL,
    replace_ok INTEGER NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    minted_by TEXT NOT NULL, used_at INTEGER, cert_sha256 TEXT);
CREATE TABLE IF NOT EXISTS admin_tokens (
    token_sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (
    cert_sha256 TEXT PRIMARY KEY, device TEXT NOT NULL, at INTEGER NOT NULL, by TEXT NOT NULL,
    reason TEXT NOT NULL);
"""


class EnrollRefused(Exception):
    """A request the receiver will not act on; `word` is the error word answered."""

    def __init__(self, word: str, detail: str, status: int = 403) -> None:
        super().__init__(detail)
        self.word, self.status = word, status


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def branch_id(ca_cert: x509.Certificate) -> str:
    """The branch's identity in tokens and bundles: SHA-256 of its CA certificate (DER)."""
    return sha256_hex(ca_cert.public_bytes(serialization.Encoding.DER))


def fingerprint(cert: x509.Certificate) -> str:
    return sha256_hex(cert.public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class Token:
    token_sha256: str
    device: str
    branch: str
    replace_ok: bool
    expires_at: int
    used_at: int | None


class EnrollmentBook:
    """enrollment.db (0600) in the receiver's data directory, usable from several processes
    (the serving receiver and `dualrec-receiver` commands): every check reads the database."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        path = data_dir / DB_NAME
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.audit = AuditLog(data_dir / AUDIT_NAME)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EnrollmentBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _change(self, sql: str, *args: Any) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    # -- enrollment tokens -------------------------------------------------------------------

    def mint(self, device: str, branch: str, *, ttl_s: int = DEFAULT_TOKEN_TTL_S,
             replace_ok: bool = False, by: str) -> tuple[str, int]:
        """A new token for `device` at `branch`; returns (token, expiry in UTC ns). The token
        itself exists only in the answer."""
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise EnrollRefused("bad_request", f"ttl_s must be 1..{MAX_TOKEN_TTL_S}", 400)
        token = secrets.token_urlsafe(32)
        now = time.time_ns()
        expires = now + ttl_s * 1_000_000_000
        self._change("INSERT INTO tokens (token_sha256, device, branch, replace_ok, created_at, "
                     "expires_at, minted_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     sha256_hex(token.encode()), device, branch, int(replace_ok), now, expires,
                     by)
        self.audit.write(by, "mint_token", device, detail=f"expires {_iso(expires)}"
                         + (", replaces the enrolled keys" if replace_ok else ""))
        return token, expires

    def token(self, token: str) -> Token | None:
        row = self._one("SELECT token_sha256, device, branch, replace_ok, expires_at, used_at "
                        "FROM tokens WHERE token_sha256=?", sha256_hex(token.encode()))
        return Token(row[0], row[1], row[2], bool(row[3]), row[4], row[5]) if row else None

    def check(self, token: str, device: str, branch: str, own_branch: str) -> Token:
        """The token's row if it may enroll `device` at this branch now; EnrollRefused (with
        nothing changed) otherwise."""
        row = self.token(token)
        if row is None:
            raise EnrollRefused("bad_token", "unknown enrollment token")
        if row.used_at is not None:
            raise EnrollRefused("token_used", "this enrollment token was used already")
        if row.expires_at <= time.time_ns():
            raise EnrollRefused("token_expired", f"the token expired at {_iso(row.expires_at)}")
        if row.device != device:
            raise EnrollRefused("wrong_device", f"the token is for another device, not {device}")
        if row.branch != branch or branch != own_branch:
            raise EnrollRefused("wrong_branch", "the token or bundle is for another branch")
        return row

    def claim(self, row: Token) -> bool:
        """Mark the token used; False if another request got there first."""
        return self._change("UPDATE tokens SET used_at=? WHERE token_sha256=? AND used_at IS "
                            "NULL", time.time_ns(), row.token_sha256) == 1

    def release(self, row: Token) -> None:
        self._change("UPDATE tokens SET used_at=NULL WHERE token_sha256=? AND cert_sha256 IS "
                     "NULL", row.token_sha256)

    def finish(self, row: Token, cert_sha256: str) -> None:
        self._change("UPDATE tokens SET cert_sha256=? WHERE token_sha256=?", cert_sha256,
                     row.token_sha256)

    def tokens(self) -> list[dict[str, Any]]:
        """Every token's bookkeeping (no token or hash), for tests and status."""
        with self._lock:
            rows = self._db.execute("SELECT device, branch, replace_ok, expires_at, used_at, "
                                    "cert_sha256 FROM tokens ORDER BY created_at").fetchall()
        keys = ("device", "branch", "replace_ok", "expires_at", "used_at", "cert_sha256")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- admin tokens ------------------------------------------------------------------------

    def add_admin_token(self, name: str, by: str = "cli") -> str:
        token = ADMIN_PREFIX + secrets.token_urlsafe(32)
        self._change("INSERT INTO admin_tokens VALUES (?, ?, ?)", sha256_hex(token.encode()),
                     name, time.time_ns())
        self.audit.write(by, "admin_token", None, detail=f"new admin token for {name!r}")
        return token

    def admin_name(self, token: str) -> str | None:
        row = self._one("SELECT name FROM admin_tokens WHERE token_sha256=?",
                        sha256_hex(token.encode()))
        return str(row[0]) if row else None

    # -- revocation --------------------------------------------------------------------------

    def revoke(self, cert_sha256: str, device: str, by: str, reason: str = "") -> None:
        self._change("INSERT OR IGNORE INTO revoked VALUES (?, ?, ?, ?, ?)", cert_sha256, device,
                     time.time_ns(), by, reason[:200])
        self.audit.write(by, "revoke", device, cert_sha256, detail=reason[:200])

    def is_revoked(self, cert_sha256: str) -> bool:
        # A primary-key lookup (microseconds) on every request: a revocation made by the CLI in
        # another process counts from the next request on, with no cache to go stale.
        return self._one("SELECT 1 FROM revoked WHERE cert_sha256=?", cert_sha256) is not None

    def revoked(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT cert_sha256 FROM revoked ORDER BY at")]


class AuditLog:
    """Append-only JSON lines (who, when, what, device, certificate fingerprint, detail):
    opened O_APPEND for every line and fsynced, so lines of several processes never mix and a
    written line survives a crash. Nothing in the receiver rewrites or truncates it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, who: str, what: str, device: str | None, cert_sha256: str | None = None,
              detail: str = "") -> None:
        line = json.dumps({"at": _iso(time.time_ns()), "who": who, "what": what,
                           "device": device, "cert_sha256": cert_sha256, "detail": detail},
                          ensure_ascii=True, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the issuing CA ------------------------------------------------------------------------------


class Issuer:
    """The branch CA as the receiver uses it: signs device client certificates from CSRs and
    checks that a certificate is one it issued and still valid."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey | None,
                 days: int = CERT_DAYS) -> None:
        self.ca_cert, self.ca_key, self.days = ca_cert, ca_key, days
        self.branch = branch_id(ca_cert)

    @classmethod
    def from_keys_dir(cls, keys: Path, days: int = CERT_DAYS) -> Issuer:
        """ca.crt, and ca.key if present (without it, nothing can be issued here)."""
        ca_cert = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
        key = None
        if (keys / "ca.key").exists():
            loaded = serialization.load_pem_private_key((keys / "ca.key").read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{keys / 'ca.key'} is not an ECDSA key")
            key = loaded
        return cls(ca_cert, key, days)

    @property
    def can_issue(self) -> bool:
        return self.ca_key is not None

    def issue(self, csr_pem: str, device: str) -> x509.Certificate:
        """A client certificate (CN = device, clientAuth, `days` long) for the CSR's key; the
        CSR must be signed by that key and name the device."""
        if self.ca_key is None:
            raise EnrollRefused("no_issuer", "this receiver holds no issuing CA (ca.key)", 503)
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise EnrollRefused("bad_csr", f"not a PEM certificate request ({exc})", 400) \
                from None
        if not csr.is_signature_valid:
            raise EnrollRefused("bad_csr", "the request's signature does not verify", 400)
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [device]:
            raise EnrollRefused("bad_csr", f"the request's CN must be {device!r}", 400)
        key = csr.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey)
                and isinstance(key.curve, ALLOWED_CURVES)):
            raise EnrollRefused("bad_csr", "the request's key must be ECDSA P-256 or P-384", 400)
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dualrec"),
                             x509.NameAttribute(NameOID.COMMON_NAME, device)])
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_cert.subject)
            .public_key(key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )

    def check_client_cert(self, pem: bytes, device: str) -> x509.Certificate:
        """A certificate enrolled by hand (`POST /admin/devices`, `dualrec-receiver enroll`)
        must be one this CA signed, valid now, for client authentication, CN = device."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise EnrollRefused("not_issued", "the certificate was not issued by this branch's "
                                f"CA ({type(exc).__name__})", 400) from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EnrollRefused("expired", "the certificate is not valid now", 400)
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise EnrollRefused("not_client", "the certificate is not for client "
                                "authentication", 400)
        try:
            cn = device_id_of(cert)
        except IndexError:
            cn = None
        if cn != device:
            raise EnrollRefused("device_mismatch", f"the certificate's CN is not {device}", 400)
        return cert


def pem_of(cert: x509.Certificate) -> str:
    return cert_pem(cert).decode()
