"""The branch receiver over real mutual TLS on loopback: real sealed segments go in, signed
receipts come out, and every way a segment or a connection can be wrong is refused, logged,
recorded where it concerns evidence, and leaves nothing stored."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyrage
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec.chain import ChainState
from dualrec.receipt import verify_receipt
from dualrec.sealer import Sealer
from dualrec.segment_format import header_hash
from dualrec.timebase import Timebase
from dualrec_tools.pki import cert_pem, issue, key_pem, make_ca
from dualrec_tools.receiver.cli import main as cli_main
from dualrec_tools.receiver.limits import Limits
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread
from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.verify import device_pub_pem
from segments import BOOT_A, make_segment

ROOT = Path(__file__).resolve().parents[1]
DEV, DEV2 = "test-0001", "test-0002"
pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Seg:
    seq: int
    header: bytes
    payload: bytes

    @property
    def sha(self) -> str:
        return header_hash(self.header)


@dataclass(frozen=True)
class World:
    keys: Path  # the branch keys directory the receiver serves with
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key) files
    ca: Path
    receipt_key: Ed25519PrivateKey
    signing: dict[str, Ed25519PrivateKey]
    a: list[Seg]  # test-0001's chain, seq 0..3
    b: list[Seg]  # a second chain under test-0001's key: a fork of a
    x: list[Seg]  # test-0001 segments signed by a key the receiver does not know
    d2: list[Seg]  # test-0002's chain


def _seal(base: Path, device: str, key: Ed25519PrivateKey, n: int, session: str) -> list[Seg]:
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    sealer = Sealer(device_id=device, key=key, recipients=[recipient], spool_dir=base / "spool",
                    chain=ChainState(base / "state.db"), timebase=Timebase(), boot_id=BOOT_A)
    out = []
    for i in range(n):
        sealed = sealer.seal(make_segment(session, i, t0=10**12 + i * 10**9, seconds=1,
                                          final=i == n - 1))
        out.append(Seg(sealed.seq, sealed.header_path.read_bytes(),
                       sealed.payload_path.read_bytes()))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("receiver-world")
    ca_key, ca = make_ca("test")
    keys = base / "branch"
    keys.mkdir()
    srv_key, srv = issue(ca_key, ca, "branch-0001", server_names=["127.0.0.1", "localhost"])
    receipt_key = Ed25519PrivateKey.generate()
    for name, data in {"ca.crt": cert_pem(ca), "receiver.crt": cert_pem(srv),
                       "receiver.key": key_pem(srv_key), "receipt.key": key_pem(receipt_key)
                       }.items():
        (keys / name).write_bytes(data)
    rogue_key, rogue_ca = make_ca("rogue")
    clients = {}
    for name, (issuer_key, issuer, cn) in {
            DEV: (ca_key, ca, DEV), DEV2: (ca_key, ca, DEV2),
            "test-0009": (ca_key, ca, "test-0009"), "rogue": (rogue_key, rogue_ca, DEV)}.items():
        k, c = issue(issuer_key, issuer, cn, client=True)
        (base / f"{name}.crt").write_bytes(cert_pem(c))
        (base / f"{name}.key").write_bytes(key_pem(k))
        clients[name] = (base / f"{name}.crt", base / f"{name}.key")
    signing = {DEV: Ed25519PrivateKey.generate(), DEV2: Ed25519PrivateKey.generate()}
    return World(keys, clients, keys / "ca.crt", receipt_key, signing,
                 a=_seal(base / "a", DEV, signing[DEV], 4, "20250301T090000Z-00000a"),
                 b=_seal(base / "b", DEV, signing[DEV], 2, "20250301T090000Z-00000b"),
                 x=_seal(base / "x", DEV, Ed25519PrivateKey.generate(), 1,
                         "20250301T090000Z-00000c"),
                 d2=_seal(base / "d2", DEV2, signing[DEV2], 1, "20250301T090000Z-00000d"))


def _enroll(store: ReceiverStore, world: World, device: str) -> None:
    store.enroll(device, device_pub_pem(world.signing[device].public_key(), device),
                 world.clients[device][0].read_bytes())


@pytest.fixture
def receiver(tmp_path: Path, world: World):
    started: list[ReceiverThread] = []

    def start(max_payload: int = 1 << 20, limits: Limits | None = None,
              **config: object) -> ReceiverThread:
        rx = ReceiverThread(ReceiverConfig(tmp_path / "data", world.keys, port=0, admin_port=0,
                                           max_payload=max_payload,
                                           limits=limits or Limits(),
                                           **config)).start()  # type: ignore[arg-type]
        started.append(rx)
        _enroll(rx.store, world, DEV)
        _enroll(rx.store, world, DEV2)
        return rx

    yield start
    for rx in started:
        rx.stop()


def admin_auth(rx: ReceiverThread) -> dict[str, str]:
    """Headers of an authenticated admin request (a new admin token in the receiver's book)."""
    return {"Authorization": f"Bearer {rx.book.add_admin_token('tests')}"}


def tls(world: World, who: str | None = DEV, *, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca or world.ca)
    if who:
        ctx.load_cert_chain(*world.clients[who])
    return ctx


def client(rx: ReceiverThread, world: World, who: str | None = DEV,
           ctx: ssl.SSLContext | None = None) -> httpx.Client:
    return httpx.Client(base_url=rx.url, verify=ctx or tls(world, who), timeout=5)


def put_header(c: httpx.Client, seg: Seg, device: str = DEV, seq: int | None = None,
               ) -> httpx.Response:
    return c.put(f"/v1/devices/{device}/segments/{seg.seq if seq is None else seq}/header",
                 content=seg.header, headers={"Content-Type": "application/json"})


def put_payload(c: httpx.Client, seg: Seg, device: str = DEV,
                body: bytes | Iterator[bytes] | None = None,
                sha: str | None = None) -> httpx.Response:
    return c.put(f"/v1/devices/{device}/segments/{seg.seq}/payload",
                 content=seg.payload if body is None else body,
                 headers={"Content-Type": "application/octet-stream",
                          "X-Dualrec-Header-SHA256": sha or seg.sha})


def files(rx: ReceiverThread, device: str = DEV) -> list[str]:
    d = rx.store.device_dir(device)
    return sorted(os.listdir(d)) if d.exists() else []


def problems(rx: ReceiverThread, device: str = DEV) -> list[tuple[int | None, str]]:
    return [(p["seq"], p["kind"]) for p in rx.store.status(device)["problems"]]


def check_receipt(world: World, body: bytes, seg: Seg, device: str = DEV) -> None:
    verify_receipt(body, world.receipt_key.public_key(), device=device, seq=seg.seq,
                   header_sha256=seg.sha, payload_sha256=hashlib.sha256(seg.payload).hexdigest())


def test_happy_path_and_repeats(receiver, world: World) -> None:
    rx = receiver()
    seg = world.a[0]
    with client(rx, world) as c:
        r = put_header(c, seg)
        assert (r.status_code, r.json()) == (202, {"status": "awaiting_payload"})
        assert put_header(c, seg).status_code == 202
        assert c.get(f"/v1/devices/{DEV}/segments/0/receipt").status_code == 404
        r = put_payload(c, seg)
        assert r.status_code == 200
        check_receipt(world, r.content, seg)
        receipt = r.content
        again = [put_payload(c, seg), put_header(c, seg),
                 c.get(f"/v1/devices/{DEV}/segments/0/receipt")]
        assert [(x.status_code, x.content) for x in again] == [(200, receipt)] * 3
    d = rx.store.device_dir(DEV)
    assert files(rx) == ["0000000000.hdr.json", "0000000000.payload.age"]
    assert (d / "0000000000.hdr.json").read_bytes() == seg.header
    assert (d / "0000000000.payload.age").read_bytes() == seg.payload
    st = rx.store.status(DEV)
    assert (st["headers"], st["payloads"], st["problems"]) == (1, 1, [])
    assert st["last_contact_utc_ns"] is not None


def test_payload_before_header(receiver, world: World, caplog) -> None:
    rx = receiver()
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        r = put_payload(c, world.a[0])
    assert r.status_code == 409 and r.json()["error"] == "header_first"
    assert "code=409 error=header_first" in caplog.text
    assert files(rx) == [] and rx.store.status(DEV)["headers"] == 0


def test_segment_signed_by_unknown_key(receiver, world: World, caplog) -> None:
    rx = receiver()
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        r = put_header(c, world.x[0])
    assert r.status_code == 403 and r.json()["error"] == "bad_signature"
    assert "code=403 error=bad_signature" in caplog.text
    assert problems(rx) == [(0, "bad_signature")]
    assert files(rx) == [] and rx.store.status(DEV)["headers"] == 0


def test_unenrolled_device(receiver, world: World, caplog) -> None:
    rx = receiver()
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), \
            client(rx, world, "test-0009") as c:
        r = put_header(c, world.a[0], device="test-0009")
    assert r.status_code == 403 and r.json()["error"] == "unknown_device"
    assert "device=test-0009 seq=0 code=403" in caplog.text
    assert problems(rx, "test-0009") == [(0, "unknown_device")]
    assert "test-0009" in rx.store.status_all()["devices"]
    assert files(rx, "test-0009") == []


