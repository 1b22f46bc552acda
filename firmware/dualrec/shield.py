"""The number shield: customer numbers masked on every surface outside sealed evidence.

Box and receiver logs, status and diag output, `dualrec-tool tap monitor`, metrics and pages
show text through `shield()`, and a logging filter masks every log record before any handler
formats it. Sealed evidence keeps the raw bytes; only a reviewer with the permission and a
typed reason sees them unmasked (the review pages, which write that to an audit log).
"""

from __future__ import annotations

import logging
import re

from dualrec.numbers import mask

_extra: tuple[re.Pattern[str], ...] = ()


def configure(patterns: list[str]) -> None:
    """Site-specific patterns masked in addition to ID, card and mobile numbers."""
    global _extra
    _extra = tuple(re.compile(p) for p in patterns)


def shield(text: str) -> str:
    return mask(text, _extra)


class MaskingFilter(logging.Filter):
    """Masks the formatted message of every record it sees (attach it to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        masked = shield(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_text is None and record.exc_info[1] is not None:
            # tracebacks quote values (a KeyError on a line's text): format and mask them too
            record.exc_text = shield(logging.Formatter().formatException(record.exc_info))
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of logger (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
