"""The uplink against a real receiver on loopback, and against what goes wrong between them.

One branch (write_branch) and one provisioned device are made per module, and real segments are
sealed into the device's spool once; each test gets its own copy of the device directory
(spool, chain state, keys, site.toml), its own receiver data directory with the device
enrolled, and builds Uplinks from the site's own [uplink] section (model_copy with the URL
under test, small timeouts and backoff). Faults are injected with tests/faultnet.py (a TCP
proxy in front of the real receiver) or with fake HTTPS servers that hold the branch's own
keys.

Each test's docstring says what it injects and what it asserts survived. Every test ends
drained to a real receiver and asserts, and prints, three figures: sealed segments lost (a
sealed seq neither still in the spool nor stored with its payload at the receiver), duplicates
stored (a seq's files more than once, a stray file, a fork recorded, or a receipt that differs
from the receiver's), and chain gaps (problems found by verify_dir on the receiver's device
directory with the device's public key). All three must be 0.

Every wait is a bounded poll; nothing sleeps a fixed long time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import SiteConfig, UplinkSection, load_site
from dualrec.receipt import sign_receipt, verify_receipt
from dualrec.samples import Event
from dualrec.sealer import Sealer
from dualrec.segment_format import header_hash, header_name, payload_name
from dualrec.spool import Spool
from dualrec.timebase import Timebase
from dualrec.uplink import Uplink, load_receipt_key
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import Provisioned, enroll_in_data_dir, provision
from dualrec_tools.pki import cert_pem, issue, key_pem, load_ca, make_ca
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread, build_ssl_context
from dualrec_tools.receiver.server import load_receipt_key as load_receipt_signing_key
from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.verify import load_device_key, verify_dir
from faultnet import FaultProxy
from segments import BOOT_A, S1, make_segment

DEV = "box-0001"
# Seconds of each sealed segment: about 100 KiB a second, so 200 to 400 KiB payloads.
SECONDS = (3, 2, 4, 2, 3, 2)
N = len(SECONDS)
FAST_BPS = 200_000_000  # effectively uncapped on loopback: drains take well under a second
DRAIN_S = 20.0
pytestmark = pytest.mark.timeout(60)


# --- the module's branch, device and sealed segments -------------------------------------------


@dataclass(frozen=True)
class SealedSeg:
    seq: int
    header: bytes
    header_sha256: str
    payload_sha256: str
    payload_size: int


@dataclass(frozen=True)
class Template:
    branch: Path  # write_branch's directory: CA, receiver certificate, receipt key
    device: Path  # the provisioned device's directory, spool and chain state included
    sealed: tuple[SealedSeg, ...]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """Seal once per module (the age worker process and libx264 cost a second or so); tests
    work on copies."""
    base = tmp_path_factory.mktemp("uplink")
    branch = base / "branch"
    write_branch(branch, "branch-0001", DEFAULT_RECEIVER_NAMES, force=False)
    # The port is a placeholder: each test points the uplink at its own receiver.
    prov = provision(branch, DEV, "https://127.0.0.1:9", base / "device")
    site = load_site(prov.site)
    key = load_pem_private_key(site.device.key.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    chain = ChainState(site.spool.state)
    sealer = Sealer(device_id=DEV, key=key, recipients=site.seal.recipients,
                    spool_dir=site.spool.dir, chain=chain, timebase=Timebase(),
                    boot_id=BOOT_A)
    sealed = []
    t0 = 10**12
    try:
        for i, s in enumerate(SECONDS):
            seg = sealer.seal(make_segment(S1, i, t0=t0, seconds=s, final=i == N - 1))
            t0 += s * 10**9
            header = seg.header_path.read_bytes()
            sealed.append(SealedSeg(seg.seq, header, header_hash(header),
                                    seg.header["payload"]["sha256"],
                                    seg.header["payload"]["size"]))
    finally:
        sealer.close()
        chain.close()
    assert [s.seq for s in sealed] == list(range(N))
    return Template(branch, base / "device", tuple(sealed))


# --- fake HTTPS servers --------------------------------------------------------------------------

Answer = Callable[[str, str, bytes, Mapping[str, str]], tuple[int, bytes]]


class FakeServer:
    """An aiohttp app on its own event loop in a thread, on 127.0.0.1 (port 0 by default):
    every request is recorded, its body read to the end, and answered by `answer`."""

    def __init__(self, ssl_ctx: ssl.SSLContext | None, answer: Answer | None = None) -> None:
        self._ctx = ssl_ctx
        self._answer = answer or (lambda *_: (500, b""))
        self.requests: list[tuple[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-server",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # to the end: httpx reads an answer after its whole body
        self.requests.append((request.method, request.path))
        status, content = self._answer(request.method, request.path, body, request.headers)
        return web.Response(status=status, body=content, content_type="application/json")

    async def _start(self) -> int:
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ctx)
        await site.start()
        return int(self._runner.addresses[0][1])

    def start(self) -> FakeServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --- the box under test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    lost: int
    duplicates: int
    gaps: int


def wait_for(what: str, cond: Callable[[], bool], timeout: float = DRAIN_S) -> float:
    """Poll cond until true; return the monotonic time it became true. Bounded."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.03)
    return time.monotonic()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Box:
    """A copy of the provisioned device, its spool, and everything a test starts around it
    (receivers, proxies, fake servers, uplinks), stopped in a safe order by close()."""

    def __init__(self, template: Template, tmp: Path, name: str,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.template = template
        self.name = name
        self._capsys = capsys
        self.sealed = template.sealed
        self.dir = tmp / "device"
        shutil.copytree(template.device, self.dir)
        self.site: SiteConfig = load_site(self.dir / "site.toml")
        assert self.site.uplink is not None
        self.uplink_cfg: UplinkSection = self.site.uplink
        self.spool = Spool(self.site.spool.dir, self.site.spool.state)
        self.data = tmp / "receiver"
        enroll_in_data_dir(self.data, Provisioned(self.dir, self.dir / "site.toml",
                                                  self.dir / "device.pub",
                                                  self.dir / "tls.crt"), DEV)
        self.events: list[Event] = []
        self.faults: list[str | None] = []
        self._uplinks: list[Uplink] = []
        self._proxies: list[FaultProxy] = []
        self._fakes: list[FakeServer] = []
        self._receivers: list[ReceiverThread] = []

    # -- starting things --------------------------------------------------------------------

    def receiver(self, port: int = 0) -> ReceiverThread:
        rx = ReceiverThread(ReceiverConfig(self.data, self.template.branch, port=port,
                                           admin_port=0)).start()
        self._receivers.append(rx)
        return rx

    def proxy(self, rx: ReceiverThread) -> FaultProxy:
        p = FaultProxy("127.0.0.1", port_of(rx.url))
        self._proxies.append(p)
        return p

    def fake(self, ssl_ctx: ssl.SSLContext | None, answer: Answer | None = None) -> FakeServer:
        f = FakeServer(ssl_ctx, answer).start()
        self._fakes.append(f)
        return f

    def uplink(self, url: str, **update: Any) -> Uplink:
        cfg = self.uplink_cfg.model_copy(update={
            "url": url, "timeout_s": 2, "backoff_max_s": 1, "bandwidth_bps": FAST_BPS,
            **update})
        up = Uplink(self.spool, cfg, DEV, report=self.events.append,
                    on_fault=self.faults.append)
        self._uplinks.append(up)
        up.start()
        return up

    def stop_uplinks(self) -> None:
        for up in self._uplinks:
            up.stop()
        self._uplinks.clear()

    def close(self) -> None:
        self.stop_uplinks()
        for p in self._proxies:
            p.close()
        for f in self._fakes:
            f.stop()
        for rx in self._receivers:
            rx.stop()
        self.spool.close()

    # -- looking ----------------------------------------------------------------------------

    def kinds(self, since: int = 0) -> list[str]:
        return [e.kind for e in self.events[since:]]

    def fault_reasons(self, since: int = 0) -> list[str]:
        return [str(e.detail.get("reason", "")) for e in self.events[since:]
                if e.kind == "fault"]

    def snapshot(self) -> dict[str, str]:
        """Every file in the spool with its SHA-256: what "nothing deleted or changed" means."""
        return {p.name: _sha(p) for p in sorted(self.site.spool.dir.iterdir())}

    def entries(self) -> list[tuple[int, str, str, bool]]:
        return [(e.seq, e.header_sha256, e.payload_sha256, e.header_delivered)
                for e in self.spool.entries()]

    def assert_intact(self, before: dict[str, str]) -> None:
        assert self.snapshot() == before
        assert [e[:3] for e in self.entries()] == [
            (s.seq, s.header_sha256, s.payload_sha256) for s in self.sealed]
        assert all(self.spool.receipt(s.seq) is None for s in self.sealed)

    def rx_status(self) -> dict[str, Any]:
        with ReceiverStore(self.data) as store:
            return store.status(DEV)

    def drained(self) -> bool:
        return not self.spool.entries() and self.rx_status()["payloads"] == N

    def wait_drained(self, timeout: float = DRAIN_S) -> float:
        return wait_for("the spool to drain", self.drained, timeout)

    # -- the three figures ------------------------------------------------------------------

    def figures(self) -> Figures:
        held = {e.seq for e in self.spool.entries()}
        rx_dir = self.data / "devices" / DEV
        with ReceiverStore(self.data) as store:
            receipts = {s.seq: store.receipt(DEV, s.seq) for s in self.sealed}
            problems = store.status(DEV)["problems"]
        lost = 0
        for s in self.sealed:
            hdr, pay = rx_dir / header_name(s.seq), rx_dir / payload_name(s.seq)
            stored = (receipts[s.seq] is not None and hdr.exists() and pay.exists()
                      and hdr.read_bytes() == s.header and _sha(pay) == s.payload_sha256)
            if s.seq not in held and not stored:
                lost += 1
        # Segment file names are one per seq and kind, so a second copy would show as some
        # other file (a kept temp file, a renamed copy), as a fork the receiver recorded, or as
        # a second receipt: the box's stored receipt must be the receiver's, byte for byte.
        canonical = {n for s in self.sealed for n in (header_name(s.seq), payload_name(s.seq))}
        stray = [p.name for p in rx_dir.iterdir() if p.name not in canonical]
        forks = [p for p in problems if p["kind"] in ("fork", "bad_link")]
        second_receipts = [s.seq for s in self.sealed
                           if self.spool.receipt(s.seq) not in (None, receipts[s.seq])]
        duplicates = len(stray) + sum(p["count"] for p in forks) + len(second_receipts)
        report = verify_dir(rx_dir, [load_device_key(self.dir / "device.pub")])
        gaps = len(report.failures(strict=True)) + (N - report.segments)
        return Figures(lost, duplicates, gaps)

    def say(self, text: str) -> None:
        with self._capsys.disabled():  # shown even when pytest captures output
            print(f"\n  {self.name}: {text}")

    def finish(self) -> Figures:
        """Stop the uplinks and cut every held connection, then assert and print the three
        figures."""
        self.stop_uplinks()
        for p in self._proxies:
            p.close()
        # A payload still streaming when its connection was cut lives on in a temp file until
        # the receiver's worker sees the cut; wait for that (bounded), so what is left to count
        # is only what the receiver kept.
        rx_dir = self.data / "devices" / DEV
        with contextlib.suppress(AssertionError):  # one that stays is counted as a stray file
            wait_for("the receiver to drop cut-off uploads",
                     lambda: not list(rx_dir.glob(".*.tmp")), timeout=5)
        f = self.figures()
        self.say(f"sealed segments lost = {f.lost}, duplicates stored = {f.duplicates}, "
                 f"chain gaps = {f.gaps}")
        assert (f.lost, f.duplicates, f.gaps) == (0, 0, 0)
        return f


def port_of(url: str) -> int:
    m = re.match(r"^https?://[^/]+:(\d+)/?$", url)
    assert m, url
    return int(m[1])


@pytest.fixture
def box(template: Template, tmp_path: Path, request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str]) -> Iterator[Box]:
    b = Box(template, tmp_path, request.node.name, capsys)
    try:
        yield b
    finally:
        b.close()