def test_path_device_differs_from_client_cert(receiver, world: World, caplog) -> None:
    rx = receiver()
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world, DEV) as c:
        r = put_header(c, world.d2[0], device=DEV2)
        status = c.get(f"/v1/devices/{DEV2}/status")
    assert r.status_code == 403 and r.json()["error"] == "device_mismatch"
    assert status.status_code == 403
    assert "code=403 error=device_mismatch" in caplog.text
    assert problems(rx, DEV) == [(0, "device_mismatch"), (None, "device_mismatch")]
    assert files(rx, DEV2) == [] and rx.store.status(DEV2)["headers"] == 0


def test_replayed_old_segment(receiver, world: World) -> None:
    rx = receiver()
    with client(rx, world) as c:
        receipts = []
        for seg in world.a[:3]:
            assert put_header(c, seg).status_code == 202
            receipts.append(put_payload(c, seg).content)
        before = files(rx)
        old = world.a[0]
        r1, r2 = put_header(c, old), put_payload(c, old)
    assert (r1.status_code, r1.content) == (200, receipts[0])
    assert (r2.status_code, r2.content) == (200, receipts[0])
    assert files(rx) == before and len(before) == 6
    assert rx.store.status(DEV)["problems"] == []


def test_fork_under_acknowledged_seq(receiver, world: World, caplog) -> None:
    rx = receiver()
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        put_header(c, world.a[0])
        receipt = put_payload(c, world.a[0]).content
        r = put_header(c, world.b[0])
        p = put_payload(c, world.b[0])
        kept = c.get(f"/v1/devices/{DEV}/segments/0/receipt")
    assert r.status_code == 409 and r.json()["error"] == "fork"
    assert p.status_code == 409 and p.json()["error"] == "fork"
    assert "code=409 error=fork" in caplog.text
    # One problem per (device, seq, kind), counted: storage stays bounded whatever repeats.
    assert problems(rx) == [(0, "fork")]
    assert rx.store.status(DEV)["problems"][0]["count"] == 2
    assert kept.content == receipt
    assert (rx.store.device_dir(DEV) / "0000000000.hdr.json").read_bytes() == world.a[0].header
    assert files(rx) == ["0000000000.hdr.json", "0000000000.payload.age"]


