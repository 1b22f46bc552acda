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
    """What board this profile is for."""

    name: str = Field(description="Short name of the board, shown by check-config and diag.",
                      examples=["rpi4b"])
    description: str = Field("", description="Free text for people.")


Gpio = Annotated[int, Field(ge=0, le=27)]  # BCM numbering on the 40-pin header


class CameraProfile(_Strict):
    """The camera. Width and height must both be even (yuv420p)."""

    backend: Literal["sim", "picamera2", "none"] = Field(
        description="sim: the simulated counter; picamera2: a Raspberry Pi camera; none: no "
                    "camera (sessions say they have no video).", examples=["picamera2"])
    # picamera2 only: "hardware" = H264Encoder on the VideoCore (Pi 4, CM4, Zero 2 W);
    # "libav" = LibavH264Encoder in software (Pi 5 has no H.264 block).
    encoder: Literal["hardware", "libav"] = Field(
        "hardware", description="picamera2 only. hardware: the VideoCore H.264 encoder (Pi 4, "
                                "CM4, Zero 2 W); libav: software (Pi 5 has no H.264 block).")
    sensor_index: Annotated[int, Field(ge=0, le=3, description="Which camera, when the board "
                                       "has more than one (picamera2 numbering).")] = 0
    width: Annotated[int, Field(ge=160, le=3840, description="Frame width in pixels.")] = 1280
    height: Annotated[int, Field(ge=120, le=2160, description="Frame height in pixels.")] = 720
    fps: Annotated[int, Field(ge=1, le=60, description="Frames per second.")] = 30
    gop: Annotated[int, Field(ge=1, le=300, description="Frames from one keyframe to the "
                              "next: pre-roll and segments start at keyframes.")] = 30
    bitrate: Annotated[int, Field(ge=100_000, le=25_000_000, description="H.264 target bit "
                                  "rate, bits per second.")] = 4_000_000

    @model_validator(mode="after")
    def _even(self) -> CameraProfile:
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even for yuv420p")
        return self


class MicrophoneProfile(_Strict):
    """The microphone. A block (block_frames / rate) must not be longer than 100 ms."""

    backend: Literal["sim", "pyaudio", "none"] = Field(
        description="sim: the simulated counter; pyaudio: an ALSA capture device; none: no "
                    "microphone.", examples=["pyaudio"])
    device: str = Field("", description="pyaudio: a substring of the ALSA device name; empty: "
                                        "the default device.", examples=["USB Audio"])
    rate: Literal[16000, 32000, 44100, 48000] = Field(48000, description="Sample rate, Hz.")
    channels: Annotated[int, Field(ge=1, le=2, description="1 mono, 2 stereo.")] = 1
    block_frames: Annotated[int, Field(ge=64, le=8192, description="Samples per channel "
                                       "in one captured block.")] = 960

    @model_validator(mode="after")
    def _short_blocks(self) -> MicrophoneProfile:
        # a block is delivered after its last sample: longer than 100 ms would arrive after the
        # segmenter's grace and land in the wrong segment
        if self.block_frames * 1000 > self.rate * 100:
            raise ValueError(f"block_frames {self.block_frames} is over 100 ms at {self.rate} Hz")
        return self


class OpLogProfile(_Strict):
    """How the teller terminal's operation log reaches the box."""

    backend: Literal["serial", "picotap", "none"] = Field(
        "serial", description="serial: a serial line read directly; picotap: through the Pico "
                              "serial tap (needs a [tap] section); none: no operation log.")
    # A path (/dev/ttyAMA0, /dev/serial/by-id/...), "usb:VID:PID[:SERIAL]" or a pyserial URL;
    # the site config's [oplog] port, when set, wins.
    port: str = Field("", description="The serial port: a path (/dev/ttyAMA0, "
                      "/dev/serial/by-id/...), usb:VID:PID[:SERIAL] or a pyserial URL. The site "
                      "config's [oplog] port, when set, wins.", examples=["/dev/ttyAMA0"])


class TapProfile(_Strict):
    """The Pico serial tap (backend picotap): its USB data port and the clock-sync line."""

    port: str = Field("usb:2e8a:0005", description="The tap's own USB CDC data interface "
                      "(not its REPL): usb:VID:PID[:SERIAL] or a path.")
    sync_gpio: Gpio | None = Field(None, description="BCM pin of the Pi that pulses the tap's "
                                   "sync line at known instants; absent: the tap clock is "
                                   "estimated from USB arrival times.", examples=[5])
    uart_baud: Annotated[int, Field(ge=300, le=921_600, description="Baud rate of the tapped "
                                    "line(s).")] = 115_200
    rx_pins: list[Annotated[int, Field(ge=0, le=28)]] = Field(
        [1], description="Pico GP pins of the tapped lines (terminal TX first, then RX).")
    sync_pin: Annotated[int, Field(ge=0, le=28, description="Pico GP pin the sync line "
                                   "arrives on.")] = 22


