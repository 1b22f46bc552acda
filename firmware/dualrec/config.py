"""Board profile and site configuration: TOML files, typed and validated.

The board profile says what hardware is there and which backend drives it; the site config says
who this device is, how it records and where its segments go. Unknown keys and out-of-range values
are refused; every error names the file, the key and the reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- board profile ---------------------------------------------------------------------------


class BoardInfo(_Strict):
    name: str
    description: str = ""


Gpio = Annotated[int, Field(ge=0, le=27)]  # BCM numbering on the 40-pin header


class CameraProfile(_Strict):
    backend: Literal["sim", "picamera2", "none"]
    # picamera2 only: "hardware" = H264Encoder on the VideoCore (Pi 4, CM4, Zero 2 W);
    # "libav" = LibavH264Encoder in software (Pi 5 has no H.264 block).
    encoder: Literal["hardware", "libav"] = "hardware"
    sensor_index: Annotated[int, Field(ge=0, le=3)] = 0
    width: Annotated[int, Field(ge=160, le=3840)] = 1280
    height: Annotated[int, Field(ge=120, le=2160)] = 720
    fps: Annotated[int, Field(ge=1, le=60)] = 30
    gop: Annotated[int, Field(ge=1, le=300)] = 30
    bitrate: Annotated[int, Field(ge=100_000, le=25_000_000)] = 4_000_000

    @model_validator(mode="after")
    def _even(self) -> CameraProfile:
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even for yuv420p")
        return self


class MicrophoneProfile(_Strict):
    backend: Literal["sim", "pyaudio", "none"]
    device: str = ""  # pyaudio: a substring of the ALSA device name, e.g. "USB Audio" or "null"
    rate: Literal[16000, 32000, 44100, 48000] = 48000
    channels: Annotated[int, Field(ge=1, le=2)] = 1
    block_frames: Annotated[int, Field(ge=64, le=8192)] = 960

    @model_validator(mode="after")
    def _short_blocks(self) -> MicrophoneProfile:
        # a block is delivered after its last sample: longer than 100 ms would arrive after the
        # segmenter's grace and land in the wrong segment
        if self.block_frames * 1000 > self.rate * 100:
            raise ValueError(f"block_frames {self.block_frames} is over 100 ms at {self.rate} Hz")
        return self


class OpLogProfile(_Strict):
    backend: Literal["serial", "picotap", "none"] = "serial"
    # A path (/dev/ttyAMA0, /dev/serial/by-id/...), "usb:VID:PID[:SERIAL]" or a pyserial URL;
    # the site config's [oplog] port, when set, wins.
    port: str = ""


class TapProfile(_Strict):
    """The Pico serial tap (backend picotap): its USB data port and the clock-sync line."""

    port: str = "usb:2e8a:0005"  # the tap's own CDC data interface, not the REPL
    sync_gpio: Gpio | None = None  # Pi output pulsed at known CLOCK_MONOTONIC instants
    uart_baud: Annotated[int, Field(ge=300, le=921_600)] = 115_200
    rx_pins: list[Annotated[int, Field(ge=0, le=28)]] = [1]  # Pico GP pins of the tapped lines
    sync_pin: Annotated[int, Field(ge=0, le=28)] = 22  # Pico GP pin the sync line arrives on


class PanelProfile(_Strict):
    backend: Literal["sim", "rpigpio"] = "sim"
    # BCM numbers. LEDs are driven high = on; inputs use the internal pull-up, active low.
    recording_led: Gpio = 17
    fault_led: Gpio = 27
    button: Gpio = 22
    tamper: Gpio = 23
    power_fail: Gpio = 24
    debounce_ms: Annotated[int, Field(ge=1, le=500)] = 30
    long_press_ms: Annotated[int, Field(ge=300, le=10_000)] = 1500


class ClockProfile(_Strict):
    source: Literal["system", "rtc"] = "system"
    rtc: str = "/dev/rtc0"
    chrony: bool = False  # read `chronyc -c tracking` into each segment's clock quality
    pps: str = ""  # e.g. /dev/pps0 (dtoverlay=pps-gpio); empty: none
    pps_gpio: Gpio | None = None
    step_threshold_ms: Annotated[int, Field(ge=1, le=60_000)] = 100


class SimProfile(_Strict):
    clap_period_ms: Annotated[int, Field(ge=500, le=600_000)] = 7000


class BoardProfile(_Strict):
    board: BoardInfo
    camera: CameraProfile
    microphone: MicrophoneProfile
    oplog: OpLogProfile = OpLogProfile()
    panel: PanelProfile = PanelProfile()
    clock: ClockProfile = ClockProfile()
    tap: TapProfile | None = None
    sim: SimProfile | None = None

    @model_validator(mode="after")
    def _pins_once(self) -> BoardProfile:
        """A GPIO wired to two functions is a wiring error: refuse it at start."""
        used: dict[int, str] = {}
        pins: list[tuple[str, int | None]] = []
        if self.panel.backend == "rpigpio":
            pins += [(f"panel.{n}", getattr(self.panel, n)) for n in
                     ("recording_led", "fault_led", "button", "tamper", "power_fail")]
        pins.append(("clock.pps_gpio", self.clock.pps_gpio))
        if self.tap is not None:
            pins.append(("tap.sync_gpio", self.tap.sync_gpio))
        for name, pin in pins:
            if pin is None:
                continue
            if pin in used:
                raise ValueError(f"GPIO{pin} is used twice: {used[pin]} and {name}")
            used[pin] = name
        if self.oplog.backend == "picotap" and self.tap is None:
            raise ValueError("oplog backend picotap needs a [tap] section")
        return self


# --- site config -----------------------------------------------------------------------------


class DeviceSection(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    key: Path  # Ed25519 private key, PKCS#8 PEM


class RecordingSection(_Strict):
    mode: Literal["session", "continuous"] = "session"
    preroll_ms: Annotated[int, Field(ge=0, le=60_000)] = 5000
    postroll_ms: Annotated[int, Field(ge=0, le=60_000)] = 2000
    segment_ms: Annotated[int, Field(ge=1000, le=600_000)] = 10_000
    max_session_ms: Annotated[int, Field(ge=10_000, le=24 * 3600_000)] = 4 * 3600_000


class OpLogSection(_Strict):
    port: str = ""
    baud: Literal[9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600] = 115200
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: Literal[1, 1.5, 2] = 1
    encoding: Literal["gb18030", "utf-8"] = "gb18030"
    line_end: Literal["\r\n", "\n", "\r"] = "\r\n"
    max_line: Annotated[int, Field(ge=80, le=65536)] = 4096
    start_patterns: list[str] = ["交易开始"]
    stop_patterns: list[str] = ["交易结束"]

    @field_validator("start_patterns", "stop_patterns")
    @classmethod
    def _regex(cls, patterns: list[str]) -> list[str]:
        import re

        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"pattern {p!r} is not a regular expression: {exc}") from None
        return patterns


def _regexes(patterns: list[str]) -> list[str]:
    import re

    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"pattern {p!r} is not a regular expression: {exc}") from None
    return patterns


class TransactionsSection(_Strict):
    """Which transaction a session is, and the steps each business type requires
    (dualrec.transactions; docs/config.md)."""

    labels: list[str] = Field(default=[
        r"TXN=(?P<txn>[0-9A-Za-z_-]{1,40})",
        r"\[柜员(?P<teller>[0-9A-Za-z_-]{1,20})\]",
        r"类型=(?P<business>[^\s=,;]{1,20})",
    ], description="Regular expressions with named groups txn, teller and/or business, tried "
                   "on the start line and then on later lines for labels still missing. A value "
                   "that is a customer number never becomes a label.")
    required_steps: dict[str, dict[str, str]] = Field(default={
        "理财购买": {"风险评估": "风险评估", "风险揭示": "风险揭示", "冷静期告知": "冷静期告知",
                     "客户签名": "客户签名"},
        "保险代销": {"风险评估": "风险评估", "风险揭示": "风险揭示", "冷静期告知": "冷静期告知",
                     "客户签名": "客户签名"},
        "大额转账": {"风险提示": "风险提示", "客户签名": "客户签名"},
    }, description="Per business type (the business label; `*` for every session): step name -> "
                   "pattern a line of the session must match. A session missing a step is "
                   "incomplete: on record, and shown on the fault LED.")
    idle_seal_ms: Annotated[int, Field(ge=1000, le=600_000)] = Field(
        default=10_000, description="Log lines outside sessions are sealed in an idle segment "
                                    "at most this long after the first of them arrived.")
    incomplete_led_ms: Annotated[int, Field(ge=0, le=600_000)] = Field(
        default=30_000, description="How long the fault LED shows an incomplete session (or "
                                    "until the next session starts).")

    @field_validator("labels")
    @classmethod
    def _labels(cls, patterns: list[str]) -> list[str]:
        import re

        for p in _regexes(patterns):
            groups = set(re.compile(p).groupindex)
            if not groups or groups - {"txn", "teller", "business"}:
                raise ValueError(f"label pattern {p!r} needs named groups among txn, teller, "
                                 "business, and no others")
        return patterns

    @field_validator("required_steps")
    @classmethod
    def _steps(cls, steps: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for named in steps.values():
            _regexes(list(named.values()))
        return steps


class ShieldSection(_Strict):
    """The number shield (dualrec.shield): what is masked outside sealed evidence."""

    patterns: list[str] = Field(default=[], description="Regular expressions masked with "
                                "asterisks in logs and on every other surface, in addition to "
                                "resident ID, bank card and mobile numbers.")

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        return _regexes(patterns)


class SealSection(_Strict):
    recipients: Annotated[list[str], Field(min_length=1)]
    escrow: str | None = None

    @field_validator("recipients")
    @classmethod
    def _age(cls, recipients: list[str]) -> list[str]:
        for r in recipients:
            _age_recipient(r)
        return recipients

    @field_validator("escrow")
    @classmethod
    def _escrow(cls, escrow: str | None) -> str | None:
        # sealed to as well as the recipients: a bad one would fail every seal, not the start
        if escrow is not None:
            _age_recipient(escrow)
        return escrow


def _age_recipient(r: str) -> None:
    import pyrage

    try:
        pyrage.x25519.Recipient.from_str(r)
    except Exception:
        raise ValueError(f"{r!r} is not an age X25519 recipient (age1...)") from None


class SpoolSection(_Strict):
    dir: Path
    state: Path
    # New sessions stop (fault LED, fault event) when the spool holds more than quota_mb or the
    # filesystem has less than min_free_mb free; they resume below 90 % of either limit.
    quota_mb: Annotated[int, Field(ge=1, le=10_000_000)] = 8192
    min_free_mb: Annotated[int, Field(ge=0, le=1_000_000)] = 256
    # While sealing fails (disk full, read-only, I/O errors) recording goes on in memory up to
    # this much unsealed media; beyond it the oldest unsealed media are dropped, on record as a
    # gap. 64 MiB suits a Pi Zero 2 W (512 MB RAM): about 3 minutes of 1080p30 with audio.
    unsealed_max_mb: Annotated[int, Field(ge=1, le=65_536)] = 64


class UplinkSection(_Strict):
    url: Annotated[str, Field(pattern=r"^https://[^/\s]+(:\d+)?/?$")]
    ca: Path  # the branch CA, pinned: the system trust store is not used
    cert: Path  # this device's TLS client certificate (CN = device id)
    key: Path
    receipt_key: Path  # the receiver's Ed25519 receipt key (public, PEM)
    bandwidth_bps: Annotated[int, Field(ge=8_000, le=10_000_000_000)] = 4_000_000
    timeout_s: Annotated[int, Field(ge=1, le=600)] = 30
    backoff_max_s: Annotated[int, Field(ge=1, le=3600)] = 60


class SiteConfig(_Strict):
    device: DeviceSection
    recording: RecordingSection = RecordingSection()
    oplog: OpLogSection = OpLogSection()
    transactions: TransactionsSection = TransactionsSection()
    shield: ShieldSection = ShieldSection()
    seal: SealSection
    spool: SpoolSection
    uplink: UplinkSection | None = None


# --- loading ---------------------------------------------------------------------------------


def _format_errors(path: Path, exc: ValidationError) -> str:
    """One line per problem, each whole on its own: file, key, reason (a log or journal line
    shown alone still says everything)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        elif err["type"] == "missing":
            reason = "required key is missing"
        lines.append(f"{path}: {key}: {reason}")
    return "\n".join(lines)


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def load_board(path: Path) -> BoardProfile:
    try:
        return BoardProfile.model_validate(_read_toml(path))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None


def load_site(path: Path) -> SiteConfig:
    """Load the site config; relative paths in it are relative to the file's directory."""
    try:
        cfg = SiteConfig.model_validate(_read_toml(path))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    base = path.parent
    update: dict = {
        "device": cfg.device.model_copy(update={"key": _resolve(base, cfg.device.key)}),
        "spool": cfg.spool.model_copy(update={"dir": _resolve(base, cfg.spool.dir),
                                              "state": _resolve(base, cfg.spool.state)}),
    }
    if cfg.uplink is not None:
        update["uplink"] = cfg.uplink.model_copy(update={
            k: _resolve(base, getattr(cfg.uplink, k)) for k in ("ca", "cert", "key", "receipt_key")
        })
    return cfg.model_copy(update=update)
