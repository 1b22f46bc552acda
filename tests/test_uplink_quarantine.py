"""Uploads never wait on one segment: a segment the real receiver refuses for good is quarantined
(kept on the box, on record, in status, on the LED) while every later one flows.

Each test provisions a branch and a device, seals real segments into the device's spool, runs a
real receiver on loopback (ReceiverThread) and the box's Uplink against it. Every wait is a
bounded poll.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import SiteConfig, load_site
from dualrec.samples import Event, LogLine
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import payload_name, scan_dir
from dualrec.spool import Spool
from dualrec.timebase import Timebase
from dualrec.uplink import Uplink
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import enroll_in_data_dir, provision
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread
from dualrec_tools.receiver.store import ReceiverStore
from helpers import wait_for
from segments import BOOT_A, S1, make_segment

DEV = "box-0001"
LATER = 50  # segments sealed after the refused one; all must get through
pytestmark = pytest.mark.timeout(180)


@dataclass
class Device:
    branch: Path
    dir: Path
    site: SiteConfig
    key: Ed25519PrivateKey


@pytest.fixture
def device(tmp_path: Path) -> Device:
    branch = tmp_path / "branch"
    write_branch(branch, "branch-0001", DEFAULT_RECEIVER_NAMES, force=False)
    prov = provision(branch, DEV, "https://127.0.0.1:9", tmp_path / "device")
    enroll_in_data_dir(tmp_path / "receiver", prov, DEV)
    site = load_site(prov.site)
    key = load_pem_private_key(site.device.key.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return Device(branch, tmp_path / "device", site, key)


def small_segment(index: int, t0: int) -> Segment:
    """A segment with one log line and no media: cheap to seal, real to the receiver."""
    seg = Segment(S1, index, 10**12, t0, end_ns=t0 + 10**9, reason="duration")
    seg.lines = [LogLine(t0 + 1000, f"TXN={index}\r\n".encode(), f"TXN={index}")]
    seg.events = [Event(t0, "mark", {"n": index})]
    return seg


def seal(dev: Device, spool_dir: Path, state: Path, segs: list[Segment]) -> list[bytes]:
    chain = ChainState(state)
    sealer = Sealer(device_id=DEV, key=dev.key, recipients=dev.site.seal.recipients,
                    spool_dir=spool_dir, chain=chain, timebase=Timebase(), boot_id=BOOT_A)
    try:
        return [sealer.seal(s).header_path.read_bytes() for s in segs]
    finally:
        sealer.close()
        chain.close()


def receiver(dev: Device, **config: object) -> ReceiverThread:
    return ReceiverThread(ReceiverConfig(dev.dir.parent / "receiver", dev.branch, port=0,
                                         admin_port=0, **config)).start()  # type: ignore[arg-type]


class Watch:
    """What the uplink reports: events on record and the LED's quarantine state."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lamp: list[str | None] = []

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def uplink(dev: Device, spool: Spool, url: str, watch: Watch) -> Uplink:
    assert dev.site.uplink is not None
    cfg = dev.site.uplink.model_copy(update={"url": url, "timeout_s": 10, "backoff_max_s": 1,
                                             "bandwidth_bps": 200_000_000})
    up = Uplink(spool, cfg, DEV, report=watch.events.append, on_quarantine=watch.lamp.append)
    up.start()
    return up


def rx_payloads(dev: Device) -> set[int]:
    with ReceiverStore(dev.dir.parent / "receiver") as store:
        return {s for s in range(LATER + 2) if store.receipt(DEV, s) is not None}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def figures(dev: Device, sealed: list[bytes]) -> tuple[int, int]:
    """(sealed segments lost, stored twice or other than sealed) over box and receiver."""
    held = scan_dir(dev.site.spool.dir)
    rx = scan_dir(dev.dir.parent / "receiver" / "devices" / DEV)
    lost = wrong = 0
    for seq, header in enumerate(sealed):
        at_rx = seq in rx and rx[seq].payload is not None
        if seq not in held and not at_rx:
            lost += 1
        if at_rx and rx[seq].header.read_bytes() != header:
            wrong += 1
        if at_rx and seq in held:
            wrong += 1  # a receipted segment must have left the box
    return lost, wrong


def wait(what: str, cond: Callable[[], bool], timeout: float = 60) -> None:
    wait_for(cond, timeout, what)


