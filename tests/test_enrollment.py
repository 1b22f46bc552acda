"""Keys born on the box, one-time enrollment (issue 11), against the real receiver over real TLS
on loopback: a bundle from the admin API, `dualrec enroll`'s code on the box side, the
enrollment listener (server authentication only), the mutual-TLS upload listener, the admin API.

Every refusal is checked to leave the receiver as it was: enrolled devices, tokens, revocations
and the audit log (snapshot before and after), and on the box side no certificate written."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509

from dualrec import renew
from dualrec.cli import main as box_cli
from dualrec.config import load_site
from dualrec.enroll import Bundle, EnrollFailed, csr_pem, enroll, tls_key
from dualrec.preflight import check_site
from dualrec.uplink import client_ssl_context
from dualrec_tools.cli import main as tool_cli
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.pki import cert_pem, issue, key_pem, make_ca
from dualrec_tools.provision import ProvisionError, admin_headers, make_bundle
from dualrec_tools.receiver.runtime import ReceiverConfig, ReceiverThread

DEV, DEV2 = "box-0001", "box-0002"
pytestmark = pytest.mark.timeout(60)


@dataclass
class World:
    branch: Path
    rx: ReceiverThread
    admin_token: str
    tmp: Path

    def admin(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        headers = {**admin_headers(self.admin_token), **kw.pop("headers", {})}
        return httpx.post(f"{self.rx.admin_url}{path}", json=body, headers=headers,
                          timeout=10, **kw)

    def mint(self, device: str = DEV, **extra: Any) -> dict[str, Any]:
        r = self.admin("/admin/enrollment-tokens", {"device": device, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    def bundle(self, name: str, token: dict[str, Any], device: str = DEV) -> Path:
        out = self.tmp / name
        make_bundle(self.branch, device, self.rx.url, out, token, enroll_url=self.rx.enroll_url,
                    state_dir="")
        return out / "site.toml"

    def state(self) -> tuple[Any, ...]:
        store, book = self.rx.store, self.rx.book
        devices = [(d.id, d.cert_sha256, d.signing_key_pem)
                   for d in (store.device(i) for i in store.devices()) if d]
        return devices, book.tokens(), book.revoked(), len(book.audit.lines())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    branch = tmp_path / "branch"
    write_branch(branch, "test", DEFAULT_RECEIVER_NAMES, force=False)
    rx = ReceiverThread(ReceiverConfig(tmp_path / "data", branch, port=0, admin_port=0,
                                       enroll_port=0)).start()
    try:
        yield World(branch, rx, rx.book.add_admin_token("tester"), tmp_path)
    finally:
        rx.stop()


def enroll_box(site_path: Path) -> x509.Certificate:
    site = load_site(site_path)
    enroll(site, Bundle.load(site_path.parent / "enroll.json"))
    assert site.uplink is not None
    return x509.load_pem_x509_certificate(site.uplink.cert.read_bytes())


def status(world: World, site_path: Path, device: str = DEV,
           ctx: ssl.SSLContext | None = None) -> httpx.Response:
    """A request on the upload path (its identity check is the one every upload passes)."""
    site = load_site(site_path)
    assert site.uplink is not None
    return httpx.get(f"{world.rx.url}/v1/devices/{device}/status", timeout=10,
                     verify=ctx or client_ssl_context(site.uplink))


def raw_enroll(world: World, body: Any, **kw: Any) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(world.branch / "ca.crt"))
    return httpx.post(f"{world.rx.enroll_url}/v1/enroll", json=body, verify=ctx, timeout=10,
                      **kw)


def good_body(world: World, token: dict[str, Any], device: str = DEV) -> dict[str, Any]:
    key = tls_key(world.tmp / f"raw-{device}.key")
    from dualrec.enroll import public_pem, signing_key

    sign = signing_key(world.tmp / f"raw-{device}-sign.key", device)
    return {"device": device, "branch": token["branch"], "token": token["token"],
            "csr_pem": csr_pem(key, device), "signing_key_pem": public_pem(sign, device).decode()}


def test_token_accepted_once_then_box_is_ready(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    assert not list(site_path.parent.glob("*.key")), "the bundle holds no private key"
    cert = enroll_box(site_path)
    site = load_site(site_path)
    assert site.uplink is not None
    for secret in (site.device.key, site.uplink.key):
        assert secret.stat().st_mode & 0o777 == 0o600
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 80 <= days <= 91
    assert check_site(site) == [], "check-config passes after enrollment"
    assert status(world, site_path).status_code == 200
    assert [(t["device"], t["used_at"] is not None) for t in world.rx.book.tokens()] == \
        [(DEV, True)]
    assert [a["what"] for a in world.rx.book.audit.lines()] == \
        ["admin_token", "mint_token", "enroll"]
    # Replay: the same bundle copied to another card (new keys, same token).
    before = world.state()
    again = world.tmp / "copy"
    again.mkdir()
    for name in ("site.toml", "ca.crt", "receipt.pub", "enroll.json"):
        (again / name).write_bytes((site_path.parent / name).read_bytes())
    with pytest.raises(EnrollFailed) as refused:
        enroll_box(again / "site.toml")
    assert refused.value.word == "token_used"
    assert world.state() == before and not (again / "tls.crt").exists()
    # The enrolled box itself, run again: already enrolled, nothing sent.
    assert enroll(site, Bundle.load(site_path.parent / "enroll.json")).already


def test_expired_wrong_device_and_wrong_branch_are_refused(world: World) -> None:
    short = world.mint(ttl_s=1)
    other = world.mint(DEV2)
    time.sleep(1.2)
    before = world.state()
    expired = raw_enroll(world, good_body(world, short))
    wrong_device = raw_enroll(world, good_body(world, other))  # DEV presents DEV2's token
    wrong_branch = raw_enroll(world, {**good_body(world, other, DEV2), "branch": "0" * 64})
    unknown = raw_enroll(world, {**good_body(world, other, DEV2), "token": "x" * 43})
    plain = raw_enroll(world, None, content=json.dumps(good_body(world, other, DEV2)),
                       headers={"Content-Type": "text/plain"})
    assert [(r.status_code, r.json()["error"]) for r in
            (expired, wrong_device, wrong_branch, unknown, plain)] == [
        (403, "token_expired"), (403, "wrong_device"), (403, "wrong_branch"),
        (403, "bad_token"), (415, "unsupported_media_type")]
    assert world.state() == before
    # The PC already refuses a token of another branch's receiver.
    foreign = {**other, "branch": "f" * 64}
    with pytest.raises(ProvisionError, match="another branch"):
        world.bundle("foreign", foreign, DEV2)
    # ...and the untouched DEV2 token still works.
    assert raw_enroll(world, good_body(world, other, DEV2)).status_code == 200


def test_admin_api_refusals(world: World) -> None:
    url = "/admin/enrollment-tokens"
    before = world.state()
    no_auth = httpx.post(f"{world.rx.admin_url}{url}", json={"device": DEV}, timeout=10)
    bad_auth = world.admin(url, {"device": DEV}, headers={"Authorization": "Bearer dra_nope"})
    plain = world.admin(url, None, content=json.dumps({"device": DEV}),
                        headers={"Content-Type": "text/plain"})
    form = world.admin(url, None, data={"device": DEV})
    foreign = world.admin(url, {"device": DEV}, headers={"Origin": "http://evil.example"})
    rebound = world.admin(url, {"device": DEV}, headers={"Host": "evil.example"})
    status_no_auth = httpx.get(f"{world.rx.admin_url}/admin/status", timeout=10)
    assert [(r.status_code, r.json()["error"]) for r in
            (no_auth, bad_auth, plain, form, foreign, rebound, status_no_auth)] == [
        (401, "unauthenticated"), (401, "unauthenticated"), (415, "unsupported_media_type"),
        (415, "unsupported_media_type"), (403, "foreign_origin"), (403, "bad_host"),
        (401, "unauthenticated")]
    assert world.state() == before
    assert world.admin(url, {"device": DEV}).status_code == 200


def test_replacement_needs_an_admin_replace_token_and_is_audited(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    enroll_box(site_path)
    before = world.state()
    refused = world.admin("/admin/enrollment-tokens", {"device": DEV})
    assert (refused.status_code, refused.json()["error"]) == (409, "enrolled")
    assert world.state() == before
    new_site = world.bundle("new-card", world.mint(replace=True))
    enroll_box(new_site)
    assert status(world, new_site).status_code == 200
    old = status(world, site_path)
    assert (old.status_code, old.json()["error"]) == (403, "cert_mismatch")
    audit = world.rx.book.audit.lines()
    assert audit[-1]["what"] == "replace" and audit[-1]["device"] == DEV
    assert audit[-2]["what"] == "mint_token" and audit[-2]["who"] == "admin:tester"


def _sealed(world: World, site_path: Path, n: int) -> list[Any]:
    """n segments sealed with the box's own signing key (made by `dualrec enroll`)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from test_receiver import _seal

    key = load_pem_private_key(load_site(site_path).device.key.read_bytes(), None)
    return _seal(world.tmp / "sealed", DEV, key, n, "20250301T090000Z-0000e1")  # type: ignore


