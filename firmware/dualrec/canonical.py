"""Canonical JSON: the one byte encoding of a header that is hashed and signed.

Rules (docs/FORMAT.md): object keys sorted by code point, no insignificant whitespace, UTF-8 with
no escaping beyond what JSON requires, integers only (no floats), no duplicate keys.
"""

from __future__ import annotations

import json
from typing import Any


class CanonicalError(ValueError):
    """The value or the bytes are not canonical JSON."""


def _check(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise CanonicalError(f"{path}: floats are not allowed in canonical JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{path}: object key {k!r} is not a string")
            _check(v, f"{path}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
        return
    raise CanonicalError(f"{path}: {type(value).__name__} cannot be encoded")


# One encoder, built once: json.dumps with non-default arguments builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_bytes(value: Any) -> bytes:
    try:
        _check(value, "$")
        return _ENCODER.encode(value).encode()
    except RecursionError:
        raise CanonicalError("value is nested too deeply") from None
    except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape) is not UTF-8
        raise CanonicalError("a string holds a lone surrogate, which UTF-8 cannot encode") \
            from None


def canonical_bytes_unchecked(value: Any) -> bytes:
    """For hot paths whose values are built from typed fields only (ints, strings, lists of
    strings): the same bytes as canonical_bytes without the type walk."""
    return _ENCODER.encode(value).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CanonicalError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise CanonicalError(f"float {text} is not allowed in canonical JSON")


def parse_canonical(data: bytes) -> Any:
    """Parse bytes that must already be canonical; anything else is refused, not repaired."""
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
        )
    except UnicodeDecodeError as exc:
        raise CanonicalError(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CanonicalError(f"not JSON: {exc}") from None
    except RecursionError:
        raise CanonicalError("JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        raise CanonicalError(f"not acceptable JSON: {str(exc)[:120]}") from None
    if canonical_bytes(value) != data:
        raise CanonicalError("JSON is valid but not in canonical form")
    return value
