"""Property-based tests (Hypothesis) of the format's three gates: canonical JSON
(firmware/dualrec/canonical.py), the header schema (firmware/dualrec/schema.py) and the segment
file name rule (segment_format.parse_name). Each gate must accept exactly what FORMAT.md allows
and refuse everything else with its own error (CanonicalError, SchemaError, None), never with
another exception."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualrec.canonical import CanonicalError, canonical_bytes, parse_canonical
from dualrec.schema import (
    CLOCK_SOURCES,
    FINAL_REASONS,
    IDLE_REASONS,
    MAX_SEQ,
    SESSION_REASONS,
    SchemaError,
    check_header,
)
from dualrec.segment_format import parse_name

BOUNDED = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
U63_MAX = 2**63 - 1

# --- canonical JSON -------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | I64 | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=16,
)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@BOUNDED
@given(json_values)
def test_canonical_round_trip(value: Any) -> None:
    data = canonical_bytes(value)
    assert same(parse_canonical(data), value)
    assert canonical_bytes(parse_canonical(data)) == data
    # one byte form: Python's json with the format's settings, floats refused
    assert data == json.dumps(value, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode()


def _refused(data: bytes) -> None:
    with pytest.raises(CanonicalError):
        parse_canonical(data)


@BOUNDED
@given(json_values, st.data())
def test_other_encodings_of_a_value_are_refused(value: Any, data: st.DataObject) -> None:
    canonical = canonical_bytes(value)
    variants = [
        json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False),
        json.dumps(value, sort_keys=True, separators=(", ", ": "), ensure_ascii=False),
        json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True),
        " " + canonical.decode(),
        canonical.decode() + data.draw(st.sampled_from(["\n", " ", "\t", "\r\n"])),
        "\ufeff" + canonical.decode(),
    ]
    for text in variants:
        if text.encode() != canonical:
            _refused(text.encode())


@BOUNDED
@given(st.dictionaries(st.text(max_size=6), json_values, min_size=2, max_size=5))
def test_unsorted_keys_are_refused(value: dict[str, Any]) -> None:
    text = "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical_bytes(v).decode()
                          for k, v in sorted(value.items(), reverse=True)) + "}"
    _refused(text.encode())


@BOUNDED
@given(st.text(min_size=1, max_size=6), json_values, json_values)
def test_duplicate_keys_are_refused(key: str, a: Any, b: Any) -> None:
    k = json.dumps(key, ensure_ascii=False)
    for first, second in ((a, b), (a, a)):
        text = "{" + k + ":" + canonical_bytes(first).decode() + "," + k + ":" \
            + canonical_bytes(second).decode() + "}"
        _refused(text.encode())


@BOUNDED
@given(st.text(max_size=8), st.text(max_size=8), st.sampled_from(
    ["\\/", "\\u00e9", "\\u00E9", "\\u0041", "\\u007f", "\\u2028", "\\u001F", "\\u000a",
     "\\u0022", "\\u005c", "\\ud83d\\ude00"]))
def test_needless_escapes_are_refused(before: str, after: str, escape: str) -> None:
    """FORMAT.md §2: only ", \\, and U+0000..U+001F are escaped, those as \\" \\\\ \\b \\f \\n
    \\r \\t or lowercase \\u00XX; any other escape is another encoding of the same string."""
    text = json.dumps(before, ensure_ascii=False)[:-1] + escape \
        + json.dumps(after, ensure_ascii=False)[1:]
    _refused(text.encode())


@BOUNDED
@given(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**6), max_value=10**6).map(lambda n: f"{n}.0"),
    st.integers(min_value=0, max_value=99).map(lambda n: f"{n}e0"),
    st.sampled_from(["-0", "01", "1E2", "1e-2", "NaN", "Infinity", "-Infinity", "+1", "0x10"]),
))
def test_non_integer_numbers_are_refused(number: float | str) -> None:
    text = json.dumps(number) if isinstance(number, float) else number
    for doc in (text, "[" + text + "]", '{"a":' + text + "}"):
        _refused(doc.encode())


# Fragments of JSON text, escapes and near-misses included, to reach deep into the parser.
_FRAGMENTS = ['{', '}', '[', ']', '"', ':', ',', '0', '1', '-', '9' * 30, 'true', 'false',
              'null', ' ', '\n', '\\', '\\n', '\\u0000', '\\u00e9', '\\ud800', '\\udc00',
              '\\ud83d\\ude00', '"\\ud800"', '"x\\udc00', 'u', '"a"', '"a":1', 'é', '\u2028',
              '1.5', '1e5', 'NaN', '\x00']


@BOUNDED
@given(st.binary(max_size=64)
       | st.lists(st.sampled_from(_FRAGMENTS), max_size=24).map(lambda xs: "".join(xs).encode()))
def test_any_bytes_give_a_value_or_canonical_error(data: bytes) -> None:
    try:
        value = parse_canonical(data)
    except CanonicalError:
        return
    assert canonical_bytes(value) == data


@pytest.mark.parametrize("data", [
    b'"\\ud800"', b'{"a":"\\udfff"}', b'["x\\udc00\\ud800"]', b'{"\\ud800":1}',
])
def test_lone_surrogate_escapes_are_refused(data: bytes) -> None:
    """Valid JSON whose string has no UTF-8 form (a lone UTF-16 surrogate) is not canonical."""
    _refused(data)


def test_deep_nesting_and_long_numbers_are_refused() -> None:
    _refused(b"[" * 100_000 + b"]" * 100_000)
    _refused(b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
    _refused(b"9" * 5000)


# --- the header schema ----------------------------------------------------------------------------

def _rx(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True)


hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
u63 = st.integers(min_value=0, max_value=U63_MAX)
sources = st.lists(st.sampled_from(CLOCK_SOURCES), min_size=1, unique=True).map(
    lambda xs: "+".join(sorted(xs, key=CLOCK_SOURCES.index)))


@st.composite
def instants(draw: st.DrawFn) -> tuple[dict[str, int], dict[str, int]]:
    start = draw(st.integers(min_value=0, max_value=U63_MAX - 1))
    end = draw(st.integers(min_value=start + 1, max_value=U63_MAX))
    return ({"mono_ns": start, "utc_ns": draw(u63)}, {"mono_ns": end, "utc_ns": draw(u63)})


@st.composite
def video(draw: st.DrawFn, media: bool) -> dict[str, Any]:
    if not media or draw(st.booleans()):
        if media and draw(st.booleans()):  # a camera that delivered nothing in this segment
            return {"codec": "h264", "width": 640, "height": 480, "fps": 25, "frames": 0,
                    "keyframes": 0, "drops": draw(u63)}
        return {"codec": "none", "width": 0, "height": 0, "fps": 0, "frames": 0,
                "keyframes": 0, "drops": 0}
    frames = draw(st.integers(min_value=1, max_value=U63_MAX))
    return {"codec": "h264", "width": draw(st.integers(1, 16384)),
            "height": draw(st.integers(1, 16384)), "fps": draw(st.integers(1, 1000)),
            "frames": frames, "keyframes": draw(st.integers(1, frames)), "drops": draw(u63)}


@st.composite
def audio(draw: st.DrawFn, media: bool) -> dict[str, Any]:
    if not media or draw(st.booleans()):
        return {"codec": "none", "rate": 0, "channels": 0, "samples": 0, "overflows": 0}
    return {"codec": "pcm_s16le", "rate": draw(st.integers(8000, 384000)),
            "channels": draw(st.integers(1, 8)), "samples": draw(u63), "overflows": draw(u63)}


@st.composite
def headers(draw: st.DrawFn) -> dict[str, Any]:
    """A header FORMAT.md §3 allows: an idle or a session segment, every rule kept."""
    idle = draw(st.booleans())
    if idle:
        session, index, reason, final = "", 0, draw(st.sampled_from(sorted(IDLE_REASONS))), True
    else:
        session = draw(_rx(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}"))
        index = draw(st.integers(0, 2**31 - 1))
        reason = draw(st.sampled_from(sorted(SESSION_REASONS)))
        final = reason in FINAL_REASONS
    media = not idle and reason != "interrupted"
    start, end = draw(instants())
    lines = draw(st.integers(1 if idle and reason == "oplog" else 0, U63_MAX))
    return {
        "format": 1,
        "device": draw(_rx(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")),
        "boot_id": draw(_rx(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
                        | st.just("unknown")),
        "firmware": draw(_rx(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}")),
        "seq": draw(st.integers(0, MAX_SEQ)),
        "session": session,
        "session_index": index,
        "final": final,
        "reason": reason,
        "start": start,
        "end": end,
        "clock": {"source": draw(sources), "synced": draw(st.booleans()),
                  "est_error_ns": draw(st.integers(-1, U63_MAX))},
        "streams": {
            "video": draw(video(media)),
            "audio": draw(audio(media)),
            "oplog": {"lines": lines, "bytes": draw(st.integers(lines, U63_MAX)),
                      "flagged": draw(st.integers(0, lines))},
            # an idle segment holds what it was sealed for: lines (oplog) or an event
            "events": {"count": draw(st.integers(1 if idle and reason != "oplog" else 0,
                                                 U63_MAX))},
        },
        "payload": {"size": draw(st.integers(1, U63_MAX)), "sha256": draw(hex64)},
        "prev": draw(hex64),
        "sig": base64.b64encode(draw(st.binary(min_size=64, max_size=64))).decode(),
    }


@BOUNDED
@given(headers())
def test_valid_headers_pass(h: dict[str, Any]) -> None:
    check_header(h)
    assert parse_canonical(canonical_bytes(h)) == h


# For each field: values of a wrong type, out of range, or outside the allowed set.
_NOT_INT = st.sampled_from([True, False, None, "1", "0", 1.0, [], {}])


def _ints(lo: int, hi: int) -> st.SearchStrategy[Any]:
    return _NOT_INT | st.sampled_from([lo - 1, hi + 1, 2**70, -(2**70)])


_NOT_STR = st.sampled_from([0, 1, True, None, [], {}])
_BAD: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("format",): _NOT_INT | st.sampled_from([0, 2, -1]),
    ("device",): _NOT_STR | st.sampled_from(["", "-box", "box 1", "box\n", "bóx", "x" * 65,
                                              "٠١٢", "box/1"]),
    ("boot_id",): _NOT_STR | st.sampled_from(["", "UNKNOWN", "00000000-0000-4000-8000-0000000"
                                              "0000A", "00000000-0000-4000-8000-000000000000\n"]),
    ("firmware",): _NOT_STR | st.sampled_from(["", ".1", "1 0", "x" * 33, "１.0"]),
    ("seq",): _ints(0, MAX_SEQ),
    ("session_index",): _ints(0, 2**31 - 1),
    ("final",): st.sampled_from([0, 1, "true", None, [], "false"]),
    ("reason",): _NOT_STR | st.sampled_from(["bogus", "", "Duration", "duration\n",
                                              "session_end "]),
    ("start", "mono_ns"): _ints(0, U63_MAX),
    ("start", "utc_ns"): _ints(0, U63_MAX),
    ("end", "utc_ns"): _ints(0, U63_MAX),
    ("clock", "source"): _NOT_STR | st.sampled_from(["", "gps", "chrony+pps", "pps+pps",
                                                      "pps+", "PPS"]),
    ("clock", "synced"): st.sampled_from([0, 1, "true", None]),
    ("clock", "est_error_ns"): _ints(-1, U63_MAX),
    ("streams", "video", "codec"): _NOT_STR | st.sampled_from(["h265", "H264", "", "hevc"]),
    ("streams", "video", "width"): _ints(0, 16384),
    ("streams", "video", "fps"): _ints(0, 1000),
    ("streams", "video", "drops"): _ints(0, U63_MAX),
    ("streams", "audio", "codec"): _NOT_STR | st.sampled_from(["aac", "pcm_s24le", "PCM"]),
    ("streams", "audio", "rate"): _ints(0, 384000),
    ("streams", "audio", "channels"): _ints(0, 8),
    ("streams", "audio", "overflows"): _ints(0, U63_MAX),
    ("streams", "oplog", "bytes"): _ints(0, U63_MAX),
    ("streams", "events", "count"): _ints(0, U63_MAX),
    ("payload", "size"): _ints(1, U63_MAX),
    ("payload", "sha256"): _NOT_STR | st.sampled_from(["", "0" * 63, "A" * 64, "g" * 64]),
    ("prev",): _NOT_STR | st.sampled_from(["", "0" * 65, "F" * 64, "0" * 63 + "\n"]),
    ("sig",): _NOT_STR | st.sampled_from(["", "AAAA", "A" * 88, base64.b64encode(b"\0" * 63)
                                          .decode(), base64.b64encode(b"\0" * 64).decode()[:-2],
                                          "A" * 85 + "B==", "A" * 85 + "A==\n"]),
    ("start",): st.sampled_from([None, [], 0, {}, {"mono_ns": 0}]),
    ("streams",): st.sampled_from([None, [], {}]),
}


def _set(h: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        h = h[k]
    h[path[-1]] = value


@BOUNDED
@given(headers(), st.sampled_from(sorted(_BAD)), st.data())
def test_one_bad_field_is_refused(h: dict[str, Any], path: tuple[str, ...],
                                  data: st.DataObject) -> None:
    bad = copy.deepcopy(h)
    _set(bad, path, data.draw(_BAD[path]))
    with pytest.raises(SchemaError):
        check_header(bad)


@BOUNDED
@given(headers(), st.sampled_from(["extra", "sig2", "Seq", "format "]),
       st.sampled_from([(), ("start",), ("clock",), ("streams",), ("streams", "video"),
                        ("payload",)]), st.booleans())
def test_unknown_or_missing_keys_are_refused(h: dict[str, Any], key: str,
                                             where: tuple[str, ...], add: bool) -> None:
    bad = copy.deepcopy(h)
    obj = bad
    for k in where:
        obj = obj[k]
    if add:
        obj[key] = 0
    else:
        del obj[sorted(obj)[len(key) % len(obj)]]
    with pytest.raises(SchemaError):
        check_header(bad)


@BOUNDED
@given(st.one_of(
    json_values,
    st.dictionaries(st.text(max_size=10), json_values, max_size=8),
    st.tuples(headers(), st.lists(st.tuples(st.sampled_from(sorted(_BAD)), json_values),
                                  max_size=3)).map(lambda t: _mutated(*t)),
))
def test_any_json_gives_a_header_or_schema_error(value: Any) -> None:
    with contextlib.suppress(SchemaError):
        check_header(value)


def _mutated(h: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    out = copy.deepcopy(h)
    for path, value in changes:
        with contextlib.suppress(KeyError, TypeError):  # a path the changes already cut
            _set(out, path, value)
    return out


# --- the name rule --------------------------------------------------------------------------------

_ASCII_NAME = re.compile(r"[0-9]{10}\.(hdr\.json|payload\.age)", re.ASCII)
_DIGITS = "0123456789" + "٠١٢٣٤٥٦٧٨٩" + "０１２３４５６７８９" + "०१२३४५६७८९" + "۰۱۲۳۴۵۶۷۸۹" + "𝟎𝟏𝟐"
_SUFFIXES = [".hdr.json", ".payload.age", ".HDR.JSON", ".hdr.JSON", ".Payload.age", ".hdr.json.",
             ".hdr_json", "．hdr.json", ".payload.age.tmp", ".hdrjson", "hdr.json", ".json"]
_EDGES = ["", "", "", " ", "\n", "\t", "\r", "\u00a0", "\u200b", "\u3000", "x", "."]


@st.composite
def names(draw: st.DrawFn) -> str:
    digits = draw(st.lists(st.sampled_from(_DIGITS), min_size=8, max_size=12))
    if draw(st.booleans()):  # mostly ASCII digits, so valid names are generated too
        digits = [c if c.isascii() or draw(st.integers(0, 9)) else str(int(c)) for c in digits]
        digits = [str(int(c)) if draw(st.integers(0, 3)) else c for c in digits]
    return (draw(st.sampled_from(_EDGES)) + "".join(digits) + draw(st.sampled_from(_SUFFIXES))
            + draw(st.sampled_from(_EDGES)))


@BOUNDED
@given(names() | st.text(max_size=30))
def test_name_rule_is_exactly_the_ascii_pattern(name: str) -> None:
    parsed = parse_name(name)
    valid = _ASCII_NAME.fullmatch(name) is not None
    # the rule once more without a regular expression
    plain = (len(name) in (19, 22) and all(c in "0123456789" for c in name[:10])
             and name[10:] in (".hdr.json", ".payload.age"))
    assert valid == plain
    assert (parsed is not None) == valid, repr(name)
    if parsed is not None:
        assert parsed == (int(name[:10]), "header" if name.endswith(".hdr.json") else "payload")


def test_name_rule_examples() -> None:
    assert parse_name("0000000042.hdr.json") == (42, "header")
    assert parse_name("9999999999.payload.age") == (9_999_999_999, "payload")
    for name in ("٠٠٠٠٠٠٠٠٠٠.payload.age", "0000000000.payload.age\n", "０000000000.hdr.json",
                 " 0000000000.hdr.json", "0000000000.HDR.JSON", "000000000.hdr.json",
                 "00000000000.hdr.json", "0000000000.hdr.json ", "0000000000.hdr.json\u200b"):
        assert parse_name(name) is None, repr(name)
