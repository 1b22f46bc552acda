"""A box enrolled without a network, for the simulator's offline mode, tests and benches.

It does in one process what a box's first boot and the receiver do together: the box's own key
generation (dualrec.enroll, into the box's directory), its certificate request, and the branch
CA's signature on it (the receiver's Issuer, with the branch directory's ca.key). Nothing here is
part of provisioning a real box: `dualrec-tool provision` makes a bundle and `dualrec enroll`
runs on the box (provision.py, dualrec/enroll.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualrec.config import load_site
from dualrec.enroll import csr_pem, signing_key, tls_key, write_private
from dualrec_tools.keys import refuse_existing
from dualrec_tools.pki import cert_pem
from dualrec_tools.provision import write_site
from dualrec_tools.receiver.enrollment import Issuer


@dataclass(frozen=True)
class Provisioned:
    directory: Path
    site: Path
    device_pub: Path
    cert: Path


def provision(branch: Path, device_id: str, receiver_url: str, out: Path, *,
              oplog_port: str = "", bandwidth_bps: int | None = None, site_extra: str = "",
              state_dir: str = "", force: bool = False) -> Provisioned:
    """The box's directory as `dualrec enroll` leaves it: site config, ca.crt, receipt.pub,
    device.key/.pub, tls.key/.crt, all next to site.toml (state_dir: spool and chain state)."""
    refuse_existing([out / n for n in ("device.key", "tls.key", "site.toml")], force)
    site_path = write_site(branch, device_id, receiver_url, out, oplog_port=oplog_port,
                           bandwidth_bps=bandwidth_bps, site_extra=site_extra,
                           state_dir=state_dir, keys_in_state=False)
    site = load_site(site_path)
    assert site.uplink is not None
    for stale in (site.device.key, site.uplink.key):
        stale.unlink(missing_ok=True)  # force: new keys, as a re-flashed box would make
    signing_key(site.device.key, device_id)
    key = tls_key(site.uplink.key)
    cert = Issuer.from_keys_dir(branch).issue(csr_pem(key, device_id), device_id)
    write_private(site.uplink.cert, cert_pem(cert), 0o644)
    return Provisioned(out, site_path, site.device.key.with_suffix(".pub"), site.uplink.cert)


def enroll_in_data_dir(data_dir: Path, device: Provisioned, device_id: str) -> None:
    """Enroll by writing to the receiver's index directly (receiver on this machine)."""
    from dualrec_tools.receiver.store import ReceiverStore

    with ReceiverStore(data_dir) as store:
        store.enroll(device_id, device.device_pub.read_bytes(), device.cert.read_bytes())
