"""Builds the devices a board profile names. Backends are imported here, lazily, so a board
that does not use a hardware library never imports it (everything else imports anywhere)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dualrec.config import BoardProfile, OpLogSection, SiteConfig
from dualrec.devices.base import Camera, DeviceError, Microphone, OpLog, Panel
from dualrec.oplog_framer import LineFramer


@dataclass
class Devices:
    camera: Camera | None
    microphone: Microphone | None
    oplog: OpLog | None
    panel: Panel
    clock_source: str = "system"
    # (synced, est_error_ns) for each segment's clock quality; None: the kernel's adjtimex view
    sync_state: Callable[[], tuple[bool, int]] | None = None


def build_camera(board: BoardProfile) -> Camera | None:
    cam = board.camera
    clap = board.sim.clap_period_ms if board.sim else 7000
    if cam.backend == "sim":
        from dualrec.sim.camera import SimCamera

        return SimCamera(width=cam.width, height=cam.height, fps=cam.fps, gop=cam.gop,
                         bitrate=cam.bitrate, clap_period_ms=clap)
    if cam.backend == "picamera2":
        from dualrec.devices.picamera2_camera import PiCamera

        return PiCamera(cam)
    return None


def build_microphone(board: BoardProfile) -> Microphone | None:
    mic = board.microphone
    clap = board.sim.clap_period_ms if board.sim else 7000
    if mic.backend == "sim":
        from dualrec.sim.microphone import SimMicrophone

        return SimMicrophone(rate=mic.rate, channels=mic.channels,
                             block_frames=mic.block_frames, clap_period_ms=clap)
    if mic.backend == "pyaudio":
        from dualrec.devices.pyaudio_microphone import PyAudioMicrophone

        return PyAudioMicrophone(mic)
    return None


def build_framer(oplog: OpLogSection) -> LineFramer:
    """The site's framing, encoding and decode-fault settings in one LineFramer."""
    return LineFramer(oplog.encoding, oplog.line_end, oplog.max_line, idle_ms=oplog.idle_ms,
                      decode_error_run=oplog.decode_error_run)


def build_oplog(board: BoardProfile, site: SiteConfig) -> OpLog | None:
    framer = build_framer(site.oplog)
    if board.oplog.backend == "serial":
        from dualrec.devices.serial_oplog import SerialOpLog

        port = site.oplog.port or board.oplog.port
        if not port:
            raise DeviceError("operation log: no serial port set (site [oplog] port)")
        return SerialOpLog(port, site.oplog.baud, framer, bytesize=site.oplog.bytesize,
                           parity=site.oplog.parity, stopbits=site.oplog.stopbits)
    if board.oplog.backend == "picotap":
        from dualrec.devices.picotap import PicoTapOpLog

        assert board.tap is not None  # the profile validator insists
        if board.tap.sync_gpio is not None:
            # The box pulses the tap's sync line: the tap clock is fitted to the pulses
            # (offset and drift) instead of estimated from USB arrival times.
            from dualrec.devices.tap_sync import synced_tap_oplog

            return synced_tap_oplog(board.tap, framer)
        return PicoTapOpLog(board.tap, framer)
    return None


def build_panel(board: BoardProfile) -> Panel:
    if board.panel.backend == "rpigpio":
        from dualrec.devices.gpio_panel import GpioPanel

        return GpioPanel(board.panel)
    from dualrec.sim.panel import SimPanel

    return SimPanel()


def build_devices(board: BoardProfile, site: SiteConfig) -> Devices:
    devices = Devices(build_camera(board), build_microphone(board), build_oplog(board, site),
                      build_panel(board))
    if board.clock.source == "rtc" or board.clock.chrony:
        from dualrec.devices.clock import ClockQuality

        quality = ClockQuality(board.clock)
        devices.clock_source = quality.source
        devices.sync_state = quality.sync_state
    return devices