class PanelProfile(_Strict):
    """LEDs and inputs (BCM numbers). LEDs are driven high = on; inputs use the internal
    pull-up, active low. With rpigpio no pin may serve two functions."""

    backend: Literal["sim", "rpigpio"] = Field(
        "sim", description="sim: simulated; rpigpio: the Pi's GPIO header.")
    recording_led: Gpio = Field(17, description="Recording LED (BCM).")
    fault_led: Gpio = Field(27, description="Fault LED (BCM), one blink pattern per fault.")
    button: Gpio = Field(22, description="Teller's button (BCM): short press marks, long press "
                                         "starts or stops a session.")
    tamper: Gpio = Field(23, description="Tamper switch input (BCM).")
    power_fail: Gpio = Field(24, description="Power-fail input from the UPS (BCM).")
    debounce_ms: Annotated[int, Field(ge=1, le=500, description="Input debounce time, "
                                      "ms.")] = 30
    long_press_ms: Annotated[int, Field(ge=300, le=10_000, description="A press this long "
                                        "or longer is a long press, ms.")] = 1500


class ClockProfile(_Strict):
    """Where UTC comes from and how good it is said to be in each segment."""

    source: Literal["system", "rtc"] = Field(
        "system", description="system: the kernel clock alone; rtc: checked against the "
                              "battery-backed RTC.")
    rtc: str = Field("/dev/rtc0", description="The RTC device (source rtc).")
    chrony: bool = Field(False, description="Read `chronyc -c tracking` into each segment's "
                                            "clock quality.")
    pps: str = Field("", description="PPS device (dtoverlay=pps-gpio); empty: none.",
                     examples=["/dev/pps0"])
    pps_gpio: Gpio | None = Field(None, description="BCM pin of the PPS input (for `dualrec "
                                  "chrony-conf` and the pin check); absent: none.",
                                  examples=[18])
    step_threshold_ms: Annotated[int, Field(ge=1, le=60_000, description="A UTC jump larger "
                                            "than this is a clock_step event, ms.")] = 100


class SimProfile(_Strict):
    """The simulated counter (boards/sim.toml)."""

    clap_period_ms: Annotated[int, Field(ge=500, le=600_000, description="Interval of the "
                                         "clapper (a flash, a beep and a MARK log line at one "
                                         "instant) used to measure sync, ms.")] = 7000