def test_broken_link_and_late_header(receiver, world: World, caplog) -> None:
    rx = receiver()
    a, b = world.a, world.b
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        assert put_header(c, a[0]).status_code == 202
        assert put_header(c, a[2]).status_code == 202  # seq 1 missing: accepted, a gap
        assert rx.store.status(DEV)["gaps"] == [[1, 1]]
        r = put_header(c, b[1])  # links to b[0], not to the stored a[0]
        assert r.status_code == 409 and r.json()["error"] == "bad_link"
        wrong_seq = put_header(c, a[1], seq=3)
        assert wrong_seq.status_code == 400 and wrong_seq.json()["error"] == "seq_mismatch"
        assert put_header(c, a[1]).status_code == 202  # the late one fills the gap
    assert "code=409 error=bad_link" in caplog.text
    assert problems(rx) == [(1, "bad_link"), (3, "seq_mismatch")]
    st = rx.store.status(DEV)
    assert (st["gaps"], st["highest_seq"], st["headers"]) == ([], 2, 3)
    assert (rx.store.device_dir(DEV) / "0000000001.hdr.json").read_bytes() == a[1].header


def test_late_header_must_link_to_its_successor(tmp_path: Path, world: World) -> None:
    with ReceiverStore(tmp_path) as store:
        _enroll(store, world, DEV)
        assert store.put_header(DEV, 2, world.a[2].header).kind == "awaiting_payload"
        out = store.put_header(DEV, 1, world.b[1].header)  # seq 0 unknown, seq 2 is not its
        assert (out.kind, "does not link" in out.detail) == ("bad_link", True)
        assert store.put_header(DEV, 1, world.a[1].header).ok
        assert store.status(DEV)["gaps"] == [[0, 0]]


