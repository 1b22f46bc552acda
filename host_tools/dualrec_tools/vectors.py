"""Conformance vectors for docs/FORMAT.md (§9): device directories, good and bad, each with the
verdict and finding kinds a conforming verifier must give.

The expectations are written here by hand from FORMAT.md, not recorded from our verifier, so the
vectors test it as they test a third party's. The directories are generated on the spot (no key
is ever committed): real segments sealed by the Sealer with fresh keys, then damaged one rule at
a time; where a change would also break later links, the later headers are re-signed so that
only the rule under test fails. `dualrec-tool vectors OUT` writes them with `expected.json`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dualrec.canonical import canonical_bytes
from dualrec.chain import ChainState
from dualrec.devices.base import AudioFormat, VideoFormat
from dualrec.samples import AudioBlock, Event, LogLine, VideoPacket
from dualrec.sealer import Sealer
from dualrec.segment import Segment
from dualrec.segment_format import age_header_length, header_hash, header_name, payload_name
from dualrec.timebase import Timebase
from dualrec_tools.verify import device_pub_pem

NS = 1_000_000_000
DEVICE, OTHER = "vec-0001", "vec-0002"
BOOT = "00000000-0000-4000-8000-00000000ec01"
VF = VideoFormat("h264", 64, 48, 5)
AF = AudioFormat(8000, 1)
SA, SB = "20260101T090000Z-00000a", "20260101T090100Z-00000b"
T0 = 1_000 * NS


@dataclass
class Vector:
    name: str
    rule: str  # the FORMAT.md section it tests
    about: str
    verdict: str  # "VERIFIED" or "FAILED"
    kinds: list[str]  # every finding kind expected, warnings included
    args: list[str] = field(default_factory=list)  # --partial, --strict, --identity
    make: Callable[[Path, Kit], None] = lambda d, kit: None


@dataclass
class Kit:
    key: Ed25519PrivateKey
    other: Ed25519PrivateKey
    recipient: str
    identity: pyrage.x25519.Identity


# --- real segments ------------------------------------------------------------------------------


def encode_video(fmt: VideoFormat, n: int, t0: int, level: Callable[[int], int],
                 gop: int | None = None) -> list[VideoPacket]:
    """n flat frames of libx264 H.264 (grey level level(i), a keyframe every gop frames, SPS/PPS
    on every keyframe as a camera sends them), stamped from t0 on the fps grid: real packets
    for vectors and tests, made on the spot (nothing recorded is committed)."""
    gop = gop or fmt.fps
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = fmt.width, fmt.height, "yuv420p"
    enc.time_base = Fraction(1, fmt.fps)
    enc.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(gop),
                   "keyint_min": str(gop), "sc_threshold": "0",
                   "x264-params": "repeat-headers=1"}
    out = []
    for i in range(n + 1):
        frame = None
        if i < n:
            img = np.full((fmt.height, fmt.width, 3), level(i), np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
        for p in enc.encode(frame):
            out.append(VideoPacket(t0 + p.pts * NS // fmt.fps, bytes(p), p.is_keyframe, p.pts))
    return out


def _video(n: int, t0: int, skip_first_key: bool = False) -> list[VideoPacket]:
    out = encode_video(VF, n, t0, lambda i: (i * 37) % 200)
    return out[1:] if skip_first_key else out


def _audio(t0: int, seconds: int) -> list[AudioBlock]:
    pcm = (np.sin(np.arange(AF.rate * seconds) / 5) * 1000).astype("<i2").tobytes()
    block = AF.rate // 10
    return [AudioBlock(t0 + k * NS // 10, pcm[2 * k * block:2 * (k + 1) * block], block)
            for k in range(seconds * 10)]


def _session_segment(session: str, index: int, origin: int, seconds: int, final: bool,
                     **tweak: Any) -> Segment:
    t0 = origin + index * seconds * NS
    seg = Segment(session, index, origin, t0, end_ns=t0 + seconds * NS,
                  reason="session_end" if final else "duration", final=final,
                  video_format=VF, audio_format=AF)
    seg.video = _video(seconds * VF.fps, t0, tweak.get("skip_first_key", False))
    seg.audio = _audio(t0, seconds)
    text = f"交易开始 TXN={index}" if index == 0 else f"STEP {index}"
    line_t = tweak.get("line_t", t0 + NS // 2)
    seg.lines = [LogLine(line_t, f"{text}\r\n".encode("gb18030"), text)]
    if index == 0 and not tweak.get("no_start_event"):
        seg.events.append(Event(t0, "session_start", {"trigger": "oplog",
                                                      "trigger_mono_ns": t0 + NS // 2,
                                                      "preroll_ns": NS // 2}))
    if final:
        seg.events.append(Event(seg.end_ns - 1, "session_stop", {"trigger": "oplog"}))
    if "reason" in tweak:  # cut early by that event, just after it
        seg.reason = tweak["reason"]
        seg.events.append(Event(seg.end_ns - 1, tweak["reason"], {}))
    return seg


def _idle(t: int, kind: str = "tamper") -> Segment:
    return Segment("", 0, t, t, end_ns=t + 1, reason=kind, final=True,
                   events=[Event(t, kind, {})])


def _base_segments() -> list[Segment]:
    """seq 0..3: session A (2 segments), an idle tamper segment, session B (1 segment)."""
    return [_session_segment(SA, 0, T0, 2, False), _session_segment(SA, 1, T0, 2, True),
            _idle(T0 + 5 * NS), _session_segment(SB, 0, T0 + 10 * NS, 2, True)]


def seal(directory: Path, kit: Kit, segments: list[Segment], key: Ed25519PrivateKey | None = None,
         device: str = DEVICE) -> None:
    state = directory.parent / f".{directory.name}.state.db"
    sealer = Sealer(device_id=device, key=key or kit.key, recipients=[kit.recipient],
                    spool_dir=directory, chain=ChainState(state), timebase=Timebase(),
                    boot_id=BOOT)
    try:
        for seg in segments:
            sealer.seal(seg)
    finally:
        sealer.close()
        for p in directory.parent.glob(f".{directory.name}.state.db*"):
            p.unlink()


# --- editing a sealed directory ----------------------------------------------------------------


def header(d: Path, seq: int) -> dict[str, Any]:
    return json.loads((d / header_name(seq)).read_bytes())


def sign_raw(fields: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Sign any fields, valid or not (the Sealer refuses invalid ones: vectors need both)."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    sig = base64.b64encode(key.sign(canonical_bytes(body))).decode()
    return canonical_bytes({**body, "sig": sig})


def rechain(d: Path, after: int, key: Ed25519PrivateKey) -> None:
    """Re-sign every header after seq `after` so its prev links to the (changed) one before."""
    seq = after + 1
    while (d / header_name(seq)).exists():
        h = header(d, seq)
        h["prev"] = header_hash((d / header_name(seq - 1)).read_bytes())
        (d / header_name(seq)).write_bytes(sign_raw(h, key))
        seq += 1


def edit(d: Path, kit: Kit, seq: int, **changes: Any) -> None:
    """Change header fields of seq, re-sign it and re-chain the headers after it."""
    h = header(d, seq)
    for k, v in changes.items():
        target = h
        *path, last = k.split("__")
        for p in path:
            target = target[p]
        target[last] = v
    (d / header_name(seq)).write_bytes(sign_raw(h, kit.key))
    rechain(d, seq, kit.key)


def replace_payload(d: Path, kit: Kit, seq: int, plaintext: bytes,
                    recipient: str | None = None) -> None:
    """A new payload for seq, encrypted to the branch (or another) recipient, with the header
    re-signed to name it: only the content can then be wrong."""
    ct = pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(recipient or kit.recipient)])
    (d / payload_name(seq)).write_bytes(ct)
    edit(d, kit, seq, payload__size=len(ct), payload__sha256=hashlib.sha256(ct).hexdigest())


def plaintext(d: Path, kit: Kit, seq: int) -> dict[str, bytes]:
    data = pyrage.decrypt((d / payload_name(seq)).read_bytes(), [kit.identity])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore


def build_tar(members: list[tuple[str, bytes]], mtime: int, mode: int = 0o444) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def repack(d: Path, kit: Kit, seq: int, change: Callable[[dict[str, bytes]], list]) -> None:
    members = plaintext(d, kit, seq)
    clock = json.loads(members["clock.json"])
    mtime = clock["anchors"][0]["utc_ns"] // NS
    replace_payload(d, kit, seq, build_tar(change(members), mtime))


def _ordered(m: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(n, m[n]) for n in ("clock.json", "events.jsonl", "oplog.jsonl", "media.mkv")
            if n in m]


def _rm(d: Path, *names: str) -> None:
    for n in names:
        (d / n).unlink()


# --- the vectors --------------------------------------------------------------------------------

H, P = header_name, payload_name
ID = ["--identity"]


def _forge_shadow(d: Path, kit: Kit) -> None:
    m = plaintext(d, kit, 0)
    os.rename(d / P(0), d / "٠٠٠٠٠٠٠٠٠٠.payload.age")  # Arabic-Indic digits
    # an edited amount, and a longer line: the forged file's length differs from the real one
    # whatever the random age header's length (so the finding is payload_size, not sha256)
    m["oplog.jsonl"] = m["oplog.jsonl"].replace(b"TXN=0", b"TXN=9" + b" " * 20000)
    (d / P(0)).write_bytes(pyrage.encrypt(build_tar(_ordered(m), 0),
                                          [pyrage.x25519.Recipient.from_str(kit.recipient)]))


def _malleable_sig(d: Path, kit: Kit) -> None:
    data = (d / H(3)).read_bytes()
    h = json.loads(data)
    sig = h["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])
    h["sig"] = sig[:-3] + alphabet[last ^ 1] + "=="  # an unused low bit set
    (d / H(3)).write_bytes(canonical_bytes(h))


def _short_chunk(path: Path) -> bytes:
    """The payload with its last chunk cut to 8 bytes: shorter than a tag (§5.5)."""
    data = path.read_bytes()
    body = len(data) - age_header_length(data) - 16
    return data[:len(data) - body % 65552 + 8]


def _interleaved(d: Path, kit: Kit) -> None:
    shutil.rmtree(d)
    seal(d, kit, [_session_segment(SA, 0, T0, 2, False), _idle(T0 + 2 * NS + NS // 2),
                  _session_segment(SA, 1, T0, 2, True)])


def _other_device_splice(d: Path, kit: Kit) -> None:
    other = d.parent / ".other"
    seal(other, kit, _base_segments(), key=kit.other, device=OTHER)
    for n in (H(3), P(3)):
        shutil.copy(other / n, d / n)
    shutil.rmtree(other)


def _content(seq: int, make: Callable[[dict[str, bytes]], list]) -> Callable[[Path, Kit], None]:
    return lambda d, kit: repack(d, kit, seq, make)


def _reseal(segments: Callable[[], list[Segment]]) -> Callable[[Path, Kit], None]:
    def make(d: Path, kit: Kit) -> None:
        shutil.rmtree(d)
        seal(d, kit, segments())
    return make


def _mkv_garbage(m: dict[str, bytes]) -> list:
    m["media.mkv"] = b"\x1aE\xdf\xa3" + b"\0" * 64
    return _ordered(m)


VECTORS: list[Vector] = [
    Vector("good", "§3-§5", "an intact chain: two sessions and an idle segment", "VERIFIED", []),
    Vector("good-content", "§5", "the same, content checked", "VERIFIED", [], ID),
    Vector("good-partial", "§6.1", "seq 0 deleted, checked as a partial spool", "VERIFIED", [],
           ["--partial"], lambda d, k: _rm(d, H(0), P(0))),
    Vector("empty", "§6.1", "no header at all", "FAILED", ["empty"],
           make=lambda d, k: [p.unlink() for p in d.iterdir()]),
    Vector("empty-partial", "§6.1", "a drained spool", "VERIFIED", [], ["--partial"],
           lambda d, k: [p.unlink() for p in d.iterdir()]),
    Vector("name-unicode-digits-shadow", "§1", "the real payload kept under Arabic-Indic digits, "
           "a forged one under the real name", "FAILED", ["unknown_entry", "payload_size"],
           make=_forge_shadow),
    Vector("name-trailing-newline", "§1", "a header renamed with a trailing newline", "FAILED",
           ["unknown_entry", "gap", "orphan_payload"],
           make=lambda d, k: os.rename(d / H(2), d / (H(2) + "\n"))),
    Vector("name-fullwidth", "§1", "a stray copy under full-width digits", "FAILED",
           ["unknown_entry"],
           make=lambda d, k: shutil.copy(d / H(1), d / ("０" * 10 + ".hdr.json"))),
    Vector("unknown-file", "§1", "a README in the device directory", "FAILED", ["unknown_entry"],
           make=lambda d, k: (d / "README.txt").write_text("hello")),
    Vector("temp-file", "§1", "an uncommitted write", "VERIFIED", ["temp_file"],
           make=lambda d, k: (d / f".{H(4)}.tmp").write_bytes(b"{")),
    Vector("temp-file-strict", "§6.1", "an uncommitted write fails --strict", "FAILED",
           ["temp_file"], ["--strict"], lambda d, k: (d / f".{H(4)}.tmp").write_bytes(b"{")),
    Vector("dir-named-header", "§1", "a directory named like a header", "FAILED",
           ["not_regular"], make=lambda d, k: (d / H(9)).mkdir()),
    Vector("dangling-symlink", "§1", "a dangling symlink named like a payload", "FAILED",
           ["not_regular"], make=lambda d, k: (d / P(9)).symlink_to(d / "nowhere")),
    Vector("symlinked-header", "§1", "a header replaced by a symlink to its own copy", "FAILED",
           ["not_regular", "gap", "orphan_payload"],
           make=lambda d, k: (shutil.move(d / H(2), d.parent / ".h2"),
                              (d / H(2)).symlink_to(d.parent / ".h2"))),
    Vector("not-canonical", "§2", "a space added after a colon", "FAILED", ["header_invalid"],
           make=lambda d, k: (d / H(3)).write_bytes((d / H(3)).read_bytes().replace(
               b'"final":', b'"final": ', 1))),
    Vector("sig-malleable", "§2, §4", "an unused low bit of the signature's base64 set",
           "FAILED", ["header_invalid"], make=_malleable_sig),
    Vector("schema-width-string", "§3", 'signed "width": "640"', "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, streams__video__width="640")),
    Vector("schema-bool-for-int", "§2, §3", "signed true where an integer belongs", "FAILED",
           ["header_invalid"], make=lambda d, k: edit(d, k, 3, streams__events__count=True)),
    Vector("schema-format-true", "§2, §3", 'signed "format": true (equal to 1 in some languages)',
           "FAILED", ["header_invalid"], make=lambda d, k: edit(d, k, 3, format=True)),
    Vector("schema-final-int", "§2, §3", 'signed "final": 1', "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, final=1)),
    Vector("schema-reason", "§3", 'signed reason "bogus"', "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, reason="bogus")),
    Vector("schema-codec", "§3", "signed codec h265", "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, streams__video__codec="h265")),
    Vector("schema-huge-int", "§3", "signed 2^70 frames", "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, streams__video__frames=2**70)),
    Vector("schema-end-before-start", "§3", "signed end before start", "FAILED",
           ["header_invalid"], make=lambda d, k: edit(d, k, 3, end__mono_ns=T0)),
    Vector("schema-unknown-key", "§3", "a signed extra key", "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, note="x")),
    Vector("schema-final-reason", "§3", "final with reason duration", "FAILED",
           ["header_invalid"], make=lambda d, k: edit(d, k, 3, reason="duration")),
    Vector("schema-idle-with-media", "§3", "an idle segment claiming video", "FAILED",
           ["header_invalid"], make=lambda d, k: edit(d, k, 2, streams__video__codec="h264")),
    Vector("schema-upper-hex", "§2", "prev in upper-case hex", "FAILED", ["header_invalid"],
           make=lambda d, k: edit(d, k, 3, prev=header(d, 3)["prev"].upper())),
    Vector("signature-invalid", "§4", "a value changed, signature kept", "FAILED",
           ["signature_invalid"],
           make=lambda d, k: (d / H(3)).write_bytes((d / H(3)).read_bytes().replace(
               b'"firmware":"', b'"firmware":"9', 1))),
    Vector("other-device-splice", "§4", "seq 3 replaced by another device's seq 3", "FAILED",
           ["wrong_device", "signature_invalid", "prev_mismatch"], make=_other_device_splice),
    Vector("seq-mismatch-fork", "§4", "seq 1's re-signed twin stored under seq 4's name",
           "FAILED", ["seq_mismatch", "fork"],
           make=lambda d, k: ((d / H(4)).write_bytes(sign_raw({**header(d, 1), "firmware": "0.9"},
                                                              k.key)),
                              shutil.copy(d / P(1), d / P(4)))),
    Vector("gap", "§4", "seq 2 deleted", "FAILED", ["gap"],
           make=lambda d, k: _rm(d, H(2), P(2))),
    Vector("chain-start", "§4", "seq 0 deleted, checked from seq 0", "FAILED",
           ["chain_start", "session_index"],
           make=lambda d, k: _rm(d, H(0), P(0))),
    Vector("genesis", "§4", "seq 0 re-signed with another prev", "FAILED", ["genesis"],
           make=lambda d, k: edit(d, k, 0, prev="1" * 64)),
    Vector("prev-mismatch", "§4", "seq 2 re-signed with a wrong prev", "FAILED",
           ["prev_mismatch"],
           make=lambda d, k: (d / H(2)).write_bytes(sign_raw({**header(d, 2), "prev": "2" * 64},
                                                             k.key))),
    Vector("continuity", "§4", "seq 1 starts 1 ns after seq 0 ended", "FAILED", ["continuity"],
           make=lambda d, k: edit(d, k, 1, start__mono_ns=T0 + 2 * NS + 1)),
    Vector("time-order", "§4", "the idle segment ends before seq 1 ends", "FAILED",
           ["time_order"], make=lambda d, k: edit(d, k, 2, start__mono_ns=T0 + NS,
                                                  end__mono_ns=T0 + NS + 1)),
    Vector("payload-missing", "§6.2", "seq 1's payload deleted", "FAILED", ["payload_missing"],
           make=lambda d, k: _rm(d, P(1))),
    Vector("payload-truncated", "§6.2", "seq 1's payload cut short", "FAILED", ["payload_size"],
           make=lambda d, k: (d / P(1)).write_bytes((d / P(1)).read_bytes()[:-100])),
    Vector("payload-sha256", "§6.2", "one payload byte flipped", "FAILED", ["payload_sha256"],
           make=lambda d, k: (d / P(1)).write_bytes(
               (lambda b: b[:-1] + bytes([b[-1] ^ 1]))((d / P(1)).read_bytes()))),
    Vector("payload-age-length", "§5.5", "a signed payload missing part of its last chunk",
           "FAILED", ["payload_age"],
           make=lambda d, k: (lambda cut: ((d / P(3)).write_bytes(cut), edit(
               d, k, 3, payload__size=len(cut),
               payload__sha256=hashlib.sha256(cut).hexdigest())))(_short_chunk(d / P(3)))),
    Vector("orphan-payload-tail", "§1", "a payload past the last header", "VERIFIED",
           ["orphan_payload"], make=lambda d, k: shutil.copy(d / P(3), d / P(4))),
    Vector("session-index", "§4", "session A's second segment says index 2", "FAILED",
           ["session_index"], make=lambda d, k: edit(d, k, 1, session_index=2)),
    Vector("session-cut-off", "§4", "session A's final segment re-signed as not final",
           "FAILED", ["session_cut_off"],
           make=lambda d, k: edit(d, k, 1, final=False, reason="duration")),
    Vector("session-after-final", "§4", "session A's first segment re-signed as final",
           "FAILED", ["session_after_final"],
           make=lambda d, k: edit(d, k, 0, final=True, reason="session_end")),
    Vector("session-interleaved", "§4", "an idle segment between a session's segments",
           "FAILED", ["session_interleaved"], make=_interleaved),
    Vector("chain-resumed", "§4", "the device resumed its chain after losing its state",
           "VERIFIED", ["chain_resumed"], ID,
           _reseal(lambda: [*_base_segments(), _idle(T0 + 20 * NS, "chain_resumed")])),
    Vector("chain-restart", "§4", "the device began a new chain after losing its state",
           "VERIFIED", ["chain_restart"], ID,
           _reseal(lambda: [_idle(T0, "chain_restart"), *_base_segments()[:2]])),
    Vector("session-open", "§6.1", "the newest session not final yet", "VERIFIED",
           ["session_open"], make=lambda d, k: edit(d, k, 3, final=False, reason="duration")),
    Vector("session-open-strict", "§6.1", "the same fails --strict", "FAILED",
           ["session_open"], ["--strict"],
           lambda d, k: edit(d, k, 3, final=False, reason="duration")),
    Vector("undecryptable", "§5.1", "seq 3 encrypted to another recipient", "FAILED",
           ["payload_undecryptable"], ID,
           lambda d, k: replace_payload(d, k, 3, b"x" * 10, str(
               pyrage.x25519.Identity.generate().to_public()))),
    Vector("content-extra-member", "§5.2", "a member the format does not have", "FAILED",
           ["content_tar"], ID, _content(3, lambda m: [*_ordered(m), ("extra.txt", b"x")])),
    Vector("content-member-order", "§5.2", "members in another order", "FAILED",
           ["content_tar"], ID, _content(3, lambda m: list(reversed(_ordered(m))))),
    Vector("content-record", "§5.3", "a log record with a float", "FAILED", ["content_record"],
           ID, _content(3, lambda m: [*_ordered({**m, "oplog.jsonl": m["oplog.jsonl"].replace(
               b'"t_mono_ns":', b'"t_mono_ns":1.5,"x":', 1)})])),
    Vector("content-count", "§5.3", "the header counts one byte more of log", "FAILED",
           ["content_count"], ID,
           lambda d, k: edit(d, k, 3, streams__oplog__bytes=header(d, 3)["streams"]["oplog"]
                             ["bytes"] + 1)),
    Vector("content-line-time", "§5.3", "a log line after the segment's end", "FAILED",
           ["content_time"], ID,
           _reseal(lambda: [*_base_segments()[:3],
                            _session_segment(SB, 0, T0 + 10 * NS, 2, True,
                                             line_t=T0 + 13 * NS)])),
    Vector("good-after-early-cut", "§5.4", "after a tamper cut the video continues its GOP",
           "VERIFIED", [], ID,
           _reseal(lambda: [_session_segment(SA, 0, T0, 2, False, reason="tamper"),
                            _session_segment(SA, 1, T0, 2, True, skip_first_key=True)])),
    Vector("content-keyframe", "§5.4", "the video starts on a non-keyframe", "FAILED",
           ["content_keyframe"], ID,
           _reseal(lambda: [*_base_segments()[:3],
                            _session_segment(SB, 0, T0 + 10 * NS, 2, True,
                                             skip_first_key=True)])),
    Vector("content-cut-without-event", "§3", "a segment said to be cut for tamper holds no "
           "tamper event", "FAILED", ["content_session"], ID,
           lambda d, k: edit(d, k, 0, reason="tamper")),
    Vector("content-media", "§5.4", "media.mkv is not Matroska", "FAILED", ["content_media"],
           ID, _content(3, _mkv_garbage)),
    Vector("content-clock", "§3, §5.2", "the header's clock is not clock.json's", "FAILED",
           ["content_clock"], ID, lambda d, k: edit(d, k, 3, clock__est_error_ns=12345)),
    Vector("content-session-start", "§5.3", "a session's first segment without session_start",
           "FAILED", ["content_session"], ID,
           _reseal(lambda: [*_base_segments()[:3],
                            _session_segment(SB, 0, T0 + 10 * NS, 2, True,
                                             no_start_event=True)])),
]


def generate(out: Path) -> dict[str, dict[str, Any]]:
    """Write every vector under out/cases/NAME, the keys under out/keys, and expected.json."""
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    identity = pyrage.x25519.Identity.generate()
    kit = Kit(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(),
              str(identity.to_public()), identity)
    (keys / "device.pub").write_bytes(device_pub_pem(kit.key.public_key(), DEVICE))
    (keys / "other.pub").write_bytes(device_pub_pem(kit.other.public_key(), OTHER))
    fd = os.open(keys / "branch.agekey", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{identity}\n")
    base = out / ".base"
    seal(base, kit, _base_segments())
    expected = {}
    for v in VECTORS:
        d = out / "cases" / v.name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d, symlinks=True)
        v.make(d, kit)
        expected[v.name] = {"rule": v.rule, "about": v.about, "args": v.args,
                            "verdict": v.verdict, "kinds": sorted(v.kinds)}
    shutil.rmtree(base)
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    return expected  # the private keys never leave memory: the vectors need only public halves
