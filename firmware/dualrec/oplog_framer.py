"""Split the teller terminal's operation-log byte stream into timestamped LogLines.

The framer is pure (no I/O, no clock): the serial backend and the Pico tap both hand it chunks
with the CLOCK_MONOTONIC time at which each chunk arrived, and it returns finished lines.

Guarantees the rest of the box relies on:

- Evidence first: the concatenation of every returned line's ``raw`` equals the input bytes,
  whatever the chunking, garbage or line length. ``text`` is a best-effort reading of ``raw``.
- Each line is stamped with the time of the chunk that delivered its first byte.
- Memory is bounded: at most ``max_line + len(line_end) - 1`` bytes are kept between calls, so
  a terminal that streams a megabyte without a newline cannot exhaust the box.

Flags (a sorted tuple on each line):

- ``overlong``: the line exceeded ``max_line`` content bytes and was cut into pieces; every
  piece carries it, every piece after the first also carries ``continued``.
- ``decode_error``: the bytes are not valid in the configured encoding (decoded with U+FFFD).
- ``nul``: the line held NUL bytes (removed from ``text``, kept in ``raw``).
- ``control``: other C0 control characters except tab (kept in ``text``).
- ``unterminated``: the line was returned by flush() without a terminator.
"""

from __future__ import annotations

import bisect
import codecs

from dualrec.samples import LogLine

_CONTROL = frozenset(chr(c) for c in range(0x20)) - {"\t", "\x00"}


class LineFramer:
    """Incremental line splitter for one byte stream; not thread-safe (one reader owns it)."""

    def __init__(self, encoding: str, line_end: bytes, max_line: int) -> None:
        if not line_end:
            raise ValueError("line_end must not be empty")
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        codecs.lookup(encoding)  # fail at configuration time, not on the first line
        self.encoding = encoding
        self.line_end = line_end
        self.max_line = max_line
        # Terminals configured for CRLF still emit bare LF now and then (a reset, a different
        # print path), so in CRLF mode "\n" is the token and a preceding "\r" joins it.
        self._crlf = line_end == b"\r\n"
        self._token = b"\n" if self._crlf else line_end
        self._buf = bytearray()
        # Where each feed's bytes begin in _buf and its t, oldest first, for every feed with bytes
        # still buffered: a piece can start mid-buffer and must carry its own first byte's time.
        self._mark_offsets: list[int] = []
        self._mark_times: list[int] = []
        self._scanned = 0  # _buf[:_scanned] is known to hold no token start
        self._continued = False  # the next line is a continuation piece of an overlong line

    def feed(self, data: bytes, t_mono_ns: int) -> list[LogLine]:
        """Add bytes that arrived at t_mono_ns; return the lines they completed."""
        if not data:
            return []
        self._mark_offsets.append(len(self._buf))
        self._mark_times.append(t_mono_ns)
        self._buf.extend(data)
        out: list[LogLine] = []
        buf = self._buf
        pos = 0
        end_len = len(self.line_end)
        while True:
            idx = buf.find(self._token, max(pos, self._scanned))
            if idx < 0:
                # A token split across chunks must be found next time, so rescan its prefix.
                self._scanned = max(pos, len(buf) - len(self._token) + 1)
                while len(buf) - pos >= self.max_line + end_len:
                    pos = self._cut(pos, out)
                break
            content_end, term_end = idx, idx + len(self._token)
            if self._crlf and idx > pos and buf[idx - 1] == 0x0D:
                content_end -= 1
            while content_end - pos > self.max_line:
                pos = self._cut(pos, out)
            out.append(self._make(pos, content_end, term_end, unterminated=False))
            self._continued = False
            pos = term_end
            self._scanned = pos
        self._consume(pos)
        return out

    def flush(self, t_mono_ns: int) -> list[LogLine]:
        """Return the buffered partial line, if any (on stop or when the line is known broken).

        t_mono_ns is accepted for symmetry with feed(); the line keeps its first byte's time.
        """
        del t_mono_ns
        if not self._buf:
            return []
        out: list[LogLine] = []
        pos = 0
        end = content_end = len(self._buf)
        # A lone trailing "\r" in CRLF mode is the first half of a terminator, not content.
        if self._crlf and self._buf[end - 1] == 0x0D:
            content_end -= 1
        while content_end - pos > self.max_line:
            pos = self._cut(pos, out)
        out.append(self._make(pos, content_end, end, unterminated=True))
        self._continued = False
        self._consume(end)
        return out

    def _cut(self, pos: int, out: list[LogLine]) -> int:
        """Emit one overlong piece starting at pos; return where the next piece starts."""
        end = pos + self.max_line
        # Cutting at a byte count could split a multi-byte character; hand its leading bytes to
        # the next piece instead, so both pieces decode cleanly and no byte is lost either way.
        pending = self._pending_tail(bytes(self._buf[pos:end]))
        if 0 < pending < end - pos:
            end -= pending
        out.append(self._make(pos, end, end, unterminated=False, overlong=True))
        self._continued = True
        return end

    def _pending_tail(self, piece: bytes) -> int:
        """How many trailing bytes of piece are an incomplete multi-byte character."""
        try:
            dec = codecs.getincrementaldecoder(self.encoding)("replace")
            dec.decode(piece, final=False)
            return len(dec.getstate()[0])
        except Exception:  # a codec without getstate(): cut at the byte count
            return 0

    def _make(
        self,
        start: int,
        content_end: int,
        end: int,
        *,
        unterminated: bool,
        overlong: bool = False,
    ) -> LogLine:
        raw = bytes(self._buf[start:end])
        content = bytes(self._buf[start:content_end])
        flags: set[str] = set()
        if overlong or self._continued:
            flags.add("overlong")
        if self._continued:
            flags.add("continued")
        if unterminated:
            flags.add("unterminated")
        try:
            text = content.decode(self.encoding)
        except UnicodeDecodeError:
            text = content.decode(self.encoding, errors="replace")
            flags.add("decode_error")
        if "\x00" in text:
            flags.add("nul")
            text = text.replace("\x00", "")
        if not _CONTROL.isdisjoint(text):
            flags.add("control")
        return LogLine(
            t_mono_ns=self._time_at(start), raw=raw, text=text, flags=tuple(sorted(flags))
        )

    def _time_at(self, offset: int) -> int:
        """The t of the feed that delivered _buf[offset]."""
        return self._mark_times[bisect.bisect_right(self._mark_offsets, offset) - 1]

    def _consume(self, pos: int) -> None:
        """Drop _buf[:pos] and rebase the bookkeeping on what is left."""
        if pos == 0:
            return
        del self._buf[:pos]
        self._scanned = max(0, self._scanned - pos)
        if not self._buf:
            self._mark_offsets.clear()
            self._mark_times.clear()
            return
        # Keep the last mark at or before pos: it stamps the byte now at offset 0.
        first = bisect.bisect_right(self._mark_offsets, pos) - 1
        self._mark_offsets = [0] + [off - pos for off in self._mark_offsets[first + 1 :]]
        self._mark_times = self._mark_times[first:]
