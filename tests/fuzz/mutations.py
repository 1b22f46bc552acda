"""The mutation classes: each damages a copy of device A's directory in one seeded way.

A mutation is a function of a Mutator (the seeded RNG, the base, the directory to damage) that
returns a one-line description of what it did. What the verifier must say about the result is
not decided here: the campaign compares the damaged directory with the pristine one (a no-op is
not counted; removing only newest whole segments is the tail removal FORMAT.md §6.1 says a chain
cannot show) and otherwise expects a strict rejection.

Re-signed mutations sign with device A's key directly, bypassing sign_header's schema check, and
re-sign every later header with the new prev: what a holder of the device key (or a firmware
bug) could produce, so only the rule under test can catch it, not a broken link after it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import random
import shutil
import socket
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pyrage

from dualrec.canonical import canonical_bytes, parse_canonical
from dualrec.segment_format import header_name, parse_name, payload_name

from .base import Base

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# zero of each digit block a lax reader (Python's \d, int()) takes for 0..9
DIGIT_ZEROS = {"arabic-indic": 0x0660, "ext-arabic-indic": 0x06F0, "devanagari": 0x0966,
               "bengali": 0x09E6, "fullwidth": 0xFF10, "math-bold": 0x1D7CE, "thai": 0x0E50}
TRAILERS = ("\n", " ", "\t", "\r", "\r\n", "\u00a0", "\u200b", "\u3000")


class Skip(Exception):
    """A mutation step cannot apply to the directory as an earlier step left it (combo)."""


class Mutator:
    """One mutation's RNG, base and target directory, with file helpers that never follow a
    symlink or open a FIFO (a combo may have put one where a file was)."""

    def __init__(self, rng: random.Random, base: Base, directory: Path, stash: Path) -> None:
        self.rng = rng
        self.base = base
        self.d = directory
        self.stash = stash  # outside the directory: targets for symlinks

    # --- paths and files ---

    def hp(self, seq: int) -> Path:
        return self.d / header_name(seq)

    def pp(self, seq: int) -> Path:
        return self.d / payload_name(seq)

    def seq(self, lo: int = 0, hi: int | None = None) -> int:
        return self.rng.randrange(lo, self.base.n if hi is None else hi)

    def read(self, path: Path) -> bytes:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise Skip(f"{path.name!r} absent") from None
        if not stat.S_ISREG(mode):
            raise Skip(f"{path.name!r} not a regular file")
        return path.read_bytes()

    def remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()

    def write(self, path: Path, data: bytes) -> None:
        self.remove(path)
        path.write_bytes(data)

    def move(self, src: Path, dst: Path) -> None:
        if not os.path.lexists(src):
            raise Skip(f"{src.name!r} absent")
        self.remove(dst)
        os.rename(src, dst)

    def file_of(self, seq: int | None = None) -> Path:
        seq = self.seq() if seq is None else seq
        return self.hp(seq) if self.rng.random() < 0.5 else self.pp(seq)

    # --- headers ---

    def fields(self, seq: int) -> dict[str, Any]:
        """Device A's header fields of seq, without sig (a deep copy, free to change)."""
        f = copy.deepcopy(self.base.fields[seq])
        del f["sig"]
        return f

    def sign(self, fields: dict[str, Any], key: Any = None) -> bytes:
        """fields plus a signature over their canonical bytes: no schema check."""
        key = self.base.key if key is None else key
        sig = key.sign(canonical_bytes(fields))
        return canonical_bytes({**fields, "sig": base64.b64encode(sig).decode()})

    def rechain(self, seq: int, header: bytes) -> None:
        """header at seq, and every later header re-signed to link to it."""
        self.write(self.hp(seq), header)
        prev = header
        for j in range(seq + 1, self.base.n):
            f = self.fields(j)
            f["prev"] = hashlib.sha256(prev).hexdigest()
            prev = self.sign(f)
            self.write(self.hp(j), prev)

    # --- payloads ---

    def seal_members(self, members: list[tuple[str, bytes]], mtime: int | None = None,
                     modes: dict[str, int] | None = None, recipient: str | None = None) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = self.mtime(members) if mtime is None else mtime
                info.mode = (modes or {}).get(name, 0o444)
                tar.addfile(info, io.BytesIO(data))
        return self.encrypt(out.getvalue(), recipient)

    def encrypt(self, plaintext: bytes, recipient: str | None = None) -> bytes:
        r = pyrage.x25519.Recipient.from_str(recipient or self.base.recipient)
        return pyrage.encrypt(plaintext, [r])

    @staticmethod
    def mtime(members: list[tuple[str, bytes]]) -> int:
        clock = parse_canonical(dict(members)["clock.json"].removesuffix(b"\n"))
        return clock["anchors"][0]["utc_ns"] // 1_000_000_000

    def lookalike(self, name: str) -> str:
        """A name a lax reader takes for name, which the strict rule refuses."""
        rng = self.rng
        how = rng.choice(["digits-all", "digit-one", "trailing", "leading", "case", "dot",
                          "width", "suffix"])
        if how in ("digits-all", "digit-one"):
            script, zero = rng.choice(sorted(DIGIT_ZEROS.items()))
            positions = range(10) if how == "digits-all" else [rng.randrange(10)]
            chars = list(name)
            for i in positions:
                chars[i] = chr(zero + int(chars[i]))
            out, how = "".join(chars), f"{how} {script}"
        elif how == "trailing":
            out = name + rng.choice(TRAILERS)
        elif how == "leading":
            out = rng.choice(TRAILERS[1:]) + name
        elif how == "case":
            stem, _, suffix = name.partition(".")
            out = stem + "." + rng.choice([suffix.upper(), suffix.capitalize(),
                                           suffix.replace("json", "JSON").replace("age", "AGE")])
        elif how == "dot":
            out = name.replace(".", rng.choice(["\uff0e", "\u2024", "\u3002"]), 1)
        elif how == "width":
            out = rng.choice(["0" + name, name[1:]])
        else:
            out = name + rng.choice([".bak", "~", ".orig", "."])
        assert out != name and parse_name(out) is None and "/" not in out, (name, out)
        return out


Mutation = Callable[[Mutator], str]


# --- byte and bit flips, truncations, extensions ------------------------------------------------


def _flip(m: Mutator, header: bool, bit: bool) -> str:
    seq = m.seq()
    path = m.hp(seq) if header else m.pp(seq)
    data = bytearray(m.read(path))
    if not data:
        raise Skip("empty file")
    if not header and m.rng.random() < 0.5:
        pos = m.rng.randrange(min(len(data), 400))  # the age header and the nonce
    else:
        pos = m.rng.randrange(len(data))
    mask = 1 << m.rng.randrange(8) if bit else m.rng.randrange(1, 256)
    data[pos] ^= mask
    m.write(path, bytes(data))
    return f"{path.name} byte {pos} ^= {mask:#04x}"


