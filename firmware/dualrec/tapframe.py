"""The tap frame: how the Pico serial tap talks to the box over USB CDC (docs/tap.md, wire format).

This one file is the codec of both ends: the MicroPython tap imports it as ``tapframe`` (installed
next to its package by mip, or frozen), the gateway as ``dualrec.tapframe``. It therefore runs
unchanged under CPython 3.11 and MicroPython: no imports beyond ``struct`` and ``binascii``, no
``typing`` or ``__future__`` (MicroPython has neither; annotations are written so that CPython
can evaluate them and MicroPython ignores them), plain f-strings only (no ``=``, no format
specs MicroPython lacks), no ``del`` on bytearray slices (MicroPython refuses it), and
``find`` only on ``bytes`` (``bytearray.find`` is not on every port).
tests/test_tapframe.py runs the same vectors through both interpreters and compares bytes.

Record, before COBS (all integers little-endian)::

    version u8 (=1) | channel u8 | seq u32 | ticks u64 | flags u8 | payload | crc32 u32

``crc32`` is the IEEE CRC-32 (zlib's) over everything before it. The record is COBS-encoded and
followed by one 0x00, so a receiver that joins mid-stream or loses bytes resynchronises at the
next zero. ``seq`` counts every frame the tap built since boot, over all channels, so a gap in it
is exactly the number of frames lost (on the wire, to CRC errors, or dropped by the tap when the
host did not read). ``ticks`` is the tap's ``ticks_us`` extended to 64 bits (TickExtender).

Channels:

- 0, 1: bytes of the tapped UART lines (0: terminal TX, 1: terminal RX), stamped with the tap's
  best estimate of when the first byte of the run arrived;
- 2: a sync-line edge, stamped in the pin interrupt; payload: edge index u32 (counts every edge
  since boot, including edges the tap had to drop, so the box sees missing ones);
- 3: heartbeat, once a second; payload: u32 counters in HEARTBEAT_FIELDS order (a receiver must
  ignore extra trailing fields and treat missing ones as absent, so fields can be appended);
- 4: hello, the first frame after boot (flag FIRST); payload: ASCII ``name/version key=value ...``.
"""

import struct

try:
    import binascii

    # A MicroPython build without binascii.crc32 gets None: the table below does it.
    _crc32_native = getattr(binascii, "crc32", None)
except ImportError:
    _crc32_native = None

VERSION = 1

CH_UART0 = 0
CH_UART1 = 1
CH_SYNC = 2
CH_HEARTBEAT = 3
CH_HELLO = 4

FLAG_OVERRUN = 1  # the UART lost bytes before this run (hardware FIFO or ring buffer full)
FLAG_FRAMING = 2
FLAG_PARITY = 4
FLAG_BREAK = 8
FLAG_FIRST = 16  # first frame after the tap reset (the hello)

FLAG_NAMES = (
    (FLAG_OVERRUN, "overrun"),
    (FLAG_FRAMING, "framing"),
    (FLAG_PARITY, "parity"),
    (FLAG_BREAK, "break"),
    (FLAG_FIRST, "first"),
)

HEARTBEAT_FIELDS = (
    "bytes0",  # UART bytes read on channel 0 since boot (mod 2^32)
    "bytes1",  # ... on channel 1
    "overruns",  # UART overrun errors seen (hardware FIFO full)
    "uart_errors",  # framing, parity and break errors seen
    "boots",  # how many times this tap has booted (kept in its flash; 0 if unknown)
    "frames",  # frames built since boot (the next seq)
    "dropped",  # frames dropped because the host did not read the CDC port fast enough
    "sync_edges",  # sync-line edges seen
    "sync_lost",  # sync edges dropped because the interrupt ring was full
    "loop_max_us",  # longest main-loop iteration in the last heartbeat interval
)

HEADER_FMT = "<BBIQB"
HEADER_LEN = 15  # struct.calcsize(HEADER_FMT)
CRC_LEN = 4
MAX_PAYLOAD = 1024
MIN_RECORD = HEADER_LEN + CRC_LEN
MAX_RECORD = HEADER_LEN + MAX_PAYLOAD + CRC_LEN
# COBS adds one byte per started 254-byte block; plus the trailing zero.
MAX_ENCODED = MAX_RECORD + MAX_RECORD // 254 + 2

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_ZERO = b"\x00"

_crc_table = None


