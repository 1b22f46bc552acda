"""The box's state report (PUT /v1/devices/{device}/report, docs/UPLOAD.md "State report"):
parsed under the same JSON limits as the other bodies (safejson) and validated strictly, so
nothing but non-negative byte counts, short fault names, a firmware version and a time is ever
stored. Unknown fields are refused: a report carries no customer data."""

from __future__ import annotations

import re
from typing import Any

from dualrec_tools.receiver import safejson
from dualrec_tools.receiver.limits import Limits
from dualrec_tools.receiver.storage import DeviceReport

REPORT_MAX = 4096  # bytes of a report body
MAX_FAULTS = 32
FAULT_NAME = re.compile(r"^[a-z0-9_:.-]{1,64}$")
FIRMWARE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
MAX_INT = 2**63 - 1
REQUIRED_INTS = ("spool_used_bytes", "spool_quota_bytes", "spool_free_bytes", "utc_ns")
OPTIONAL_INTS = ("unsealed_bytes",)
FIELDS = frozenset(REQUIRED_INTS + OPTIONAL_INTS + ("faults", "firmware"))


class BadReport(ValueError):
    """The body is not a valid state report (400 malformed)."""


def _int(doc: dict[str, Any], key: str) -> int:
    v = doc[key]
    if type(v) is not int or not 0 <= v <= MAX_INT:  # bool is not an int here
        raise BadReport(f"{key} must be an integer from 0 to 2^63-1")
    return v


def parse_report(body: bytes, limits: Limits) -> DeviceReport:
    """The validated report in body, or BadReport."""
    try:
        doc = safejson.loads(body, limits.json_max_depth, limits.json_max_number)
    except (ValueError, UnicodeDecodeError) as exc:  # JsonLimitError is a ValueError
        raise BadReport(f"not JSON within the limits: {exc}") from None
    if not isinstance(doc, dict):
        raise BadReport("the report must be a JSON object")
    unknown = set(doc) - FIELDS
    if unknown:
        raise BadReport(f"unknown field(s): {', '.join(sorted(unknown))[:100]}")
    missing = [k for k in (*REQUIRED_INTS, "faults", "firmware") if k not in doc]
    if missing:
        raise BadReport(f"missing field(s): {', '.join(missing)}")
    ints = {k: _int(doc, k) for k in REQUIRED_INTS}
    unsealed = _int(doc, "unsealed_bytes") if "unsealed_bytes" in doc else None
    faults = doc["faults"]
    if not isinstance(faults, list) or len(faults) > MAX_FAULTS:
        raise BadReport(f"faults must be a list of at most {MAX_FAULTS} names")
    for name in faults:
        if not isinstance(name, str) or not FAULT_NAME.match(name):
            raise BadReport("each fault must be 1 to 64 characters of [a-z0-9_:.-]")
    firmware = doc["firmware"]
    if not isinstance(firmware, str) or not FIRMWARE.match(firmware):
        raise BadReport("firmware must be 1 to 32 characters of [A-Za-z0-9_.+-]")
    return DeviceReport(spool_used_bytes=ints["spool_used_bytes"],
                        spool_quota_bytes=ints["spool_quota_bytes"],
                        spool_free_bytes=ints["spool_free_bytes"], unsealed_bytes=unsealed,
                        faults=tuple(faults), firmware=firmware, utc_ns=ints["utc_ns"])