def test_payload_hash_or_size_mismatch(receiver, world: World, caplog) -> None:
    rx = receiver()
    seg = world.a[0]
    flipped = bytearray(seg.payload)
    flipped[-100] ^= 1
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        put_header(c, seg)
        bad = [put_payload(c, seg, body=bytes(flipped)), put_payload(c, seg, body=seg.payload[:-1]),
               put_payload(c, seg, body=seg.payload + b"x")]
        assert [(r.status_code, r.json()["error"]) for r in bad] == \
            [(422, "payload_mismatch")] * 3
        assert "code=422 error=payload_mismatch" in caplog.text
        assert files(rx) == ["0000000000.hdr.json"]
        assert rx.store.status(DEV)["payloads"] == 0
        assert [k for _, k in problems(rx)] == ["payload_mismatch"]
        assert rx.store.status(DEV)["problems"][0]["count"] == 3
        good = put_payload(c, seg)  # the right bytes are still taken afterwards
    assert good.status_code == 200
    check_receipt(world, good.content, seg)


def test_oversized_bodies(receiver, world: World, caplog) -> None:
    rx = receiver(max_payload=4096)
    seg = world.a[0]
    with caplog.at_level(logging.WARNING, "dualrec.receiver"), client(rx, world) as c:
        assert put_header(c, seg).status_code == 202
        r = put_payload(c, seg)
        big = c.put(f"/v1/devices/{DEV}/segments/1/header", content=b"{" + b" " * 70000)
    assert r.status_code == 413 and r.json()["error"] == "oversized"
    assert big.status_code == 413 and big.json()["error"] == "oversized"
    assert "code=413 error=oversized" in caplog.text
    assert problems(rx) == [(0, "oversized"), (1, "oversized")]
    assert files(rx) == ["0000000000.hdr.json"] and rx.store.status(DEV)["payloads"] == 0


def test_bad_requests(receiver, world: World) -> None:
    rx = receiver()
    seg = world.a[0]
    with client(rx, world) as c:
        no_sha = c.put(f"/v1/devices/{DEV}/segments/0/payload", content=seg.payload)
        bad_seq = c.put(f"/v1/devices/{DEV}/segments/01/header", content=seg.header)
        not_canonical = put_header(c, Seg(0, seg.header.replace(b",", b", ", 1), b""))
        nowhere = c.get(f"/v1/devices/{DEV}/nothing")
    assert [(r.status_code, r.json()["error"]) for r in (no_sha, bad_seq, not_canonical)] == \
        [(400, "bad_request"), (400, "bad_seq"), (400, "malformed")]
    assert nowhere.status_code == 404 and "error" in nowhere.json()
    assert files(rx) == []


def test_concurrent_uploads_of_one_segment_store_once(receiver, world: World) -> None:
    rx = receiver(limits=Limits(max_uploads_per_device=6))  # six at once, on purpose
    seg = world.a[0]
    results: list[tuple[int, int, bytes]] = []

    def upload() -> None:
        with client(rx, world) as c:
            h = put_header(c, seg)
            p = put_payload(c, seg)
            results.append((h.status_code, p.status_code, p.content))

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and {p for _, p, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1
    assert files(rx) == ["0000000000.hdr.json", "0000000000.payload.age"]


def test_headers_pass_a_stalled_payload_and_a_cut_upload_leaves_nothing(
        receiver, world: World, caplog) -> None:
    caplog.set_level(logging.WARNING, "dualrec.receiver")
    rx = receiver()
    a = world.a
    release = threading.Event()
    answers: list[int] = []

    def body(cut: bool) -> Iterator[bytes]:  # chunked: half, a stall (or a failure), the rest
        half = len(a[0].payload) // 2
        yield a[0].payload[:half]
        if cut:
            raise OSError("link lost")
        release.wait(10)
        yield a[0].payload[half:]

    def upload(cut: bool) -> None:
        with client(rx, world) as c:
            try:
                answers.append(put_payload(c, a[0], body=body(cut)).status_code)
            except OSError:
                answers.append(-1)

    with client(rx, world) as c:
        assert put_header(c, a[0]).status_code == 202
        upload(cut=True)
        assert answers == [-1]
        slow = threading.Thread(target=upload, args=(False,))
        slow.start()
        assert put_header(c, a[1]).status_code == 202  # not held up by the open upload
        release.set()
        slow.join(10)
    assert answers == [-1, 200]
    deadline = time.monotonic() + 5  # the cut upload's worker notices on its own time
    while "error=incomplete" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "code=400 error=incomplete" in caplog.text
    assert files(rx) == ["0000000000.hdr.json", "0000000000.payload.age", "0000000001.hdr.json"]


TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)


