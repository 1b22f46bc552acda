"""Reading an operation-log line's bytes as text, and noticing a wrong encoding.

The text of a LogLine is a best-effort reading for people and for the start/stop patterns; the
evidence is its raw bytes. Encodings:

- ``auto`` (the default): each line on its own is read as UTF-8 when it is valid UTF-8, else as
  GB18030. Pure ASCII is both. A GB18030 line that happens to be valid UTF-8 is read as UTF-8:
  this needs every non-ASCII byte pair to look like a UTF-8 sequence, which a line holding
  交易开始 never does (its first byte, 0xBD, is a UTF-8 continuation byte with no lead), but
  a line of one or two other characters can. Big5 bytes are never valid UTF-8 and every Big5
  character is also a valid GB18030 code, so ``auto`` reads Big5 as GB18030 *without* a
  decode error: wrong characters, unflagged. A Big5 terminal needs ``big5`` set; `dualrec diag`
  catches the mistake because no line then matches a start or stop pattern.
- ``gb18030``, ``utf-8``, ``big5`` (or any Python codec): that encoding for every line.

DecodeWatch turns a run of lines that do not decode into a ``fault`` (a wrong encoding, a wrong
baud rate or a floating line) and its end into ``fault_cleared``.
"""

from __future__ import annotations

import codecs
from typing import Any

AUTO = "auto"
FALLBACK = "gb18030"  # what auto reads a line as when it is not UTF-8
FAULT_PART = "decode"  # the fault's `part`: its own fault key, apart from a lost port


def check_encoding(encoding: str) -> None:
    """LookupError for an unknown codec: fail at configuration time, not on the first line."""
    if encoding != AUTO:
        codecs.lookup(encoding)


def decode_line(content: bytes, encoding: str) -> tuple[str, bool]:
    """The text of a line's content (terminator stripped) and whether it failed to decode."""
    if encoding == AUTO:
        try:
            return content.decode("utf-8"), False
        except UnicodeDecodeError:
            encoding = FALLBACK
    try:
        return content.decode(encoding), False
    except UnicodeDecodeError:
        return content.decode(encoding, errors="replace"), True


def pending_tail(piece: bytes, encoding: str) -> int:
    """How many trailing bytes of piece are an incomplete multi-byte character (0 if unsure).

    In auto mode a piece that is UTF-8 so far is judged as UTF-8, else as GB18030: the same
    choice decode_line makes for the whole piece."""
    if encoding == AUTO:
        try:
            dec = codecs.getincrementaldecoder("utf-8")("strict")
            dec.decode(piece, final=False)
            return len(dec.getstate()[0])
        except UnicodeDecodeError:
            encoding = FALLBACK
    try:
        dec = codecs.getincrementaldecoder(encoding)("replace")
        dec.decode(piece, final=False)
        return len(dec.getstate()[0])
    except Exception:  # a codec without getstate(): cut at the byte count
        return 0


class DecodeWatch:
    """Counts lines that do and do not decode; says when a decode fault starts and ends.

    Only lines holding non-ASCII bytes count: ASCII reads the same in every supported encoding,
    so an ASCII line (a separator, a blank line) neither breaks nor extends a run. The fault
    starts after ``run`` such lines in a row with decode errors and clears after ``run`` in a
    row without: one clean line among garbage (a wrong encoding reads some lines by chance)
    does not make the fault flap. run None: never a fault."""

    def __init__(self, encoding: str, run: int | None) -> None:
        if run is not None and run < 1:
            raise ValueError("decode_error_run must be at least 1")
        self.encoding = encoding
        self.run = run
        self.faulted = False
        self.bad = 0  # informative lines in a row that did not decode
        self.good = 0  # ... that did
        self._since_ns = 0

    def see(self, content: bytes, decode_error: bool, t_mono_ns: int
            ) -> tuple[str, dict[str, Any]] | None:
        """Note one line; the event (kind, detail) its arrival causes, if any."""
        if self.run is None or content.isascii():
            return None
        if decode_error:
            self.bad, self.good = self.bad + 1, 0
        else:
            self.bad, self.good = 0, self.good + 1
        if not self.faulted and self.bad >= self.run:
            self.faulted, self._since_ns = True, t_mono_ns
            return "fault", {
                "device": "oplog", "part": FAULT_PART, "encoding": self.encoding,
                "lines": self.bad,
                "reason": f"{self.bad} lines in a row with decode errors as {self.encoding}: "
                          "wrong encoding? (site config [oplog] encoding)",
            }
        if self.faulted and self.good >= self.run:
            self.faulted = False
            return "fault_cleared", {
                "device": "oplog", "part": FAULT_PART, "encoding": self.encoding,
                "reason": f"{self.good} lines in a row decode again",
                "gap_ns": max(0, t_mono_ns - self._since_ns),
            }
        return None
