"""`make soak`: the box killed and starved of disk over and over; prints what survived.

Run as ``python -m tests.soak.run [--cycles 300] [--sizes 1m,2m,4m,8m,16m]
[--state-sizes 160k,1m] [--seed N] [--workdir run/soak]`` (as root: it mounts tmpfs).

1. kill -9: the real gateway (`dualrec run`, sim board, continuous 1 s segments, uplink to the
   real receiver at 2 Mbit/s, as separate processes) is started and killed with SIGKILL --cycles
   times at random moments: while starting and recovering, just after a seal (recording,
   sealing, spool insert, header upload), just after a receipt (payload upload, spool
   completion). After each kill the gateway's descendants (age worker, anything else it
   spawned) must be gone within 3 s. Then one orderly run and one run that drains the spool.
   Figures, over the union of the receiver's copy and the box's spool: sealed segments lost,
   torn (a header without its payload, or a file the verifier refuses), duplicated (a seq in
   both places, a fork or stray file at the receiver), out of chain (verify_dir's link, gap
   and order findings), and leftover processes.
2. Disk-full sweep, in-process with the real seal worker, sealer, spool, uplink and receiver:
   spool and chain state together on a tmpfs of each --sizes, filled by the segments
   themselves while the receiver is away, then drained when it comes back (space returns as
   receipts free it); and the chain-state database alone on a tmpfs of each --state-sizes,
   filled by a filler file that is then removed. Figures: whether the fault was on record,
   silent stops (a thread that died, a fault never recorded), sealed segments lost, seconds
   from space returning to the next seal (the promise: within 2 s), and the chain check.

Exit status 1 if any promise broke.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _sub in ("tests", "firmware", "host_tools"):
    if str(ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(ROOT / _sub))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: E402

from dualrec.chain import ChainState  # noqa: E402
from dualrec.config import SiteConfig, load_site  # noqa: E402
from dualrec.samples import Event  # noqa: E402
from dualrec.seal_worker import SealWorker, Stats  # noqa: E402
from dualrec.sealer import Sealer  # noqa: E402
from dualrec.segment import Segment  # noqa: E402
from dualrec.segment_format import scan_dir  # noqa: E402
from dualrec.spool import Spool  # noqa: E402
from dualrec.timebase import Timebase  # noqa: E402
from dualrec.uplink import Uplink  # noqa: E402
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch  # noqa: E402
from dualrec_tools.localbox import Provisioned, enroll_in_data_dir, provision  # noqa: E402
from dualrec_tools.receiver.server import ReceiverConfig, ReceiverThread  # noqa: E402
from dualrec_tools.receiver.store import ReceiverStore  # noqa: E402
from dualrec_tools.simcounter import Counter, receiver_status  # noqa: E402
from dualrec_tools.verify import load_device_key, verify_dir  # noqa: E402
from helpers import fill, small_board  # noqa: E402
from segments import BOOT_A, S1, make_segment  # noqa: E402

Say = Callable[[str], None]
RESUME_PROMISE_S = 2.0


# --- processes -------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(d.name)] = (int(rest[1]), rest[0])
    return out


def descendants(pid: int) -> set[int]:
    table = _proc_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to collect it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- part 1: kill -9 cycles ------------------------------------------------------------------


@dataclass
class KillFigures:
    cycles: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    sealed: int = 0
    lost: list[int] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    out_of_chain: list[str] = field(default_factory=list)
    leftover: int = 0  # descendants still running 3 s after a kill, summed over the cycles
    leftover_cmds: list[str] = field(default_factory=list)
    interrupted: int = 0
    exit_codes: list[int] = field(default_factory=list)
    drained: bool = False

    def ok(self) -> bool:
        return not (self.lost or self.torn or self.duplicated or self.out_of_chain
                    or self.leftover) and self.drained and self.exit_codes == [0, 0]

    def lines(self) -> list[str]:
        return [
            f"kill -9 cycles          {self.cycles} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items())) + ")",
            f"sealed segments         {self.sealed} (seq 0..{self.sealed - 1}), "
            f"{self.interrupted} closed as `interrupted` after a kill",
            f"lost                    {len(self.lost)} {self.lost[:10] or ''}",
            f"torn                    {len(self.torn)} {self.torn[:5] or ''}",
            f"duplicated              {len(self.duplicated)} {self.duplicated[:5] or ''}",
            f"out of chain            {len(self.out_of_chain)} {self.out_of_chain[:5] or ''}",
            f"leftover processes      {self.leftover} {self.leftover_cmds[:5] or ''}",
            f"orderly stops           exit {self.exit_codes}; spool drained: {self.drained}",
        ]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    return "?"


def kill9_cycles(base: Path, cycles: int, seed: int, say: Say = print) -> KillFigures:
    base.mkdir(parents=True, exist_ok=True)
    (base / "board").mkdir(exist_ok=True)
    counter = Counter(base / "run", small_board(base / "board", clap_ms=5000),
                      with_receiver=True, bandwidth_bps=2_000_000,
                      site_extra='[recording]\nmode = "continuous"\nsegment_ms = 1000\n')
    rng = random.Random(seed)
    fig = KillFigures()
    log = counter.workdir / "gateway.log"

    def count(word: str) -> int:
        return log.read_text(errors="replace").count(word) if log.exists() else 0

    def wait_more(word: str, before: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if count(word) > before:
                return True
            time.sleep(0.05)
        return False

    try:
        counter.prepare()  # inside: a receiver it started must not outlive a failed enrollment
        terminal = counter.start_terminal(24 * 3600, transactions=1, seed=5)
        t_start = time.monotonic()
        for i in range(cycles):
            roll = rng.random()
            phase = "starting" if roll < 0.25 else "after seal" if roll < 0.7 else "after receipt"
            word = {"after seal": " sealed seq ", "after receipt": " acknowledged "}.get(phase)
            before = count(word) if word else 0
            gateway = counter.start_gateway()
            if word is None:
                time.sleep(rng.uniform(0, 1.5))
            elif wait_more(word, before, 30):
                time.sleep(rng.uniform(0, 0.8 if phase == "after seal" else 0.4))
            else:
                phase += " (timed out)"
            fig.phases[phase] = fig.phases.get(phase, 0) + 1
            kids = descendants(gateway.pid)
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(10)
            deadline = time.monotonic() + 3
            while any(alive(p) for p in kids) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = [p for p in kids if alive(p)]
            fig.leftover += len(left)
            fig.leftover_cmds += [_cmdline(p) for p in left]
            for p in left:  # ours to clean: they would pile up over hundreds of cycles
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            fig.cycles += 1
            if (i + 1) % 25 == 0:
                say(f"  {i + 1}/{cycles} kills, {time.monotonic() - t_start:.0f} s, "
                    f"{count(' sealed seq ')} seals logged, leftover so far {fig.leftover}")
        gateway = counter.start_gateway()
        wait_more(" sealed seq ", count(" sealed seq "), 30)
        fig.exit_codes.append(counter.stop(gateway, timeout=60))
        counter.site.write_text(counter.site.read_text()
                                .replace('mode = "continuous"', 'mode = "session"')
                                .replace("bandwidth_bps = 2000000", "bandwidth_bps = 50000000"))
        gateway = counter.start_gateway()
        fig.drained = counter.wait_spool_drained(300)
        fig.exit_codes.append(counter.stop(gateway, timeout=60))
        counter.stop(terminal)
        status = receiver_status(counter)
        counter.stop(counter.receiver_proc)
    finally:
        counter.cleanup()
    problems = status["devices"]["sim-0001"]["problems"]
    fig.duplicated += [f"receiver {p['kind']} seq {p['seq']}" for p in problems]
    _judge(counter, fig)
    return fig


def _judge(counter: Counter, fig: KillFigures) -> None:
    """Figures over the union of the receiver's copy and the box's spool."""
    at_rx, in_spool = scan_dir(counter.received), scan_dir(counter.spool)
    seqs = set(at_rx) | set(in_spool)
    fig.sealed = max(seqs) + 1 if seqs else 0
    fig.lost = [s for s in range(fig.sealed) if s not in seqs]
    fig.duplicated += [f"seq {s} at the receiver and in the spool" for s in set(at_rx)
                       & set(in_spool) if at_rx[s].payload and in_spool[s].header]
    known = {p.name for files in at_rx.values() for p in (files.header, files.payload) if p}
    fig.duplicated += [f"stray {p.name}" for p in counter.received.iterdir()
                       if p.name not in known and not p.name.startswith(".")]
    union = Path(tempfile.mkdtemp(prefix="soak-union-"))
    try:
        for place in (at_rx, in_spool):
            for seq, files in place.items():
                if seq in at_rx and place is in_spool:
                    continue
                if files.header is None or files.payload is None:
                    fig.torn.append(f"seq {seq}: header or payload missing")
                for p in (files.header, files.payload):
                    if p is not None:
                        shutil.copy2(p, union / p.name)
        report = verify_dir(union, [load_device_key(counter.keys / "device.pub")])
        for p in report.failures(strict=True):
            text = str(p)
            if any(w in text for w in ("link", "prev", "gap", "missing", "order", "fork")):
                fig.out_of_chain.append(text)
            else:
                fig.torn.append(text)
        fig.interrupted = sum(1 for hf in report.chain.values() if hf.header is not None
                              and hf.header.get("reason") == "interrupted")
    finally:
        shutil.rmtree(union)


# --- part 2: disk-full sweep -----------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].isalpha() else int(text)


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    mnt = Path(f"/tmp/dualrec-soak-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        mnt.rmdir()
        raise RuntimeError(f"cannot mount a tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)
        mnt.rmdir()


def session(n: int) -> Iterator[Segment]:
    for i in range(n):
        seg = make_segment(S1, i, t0=10**12 + i * 10**9, seconds=1, final=i == n - 1)
        seg.origin_ns = 10**12
        if i:
            seg.events = []
        yield seg


@dataclass
class SweepRow:
    scenario: str
    size: str
    segments: int
    sealed_before_fault: int = 0
    fault_recorded: bool = False
    silent_stops: int = 0
    lost: int = 0
    resume_s: float | None = None
    chain_ok: bool = False
    note: str = ""

    def ok(self) -> bool:
        return (self.fault_recorded and not self.silent_stops and not self.lost and self.chain_ok
                and self.resume_s is not None and self.resume_s <= RESUME_PROMISE_S)

    def line(self) -> str:
        resume = f"{self.resume_s:.2f} s" if self.resume_s is not None else "n/a"
        recorded = "yes" if self.fault_recorded else "NO"
        return (f"  {self.scenario:<22} {self.size:>5}  {self.segments:>3} segs  full after "
                f"{self.sealed_before_fault:>3}  fault on record {recorded}"
                f"  silent stops {self.silent_stops}  lost {self.lost}  resumed {resume:>7}  "
                f"chain {'ok' if self.chain_ok else 'BROKEN'} {self.note}")


@dataclass
class Device:
    branch: Path
    prov: Provisioned
    site: SiteConfig
    key: Ed25519PrivateKey


def make_device(base: Path) -> Device:
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    write_branch(base / "branch", "branch-0001", DEFAULT_RECEIVER_NAMES, force=False)
    prov = provision(base / "branch", "box-0001", "https://127.0.0.1:9", base / "device")
    site = load_site(prov.site)
    key = load_pem_private_key(site.device.key.read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return Device(base / "branch", prov, site, key)


class Sealing:
    """The seal worker over a sealer, on the given spool and state."""

    def __init__(self, dev: Device, spool_dir: Path, state: Path) -> None:
        self.chain = ChainState(state)
        self.sealer = Sealer(device_id="box-0001", key=dev.key,
                             recipients=dev.site.seal.recipients, spool_dir=spool_dir,
                             chain=self.chain, timebase=Timebase(), boot_id=BOOT_A)
        self.events: list[Event] = []
        self.stats = Stats()
        self.worker = SealWorker(self.sealer, self.events.append, lambda _: None, self.stats)
        self.worker.start()

    def faulted(self) -> bool:
        return any(e.kind == "fault" for e in self.events)

    def close(self) -> None:
        self.worker.stop()
        self.sealer.close()
        self.chain.close()


def _poll(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def sweep_spool_and_state(dev: Device, work: Path, size: str) -> SweepRow:
    """Spool and state on one tmpfs, filled by the segments while the receiver is away; the
    receiver comes back and receipts free the space."""
    n = parse_size(size) // 100_000 + 4  # ~113 kB a segment: more than fit
    row = SweepRow("spool+state, self-filled", size, n)
    data = work / f"receiver-{size}"
    enroll_in_data_dir(data, dev.prov, "box-0001")
    with tmpfs(size) as mnt:
        box = Sealing(dev, mnt / "spool", mnt / "state.db")
        spool = Spool(mnt / "spool", mnt / "state.db")
        rx = up = None
        try:
            for seg in session(n):
                box.worker.put(seg)
            _poll(lambda: box.faulted() or box.stats.sealed_total == n, 120)
            row.fault_recorded = box.faulted()
            row.sealed_before_fault = box.stats.sealed_total
            row.silent_stops += not box.worker.alive
            rx = ReceiverThread(ReceiverConfig(data, dev.branch, port=0, admin_port=0)).start()
            assert dev.site.uplink is not None
            cfg = dev.site.uplink.model_copy(update={
                "url": rx.url, "timeout_s": 10, "backoff_max_s": 1,
                "bandwidth_bps": 200_000_000})
            up = Uplink(spool, cfg, "box-0001", lambda _: None)
            up.start()
            t_space = t_seal = None
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                now = time.monotonic()
                if t_space is None and up.stats.receipts:
                    t_space = now  # the first receipt: its files go, space returns
                if t_seal is None and box.stats.sealed_total > row.sealed_before_fault:
                    t_seal = now
                if box.stats.sealed_total == n and not spool.entries():
                    break
                if not box.worker.alive or not all(t.is_alive() for t in up._threads):
                    row.silent_stops += 1
                    break
                time.sleep(0.01)
            if t_space is not None and t_seal is not None:
                row.resume_s = max(0.0, t_seal - t_space)
        finally:
            if up is not None:
                up.stop()
            if rx is not None:
                rx.stop()
            box.close()
            spool.close()
    with ReceiverStore(data) as store:
        row.lost = sum(1 for s in range(n) if store.receipt("box-0001", s) is None)
    report = verify_dir(data / "devices" / "box-0001", [load_device_key(dev.prov.device_pub)])
    row.chain_ok = report.passed(strict=True) and report.segments == n
    return row


def sweep_state_alone(dev: Device, work: Path, size: str) -> SweepRow:
    """The chain-state database alone on a tmpfs, filled up by a filler file, then freed."""
    n = 6
    row = SweepRow("state DB alone, filler", size, n)
    spool_dir = work / f"spool-state-{size}"
    with tmpfs(size) as mnt:
        box = Sealing(dev, spool_dir, mnt / "state.db")
        try:
            filler = fill(mnt)
            for seg in session(n):
                box.worker.put(seg)
            _poll(box.faulted, 60)
            row.fault_recorded = box.faulted()
            row.sealed_before_fault = box.stats.sealed_total
            row.silent_stops += not box.worker.alive
            filler.unlink()
            t_space = time.monotonic()
            if _poll(lambda: box.stats.sealed_total > row.sealed_before_fault, 30):
                row.resume_s = time.monotonic() - t_space
            _poll(lambda: box.stats.sealed_total == n, 60)
            row.silent_stops += not box.worker.alive
            row.lost = n - box.stats.sealed_total
            row.note = f"state at seq {box.chain.head().next_seq}"
        finally:
            box.close()
    report = verify_dir(spool_dir, [load_device_key(dev.prov.device_pub)])
    row.chain_ok = report.passed(strict=True) and report.segments == n
    return row


def disk_sweep(base: Path, sizes: list[str], state_sizes: list[str],
               say: Say = print) -> list[SweepRow]:
    dev = make_device(base / "device")
    rows = []
    for size in sizes:
        rows.append(sweep_spool_and_state(dev, base, size))
        say(rows[-1].line())
    for size in state_sizes:
        rows.append(sweep_state_alone(dev, base, size))
        say(rows[-1].line())
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--sizes", default="1m,2m,4m,8m,16m")
    ap.add_argument("--state-sizes", default="160k,1m")
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--workdir", type=Path, default=ROOT / "run" / "soak")
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-disk", action="store_true")
    args = ap.parse_args()
    # the parts' own warnings (a fault, its clearing) interleave with the figures, indented
    logging.basicConfig(level=logging.WARNING, format="      %(name)s %(levelname)s %(message)s")
    ok = True
    t0 = time.monotonic()
    if not args.skip_disk:
        print("disk-full sweep (spool and state on small tmpfs mounts):", flush=True)
        sizes = [s for s in args.sizes.split(",") if s]
        state_sizes = [s for s in args.state_sizes.split(",") if s]
        rows = disk_sweep(args.workdir / "disk", sizes, state_sizes,
                          say=lambda s: print(s, flush=True))
        bad = [r for r in rows if not r.ok()]
        worst = max((r.resume_s or 0.0) for r in rows)
        print(f"  {len(rows)} cases, {len(bad)} broke a promise; silent stops "
              f"{sum(r.silent_stops for r in rows)}, sealed lost {sum(r.lost for r in rows)}, "
              f"slowest resume {worst:.2f} s (promise {RESUME_PROMISE_S:.0f} s)", flush=True)
        ok &= not bad
    if not args.skip_kill:
        print(f"kill -9 soak: {args.cycles} cycles (seed {args.seed}):", flush=True)
        fig = kill9_cycles(args.workdir / "kill9", args.cycles, args.seed,
                           say=lambda s: print(s, flush=True))
        for line in fig.lines():
            print(f"  {line}", flush=True)
        ok &= fig.ok()
    print(f"soak {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
