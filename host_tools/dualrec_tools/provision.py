"""Provisioning: give a device its identity and configuration, and enroll it at the receiver.

Writes, into the device's directory: device.key/.pub (Ed25519, segment signatures), tls.key/.crt
(its TLS client certificate, CN = device id, issued by the branch CA), ca.crt and receipt.pub (the
branch CA and receipt key it pins) and site.toml (device, recipients, spool, uplink). Enrollment
tells the receiver the device's two public identities, through its admin API or its data
directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from dualrec_tools.keys import (
    PUBLIC_MODE,
    SECRET_MODE,
    refuse_existing,
    write_device_key,
    write_file,
)
from dualrec_tools.pki import cert_pem, issue, key_pem, load_ca


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    site: Path
    device_pub: Path
    cert: Path


def provision(branch: Path, device_id: str, receiver_url: str, out: Path, *,
              oplog_port: str = "", bandwidth_bps: int | None = None, site_extra: str = "",
              state_dir: str = "", force: bool = False) -> Provisioned:
    """Write the device's files into `out`. `state_dir` is where the box keeps its spool and
    chain state (on a box: /var/lib/dualrec, the service's StateDirectory); empty: next to
    site.toml, relative to it (the simulator and tests)."""
    refuse_existing([out / n for n in ("device.key", "tls.key", "site.toml")], force)
    ca_key, ca_cert = load_ca(branch)
    recipient = (branch / "branch.recipient").read_text().strip()
    pub = write_device_key(out, device_id, force=True)
    tls_key, tls_cert = issue(ca_key, ca_cert, device_id, client=True)
    write_file(out / "tls.key", key_pem(tls_key), SECRET_MODE)
    write_file(out / "tls.crt", cert_pem(tls_cert), PUBLIC_MODE)
    write_file(out / "ca.crt", (branch / "ca.crt").read_bytes(), PUBLIC_MODE)
    write_file(out / "receipt.pub", (branch / "receipt.pub").read_bytes(), PUBLIC_MODE)
    bandwidth = f"bandwidth_bps = {bandwidth_bps}\n" if bandwidth_bps else ""
    root = state_dir.rstrip("/") + "/" if state_dir else ""
    site = out / "site.toml"
    write_file(site, f"""# written by dualrec-tool provision
[device]
id = "{device_id}"
key = "device.key"

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
cert = "tls.crt"
key = "tls.key"
receipt_key = "receipt.pub"
{bandwidth}{site_extra}""".encode(), SECRET_MODE)
    return Provisioned(out, site, pub, out / "tls.crt")


def enroll_via_admin(admin_url: str, device: Provisioned, device_id: str) -> None:
    """POST the device's public identities to the receiver's admin API (loopback listener)."""
    r = httpx.post(f"{admin_url.rstrip('/')}/admin/devices", timeout=10, json={
        "device": device_id,
        "signing_key_pem": device.device_pub.read_text(),
        "cert_pem": device.cert.read_text(),
    })
    if r.status_code != 200:
        raise RuntimeError(f"receiver refused enrollment: HTTP {r.status_code} {r.text[:200]}")


def enroll_in_data_dir(data_dir: Path, device: Provisioned, device_id: str) -> None:
    """Enroll by writing to the receiver's index directly (receiver on this machine)."""
    from dualrec_tools.receiver.store import ReceiverStore

    store = ReceiverStore(data_dir)
    try:
        store.enroll(device_id, device.device_pub.read_bytes(), device.cert.read_bytes())
    finally:
        store.close()
