"""The schema of everything the format signs or seals (docs/FORMAT.md §3, §5.2, §5.3): the
segment header, clock.json, event and log-line records, and the receiver's receipt.

One schema, used by the sealer (before signing), the verifier, the receiver and the box's receipt
check, so a value the format does not allow is refused everywhere alike. pydantic's strict mode
gives the types (no bool as an int, no string as a number), ranges and closed value sets; the
rules that tie fields together are the model validators below. Every refusal is a SchemaError
whose message names the field path and the rule.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

FORMAT_VERSION = 1
MAX_SEQ = 9_999_999_999  # ten decimal digits in a file name
U63 = Annotated[int, Field(ge=0, le=2**63 - 1)]
ERROR_NS = Annotated[int, Field(ge=-1, le=2**63 - 1)]  # -1: unknown

# Why a segment of a session was cut. `session_end` and `interrupted` close the session (final).
SESSION_REASONS = frozenset({"duration", "session_end", "tamper", "power_fail", "clock_step",
                             "interrupted"})
FINAL_REASONS = frozenset({"session_end", "interrupted"})
# Why an idle segment (session "", no media) was sealed: the kind of the event it was sealed for,
# or `event` for any other kind, `oplog` for operation-log lines received while idle.
IDLE_REASONS = frozenset({"tamper", "power_fail", "clock_step", "fault", "fault_cleared",
                          "session_interrupted", "session_refused", "tap_reset", "tap_gap",
                          "chain_resumed", "chain_restart", "event", "oplog"})
CLOCK_SOURCES = ("pps", "rtc", "system", "chrony")  # joined by "+" in this order
LOG_FLAGS = ("continued", "control", "decode_error", "nul", "overlong", "unterminated")

_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|unknown")
_FIRMWARE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}")
_SESSION = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class SchemaError(ValueError):
    """A value breaks the format's schema; the message names the field and the rule."""


def _full(pattern: re.Pattern[str], value: str, what: str) -> str:
    # fullmatch, not match + "$": "$" also matches before a trailing newline.
    if not pattern.fullmatch(value):
        raise ValueError(f"{value[:80]!r} is not {what}")
    return value


def canonical_b64decode(text: str, what: str = "base64") -> bytes:
    """Standard padded base64 that re-encodes to itself (no stray low bits, no line breaks)."""
    if not _B64.fullmatch(text) or len(text) % 4:
        raise ValueError(f"{what} is not standard padded base64")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not standard padded base64") from None
    if base64.b64encode(data).decode() != text:
        raise ValueError(f"{what} is not canonical base64 (unused bits set)")
    return data


def check_clock_source(value: str) -> str:
    parts = value.split("+")
    order = [CLOCK_SOURCES.index(p) if p in CLOCK_SOURCES else -1 for p in parts]
    if -1 in order or order != sorted(set(order)):
        raise ValueError(f"{value[:80]!r} is not a clock source ({'+'.join(CLOCK_SOURCES)}, "
                         "each at most once, in that order)")
    return value


def _sig(value: str) -> str:
    if len(canonical_b64decode(value, "sig")) != 64:
        raise ValueError("sig is not 64 bytes")
    return value


def _matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    return AfterValidator(lambda v: _full(pattern, v, what))


