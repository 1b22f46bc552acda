"""Certificate renewal in the uplink's background: before the client certificate runs out
(under RENEW_DAYS left), the box sends a new CSR for its TLS key over its mutual-TLS connection
(`POST /v1/devices/{id}/renew`), checks the answer like enroll.py does, writes it in place and
loads it into the uplink's TLS context, so the next connection presents it. The receiver closes
the old certificate's connections when it answers, so none keeps using it.

The TLS key is kept: only the certificate file changes, so there is no moment with a key and a
certificate that do not match. A failure (receiver down, refusal) is logged and tried again an
hour later; the old certificate keeps working until it expires.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from dualrec.config import UplinkSection
from dualrec.enroll import EnrollFailed, accept_certificate, csr_pem, tls_key

log = logging.getLogger("dualrec.renew")

RENEW_DAYS = 30.0  # certificates last 90 days (the receiver's default)
CHECK_S = 3600.0


def days_left(cert_path: Path, now: dt.datetime | None = None) -> float:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = now or dt.datetime.now(dt.UTC)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def renew(cfg: UplinkSection, device: str, ctx: ssl.SSLContext,
          transport: httpx.BaseTransport | None = None) -> x509.Certificate:
    """Renew now: the new certificate is written to cfg.cert and loaded into ctx."""
    key: ec.EllipticCurvePrivateKey = tls_key(cfg.key)
    url = cfg.url.rstrip("/") + f"/v1/devices/{device}/renew"
    with httpx.Client(verify=ctx, timeout=cfg.timeout_s, transport=transport) as client:
        r = client.post(url, json={"csr_pem": csr_pem(key, device)})
    if r.status_code != 200:
        raise EnrollFailed(f"renewal refused: HTTP {r.status_code} {r.text[:200]}")
    cert = accept_certificate(r, cfg.ca, key, device, cfg.cert)
    ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    return cert


def renew_if_due(cfg: UplinkSection, device: str, ctx: ssl.SSLContext,
                 renew_days: float = RENEW_DAYS,
                 transport: httpx.BaseTransport | None = None) -> bool:
    """Renew if under renew_days are left; True if it did."""
    left = days_left(cfg.cert)
    if left >= renew_days:
        return False
    cert = renew(cfg, device, ctx, transport)
    log.info("client certificate renewed (%.1f days were left), now valid until %s", left,
             cert.not_valid_after_utc.strftime("%Y-%m-%d"))
    return True


def run(stop: threading.Event, cfg: UplinkSection, device: str, ctx: ssl.SSLContext,
        transport: httpx.BaseTransport | None = None, every_s: float = CHECK_S) -> None:
    """The renewal thread's body: check now, then every `every_s`, until stop is set."""
    while not stop.is_set():
        try:
            renew_if_due(cfg, device, ctx, transport=transport)
        except Exception as exc:  # any type: this thread must never die
            log.warning("certificate renewal failed (%s: %s); trying again in %.0f s",
                        type(exc).__name__, exc, every_s)
        stop.wait(every_s)