def receipt_pub(box: Box) -> Ed25519PublicKey:
    return load_receipt_key(box.uplink_cfg)


def assert_receipts_verified(box: Box) -> None:
    """Every seq has a receipt in the spool's state that the pinned key verifies for exactly
    that segment (checked again here, independently of the uplink)."""
    key = receipt_pub(box)
    for s in box.sealed:
        receipt = box.spool.receipt(s.seq)
        assert receipt is not None, f"seq {s.seq}: no receipt"
        verify_receipt(receipt, key, device=DEV, seq=s.seq, header_sha256=s.header_sha256,
                       payload_sha256=s.payload_sha256)


# --- 1. happy path, headers first --------------------------------------------------------------


def test_happy_path_drains_with_verified_receipts(box: Box) -> None:
    """Injected: nothing. Survived: every segment drains; every receipt verifies with the
    pinned key; the spool is empty; the receiver holds every header and payload; no fault was
    ever reported."""
    rx = box.receiver()
    up = box.uplink(rx.url, timeout_s=30)  # nothing injected: a loaded CI machine is no fault
    box.wait_drained()
    assert box.entries() == [] and not any(box.site.spool.dir.iterdir())
    assert_receipts_verified(box)
    st = box.rx_status()
    assert (st["headers"], st["payloads"], st["waiting"], st["gaps"], st["problems"]) == \
        (N, N, [], [], [])
    assert (up.stats.receipts, up.stats.payloads_delivered) == (N, N)
    assert up.stats.bytes_sent == sum(s.payload_size for s in box.sealed)
    assert "fault" not in box.kinds() and box.faults == []
    box.finish()