DeviceId = Annotated[str, _matching(_DEVICE, "a device id")]
Hex64 = Annotated[str, _matching(_HEX64, "64 lowercase hex digits")]
ClockSource = Annotated[str, AfterValidator(check_clock_source)]
Signature = Annotated[str, AfterValidator(_sig)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Instant(_Strict):
    mono_ns: U63
    utc_ns: U63


class ClockQuality(_Strict):
    source: ClockSource
    synced: bool
    est_error_ns: ERROR_NS


class Video(_Strict):
    codec: Literal["h264", "none"]
    width: Annotated[int, Field(ge=0, le=16384)]
    height: Annotated[int, Field(ge=0, le=16384)]
    fps: Annotated[int, Field(ge=0, le=1000)]
    frames: U63
    keyframes: U63
    drops: U63

    @model_validator(mode="after")
    def _consistent(self) -> Video:
        if self.codec == "none":
            if any((self.width, self.height, self.fps, self.frames, self.keyframes, self.drops)):
                raise ValueError("a video stream of codec none has all counts 0")
        elif not (self.width and self.height and self.fps):
            raise ValueError("h264 video needs width, height and fps of at least 1")
        if self.keyframes > self.frames:
            raise ValueError("more keyframes than frames")
        if self.frames and not self.keyframes:
            raise ValueError("video frames without a keyframe (a segment starts at one)")
        return self


class Audio(_Strict):
    codec: Literal["pcm_s16le", "none"]
    rate: Annotated[int, Field(ge=0, le=384000)]
    channels: Annotated[int, Field(ge=0, le=8)]
    samples: U63
    overflows: U63

    @model_validator(mode="after")
    def _consistent(self) -> Audio:
        if self.codec == "none":
            if any((self.rate, self.channels, self.samples, self.overflows)):
                raise ValueError("an audio stream of codec none has all counts 0")
        elif self.rate < 8000 or self.channels < 1:
            raise ValueError("pcm_s16le audio needs a rate of 8000..384000 and 1..8 channels")
        return self


class OpLogSummary(_Strict):
    lines: U63
    bytes: U63
    flagged: U63

    @model_validator(mode="after")
    def _consistent(self) -> OpLogSummary:
        if self.flagged > self.lines:
            raise ValueError("more flagged lines than lines")
        if self.bytes < self.lines:
            raise ValueError("fewer bytes than lines (every line has at least one byte)")
        return self


class EventsSummary(_Strict):
    count: U63


class Streams(_Strict):
    video: Video
    audio: Audio
    oplog: OpLogSummary
    events: EventsSummary


class PayloadRef(_Strict):
    size: Annotated[int, Field(ge=1, le=2**63 - 1)]
    sha256: Hex64


class Header(_Strict):
    format: Annotated[int, Field(ge=1, le=1)]  # an int: Literal[1] would take true
    device: DeviceId
    boot_id: str
    firmware: str
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    session: str
    session_index: Annotated[int, Field(ge=0, le=2**31 - 1)]
    final: bool
    reason: str
    start: Instant
    end: Instant
    clock: ClockQuality
    streams: Streams
    payload: PayloadRef
    prev: Hex64
    sig: Signature | None = None  # absent only in the fields the sealer is about to sign

    @field_validator("boot_id")
    @classmethod
    def _boot(cls, v: str) -> str:
        return _full(_BOOT_ID, v, "a lowercase boot id UUID or 'unknown'")

    @field_validator("firmware")
    @classmethod
    def _firmware(cls, v: str) -> str:
        return _full(_FIRMWARE, v, "a firmware version")

    @field_validator("session")
    @classmethod
    def _session(cls, v: str) -> str:
        return v if v == "" else _full(_SESSION, v, "a session id (YYYYMMDDTHHMMSSZ-xxxxxx)")


    @model_validator(mode="after")
    def _consistent(self) -> Header:
        if self.end.mono_ns <= self.start.mono_ns:
            raise ValueError("end.mono_ns must be after start.mono_ns")
        s = self.streams
        if self.session == "":
            if self.session_index != 0 or not self.final:
                raise ValueError("an idle segment (session \"\") has session_index 0 and final "
                                 "true")
            if self.reason not in IDLE_REASONS:
                raise ValueError(f"reason {self.reason[:40]!r} is not one of an idle segment "
                                 f"({', '.join(sorted(IDLE_REASONS))})")
            if s.video.codec != "none" or s.audio.codec != "none":
                raise ValueError("an idle segment carries no media (codecs none)")
            if self.reason == "oplog" and not s.oplog.lines:
                raise ValueError("an idle segment of reason oplog holds at least one log line")
            if self.reason != "oplog" and not s.events.count:
                raise ValueError("an idle segment sealed for an event holds at least one event")
        else:
            if self.reason not in SESSION_REASONS:
                raise ValueError(f"reason {self.reason[:40]!r} is not one of "
                                 f"{', '.join(sorted(SESSION_REASONS))}")
            if self.final != (self.reason in FINAL_REASONS):
                raise ValueError("final is true exactly when reason is session_end or "
                                 "interrupted")
            if self.reason == "interrupted" and (s.video.frames or s.audio.samples):
                raise ValueError("an interrupted segment carries no media")
        return self


class Anchor(ClockQuality):
    mono_ns: U63
    utc_ns: U63


class ClockJson(_Strict):
    timeline: Literal["CLOCK_MONOTONIC"]
    anchors: Annotated[list[Anchor], Field(min_length=1, max_length=100_000)]

    @model_validator(mode="after")
    def _ordered(self) -> ClockJson:
        monos = [a.mono_ns for a in self.anchors]
        if monos != sorted(set(monos)):
            raise ValueError("anchors are not in strictly increasing mono_ns order")
        return self


class EventRecord(_Strict):
    t_mono_ns: U63
    kind: str
    detail: dict[str, Any]

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        return _full(_KIND, v, "an event kind ([a-z][a-z0-9_]{0,63})")


class LineRecord(_Strict):
    t_mono_ns: U63
    raw: str
    text: str
    flags: list[str]

    @field_validator("raw")
    @classmethod
    def _raw(cls, v: str) -> str:
        if not canonical_b64decode(v, "raw"):
            raise ValueError("raw is empty (a line has at least one byte)")
        return v

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        if any(f not in LOG_FLAGS for f in v) or v != sorted(set(v)):
            raise ValueError(f"flags must be sorted, distinct, from {', '.join(LOG_FLAGS)}")
        return v


class Receipt(_Strict):
    format: Annotated[int, Field(ge=1, le=1)]  # an int: Literal[1] would take true
    device: DeviceId
    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    header_sha256: Hex64
    payload_sha256: Hex64
    payload_size: Annotated[int, Field(ge=1, le=2**63 - 1)]
    received_utc_ns: U63
    receiver: Annotated[str, Field(min_length=1, max_length=256)]
    sig: Signature


def _message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "$"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def validate(model: type[_Strict], value: Any) -> _Strict:
    """value (parsed canonical JSON) checked against model; SchemaError if it breaks a rule."""
    if not isinstance(value, dict):
        raise SchemaError("not a JSON object")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise SchemaError(_message(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:  # a validator's own refusal
        raise SchemaError(str(exc)[:200]) from None


def check_header(value: Any, *, signed: bool = True) -> Header:
    header = validate(Header, value)
    assert isinstance(header, Header)
    if signed and header.sig is None:
        raise SchemaError("sig: field required")
    return header
