"""The receiver under load and under attack (issue 12): `python -m tests.bench.receiver_bench`
(also `python -m tests.bench.run --only-receiver`, and part 7 of `make bench`).

50 simulated boxes, each with its own certificate, key and sealed chain of --segments real
segments, deliver over loopback mutual TLS to the real receiver in a subprocess (its default
limits), each box paced at its bandwidth cap (--bps, the uplink's default 4 Mbit/s) by the
uplink's own TokenBucket: PUT header, then PUT payload, retried with backoff on 429/5xx/reset.
Run twice, the same way: alone, and while an attacker
- holds 2,000 idle TCP connections (no TLS) from 32 loopback addresses (127.0.1.1-32), opening
  a new one whenever the receiver closes one, and
- keeps 100 slow uploads going: 13 enrolled attacker devices (a stolen box certificate each),
  up to 8 connections each, sending a header body one byte a second, reconnecting when cut.

Reported per run: segments delivered (every payload receipted, checked in the receiver's
status), header acknowledgement latency p50/p99, the receiver's CPU (s and % of one core), peak
RSS and peak open file descriptors (from /proc, sampled every 0.25 s), and for the attacked
run what the receiver refused (its /metrics). Loopback only; every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec.chain import ChainState
from dualrec.ratelimit import TokenBucket
from dualrec.sealer import Sealer
from dualrec.timebase import Timebase
from dualrec_tools.pki import cert_pem, issue, key_pem, make_ca
from dualrec_tools.receiver.store import ReceiverStore
from dualrec_tools.verify import device_pub_pem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segments import BOOT_A, make_segment

ROOT = Path(__file__).resolve().parents[2]
BOXES, ATTACK_DEVICES, IDLE_CONNS, SLOW_UPLOADS = 50, 13, 2000, 100


@dataclass
class Box:
    name: str
    cert: Path
    key: Path
    segments: list[tuple[int, bytes, bytes, str]] = field(default_factory=list)


def _prepare(work: Path, segments: int) -> tuple[Path, list[Box], list[Box]]:
    """Keys, certificates and sealed chains (not measured)."""
    ca_key, ca = make_ca("bench")
    keys = work / "branch"
    keys.mkdir(parents=True)
    srv_key, srv = issue(ca_key, ca, "branch-bench", server_names=["127.0.0.1"])
    for name, data in {"ca.crt": cert_pem(ca), "receiver.crt": cert_pem(srv),
                       "receiver.key": key_pem(srv_key),
                       "receipt.key": key_pem(Ed25519PrivateKey.generate())}.items():
        (keys / name).write_bytes(data)
    recipient = str(pyrage.x25519.Identity.generate().to_public())
    base = [make_segment("20250301T090000Z-0000b0", i, t0=10**12 + i * 2 * 10**9, seconds=2,
                         final=i == segments - 1) for i in range(segments)]
    boxes, attackers = [], []
    with ReceiverStore(work / "data-alone") as store, \
            ReceiverStore(work / "data-attacked") as store2:
        for i in range(BOXES + ATTACK_DEVICES):
            name = f"box-{i:04d}" if i < BOXES else f"att-{i - BOXES:04d}"
            k, c = issue(ca_key, ca, name, client=True)
            box = Box(name, work / f"{name}.crt", work / f"{name}.key")
            box.cert.write_bytes(cert_pem(c))
            box.key.write_bytes(key_pem(k))
            signing = Ed25519PrivateKey.generate()
            for st in (store, store2):  # one fresh receiver per run
                st.enroll(name, device_pub_pem(signing.public_key(), name), cert_pem(c))
            if i < BOXES:
                d = work / "boxes" / name
                sealer = Sealer(device_id=name, key=signing, recipients=[recipient],
                                spool_dir=d / "spool", chain=ChainState(d / "state.db"),
                                timebase=Timebase(), boot_id=BOOT_A)
                for seg in base:
                    s = sealer.seal(seg)
                    header = s.header_path.read_bytes()
                    box.segments.append((s.seq, header, s.payload_path.read_bytes(),
                                         _sha(header)))
                boxes.append(box)
            else:
                attackers.append(box)
    return keys, boxes, attackers


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class Receiver:
    def __init__(self, data: Path, keys: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "firmware"), str(ROOT / "host_tools")])}
        self.out = log.with_suffix(".stdout")
        from dualrec_tools.receiver.enrollment import EnrollmentBook

        with EnrollmentBook(data) as book:  # the admin API needs a token
            self.auth = {"Authorization": f"Bearer {book.add_admin_token('bench')}"}
        with self.out.open("wb") as out, log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dualrec_tools.receiver.cli", "serve", "--data",
                 str(data), "--keys", str(keys), "--listen", "127.0.0.1:0",
                 "--admin-listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            words = self.out.read_text().partition("\n")[0].split()
            if len(words) == 4 and words[0] == "LISTENING":
                self.url, self.admin = words[1], words[3]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"receiver did not start: {log.read_text()[-2000:]}")

    def proc_figures(self) -> tuple[float, int, int]:
        """CPU seconds, RSS bytes, open fds of the receiver process."""
        pid = self.proc.pid
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return cpu, rss, len(os.listdir(f"/proc/{pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _ctx(keys: Path, box: Box) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(keys / "ca.crt"))
    ctx.load_cert_chain(str(box.cert), str(box.key))
    return ctx


def _run_box(url: str, keys: Path, box: Box, bps: int, deadline: float,
             latencies: list[float], delivered: list[int]) -> None:
    bucket = TokenBucket(bps)

    def paced(payload: bytes) -> Iterator[bytes]:
        for i in range(0, len(payload), 16 * 1024):
            piece = payload[i:i + 16 * 1024]
            bucket.take(len(piece))
            yield piece

    with httpx.Client(base_url=url, verify=_ctx(keys, box), timeout=30) as c:
        for seq, header, payload, sha in box.segments:
            for kind in ("header", "payload"):
                delay = 0.2
                while time.monotonic() < deadline:
                    t0 = time.monotonic()
                    try:
                        if kind == "header":
                            r = c.put(f"/v1/devices/{box.name}/segments/{seq}/header",
                                      content=header)
                        else:
                            r = c.put(f"/v1/devices/{box.name}/segments/{seq}/payload",
                                      content=paced(payload),
                                      headers={"X-Dualrec-Header-SHA256": sha})
                    except httpx.HTTPError:
                        r = None
                    if r is not None and r.status_code in (200, 202):
                        if kind == "header":
                            latencies.append(time.monotonic() - t0)
                        else:
                            delivered.append(seq)
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)


class Attacker:
    def __init__(self, url: str, keys: Path, devices: list[Box]) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        self.addr = (host, int(port))
        self.keys, self.devices = keys, devices
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.idle_opened = 0
        self.slow_opened = 0
        self.idle_held_max = 0

    def start(self) -> None:
        self.threads.append(threading.Thread(target=self._idle, daemon=True))
        for i in range(SLOW_UPLOADS):
            dev = self.devices[i % len(self.devices)]
            self.threads.append(threading.Thread(target=self._slow, args=(dev,), daemon=True))
        for t in self.threads:
            t.start()

    def _open_idle(self, sel: selectors.BaseSelector, src: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((src, 0))
            s.connect_ex(self.addr)
            sel.register(s, selectors.EVENT_READ, src)
            self.idle_opened += 1
        except OSError:
            s.close()

    def _idle(self) -> None:
        sel = selectors.DefaultSelector()
        sources = [f"127.0.1.{i}" for i in range(1, 33)]
        for i in range(IDLE_CONNS):
            self._open_idle(sel, sources[i % len(sources)])
        while not self.stop.is_set():
            self.idle_held_max = max(self.idle_held_max, len(sel.get_map()))
            for key, _ in sel.select(0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    gone = not sock.recv(4096)
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:  # closed by the receiver: take its place again at once
                    sel.unregister(sock)
                    sock.close()
                    self._open_idle(sel, key.data)
            time.sleep(0.05)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    def _slow(self, dev: Box) -> None:
        ctx = _ctx(self.keys, dev)
        while not self.stop.is_set():
            try:
                with ctx.wrap_socket(socket.create_connection(self.addr, timeout=5),
                                     server_hostname="127.0.0.1") as s:
                    self.slow_opened += 1
                    s.sendall(f"PUT /v1/devices/{dev.name}/segments/0/header HTTP/1.1\r\n"
                              "Host: x\r\nContent-Length: 4096\r\n\r\n".encode())
                    s.settimeout(1.0)
                    while not self.stop.is_set():
                        s.send(b"{")
                        try:
                            s.recv(4096)  # an answer (408 too_slow) or the end: cut
                            break
                        except TimeoutError:
                            continue
            except (OSError, ssl.SSLError):
                pass
            self.stop.wait(0.5)

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _metrics(admin: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{admin}/metrics", timeout=10).text.splitlines():
        if line.startswith("dualrec_receiver_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def run_once(work: Path, keys: Path, boxes: list[Box], attackers: list[Box], *, attack: bool,
             bps: int, seconds: float) -> dict[str, Any]:
    tag = "attacked" if attack else "alone"
    rx = Receiver(work / f"data-{tag}", keys, work / f"rx-{tag}.log")
    attacker = None
    try:
        peak_rss = peak_fds = 0
        cpu0 = rx.proc_figures()[0]
        if attack:
            attacker = Attacker(rx.url, keys, attackers)
            attacker.start()
            time.sleep(3)  # let it build up its 2,000 connections
        latencies: list[float] = []
        delivered: list[int] = []
        deadline = time.monotonic() + seconds
        t0 = time.monotonic()
        threads = [threading.Thread(target=_run_box, args=(rx.url, keys, b, bps, deadline,
                                                           latencies, delivered), daemon=True)
                   for b in boxes]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 5:
            _, rss, fds = rx.proc_figures()
            peak_rss, peak_fds = max(peak_rss, rss), max(peak_fds, fds)
            time.sleep(0.25)
        wall = time.monotonic() - t0
        cpu = rx.proc_figures()[0] - cpu0
        for t in threads:
            t.join(1)
        status = httpx.get(f"{rx.admin}/admin/status", headers=rx.auth,
                           timeout=10).json()["devices"]
        receipted = sum(status[b.name]["payloads"] for b in boxes)
        metrics = _metrics(rx.admin)
    finally:
        if attacker is not None:
            attacker.halt()
        rx.stop()
    lat = sorted(latencies)
    total = sum(len(b.segments) for b in boxes)
    result = {
        "attack": attack, "segments": total, "delivered": len(delivered),
        "receipted_by_receiver": receipted, "wall_s": wall,
        "header_ack_p50_ms": 1000 * statistics.median(lat) if lat else None,
        "header_ack_p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "receiver_cpu_s": cpu, "receiver_cpu_pct_one_core": 100 * cpu / wall,
        "receiver_peak_rss_mb": peak_rss / 2**20, "receiver_peak_fds": peak_fds,
        "metrics": metrics,
    }
    if attacker is not None:
        result.update(attacker_idle_opened=attacker.idle_opened,
                      attacker_idle_held_max=attacker.idle_held_max,
                      attacker_slow_opened=attacker.slow_opened)
    return result


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for r in (result["alone"], result["attacked"]):
        tag = "receiver, attacked" if r["attack"] else "receiver, alone"
        out += [
            (f"{tag}: delivered", f"{r['delivered']}/{r['segments']} segments "
                                  f"({r['receipted_by_receiver']} receipted) in "
                                  f"{r['wall_s']:.1f} s"),
            (f"{tag}: header ack p50 / p99", f"{r['header_ack_p50_ms']:.1f} / "
                                             f"{r['header_ack_p99_ms']:.1f} ms"),
            (f"{tag}: CPU, peak RSS, peak fds", f"{r['receiver_cpu_s']:.1f} s "
             f"({r['receiver_cpu_pct_one_core']:.0f} % of a core), "
             f"{r['receiver_peak_rss_mb']:.0f} MB, {r['receiver_peak_fds']}"),
        ]
    a = result["attacked"]
    m = a["metrics"]
    refused = {k: int(v) for k, v in m.items() if "refus" in k or "cut" in k}
    out.append(("receiver, attacked: attacker", f"{a['attacker_idle_opened']} idle connections "
                f"opened (up to {a['attacker_idle_held_max']} held), "
                f"{a['attacker_slow_opened']} slow uploads started"))
    out += [(f"  {k}", str(v)) for k, v in sorted(refused.items()) if v]
    return out


def run_receiver_bench(work: Path, *, segments: int = 4, bps: int = 4_000_000,
                       seconds: float = 120.0) -> dict[str, Any]:
    t0 = time.monotonic()
    keys, boxes, attackers = _prepare(work, segments)
    print(f"receiver bench: {BOXES} boxes x {segments} segments sealed in "
          f"{time.monotonic() - t0:.0f} s (not measured)", flush=True)
    alone = run_once(work, keys, boxes, attackers, attack=False, bps=bps, seconds=seconds)
    print("receiver bench: alone done", flush=True)
    attacked = run_once(work, keys, boxes, attackers, attack=True, bps=bps, seconds=seconds)
    return {"boxes": BOXES, "segments_per_box": segments, "bps": bps, "alone": alone,
            "attacked": attacked}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.receiver_bench",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=4, help="segments per box (~200 KB each)")
    ap.add_argument("--bps", type=int, default=4_000_000, help="each box's cap, bit/s")
    ap.add_argument("--seconds", type=float, default=120.0, help="bound on each run")
    ap.add_argument("--out", type=Path, default=ROOT / "run" / "bench-receiver.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dualrec-rxbench-") as tmp:
        result = run_receiver_bench(Path(tmp), segments=args.segments, bps=args.bps,
                                    seconds=args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    width = max(len(k) for k, _ in rows(result))
    for k, v in rows(result):
        print(f"{k:<{width}}  {v}")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
