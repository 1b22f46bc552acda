"""The campaign's base: a small, real recording sealed once per run by the Sealer.

Keys come from `dualrec-tool keys device/branch` (click's CliRunner), as an operator makes them.
Device A ("box-0001") seals session A (3 segments with media, a clock anchor taken inside its
second segment), an idle segment sealed for a tamper event, and session B (2 segments): seq 0..5.
Device B ("box-0002") seals the same sessions at the same times to the same branch recipient,
plus one more idle segment (seq 0..6): the source of splices and replays, which only the keys,
the device names and the chain links can tell apart. Everything a mutation needs is kept in
memory: each file's bytes, each header's fields, each payload's decrypted tar members.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyrage
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import header_name, parse_header, payload_name
from dualrec.timebase import Anchor, Timebase
from dualrec_tools.cli import main as tool_main
from dualrec_tools.export import load_identities
from dualrec_tools.vectors import encode_video
from dualrec_tools.verify import DeviceKey, load_device_key

NS = 1_000_000_000
MS = 1_000_000
DEVICE_A, DEVICE_B = "box-0001", "box-0002"
BOOT = "00000000-0000-4000-8000-0000000000f1"
SESSION_A, SESSION_B = "20250301T090000Z-aaaaaa", "20250301T090020Z-bbbbbb"
ORIGIN_A = 1_000 * NS
ORIGIN_B = ORIGIN_A + 20 * NS
IDLE_AT = ORIGIN_A + 10 * NS
UTC0 = 1_740_819_600 * NS  # 2025-03-01T09:00:00Z at mono ORIGIN_A - 5 s
VF = VideoFormat("h264", 64, 48, 10)
AF = AudioFormat(8000, 1)
TEXTS = ("交易开始 TXN=1", "金额 1000.00", "交易结束 TXN=1")


@dataclass
class Base:
    """One run's pristine recording; read-only for the mutations."""

    root: Path
    device_dir: Path  # device A's segments, seq 0..5
    other_dir: Path  # device B's segments, seq 0..6
    headers: list[bytes]  # device A's header files by seq
    payloads: list[bytes]
    fields: list[dict[str, Any]]  # parsed headers, sig included
    members: list[list[tuple[str, bytes]]]  # each payload's tar members, in order
    other_headers: list[bytes]
    other_payloads: list[bytes]
    key: Ed25519PrivateKey  # device A's signing key
    other_key: Ed25519PrivateKey
    keys: list[DeviceKey]  # both devices' public key files, each naming its device
    identities: list[Any]  # the branch age identity
    recipient: str
    sessions: tuple[str, str]

    @property
    def n(self) -> int:
        return len(self.headers)


