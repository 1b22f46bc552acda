"""The box's identity, born on the box: `dualrec enroll` on the first boot.

It makes the device's Ed25519 signing key and its ECDSA P-256 TLS key where the site config says
([device] key, [uplink] key; 0600, in a 0700 directory it creates), sends a certificate request
(CSR, CN = device id) with the signing public key and the single-use token of the provisioning
bundle (enroll.json beside site.toml) to the receiver's enrollment API, over TLS that pins the
branch CA ([uplink] ca; server authentication only: the box has no client certificate yet), and
writes the certificate it gets back ([uplink] cert) once it has checked it: issued by the branch
CA, for this device, for the key it just made.

Run again, it changes nothing: keys that exist are kept (a new signing key would orphan what the
box sealed), and a valid certificate for them means "already enrolled". Renewal before expiry is
renew.py's work, over the mutual-TLS upload connection.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from dualrec.config import SiteConfig

BUNDLE_FILE = "enroll.json"
DEVICE_LABEL = "dualrec-device:"  # the label line of device.pub (dualrec_tools.verify)
EX_UNREACHABLE = 75  # EX_TEMPFAIL: try again later (the network or the receiver is not up)
RETRY_S = 5.0


class EnrollFailed(Exception):
    """The receiver refused (`word` is its error word), or its answer cannot be used."""

    def __init__(self, message: str, word: str = "") -> None:
        super().__init__(message)
        self.word = word


class Unreachable(Exception):
    """No answer from the receiver within the wait."""


@dataclass(frozen=True)
class Bundle:
    """enroll.json, written by `dualrec-tool provision`."""

    device: str
    branch: str  # SHA-256 of the branch CA certificate
    enroll_url: str  # https://HOST:PORT of the receiver's enrollment API
    token: str

    @classmethod
    def load(cls, path: Path) -> Bundle:
        try:
            raw = json.loads(path.read_text())
            return cls(str(raw["device"]), str(raw["branch"]), str(raw["enroll_url"]),
                       str(raw["token"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EnrollFailed(f"{path}: not a provisioning bundle's enroll.json ({exc})") \
                from None


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically, with exactly `mode`, in a directory made 0700 if it is new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pkcs8(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def signing_key(path: Path, device: str) -> Ed25519PrivateKey:
    """The device's signing key, made (with device.pub beside it) if there is none yet."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, Ed25519PrivateKey):
            raise EnrollFailed(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private(path, _pkcs8(key))
    write_private(path.with_suffix(".pub"), public_pem(key, device), 0o644)
    return key


def public_pem(key: Ed25519PrivateKey, device: str) -> bytes:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"{DEVICE_LABEL} {device}\n".encode() + pem


def tls_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollFailed(f"{path} is not an ECDSA key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())  # what the receiver's TLS suites expect
    write_private(path, _pkcs8(key))
    return key


def csr_pem(key: ec.EllipticCurvePrivateKey, device: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_cert(pem: bytes, ca_path: Path, key: ec.EllipticCurvePrivateKey,
               device: str) -> x509.Certificate:
    """The certificate the receiver answered, checked before it is written."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollFailed(f"the receiver's certificate does not check out ({exc!r})") \
            from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if names != [device] or cert.public_key().public_bytes(der, spki) != \
            key.public_key().public_bytes(der, spki):
        raise EnrollFailed("the receiver's certificate is not for this device and key")
    return cert


def valid_cert(path: Path, ca_path: Path, key: ec.EllipticCurvePrivateKey,
               device: str) -> x509.Certificate | None:
    """The certificate at path if it is this box's, from the branch CA and not expired."""
    try:
        cert = check_cert(path.read_bytes(), ca_path, key, device)
    except (OSError, EnrollFailed):
        return None
    return cert if cert.not_valid_after_utc > dt.datetime.now(dt.UTC) else None


def server_context(ca: Path) -> ssl.SSLContext:
    """TLS 1.2+, the branch CA pinned (no system store), no client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


@dataclass(frozen=True)
class Enrolled:
    cert: Path
    not_after: dt.datetime
    already: bool  # nothing was sent: the box was enrolled


def enroll(site: SiteConfig, bundle: Bundle, *, wait_s: float = 0.0,
           transport: httpx.BaseTransport | None = None) -> Enrolled:
    """Enroll this box (see the module docstring). Retries connection failures for wait_s
    seconds (the network may come up after the first-boot hook starts); a refusal is final."""
    if site.uplink is None:
        raise EnrollFailed("the site config has no [uplink]: nothing to enroll with")
    up, device = site.uplink, site.device.id
    if bundle.device != device:
        raise EnrollFailed(f"the bundle is for {bundle.device}, the site config for {device}")
    sign = signing_key(site.device.key, device)
    key = tls_key(up.key)
    have = valid_cert(up.cert, up.ca, key, device)
    if have is not None:
        return Enrolled(up.cert, have.not_valid_after_utc, already=True)
    body = {"device": device, "branch": bundle.branch, "token": bundle.token,
            "csr_pem": csr_pem(key, device),
            "signing_key_pem": public_pem(sign, device).decode()}
    url = bundle.enroll_url.rstrip("/") + "/v1/enroll"
    deadline = time.monotonic() + wait_s
    with httpx.Client(verify=server_context(up.ca), timeout=up.timeout_s,
                      transport=transport) as client:
        while True:
            try:
                r = client.post(url, json=body)
                break
            except httpx.TransportError as exc:
                if time.monotonic() + RETRY_S > deadline:
                    raise Unreachable(f"{url}: {exc}") from None
                time.sleep(RETRY_S)
    if r.status_code != 200:
        try:
            word, detail = r.json().get("error", ""), r.json().get("detail", "")
        except ValueError:
            word, detail = "", r.text[:200]
        raise EnrollFailed(f"the receiver refused: HTTP {r.status_code} {word}: {detail}", word)
    cert = accept_certificate(r, up.ca, key, device, up.cert)
    return Enrolled(up.cert, cert.not_valid_after_utc, already=False)


def accept_certificate(r: httpx.Response, ca: Path, key: ec.EllipticCurvePrivateKey,
                       device: str, path: Path) -> x509.Certificate:
    """The certificate in an enrollment or renewal answer, checked (issued by the branch CA,
    for this key and device) and written to path."""
    try:
        pem = str(r.json()["cert_pem"]).encode()
    except (ValueError, KeyError, TypeError):
        raise EnrollFailed("the receiver's answer holds no certificate") from None
    cert = check_cert(pem, ca, key, device)
    write_private(path, pem, 0o644)
    return cert