def _old_tls(world: World, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    ctx = tls(world)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize("case", ["no_client_cert", "plain_http", "other_ca", "tls1_1",
                                  "tls1_2_cbc"])
def test_tls_refusals(receiver, world: World, case: str) -> None:
    rx = receiver()
    url = rx.url
    if case == "no_client_cert":
        ctx = tls(world, None)
    elif case == "plain_http":
        ctx, url = tls(world), rx.url.replace("https://", "http://")
    elif case == "other_ca":
        ctx = tls(world, "rogue")
    elif case == "tls1_1":  # SECLEVEL=0 so the client offers it at all; the server must refuse
        ctx = _old_tls(world, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    else:
        ctx = _old_tls(world, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA")
    with httpx.Client(base_url=url, verify=ctx, timeout=5) as c, \
            pytest.raises(TRANSPORT_ERRORS):
        put_header(c, world.a[0])
    assert files(rx) == [] and rx.store.status(DEV)["headers"] == 0


def test_tls12_with_aead_is_accepted(receiver, world: World) -> None:
    rx = receiver()
    ctx = _old_tls(world, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256")
    with client(rx, world, ctx=ctx) as c:
        assert put_header(c, world.a[0]).status_code == 202


def test_status_shows_gaps_and_waiting_headers(receiver, world: World) -> None:
    rx = receiver()
    a = world.a
    with client(rx, world) as c:
        put_header(c, a[0])
        put_payload(c, a[0])
        put_header(c, a[2])
        put_header(c, a[3])
        own = c.get(f"/v1/devices/{DEV}/status").json()
    admin = httpx.get(f"{rx.admin_url}/admin/status", headers=admin_auth(rx), timeout=5).json()
    assert admin["receiver"] == "branch-0001"
    for st in (own, admin["devices"][DEV]):
        assert (st["highest_seq"], st["gaps"]) == (3, [[1, 1]])
        assert [(w["seq"], w["waited_s"] >= 0) for w in st["waiting"]] == [(2, True), (3, True)]
        assert st["last_contact_utc_ns"] is not None
    assert admin["devices"][DEV2]["highest_seq"] is None


def test_admin_enroll(receiver, world: World, tmp_path: Path) -> None:
    """Enrolling by hand through the admin API: authenticated, a certificate the branch CA
    issued only, a conflict unless replace (the token flow is tests/test_enrollment.py)."""
    rx = receiver()
    auth = admin_auth(rx)
    cert = world.clients[DEV][0].read_text()
    new_key = Ed25519PrivateKey.generate()
    body = {"device": DEV, "cert_pem": cert,
            "signing_key_pem": device_pub_pem(world.signing[DEV].public_key(), DEV).decode()}
    url = f"{rx.admin_url}/admin/devices"
    same = httpx.post(url, json=body, headers=auth, timeout=5)
    other = {**body, "signing_key_pem": device_pub_pem(new_key.public_key(), DEV).decode()}
    conflict = httpx.post(url, json=other, headers=auth, timeout=5)
    wrong_cn = httpx.post(url, json={**body, "device": "test-0003"}, headers=auth, timeout=5)
    garbage = httpx.post(url, content=b"not json", timeout=5,
                         headers={**auth, "Content-Type": "application/json"})
    rogue = httpx.post(url, json={**body, "cert_pem": world.clients["rogue"][0].read_text()},
                       headers=auth, timeout=5)
    anonymous = httpx.post(url, json=body, timeout=5)
    assert same.status_code == 200 and same.json()["device"] == DEV
    assert [(r.status_code, r.json()["error"]) for r in
            (conflict, wrong_cn, garbage, rogue, anonymous)] == \
        [(409, "conflict"), (400, "device_mismatch"), (400, "bad_request"),
         (400, "not_issued"), (401, "unauthenticated")]
    replaced = httpx.post(url, json={**other, "replace": True}, headers=auth, timeout=5)
    assert replaced.status_code == 200
    assert rx.book.audit.lines()[-1]["what"] == "replace"
    with client(rx, world) as c:  # the old signing key no longer counts
        assert put_header(c, world.a[0]).status_code == 403


def test_cli_enroll_and_status(tmp_path: Path, world: World) -> None:
    pub = tmp_path / "device.pub"
    pub.write_bytes(device_pub_pem(world.signing[DEV].public_key(), DEV))
    data = str(tmp_path / "data")
    run = CliRunner().invoke
    args = ["enroll", "--data", data, "--device-id", DEV, "--signing-key", str(pub),
            "--cert", str(world.clients[DEV][0]), "--keys", str(world.keys)]
    assert run(cli_main, args).exit_code == 0
    rogue = run(cli_main, [*args[:8], str(world.clients["rogue"][0]), *args[9:]])
    assert rogue.exit_code != 0 and "not issued by this branch's CA" in rogue.output
    other = run(cli_main, [*args[:3], "--device-id", DEV2, *args[5:]])
    assert other.exit_code != 0 and "is the key of test-0001" in other.output
    with ReceiverStore(Path(data)) as store:
        store.put_header(DEV, 1, world.a[1].header)
    out = run(cli_main, ["status", "--data", data])
    assert out.exit_code == 0, out.output
    assert "test-0001: enrolled, highest seq 1" in out.output
    assert "gaps: 0" in out.output and "waiting for payload: 1 (" in out.output


def test_cli_serve_prints_listening_and_stops_on_sigterm(tmp_path: Path, world: World) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'firmware'}:{ROOT / 'host_tools'}"}
    made = CliRunner().invoke(cli_main, ["admin-token", "--data", str(tmp_path / "data"),
                                         "--name", "tests"])
    assert made.exit_code == 0, made.output
    auth = {"Authorization": f"Bearer {made.output.strip()}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualrec_tools.receiver.cli", "serve", "--data",
         str(tmp_path / "data"), "--keys", str(world.keys), "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "LISTENING" and line[2] == "admin", line
        assert line[1].startswith("https://127.0.0.1:") and not line[1].endswith(":0")
        assert httpx.get(f"{line[3]}/admin/status", headers=auth,
                         timeout=5).json()["devices"] == {}
        assert proc.stdout.readline().split() == ["ENROLL", "off", "(no", "ca.key)"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hostile_and_invalid_headers_are_4xx_never_500(receiver, world: World) -> None:
    """Tried: JSON nested 10,000 deep, a 5,000-digit integer, bytes that are not UTF-8, and
    headers validly signed by the enrolled key that break the schema (a string width, a bool for
    an int, 2^70, a reason outside the set). Asserted: each is a 400 `malformed` naming the
    rule, nothing is stored, and a good header is still accepted after them."""
    import base64
    import json as _json

    from dualrec.canonical import canonical_bytes

    rx = receiver()
    good = world.a[0]
    fields = {k: v for k, v in _json.loads(good.header).items() if k != "sig"}

    def signed(**change: object) -> bytes:
        body = {**fields, **change}
        sig = base64.b64encode(world.signing[DEV].sign(canonical_bytes(body))).decode()
        return canonical_bytes({**body, "sig": sig})

    bodies = [b"[" * 10_000 + b"]" * 10_000, b"1" * 5000, b"\xff\xfe{}",
              signed(streams={**fields["streams"], "video": {**fields["streams"]["video"],
                                                             "width": "160"}}),
              signed(final=1), signed(seq=2**70), signed(reason="bogus")]
    with client(rx, world) as c:
        answers = [put_header(c, Seg(0, body, b"")) for body in bodies]
        ok = put_header(c, good)
    assert [(r.status_code, r.json()["error"]) for r in answers] == [(400, "malformed")] * 7
    assert ok.status_code in (200, 201, 202), ok.text
    assert rx.store.status(DEV)["headers"] == 1
