"""`dualrec-tool verify` and verify_dir: an intact chain verifies; every kind of loss or tampering
(flipped bytes, deleted or swapped files, truncation, a foreign signature, a fork, reordering) is
reported with the exact seq and the right reason. Fixtures are real segments sealed by the Sealer
(H.264 from libx264 with white clapper frames, PCM with beeps, log lines with MARKs) and keys made
by `dualrec-tool keys`."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dualrec.chain import ChainState
from dualrec.samples import AudioBlock, Event, LogLine
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import (
    GENESIS_PREV,
    age_header_length,
    header_name,
    parse_header,
    payload_name,
    sign_header,
)
from dualrec.sim.clapper import BEEP_HZ, BEEP_MS
from dualrec.timebase import Timebase
from dualrec_tools.cli import main
from dualrec_tools.verify import load_device_key, verify_dir
from segments import AF, BOOT_A, VF, encode_frames

NS = 1_000_000_000
MS = 1_000_000
DEVICE = "box-0001"
ORIGIN_A = 1_000 * NS  # CLOCK_MONOTONIC of session A's media time zero
ORIGIN_B = ORIGIN_A + 20 * NS
SID_S, SID_T = "20250301T090100Z-00000e", "20250301T090200Z-00000f"
SEG_NS = 2 * NS
CLAPS_A = (500 * MS, 2_700 * MS, 4_300 * MS)  # on the 10 fps frame grid, one per segment
LINE_TEXTS = ("交易开始 TXN=1", "身份证 320102199008027712", "卡号 6217008792174210",
              "交易结束 TXN=1")


@dataclass(frozen=True)
class Recording:
    """A sealed spool: session A (seq 0..2, with claps), session B (seq 3..4)."""

    spool: Path
    keys: Path  # device.key, device.pub, branch.agekey, branch.recipient
    device_key: Ed25519PrivateKey
    session_a: str
    session_b: str
    origin_a: int
    claps_a: tuple[int, ...]  # ns since origin

    @property
    def pub(self) -> Path:
        return self.keys / "device.pub"

    @property
    def identity(self) -> Path:
        return self.keys / "branch.agekey"


def beep_audio(t0: int, seconds: int, beeps_at: list[int], block: int = 960) -> list[AudioBlock]:
    """Quiet noise with a BEEP_HZ burst starting exactly on the sample at each time in beeps_at."""
    rate = AF.rate
    n = rate * seconds
    signal = np.random.default_rng(t0 % 1000).normal(0, 100, n)
    for t in beeps_at:
        k = (t - t0) * rate // NS
        m = np.arange(min(BEEP_MS * rate // 1000, n - k))
        signal[k:k + len(m)] += 16384 * np.sin(2 * np.pi * BEEP_HZ * m / rate)
    pcm = np.clip(np.rint(signal), -32768, 32767).astype("<i2")
    return [AudioBlock(t0 + k * NS // rate, pcm[k:k + block].tobytes(), len(pcm[k:k + block]))
            for k in range(0, n, block)]


def clap_segment(session: str, index: int, origin: int, claps: tuple[int, ...],
                 seconds: int = 2, final: bool = False) -> Segment:
    """A real segment of a session: video with a white frame, a beep and a MARK line at every
    clap (ns since origin) inside it, log lines, and the session's start/stop events."""
    t0 = origin + index * seconds * NS
    end = t0 + seconds * NS
    inside = [c for c in claps if t0 <= origin + c < end]
    seg = Segment(session, index, origin, t0, end_ns=end,
                  reason="session_end" if final else "duration", final=final,
                  video_format=VF, audio_format=AF)
    white = frozenset((origin + c - t0) * VF.fps // NS for c in inside)
    seg.video = encode_frames(seconds * VF.fps, t0, fps=VF.fps, white=white)
    seg.audio = beep_audio(t0, seconds, [origin + c for c in inside])
    step = seconds * NS // (len(LINE_TEXTS) + 1)
    lines = [LogLine(t0 + step * (k + 1), (text + "\r\n").encode("gb18030"), text)
             for k, text in enumerate(LINE_TEXTS)]
    for c in inside:
        n = claps.index(c) + 1
        text = f"MARK {n} t={origin + c}"
        lines.append(LogLine(origin + c, (text + "\r\n").encode("gb18030"), text))
    seg.lines = sorted(lines, key=lambda x: x.t_mono_ns)
    if index == 0:
        seg.events.append(Event(origin, "session_start", {"trigger": "test",
                                                          "trigger_mono_ns": origin,
                                                          "preroll_ns": 0}))
    if final:
        seg.events.append(Event(end - 1, "session_stop", {"trigger": "test"}))
    return seg


def make_keys(keys: Path) -> Ed25519PrivateKey:
    runner = CliRunner()
    for args in (["keys", "device", str(keys), "--id", DEVICE], ["keys", "branch", str(keys)]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    key = load_pem_private_key((keys / "device.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def make_sealer(spool: Path, state: Path, keys: Path, key: Ed25519PrivateKey) -> Sealer:
    recipient = (keys / "branch.recipient").read_text().strip()
    return Sealer(device_id=DEVICE, key=key, recipients=[recipient], spool_dir=spool,
                  chain=ChainState(state), timebase=Timebase(), boot_id=BOOT_A)


def build_recording(base: Path) -> Recording:
    keys = base / "keys"
    key = make_keys(keys)
    sealer = make_sealer(base / "spool", base / "state.db", keys, key)
    a, b = "20250301T090000Z-aaaaaa", "20250301T090020Z-bbbbbb"
    for i in range(3):
        sealer.seal(clap_segment(a, i, ORIGIN_A, CLAPS_A, final=i == 2))
    for i in range(2):
        sealer.seal(clap_segment(b, i, ORIGIN_B, (), seconds=1, final=i == 1))
    return Recording(base / "spool", keys, key, a, b, ORIGIN_A, CLAPS_A)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return build_recording(tmp_path_factory.mktemp("recording"))


@pytest.fixture
def rec(built: Recording, tmp_path: Path) -> Recording:
    """A private copy of the recording, free to damage."""
    spool = tmp_path / "spool"
    shutil.copytree(built.spool, spool)
    return Recording(spool, built.keys, built.device_key, built.session_a, built.session_b,
                     built.origin_a, built.claps_a)


def run_verify(rec: Recording, *extra: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["verify", str(rec.spool), "--device-key", str(rec.pub),
                                       *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


def problems(rec: Recording, **kw: object) -> list[str]:
    report = verify_dir(rec.spool, [load_device_key(rec.pub)], **kw)  # type: ignore[arg-type]
    return [str(p) for p in report.problems]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def hdr(rec: Recording, seq: int) -> Path:
    return rec.spool / header_name(seq)


def pay(rec: Recording, seq: int) -> Path:
    return rec.spool / payload_name(seq)


def resign(rec: Recording, seq: int, key: Ed25519PrivateKey, **changes: object) -> bytes:
    fields = {k: v for k, v in parse_header(hdr(rec, seq).read_bytes()).items() if k != "sig"}
    return sign_header({**fields, **changes}, key)


# --- the intact chain -------------------------------------------------------------------------


def test_intact_chain_verifies(rec: Recording) -> None:
    code, out = run_verify(rec)
    assert code == 0
    assert out == ["VERIFIED: 5 segments, seq 0..4, 2 sessions"]
    report = verify_dir(rec.spool, [load_device_key(rec.pub)])
    assert report.problems == [] and report.ok_segments == 5
    assert [(s.session, s.seqs, s.status) for s in report.sessions] == [
        (rec.session_a, [0, 1, 2], "complete"), (rec.session_b, [3, 4], "complete")]
    assert report.sessions[0].duration_ns == 6 * NS


def test_keys_are_written_safely(built: Recording, tmp_path: Path) -> None:
    keys = built.keys
    assert stat.S_IMODE(os.stat(keys / "device.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys / "branch.agekey").st_mode) == 0o600
    assert load_device_key(keys / "device.pub").device == DEVICE
    lines = (keys / "branch.agekey").read_text().splitlines()
    recipient = (keys / "branch.recipient").read_text().strip()
    assert lines[0].startswith("# created: ") and lines[1] == f"# public key: {recipient}"
    assert lines[2].split("-")[:3] == ["AGE", "SECRET", "KEY"] and recipient.startswith("age1")
    runner = CliRunner()
    copy = tmp_path / "keys"
    shutil.copytree(keys, copy)
    before = (copy / "device.key").read_bytes()
    for args in (["keys", "device", str(copy), "--id", DEVICE], ["keys", "branch", str(copy)]):
        refused = runner.invoke(main, args)
        assert refused.exit_code != 0 and "already exist" in refused.output
    assert (copy / "device.key").read_bytes() == before
    assert runner.invoke(main, ["keys", "device", str(copy), "--id", DEVICE, "--force"]
                         ).exit_code == 0
    assert (copy / "device.key").read_bytes() != before
    assert runner.invoke(main, ["keys", "device", str(copy), "--id", "bad id"]).exit_code != 0


# --- tampering and loss -----------------------------------------------------------------------


def _offset_in(data: bytes, key: str, skip: int) -> int:
    return data.index(f'"{key}":"'.encode()) + len(key) + 4 + skip


@pytest.mark.parametrize(("where", "reason"), [
    ("first byte", "header invalid: header is not canonical JSON"),
    ("device value", "signature invalid (no given device key verifies it)"),
    # a flipped bit in a hex digit leaves hex (a schema finding) or changes the digest
    ("payload sha256", ("signature invalid (no given device key verifies it)",
                        "header invalid: payload.sha256")),
    ("signature", "signature invalid (no given device key verifies it)"),
    ("last byte", "header invalid: header is not canonical JSON"),
])
def test_flipped_header_byte(rec: Recording, where: str, reason: str | tuple[str, ...]) -> None:
    path = hdr(rec, 2)
    data = path.read_bytes()
    offset = {"first byte": 0, "last byte": len(data) - 1,
              "device value": _offset_in(data, "device", 0),
              "payload sha256": _offset_in(data, "sha256", 10),
              "signature": _offset_in(data, "sig", 20)}[where]
    if where == "signature":
        # a bit flip can leave the base64 alphabet ('z' ^ 1 is '{'), a schema finding instead
        # of a bad signature: swap in another alphabet character so the case never depends on
        # the random signature
        changed = bytearray(data)
        changed[offset] = ord("A") if data[offset] != ord("A") else ord("B")
        path.write_bytes(bytes(changed))
    else:
        flip(path, offset)
    code, out = run_verify(rec)
    assert code == 1 and out[-1].startswith("FAILED")
    reasons = (reason,) if isinstance(reason, str) else reason
    assert any(line.startswith(f"seq 2: {r}") for line in out for r in reasons), out
    # seq 3 was sealed after the original seq 2: its link proves the header changed since
    assert "seq 3: prev does not match hash of seq 2 (reordered, replaced or forked)" in out
    seq_lines = [line for line in out[:-1] if not line.startswith("session ")]
    assert {line.split(":")[0] for line in seq_lines} == {"seq 2", "seq 3"}, out
    if any(line.startswith("seq 2: header invalid") for line in out):  # seq 2 was A's final
        assert out[-2] == (f"session {rec.session_a}: no final segment; seq 2 after its last "
                           "(seq 1) is unreadable")
    else:
        assert len(seq_lines) == len(out) - 1


def test_flipped_payload_byte(rec: Recording) -> None:
    flip(pay(rec, 1), len(pay(rec, 1).read_bytes()) // 2)
    code, out = run_verify(rec)
    assert code == 1
    assert out == ["seq 1: payload sha256 mismatch", "FAILED: 1 problems"]


def test_truncated_payload(rec: Recording) -> None:
    data = pay(rec, 1).read_bytes()
    pay(rec, 1).write_bytes(data[:-100])
    code, out = run_verify(rec)
    assert code == 1
    assert out[:-1] == [f"seq 1: payload size {len(data) - 100} bytes, header says {len(data)} "
                        "(truncated)"]


def test_deleted_segment(rec: Recording) -> None:
    hdr(rec, 1).unlink()
    pay(rec, 1).unlink()
    code, out = run_verify(rec)
    assert code == 1
    assert out[:-1] == [
        "seq 1: missing (gap between seq 0 and seq 2)",
        f"session {rec.session_a}: session_index skips from 0 (seq 0) to 2 (seq 2)",
    ]


def test_deleted_payload_only(rec: Recording) -> None:
    pay(rec, 3).unlink()
    assert run_verify(rec) == (1, ["seq 3: payload missing", "FAILED: 1 problems"])


def test_deleted_header_only(rec: Recording) -> None:
    hdr(rec, 2).unlink()
    assert problems(rec) == ["seq 2: missing (gap between seq 1 and seq 3)",
                             "seq 2: payload without header",
                             f"session {rec.session_a}: no final segment; seq 2 after its last "
                             "(seq 1) is missing"]


def test_swapped_segments(rec: Recording) -> None:
    tmp = rec.spool / "swap"
    for name in (header_name, payload_name):
        (rec.spool / name(1)).rename(tmp)
        (rec.spool / name(2)).rename(rec.spool / name(1))
        tmp.rename(rec.spool / name(2))
    code, out = run_verify(rec)
    assert code == 1
    assert out[:-1] == ["seq 1: file name says seq 1, header says 2",
                        "seq 2: file name says seq 2, header says 1"]


def test_header_signed_by_another_key(rec: Recording, tmp_path: Path) -> None:
    other = Ed25519PrivateKey.generate()
    hdr(rec, 2).write_bytes(resign(rec, 2, other))
    code, out = run_verify(rec)
    assert code == 1
    assert out[:-1] == ["seq 2: signature invalid (no given device key verifies it)",
                        "seq 3: prev does not match hash of seq 2 (reordered, replaced or forked)"]
    # Given as a second key file that names its device, the signer is named too.
    from dualrec_tools.verify import device_pub_pem

    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(device_pub_pem(other.public_key(), "box-0002"))
    code, out = run_verify(rec, "--device-key", str(other_pub))
    assert code == 1
    assert out[0] == "seq 2: signed by the key of device box-0002, header says device box-0001"


def test_forked_seq(rec: Recording) -> None:
    """Two different headers validly signed for seq 2 (a box restored from a backup, say)."""
    hdr(rec, 5).write_bytes(resign(rec, 2, rec.device_key, firmware="9.9.9"))
    shutil.copy(pay(rec, 2), pay(rec, 5))
    code, out = run_verify(rec)
    assert code == 1
    assert out[:-1] == [
        f"seq 2: fork: 2 different headers claim seq 2 ({header_name(2)}, {header_name(5)})",
        "seq 5: file name says seq 5, header says 2",
    ]


def test_reordered_times(tmp_path: Path, built: Recording) -> None:
    """Segments sealed in an order their times contradict (within one boot)."""
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", built.keys, built.device_key)
    t = ORIGIN_A
    for index, start in ((0, t + 5 * NS), (1, t)):
        sealer.seal(Segment(SID_S, index, t, start, end_ns=start + NS,
                            reason="session_end" if index == 1 else "duration",
                            final=index == 1, events=[Event(start, "button")]))
    spool_rec = Recording(tmp_path / "spool", built.keys, built.device_key, SID_S, "", t, ())
    assert problems(spool_rec) == ["seq 1: starts before seq 0 ends (reordered)"]


def test_payload_length_age_cannot_produce(rec: Recording) -> None:
    """A device whose writer lost bytes yet signed what it wrote (pyrage's swallowed ENOSPC):
    size and hash match the header, but no plaintext length gives that ciphertext length."""
    data = pay(rec, 1).read_bytes()
    body = len(data) - age_header_length(data) - 16
    cut = data[:len(data) - (body % 65552) + 8]  # a final chunk shorter than its tag
    pay(rec, 1).write_bytes(cut)
    payload = {"size": len(cut), "sha256": hashlib.sha256(cut).hexdigest()}
    hdr(rec, 1).write_bytes(resign(rec, 1, rec.device_key, payload=payload))
    assert problems(rec)[0] == ("seq 1: payload length does not fit the age format "
                                "(a lost or partial chunk)")


def test_session_cut_off(tmp_path: Path, built: Recording) -> None:
    """A session that never got its final segment, while the chain went on."""
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", built.keys, built.device_key)
    t = ORIGIN_A
    for session, final in ((SID_S, False), (SID_T, True)):
        sealer.seal(Segment(session, 0, t, t, end_ns=t + NS,
                            reason="session_end" if final else "duration", final=final,
                            events=[Event(t, "session_start")]))
        t += 2 * NS
    spool_rec = Recording(tmp_path / "spool", built.keys, built.device_key, SID_S, SID_T, t, ())
    assert problems(spool_rec) == [
        f"session {SID_S}: no final segment, yet later segments follow seq 0 (cut off)"]
    report = verify_dir(spool_rec.spool, [load_device_key(built.pub)])
    assert [(s.session, s.status) for s in report.sessions] == [(SID_S, "open"),
                                                                (SID_T, "complete")]


def test_chain_must_start_at_genesis(rec: Recording) -> None:
    hdr(rec, 0).write_bytes(resign(rec, 0, rec.device_key, prev="1" * 64))
    assert problems(rec) == [
        "seq 0: prev is not the genesis value (the chain does not start here)",
        "seq 1: prev does not match hash of seq 0 (reordered, replaced or forked)",
    ]
    assert GENESIS_PREV == "0" * 64


# --- truncation, partial spools ---------------------------------------------------------------


def test_unfinished_session_is_a_warning_unless_strict(rec: Recording) -> None:
    hdr(rec, 4).unlink()
    pay(rec, 4).unlink()
    warning = (f"warning: session {rec.session_b}: no final segment (truncated or still "
               "recording)")
    assert run_verify(rec) == (0, [warning, "VERIFIED: 4 segments, seq 0..3, 2 sessions"])
    assert run_verify(rec, "--strict") == (1, [warning, "FAILED: 1 problems"])


def test_partial_spool_and_from_seq(rec: Recording) -> None:
    for seq in (0, 1):
        hdr(rec, seq).unlink()
        pay(rec, seq).unlink()
    code, out = run_verify(rec)
    assert code == 1
    assert out[0] == ("seq 0: missing: the chain should start at seq 0, seq 0..1 "
                      "(2 segments) absent before seq 2")
    assert run_verify(rec, "--partial")[0] == 0
    assert run_verify(rec, "--from-seq", "2") == (
        0, ["VERIFIED: 3 segments, seq 2..4, 2 sessions"])
    assert run_verify(rec, "--from-seq", "1")[1][0].startswith("seq 1: missing")


def test_empty_directory_fails(tmp_path: Path, built: Recording) -> None:
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "--device-key", str(built.pub)])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "FAILED: 1 problems"
