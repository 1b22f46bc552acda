"""Canonical JSON: the bytes that are signed must have exactly one form."""

import pytest

from dualrec.canonical import CanonicalError, canonical_bytes, parse_canonical


def test_sorted_compact_utf8():
    assert canonical_bytes({"b": 1, "a": [True, None, "交易"]}) == \
        '{"a":[true,null,"交易"],"b":1}'.encode()


@pytest.mark.parametrize("value", [{"x": 1.5}, {"x": [0.0]}, {1: "int key"}, {"x": b"bytes"}])
def test_refuses_what_is_not_canonical(value):
    with pytest.raises(CanonicalError):
        canonical_bytes(value)


@pytest.mark.parametrize("data", [
    b'{"b":1,"a":2}',          # unsorted
    b'{"a": 1}',               # whitespace
    b'{"a":1.0}',              # float
    b'{"a":1,"a":1}',          # duplicate key
    b'{"a":"\\u4ea4"}',        # escaped where UTF-8 is required
    b'\xff',                   # not UTF-8
])
def test_parse_refuses_non_canonical_bytes(data):
    with pytest.raises(CanonicalError):
        parse_canonical(data)


def test_roundtrip():
    value = {"seq": 3, "nested": {"z": [1, 2], "a": "é"}}
    assert parse_canonical(canonical_bytes(value)) == value


def test_unchecked_fast_path_gives_the_same_bytes():
    from dualrec.canonical import canonical_bytes_unchecked

    rec = {"t_mono_ns": 12, "raw": "AAE=", "text": "交易 \u0000", "flags": ["nul"]}
    assert canonical_bytes_unchecked(rec) == canonical_bytes(rec)