def put_header(world: World, site_path: Path, seg: Any) -> httpx.Response:
    site = load_site(site_path)
    assert site.uplink is not None
    return httpx.put(f"{world.rx.url}/v1/devices/{DEV}/segments/{seg.seq}/header",
                     content=seg.header, headers={"Content-Type": "application/json"},
                     verify=client_ssl_context(site.uplink), timeout=10)


def test_revoked_certificate_is_refused_at_upload(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    enroll_box(site_path)
    segs = _sealed(world, site_path, 2)
    assert put_header(world, site_path, segs[0]).status_code == 202  # the box's keys work
    token_file = world.tmp / "admin.token"
    token_file.write_text(world.admin_token + "\n")
    done = CliRunner().invoke(tool_cli, ["revoke", DEV, "--admin-url", world.rx.admin_url,
                                         "--admin-token-file", str(token_file),
                                         "--reason", "box stolen"])
    assert done.exit_code == 0, done.output
    fingerprint = world.rx.store.device(DEV).cert_sha256  # type: ignore[union-attr]
    assert world.rx.book.revoked() == [fingerprint]
    before = world.state()
    for r in (put_header(world, site_path, segs[1]), status(world, site_path)):
        assert (r.status_code, r.json()["error"]) == (403, "revoked")
    assert world.state() == before
    assert world.rx.store.status(DEV)["headers"] == 1  # nothing more stored
    line = world.rx.book.audit.lines()[-1]
    assert (line["what"], line["who"], line["cert_sha256"], line["detail"]) == \
        ("revoke", "admin:tester", fingerprint, "box stolen")


def test_certificate_the_issuing_ca_never_signed_is_refused(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    enroll_box(site_path)
    rogue_key, rogue_ca = make_ca("rogue")
    key, cert = issue(rogue_key, rogue_ca, DEV, client=True)
    (world.tmp / "rogue.crt").write_bytes(cert_pem(cert))
    (world.tmp / "rogue.key").write_bytes(key_pem(key))
    ctx = ssl.create_default_context(cafile=str(world.branch / "ca.crt"))
    ctx.load_cert_chain(str(world.tmp / "rogue.crt"), str(world.tmp / "rogue.key"))
    before = world.state()
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        status(world, site_path, ctx=ctx)
    signing = load_site(site_path).device.key.with_suffix(".pub").read_text()
    by_hand = world.admin("/admin/devices", {"device": DEV, "signing_key_pem": signing,
                                             "cert_pem": cert_pem(cert).decode(),
                                             "replace": True})
    assert (by_hand.status_code, by_hand.json()["error"]) == (400, "not_issued")
    assert world.state() == before


def test_renewal_before_expiry(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    first = enroll_box(site_path)
    site = load_site(site_path)
    assert site.uplink is not None
    ctx = client_ssl_context(site.uplink)
    assert not renew.renew_if_due(site.uplink, DEV, ctx)  # 90 days left: nothing to do
    assert renew.renew_if_due(site.uplink, DEV, ctx, renew_days=1000)
    second = x509.load_pem_x509_certificate(site.uplink.cert.read_bytes())
    assert second.serial_number != first.serial_number
    assert second.public_key() == first.public_key()  # the TLS key stays
    assert status(world, site_path, ctx=ctx).status_code == 200  # the reloaded context
    old = ssl.create_default_context(cafile=str(site.uplink.ca))
    (world.tmp / "old.crt").write_bytes(cert_pem(first))
    old.load_cert_chain(str(world.tmp / "old.crt"), str(site.uplink.key))
    r = status(world, site_path, ctx=old)
    assert (r.status_code, r.json()["error"]) == (403, "cert_mismatch")
    assert world.rx.book.audit.lines()[-1]["what"] == "renew"


def test_dualrec_enroll_command(world: World) -> None:
    site_path = world.bundle("box", world.mint())
    run = CliRunner().invoke
    first = run(box_cli, ["enroll", "--site", str(site_path), "--wait", "0"])
    assert first.exit_code == 0, first.output
    assert f"{DEV}: enrolled" in first.output
    again = run(box_cli, ["enroll", "--site", str(site_path), "--wait", "0"])
    assert again.exit_code == 0 and "already enrolled" in again.output
    other = world.bundle("other", world.mint(DEV2), DEV2)
    (other.parent / "enroll.json").write_text((site_path.parent / "enroll.json").read_text()
                                              .replace(DEV, DEV2))
    refused = run(box_cli, ["enroll", "--site", str(other), "--wait", "0"])
    assert refused.exit_code == 1 and "token_used" in refused.output


def test_a_box_not_yet_enrolled_records_to_its_spool(world: World) -> None:
    """`dualrec enroll` could not reach the receiver on the first boot: `dualrec run` runs and
    records anyway (keys made, no certificate); the uplink waits for the certificate."""
    import subprocess
    import sys

    from dualrec.enroll import signing_key

    site_path = world.bundle("offline", world.mint())
    site_path.write_text(site_path.read_text().replace('port = ""', 'port = "loop://"'))
    site = load_site(site_path)
    signing_key(site.device.key, DEV)  # what enroll does before it contacts the receiver
    board = Path(__file__).resolve().parents[1] / "boards" / "sim.toml"
    done = subprocess.run([sys.executable, "-m", "dualrec.cli", "run", "--board", str(board),
                           "--site", str(site_path), "--duration", "3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not enrolled yet" in done.stderr
    # It ran its recording for the whole duration and stopped in order (a gateway that could
    # not start exits non-zero at once, with a traceback or one line).
    assert "Traceback" not in done.stderr and done.stdout.startswith("sealed ")


def test_provision_command_asks_the_admin_api_and_never_bundles_keys(world: World) -> None:
    token_file = world.tmp / "admin.token"
    token_file.write_text(world.admin_token)
    args = ["provision", "--branch", str(world.branch), "--id", DEV, "--receiver-url",
            world.rx.url, "--enroll-url", str(world.rx.enroll_url), "--state-dir", "",
            "--admin-url", world.rx.admin_url, "--admin-token-file", str(token_file),
            "--out", str(world.tmp / "cli-box")]
    done = CliRunner().invoke(tool_cli, args)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (world.tmp / "cli-box").iterdir()) == [
        "ca.crt", "enroll.json", "receipt.pub", "site.toml"]
    enroll_box(world.tmp / "cli-box" / "site.toml")  # keys now next to site.toml (state-dir "")
    before = world.state()
    again = CliRunner().invoke(tool_cli, [*args, "--force"])
    assert again.exit_code != 0 and "private keys do not belong in a bundle" in again.output
    assert world.state() == before  # refused before a token was minted
