"""Disk faults under sealing and spool bookkeeping: full, read-only, and the memory bound.

Real filesystems that fail for real (needs root, as CI has): small tmpfs mounts filled with a
filler file, and an ext4 image on a loop device mounted errors=remount-ro whose error trigger
(/sys/fs/ext4/<dev>/trigger_fs_error) makes it go read-only like a worn SD card does. The seal
worker, the sealer, the chain state, the spool and the uplink are the real ones; the receiver is
the real one on loopback. Every wait is a bounded poll; nothing asserts a duration.

Each test asserts the same promises: no silent stop (the fault is on record and on the LED, the
threads keep retrying), 0 sealed segments lost, no seq sealed twice or skipped (the chain
verifies), and the work resumes by itself when the cause goes away (fault_cleared on record).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyrage
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import load_site
from dualrec.samples import Event
from dualrec.seal_worker import SealWorker, Stats
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import parse_header, scan_dir
from dualrec.spool import Spool
from dualrec.timebase import Timebase
from dualrec.uplink import Uplink
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import enroll_in_data_dir, provision
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread
from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.verify import load_device_key, verify_dir
from helpers import fill
from segments import BOOT_A, S1, make_segment

pytestmark = pytest.mark.timeout(180)
T0 = 10**12


# --- real failing filesystems ----------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size (e.g. "2m"), unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = Path(f"/tmp/dualrec-disk-{uuid.uuid4().hex[:8]}")
        mnt.mkdir()
        done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
        assert done.returncode == 0, f"cannot mount a tmpfs (root needed): {done.stderr}"
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        _run("umount", "-l", str(mnt))
        mnt.rmdir()


def wait(what: str, cond: Callable[[], bool], timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting for {what}"
        time.sleep(0.02)
    return time.monotonic()


# --- the box's parts -------------------------------------------------------------------------


def session(n: int, first: int = 0, seconds: int = 1) -> list[Segment]:
    """Segments first..first+n-1 of one session, contiguous in time, the last one final."""
    out = []
    for i in range(first, first + n):
        seg = make_segment(S1, i, t0=T0 + i * seconds * 10**9, seconds=seconds,
                           final=i == first + n - 1)
        seg.origin_ns = T0
        if i:
            seg.events = []  # session_start belongs to the first segment only
        out.append(seg)
    return out


class Box:
    """A seal worker over a sealer; what it reports is kept for the asserts."""

    def __init__(self, key: Ed25519PrivateKey, recipient: str, spool_dir: Path, state: Path,
                 device_id: str = "test-0001", **worker: object) -> None:
        self.spool_dir = spool_dir
        self.chain = ChainState(state)
        self.sealer = Sealer(device_id=device_id, key=key, recipients=[recipient],
                             spool_dir=spool_dir, chain=self.chain, timebase=Timebase(),
                             boot_id=BOOT_A)
        self.events: list[Event] = []
        self.leds: list[str | None] = []
        self.stats = Stats()
        self.worker = SealWorker(self.sealer, self.events.append, self.leds.append, self.stats,
                                 **worker)  # type: ignore[arg-type]
        self.worker.start()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def faults(self) -> list[str]:
        return [str(e.detail.get("reason")) for e in self.events if e.kind == "fault"]

    def close(self) -> None:
        self.worker.stop()
        self.sealer.close()
        self.chain.close()


def assert_chain(directory: Path, pub: Path, n: int) -> None:
    """Seqs 0..n-1, each once, linked, signed: verify_dir finds nothing."""
    assert sorted(scan_dir(directory)) == list(range(n))
    report = verify_dir(directory, [load_device_key(pub)])
    assert report.segments == n
    assert report.passed(), [str(p) for p in report.problems]


# --- 1. the chain-state database alone on a full filesystem ------------------------------------


def test_state_db_alone_full(tmp_path: Path, tmpfs, device_key, age_identity, key_files,
                             capsys) -> None:
    """Tried: the chain-state SQLite on a 1 MiB tmpfs, filled up after it was created; the
    spool has room. Asserted: the segment whose header committed while the state could not be
    updated is sealed once (not again, not skipped); the worker keeps retrying (alive, a
    `fault` naming SQLite's "full", the LED on); after the filler is removed every segment is
    sealed in order, the state catches up, `fault_cleared` is recorded and the LED goes dark;
    the spool verifies as one chain 0..4."""
    mnt = tmpfs("1m")
    box = Box(device_key, str(age_identity.to_public()), tmp_path / "spool", mnt / "state.db")
    try:
        filler = fill(mnt)
        for seg in session(5):
            box.worker.put(seg)
        wait("the sealing fault", lambda: "fault" in box.kinds())
        assert "full" in box.faults()[0] and box.leds == ["seal"]
        assert box.worker.alive
        # a committed header beyond the state: at most seq 0, and never a second copy of it
        assert set(scan_dir(box.spool_dir)) <= {0}
        filler.unlink()
        t_free = time.monotonic()
        t_next = wait("a seal after space returned", lambda: box.stats.sealed_total >= 2)
        wait("every segment sealed", lambda: box.stats.sealed_total == 5)
        assert box.chain.head().next_seq == 5
    finally:
        box.close()
    assert [s.seq for s in box.stats.sealed] == list(range(5))
    assert box.kinds()[0] == "fault" and box.kinds()[-1] == "fault_cleared"
    assert box.leds == ["seal", None]
    assert_chain(box.spool_dir, key_files["device_pub"], 5)
    with capsys.disabled():
        print(f"\n  state DB alone full: sealing resumed {t_next - t_free:.2f} s after space "
              "returned; 5 sealed, 0 lost, 0 twice")


# --- 2. spool and state sharing a full filesystem, with the uplink running --------------------


def test_spool_and_state_full_with_uplink(tmp_path: Path, tmpfs, capsys) -> None:
    """Tried: spool and chain state on one 4 MiB tmpfs; 3 segments sealed; then the disk is
    filled and the uplink starts against a real receiver (every header it announces is accepted,
    and marking it delivered in the spool's SQLite fails), while 3 more segments arrive.
    Asserted: neither uplink thread nor the sealer dies: each puts a fault on record; nothing
    is deleted; after the filler is removed all 6 are sealed, delivered with verified receipts
    and the spool drains; fault_cleared for sealing and for both senders; the receiver's copy
    verifies as one chain."""
    branch = tmp_path / "branch"
    write_branch(branch, "branch-0001", DEFAULT_RECEIVER_NAMES, force=False)
    prov = provision(branch, "box-0001", "https://127.0.0.1:9", tmp_path / "device")
    enroll_in_data_dir(tmp_path / "receiver", prov, "box-0001")
    site = load_site(prov.site)
    assert site.uplink is not None
    key = load_pem_private_key(site.device.key.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    mnt = tmpfs("4m")
    box = Box(key, site.seal.recipients[0], mnt / "spool", mnt / "state.db",
              device_id="box-0001")
    spool = Spool(mnt / "spool", mnt / "state.db")
    segs = session(6)
    rx = ReceiverThread(ReceiverConfig(tmp_path / "receiver", branch, port=0,
                                       admin_port=0)).start()
    up_events: list[Event] = []
    up_leds: list[str | None] = []
    up = None
    try:
        for seg in segs[:3]:
            box.worker.put(seg)
        wait("3 sealed", lambda: box.stats.sealed_total == 3)
        filler = fill(mnt)
        cfg = site.uplink.model_copy(update={"url": rx.url, "timeout_s": 10,
                                             "backoff_max_s": 1, "bandwidth_bps": 200_000_000})
        up = Uplink(spool, cfg, "box-0001", up_events.append, up_leds.append)
        up.start()
        for seg in segs[3:]:
            box.worker.put(seg)
        parts = lambda: {e.detail.get("part") for e in up_events if e.kind == "fault"}  # noqa: E731
        wait("both senders failing", lambda: parts() == {"uplink-headers", "uplink-payloads"})
        wait("the sealing fault", lambda: "fault" in box.kinds())
        assert all("full" in str(e.detail["reason"]) for e in up_events if e.kind == "fault")
        assert len(scan_dir(mnt / "spool")) >= 3  # nothing deleted while nothing is recorded
        filler.unlink()
        t_free = time.monotonic()
        t_next = wait("a seal after space returned", lambda: box.stats.sealed_total >= 4)
        wait("all 6 sealed", lambda: box.stats.sealed_total == 6)
        wait("the spool to drain", lambda: not spool.entries() and up.stats.receipts == 6, 60)
    finally:
        if up is not None:
            up.stop()
        rx.stop()
        box.close()
        spool.close()
    cleared = {e.detail.get("part") for e in up_events if e.kind == "fault_cleared"}
    assert cleared == {"uplink-headers", "uplink-payloads"}
    assert box.kinds()[-1] == "fault_cleared" and box.leds == ["seal", None]
    assert up_leds[0] == "uplink" and up_leds[-1] is None
    received = tmp_path / "receiver" / "devices" / "box-0001"
    with ReceiverStore(tmp_path / "receiver") as store:
        assert all(store.receipt("box-0001", s) is not None for s in range(6))
    assert_chain(received, prov.device_pub, 6)
    with capsys.disabled():
        print(f"\n  spool+state full, uplink running: sealing resumed {t_next - t_free:.2f} s "
              "after space returned; 6 sealed, 6 delivered, 0 lost")


# --- 3. a card that fails: ext4 on a loop device, errors=remount-ro ---------------------------


@pytest.fixture
def failing_card(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None], Callable[[], None]]]:
    """(mount point, fail(), repair()): an ext4 image on a loop device mounted with
    errors=remount-ro; fail() fires ext4's own error trigger (the filesystem aborts its journal
    and goes read-only, as on an I/O error); repair() is what a technician does: unmount, fsck,
    mount again."""
    image, mnt = tmp_path / "card.img", Path(f"/tmp/dualrec-card-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(32 * 2**20)
    assert _run("mkfs.ext4", "-q", "-F", str(image)).returncode == 0
    done = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt))
    assert done.returncode == 0, f"cannot mount a loop device (root needed): {done.stderr}"

    def device() -> str:
        return Path(_run("findmnt", "-n", "-o", "SOURCE", str(mnt)).stdout.strip()).name

    def fail() -> None:
        Path(f"/sys/fs/ext4/{device()}/trigger_fs_error").write_text("1")

    def repair() -> None:
        assert _run("umount", str(mnt)).returncode == 0
        _run("e2fsck", "-f", "-y", str(image))  # exit 1: errors corrected
        assert _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)).returncode == 0

    try:
        yield mnt, fail, repair
    finally:
        _run("umount", str(mnt))
        mnt.rmdir()


def test_read_only_card_then_repaired(tmp_path: Path, failing_card, device_key, age_identity,
                                      key_files, capsys) -> None:
    """Tried: the spool on an ext4 card that hits an error and remounts read-only after 2
    segments were sealed (the state database elsewhere); 3 more segments arrive; then the card
    is repaired (fsck) and mounted again. Asserted: a `fault` naming the read-only filesystem
    and the LED; the worker keeps retrying; the 2 sealed segments are still readable; after the
    repair the 3 others are sealed in order and the chain verifies; fault_cleared recorded."""
    mnt, fail, repair = failing_card
    spool_dir = mnt / "spool"
    box = Box(device_key, str(age_identity.to_public()), spool_dir, tmp_path / "state.db")
    try:
        segs = session(5)
        for seg in segs[:2]:
            box.worker.put(seg)
        wait("2 sealed", lambda: box.stats.sealed_total == 2)
        fail()
        for seg in segs[2:]:
            box.worker.put(seg)
        wait("the sealing fault", lambda: "fault" in box.kinds())
        assert "Read-only file system" in box.faults()[0] and box.leds == ["seal"]
        assert sorted(scan_dir(spool_dir)) == [0, 1] and box.worker.alive
        repair()
        t_fixed = time.monotonic()
        t_next = wait("a seal after the repair", lambda: box.stats.sealed_total >= 3)
        wait("all 5 sealed", lambda: box.stats.sealed_total == 5)
    finally:
        box.close()
    assert [s.seq for s in box.stats.sealed] == list(range(5))
    assert box.kinds()[-1] == "fault_cleared" and box.leds == ["seal", None]
    assert_chain(spool_dir, key_files["device_pub"], 5)
    with capsys.disabled():
        print(f"\n  read-only card (ext4 errors=remount-ro, loop device): sealing resumed "
              f"{t_next - t_fixed:.2f} s after the repair; 5 sealed, 0 lost")


# --- 4. the memory bound, and a stop while sealing fails ---------------------------------------


def _events_of(payload: Path, identity: pyrage.x25519.Identity) -> list[dict]:
    plain = pyrage.decrypt(payload.read_bytes(), [identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        member = tar.extractfile("events.jsonl")
        assert member is not None
        return [json.loads(line) for line in member.read().splitlines()]


def test_memory_bound_drops_oldest_unsealed_media_on_record(tmp_path: Path, tmpfs, device_key,
                                                            age_identity, key_files) -> None:
    """Tried: the spool on a full tmpfs and a 250 kB bound on unsealed media, while 6 segments
    of 1 s (~100 kB each) arrive; then space returns. Asserted: the oldest segments' media are
    dropped, never the newest, and the drop is on record: a `fault` (device memory) at once,
    and in each such segment, once sealed, a `gap` event naming the frames and audio samples
    dropped (its header counts the frames as drops); every segment is still sealed, in order,
    with its log lines and events; the chain verifies."""
    mnt = tmpfs("1m")
    box = Box(device_key, str(age_identity.to_public()), mnt / "spool", tmp_path / "state.db",
              max_unsealed_bytes=250_000)
    try:
        filler = fill(mnt)
        segs = session(6)
        frames = [len(s.video) for s in segs]
        for seg in segs:
            box.worker.put(seg)
        wait("media dropped down to the bound", lambda: box.worker.backlog()[1] <= 250_000)
        assert box.worker.backlog()[0] == 6
        memory = [e for e in box.events if e.kind == "fault" and e.detail["device"] == "memory"]
        assert len(memory) == 1
        filler.unlink()
        wait("all 6 sealed", lambda: box.stats.sealed_total == 6)
    finally:
        box.close()
    headers = [parse_header(s.header_path.read_bytes()) for s in box.stats.sealed]
    dropped = [i for i, h in enumerate(headers) if h["streams"]["video"]["frames"] == 0]
    assert len(dropped) == box.stats.dropped_segments >= 1
    assert 5 not in dropped  # the newest keeps its media: the oldest go first
    for i, (h, s) in enumerate(zip(headers, box.stats.sealed, strict=True)):
        gaps = [e for e in _events_of(s.payload_path, age_identity) if e["kind"] == "gap"]
        if i in dropped:
            assert h["streams"]["video"]["drops"] == frames[i]
            assert len(gaps) == 1 and gaps[0]["detail"]["video_frames"] == frames[i]
            assert gaps[0]["detail"]["audio_samples"] > 0
        else:
            assert h["streams"]["video"]["frames"] == frames[i] and gaps == []
        assert h["streams"]["oplog"]["lines"] == 1
    assert_chain(mnt / "spool", key_files["device_pub"], 6)


def test_stop_while_sealing_fails_is_bounded_and_exact(tmp_path: Path, tmpfs, device_key,
                                                       age_identity, caplog) -> None:
    """Tried: the spool on a full tmpfs, 4 segments waiting, then stop() with a 3 s grace.
    Asserted: stop returns after the grace (bounded), the sealer logged at most one line per
    second of it (no flood), and what stays unsealed is reported exactly: the 4 segments by
    session and index, in one ERROR line and in Stats.unsealed_at_stop."""
    mnt = tmpfs("1m")
    box = Box(device_key, str(age_identity.to_public()), mnt / "spool", tmp_path / "state.db",
              stop_grace_s=3.0)
    caplog.set_level(logging.INFO, logger="dualrec.seal")
    fill(mnt)
    for seg in session(4):
        box.worker.put(seg)
    wait("the sealing fault", lambda: "fault" in box.kinds())
    t0 = time.monotonic()
    box.close()
    took = time.monotonic() - t0
    lines = [r for r in caplog.records if r.name == "dualrec.seal"]
    assert not box.worker.alive
    assert len(lines) <= 2 + took  # the first failure, one per second at most, the summary
    lost = box.stats.unsealed_at_stop
    assert [(x["session"], x["index"]) for x in lost] == [(S1, i) for i in range(4)]
    summary = lines[-1].getMessage()
    assert "4 segment(s) unsealed" in summary and f"{S1} #0..#3" in summary
    assert scan_dir(mnt / "spool") == {}


# --- 5. a restart while the state database still cannot be written ----------------------------


def test_restart_with_unwritable_state_adopts_later(tmp_path: Path, tmpfs, device_key,
                                                    age_identity, key_files) -> None:
    """Tried: seq 1's header is committed while the chain state (on a full tmpfs) cannot record
    it, and the process ends there (as a kill would); the box restarts with the state's disk
    still full. Asserted: the start does not fail; the session left open is seen at its true
    next index (2, not 1 again); after space returns, the closing segment becomes seq 2 (seq 1
    neither resealed nor skipped) and the spool verifies as one chain 0..2."""
    mnt = tmpfs("1m")
    spool_dir, state = tmp_path / "spool", mnt / "state.db"
    recipient = str(age_identity.to_public())

    def sealer_on(chain: ChainState) -> Sealer:
        return Sealer(device_id="test-0001", key=device_key, recipients=[recipient],
                      spool_dir=spool_dir, chain=chain, timebase=Timebase(), boot_id=BOOT_A)

    chain = ChainState(state)
    sealer = sealer_on(chain)
    segs = session(3)
    sealer.seal(segs[0])
    filler = fill(mnt)
    sealer.seal(segs[1])
    assert sealer.lagging and chain.head().next_seq == 1  # committed, not in the state
    sealer.close()
    chain.close()

    chain = ChainState(state)  # the restart, the disk still full
    sealer = sealer_on(chain)
    try:
        sealer.recover()
        assert sealer.lagging
        left = sealer.open_session()
        assert left is not None and left[0] == S1 and left[2] == 2
        filler.unlink()
        closing = Segment(S1, left[2], T0, T0 + 2 * 10**9, end_ns=T0 + 2 * 10**9 + 1,
                          reason="interrupted", final=True,
                          events=[Event(T0 + 2 * 10**9, "session_interrupted", {})])
        assert sealer.seal(closing).seq == 2
        assert chain.head().next_seq == 3 and not sealer.lagging
    finally:
        sealer.close()
        chain.close()
    assert_chain(spool_dir, key_files["device_pub"], 3)


# --- 6. the whole gateway, spool and state on one disk that fills and empties -------------------


def test_gateway_records_through_a_full_disk(tmp_path: Path, tmpfs, key_files) -> None:
    """Tried: the real gateway (sim camera, microphone and log, continuous 1 s segments) with
    its spool and chain state on one 3 MiB tmpfs; after a few seals a filler takes every free
    block, then is removed. Asserted: the gateway keeps running (its thread alive) with the
    `seal` pattern on the fault LED; after space returns sealing resumes by itself and the LED
    clears; at the orderly stop the spool holds one verified chain 0..N (no seq lost, sealed
    twice or skipped) whose record carries the sealing `fault` and its `fault_cleared`."""
    import threading

    from dualrec.config import load_board
    from dualrec.gateway import Gateway
    from helpers import small_board, write_site

    mnt = tmpfs("3m")
    site_path = write_site(tmp_path / "site.toml", key_files, spool=mnt / "spool",
                           extra='[recording]\nmode = "continuous"\nsegment_ms = 1000\n')
    site_path.write_text(site_path.read_text().replace(
        f'state = "{tmp_path / "state" / "state.db"}"', f'state = "{mnt / "state.db"}"')
        .replace("[spool]\n", "[spool]\nquota_mb = 1000\nmin_free_mb = 0\n"))
    site = load_site(site_path)
    assert site.spool.state == mnt / "state.db"
    gw = Gateway(load_board(small_board(tmp_path)), site)
    panel = gw.devices.panel
    stop = threading.Event()
    runner = threading.Thread(target=gw.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait("two seals", lambda: gw.stats.sealed_total >= 2, 60)
        filler = fill(mnt)
        wait("the seal fault on the LED", lambda: panel.fault_pattern == "seal", 30)
        before = gw.stats.sealed_total
        assert runner.is_alive()
        # spool files only change through the sealer: while full, at most the one in flight
        filler.unlink()
        wait("sealing again", lambda: gw.stats.sealed_total > before + 1, 30)
        wait("the LED to clear", lambda: panel.fault_pattern is None, 30)
        assert runner.is_alive()
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    spool = scan_dir(mnt / "spool")
    n = len(spool)
    assert_chain(mnt / "spool", key_files["device_pub"], n)
    kinds = []
    identity = pyrage.x25519.Identity.from_str(
        key_files["identity"].read_text().splitlines()[-1].strip())
    for files in spool.values():
        assert files.payload is not None
        kinds += [(e["kind"], e["detail"].get("device")) for e in _events_of(files.payload,
                                                                            identity)]
    assert ("fault", "spool") in kinds and ("fault_cleared", "spool") in kinds