def crc32_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Table-driven IEEE CRC-32, same result as zlib.crc32; for ports without binascii.crc32."""
    global _crc_table
    if _crc_table is None:
        table = []
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
        _crc_table = table
    table = _crc_table
    c = crc ^ _U32
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ _U32


def crc32(data: bytes | bytearray | memoryview) -> int:
    """IEEE CRC-32 of a bytes-like object, as an unsigned int on both interpreters."""
    if _crc32_native is not None:
        return _crc32_native(data) & _U32
    return crc32_py(data)


def cobs_encode(data: bytes | bytearray | memoryview) -> bytes:
    """Consistent Overhead Byte Stuffing (Cheshire & Baker); the result holds no 0x00.

    Works in whole runs between zeros (``bytes.find`` and slice copies run in C), not per byte:
    on the Pico a per-byte loop would cost a good part of the CPU at 921600 baud.
    """
    data = bytes(data)
    n = len(data)
    out = bytearray(n + n // 254 + 2)
    o = 0
    i = 0
    while True:
        z = data.find(_ZERO, i)
        last = z < 0
        seg_end = n if last else z
        seg_len = seg_end - i
        # Full 254-byte blocks (code 0xFF) carry no implied zero after them.
        while seg_end - i >= 254:
            out[o] = 0xFF
            out[o + 1 : o + 255] = data[i : i + 254]
            o += 255
            i += 254
        rest = seg_end - i
        # The closing block stands for the zero after the segment; the final segment needs
        # one only if it did not end exactly on a full block (or is empty).
        if not (last and rest == 0 and seg_len > 0):
            out[o] = rest + 1
            out[o + 1 : o + 1 + rest] = data[i:seg_end]
            o += rest + 1
        if last:
            break
        i = seg_end + 1
    return bytes(out[:o])


def cobs_decode(data: bytes | bytearray | memoryview) -> bytes | None:
    """Inverse of cobs_encode; returns None if data is not valid COBS (a zero, a short block)."""
    data = bytes(data)
    n = len(data)
    out = bytearray()
    i = 0
    while i < n:
        code = data[i]
        if code == 0:
            return None
        end = i + code
        if end > n:
            return None
        out.extend(data[i + 1 : end])
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode(channel: int, seq: int, ticks: int, flags: int, payload: bytes = b"") -> bytes:
    """One frame on the wire: COBS(record) + 0x00."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise ValueError("payload too long")
    rec = bytearray(HEADER_LEN + n + CRC_LEN)
    struct.pack_into(HEADER_FMT, rec, 0, VERSION, channel, seq & _U32, ticks & _U64, flags)
    rec[HEADER_LEN : HEADER_LEN + n] = payload
    struct.pack_into("<I", rec, HEADER_LEN + n, crc32(memoryview(rec)[: HEADER_LEN + n]))
    return cobs_encode(rec) + _ZERO


class Frame:
    """A decoded frame (a small class rather than a namedtuple: equal on both interpreters)."""

    def __init__(self, version: int, channel: int, seq: int, ticks: int, flags: int,
                 payload: bytes) -> None:
        self.version = version
        self.channel = channel
        self.seq = seq
        self.ticks = ticks
        self.flags = flags
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and self.astuple() == other.astuple()

    def __repr__(self) -> str:
        return (f"Frame(version={self.version}, channel={self.channel}, seq={self.seq}, "
                f"ticks={self.ticks}, flags={self.flags}, payload={self.payload!r})")

    def astuple(self) -> tuple[int, int, int, int, int, bytes]:
        return (self.version, self.channel, self.seq, self.ticks, self.flags, self.payload)


def decode_record(rec: bytes) -> Frame | str:
    """Parse a de-COBSed record: a Frame, or a string naming what is wrong with it."""
    if len(rec) < MIN_RECORD:
        return "short"
    if len(rec) > MAX_RECORD:
        return "oversize"
    body = len(rec) - CRC_LEN
    if struct.unpack_from("<I", rec, body)[0] != crc32(memoryview(rec)[:body]):
        return "crc"
    version, channel, seq, ticks, flags = struct.unpack_from(HEADER_FMT, rec, 0)
    if version != VERSION:
        return "version"
    return Frame(version, channel, seq, ticks, flags, bytes(rec[HEADER_LEN:body]))