def test_headers_reach_the_receiver_long_before_payloads(box: Box) -> None:
    """Injected: a bandwidth cap under which payload 0 alone takes about 2 s. Survived: every
    header is at the receiver (its status lists them all as waiting) within a second, while
    payload 0 is still on its way; payload 0 arrives only after ~2 s; a second uplink without
    the cap then drains the rest."""
    size0 = box.sealed[0].payload_size
    rx = box.receiver()
    t0 = time.monotonic()
    slow = box.uplink(rx.url, bandwidth_bps=size0 * 8 // 2)
    t_headers = wait_for("every header at the receiver",
                         lambda: box.rx_status()["headers"] == N, timeout=5)
    st = box.rx_status()
    assert st["payloads"] == 0, "a payload overtook the headers"
    assert [w["seq"] for w in st["waiting"]] == list(range(N))
    t_payload0 = wait_for("payload 0", lambda: box.rx_status()["payloads"] >= 1, timeout=10)
    box.say(f"headers at +{t_headers - t0:.2f} s, payload 0 ({size0} B) at "
            f"+{t_payload0 - t0:.2f} s")
    assert t_headers - t0 < 1.0
    assert t_payload0 - t0 > 1.5
    assert box.rx_status()["waiting"][0]["seq"] == 1
    t_stop = time.monotonic()
    slow.stop()
    stop_s = time.monotonic() - t_stop
    box.uplink(rx.url)
    box.wait_drained()
    assert_receipts_verified(box)
    assert stop_s < 1.0, f"stop() took {stop_s:.1f} s behind a capped payload"
    box.finish()


# --- 2. receiver down, then up ----------------------------------------------------------------


def test_receiver_down_at_start_then_up(box: Box) -> None:
    """Injected: nothing listening on the receiver's port when the uplink starts (a receiver
    was started to reserve the port and stopped again). Survived: a fault event is reported and
    the fault callback called with "uplink"; the spool is untouched; once a receiver comes up on
    that port everything drains, both senders report fault_cleared and the callback is called
    with None."""
    rx = box.receiver()
    port = port_of(rx.url)
    rx.stop()
    before = box.snapshot()
    up = box.uplink(f"https://127.0.0.1:{port}")
    wait_for("connection failures from both senders",
             lambda: up.stats.failures >= 3 and len(box.fault_reasons()) == 2, timeout=10)
    assert box.faults == ["uplink"]  # the lamp is lit once, not once per sender
    assert box.rx_status()["headers"] == 0
    box.assert_intact(before)
    box.receiver(port=port)
    box.wait_drained()
    wait_for("fault_cleared from both senders", lambda: box.kinds().count("fault_cleared") == 2,
             timeout=5)
    assert box.faults == ["uplink", None]
    assert_receipts_verified(box)
    box.finish()


# --- 3. resets and stalls between box and receiver ------------------------------------------


def test_connection_reset_mid_payload(box: Box) -> None:
    """Injected: the proxy resets (RST) the first 3 connections that carry a payload, 64 KiB
    into the body. Survived: all segments drain through the same proxy once it passes; the
    receiver kept none of the cut-off bodies (no stray temp file, no duplicate), every receipt
    verifies."""
    rx = box.receiver()
    proxy = box.proxy(rx)
    proxy.set_mode("reset", after_bytes=64 * 1024, times=3)
    up = box.uplink(proxy.url)
    box.wait_drained()
    assert proxy.faults_left() == 0 and len(proxy.injected) == 3
    assert up.stats.failures >= 3 and box.fault_reasons()
    assert "fault_cleared" in box.kinds() and box.faults[-1] is None
    assert box.rx_status()["problems"] == []
    assert_receipts_verified(box)
    box.finish()


def test_stalled_server_times_out_then_drains(box: Box) -> None:
    """Injected: a proxy that stalls every connection at its first byte (the TLS handshake
    hangs, nothing is ever answered or closed). Survived: the uplink times out after timeout_s
    (2 s), reports a fault and retries on new connections, which stall too; the spool is
    untouched; after the proxy switches to pass, everything drains."""
    rx = box.receiver()
    proxy = box.proxy(rx)
    proxy.set_mode("stall", after_bytes=0, times=1000)
    before = box.snapshot()
    t0 = time.monotonic()
    up = box.uplink(proxy.url)
    t_fault = wait_for("a timeout", lambda: bool(box.fault_reasons()), timeout=10)
    assert t_fault - t0 >= 1.9  # it waited its timeout, not less
    assert all("timed out" in r for r in box.fault_reasons()), box.fault_reasons()
    wait_for("a retry that stalls too", lambda: proxy.stalled() >= 3, timeout=10)
    assert box.rx_status()["headers"] == 0
    box.assert_intact(before)
    proxy.set_mode("pass")
    box.wait_drained()
    # A sender whose retry was already held keeps waiting out its timeout after the switch
    # (the other sender may drain everything meanwhile): both must recover, boundedly.
    wait_for("both senders to recover", lambda: box.faults[-1] is None, timeout=5)
    assert up.stats.failures >= 3  # the first timeouts and at least one stalled retry
    assert_receipts_verified(box)
    box.finish()


def test_server_stalls_mid_payload(box: Box) -> None:
    """Injected: the proxy stalls the first connection carrying a payload once 64 KiB of the
    body went through, and holds it open. Survived: every header still arrives (the header
    sender has its own connection); the payload sender times out, retries on a new connection
    and drains; the receiver stored each payload once."""
    rx = box.receiver()
    proxy = box.proxy(rx)
    proxy.set_mode("stall", after_bytes=64 * 1024, times=1)
    up = box.uplink(proxy.url)
    wait_for("the stall", lambda: proxy.stalled() == 1, timeout=5)
    wait_for("every header despite the stalled payload",
             lambda: box.rx_status()["headers"] == N, timeout=5)
    assert box.rx_status()["payloads"] == 0
    box.wait_drained()
    assert up.stats.failures >= 1
    assert any("timed out" in r for r in box.fault_reasons()), box.fault_reasons()
    assert_receipts_verified(box)
    box.finish()


# --- 4. 5xx and malformed or forged answers ---------------------------------------------------

SEGMENT_PATH = re.compile(r"^/v1/devices/([^/]+)/segments/(\d+)/(header|payload)$")
FORGERIES = ("http_500", "garbage_200", "other_key", "other_header", "other_seq")


def forger(mode: str, target: str, box: Box) -> Answer:
    """Answers of a server that holds the receiver's TLS keys but is not the receiver (or is a
    broken one). `target` says which requests get the bad answer: "header" (every request; the
    payload sender then never gets past the header it sends first) or "payload" (headers are
    answered 202 like a real receiver, payloads get the bad answer)."""
    real = load_receipt_signing_key(box.template.branch / "receipt.key")
    other = Ed25519PrivateKey.generate()
    by_seq = {s.seq: s for s in box.sealed}

    def receipt(s: SealedSeg, key: Ed25519PrivateKey, header_sha256: str | None = None) -> bytes:
        return sign_receipt(device=DEV, seq=s.seq, header_sha256=header_sha256 or s.header_sha256,
                            payload_sha256=s.payload_sha256, payload_size=s.payload_size,
                            received_utc_ns=time.time_ns(), receiver="branch-0001", key=key)

    def answer(method: str, path: str, body: bytes, headers: Mapping[str, str]
               ) -> tuple[int, bytes]:
        m = SEGMENT_PATH.match(path)
        assert m and m[1] == DEV, path
        seq, kind = int(m[2]), m[3]
        if kind == "header" and target == "payload":
            return 202, b'{"status":"awaiting_payload"}'
        s = by_seq[seq]
        if mode == "http_500":
            return 500, b'{"error":"storage","detail":"injected"}'
        if mode == "garbage_200":
            return 200, b"\x00\xff this is not a receipt {"
        if mode == "other_key":  # right fields, signed by a key that is not the pinned one
            return 200, receipt(s, other)
        if mode == "other_header":  # the real key, but for a different header under this seq
            return 200, receipt(s, real, hashlib.sha256(b"a forked header").hexdigest())
        if mode == "other_seq":  # a genuine receipt, for the next segment: a replay
            return 200, receipt(by_seq[(seq + 1) % N], real)
        raise AssertionError(mode)

    return answer


@pytest.mark.parametrize("target", ["header", "payload"])
@pytest.mark.parametrize("mode", FORGERIES)
def test_bad_answers_delete_nothing(box: Box, mode: str, target: str) -> None:
    """Injected: a fake receiver (the branch's own TLS keys, so the handshake succeeds) that
    answers `target` requests with `mode`: HTTP 500; 200 with a body that is no receipt; 200
    with a receipt signed by another Ed25519 key; 200 with a receipt signed by the real receipt
    key but for another header hash, or for another seq. Survived: after repeated attempts
    nothing is deleted from the spool, no receipt is stored, a fault event names the refusal,
    the spool's entries are unchanged (for bad header answers, not even marked delivered); then
    a new uplink pointed at the real receiver drains everything."""
    b = box.template.branch
    fake = box.fake(build_ssl_context(b / "ca.crt", b / "receiver.crt", b / "receiver.key"),
                    forger(mode, target, box))
    before, entries = box.snapshot(), box.entries()
    up = box.uplink(fake.url)
    wait_for(f"repeated bad {target} answers",
             lambda: up.stats.failures >= 2
             and sum(p.endswith(target) for _, p in fake.requests) >= 2, timeout=10)
    box.stop_uplinks()
    box.assert_intact(before)
    assert up.stats.receipts == 0
    if target == "header":
        assert box.entries() == entries  # a 200 with a bad receipt does not mark anything
        assert not any(p.endswith("payload") for _, p in fake.requests)
    reasons = box.fault_reasons()
    assert reasons and box.faults[0] == "uplink"
    expect = {"http_500": "HTTP 500", "garbage_200": "not canonical JSON",
              "other_key": "does not verify", "other_header": "header_sha256 differ",
              "other_seq": "differ"}[mode]
    assert any(expect in r for r in reasons), reasons
    rx = box.receiver()
    box.uplink(rx.url)
    box.wait_drained()
    assert_receipts_verified(box)
    box.finish()


# --- 5. TLS refusals ----------------------------------------------------------------------------

TLS_CASES: dict[str, tuple[str, ...]] = {
    # case: what the box's fault reason may say (OpenSSL's words; 3.2 renamed the plain-HTTP one)
    "other_ca": ("certificate verify failed",),
    "expired": ("certificate has expired",),
    "plain_http": ("wrong version number", "record layer failure", "packet length too long"),
    "wrong_san": ("IP address mismatch", "Hostname mismatch"),
}


def tls_server_context(case: str, box: Box, tmp: Path) -> ssl.SSLContext | None:
    """The server side for each refusal: every one would accept the box's client certificate;
    it is the box that must refuse the server."""
    b = box.template.branch
    ca_key, ca_cert = load_ca(b)
    if case == "plain_http":
        return None
    if case == "other_ca":
        rogue_key, rogue_ca = make_ca("rogue")
        key, cert = issue(rogue_key, rogue_ca, "branch-0001 receiver",
                          server_names=list(DEFAULT_RECEIVER_NAMES))
    elif case == "expired":
        key, cert = issue(ca_key, ca_cert, "branch-0001 receiver",
                          server_names=list(DEFAULT_RECEIVER_NAMES),
                          not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30), days=2)
    elif case == "wrong_san":
        key, cert = issue(ca_key, ca_cert, "branch-0001 receiver",
                          server_names=["example.invalid"])
    else:
        raise AssertionError(case)
    (tmp / "srv.crt").write_bytes(cert_pem(cert))
    (tmp / "srv.key").write_bytes(key_pem(key))
    return build_ssl_context(b / "ca.crt", tmp / "srv.crt", tmp / "srv.key")


