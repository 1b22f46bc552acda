"""A world for the web pages' tests: real sealed segments (two labelled sessions of a box) put
into a receiver's data directory through the embedded store, a second enrolled box with no
segments, accounts, and a `dualrec-web serve` process on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from dualrec.samples import Event
from dualrec.segment import Segment
from dualrec.segment_format import header_hash, header_name, payload_name
from dualrec_tools.pki import cert_pem, issue, make_ca
from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.web.accounts import Accounts
from test_verify import CLAPS_A, DEVICE, ORIGIN_A, ORIGIN_B, clap_segment, make_keys, make_sealer

NS = 1_000_000_000
SILENT_BOX = "box-0002"
PASSWORD = "correct horse battery"
LABELS_A = {"txn": "T1001", "teller": "T07", "business": "open_account"}
FAULT_CARD = "6217008792174210"  # passes Luhn: numbers.find takes it for a card
LABELS_B = {"txn": "T1002", "teller": "T09", "business": "deposit"}


@dataclass
class World:
    base: Path
    data: Path
    state: Path
    identity: Path
    store: ReceiverStore  # the receiver's side: the test touches boxes through it
    session_a: str
    session_b: str
    origin_a: int
    url: str = ""
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None


def _labelled(session: str, index: int, origin: int, claps: tuple[int, ...], seconds: int,
              final: bool, labels: dict[str, str], complete: bool):  # type: ignore[no-untyped-def]
    seg = clap_segment(session, index, origin, claps, seconds=seconds, final=final)
    t0 = origin + index * seconds * NS
    seg.events.append(Event(t0 + 1_000_000, "session_labels", dict(labels)))
    if final:
        seg.events.append(Event(t0 + seconds * NS - 2, "session_completeness", {
            "business": labels["business"], "required": ["id_check"],
            "missing": [] if complete else ["id_check"], "complete": complete}))
    seg.events.sort(key=lambda e: e.t_mono_ns)
    return seg


def build(base: Path) -> World:
    keys = base / "keys"
    key = make_keys(keys)
    spool = base / "spool"
    sealer = make_sealer(spool, base / "state.db", keys, key)
    a, b = "20250301T090000Z-aaaaaa", "20250301T090020Z-bbbbbb"
    for i in range(3):
        sealer.seal(_labelled(a, i, ORIGIN_A, CLAPS_A, 2, i == 2, LABELS_A, True))
    for i in range(2):
        sealer.seal(_labelled(b, i, ORIGIN_B, (), 1, i == 1, LABELS_B, False))
    # a camera fault while idle, sealed at once in an idle segment (the dashboard's faults);
    # its reason quotes a customer number, which no page may show
    t = ORIGIN_B + 3 * NS
    idle = Segment("", 0, t, t, end_ns=t + NS // 10, reason="fault", final=True)
    idle.events = [Event(t, "fault", {"device": "camera", "reason": f"no frames {FAULT_CARD}"})]
    sealer.seal(idle)

    data = base / "receiver"
    store = ReceiverStore(data, receipt_key=Ed25519PrivateKey.generate())
    ca_key, ca_cert = make_ca("test")
    _, cert = issue(ca_key, ca_cert, DEVICE, client=True)
    store.enroll(DEVICE, (keys / "device.pub").read_bytes(), cert_pem(cert))
    seq = 0
    while (spool / header_name(seq)).exists():
        header = (spool / header_name(seq)).read_bytes()
        assert store.put_header(DEVICE, seq, header).ok
        out = store.put_payload(DEVICE, seq, header_hash(header),
                                [(spool / payload_name(seq)).read_bytes()], 1 << 30)
        assert out.kind == "stored", out
        seq += 1
    store.touch(DEVICE)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _, cert2 = issue(ca_key, ca_cert, SILENT_BOX, client=True)
    store.enroll(SILENT_BOX, other, cert_pem(cert2))

    state = base / "web-state"
    accounts = Accounts(state / "web.db")
    accounts.add("ada", "auditor", PASSWORD, can_unmask=True)
    accounts.add("bob", "auditor", PASSWORD)
    accounts.add("ian", "it", PASSWORD)
    return World(base, data, state, keys / "branch.agekey", store, a, b, ORIGIN_A)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: World, *extra: str, log_name: str = "web") -> tuple[subprocess.Popen[bytes],
                                                                    int]:
    """A `dualrec-web serve` on a free loopback port, once it listens."""
    port = free_port()
    stderr = world.base / f"{log_name}.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualrec_tools.web.cli", "serve", "--data", str(world.data),
         "--state", str(world.state), "--identity", str(world.identity),
         "--listen", f"127.0.0.1:{port}", "--log-file", str(world.base / f"{log_name}.log"),
         *extra], stdout=subprocess.DEVNULL, stderr=stderr.open("wb"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("dualrec-web exited: " + stderr.read_text()[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("dualrec-web did not listen within 20 s")


def start(world: World, alert_after: float, refresh: float) -> None:
    world.proc, port = spawn(world, "--tz", "Asia/Shanghai", "--alert-after", str(alert_after),
                             "--refresh", str(refresh), "--counter", f"{DEVICE}=Counter 1")
    world.url = f"http://127.0.0.1:{port}"
    world.log_file = world.base / "web.log"


def end(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop(world: World) -> None:
    if world.proc is not None:
        end(world.proc)
    world.store.close()
