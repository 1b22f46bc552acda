"""JSON from the network, parsed only once it is known to be shallow and its numbers short:
Python's json recurses (10,000 levels: RecursionError) and refuses integers past 4,300 digits
with a ValueError. A linear scan outside strings checks both first, so either is a 400."""

from __future__ import annotations

import json
import re
from typing import Any

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


class JsonLimitError(ValueError):
    """The JSON is nested deeper or has a longer number than the receiver parses."""


def check(data: bytes, max_depth: int, max_number: int) -> None:
    bare = _STRING.sub(b'""', data)  # brackets and digits inside strings do not count
    depth = 0
    for m in _BRACKET.finditer(bare):
        depth += 1 if m.group() in b"[{" else -1
        if depth > max_depth:
            raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")
    if re.search(rb"[-+0-9.eE]{%d,}" % (max_number + 1), bare):
        raise JsonLimitError(f"JSON number longer than {max_number} characters")


def loads(data: bytes, max_depth: int = 32, max_number: int = 24) -> Any:
    check(data, max_depth, max_number)
    return json.loads(data)