@pytest.mark.parametrize("case", TLS_CASES)
def test_tls_refusals_upload_nothing(box: Box, case: str, tmp_path: Path) -> None:
    """Injected: at the receiver URL, a server with a certificate from another CA; one with an
    expired certificate from the branch CA; a plain-HTTP server; one whose certificate names
    only example.invalid. Survived: the handshake fails on the box's side, so the server never
    sees a request; a fault event names the TLS failure; the spool is intact; then the real
    receiver gets everything."""
    fake = box.fake(tls_server_context(case, box, tmp_path), lambda *_: (200, b""))
    before = box.snapshot()
    up = box.uplink(fake.url)
    wait_for("repeated refused handshakes",
             lambda: up.stats.failures >= 3 and len(box.fault_reasons()) == 2, timeout=10)
    box.stop_uplinks()
    assert fake.requests == []
    box.assert_intact(before)
    reasons = box.fault_reasons()
    assert all(any(words in r for words in TLS_CASES[case]) for r in reasons), reasons
    assert box.faults[0] == "uplink"
    rx = box.receiver()
    box.uplink(rx.url)
    box.wait_drained()
    assert_receipts_verified(box)
    box.finish()


# --- 6. a lost acknowledgement ------------------------------------------------------------------


def test_lost_acknowledgement_is_replayed_safely(box: Box) -> None:
    """Injected: the proxy lets payload 0 through whole, then resets the connection the moment
    the receiver starts answering (the receipt is lost on the way back). Survived: the receiver
    had stored it; the uplink retries and gets the very same receipt (signed before the answer
    was lost, byte for byte the receiver's); nothing is stored twice; the spool empties."""
    rx = box.receiver()
    proxy = box.proxy(rx)
    # Only an answer after a whole payload went up: headers are a few KiB, payloads >= 190 KiB.
    smallest = min(s.payload_size for s in box.sealed)
    proxy.set_mode("lose_answer", after_bytes=smallest - 1, times=1)
    up = box.uplink(proxy.url)
    wait_for("the lost answer", lambda: proxy.faults_left() == 0, timeout=10)
    lost_at = proxy.injected[0].at_ns
    with ReceiverStore(box.data) as store:
        stored_receipt = store.receipt(DEV, 0)
    assert stored_receipt is not None, "the receiver should have stored payload 0"
    box.wait_drained()
    assert box.spool.receipt(0) == stored_receipt
    first = verify_receipt(stored_receipt, receipt_pub(box), device=DEV, seq=0,
                           header_sha256=box.sealed[0].header_sha256,
                           payload_sha256=box.sealed[0].payload_sha256)
    assert first["received_utc_ns"] <= lost_at  # the original receipt, not a new one
    assert up.stats.failures >= 1 and up.stats.receipts == N
    assert box.rx_status()["problems"] == []
    assert_receipts_verified(box)
    box.finish()