def _keys(directory: Path, device: str, branch: bool) -> Ed25519PrivateKey:
    runner = CliRunner()
    calls = [["keys", "device", str(directory), "--id", device]]
    if branch:
        calls.append(["keys", "branch", str(directory)])
    for args in calls:
        result = runner.invoke(tool_main, args)
        if result.exit_code != 0:
            raise RuntimeError(f"dualrec-tool {' '.join(args)}: {result.output}")
    key = load_pem_private_key((directory / "device.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def _video(n: int, t0: int) -> list[VideoPacket]:
    return encode_video(VF, n, t0, lambda i: (i * 23) % 200, gop=5)


def _audio(t0: int, seconds: int, block: int = 800) -> list[AudioBlock]:
    pcm = np.random.default_rng(t0 % 997).normal(0, 300, AF.rate * seconds).astype("<i2")
    return [AudioBlock(t0 + k * NS // AF.rate, pcm[k:k + block].tobytes(),
                       len(pcm[k:k + block])) for k in range(0, len(pcm), block)]


def _session_segment(session: str, index: int, origin: int, final: bool) -> Segment:
    t0, end = origin + index * NS, origin + (index + 1) * NS
    seg = Segment(session, index, origin, t0, end_ns=end,
                  reason="session_end" if final else "duration", final=final,
                  video_format=VF, audio_format=AF)
    seg.video = _video(VF.fps, t0)
    seg.audio = _audio(t0, 1)
    step = NS // (len(TEXTS) + 1)
    seg.lines = [LogLine(t0 + step * (k + 1), (text + "\r\n").encode("gb18030"), text)
                 for k, text in enumerate(TEXTS)]
    if index == 0:
        seg.events.append(Event(origin, "session_start", {
            "trigger": "button", "trigger_mono_ns": origin + 200 * MS, "preroll_ns": 200 * MS}))
    if final:
        seg.events.append(Event(end - 1, "session_stop", {"trigger": "button"}))
    return seg


def _idle_segment(at: int) -> Segment:
    seg = Segment("", 0, at, at, end_ns=at + 1, reason="tamper", final=True)
    seg.events.append(Event(at, "tamper", {"input": "case"}))
    return seg


def _seal(spool: Path, state: Path, device: str, key: Ed25519PrivateKey, recipient: str,
          extra_idle: bool) -> None:
    tb = Timebase()
    tb.anchors = [Anchor(ORIGIN_A - 5 * NS, UTC0, "system", True, 2 * MS),
                  Anchor(ORIGIN_A + 1500 * MS, UTC0 + 6500 * MS + 7 * MS, "chrony", True, MS)]
    sealer = Sealer(device_id=device, key=key, recipients=[recipient], spool_dir=spool,
                    chain=ChainState(state), timebase=tb, boot_id=BOOT)
    try:
        for i in range(3):
            sealer.seal(_session_segment(SESSION_A, i, ORIGIN_A, final=i == 2))
        sealer.seal(_idle_segment(IDLE_AT))
        for i in range(2):
            sealer.seal(_session_segment(SESSION_B, i, ORIGIN_B, final=i == 1))
        if extra_idle:
            sealer.seal(_idle_segment(ORIGIN_B + 5 * NS))
    finally:
        sealer.close()


def _files(spool: Path) -> tuple[list[bytes], list[bytes]]:
    headers, payloads = [], []
    seq = 0
    while (spool / header_name(seq)).exists():
        headers.append((spool / header_name(seq)).read_bytes())
        payloads.append((spool / payload_name(seq)).read_bytes())
        seq += 1
    return headers, payloads


def _members(ciphertext: bytes, identities: list[Any]) -> list[tuple[str, bytes]]:
    plain = pyrage.decrypt(ciphertext, identities)
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        out = []
        for m in tar.getmembers():
            f = tar.extractfile(m)
            out.append((m.name, f.read() if f is not None else b""))
    return out


def build_base(root: Path) -> Base:
    """Seal both devices' recordings under root (a fresh directory)."""
    keys_a, keys_b = root / "keys-a", root / "keys-b"
    key_a = _keys(keys_a, DEVICE_A, branch=True)
    key_b = _keys(keys_b, DEVICE_B, branch=False)
    recipient = (keys_a / "branch.recipient").read_text().strip()
    device_dir, other_dir = root / "device-a", root / "device-b"
    _seal(device_dir, root / "state-a.db", DEVICE_A, key_a, recipient, extra_idle=False)
    _seal(other_dir, root / "state-b.db", DEVICE_B, key_b, recipient, extra_idle=True)
    identities = load_identities(keys_a / "branch.agekey")
    headers, payloads = _files(device_dir)
    other_headers, other_payloads = _files(other_dir)
    return Base(
        root=root, device_dir=device_dir, other_dir=other_dir,
        headers=headers, payloads=payloads, fields=[parse_header(h) for h in headers],
        members=[_members(p, identities) for p in payloads],
        other_headers=other_headers, other_payloads=other_payloads,
        key=key_a, other_key=key_b,
        keys=[load_device_key(keys_a / "device.pub"), load_device_key(keys_b / "device.pub")],
        identities=identities, recipient=recipient, sessions=(SESSION_A, SESSION_B),
    )
