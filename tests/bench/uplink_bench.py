"""The uplink's part of `make bench`: backlog drain throughput against curl, and the bandwidth cap.

Everything runs over loopback TLS (mutual, the branch CA pinned) against the real receiver in a
subprocess (``python -m dualrec_tools.receiver.cli serve``), each run with a fresh data directory.
The spools hold real sealed segments: one packed segment sealed repeatedly by the Sealer under
successive seqs (a valid chain); building them is not measured.

The Uplink runs in this process (its own two threads, as in the gateway), the receiver in its own.

1. Backlog drain: a spool of --uplink-segments segments of about --uplink-segment-mb each, the
   Uplink with its bandwidth cap effectively off (10 Gbit/s, the config's maximum), from start()
   until every receipt has been verified and the spool is empty. Baseline: one curl process
   uploading the same files to a fresh receiver with the same client certificate and the same
   protocol (PUT header, then PUT payload with X-Dualrec-Header-SHA256), all transfers in one
   invocation chained with --next, so it keeps one connection (checked: %{num_connects}), like
   the uplink's payload sender keeps its own. curl's receipts are verified after timing. Runs
   alternate curl, uplink, --uplink-repeats times; medians are reported.
2. Bandwidth cap: for each of --caps, a spool of about --cap-seconds worth of payload at that
   cap, drained by the Uplink; its byte counter is sampled every few milliseconds. Reported:
   the steady rate (from the first sample past twice the token bucket's burst, so the initial
   burst is left out, to the last payload byte handed to the connection) and the end-to-end
   rate (payload bytes over first payload byte to last receipt, per-segment round trips
   included), each with its error against the cap.

Nothing is asserted: the figures are printed and written to run/bench.json under "uplink".
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.config import UplinkSection
from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.h264 import is_idr
from dualrec.ratelimit import TokenBucket
from dualrec.receipt import ReceiptError, verify_receipt
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import header_hash, parse_header, scan_dir
from dualrec.sim.terminal import stamp_line
from dualrec.spool import Spool
from dualrec.timebase import Timebase
from dualrec.uplink import Uplink, load_receipt_key
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import Provisioned, enroll_in_data_dir, provision

from .clip import noise_pcm
from .oplog_writer import bodies

ROOT = Path(__file__).resolve().parents[2]
NS = 1_000_000_000
MB = 1_000_000
FPS, WIDTH, HEIGHT, RATE, BLOCK = 30, 1920, 1080, 48000, 960
DEVICE = "bench-0001"
OPLOG_RATE = 200.0  # log lines per second in the segments, as in the gateway part
DRAIN_BPS = 10_000_000_000  # the config's maximum: the cap is effectively off
# Bounds: every wait ends by itself.
RECEIVER_START_S = 30.0
DRAIN_DEADLINE_S = 120.0
CAP_GRACE = 3.0  # a cap run may take this many times its nominal length before it is abandoned
SAMPLE_S = 0.005
# The token bucket's burst: bytes that go out before the cap bites (TokenBucket's default).
BURST = TokenBucket(1).burst


@dataclass(frozen=True)
class Sealed:
    """One sealed segment as the protocol sees it."""

    seq: int
    header: Path
    payload: Path
    header_sha256: str
    payload_sha256: str
    payload_size: int


@dataclass(frozen=True)
class Setup:
    branch: Path
    device: Provisioned
    signing_key: Ed25519PrivateKey
    recipient: str


def child_env() -> dict[str, str]:
    paths = [str(ROOT / "firmware"), str(ROOT / "host_tools"), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _proc_cpu(pid: int) -> float:
    """utime + stime of a running process, from /proc (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- set-up ----------------------------------------------------------------------------------


def make_setup(directory: Path) -> Setup:
    """A branch (CA, receiver certificate, receipt key, age identity) and one provisioned box."""
    branch = directory / "branch"
    recipient = write_branch(branch, "bench-branch", DEFAULT_RECEIVER_NAMES, force=False)
    # The URL in the written site.toml is not used: each run gets its receiver's real port.
    device = provision(branch, DEVICE, "https://127.0.0.1:1", directory / "device")
    key = load_pem_private_key((device.directory / "device.key").read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise RuntimeError("device.key is not an Ed25519 key")
    return Setup(branch, device, key, recipient)


def make_segment(units: list[bytes], frames: int, first: int = 0) -> Segment:
    """A real segment: `frames` frames of the looped clip from frame `first`, PCM in
    SimMicrophone blocks and log lines (the gateway part's bench_segment, of any length)."""
    duration_ns = frames * NS // FPS
    seg = Segment("20250301T090000Z-be0001", 0, 0, 0, duration_ns, reason="duration",
                  video_format=VideoFormat("h264", WIDTH, HEIGHT, FPS),
                  audio_format=AudioFormat(RATE, 1))
    for i in range(frames):
        unit = units[(first + i) % len(units)]
        seg.video.append(VideoPacket(i * NS // FPS, unit, is_idr(unit), i))
    samples = frames * RATE // FPS
    pcm = noise_pcm(math.ceil(frames / FPS), RATE)
    for k in range(0, samples - BLOCK + 1, BLOCK):
        seg.audio.append(AudioBlock(k * NS // RATE, pcm[2 * k : 2 * (k + BLOCK)], BLOCK))
    source = bodies(1)
    n_lines = max(1, int(duration_ns / NS * OPLOG_RATE))
    for j in range(n_lines):
        raw = stamp_line(next(source))
        seg.lines.append(LogLine(j * duration_ns // n_lines, raw,
                                 raw.decode("gb18030").rstrip("\r\n")))
    seg.events.append(Event(0, "session_start", {"trigger": "continuous"}))
    return seg


def segment_of_size(units: list[bytes], target: int, first: int = 0) -> Segment:
    """A segment whose packed size is about target bytes (the clip's frames differ a lot in
    size: IDRs are ~20 times a P frame, so the frame count is found by packing)."""
    timebase = Timebase()

    def packed(seg: Segment) -> int:
        return len(seg.pack(timebase.clock_json(seg.start_ns, seg.end_ns)))

    def frames_for(side_per_frame: float) -> int:
        total, frames = 0.0, 0
        while total < target and frames < 100 * FPS:
            size = len(units[(first + frames) % len(units)]) + side_per_frame
            if frames and total + size - target > target - total:
                break  # closer to the target without this frame (an IDR, most likely)
            total += size
            frames += 1
        return max(frames, 1)

    frames = frames_for(0.0)
    for _ in range(3):  # the audio, log and container bytes per frame, measured
        seg = make_segment(units, frames, first)
        video = sum(len(p.data) for p in seg.video)
        better = frames_for((packed(seg) - video) / frames)
        if better == frames:
            break
        frames = better
    return make_segment(units, frames, first)


def seal_set(setup: Setup, directory: Path, seg: Segment, count: int) -> list[Sealed]:
    """Seal seg `count` times (indexes 0..count-1, seqs 0..count-1) into directory/spool."""
    spool = directory / "spool"
    chain = ChainState(directory / "state" / "chain.db")
    sealer = Sealer(device_id=DEVICE, key=setup.signing_key, recipients=[setup.recipient],
                    spool_dir=spool, chain=chain, timebase=Timebase(),
                    boot_id="00000000-0000-4000-8000-0000000000be")
    try:
        for i in range(count):
            seg.index = i
            sealer.seal(seg)
    finally:
        sealer.close()
        chain.close()
    out = []
    for seq, files in sorted(scan_dir(spool).items()):
        assert files.header is not None and files.payload is not None
        data = files.header.read_bytes()
        payload = parse_header(data)["payload"]
        out.append(Sealed(seq, files.header, files.payload, header_hash(data), payload["sha256"],
                          payload["size"]))
    return out


def link_spool(sealed: Sequence[Sealed], directory: Path) -> Path:
    """A fresh spool holding (hard links to) the sealed files: the uplink deletes what it has
    delivered, and the next run needs them again."""
    directory.mkdir(parents=True)
    for s in sealed:
        os.link(s.header, directory / s.header.name)
        os.link(s.payload, directory / s.payload.name)
    return directory


# --- the receiver ----------------------------------------------------------------------------


class Receiver:
    """`dualrec_tools.receiver.cli serve` in a subprocess with a fresh data directory, the box
    enrolled before it starts. The data directory (~100 MB after a drain) is removed when the
    receiver is done with; its stdout and log stay beside it."""

    def __init__(self, setup: Setup, data: Path) -> None:
        self.data = data
        data.mkdir(parents=True)
        enroll_in_data_dir(data, setup.device, DEVICE)
        from dualrec_tools.receiver.enrollment import EnrollmentBook

        with EnrollmentBook(data) as book:  # the admin API needs a token
            self.auth = {"Authorization": f"Bearer {book.add_admin_token('bench')}"}
        self.stdout = data.parent / f"{data.name}.stdout"
        self.stderr = data.parent / f"{data.name}.log"
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dualrec_tools.receiver.cli", "serve", "--data", str(data),
                 "--keys", str(setup.branch), "--listen", "127.0.0.1:0",
                 "--admin-listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env())
        try:
            self.url, self.admin_url = self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> tuple[str, str]:
        deadline = time.monotonic() + RECEIVER_START_S
        while time.monotonic() < deadline:
            first = self.stdout.read_text().partition("\n")
            if first[1]:
                words = first[0].split()
                if len(words) == 4 and words[0] == "LISTENING" and words[2] == "admin":
                    return words[1], words[3]
                raise RuntimeError(f"receiver said {first[0]!r}")
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"receiver did not start; its log:\n{self.stderr.read_text()[-2000:]}")

    def cpu_s(self) -> float:
        return _proc_cpu(self.proc.pid)

    def status(self) -> dict[str, Any]:
        r = httpx.get(f"{self.admin_url}/admin/status", headers=self.auth, timeout=10)
        r.raise_for_status()
        st: dict[str, Any] = r.json()["devices"][DEVICE]
        return st

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


def uplink_config(setup: Setup, url: str, bandwidth_bps: int) -> UplinkSection:
    d = setup.device.directory
    return UplinkSection(url=url, ca=d / "ca.crt", cert=d / "tls.crt", key=d / "tls.key",
                         receipt_key=d / "receipt.pub", bandwidth_bps=bandwidth_bps)


def receiver_summary(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st.get(k) for k in ("highest_seq", "headers", "payloads", "gaps", "problems")}


# --- running the uplink ----------------------------------------------------------------------


def run_uplink(setup: Setup, sealed: Sequence[Sealed], work: Path, bandwidth_bps: int,
               deadline_s: float) -> dict[str, Any]:
    """One Uplink draining a fresh spool (links to `sealed`) into a fresh receiver.

    Timed from start() until the last receipt is verified (the spool is then empty); the
    uplink's byte and receipt counters are sampled every SAMPLE_S meanwhile."""
    spool_dir = link_spool(sealed, work / "spool")
    total = sum(s.payload_size for s in sealed)
    with Receiver(setup, work / "receiver") as rx:
        cfg = uplink_config(setup, rx.url, bandwidth_bps)
        spool = Spool(spool_dir, work / "state" / "state.db")
        events: list[Event] = []
        uplink = Uplink(spool, cfg, DEVICE, events.append)
        samples: list[tuple[float, int, int]] = []
        rx_cpu0, c0 = rx.cpu_s(), _self_cpu()
        t0 = time.monotonic()
        uplink.start()
        try:
            while True:
                now = time.monotonic() - t0
                st = uplink.stats
                samples.append((now, st.bytes_sent, st.receipts))
                if st.receipts >= len(sealed) or now > deadline_s:
                    break
                time.sleep(SAMPLE_S)
            wall = samples[-1][0]
            cpu, rx_cpu = _self_cpu() - c0, rx.cpu_s() - rx_cpu0
        finally:
            uplink.stop()
        left = spool.entries()
        verified = 0
        key = load_receipt_key(cfg)
        for s in sealed:
            receipt = spool.receipt(s.seq)
            if receipt is None:
                continue
            with contextlib.suppress(ReceiptError):
                verify_receipt(receipt, key, device=DEVICE, seq=s.seq,
                               header_sha256=s.header_sha256, payload_sha256=s.payload_sha256)
                verified += 1
        spool.close()
        held = receiver_summary(rx.status())
    return {
        "wall_s": wall,
        "payload_bytes": total,
        "mb_per_s": total / MB / wall,
        "client_cpu_s": cpu,
        "receiver_cpu_s": rx_cpu,
        "receipts_verified": verified,
        "spool_left": len(left),
        "complete": verified == len(sealed) and not left,
        "failures": uplink.stats.failures,
        "fault_events": [e.detail for e in events if e.kind == "fault"],
        "receiver": held,
        "samples": samples,
    }


# --- curl ------------------------------------------------------------------------------------


def curl_command(setup: Setup, sealed: Sequence[Sealed], url: str, out: Path) -> list[str]:
    """One curl, every transfer chained with --next (so one connection serves them all): per
    segment PUT header, then PUT payload with X-Dualrec-Header-SHA256, as the uplink does."""
    d = setup.device.directory
    tls = ["--http1.1", "--silent", "--show-error", "--cacert", str(d / "ca.crt"),
           "--cert", str(d / "tls.crt"), "--key", str(d / "tls.key"),
           "-H", "Expect:",  # no 100-continue round trip: httpx does not wait for one either
           "-w", "%{http_code} %{num_connects}\\n"]
    base = f"{url}/v1/devices/{DEVICE}/segments"
    cmd = ["curl"]
    for s in sealed:
        if len(cmd) > 1:
            cmd.append("--next")
        cmd += [*tls, "-T", str(s.header), "-H", "Content-Type: application/json",
                "-o", str(out / f"{s.seq}.header.out"), f"{base}/{s.seq}/header", "--next",
                *tls, "-T", str(s.payload), "-H", "Content-Type: application/octet-stream",
                "-H", f"X-Dualrec-Header-SHA256: {s.header_sha256}",
                "-o", str(out / f"{s.seq}.receipt"), f"{base}/{s.seq}/payload"]
    return cmd


def run_curl(setup: Setup, sealed: Sequence[Sealed], work: Path,
             deadline_s: float) -> dict[str, Any]:
    out = work / "curl-out"
    out.mkdir(parents=True)
    total = sum(s.payload_size for s in sealed)
    with Receiver(setup, work / "receiver") as rx:
        cmd = curl_command(setup, sealed, rx.url, out)
        rx_cpu0 = rx.cpu_s()
        out_path, err_path = work / "curl.stdout", work / "curl.stderr"
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f)
            killer = threading.Timer(deadline_s, proc.kill)
            killer.start()
            try:
                _, status, ru = os.wait4(proc.pid, 0)  # reaped here, for curl's own CPU
            finally:
                killer.cancel()
            wall = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        rx_cpu = rx.cpu_s() - rx_cpu0
        held = receiver_summary(rx.status())
    stdout, stderr = out_path.read_bytes(), err_path.read_bytes()
    lines = stdout.decode().split()
    codes, connects = lines[0::2], [int(c) for c in lines[1::2]]
    key = load_receipt_key(uplink_config(setup, "https://127.0.0.1", DRAIN_BPS))
    verified = 0
    for s in sealed:
        path = out / f"{s.seq}.receipt"
        with contextlib.suppress(OSError, ReceiptError):
            verify_receipt(path.read_bytes(), key, device=DEVICE, seq=s.seq,
                           header_sha256=s.header_sha256, payload_sha256=s.payload_sha256)
            verified += 1
    return {
        "wall_s": wall,
        "payload_bytes": total,
        "mb_per_s": total / MB / wall,
        "client_cpu_s": ru.ru_utime + ru.ru_stime,
        "receiver_cpu_s": rx_cpu,
        "exit_code": proc.returncode,
        "stderr": stderr.decode(errors="replace")[-500:],
        "header_codes": sorted(set(codes[0::2])),
        "payload_codes": sorted(set(codes[1::2])),
        "connections": sum(connects),
        "receipts_verified": verified,
        "complete": verified == len(sealed) and proc.returncode == 0,
        "receiver": held,
    }


# --- the two parts ---------------------------------------------------------------------------


def bench_drain(setup: Setup, units: list[bytes], work: Path, segments: int, segment_mb: float,
                repeats: int) -> dict[str, Any]:
    t0 = time.monotonic()
    seg = segment_of_size(units, int(segment_mb * MB))
    sealed = seal_set(setup, work / "sealed", seg, segments)
    total = sum(s.payload_size for s in sealed)
    print(f"uplink drain: {segments} sealed segments of {len(seg.video)} frames, "
          f"{total / MB:.1f} MB, sealed in {time.monotonic() - t0:.1f} s (not measured); "
          f"{repeats} x (curl, uplink) ...", flush=True)
    curl_runs, uplink_runs = [], []
    for r in range(repeats):
        c = run_curl(setup, sealed, work / f"curl-{r}", DRAIN_DEADLINE_S)
        u = run_uplink(setup, sealed, work / f"uplink-{r}", DRAIN_BPS, DRAIN_DEADLINE_S)
        u.pop("samples")
        curl_runs.append(c)
        uplink_runs.append(u)
        print(f"  run {r + 1}: curl {c['mb_per_s']:.1f} MB/s, uplink {u['mb_per_s']:.1f} MB/s"
              + ("" if c["complete"] and u["complete"] else "  (INCOMPLETE)"), flush=True)
    curl_mb = statistics.median(c["mb_per_s"] for c in curl_runs)
    uplink_mb = statistics.median(u["mb_per_s"] for u in uplink_runs)
    return {
        "segments": segments,
        "segment_payload_bytes": sealed[0].payload_size,
        "payload_bytes": total,
        "uplink_bandwidth_bps": DRAIN_BPS,
        "curl_mode": "one curl process, all transfers chained with --next (one connection "
                     "kept: see connections), Expect: 100-continue off, HTTP/1.1",
        "curl_mb_per_s": curl_mb,
        "uplink_mb_per_s": uplink_mb,
        "ratio_uplink_vs_curl": uplink_mb / curl_mb if curl_mb else None,
        "curl_runs": curl_runs,
        "uplink_runs": uplink_runs,
    }


def steady_rate(samples: Sequence[tuple[float, int, int]], total: int) -> dict[str, Any]:
    """Payload rates from the uplink's counters: steady (past the first burst, to the last
    payload byte handed over) and end to end (first payload byte to last receipt)."""
    first = next((t for t, b, _ in samples if b > 0), None)
    start = next(((t, b) for t, b, _ in samples if b >= 2 * BURST), None)
    last_byte = next((t for t, b, _ in samples if b >= total), None)
    last_receipt = samples[-1][0]
    out: dict[str, Any] = {"first_byte_s": first, "last_byte_s": last_byte,
                           "last_receipt_s": last_receipt}
    if start and last_byte and last_byte > start[0]:
        out["steady_window_s"] = last_byte - start[0]
        out["steady_bytes"] = total - start[1]
        out["steady_bps"] = (total - start[1]) * 8 / (last_byte - start[0])
    if first is not None and last_receipt > first:
        out["end_to_end_bps"] = total * 8 / (last_receipt - first)
    return out


def bench_caps(setup: Setup, units: list[bytes], work: Path, caps: Sequence[int],
               seconds: float, per_cap_segments: int) -> dict[str, Any]:
    results = []
    for cap in caps:
        target = int(cap / 8 * seconds)
        # From the clip's second frame: a segment that starts on its ~600 kB IDR could not be
        # small enough for the lower caps. The uplink moves opaque files either way.
        seg = segment_of_size(units, target // per_cap_segments, first=1)
        sealed = seal_set(setup, work / f"sealed-{cap}", seg, per_cap_segments)
        total = sum(s.payload_size for s in sealed)
        print(f"uplink cap {cap / MB:g} Mbit/s: {per_cap_segments} segments, {total / MB:.2f} MB "
              f"(~{total * 8 / cap:.1f} s at the cap) ...", flush=True)
        run = run_uplink(setup, sealed, work / f"cap-{cap}", cap, seconds * CAP_GRACE + 10)
        rates = steady_rate(run.pop("samples"), total)
        for name in ("steady", "end_to_end"):
            if f"{name}_bps" in rates:
                rates[f"{name}_error_pct"] = 100 * (rates[f"{name}_bps"] / cap - 1)
        results.append({"cap_bps": cap, "payload_bytes": total, "segments": per_cap_segments,
                        **rates, "run": run})
    return {"seconds": seconds, "burst_bytes": BURST, "sample_s": SAMPLE_S, "caps": results}


def run_uplink_bench(work: Path, units: list[bytes], *, segments: int = 40,
                     segment_mb: float = 2.5, repeats: int = 3,
                     caps: Sequence[int] = (4_000_000, 1_000_000), cap_seconds: float = 10.0,
                     cap_segments: int = 4) -> dict[str, Any]:
    """Both parts; the figures for run/bench.json["uplink"]."""
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("curl") is None:
        raise RuntimeError("curl not found (apt-get install curl)")
    setup = make_setup(work / "keys")
    t0 = time.monotonic()
    drain = bench_drain(setup, units, work / "drain", segments, segment_mb, repeats)
    cap = bench_caps(setup, units, work / "cap", caps, cap_seconds, cap_segments)
    return {"drain": drain, "cap": cap, "wall_s": time.monotonic() - t0,
            "curl": _first_line(["curl", "--version"])}


def _first_line(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).partition("\n")[0]


# --- report ----------------------------------------------------------------------------------


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows (see run.table) for the uplink's figures."""
    d = r["drain"]
    c0, u0 = d["curl_runs"][0], d["uplink_runs"][0]
    ratio = d["ratio_uplink_vs_curl"]
    out: list[tuple[str, str]] = [
        (f"Uplink backlog drain ({d['segments']} x {d['segment_payload_bytes'] / MB:.2f} MB "
         f"sealed segments, {d['payload_bytes'] / MB:.0f} MB; loopback mTLS, real receiver; "
         f"median of {len(d['uplink_runs'])})", ""),
        ("uplink (cap 10 Gbit/s)", _drain_figures(d["uplink_runs"])),
        ("curl, one process, --next", _drain_figures(d["curl_runs"])
         + f"; {c0['connections']} connection(s), codes {'/'.join(c0['header_codes'])} + "
           f"{'/'.join(c0['payload_codes'])}"),
        ("ratio uplink / curl (MB/s)", f"{ratio:.2f}" if ratio else "n/a"),
        ("receipts verified", f"uplink {u0['receipts_verified']}/{d['segments']} "
                              f"(spool left {u0['spool_left']}, failures {u0['failures']}), "
                              f"curl {c0['receipts_verified']}/{d['segments']}"),
        (f"Uplink bandwidth cap (~{r['cap']['seconds']:g} s of payload each; counters sampled "
         f"every {1000 * r['cap']['sample_s']:g} ms)", ""),
    ]
    for c in r["cap"]["caps"]:
        steady = (f"steady {c['steady_bps'] / MB:.3f} Mbit/s ({c['steady_error_pct']:+.1f} %) "
                  f"over {c['steady_window_s']:.1f} s" if "steady_bps" in c else "steady n/a")
        e2e = (f"end to end {c['end_to_end_bps'] / MB:.3f} Mbit/s "
               f"({c['end_to_end_error_pct']:+.1f} %)" if "end_to_end_bps" in c else "")
        ok = "" if c["run"]["complete"] else "  (INCOMPLETE)"
        out.append((f"cap {c['cap_bps'] / MB:g} Mbit/s", f"{steady}, {e2e}{ok}"))
    return out


def _drain_figures(runs: list[dict[str, Any]]) -> str:
    mb = statistics.median(x["mb_per_s"] for x in runs)
    wall = statistics.median(x["wall_s"] for x in runs)
    cpu = statistics.median(x["client_cpu_s"] for x in runs)
    rx = statistics.median(x["receiver_cpu_s"] for x in runs)
    spread = ", ".join(f"{x['mb_per_s']:.0f}" for x in runs)
    return (f"{mb:6.1f} MB/s ({wall:.2f} s; runs {spread}); client CPU {cpu:.2f} s, "
            f"receiver CPU {rx:.2f} s")

