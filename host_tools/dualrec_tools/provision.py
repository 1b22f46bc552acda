"""Provisioning on the technician's PC: a box's bundle, never its keys.

The bundle (the directory `dualrec-tool image --bundle` puts on the card, copied to /etc/dualrec
on the first boot) holds:

- site.toml: device, recipients, spool, uplink; the key and certificate paths point to where
  `dualrec enroll` will make them on the box (the state directory, writable by the service);
- ca.crt: the branch CA the box pins; receipt.pub: the receiver's receipt key;
- enroll.json (0600): device, branch (SHA-256 of ca.crt), enroll_url and a single-use, expiring
  enrollment token bound to the device and branch, minted by the receiver (its admin API, or
  `dualrec-receiver enroll-token` on the receiver host).

No private key is made here and none is written into the bundle; ca.key stays on the receiver
host, whose issuing CA signs the box's certificate request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from dualrec_tools.keys import DEVICE_ID, PUBLIC_MODE, SECRET_MODE, refuse_existing, write_file
from dualrec_tools.receiver.enrollment import branch_id

ENROLL_PORT = 8445  # dualrec-receiver serve --enroll-listen's default port
BUNDLE_FILES = ("site.toml", "ca.crt", "receipt.pub", "enroll.json")
PRIVATE = ("device.key", "tls.key", "ca.key", "receipt.key", "branch.agekey")


class ProvisionError(RuntimeError):
    """The bundle cannot be made (a refused token request, a token of another branch...)."""


@dataclass(frozen=True)
class Bundle:
    directory: Path
    site: Path
    enroll_json: Path


def admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _admin_post(admin_url: str, token: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{admin_url.rstrip('/')}{path}", json=body, headers=admin_headers(token),
                   timeout=10)
    if r.status_code != 200:
        raise ProvisionError(f"the receiver refused: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


def request_token(admin_url: str, admin_token: str, device_id: str, *, replace: bool = False,
                  ttl_s: int | None = None) -> dict[str, Any]:
    """Mint an enrollment token through the admin API: {device, branch, token, expires...}."""
    body: dict[str, Any] = {"device": device_id, "replace": replace}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return _admin_post(admin_url, admin_token, "/admin/enrollment-tokens", body)


def revoke(admin_url: str, admin_token: str, device_id: str, reason: str = "") -> str:
    """Revoke the device's certificate through the admin API; its SHA-256."""
    answer = _admin_post(admin_url, admin_token, f"/admin/devices/{device_id}/revoke",
                         {"reason": reason})
    return str(answer["revoked_cert_sha256"])


def default_enroll_url(receiver_url: str) -> str:
    parts = urlsplit(receiver_url)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return f"https://{host}:{ENROLL_PORT}"


def key_paths(state_dir: str) -> tuple[str, str, str]:
    """Where the box keeps the keys it makes: device.key, tls.key, tls.crt. Under the state
    directory on a box (the service may write there, renewal rewrites tls.crt); empty: next to
    site.toml (the simulator and tests)."""
    root = state_dir.rstrip("/") + "/keys/" if state_dir else ""
    return f"{root}device.key", f"{root}tls.key", f"{root}tls.crt"


def write_site(branch: Path, device_id: str, receiver_url: str, out: Path, *,
               oplog_port: str = "", bandwidth_bps: int | None = None, site_extra: str = "",
               state_dir: str = "", keys_in_state: bool = True) -> Path:
    """site.toml, ca.crt and receipt.pub into out (public files only). keys_in_state=False
    keeps the key paths next to site.toml whatever state_dir says (localbox.py)."""
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"device id {device_id!r}: letters, digits, '_', '.', '-'; at most "
                         "64; starting with a letter or digit")
    out.mkdir(parents=True, exist_ok=True)
    recipient = (branch / "branch.recipient").read_text().strip()
    write_file(out / "ca.crt", (branch / "ca.crt").read_bytes(), PUBLIC_MODE)
    write_file(out / "receipt.pub", (branch / "receipt.pub").read_bytes(), PUBLIC_MODE)
    device_key, tls_key, tls_crt = key_paths(state_dir if keys_in_state else "")
    bandwidth = f"bandwidth_bps = {bandwidth_bps}\n" if bandwidth_bps else ""
    root = state_dir.rstrip("/") + "/" if state_dir else ""
    site = out / "site.toml"
    write_file(site, f"""# written by dualrec-tool provision; `dualrec enroll` makes the keys
[device]
id = "{device_id}"
key = "{device_key}"

[oplog]
port = "{oplog_port}"

[seal]
recipients = ["{recipient}"]

[spool]
dir = "{root}spool"
state = "{root}state/state.db"

[uplink]
url = "{receiver_url}"
ca = "ca.crt"
cert = "{tls_crt}"
key = "{tls_key}"
receipt_key = "receipt.pub"
{bandwidth}{site_extra}""".encode(), SECRET_MODE)
    return site


def check_out(out: Path, force: bool) -> None:
    """Refuse a bundle directory holding private keys (a box's, a branch's), or a bundle
    already (unless force); checked before a token is asked for, so none is minted in vain."""
    private = [str(out / p) for p in PRIVATE if (out / p).exists()]
    if private:
        raise ProvisionError(f"{', '.join(private)}: private keys do not belong in a bundle; "
                             "remove them first")
    refuse_existing([out / "site.toml", out / "enroll.json"], force)


def make_bundle(branch: Path, device_id: str, receiver_url: str, out: Path,
                token: dict[str, Any], *, enroll_url: str | None = None, oplog_port: str = "",
                bandwidth_bps: int | None = None, site_extra: str = "", state_dir: str = "",
                force: bool = False) -> Bundle:
    """Write the bundle into out. `token` is the receiver's answer (request_token, or the JSON
    of `dualrec-receiver enroll-token`); branch needs ca.crt, receipt.pub, branch.recipient."""
    check_out(out, force)
    if token.get("device") != device_id:
        raise ProvisionError(f"the token is for {token.get('device')!r}, not {device_id!r}")
    branch_sha = branch_id(x509.load_pem_x509_certificate((branch / "ca.crt").read_bytes()))
    if token.get("branch") != branch_sha:
        raise ProvisionError("the token was minted by the receiver of another branch (its CA "
                             f"is not {branch / 'ca.crt'})")
    site = write_site(branch, device_id, receiver_url, out, oplog_port=oplog_port,
                      bandwidth_bps=bandwidth_bps, site_extra=site_extra, state_dir=state_dir)
    enroll_json = out / "enroll.json"
    write_file(enroll_json, (json.dumps({
        "device": device_id, "branch": branch_sha, "token": token["token"],
        "enroll_url": enroll_url or default_enroll_url(receiver_url),
        "expires_utc_ns": token.get("expires_utc_ns")}, indent=1) + "\n").encode(), SECRET_MODE)
    return Bundle(out, site, enroll_json)