def hdr_byte_flip(m: Mutator) -> str:
    return _flip(m, header=True, bit=False)


def hdr_bit_flip(m: Mutator) -> str:
    return _flip(m, header=True, bit=True)


def pay_byte_flip(m: Mutator) -> str:
    return _flip(m, header=False, bit=False)


def pay_bit_flip(m: Mutator) -> str:
    return _flip(m, header=False, bit=True)


def hdr_truncate(m: Mutator) -> str:
    path = m.hp(m.seq())
    data = m.read(path)
    n = m.rng.choice([0, 1, len(data) - 1, len(data) - 2, m.rng.randrange(len(data))])
    m.write(path, data[:n])
    return f"{path.name} truncated to {n} of {len(data)} bytes"


def hdr_extend(m: Mutator) -> str:
    path = m.hp(m.seq())
    data = m.read(path)
    extra = m.rng.choice([b"\n", b" ", b"\x00", b"\r\n", b"}", b"{}", data,
                          m.rng.randbytes(m.rng.randrange(1, 24)), b" " * 70_000])
    if m.rng.random() < 0.25:
        pre = m.rng.choice([b"\xef\xbb\xbf", b" ", b"\n"])
        m.write(path, pre + data)
        return f"{path.name} prefixed with {pre!r}"
    m.write(path, data + extra)
    return f"{path.name} extended by {extra[:16]!r} ({len(extra)} bytes)"


def pay_truncate(m: Mutator) -> str:
    path = m.pp(m.seq())
    data = m.read(path)
    header_len = data.find(b"\n--- ")
    header_len = data.find(b"\n", header_len + 1) + 1 if header_len >= 0 else 0
    n = m.rng.choice([0, 1, len(data) - 1, len(data) - 16, len(data) - 17, header_len,
                      header_len + 16, max(0, len(data) - 65552), m.rng.randrange(len(data))])
    n = max(0, min(n, len(data) - 1))
    m.write(path, data[:n])
    return f"{path.name} truncated to {n} of {len(data)} bytes"


def pay_extend(m: Mutator) -> str:
    seq = m.seq()
    path = m.pp(seq)
    data = m.read(path)
    extra = m.rng.choice([b"\n", b"\x00" * 16, m.rng.randbytes(m.rng.randrange(1, 200)),
                          m.rng.randbytes(65552), m.base.payloads[(seq + 1) % m.base.n]])
    m.write(path, data + extra)
    return f"{path.name} extended by {len(extra)} bytes"


# --- header edits without a new signature --------------------------------------------------------


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))]
    return [path]


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        value = value[k]
    return value


def _set(value: Any, path: tuple[Any, ...], new: Any) -> None:
    for k in path[:-1]:
        value = value[k]
    value[path[-1]] = new


