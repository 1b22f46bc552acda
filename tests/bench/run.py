"""`make bench`: what the gateway costs against doing the same streams the plain way.

Run as ``python -m tests.bench.run [--seconds 60]``. In order:

1. Pre-encode a 1080p30 H.264 clip (~8 Mbit/s, GOP 30, textured moving content) once, in memory;
   its encoding is not measured. It is replayed by ReplayCamera the way a Pi's hardware encoder
   hands out access units.
2. Run the real gateway in a child process (tests.bench.gateway_child) for --seconds in
   continuous mode: ReplayCamera 1080p30, SimMicrophone 48 kHz, and the real SerialOpLog on a pty
   fed by a busy terminal (tests.bench.oplog_writer, --oplog-rate lines/s of GB18030). Its CPU and
   peak RSS come from wait4(), so they are the child's own; the child also reports its CPU around
   Gateway.run alone, without interpreter start-up.
3. Baseline on the same machine: the same H.264 stream, PCM and log bytes as files (written
   before measuring), then ``ffmpeg -c copy -f matroska - | age -r R | sha256sum`` (with the log
   bytes appended to age's input), measured the same way.
4b. Under a CPU hog: the gateway again, at the unit's Nice=-5, while `stress-ng --cpu N` (N =
   cores, nice 0; scripts/setup-bench.sh installs it) keeps every core busy: dropped frames,
   source lateness, log lines kept, and the audio-log offsets at the clapper instants (the
   terminal writes MARK lines when the sim microphone beeps) against the quiet run's.
   --no-hog leaves it out.
4. Sealing throughput on real packed segments (~10 s each): Sealer.seal, pyrage.encrypt plus
   the durable write, and the `age` CLI writing the same bytes to a file.
5. The uplink (tests.bench.uplink_bench), over loopback mutual TLS to the real receiver in a
   subprocess: backlog drain throughput against curl uploading the same sealed files the same
   way, and the achieved payload rate against the bandwidth cap at two settings.

6. The Pico serial tap (tests.bench.tap_bench): --tap-seconds of a terminal at 921600 baud through
   the tap firmware on the MicroPython unix port (ptys as its UART and USB) into PicoTapOpLog:
   bytes sent, received and lost, and the error of the lines' timestamps (p50, p99).

It prints a table and writes the figures to run/bench.json. Nothing is asserted: a benchmark,
not a test. With --profile, an extra (unmeasured) gateway run under py-spy lists hot spots.
With --skip-gateway only the clip and part 5 run (quick iteration on the uplink); their figures
replace the "uplink" entry of an existing run/bench.json and leave the rest of it as it was.
With --only-tap only part 6 runs, and replaces the "tap" entry the same way.

7. The receiver under load and attack (tests.bench.receiver_bench): 50 boxes at their bandwidth
   cap, alone and while an attacker holds 2,000 idle connections and 100 slow uploads. With
   --only-receiver only part 7 runs, and replaces the "receiver" entry the same way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyrage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec.chain import ChainState
from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.durable import fsync_dir, write_durable
from dualrec.h264 import is_idr
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.sim.terminal import stamp_line
from dualrec.timebase import Timebase

# The uplink, tap and receiver parts are imported where they run: --core needs none of them.
from .clip import encode_clip, looped, noise_pcm
from .oplog_writer import bodies, log_bytes

ROOT = Path(__file__).resolve().parents[2]
NS = 1_000_000_000
MB = 1_000_000
WIDTH, HEIGHT, FPS, GOP = 1920, 1080, 30, 30
RATE = 48000
BLOCK = 960  # SimMicrophone's default block: 20 ms
CLAP_PERIOD_MS = 7000  # boards/sim.toml's [sim] clap_period_ms: the microphone's beeps
# The unit's Nice=-5 (packaging), for the gateway under the CPU hog (part 4b).
UNIT_NICE = -5
# A child that overruns its run by this much is killed: the bench always ends by itself.
GRACE_S = 120


@dataclass
class Usage:
    """One child process's resources, as wait4() reports them (its waited-for children too)."""

    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    exit_code: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_measured(cmd: Sequence[str], *, timeout_s: float, stdin_data: bytes | None = None,
                 **popen: Any) -> Usage:
    """Run cmd to its end through tests.bench.measure and return its own rusage.

    Not straight from here, and not RUSAGE_CHILDREN: a child's peak RSS would include this
    process's size (the kernel keeps it over exec), and RUSAGE_CHILDREN's ru_maxrss is the
    largest of all children ever waited for, not this one's.
    """
    with tempfile.NamedTemporaryFile(prefix="measure-", suffix=".json") as report:
        wrapped = [sys.executable, "-m", "tests.bench.measure", "--out", report.name,
                   "--timeout", str(timeout_s), "--", *cmd]
        env = popen.pop("env", None) or child_env()
        proc = subprocess.Popen(wrapped, stdin=subprocess.PIPE if stdin_data is not None else None,
                                env=env, **popen)
        if stdin_data is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        # The helper kills cmd at timeout_s; this bound only guards against the helper itself.
        proc.wait(timeout_s + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {cmd[0]} failed ({proc.returncode})")
        r = json.loads(Path(report.name).read_text())
    return Usage(r["wall_s"], r["user_s"], r["sys_s"], r["maxrss_kib"], r["exit_code"])


def child_env() -> dict[str, str]:
    paths = [str(ROOT / "firmware"), str(ROOT / "host_tools"), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# --- set-up ----------------------------------------------------------------------------------


@dataclass
class Keys:
    device_key: Path
    device: Ed25519PrivateKey
    identity: pyrage.x25519.Identity
    recipient: str


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True)
    device = Ed25519PrivateKey.generate()
    path = directory / "device.key"
    path.write_bytes(device.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    (directory / "device.pub").write_bytes(device.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    identity = pyrage.x25519.Identity.generate()
    # Written too, so a spool kept with --workdir can be opened with age or dualrec-tool.
    agekey = directory / "branch.agekey"
    agekey.touch(mode=0o600)
    agekey.write_text(f"# dualrec bench identity\n{identity}\n")
    return Keys(path, device, identity, str(identity.to_public()))


def write_site(directory: Path, keys: Keys, port: Path) -> Path:
    directory.mkdir(parents=True)
    site = directory / "site.toml"
    # 921600 baud: the pty ignores it, but a line carrying the bench's load would need it.
    site.write_text(f"""
[device]
id = "bench-0001"
key = "{keys.device_key}"

[recording]
mode = "continuous"

[oplog]
port = "{port}"
baud = 921600

[seal]
recipients = ["{keys.recipient}"]

[spool]
dir = "{directory / 'spool'}"
state = "{directory / 'state' / 'state.db'}"
""")
    return site


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable: {exc}"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else ""


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "ffmpeg": tool_version(["ffmpeg", "-version"]),
        "age": tool_version(["age", "--version"]),
    }


# --- the gateway -----------------------------------------------------------------------------


def run_gateway(work: Path, keys: Keys, clip_path: Path, seconds: float, oplog_rate: float,
                wrapper: Sequence[str] = (), writer_wrapper: Sequence[str] = (),
                clap_period_ms: int = CLAP_PERIOD_MS, child_args: Sequence[str] = (),
                ) -> tuple[Usage, dict[str, Any], dict[str, Any]]:
    """One gateway child with its busy terminal; (wait4 usage, child report, writer summary).
    The terminal writes a MARK line at every clapper instant (the sim microphone beeps then)."""
    link = work / "ttyBENCH"
    site = write_site(work / "site", keys, link)
    report = work / "gateway.json"
    stderr_path = work / "gateway.stderr"
    env = child_env()
    writer = subprocess.Popen(
        [*writer_wrapper, sys.executable, "-m", "tests.bench.oplog_writer", "--link", str(link),
         "--rate", str(oplog_rate), "--duration-s", str(seconds + 60),
         "--clap-period-ms", str(clap_period_ms)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout is not None
        ready = writer.stdout.readline()
        if not ready.startswith("READY"):
            raise RuntimeError(f"oplog writer did not start: {ready!r}")
        cmd = [*wrapper, sys.executable, "-m", "tests.bench.gateway_child",
               "--board", str(ROOT / "boards" / "sim.toml"), "--site", str(site),
               "--clip", str(clip_path), "--width", str(WIDTH), "--height", str(HEIGHT),
               "--fps", str(FPS), "--seconds", str(seconds), "--out", str(report),
               *child_args]
        with stderr_path.open("wb") as err:
            usage = run_measured(cmd, timeout_s=seconds + GRACE_S, cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
    finally:
        writer.terminate()
        try:
            out, _ = writer.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, _ = writer.communicate()
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    errors = stderr_path.read_text(errors="replace")
    if usage.exit_code != 0 or not report.exists():
        raise RuntimeError(f"gateway child failed ({usage.exit_code}):\n{errors[-3000:]}")
    result = json.loads(report.read_text())
    result["stderr_lines"] = errors.count("\n")
    result["stderr_tail"] = errors.splitlines()[-5:]
    return usage, result, summary


def check_payload(spool: Path, identity: pyrage.x25519.Identity) -> dict[str, Any]:
    """Decrypt the newest payload: proof that what was measured is a real, readable segment."""
    payloads = sorted(spool.glob("*.payload.age"))
    if not payloads:
        return {"ok": False, "reason": "no payload"}
    plain = pyrage.decrypt(payloads[-1].read_bytes(), [identity])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = {m.name: m.size for m in tar.getmembers()}
    return {"ok": "media.mkv" in members, "file": payloads[-1].name, "members": members}


def _beep_onsets(mkv: bytes, origin_ns: int) -> list[int]:
    """CLOCK_MONOTONIC times of the beep onsets in a segment's media.mkv (audio alone is
    decoded, with dualrec_tools.sync's threshold and quiet gap)."""
    from dualrec_tools.sync import BEEP_THRESHOLD, QUIET_NS, _amplitude

    onsets: list[int] = []
    last: int | None = None
    with av.open(io.BytesIO(mkv)) as container:
        if not container.streams.audio:
            return onsets
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            if frame.pts is None or frame.time_base is None:
                continue
            t0 = frame.pts * frame.time_base.numerator * NS // frame.time_base.denominator
            for i in np.flatnonzero(_amplitude(frame) > BEEP_THRESHOLD):
                t = t0 + int(i) * NS // frame.sample_rate
                if last is None or t - last > QUIET_NS:
                    onsets.append(origin_ns + t)
                last = t
    return onsets


def clapper_sync(spool: Path, identity: pyrage.x25519.Identity) -> dict[str, Any]:
    """At each clapper instant: how late the log stamped its MARK line (first byte on the
    wire), how far the beep's onset in the recorded audio is from it, and audio - log, the
    offset a reviewer sees between the two streams (dualrec_tools.sync's audio_log)."""
    from dualrec.segment_format import parse_header

    origins: dict[str, int] = {}
    marks: dict[int, int] = {}  # clap instant -> the log's stamp
    beeps: list[int] = []
    for hdr_path in sorted(spool.glob("*.hdr.json")):
        h = parse_header(hdr_path.read_bytes())
        if not h["session"]:
            continue
        if h["session_index"] == 0:
            origins[h["session"]] = h["start"]["mono_ns"]
        payload = spool / hdr_path.name.replace(".hdr.json", ".payload.age")
        plain = pyrage.decrypt(payload.read_bytes(), [identity])
        with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                       if m.isfile()}  # type: ignore[union-attr]
        for line in members.get("oplog.jsonl", b"").splitlines():
            rec = json.loads(line)
            words = rec["text"].split()
            if len(words) >= 3 and words[0] == "MARK" and words[2].startswith("t="):
                marks[int(words[2][2:])] = rec["t_mono_ns"]
        if "media.mkv" in members and h["session"] in origins:
            beeps += _beep_onsets(members["media.mkv"], origins[h["session"]])
    claps = []
    for clap, logged in sorted(marks.items()):
        near = min(beeps, key=lambda b: abs(b - clap), default=None)
        audio = near if near is not None and abs(near - clap) < NS // 2 else None
        claps.append({"clap_ns": clap, "log_late_ms": (logged - clap) / 1e6,
                      "audio_ms": None if audio is None else (audio - clap) / 1e6,
                      "audio_log_ms": None if audio is None else (audio - logged) / 1e6})
    found = [c for c in claps if c["audio_log_ms"] is not None]
    return {"claps": claps, "marks": len(marks), "with_beep": len(found),
            "max_abs_audio_log_ms": max((abs(c["audio_log_ms"]) for c in found), default=None),
            "max_log_late_ms": max((c["log_late_ms"] for c in claps), default=None)}


def hog_command(seconds: float) -> list[str] | None:
    """stress-ng with one CPU worker per core at normal priority, or None if not installed
    (scripts/setup-bench.sh installs it)."""
    exe = shutil.which("stress-ng")
    if exe is None:
        return None
    return [exe, "--cpu", str(os.cpu_count() or 1), "--timeout", f"{int(seconds)}s", "--quiet"]


def run_under_hog(work: Path, keys: Keys, clip_path: Path, seconds: float,
                  oplog_rate: float) -> dict[str, Any]:
    """Part 4b: the gateway at the unit's Nice=-5 while stress-ng keeps every core busy at
    nice 0. The terminal (another machine at a counter) runs at nice -10 here, so that its MARK
    lines leave on time and any lateness is the gateway's."""
    cmd = hog_command(seconds + 90)
    if cmd is None:
        print("hog: stress-ng not found (scripts/setup-bench.sh installs it); skipped",
              flush=True)
        return {"skipped": "stress-ng not installed"}
    print(f"hog: gateway at nice {UNIT_NICE} for {seconds:g} s under {' '.join(cmd[:3])} ...",
          flush=True)
    hog_work = work / "hog"
    hog_work.mkdir()
    hog = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load: list[float] = []
    try:
        time.sleep(2)  # the hog is running everywhere before the gateway starts
        usage, gw, writer = run_gateway(hog_work, keys, clip_path, seconds, oplog_rate,
                                        wrapper=["nice", "-n", str(UNIT_NICE)],
                                        writer_wrapper=["nice", "-n", "-10"])
        load = list(os.getloadavg())
    finally:
        hog.terminate()
        try:
            hog.wait(10)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()
    return {"usage": asdict(usage), "gateway": gw, "writer": writer, "load_avg": load,
            "hog": cmd, "sync": clapper_sync(Path(gw["spool"]), keys.identity)}


def hog_rows(quiet: dict[str, Any], quiet_writer: dict[str, Any],
             quiet_sync: dict[str, Any], hog: dict[str, Any]) -> list[tuple[str, str]]:
    if "skipped" in hog:
        return [("Under a CPU hog", ""), ("skipped", hog["skipped"])]
    gw, writer, sync = hog["gateway"], hog["writer"], hog["sync"]

    def offsets(s: dict[str, Any]) -> str:
        vals = [f"{c['audio_log_ms']:+.1f}" for c in s["claps"] if c["audio_log_ms"] is not None]
        return (f"{' '.join(vals) or 'none'} ms (log stamp late by at most "
                f"{s['max_log_late_ms'] or 0:.1f} ms; {s['with_beep']}/{s['marks']} claps)")

    def kept(g: dict[str, Any], w: dict[str, Any]) -> str:
        sent = w.get("lines", 0) + w.get("marks", 0) - w.get("unheard", 0)
        return f"{g['oplog_lines']} of {sent} sent with the port open"

    return [
        (f"Under a CPU hog ({Path(hog['hog'][0]).name} --cpu "
         f"{hog['hog'][2]} at nice 0, gateway at nice {UNIT_NICE}; load average "
         f"{' '.join(f'{x:.1f}' for x in hog['load_avg'])})", ""),
        ("video frames / drops", f"{gw['video_frames']} / {gw['video_drops']} (quiet run: "
                                 f"{quiet['video_frames']} / {quiet['video_drops']})"),
        ("microphone late p99 / max", "{p99:.1f} / {max:.1f} ms".format(**gw["microphone_late_ms"])
         + " (quiet run: {p99:.1f} / {max:.1f} ms)".format(**quiet["microphone_late_ms"])),
        ("camera late p99 / max", "{p99:.1f} / {max:.1f} ms".format(**gw["camera_late_ms"])
         + " (quiet run: {p99:.1f} / {max:.1f} ms)".format(**quiet["camera_late_ms"])),
        ("log lines kept", f"{kept(gw, writer)} (quiet run: {kept(quiet, quiet_writer)})"),
        ("sync audio - log at the claps", offsets(sync)),
        ("  quiet run", offsets(quiet_sync)),
    ]


# --- the baseline ----------------------------------------------------------------------------


def run_baseline(work: Path, recipient: str, seconds: int, repeats: int) -> dict[str, Any]:
    q = shlex.quote
    pipeline = (
        "set -o pipefail; { ffmpeg -nostdin -loglevel error "
        f"-f h264 -framerate {FPS} -i {q(str(work / 'video.h264'))} "
        f"-f s16le -ar {RATE} -ac 1 -i {q(str(work / 'audio.pcm'))} "
        f"-c copy -f matroska - && cat {q(str(work / 'oplog.bin'))}; }} "
        f"| age -r {q(recipient)} | sha256sum > {q(str(work / 'baseline.sha256'))}"
    )
    runs = []
    for _ in range(repeats):
        usage = run_measured(["bash", "-c", pipeline], timeout_s=GRACE_S)
        if usage.exit_code != 0:
            raise RuntimeError(f"baseline pipeline failed with {usage.exit_code}: {pipeline}")
        runs.append(usage)
    cpu = statistics.median(u.cpu_s for u in runs)
    return {
        "command": pipeline,
        "runs": [asdict(u) for u in runs],
        "cpu_s": cpu,
        "wall_s": statistics.median(u.wall_s for u in runs),
        "peak_rss_kib": max(u.maxrss_kib for u in runs),
        "recorded_s": seconds,
        "cpu_per_recorded_s": cpu / seconds,
        "input_bytes": sum((work / n).stat().st_size
                           for n in ("video.h264", "audio.pcm", "oplog.bin")),
    }


# --- sealing throughput ----------------------------------------------------------------------


def bench_segment(units: list[bytes], seconds: int, oplog_rate: float) -> Segment:
    """A real segment: `seconds` of the looped clip, PCM in SimMicrophone blocks, log lines."""
    vf = VideoFormat("h264", WIDTH, HEIGHT, FPS)
    seg = Segment("20250301T090000Z-be0002", 0, 0, 0, seconds * NS, reason="duration",
                  video_format=vf, audio_format=AudioFormat(RATE, 1))
    for i, unit in enumerate(looped(units, seconds * FPS)):
        seg.video.append(VideoPacket(i * NS // FPS, unit, is_idr(unit), i))
    pcm = noise_pcm(seconds)
    for k in range(0, seconds * RATE, BLOCK):
        seg.audio.append(AudioBlock(k * NS // RATE, pcm[2 * k : 2 * (k + BLOCK)], BLOCK))
    source = bodies(1)
    n_lines = int(seconds * oplog_rate)
    for j in range(n_lines):
        raw = stamp_line(next(source))
        seg.lines.append(LogLine(j * seconds * NS // n_lines, raw,
                                 raw.decode("gb18030").rstrip("\r\n")))
    seg.events.append(Event(0, "session_start", {"trigger": "continuous"}))
    return seg


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _tree_cpu() -> float:
    """This process's CPU and its reaped children's (the sealer's age processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_sealing(work: Path, keys: Keys, units: list[bytes], segments: int,
                  segment_s: int, oplog_rate: float) -> dict[str, Any]:
    seg = bench_segment(units, segment_s, oplog_rate)
    timebase = Timebase()
    plaintext = seg.pack(timebase.clock_json(seg.start_ns, seg.end_ns))
    total = len(plaintext) * segments
    recipients = [pyrage.x25519.Recipient.from_str(keys.recipient)]
    out: dict[str, Any] = {"segment_plaintext_bytes": len(plaintext), "segments": segments}

    def record(name: str, wall: float, cpu: float, nbytes: int = total) -> None:
        out[name] = {"wall_s": wall, "cpu_s": cpu, "mb_per_s_wall": nbytes / MB / wall,
                     "mb_per_s_cpu": nbytes / MB / cpu if cpu > 0 else None}

    # Sealer.seal: the gateway's whole per-segment path (mux, tar, encrypt, hash, sign,
    # two durable writes, chain commit), on the same segment each time; then pyrage alone,
    # pyrage plus the durable write, and the age CLI, on the same plaintext. The four are
    # interleaved segment by segment, so a burst of load on a shared machine (and the disk's
    # writeback) hits them alike: the ratios are what matters, not the MB/s.
    spool = work / "seal" / "spool"
    chain = ChainState(work / "seal" / "state" / "state.db")
    sealer = Sealer(device_id="bench-0001", key=keys.device, recipients=[keys.recipient],
                    spool_dir=spool, chain=chain, timebase=timebase,
                    boot_id="00000000-0000-4000-8000-0000000000be")
    durable_dir = work / "seal" / "pyrage"
    durable_dir.mkdir(parents=True)
    age_dir = work / "seal" / "age"
    age_dir.mkdir(parents=True)
    names = ("sealer_seal", "pyrage_encrypt", "pyrage_durable", "age_cli_durable")
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    per_segment_ratio = []
    sealer.seal(seg)  # once untimed: the encryption process's start is not a segment's cost
    for i in range(segments):
        seg.index = i + 1
        c0, t0 = _tree_cpu(), time.monotonic()
        sealer.seal(seg)
        seal_wall = time.monotonic() - t0
        wall["sealer_seal"] += seal_wall
        # the encryption process's CPU (a child of this one, once reaped) counts too
        cpu["sealer_seal"] += _tree_cpu() - c0

        c0, t0 = _self_cpu(), time.monotonic()
        pyrage.encrypt(plaintext, recipients)
        wall["pyrage_encrypt"] += time.monotonic() - t0
        cpu["pyrage_encrypt"] += _self_cpu() - c0

        c0, t0 = _self_cpu(), time.monotonic()
        write_durable(durable_dir / f"{i}.age", pyrage.encrypt(plaintext, recipients))
        wall["pyrage_durable"] += time.monotonic() - t0
        cpu["pyrage_durable"] += _self_cpu() - c0

        # The age CLI writing the same bytes to a file, then fsync'd like write_durable does,
        # so both sides pay for getting the bytes onto the disk: age's own time (from the
        # measuring helper, so its start-up is not counted) plus the fsyncs done here.
        path = age_dir / f"{i}.age"
        usage = run_measured(["age", "-r", keys.recipient, "-o", str(path)],
                             timeout_s=GRACE_S, stdin_data=plaintext)
        if usage.exit_code != 0:
            raise RuntimeError(f"age failed with {usage.exit_code}")
        c0, t0 = _self_cpu(), time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(age_dir)
        age_wall = usage.wall_s + time.monotonic() - t0
        wall["age_cli_durable"] += age_wall
        cpu["age_cli_durable"] += usage.cpu_s + _self_cpu() - c0
        per_segment_ratio.append(age_wall / seal_wall)
    chain.close()
    sealer.close()
    for name in names:
        record(name, wall[name], cpu[name])
    # Segment by segment, Sealer.seal's rate over age's measured right after it.
    out["sealer_seal_vs_age_median"] = statistics.median(per_segment_ratio)
    return out


# --- profiling -------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


# Frames every stack has (thread start-up, runpy, the bench child's main): no information.
_BOILERPLATE = ("Thread._bootstrap", "Thread.run ", "_run_module_as_main", "_run_code",
                "<module> (bench/", "main (bench/", "<module> (tests/bench/", "main (tests/bench/")


def summarize_profile(folded: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of samples per function, and per thread, from py-spy's raw
    (folded) output; imports and boilerplate frames left out."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        if any("<frozen importlib" in f for f in frames):
            continue  # start-up imports: not the gateway's running cost
        count = int(count_s)
        total += count
        if frames[0].startswith("thread "):
            # "thread (12345): name" -> "name"; the id differs from run to run
            threads[frames[0].partition("): ")[2] or frames[0]] += count
            frames = frames[1:]
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            if not f.startswith(_BOILERPLATE):
                incl[f] += count
    if not total:
        return {}

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in c.most_common(top)]

    return {"self": share(own), "inclusive": share(incl), "threads": share(threads)}


# --- report ----------------------------------------------------------------------------------


def table(rows: list[tuple[str, str]]) -> str:
    """Section titles (rows without a value) flush left, figures aligned under them."""
    width = max(len(k) for k, v in rows if v)
    return "\n".join(f"  {k:<{width}}  {v}" if v else k for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="gateway session length")
    ap.add_argument("--clip-seconds", type=int, default=4)
    ap.add_argument("--bitrate", type=int, default=8_000_000)
    ap.add_argument("--oplog-rate", type=float, default=200.0, help="log lines per second")
    ap.add_argument("--seal-segments", type=int, default=10)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "run" / "bench.json")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the bench's files here (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true",
                    help="also run the gateway under py-spy (unmeasured) and list hot spots")
    ap.add_argument("--only-tap", action="store_true",
                    help="run only the Pico tap part (6); it replaces the \"tap\" entry")
    ap.add_argument("--only-receiver", action="store_true",
                    help="run only the receiver part (7); it replaces the \"receiver\" entry")
    ap.add_argument("--receiver-segments", type=int, default=4,
                    help="segments per simulated box in part 7")
    ap.add_argument("--tap-seconds", type=float, default=60.0,
                    help="length of the tap's 921600-baud stream")
    ap.add_argument("--tap-sync", action="store_true",
                    help="the box pulses the tap's sync input: clock fitted to the pulses")
    ap.add_argument("--core", action="store_true",
                    help="only the gateway, baseline and sealing parts (1-4): quick iteration "
                         "on the box's own cost")
    ap.add_argument("--no-hog", action="store_true",
                    help="leave out part 4b (the gateway under stress-ng)")
    ap.add_argument("--skip-gateway", action="store_true",
                    help="run only the uplink part (clip, then part 5)")
    ap.add_argument("--uplink-segments", type=int, default=40,
                    help="sealed segments in the drained backlog")
    ap.add_argument("--uplink-segment-mb", type=float, default=2.5)
    ap.add_argument("--uplink-repeats", type=int, default=3,
                    help="(curl, uplink) drain runs; medians are reported")
    ap.add_argument("--cap-seconds", type=float, default=10.0,
                    help="payload per cap run, in seconds at that cap")
    ap.add_argument("--caps", type=lambda v: [int(x) for x in v.split(",")],
                    default=[4_000_000, 1_000_000], help="bandwidth caps, bit/s, comma separated")
    args = ap.parse_args(argv)
    if args.seconds < 12:
        ap.error("--seconds must be at least 12 (one 10 s segment and its cut)")
    if min(args.uplink_segments, args.uplink_repeats) < 1 or args.cap_seconds <= 0 or \
            not all(8_000 <= c <= 10_000_000_000 for c in args.caps):
        ap.error("--uplink-segments and --uplink-repeats need at least 1, --cap-seconds more "
                 "than 0, --caps values within the config's 8000..10000000000 bit/s")
    if args.tap_seconds <= 0:
        ap.error("--tap-seconds must be more than 0")

    with tempfile.TemporaryDirectory(prefix="dualrec-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _bench(args, work)


def _uplink(args: argparse.Namespace, work: Path, units: list[bytes]) -> dict[str, Any]:
    from . import uplink_bench

    return uplink_bench.run_uplink_bench(
        work / "uplink", units, segments=args.uplink_segments,
        segment_mb=args.uplink_segment_mb, repeats=args.uplink_repeats, caps=args.caps,
        cap_seconds=args.cap_seconds)


def _tap(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from . import tap_bench

    print(f"tap: {args.tap_seconds:g} s at {tap_bench.BAUD} baud through the tap firmware "
          "(MicroPython unix port) ...", flush=True)
    return tap_bench.run_tap_bench(args.tap_seconds, work / "tap", sync=args.tap_sync,
                                   echo=lambda msg: print(msg, flush=True))


def _bench_tap_only(args: argparse.Namespace, work: Path) -> int:
    info = machine_info()
    print(f"dualrec bench, Pico tap only: {info['cpu']} x{info['cores']}", flush=True)
    tap = _tap(args, work)
    results: dict[str, Any] = {}
    if args.out.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(args.out.read_text())
    results.setdefault("machine", info)
    results["tap"] = tap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    from . import tap_bench

    print(table(tap_bench.rows(tap)))
    print(f"\nwritten: {args.out} (tap entry)")
    return 0


def _bench_uplink_only(args: argparse.Namespace, work: Path) -> int:
    info = machine_info()
    print(f"dualrec bench, uplink only: {info['cpu']} x{info['cores']}", flush=True)
    t0 = time.monotonic()
    units = encode_clip(args.clip_seconds, WIDTH, HEIGHT, FPS, GOP, args.bitrate)
    print(f"clip: {len(units)} frames, encoded in {time.monotonic() - t0:.1f} s (not measured)",
          flush=True)
    uplink = _uplink(args, work, units)
    results: dict[str, Any] = {}
    if args.out.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(args.out.read_text())
    results.setdefault("machine", info)
    results["uplink"] = uplink
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    from . import uplink_bench

    print(table(uplink_bench.rows(uplink)))
    print(f"\nwritten: {args.out} (uplink entry)")
    return 0


def _receiver(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from . import receiver_bench

    print("receiver: 50 boxes alone, then under attack ...", flush=True)
    return receiver_bench.run_receiver_bench(work / "receiver",
                                             segments=args.receiver_segments)


def _bench_receiver_only(args: argparse.Namespace, work: Path) -> int:
    info = machine_info()
    print(f"dualrec bench, receiver only: {info['cpu']} x{info['cores']}", flush=True)
    receiver = _receiver(args, work)
    results: dict[str, Any] = {}
    if args.out.exists():
        with contextlib.suppress(ValueError):
            results = json.loads(args.out.read_text())
    results.setdefault("machine", info)
    results["receiver"] = receiver
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print()
    from . import receiver_bench

    print(table(receiver_bench.rows(receiver)))
    print(f"\nwritten: {args.out} (receiver entry)")
    return 0


def _bench(args: argparse.Namespace, work: Path) -> int:
    if args.only_tap:
        return _bench_tap_only(args, work)
    if args.only_receiver:
        return _bench_receiver_only(args, work)
    if args.skip_gateway:
        return _bench_uplink_only(args, work)
    seconds = args.seconds
    info = machine_info()
    load_start = os.getloadavg()
    print(f"dualrec bench: {seconds} s session, {info['cpu']} x{info['cores']}, load average "
          f"{' '.join(f'{x:.2f}' for x in load_start)} (1, 5, 15 min)", flush=True)
    keys = make_keys(work / "keys")

    t0 = time.monotonic()
    units = encode_clip(args.clip_seconds, WIDTH, HEIGHT, FPS, GOP, args.bitrate)
    clip_bytes = sum(len(u) for u in units)
    clip = {
        "frames": len(units),
        "bytes": clip_bytes,
        "mbit_per_s": clip_bytes * 8 / (len(units) / FPS) / MB,
        "keyframe_bytes": [len(u) for u in units if is_idr(u)],
        "encode_s": time.monotonic() - t0,
    }
    print(f"clip: {len(units)} frames, {clip['mbit_per_s']:.2f} Mbit/s, encoded in "
          f"{clip['encode_s']:.1f} s (not measured)", flush=True)
    clip_path = work / "clip.h264"
    clip_path.write_bytes(b"".join(units))

    # Baseline inputs, the same streams the gateway will get, written before anything is timed.
    (work / "video.h264").write_bytes(b"".join(looped(units, seconds * FPS)))
    (work / "audio.pcm").write_bytes(noise_pcm(seconds, RATE))
    (work / "oplog.bin").write_bytes(log_bytes(int(seconds * args.oplog_rate)))

    print(f"gateway: running {seconds} s ...", flush=True)
    gw_work = work / "gateway"
    gw_work.mkdir()
    usage, gw, writer = run_gateway(gw_work, keys, clip_path, seconds, args.oplog_rate)
    payload_check = check_payload(Path(gw["spool"]), keys.identity)
    quiet_sync = clapper_sync(Path(gw["spool"]), keys.identity)
    recorded = gw["recorded_s"] or float(seconds)
    # The child's sampling thread (per-thread CPU, RSS of the tree, buffers) is the bench's
    # own cost, not the gateway's: taken off both figures.
    monitor_s = gw.get("bench_monitor_cpu_s", 0.0)
    gw["run_cpu_s"] -= monitor_s
    usage.user_s -= monitor_s
    gw_run_per_s = gw["run_cpu_s"] / recorded
    gw_all_per_s = usage.cpu_s / recorded
    # The sim microphone synthesises its PCM in the gateway process, work a real microphone
    # does not put there; the figure without it is closer to the gateway's own cost.
    sim_mic_s = gw["thread_cpu_s"].get("sim-microphone", 0.0)
    gw_own_per_s = (gw["run_cpu_s"] - sim_mic_s) / recorded

    print("baseline: ffmpeg | age | sha256sum ...", flush=True)
    base = run_baseline(work, keys.recipient, seconds, args.baseline_repeats)
    base_per_s = base["cpu_per_recorded_s"]

    print(f"sealing: {args.seal_segments} segments of 10 s ...", flush=True)
    seal = bench_sealing(work, keys, units, args.seal_segments, 10, args.oplog_rate)

    hog: dict[str, Any] = {"skipped": "--no-hog"}
    if not args.no_hog:
        hog = run_under_hog(work, keys, clip_path, seconds, args.oplog_rate)

    profile: dict[str, Any] = {}
    if args.profile:
        profile = _profile(work, keys, clip_path, min(seconds, 30), args.oplog_rate)

    uplink = tap = receiver = {}
    if not args.core:
        uplink = _uplink(args, work, units)
        tap = _tap(args, work)
        receiver = _receiver(args, work)

    ratio_run = gw_run_per_s / base_per_s if base_per_s else None
    ratio_all = gw_all_per_s / base_per_s if base_per_s else None
    ratio_own = gw_own_per_s / base_per_s if base_per_s else None
    age_mb = seal["age_cli_durable"]["mb_per_s_wall"]
    results = {
        "machine": info,
        "params": {"seconds": seconds, "width": WIDTH, "height": HEIGHT, "fps": FPS, "gop": GOP,
                   "bitrate": args.bitrate, "audio_rate": RATE, "oplog_rate": args.oplog_rate,
                   "mode": "continuous"},
        "clip": clip,
        "gateway": {**gw, "process": asdict(usage), "process_cpu_s": usage.cpu_s,
                    "cpu_per_recorded_s": gw_run_per_s,
                    "process_cpu_per_recorded_s": gw_all_per_s,
                    "cpu_per_recorded_s_without_sim_microphone": gw_own_per_s,
                    "oplog_writer": writer, "payload_check": payload_check},
        "baseline": base,
        "ratios": {"gateway_run_vs_baseline_cpu": ratio_run,
                   "gateway_process_vs_baseline_cpu": ratio_all,
                   "gateway_run_without_sim_microphone_vs_baseline_cpu": ratio_own,
                   "sealer_seal_vs_age_mb_s": seal["sealer_seal"]["mb_per_s_wall"] / age_mb,
                   "pyrage_durable_vs_age_mb_s": seal["pyrage_durable"]["mb_per_s_wall"] / age_mb},
        "sealing": seal,
        "clapper_sync": quiet_sync,
        "hog": hog,
        "load_avg_at_start": list(load_start),
        "load_avg_at_end": list(os.getloadavg()),
        "profile": profile,
        "uplink": uplink,
        "tap": tap,
        "receiver": receiver,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False))

    mib = 1024
    largest = sorted(gw["children_peak_rss_kib"].items(), key=lambda kv: -kv[1])[:3]
    kids = ", ".join(f"{k.partition(':')[2]} {v / mib:.0f} MiB" for k, v in largest)
    rows: list[tuple[str, str]] = [
        (f"Gateway ({seconds} s continuous; 1080p30 {clip['mbit_per_s']:.1f} Mbit/s replay, "
         f"48 kHz mono, {args.oplog_rate:g} log lines/s)", ""),
        ("recorded", f"{recorded:.1f} s in {gw['segments']} segments "
                     f"({gw['sessions']} session(s); {gw['segment_reasons']})"),
        ("sealed bytes", f"{gw['payload_bytes'] / MB:.1f} MB payload + "
                         f"{gw['header_bytes'] / 1000:.1f} kB headers"),
        ("video frames / drops", f"{gw['video_frames']} / {gw['video_drops']} "
                                 f"(camera delivered {gw['camera_delivered']})"),
        ("source delivery late, max / p99", "camera {max:.1f} / {p99:.1f} ms, ".format(
            **gw["camera_late_ms"]) + "microphone {max:.1f} / {p99:.1f} ms".format(
            **gw["microphone_late_ms"])),
        ("log lines recorded", f"{gw['oplog_lines']} ({gw['oplog_bytes'] / 1000:.0f} kB; writer "
                               f"sent {writer.get('lines', '?')}, of which "
                               f"{writer.get('unheard', '?')} with the port closed)"),
        ("CPU during run", f"{gw['run_cpu_s']:.2f} s (user {gw['run_user_s']:.2f}, "
                           f"sys {gw['run_sys_s']:.2f}; its child processes "
                           f"{gw.get('run_children_cpu_s', 0.0):.2f}; less the bench's sampler "
                           f"{monitor_s:.2f}) over {gw['run_wall_s']:.1f} s wall"),
        ("CPU per recorded second",
         f"{gw_run_per_s:.4f} s  ({100 * gw_run_per_s:.1f} % of a core)"),
        ("CPU by thread (run)", ", ".join(f"{name.split('-/')[0]} {cpu:.2f} s"
                                           for name, cpu in gw["thread_cpu_s"].items())),
        ("whole process CPU", f"{usage.cpu_s:.2f} s incl. start-up {gw['startup_cpu_s']:.2f} s "
                              f"-> {gw_all_per_s:.4f} s per recorded s"),
        ("peak RSS", f"{usage.maxrss_kib / mib:.0f} MiB (before run "
                     f"{gw['rss_before_run_kib'] / mib:.0f} MiB, at end "
                     f"{gw['rss_end_kib'] / mib:.0f} MiB)"),
        ("peak RSS, gateway + children summed",
         f"{gw['tree_peak_rss_kib'] / mib:.0f} MiB sampled every 0.5 s; bound "
         f"{gw['summed_peak_rss_bound_kib'] / mib:.0f} MiB (gateway's peak + largest child's "
         f"peak; children seen: {kids or 'none'})"),
        ("memory at milestones (VmRSS MiB)", " -> ".join(
            f"{k} {v / mib:.0f}" for k, v in gw["memory_milestones_kib"].items())),
        ("buffers at their peak (MB)", ", ".join(
            f"{k} {v / MB:.1f}" for k, v in gw["buffers_peak_bytes"].items())),
        ("RSS every 5 s (MiB)", " ".join(f"{kib / mib:.0f}" for _, kib in gw["rss_timeline_kib"])),
        ("payload check", f"{payload_check.get('file')}: "
                          f"{'ok' if payload_check.get('ok') else 'FAILED'}"),
        ("Baseline (ffmpeg -c copy mkv | age | sha256sum, same streams)", ""),
        ("CPU (median of runs)", f"{base['cpu_s']:.3f} s over {base['wall_s']:.2f} s wall, "
                                 f"peak RSS {base['peak_rss_kib'] / mib:.0f} MiB"),
        ("CPU per recorded second", f"{base_per_s:.4f} s  ({100 * base_per_s:.2f} % of a core)"),
        ("Ratio gateway / baseline (CPU per recorded s)", ""),
        ("gateway run only", f"{ratio_run:.1f}x" if ratio_run else "n/a"),
        ("run less the sim microphone's thread",
         f"{ratio_own:.1f}x ({gw_own_per_s:.4f} s per recorded s)" if ratio_own else "n/a"),
        ("whole gateway process", f"{ratio_all:.1f}x" if ratio_all else "n/a"),
        (f"Sealing ({seal['segments']} x {seal['segment_plaintext_bytes'] / MB:.1f} MB "
         "packed segment)", ""),
    ]
    names = {"sealer_seal": "Sealer.seal (pack+encrypt+sign+2 durable writes)",
             "pyrage_encrypt": "pyrage.encrypt only (memory)",
             "pyrage_durable": "pyrage.encrypt + write_durable",
             "age_cli_durable": "age CLI -o file + fsync"}
    for key, label in names.items():
        r = seal[key]
        cpu_rate = f"{r['mb_per_s_cpu']:.0f}" if r["mb_per_s_cpu"] else "n/a"
        rows.append((label, f"{r['mb_per_s_wall']:7.1f} MB/s wall, {cpu_rate} MB/s per CPU-s"))
    rows += [
        ("ratio Sealer.seal / age (wall MB/s)",
         f"{results['ratios']['sealer_seal_vs_age_mb_s']:.2f} (median of the per-segment "
         f"ratios {seal['sealer_seal_vs_age_median']:.2f})"),
        ("ratio pyrage+durable / age (wall MB/s)",
         f"{results['ratios']['pyrage_durable_vs_age_mb_s']:.2f}"),
    ]
    rows += hog_rows(gw, writer, quiet_sync, hog)
    if not args.core:
        # Imported here: the core parts run without the receiver's and uplink's modules.
        from . import receiver_bench, tap_bench, uplink_bench

        rows += [*uplink_bench.rows(uplink), *tap_bench.rows(tap), *receiver_bench.rows(receiver)]
    print()
    print(table(rows))
    print(f"\nload average at the start {' '.join(f'{x:.2f}' for x in load_start)}, at the end "
          f"{' '.join(f'{x:.2f}' for x in results['load_avg_at_end'])} (1, 5, 15 min; "
          f"{info['cores']} cores)")
    if profile.get("self"):
        print("\nGateway hot spots (py-spy --gil: share of GIL-holding samples, imports left "
              "out; self):")
        for name, share in profile["self"]:
            print(f"  {100 * share:5.1f} %  {name}")
        print("by thread:")
        for name, share in profile["threads"]:
            print(f"  {100 * share:5.1f} %  {name}")
        print("inclusive:")
        for name, share in profile["inclusive"]:
            print(f"  {100 * share:5.1f} %  {name}")
    print(f"\nwritten: {args.out}")
    return 0


def _profile(work: Path, keys: Keys, clip_path: Path, seconds: int,
             oplog_rate: float) -> dict[str, Any]:
    py_spy = find_py_spy()
    if py_spy is None:
        print("profile: py-spy not found (pip install py-spy); skipped", flush=True)
        return {"skipped": "py-spy not found"}
    print(f"profile: gateway under py-spy for {seconds} s (not measured) ...", flush=True)
    folded = work / "profile.folded"
    # --gil: only the thread holding the GIL is sampled, so waiting threads (queue gets,
    # select in pyserial, timed sleeps) do not drown the figures; work done in C with the GIL
    # released (fsync, parts of PyAV) is not seen, the sealing figures cover that.
    wrapper = [py_spy, "record", "--format", "raw", "--rate", "200", "--threads", "--gil",
               "--output", str(folded), "--"]
    prof_work = work / "profile"
    prof_work.mkdir()
    run_gateway(prof_work, keys, clip_path, seconds, oplog_rate, wrapper=wrapper)
    out = ROOT / "run" / "bench-profile.folded"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folded, out)
    return {"folded": str(out), **summarize_profile(folded)}


if __name__ == "__main__":
    raise SystemExit(main())