class BoardProfile(_Strict):
    """The board profile (boards/<name>.toml): what hardware is there and how to drive it."""

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
    """Who this box is."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="Device id, as enrolled at the receiver (also the CN "
                                         "of its TLS certificate).", examples=["ctr-01"])]
    key: Path = Field(description="The device's Ed25519 signing key, PKCS#8 PEM; relative "
                                  "paths are relative to the site config.",
                      examples=["device.key"])


class RecordingSection(_Strict):
    """When to record and how to cut."""

    mode: Literal["session", "continuous"] = Field(
        "session", description="session: record from a start line (or a long press) to a stop "
                               "line; continuous: always.")
    preroll_ms: Annotated[int, Field(ge=0, le=60_000, description="Media kept from before "
                                     "the start trigger, ms.")] = 5000
    postroll_ms: Annotated[int, Field(ge=0, le=60_000, description="Media kept after the "
                                      "stop trigger, ms.")] = 2000
    segment_ms: Annotated[int, Field(ge=1000, le=600_000, description="Target length of a "
                                     "sealed segment, ms (cut at a keyframe).")] = 10_000
    max_session_ms: Annotated[int, Field(ge=10_000, le=24 * 3600_000, description="A "
                                         "session longer than this is stopped, ms.")] = (
        4 * 3600_000)


class OpLogSection(_Strict):
    """The teller terminal's operation log: the serial line, how its bytes become lines
    (dualrec.oplog_framer) and which lines start and stop a session. Worked examples for
    common terminals: docs/oplog-terminals.md."""

    port: str = Field("", description="The serial port (a path, /dev/serial/by-id/..., "
                      "usb:VID:PID[:SERIAL] or a pyserial URL); empty: the board profile's "
                      "[oplog] port.", examples=["usb:0403:6001"])
    baud: Literal[9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600] = Field(
        115200, description="Baud rate.")
    bytesize: Literal[5, 6, 7, 8] = Field(8, description="Data bits.")
    parity: Literal["none", "even", "odd", "mark", "space"] = Field("none",
                                                                    description="Parity.")
    stopbits: Literal[1, 1.5, 2] = Field(1, description="Stop bits.")
    encoding: Literal["auto", "gb18030", "utf-8", "big5"] = Field(
        "auto", description="How a line's bytes are read as text (its raw bytes are kept "
        "as they are). auto: each line as UTF-8 when it is valid UTF-8, else as GB18030. auto "
        "reads Big5 as GB18030 without a decode error (wrong characters, so no start line "
        "matches): a Big5 terminal needs big5.", examples=["gb18030"])
    line_end: Literal["any", "\r\n", "\n", "\r"] = Field(
        "any", description="What ends a line. any: CR, LF and CRLF in any mix (a CR followed "
        "by LF is one terminator). \"\\r\\n\": LF, with a CR before it (a bare CR is "
        "content). \"\\n\" or \"\\r\": that byte alone.", examples=["\r\n"])
    idle_ms: Annotated[int, Field(ge=20, le=5000, description="A line whose last byte is "
                                  "this old ends without a terminator (flag unterminated), ms. "
                                  "It must exceed the longest pause the terminal makes inside "
                                  "a line.")] = 200
    decode_error_run: Annotated[int, Field(ge=1, le=1000, description="This many lines with "
                                           "non-ASCII bytes in a row that do not decode are a "
                                           "fault (wrong encoding?); as many that decode "
                                           "clear it.")] = 5
    max_line: Annotated[int, Field(ge=80, le=65536, description="Longest line in bytes; a "
                                   "longer one is cut into pieces (flags overlong, "
                                   "continued).")] = 4096
    start_patterns: list[str] = Field(["交易开始"], description="Regular expressions; a line "
                                      "matching one starts a session.")
    stop_patterns: list[str] = Field(["交易结束"], description="Regular expressions; a line "
                                     "matching one stops the session.")

    @field_validator("start_patterns", "stop_patterns")
    @classmethod
    def _regex(cls, patterns: list[str]) -> list[str]:
        return _regexes(patterns)


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
    """Who can open the sealed segments."""

    recipients: Annotated[list[str], Field(min_length=1, description="age X25519 recipients "
                                           "(age1...) every payload is encrypted to.",
                                           examples=[["age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq"]])]
    escrow: str | None = Field(None, description="One more age recipient (age1...), e.g. the "
                                                 "bank's escrow key; absent: none.")

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
    """Where sealed segments wait for upload. New sessions stop (fault LED, fault event) when
    the spool holds more than quota_mb or the filesystem has less than min_free_mb free; they
    resume below 90 % of either limit."""

    dir: Path = Field(description="Spool directory for sealed segments; relative paths are "
                                  "relative to the site config.",
                      examples=["/var/lib/dualrec/spool"])
    state: Path = Field(description="The chain state database (SQLite); relative paths are "
                                    "relative to the site config.",
                        examples=["/var/lib/dualrec/state/state.db"])
    quota_mb: Annotated[int, Field(ge=1, le=10_000_000, description="Most the spool may "
                                   "hold, MiB.")] = 8192
    min_free_mb: Annotated[int, Field(ge=0, le=1_000_000, description="Least free space "
                                      "left on the filesystem, MiB.")] = 256
    # While sealing fails (disk full, read-only, I/O errors) recording goes on in memory up to
    # this much unsealed media; beyond it the oldest unsealed media are dropped, on record as a
    # gap. 64 MiB suits a Pi Zero 2 W (512 MB RAM): about 3 minutes of 1080p30 with audio.
    unsealed_max_mb: Annotated[int, Field(ge=1, le=65_536, description="While sealing fails, "
                                          "unsealed media kept in memory, MiB; beyond it the "
                                          "oldest media are dropped, on record as a gap.")] = 64


class UplinkSection(_Strict):
    """The branch receiver segments are uploaded to; relative paths are relative to the site
    config. Without this section segments stay in the spool."""

    url: Annotated[str, Field(pattern=r"^https://[^/\s]+(:\d+)?/?$",
                              description="The receiver's base URL (https only).",
                              examples=["https://10.1.2.3:8443"])]
    ca: Path = Field(description="The branch CA certificate, pinned: the system trust store "
                                 "is not used.", examples=["ca.crt"])
    cert: Path = Field(description="This device's TLS client certificate (CN = device id).",
                       examples=["tls.crt"])
    key: Path = Field(description="Its private key.", examples=["tls.key"])
    receipt_key: Path = Field(description="The receiver's Ed25519 receipt key (public, PEM).",
                              examples=["receipt.pub"])
    bandwidth_bps: Annotated[int, Field(ge=32_000, le=10_000_000_000, description="Upload "
                                        "bandwidth cap, bits per second; at least 32 kbit/s, "
                                        "twice the receiver's slowest accepted body rate.")
                             ] = 4_000_000
    timeout_s: Annotated[int, Field(ge=1, le=600, description="Timeout of one request, "
                                    "s.")] = 30
    backoff_max_s: Annotated[int, Field(ge=1, le=3600, description="Longest wait between "
                                        "retries, s.")] = 60
    resume_wait_s: Annotated[int, Field(ge=10, le=86_400, description="With its chain state "
                                        "lost and an empty spool, how long the box asks the "
                                        "receiver for its newest segment (holding new segments "
                                        "in memory) before it starts a new chain from genesis "
                                        "(FORMAT.md §4).")] = 600


class SiteConfig(_Strict):
    """The site config (/etc/dualrec/site.toml, written at provisioning): who this box is, how
    it records and where its segments go."""

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