def test_oversized_segment_is_quarantined_while_fifty_later_ones_flow(device: Device,
                                                                      capsys) -> None:
    """Tried: seq 1 is a 3 s media segment (~300 KiB) and the receiver's payload limit is
    64 KiB, so the receiver refuses it with 413 `oversized`, a refusal retrying cannot change;
    50 small segments were sealed after it. Asserted: all 51 others are stored with receipts;
    seq 1 stays in the spool byte for byte; one `upload_quarantined` event names it; the LED
    shows `quarantine`; status() and stats list it. Then a restarted uplink knows it is
    quarantined (from the spool's SQLite) without a second event; and once the branch raises
    its limit, the re-offer at start delivers it, records `upload_quarantine_cleared` and the
    LED clears. Lost 0, stored wrongly 0."""
    dev = device
    segs = [small_segment(0, 10**12), make_segment(S1, 1, t0=10**12 + 10**9, seconds=3)]
    segs += [small_segment(2 + i, 10**12 + (5 + i) * 10**9) for i in range(LATER)]
    sealed = seal(dev, dev.site.spool.dir, dev.site.spool.state, segs)
    big = dev.site.spool.dir / payload_name(1)
    big_sha = sha(big)
    assert big.stat().st_size > 64 * 1024
    spool = Spool(dev.site.spool.dir, dev.site.spool.state)
    rx = receiver(dev, max_payload=64 * 1024)
    watch = Watch()
    up = uplink(dev, spool, rx.url, watch)
    try:
        wait("the 51 others at the receiver",
             lambda: rx_payloads(dev) == set(range(LATER + 2)) - {1})
        wait("seq 1 quarantined", lambda: up.stats.quarantined == 1)
        status = up.status()
    finally:
        up.stop()
    q = watch.of("upload_quarantined")
    assert [(e.detail["seq"], e.detail["error"]) for e in q] == [(1, "oversized")]
    assert watch.lamp == ["quarantine"]
    standing = [e.detail for e in watch.of("fault") if e.detail.get("part") == "quarantine"]
    assert len(standing) == 1 and "seq 1" in standing[0]["reason"]
    assert [x["seq"] for x in status["quarantined"]] == [1] and "413" in \
        status["quarantined"][0]["reason"]
    assert sorted(scan_dir(dev.site.spool.dir)) == [1] and sha(big) == big_sha
    assert spool.quarantined()[0][0] == 1

    # a restart: the quarantine is known from the spool, the re-offer is refused again quietly
    watch2 = Watch()
    up = uplink(dev, spool, rx.url, watch2)
    try:
        wait("the re-offer at start refused", lambda: up.stats.failures >= 1)
        assert watch2.lamp == ["quarantine"] and watch2.of("upload_quarantined") == []
    finally:
        up.stop()
        rx.stop()

    # the branch fixes its side: the next start's re-offer goes through
    rx = receiver(dev)
    watch3 = Watch()
    up = uplink(dev, spool, rx.url, watch3)
    try:
        wait("seq 1 delivered", lambda: 1 in rx_payloads(dev))
        wait("the LED to clear", lambda: watch3.lamp == ["quarantine", None])
    finally:
        up.stop()
        rx.stop()
    assert [e.detail["seq"] for e in watch3.of("upload_quarantine_cleared")] == [1]
    assert [e.detail.get("part") for e in watch3.of("fault_cleared")] == ["quarantine"]
    assert scan_dir(dev.site.spool.dir) == {} and up.status()["quarantined"] == []
    lost, wrong = figures(dev, sealed)
    with capsys.disabled():
        print(f"\n  quarantine (413): 1 refused for good, {LATER + 1} others delivered; "
              f"lost {lost}, stored wrongly {wrong}")
    assert (lost, wrong) == (0, 0)
    spool.close()


def test_fork_and_bad_link_are_quarantined_and_the_rest_flow(device: Device, tmp_path: Path
                                                            ) -> None:
    """Tried: the receiver already holds a different seq 2 of this device (a copy of the box
    sealed another segment from the same chain state: a fork), then the box uploads seq 0..7.
    Asserted: seq 2 is refused `fork` and seq 3 `bad_link` (it links to the box's seq 2, not
    the stored one); both are quarantined, kept in the spool and on record; seq 0, 1 and 4..7
    are delivered."""
    dev = device
    segs = [small_segment(i, 10**12 + i * 10**9) for i in range(8)]
    sealed = seal(dev, dev.site.spool.dir, dev.site.spool.state, segs[:2])
    # the copy: same chain state after seq 1, another segment as its seq 2
    other = tmp_path / "copy"
    shutil.copytree(dev.dir, other)
    site2 = load_site(other / "site.toml")
    fork = seal(dev, site2.spool.dir, site2.spool.state, [small_segment(9, 10**12 + 99)])[0]
    with ReceiverStore(dev.dir.parent / "receiver") as store:
        assert store.put_header(DEV, 2, fork).kind == "awaiting_payload"
    sealed += seal(dev, dev.site.spool.dir, dev.site.spool.state, segs[2:])
    spool = Spool(dev.site.spool.dir, dev.site.spool.state)
    rx = receiver(dev)
    watch = Watch()
    up = uplink(dev, spool, rx.url, watch)
    try:
        wait("0, 1 and 4..7 at the receiver", lambda: rx_payloads(dev) == {0, 1, 4, 5, 6, 7})
        wait("2 and 3 quarantined", lambda: up.stats.quarantined == 2)
    finally:
        up.stop()
        rx.stop()
    q = {e.detail["seq"]: e.detail["error"] for e in watch.of("upload_quarantined")}
    assert q == {2: "fork", 3: "bad_link"}
    assert watch.lamp == ["quarantine"]
    assert sorted(scan_dir(dev.site.spool.dir)) == [2, 3]
    assert [s for s, _, _ in spool.quarantined()] == [2, 3]
    spool.close()
