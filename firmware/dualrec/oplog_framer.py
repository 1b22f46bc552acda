"""Split the teller terminal's operation-log byte stream into timestamped LogLines.

The framer is pure (no I/O, no clock): the serial backend and the Pico tap both hand it chunks
with the CLOCK_MONOTONIC time at which each chunk arrived, and it returns finished lines.

Guarantees the rest of the box relies on:

- Evidence first: the concatenation of every returned line's ``raw`` equals the input bytes,
  whatever the chunking, the pauses, the line endings, garbage or line length. ``text`` is a
  best-effort reading of ``raw`` (dualrec.oplog_decode).
- Each line is stamped with the time of the chunk that delivered its first byte.
- Memory is bounded: at most ``max_line + 1`` bytes are kept between calls, so a terminal that
  streams a megabyte without a newline cannot exhaust the box.

Line ends (``line_end``):

- ``"any"`` (the default): CR, LF and CRLF in any mix. A CR directly followed by LF is one
  terminator; a CR that is the last byte so far waits for the next byte to decide (or for the
  idle timeout, which ends the line at the CR). LF CR is two terminators (an empty line).
- ``"\\r\\n"``: LF ends a line and a CR right before it belongs to the terminator (a bare LF
  still ends a line); a bare CR is content (flag ``control``).
- ``"\\n"``, ``"\\r"``: that byte alone; the other one is content.

Idle timeout (``idle_ms``): a line whose last byte is older than idle_ms is complete even
without a terminator. It is decided on stamps only: feed() ends the buffered line when the new
chunk arrives idle_ms or more after the previous one, and poll(now) ends it when the reader wakes
up without data, so the result does not depend on when the reader thread happens to run.

Flags (a sorted tuple on each line):

- ``overlong``: the line exceeded ``max_line`` content bytes and was cut into pieces; every
  piece carries it, every piece after the first also carries ``continued``.
- ``decode_error``: the bytes are not valid in the encoding (decoded with U+FFFD).
- ``nul``: the line held NUL bytes (removed from ``text``, kept in ``raw``).
- ``control``: other C0 control characters except tab (kept in ``text``).
- ``unterminated``: the line ended without a terminator (idle timeout, flush()).
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from typing import Any

from dualrec.oplog_decode import DecodeWatch, check_encoding, decode_line, pending_tail
from dualrec.samples import LogLine

_CONTROL = frozenset(chr(c) for c in range(0x20)) - {"\t", "\x00"}
_CR, _LF = 0x0D, 0x0A
LINE_ENDS = ("any", "\r\n", "\n", "\r")
# The byte each mode looks for; in "\r\n" mode a CR just before the LF joins it.
_TOKENS = {"any": rb"[\r\n]", "\r\n": rb"\n", "\n": rb"\n", "\r": rb"\r"}


class LineFramer:
    """Incremental line splitter for one byte stream; not thread-safe (one reader owns it)."""

    def __init__(self, encoding: str, line_end: str | bytes, max_line: int, *,
                 idle_ms: int | None = None, decode_error_run: int | None = None) -> None:
        """line_end: one of LINE_ENDS (bytes accepted too); idle_ms None: no idle timeout;
        decode_error_run None: no decode fault (see DecodeWatch)."""
        mode = line_end.decode("latin-1") if isinstance(line_end, bytes) else line_end
        if not mode:
            raise ValueError("line_end must not be empty")
        if mode not in LINE_ENDS:
            raise ValueError(f"line_end {mode!r} is not one of {LINE_ENDS}")
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        if idle_ms is not None and idle_ms < 1:
            raise ValueError("idle_ms must be at least 1")
        check_encoding(encoding)
        self.encoding = encoding
        self.line_end = mode
        self.max_line = max_line
        self.idle_ms = idle_ms
        self.decode_error_run = decode_error_run
        self._idle_ns = None if idle_ms is None else idle_ms * 1_000_000
        self._search = re.compile(_TOKENS[mode]).search
        # Bytes a line may hold beyond max_line while its terminator is not known yet: "\r\n"
        # mode keeps a trailing CR (the LF may come next); so does "any" mode, but there the CR
        # is found as a token and handled before the overlong cut.
        self._hold = 2 if mode == "\r\n" else 1
        self.watch = DecodeWatch(encoding, decode_error_run)
        # Transitions of the watch for the reader to put on record; it drains them after every
        # call, so the bound only matters for a caller that never does.
        self._events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=64)
        self._buf = bytearray()
        # Where each feed's bytes begin in _buf and its t, oldest first, for every feed with bytes
        # still buffered: a piece can start mid-buffer and must carry its own first byte's time.
        self._mark_offsets: list[int] = []
        self._mark_times: list[int] = []
        self._scanned = 0  # _buf[:_scanned] is known to hold no token
        self._continued = False  # the next line is a continuation piece of an overlong line

    def fresh(self) -> LineFramer:
        """A new framer with the same settings (another channel of the same terminal)."""
        return LineFramer(self.encoding, self.line_end, self.max_line, idle_ms=self.idle_ms,
                          decode_error_run=self.decode_error_run)

    def wake_interval_s(self, read_timeout_s: float) -> float:
        """The longest a reader may block without data and still notice a pause in time."""
        if self._idle_ns is None:
            return read_timeout_s
        return min(read_timeout_s, self._idle_ns / 2e9)

    def feed(self, data: bytes, t_mono_ns: int) -> list[LogLine]:
        """Add bytes that arrived at t_mono_ns; return the lines they completed (the buffered
        line first, when these bytes come after a pause of idle_ms or more)."""
        if not data:
            return []
        out = self.poll(t_mono_ns)
        self._mark_offsets.append(len(self._buf))
        self._mark_times.append(t_mono_ns)
        self._buf.extend(data)
        self._scan(out)
        return out

    def poll(self, now_ns: int) -> list[LogLine]:
        """The buffered line, complete because its last byte is idle_ms or more older than
        now_ns; [] when there is none or it is not due (or there is no idle timeout)."""
        if (self._buf and self._idle_ns is not None
                and now_ns - self._mark_times[-1] >= self._idle_ns):
            return self._drain()
        return []

    def flush(self, t_mono_ns: int) -> list[LogLine]:
        """Return the buffered partial line, if any (on stop or when the line is known broken).

        t_mono_ns is accepted for symmetry with feed(); the line keeps its first byte's time.
        """
        del t_mono_ns
        return self._drain()

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        """The decode fault's transitions since the last call: ("fault" | "fault_cleared",
        detail) for the reader to put on record."""
        out = list(self._events)
        self._events.clear()
        return out

    def _scan(self, out: list[LogLine]) -> None:
        buf = self._buf
        pos = 0
        while True:
            m = self._search(buf, max(pos, self._scanned))
            if m is None:
                self._scanned = len(buf)
                while len(buf) - pos >= self.max_line + self._hold:
                    pos = self._cut(pos, out)
                break
            idx = m.start()
            content_end, term_end = idx, idx + 1
            if self.line_end == "\r\n" and idx > pos and buf[idx - 1] == _CR:
                content_end -= 1
            elif self.line_end == "any" and buf[idx] == _CR:
                if term_end == len(buf):
                    # CR as the last byte: CRLF or a bare CR, the next byte (or a pause) says.
                    while idx - pos > self.max_line:
                        pos = self._cut(pos, out)
                    self._scanned = idx
                    break
                if buf[term_end] == _LF:
                    term_end += 1
            while content_end - pos > self.max_line:
                pos = self._cut(pos, out)
            out.append(self._make(pos, content_end, term_end, unterminated=False))
            self._continued = False
            pos = term_end
            self._scanned = pos
        self._consume(pos)

    def _drain(self) -> list[LogLine]:
        """End the buffered line where it is (a pause, a stop, a loss)."""
        if not self._buf:
            return []
        out: list[LogLine] = []
        pos = 0
        end = content_end = len(self._buf)
        terminated = False
        if self._buf[end - 1] == _CR and self.line_end in ("any", "\r\n"):
            # A trailing CR is a whole terminator in "any" mode; in "\r\n" mode it is the first
            # half of one, not content, and the line still lacks its terminator.
            content_end -= 1
            terminated = self.line_end == "any"
        while content_end - pos > self.max_line:
            pos = self._cut(pos, out)
        out.append(self._make(pos, content_end, end, unterminated=not terminated))
        self._continued = False
        self._consume(end)
        return out

    def _cut(self, pos: int, out: list[LogLine]) -> int:
        """Emit one overlong piece starting at pos; return where the next piece starts."""
        end = pos + self.max_line
        # Cutting at a byte count could split a multi-byte character; hand its leading bytes to
        # the next piece instead, so both pieces decode cleanly and no byte is lost either way.
        pending = pending_tail(bytes(self._buf[pos:end]), self.encoding)
        if 0 < pending < end - pos:
            end -= pending
        out.append(self._make(pos, end, end, unterminated=False, overlong=True))
        self._continued = True
        return end

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
        t = self._time_at(start)
        flags: set[str] = set()
        if overlong or self._continued:
            flags.add("overlong")
        if self._continued:
            flags.add("continued")
        if unterminated:
            flags.add("unterminated")
        text, bad = decode_line(content, self.encoding)
        if bad:
            flags.add("decode_error")
        if "\x00" in text:
            flags.add("nul")
            text = text.replace("\x00", "")
        if not _CONTROL.isdisjoint(text):
            flags.add("control")
        event = self.watch.see(content, bad, t)
        if event is not None:
            self._events.append(event)
        return LogLine(t_mono_ns=t, raw=raw, text=text, flags=tuple(sorted(flags)))

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