def _other_value(rng: random.Random, v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        out = rng.choice([v + 1, v - 1, v + rng.randrange(2, 10**9), 0, 1, -v, 2 * v])
        return out if out != v else v + 1
    assert isinstance(v, str)
    if not v or rng.random() < 0.2:
        return v + rng.choice("0aé ")
    i = rng.randrange(len(v))
    c = rng.choice([ch for ch in "0123456789abcdefABCDEF+/=-é" if ch != v[i]])
    return v[:i] + c + v[i + 1:]


def recanon_edit(m: Mutator) -> str:
    """Change one value (sig included), re-encode canonically, keep the old signature."""
    seq = m.seq()
    f = copy.deepcopy(m.base.fields[seq])
    path = m.rng.choice(_leaves(f))
    old = _get(f, path)
    new = _other_value(m.rng, old)
    _set(f, path, new)
    m.write(m.hp(seq), canonical_bytes(f))
    return f"seq {seq} {'.'.join(path)}: {old!r} -> {new!r}, old sig kept"


def _escape_one(text: str, rng: random.Random) -> str:
    """One ASCII letter inside a string value written as a \\u escape."""
    spots = [i for i, c in enumerate(text) if c.isalpha() and text[:i].count('"') % 2 == 1]
    i = rng.choice(spots)
    esc = f"\\u{ord(text[i]):04x}" if rng.random() < 0.5 else f"\\u{ord(text[i]):04X}"
    return text[:i] + esc + text[i + 1:]


def noncanonical(m: Mutator) -> str:
    """The same value in another JSON form (the signature stays valid over the value)."""
    seq = m.seq()
    f = m.base.fields[seq]
    text = m.base.headers[seq].decode()
    how = m.rng.choice(["space-sep", "indent", "key-order", "slash", "u-escape", "newline",
                        "bom", "dup-key", "exponent", "neg-zero", "crlf", "ascii-escape-sig"])
    if how == "space-sep":
        out = json.dumps(f, sort_keys=True, separators=m.rng.choice([(", ", ":"), (",", ": ")]),
                         ensure_ascii=False)
    elif how == "indent":
        out = json.dumps(f, sort_keys=True, indent=m.rng.choice([0, 1, 2]), ensure_ascii=False)
    elif how == "key-order":
        keys = list(f)
        while keys == sorted(keys):
            m.rng.shuffle(keys)
        out = json.dumps({k: f[k] for k in keys}, separators=(",", ":"), ensure_ascii=False)
    elif how == "slash" and "/" in f["sig"]:
        out = text.replace("/", "\\/", 1)
    elif how == "u-escape":
        out = _escape_one(text, m.rng)
    elif how == "newline":
        out = text + "\n"
    elif how == "bom":
        out = "\ufeff" + text
    elif how == "dup-key":
        key = m.rng.choice(["seq", "format", "final", "prev"])
        out = "{" + json.dumps(key) + ":" + json.dumps(f[key], separators=(",", ":")) + "," \
            + text[1:]
    elif how == "exponent":
        out = text.replace('"format":1', '"format":1e0')
    elif how == "neg-zero":
        out = text.replace('"drops":0', '"drops":-0', 1)
    elif how == "crlf":
        out = json.dumps(f, sort_keys=True, indent=1).replace("\n", "\r\n")
    else:
        how = "ascii-escape-sig"
        c = f["sig"][0]
        out = text.replace(f'"sig":"{c}', f'"sig":"\\u{ord(c):04x}', 1)
    assert out.encode() != m.base.headers[seq], how
    m.write(m.hp(seq), out.encode())
    return f"seq {seq} re-encoded non-canonically ({how}), old sig kept"


def sig_malleable(m: Mutator) -> str:
    """Another text for the same signature bytes (or a form standard base64 refuses)."""
    seq = m.seq()
    f = copy.deepcopy(m.base.fields[seq])
    sig = f["sig"]
    how = m.rng.choice(["low-bits", "low-bits", "low-bits", "no-padding", "url-safe",
                        "line-break", "extra-padding", "whitespace"])
    if how == "low-bits":
        v = B64.index(sig[85])  # 64 bytes: 85 data characters, the last carries 4 unused bits
        new = sig[:85] + B64[v ^ m.rng.randrange(1, 16)] + sig[86:]
    elif how == "no-padding":
        new = sig.rstrip("=")
    elif how == "url-safe" and ("+" in sig or "/" in sig):
        new = sig.replace("+", "-").replace("/", "_")
    elif how == "line-break":
        i = m.rng.randrange(1, 88)
        new = sig[:i] + m.rng.choice(["\n", "\r\n"]) + sig[i:]
    elif how == "extra-padding":
        new = sig + "=="
    else:
        how = "whitespace"
        new = " " + sig
    if how == "low-bits":
        assert base64.b64decode(new) == base64.b64decode(sig)
    f["sig"] = new
    m.write(m.hp(seq), canonical_bytes(f))
    return f"seq {seq} sig {how}: ...{sig[-4:]!r} -> ...{new[-4:]!r}"


# --- re-signed with the device key --------------------------------------------------------------

_INT_PATHS = [("format",), ("seq",), ("session_index",), ("start", "mono_ns"), ("start", "utc_ns"),
              ("end", "mono_ns"), ("end", "utc_ns"), ("clock", "est_error_ns"),
              ("payload", "size"), ("streams", "video", "width"), ("streams", "video", "height"),
              ("streams", "video", "fps"), ("streams", "video", "frames"),
              ("streams", "video", "keyframes"), ("streams", "video", "drops"),
              ("streams", "audio", "rate"), ("streams", "audio", "channels"),
              ("streams", "audio", "samples"), ("streams", "audio", "overflows"),
              ("streams", "oplog", "lines"), ("streams", "oplog", "bytes"),
              ("streams", "oplog", "flagged"), ("streams", "events", "count")]
_OBJ_PATHS = [(), ("start",), ("end",), ("clock",), ("payload",), ("streams",),
              ("streams", "video"), ("streams", "audio"), ("streams", "oplog"),
              ("streams", "events")]
# Ranges the format gives: a value one past either end of each
_OUT_OF_RANGE: dict[tuple[str, ...], list[int]] = {
    ("format",): [0, 2], ("seq",): [-1, 10**10], ("session_index",): [-1, 2**31],
    ("start", "mono_ns"): [-1, 2**63], ("end", "utc_ns"): [-1, 2**63],
    ("clock", "est_error_ns"): [-2, 2**63], ("payload", "size"): [0, 2**63],
    ("streams", "video", "width"): [-1, 16385], ("streams", "video", "fps"): [-1, 1001],
    ("streams", "audio", "rate"): [-1, 384001], ("streams", "audio", "channels"): [-1, 9],
    ("streams", "oplog", "lines"): [-1, 2**63], ("streams", "events", "count"): [-1, 2**63],
}


def _schema_violation(m: Mutator, seq: int, f: dict[str, Any]) -> str:
    rng = m.rng
    session = bool(f["session"])
    media = f["streams"]["video"]["frames"] > 0
    how = rng.choice(["int-as-str", "int-as-bool", "bool-as-int", "reason", "codec", "huge",
                      "range", "end-before-start", "extra-key", "missing-key", "renamed-key",
                      "null", "type-swap", "hex-case", "device", "boot-id", "session-id",
                      "final-flip", "interrupted-media", "idle-rules", "stream-rules",
                      "clock-source", "no-sig", "float"])
    if how == "int-as-str":
        path = rng.choice(_INT_PATHS)
        _set(f, path, str(_get(f, path)))
    elif how == "int-as-bool":
        path = rng.choice(_INT_PATHS)
        _set(f, path, rng.choice([True, False]))
    elif how == "bool-as-int":
        path = rng.choice([("final",), ("clock", "synced")])
        _set(f, path, int(_get(f, path)))
    elif how == "reason":
        path = ("reason",)
        f["reason"] = rng.choice(["bogus", "", "Duration", "session_end ", "interrupted\n"])
    elif how == "codec":
        path = rng.choice([("streams", "video", "codec"), ("streams", "audio", "codec")])
        _set(f, path, rng.choice(["h265", "H264", "hevc", "aac", "pcm_s24le", "", "none "]))
    elif how == "huge":
        path = rng.choice(_INT_PATHS)
        _set(f, path, rng.choice([2**70, -(2**70), 2**64, 10**30]))
    elif how == "range":
        path = rng.choice(sorted(_OUT_OF_RANGE))
        _set(f, path, rng.choice(_OUT_OF_RANGE[path]))
    elif how == "end-before-start":
        path = ("end", "mono_ns")
        f["end"]["mono_ns"] = f["start"]["mono_ns"] - rng.choice([0, 1, 10**9])
    elif how == "extra-key":
        path = rng.choice(_OBJ_PATHS)
        _get(f, path)[rng.choice(["extra", "tz", "zz", "Seq", "sig2"])] = rng.choice([0, "", True])
    elif how == "missing-key":
        path = rng.choice(_OBJ_PATHS)
        obj = _get(f, path)
        del obj[rng.choice(sorted(obj))]
    elif how == "renamed-key":
        path = rng.choice(_OBJ_PATHS)
        obj = _get(f, path)
        old = rng.choice(sorted(obj))
        obj[old[:-1] + ("T" if old[-1] != "T" else "S")] = obj.pop(old)
    elif how == "null":
        path = rng.choice(_leaves(f))
        _set(f, path, None)
    elif how == "type-swap":
        path = rng.choice([p for p in _OBJ_PATHS if p] + [("prev",), ("device",)])
        _set(f, path, rng.choice([[], {}, [_get(f, path)], 0, ""]))
    elif how == "hex-case":
        path = rng.choice([("prev",), ("payload", "sha256")])
        value = _get(f, path)
        if value == value.upper():
            value = "a" * 64
        _set(f, path, value.upper() if rng.random() < 0.5 else value[:-1])
    elif how == "device":
        path = ("device",)
        f["device"] = rng.choice(["", "box-0001\n", "bóx-0001", "-box", "box 0001", "x" * 65])
    elif how == "boot-id":
        path = ("boot_id",)
        f["boot_id"] = rng.choice([f["boot_id"].upper(), f["boot_id"] + "\n", "Unknown", ""])
    elif how == "session-id":
        path = ("session",)
        f["session"] = rng.choice(["20250301t090000z-aaaaaa", "20250301T090000Z-AAAAAA",
                                   "x", "20250301T090000Z-aaaaaa\n", " "])
    elif how == "final-flip":
        path = ("final",)
        f["final"] = not f["final"]
    elif how == "interrupted-media" and session and media:
        path = ("reason",)
        f["reason"], f["final"] = "interrupted", True
    elif how == "idle-rules" and not session:
        path = rng.choice([("session_index",), ("final",), ("reason",), ("streams", "video")])
        if path == ("streams", "video"):
            f["streams"]["video"] = {"codec": "h264", "width": 64, "height": 48, "fps": 10,
                                     "frames": 0, "keyframes": 0, "drops": 0}
        else:
            _set(f, path, {("session_index",): 1, ("final",): False,
                           ("reason",): "duration"}[path])
    elif how == "stream-rules":
        path, value = rng.choice([
            (("streams", "video", "keyframes"), f["streams"]["video"]["frames"] + 1),
            (("streams", "oplog", "flagged"), f["streams"]["oplog"]["lines"] + 1),
            (("streams", "oplog", "bytes"), f["streams"]["oplog"]["lines"] - 1),
            (("streams", "audio", "rate"), 7999 if session else 8000),
            (("streams", "audio", "channels"), 0 if session else 1),
            (("streams", "video", "width"), 0 if session else 1),
        ])
        if value < 0:
            path, value = ("streams", "oplog", "flagged"), 1
        _set(f, path, value)
    elif how == "clock-source":
        path = ("clock", "source")
        f["clock"]["source"] = rng.choice(["gps", "chrony+pps", "pps+pps", "", "system+",
                                           "System"])
    elif how == "no-sig":
        m.rechain(seq, canonical_bytes(f))
        return f"seq {seq} header without sig"
    elif how == "float":
        data = m.sign(f).replace(b'"format":1', b'"format":1.0')
        m.rechain(seq, data)
        return f"seq {seq} format 1.0 (not canonical), rest signed"
    else:  # a rule that does not apply to this segment's kind
        path = ("reason",)
        f["reason"] = "bogus"
    m.rechain(seq, m.sign(f))
    return f"seq {seq} {how} at {'.'.join(map(str, path)) or '$'}, re-signed and re-chained"


def resign_schema(m: Mutator) -> str:
    seq = m.seq()
    return _schema_violation(m, seq, m.fields(seq))


def resign_consistency(m: Mutator) -> str:
    """Schema-valid headers, signed by the device key, that break a rule between fields of
    different segments or between the header and the payload."""
    rng = m.rng
    base = m.base
    seq = m.seq()
    f = m.fields(seq)
    session = f["session"]
    same_next = seq + 1 < base.n and base.fields[seq + 1]["session"] == session != ""
    same_prev = seq > 0 and base.fields[seq - 1]["session"] == session != ""
    how = rng.choice(["start-late", "start-early", "end-late", "count", "utc", "clock",
                      "payload-ref", "prev", "seq", "device", "session", "session-index",
                      "boot", "idle-reason", "time-order", "join-session", "unfinal",
                      "other-key"])
    if how in ("start-late", "start-early") and same_prev:
        d = 1 if how == "start-late" else -1
        f["start"]["mono_ns"] += d
        f["start"]["utc_ns"] += d
    elif how == "end-late" and same_next:
        f["end"]["mono_ns"] += 1_000_000
        f["end"]["utc_ns"] += 1_000_000
    elif how == "count":
        s = f["streams"]
        choices = [("events", "count", 1), ("events", "count", -1), ("oplog", "lines", 1),
                   ("oplog", "bytes", 1), ("oplog", "bytes", -1), ("oplog", "flagged", 1)]
        if s["video"]["frames"]:
            choices += [("video", "frames", 1), ("video", "frames", -1),
                        ("video", "keyframes", -1), ("video", "keyframes", 1),
                        ("audio", "samples", 1), ("audio", "samples", -1),
                        ("audio", "samples", -800)]
        stream, key, d = rng.choice(choices)
        s[stream][key] += d
        if s[stream][key] < 0:
            s[stream][key] -= 2 * d
        o = s["oplog"]
        if o["flagged"] > o["lines"]:
            o["lines"] = o["flagged"]
        if o["bytes"] < o["lines"]:
            o["bytes"] = o["lines"]
        how = f"count {stream}.{key} {d:+d}"
    elif how == "utc":
        which = rng.choice(["start", "end"])
        f[which]["utc_ns"] += rng.choice([1, -1, 10**9])
        how = f"utc {which}"
    elif how == "clock":
        key = rng.choice(["synced", "est_error_ns", "source"])
        f["clock"][key] = {"synced": not f["clock"]["synced"],
                           "est_error_ns": f["clock"]["est_error_ns"] + 1,
                           "source": "system" if f["clock"]["source"] != "system" else "pps"}[key]
        how = f"clock {key}"
    elif how == "payload-ref":
        if rng.random() < 0.5:
            f["payload"]["sha256"] = rng.randbytes(32).hex()
        else:
            f["payload"]["size"] += rng.choice([1, -1, 16])
    elif how == "prev":
        f["prev"] = rng.choice([rng.randbytes(32).hex(), "0" * 64,
                                hashlib.sha256(base.headers[seq]).hexdigest()])
        if f["prev"] == base.fields[seq]["prev"]:
            f["prev"] = "f" * 64
    elif how == "seq":
        f["seq"] = rng.choice([s for s in range(base.n + 1) if s != seq])
    elif how == "device":
        f["device"] = rng.choice(["box-0002", "box-0003", "box-0001.x"])
    elif how == "session" and session:
        f["session"] = "20250301T090000Z-cccccc"
    elif how == "session-index" and session:
        f["session_index"] += rng.choice([1, 2]) if f["session_index"] == 0 \
            else rng.choice([-1, 1])
    elif how == "other-key":
        # unchanged fields, naming device A, signed by device B's key
        other = m.sign(f, base.other_key)
        m.rechain(seq, other)
        return f"seq {seq} signed by device B's key, re-chained"
    elif how == "join-session" and session and f["session_index"] == 0 and seq > 0:
        # session B's first segment made a continuation of the session before it
        prior = next(x for x in reversed(base.fields[:seq]) if x["session"])
        f["session"], f["session_index"] = prior["session"], prior["session_index"] + 1
    elif how == "unfinal" and f["final"] and session:
        f["final"], f["reason"] = False, "duration"
    elif how == "boot" and (same_next or same_prev):
        f["boot_id"] = "00000000-0000-4000-8000-00000000beef"
    elif how == "idle-reason" and not session:
        f["reason"] = rng.choice(["fault", "power_fail", "clock_step", "tap_gap"])
    elif how == "time-order" and seq == 3:
        f["start"]["mono_ns"] -= 9 * 10**9  # the idle segment, moved to before seq 2's end
        f["start"]["utc_ns"] -= 9 * 10**9
        f["end"]["mono_ns"] -= 9 * 10**9
        f["end"]["utc_ns"] -= 9 * 10**9
    else:
        how = "payload-ref sha256"
        f["payload"]["sha256"] = hashlib.sha256(base.payloads[(seq + 1) % base.n]).hexdigest()
    m.rechain(seq, m.sign(f))
    return f"seq {seq} {how}, re-signed and re-chained"


def resign_reason(m: Mutator) -> str:
    """What FORMAT.md §3 says a reason implies, broken in a re-signed segment: a session
    segment cut for tamper/power_fail/clock_step ("that event cut it early; the event is inside
    it") that holds no such event, or an idle segment sealed for `event` ("an event of another
    kind") or `oplog` ("operation-log lines received while idle") that holds neither."""
    base = m.base
    if m.rng.random() < 0.6:
        seq = m.rng.choice([s for s, f in enumerate(base.fields) if f["reason"] == "duration"])
        f = m.fields(seq)
        f["reason"] = m.rng.choice(["tamper", "power_fail", "clock_step"])
        m.rechain(seq, m.sign(f))
        return f"seq {seq} reason duration -> {f['reason']} without that event, re-signed"
    seq = next(s for s, f in enumerate(base.fields) if not f["session"])
    f = m.fields(seq)
    f["reason"] = m.rng.choice(["event", "oplog"])
    members = [(n, b"" if n == "events.jsonl" else d) for n, d in base.members[seq]]
    f["streams"]["events"]["count"] = 0
    payload = m.seal_members(members)
    f["payload"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    m.write(m.pp(seq), payload)
    m.rechain(seq, m.sign(f))
    return f"idle seq {seq} reason tamper -> {f['reason']}, holding no event and no line, " \
        "re-signed"


def resign_preroll(m: Mutator) -> str:
    """FORMAT.md §4: a new session's first segment may start before the previous segment's end
    by up to its pre-roll (preroll_ns of its session_start). The idle segment before session B,
    re-sealed (payload and header, consistent) to lie after session B's trigger, so session B
    overlaps it by more than its pre-roll."""
    base = m.base
    seq = next(s for s, f in enumerate(base.fields) if not f["session"])
    nxt = base.fields[seq + 1]
    start = dict(base.members[seq + 1])["events.jsonl"]
    preroll = json.loads(start.split(b"\n")[0])["detail"]["preroll_ns"]
    f = m.fields(seq)
    new_t = nxt["start"]["mono_ns"] + preroll + m.rng.choice([1, 1000, 100_000_000, 300_000_000])
    shift = new_t - f["start"]["mono_ns"]
    for which in ("start", "end"):
        f[which]["mono_ns"] += shift
        f[which]["utc_ns"] += shift
    members = list(base.members[seq])
    events = _edit_records(dict(members)["events.jsonl"],
                           lambda rs: [r.update(t_mono_ns=r["t_mono_ns"] + shift) for r in rs])
    members = [(n, events if n == "events.jsonl" else d) for n, d in members]
    payload = m.seal_members(members)
    f["payload"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    m.write(m.pp(seq), payload)
    m.rechain(seq, m.sign(f))
    overlap = f["end"]["mono_ns"] - nxt["start"]["mono_ns"]
    return f"idle seq {seq} moved {shift} ns later: seq {seq + 1} overlaps it by {overlap} ns, " \
        f"its pre-roll is {preroll} ns; re-signed"


def json_escape(m: Mutator) -> str:
    """A header string edited through JSON escapes: lone or reversed UTF-16 surrogates, NUL,
    an escaped astral or ASCII character (the old signature kept)."""
    seq = m.seq()
    text = m.base.headers[seq].decode()
    key = m.rng.choice(["firmware", "boot_id", "device", "reason", "sig", "prev"])
    value = m.base.fields[seq][key]
    esc = m.rng.choice(["\\ud800", "\\udfff", "\\udc00\\ud800", "\\ud83d\\ude00",
                        "\\u0000", "\\u00e9", "\\u0041", "\\uD800", "\\ud800x"])
    where = m.rng.choice(["replace", "prefix", "suffix", "key"])
    if where == "key":
        out = text.replace(f'"{key}":', f'"{esc}{key}":', 1)
    else:
        new = {"replace": esc, "prefix": esc + value, "suffix": value + esc}[where]
        out = text.replace(f'"{key}":"{value}"', f'"{key}":"{new}"', 1)
    m.write(m.hp(seq), out.encode())
    return f"seq {seq} {key}: escape {esc} ({where}), old sig kept"


def _edit_records(data: bytes, edit: Callable[[list[dict[str, Any]]], None]) -> bytes:
    records = [json.loads(x) for x in data.split(b"\n")[:-1]]
    edit(records)
    return b"".join(canonical_bytes(r) + b"\n" for r in records)


def resign_payload(m: Mutator) -> str:
    """A new payload that breaks a content rule, its header re-signed with the payload's true
    size and sha256 (and counts kept consistent where the rule is not about counts)."""
    rng, base = m.rng, m.base
    seq = m.seq()
    f = m.fields(seq)
    members = list(base.members[seq])
    mem = dict(members)
    start, end = f["start"]["mono_ns"], f["end"]["mono_ns"]
    session, idx = f["session"], f["session_index"]
    media = "media.mkv" in mem
    mtime = m.mtime(members)  # the original's: an edited clock.json may not parse
    modes: dict[str, int] = {}
    recipient: str | None = None
    plaintext: bytes | None = None
    kinds = ["line-outside", "event-outside", "line-raw", "line-flag", "record-noncanonical",
             "record-extra-key", "event-kind", "clock-utc", "clock-anchor-after-end",
             "clock-two-lines", "member-order", "member-mode", "member-mtime", "member-extra",
             "not-tar", "other-recipient", "empty-oplog", "event-drop", "event-session-start",
             "record-surrogate"]
    if f["streams"]["oplog"]["lines"] >= 2:
        kinds.append("line-order")
    if media:
        kinds += ["media-missing", "media-other-segment", "media-truncated", "media-garbage",
                  "media-no-keyframe"]
    if not session:
        kinds.append("media-added")
    how = rng.choice(kinds)

    def put(name: str, data: bytes) -> None:
        nonlocal members
        members = [(n, data if n == name else d) for n, d in members]

    if how == "line-outside" and f["streams"]["oplog"]["lines"]:
        t = rng.choice([end, end + 1, start - 1])
        put("oplog.jsonl", _edit_records(mem["oplog.jsonl"],
                                         lambda rs: rs[-1].update(t_mono_ns=t)))
    elif how == "line-order":
        def swap(rs: list[dict[str, Any]]) -> None:
            rs[0]["t_mono_ns"], rs[1]["t_mono_ns"] = rs[1]["t_mono_ns"], rs[0]["t_mono_ns"]
        put("oplog.jsonl", _edit_records(mem["oplog.jsonl"], swap))
    elif how == "event-outside" and mem["events.jsonl"]:
        t = rng.choice([end, start - 1])
        put("events.jsonl", _edit_records(mem["events.jsonl"],
                                          lambda rs: rs[-1].update(t_mono_ns=t)))
    elif how == "line-raw" and f["streams"]["oplog"]["lines"]:
        def longer(rs: list[dict[str, Any]]) -> None:
            rs[0]["raw"] = base64.b64encode(base64.b64decode(rs[0]["raw"]) + b"!").decode()
        put("oplog.jsonl", _edit_records(mem["oplog.jsonl"], longer))
    elif how == "line-flag" and f["streams"]["oplog"]["lines"]:
        put("oplog.jsonl", _edit_records(mem["oplog.jsonl"],
                                         lambda rs: rs[0].update(flags=["nul"])))
    elif how == "record-noncanonical":
        name = "events.jsonl" if mem["events.jsonl"] else "clock.json"
        put(name, mem[name].replace(b":", b": ", 1))
    elif how == "record-extra-key":
        name = "events.jsonl" if mem["events.jsonl"] else "clock.json"
        put(name, _edit_records(mem[name], lambda rs: rs[0].update(zz=1)))
    elif how == "record-surrogate":
        # a lone surrogate escape in a string: valid JSON, no UTF-8 form
        name = rng.choice(["oplog.jsonl", "events.jsonl", "clock.json"])
        data = mem[name] or mem["clock.json"]
        name = name if mem[name] else "clock.json"
        target = {"oplog.jsonl": b'"text":"', "events.jsonl": b'"kind":"',
                  "clock.json": b'"source":"'}[name]
        put(name, data.replace(target, target + b"\\ud800", 1))
    elif how == "event-kind" and mem["events.jsonl"]:
        put("events.jsonl", _edit_records(mem["events.jsonl"],
                                          lambda rs: rs[0].update(kind="Session-Start")))
    elif how == "clock-utc":
        put("clock.json", _edit_records(mem["clock.json"], lambda rs: rs[0]["anchors"][-1]
                                        .update(utc_ns=rs[0]["anchors"][-1]["utc_ns"] + 1)))
    elif how == "clock-anchor-after-end":
        def late(rs: list[dict[str, Any]]) -> None:
            a = dict(rs[0]["anchors"][-1])
            a["mono_ns"] = end + 1
            rs[0]["anchors"].append(a)
        put("clock.json", _edit_records(mem["clock.json"], late))
    elif how == "clock-two-lines":
        put("clock.json", mem["clock.json"] * 2)
    elif how == "member-order":
        i = rng.randrange(len(members) - 1)
        members[i], members[i + 1] = members[i + 1], members[i]
    elif how == "member-mode":
        modes = {rng.choice(list(mem)): rng.choice([0o644, 0o400, 0o755, 0o4444])}
    elif how == "member-mtime":
        mtime += rng.choice([1, -1, 3600])
    elif how == "member-extra":
        i = rng.randrange(len(members) + 1)
        members.insert(i, (rng.choice(["notes.txt", "media.mkv", "clock.json", "./oplog.jsonl"]),
                           b"x\n"))
    elif how == "not-tar":
        plaintext = rng.choice([b"", rng.randbytes(rng.randrange(1, 3000)), b"\0" * 1024])
    elif how == "other-recipient":
        recipient = str(pyrage.x25519.Identity.generate().to_public())
    elif how == "empty-oplog" and f["streams"]["oplog"]["lines"]:
        put("oplog.jsonl", b"")
    elif how == "event-drop" and mem["events.jsonl"]:
        put("events.jsonl", _edit_records(mem["events.jsonl"], lambda rs: rs.pop()))
        f["streams"]["events"]["count"] -= 1
    elif how == "event-session-start":
        # a session_start where none belongs, or a second one; the count kept consistent
        t = start

        def add(rs: list[dict[str, Any]]) -> None:
            rs.insert(0, {"t_mono_ns": t, "kind": "session_start",
                          "detail": {"trigger": "button", "trigger_mono_ns": t,
                                     "preroll_ns": 0}})
        put("events.jsonl", _edit_records(mem["events.jsonl"], add))
        f["streams"]["events"]["count"] += 1
        if session and idx == 0:
            how = "event-second-session-start"
    elif how == "media-missing":
        members = [(n, d) for n, d in members if n != "media.mkv"]
    elif how == "media-other-segment":
        # the same counts from another segment of this session: its times are outside
        others = [s for s, x in enumerate(base.fields) if s != seq and x["session"] == session
                  and x["streams"]["video"] == f["streams"]["video"]
                  and x["streams"]["audio"] == f["streams"]["audio"]]
        put("media.mkv", dict(base.members[rng.choice(others)])["media.mkv"])
    elif how == "media-truncated":
        # half of it or more: packets are lost, not just the index at the end
        put("media.mkv", mem["media.mkv"][:rng.randrange(len(mem["media.mkv"]) // 2)])
    elif how == "media-garbage":
        put("media.mkv", rng.randbytes(len(mem["media.mkv"])))
    elif how == "media-no-keyframe":
        # the first video packet (a keyframe) left out, the counts kept consistent
        put("media.mkv", _without_first_video_packet(mem["media.mkv"]))
        f["streams"]["video"]["frames"] -= 1
        f["streams"]["video"]["keyframes"] -= 1
    elif how == "media-added":
        members.append(("media.mkv", dict(base.members[0])["media.mkv"]))
    else:
        how = "member-mode"
        modes = {"clock.json": 0o644}
    if plaintext is not None:
        payload = m.encrypt(plaintext)
    else:
        payload = m.seal_members(members, mtime, modes, recipient)
    f["payload"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    m.write(m.pp(seq), payload)
    m.rechain(seq, m.sign(f))
    return f"seq {seq} payload {how}, header re-signed with its size and sha256"


def _without_first_video_packet(media: bytes) -> bytes:
    """media.mkv remuxed without its first video packet."""
    out = io.BytesIO()
    with av.open(io.BytesIO(media), "r", format="matroska") as inp, \
            av.open(out, "w", format="matroska") as mkv:
        targets = {s.index: mkv.add_stream_from_template(s) for s in inp.streams}
        dropped = False
        for pkt in inp.demux():
            if pkt.size == 0 or pkt.pts is None:
                continue
            if pkt.stream.type == "video" and not dropped:
                dropped = True
                continue
            pkt.stream = targets[pkt.stream.index]
            mkv.mux(pkt)
    return out.getvalue()


# --- names: renames, shadows, duplicates, reorders, deletions ------------------------------------


def rename(m: Mutator) -> str:
    path = m.file_of()
    new = m.d / m.lookalike(path.name)
    m.move(path, new)
    return f"{path.name} renamed to {new.name!r}"


def _forged_payload(m: Mutator, seq: int) -> bytes:
    """seq's payload with one log amount (or an event detail) edited, re-encrypted to the
    branch recipient: no key needed."""
    members = list(m.base.members[seq])
    mem = dict(members)
    if b"1000.00" in mem["oplog.jsonl"]:
        text = "金额 9000.00".encode("gb18030") + b"\r\n"
        new = _edit_records(mem["oplog.jsonl"], lambda rs: rs[1].update(
            raw=base64.b64encode(text).decode(), text="金额 9000.00"))
        members = [(n, new if n == "oplog.jsonl" else d) for n, d in members]
    else:
        new = _edit_records(mem["events.jsonl"], lambda rs: rs[-1]["detail"].update(forged=1))
        members = [(n, new if n == "events.jsonl" else d) for n, d in members]
    return m.seal_members(members)


def shadow(m: Mutator) -> str:
    """The original under a lookalike name, a forgery under the real name (or the reverse)."""
    seq = m.seq()
    header = m.rng.random() < 0.4
    path = m.hp(seq) if header else m.pp(seq)
    look = m.d / m.lookalike(path.name)
    if header:
        f = copy.deepcopy(m.base.fields[seq])
        f["end"]["utc_ns"] += 10**9
        forged = m.rng.choice([canonical_bytes(f), m.base.other_headers[seq]])
    else:
        forged = _forged_payload(m, seq)
    original = m.read(path)
    if m.rng.random() < 0.7:
        m.write(look, original)
        m.write(path, forged)
        return f"{path.name} kept as {look.name!r}, forged {'header' if header else 'payload'} "\
            "under the real name"
    m.write(look, forged)
    return f"forged {'header' if header else 'payload'} as {look.name!r} beside {path.name}"


def duplicate(m: Mutator) -> str:
    rng, n = m.rng, m.base.n
    seq = m.seq()
    how = rng.choice(["as-next", "over-other-header", "over-other-payload", "temp",
                      "temp-hex", "lookalike", "hardlink"])
    if how == "as-next":
        m.write(m.hp(n), m.read(m.hp(seq)))
        m.write(m.pp(n), m.read(m.pp(seq)))
        return f"seq {seq} copied as seq {n}"
    if how in ("over-other-header", "over-other-payload"):
        other = rng.choice([s for s in range(n) if s != seq])
        src, dst = (m.hp(seq), m.hp(other)) if how == "over-other-header" \
            else (m.pp(seq), m.pp(other))
        m.write(dst, m.read(src))
        return f"{src.name} copied over {dst.name}"
    path = m.file_of(seq)
    if how == "temp":
        dst = m.d / f".{path.name}.tmp"
    elif how == "temp-hex":
        dst = m.d / f".{path.name}.{rng.randbytes(6).hex()}.tmp"
    else:
        dst = m.d / m.lookalike(path.name)
    if how == "hardlink":
        if not os.path.lexists(path):
            raise Skip("absent")
        os.link(path, dst)
    else:
        m.write(dst, m.read(path))
    return f"{path.name} duplicated as {dst.name!r} ({how})"


def reorder(m: Mutator) -> str:
    rng, n = m.rng, m.base.n
    a, b = rng.sample(range(n), 2)
    how = rng.choice(["segments", "headers", "payloads", "rotate"])

    def swap(x: Path, y: Path) -> None:
        tmp = m.d / ".swap"
        m.move(x, tmp)
        m.move(y, x)
        m.move(tmp, y)

    if how == "rotate":
        seqs = sorted(rng.sample(range(n), 3))
        for s, t in pairwise_cycle(seqs):
            swap(m.hp(s), m.hp(t))
            swap(m.pp(s), m.pp(t))
        return f"segments {seqs} rotated"
    if how in ("segments", "headers"):
        swap(m.hp(a), m.hp(b))
    if how in ("segments", "payloads"):
        swap(m.pp(a), m.pp(b))
    return f"{how} of seq {a} and seq {b} swapped"


def pairwise_cycle(seqs: list[int]) -> list[tuple[int, int]]:
    return [(seqs[0], seqs[i]) for i in range(1, len(seqs))]


def delete(m: Mutator) -> str:
    rng, n = m.rng, m.base.n
    how = rng.choice(["header", "payload", "segment", "head", "files"])
    if how == "header":
        path = m.hp(m.seq())
    elif how == "payload":
        path = m.pp(m.seq())
    elif how == "segment":
        seq = m.seq(0, n - 1)  # not the newest: that is a tail removal
        m.remove(m.hp(seq))
        m.remove(m.pp(seq))
        return f"segment seq {seq} deleted"
    elif how == "head":
        k = rng.randrange(1, n)
        for s in range(k):
            m.remove(m.hp(s))
            m.remove(m.pp(s))
        return f"the oldest {k} segments deleted"
    else:
        names = sorted(os.listdir(m.d))
        gone = rng.sample(names, rng.randrange(2, 5))
        for name in gone:
            m.remove(m.d / name)
        return f"files {gone} deleted"
    if not os.path.lexists(path):
        raise Skip("absent")
    m.remove(path)
    return f"{path.name} deleted"


def tail_removal(m: Mutator) -> str:
    n = m.base.n
    k = m.rng.randrange(1, n + 1)
    for s in range(n - k, n):
        m.remove(m.hp(s))
        m.remove(m.pp(s))
    return f"the newest {k} segments deleted"


# --- the second device --------------------------------------------------------------------------


def splice(m: Mutator) -> str:
    rng, base = m.rng, m.base
    n = base.n
    seq = m.seq()
    how = rng.choice(["segment", "header", "payload", "append", "tail", "prefix"])
    if how in ("segment", "header"):
        m.write(m.hp(seq), base.other_headers[seq])
    if how in ("segment", "payload"):
        m.write(m.pp(seq), base.other_payloads[seq])
    if how in ("segment", "header", "payload"):
        return f"seq {seq} {how} replaced by device B's"
    if how == "append":
        m.write(m.hp(n), base.other_headers[n])
        m.write(m.pp(n), base.other_payloads[n])
        return f"device B's seq {n} appended"
    # never all of device B's chain from seq 0: that is device B's own valid directory
    seqs = range(max(seq, 1), len(base.other_headers)) if how == "tail" else range(0, seq + 1)
    if how == "prefix" and seq == n - 1:
        seqs = range(0, n - 1)
    for s in seqs:
        m.write(m.hp(s), base.other_headers[s])
        m.write(m.pp(s), base.other_payloads[s])
    return f"seqs {seqs.start}..{seqs.stop - 1} replaced by device B's ({how})"


def replay(m: Mutator) -> str:
    rng, base = m.rng, m.base
    n = base.n
    how = rng.choice(["own-as-next", "own-run-as-next", "other-as-next", "own-over-other"])
    seq = m.seq()
    if how == "own-as-next":
        m.write(m.hp(n), base.headers[seq])
        m.write(m.pp(n), base.payloads[seq])
        return f"seq {seq} replayed as seq {n}"
    if how == "own-run-as-next":
        k = rng.randrange(1, n - seq + 1)
        for i in range(k):
            m.write(m.hp(n + i), base.headers[seq + i])
            m.write(m.pp(n + i), base.payloads[seq + i])
        return f"seqs {seq}..{seq + k - 1} replayed as {n}..{n + k - 1}"
    if how == "other-as-next":
        m.write(m.hp(n), base.other_headers[seq])
        m.write(m.pp(n), base.other_payloads[seq])
        return f"device B's seq {seq} replayed as seq {n}"
    other = rng.choice([s for s in range(n) if s != seq])
    m.write(m.hp(other), base.headers[seq])
    m.write(m.pp(other), base.payloads[seq])
    return f"seq {seq} replayed over seq {other}"


# --- file types and entries ---------------------------------------------------------------------


def non_regular(m: Mutator) -> str:
    rng, n = m.rng, m.base.n
    seq = rng.choice([*range(n), n])
    path = m.file_of(seq)
    kind = rng.choice(["directory", "dangling-symlink", "symlink-same", "symlink-other",
                       "symlink-dir", "fifo", "socket"])
    if kind == "symlink-same" and seq < n:
        target = m.stash / f"same-{path.name}"
        target.write_bytes(m.read(path))
    elif kind == "symlink-other":
        other = m.base.device_dir / (header_name if path.name.endswith("json")
                                     else payload_name)(rng.randrange(n))
        target = other
    else:
        target = m.stash / "missing"
    m.remove(path)
    if kind == "directory":
        path.mkdir()
        if rng.random() < 0.5:
            (path / "x").write_bytes(b"{}")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
        finally:
            s.close()
    elif kind == "symlink-dir":
        os.symlink(rng.choice([".", "..", str(m.stash)]), path)
    else:
        os.symlink(target, path)
    return f"{path.name} is now a {kind}"


def extra_entry(m: Mutator) -> str:
    rng, n = m.rng, m.base.n
    how = rng.choice(["unknown-file", "unknown-dir", "temp", "orphan-next", "garbage-header",
                      "far-payload", "unknown-symlink", "lookalike-empty"])
    if how == "unknown-file":
        name = rng.choice(["README.txt", ".DS_Store", "notes", "0000000000.hdr.json.sig",
                           "chain.db", "-", "\udcff.bin"])
        m.write(m.d / name, rng.randbytes(rng.randrange(0, 64)))
    elif how == "unknown-dir":
        name = rng.choice(["sub", ".git", "lost+found"])
        (m.d / name).mkdir()
    elif how == "temp":
        name = f".{m.file_of(rng.randrange(n + 1)).name}.tmp"
        m.write(m.d / name, rng.randbytes(32))
    elif how == "orphan-next":
        name = payload_name(n)
        m.write(m.d / name, m.base.payloads[rng.randrange(n)])
    elif how == "garbage-header":
        name = header_name(n)
        m.write(m.d / name, rng.choice([b"", b"{}", b"null", rng.randbytes(40)]))
    elif how == "far-payload":
        name = payload_name(rng.choice([10**9, 9_999_999_999, n + 5]))
        m.write(m.d / name, m.base.payloads[0])
    elif how == "unknown-symlink":
        name = "latest"
        os.symlink(header_name(n - 1), m.d / name)
    else:
        name = m.lookalike(m.file_of().name)
        m.write(m.d / name, b"")
    return f"entry {name!r} added ({how})"


CLASSES: dict[str, Mutation] = {
    "hdr_byte_flip": hdr_byte_flip,
    "hdr_bit_flip": hdr_bit_flip,
    "pay_byte_flip": pay_byte_flip,
    "pay_bit_flip": pay_bit_flip,
    "hdr_truncate": hdr_truncate,
    "hdr_extend": hdr_extend,
    "pay_truncate": pay_truncate,
    "pay_extend": pay_extend,
    "recanon_edit": recanon_edit,
    "noncanonical": noncanonical,
    "json_escape": json_escape,
    "sig_malleable": sig_malleable,
    "resign_schema": resign_schema,
    "resign_consistency": resign_consistency,
    "resign_reason": resign_reason,
    "resign_preroll": resign_preroll,
    "resign_payload": resign_payload,
    "rename": rename,
    "shadow": shadow,
    "duplicate": duplicate,
    "reorder": reorder,
    "delete": delete,
    "tail_removal": tail_removal,
    "splice": splice,
    "replay": replay,
    "non_regular": non_regular,
    "extra_entry": extra_entry,
}
COMBINABLE = [name for name in CLASSES if name != "tail_removal"]


def combo(m: Mutator) -> str:
    """Two or three mutations of other classes on one directory."""
    done = []
    for name in m.rng.sample(COMBINABLE, m.rng.randrange(2, 4)):
        try:
            done.append(f"{name}: {CLASSES[name](m)}")
        except Skip as exc:
            done.append(f"{name}: skipped ({exc})")
    return " | ".join(done)


CLASSES["combo"] = combo