class Decoder:
    """Incremental decoder of the frame stream: feed() any chunking, get whole frames back.

    Bad frames are counted by kind and skipped; decoding resumes at the next 0x00, so one flipped
    byte costs one frame (or two, if it was a delimiter), never the stream. Memory is bounded by
    max_encoded: a run that long without a delimiter is dropped as "oversize" and its remainder
    skipped up to the next delimiter. Empty frames (consecutive zeros) are ignored: the tap sends
    a lone 0x00 at boot to end whatever partial frame the host holds.
    """

    KINDS = ("cobs", "crc", "short", "oversize", "version")

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        self.max_encoded = max_encoded
        self._buf = b""
        self._skipping = False  # inside an oversize run: drop up to the next delimiter
        self._joining = False  # the next frame may be the tail of one sent before we listened
        self.errors: dict[str, int] = {}
        for kind in self.KINDS:
            self.errors[kind] = 0
        self.frames = 0
        self.joined_partial = 0  # such tails, dropped without counting them as errors

    def error_count(self) -> int:
        return sum(self.errors.values())

    def reset(self, joining: bool = True) -> None:
        """Forget the partial frame: the link was (re)opened, maybe in the middle of a frame.

        With joining, a bad first frame is the tail of one sent before we listened, not damage:
        it is dropped and counted in ``joined_partial`` rather than in ``errors``.
        """
        self._buf = b""
        self._skipping = False
        self._joining = joining

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return the Frames they completed, in order."""
        out: list[Frame] = []
        data = bytes(data)
        start = 0
        n = len(data)
        while start < n:
            z = data.find(_ZERO, start)
            if z < 0:
                if not self._skipping:
                    self._buf += data[start:]
                    if len(self._buf) > self.max_encoded:
                        self._oversize()
                break
            first = self._joining
            self._joining = False
            if self._skipping:
                self._skipping = False
            else:
                chunk = self._buf + data[start:z] if self._buf else data[start:z]
                self._buf = b""
                if len(chunk) > self.max_encoded:
                    self.errors["oversize"] += 1
                elif chunk:
                    self._frame(chunk, out, first)
            start = z + 1
        return out

    def _oversize(self) -> None:
        self.errors["oversize"] += 1
        self._buf = b""
        self._skipping = True

    def _frame(self, chunk: bytes, out: list[Frame], first: bool = False) -> None:
        rec = cobs_decode(chunk)
        got = "cobs" if rec is None else decode_record(rec)
        if isinstance(got, str):
            if first:
                self.joined_partial += 1
            else:
                self.errors[got] += 1
            return
        self.frames += 1
        out.append(got)


class TickExtender:
    """Turns wrapping ``ticks_us`` readings into a 64-bit count that never wraps or goes back.

    MicroPython's ticks wrap at ``period`` (2^30 µs, about 18 minutes, on the Pico; the unix
    stand-in imitates that). The difference of two readings is taken the ``ticks_diff`` way,
    modulo the period into [-period/2, period/2), so readings must come at least every
    period/2 (9 minutes): the tap's heartbeat takes one every second. A reading a little older
    than the newest (a pin interrupt's stamp, handled after the main loop read the clock) is
    extended to the past correctly and does not move the state backwards.
    """

    def __init__(self, period: int = 1 << 30) -> None:
        if period & (period - 1) or period < 4:
            raise ValueError("period must be a power of two")
        self.period = period
        self._mask = period - 1
        self._half = period >> 1
        self._raw = -1  # no reading yet
        self._ext = 0

    def diff(self, a: int, b: int) -> int:
        """ticks_diff(a, b) for this period."""
        return ((a - b + self._half) & self._mask) - self._half

    def extend(self, raw: int) -> int:
        raw &= self._mask
        if self._raw < 0:
            self._raw = raw
            self._ext = raw
            return raw
        d = self.diff(raw, self._raw)
        ext = self._ext + d
        if d > 0:
            self._raw = raw
            self._ext = ext
        return ext


def pack_u32s(values: list[int] | tuple[int, ...]) -> bytes:
    """Counters as consecutive u32 LE (heartbeat payload); each taken modulo 2^32."""
    out = bytearray(4 * len(values))
    for i, v in enumerate(values):
        struct.pack_into("<I", out, 4 * i, v & _U32)
    return bytes(out)


def parse_heartbeat(payload: bytes) -> dict[str, int]:
    """Heartbeat payload as {field: value}; unknown trailing fields are kept as "f<index>"."""
    out: dict[str, int] = {}
    for i in range(len(payload) // 4):
        name = HEARTBEAT_FIELDS[i] if i < len(HEARTBEAT_FIELDS) else f"f{i}"
        out[name] = struct.unpack_from("<I", payload, 4 * i)[0]
    return out


def pack_hello(version: str, fields: dict[str, object]) -> bytes:
    """Hello payload: "name/version k=v k=v" in ASCII (keys sorted, values without spaces)."""
    parts = [version]
    for key in sorted(fields):
        parts.append(f"{key}={fields[key]}")
    return " ".join(parts).encode()


def parse_hello(payload: bytes) -> tuple[str, dict[str, str]]:
    """(version, {key: value}) from a hello payload; tolerant of junk (it is informative only)."""
    words = bytes(payload).decode("ascii", "replace").split(" ")
    fields: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if eq:
            fields[key] = value
    return words[0], fields


def flag_names(flags: int) -> tuple[str, ...]:
    """The names of the set flag bits, in bit order."""
    return tuple(name for bit, name in FLAG_NAMES if flags & bit)
