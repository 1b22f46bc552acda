"""Builds the devices a board profile names. Backends are imported here, lazily, so a board
that does not use a library never imports it."""

from __future__ import annotations

from dataclasses import dataclass

from dualrec.config import BoardProfile, SiteConfig
from dualrec.devices.base import Camera, DeviceError, Microphone, OpLog, Panel


@dataclass
class Devices:
    camera: Camera | None
    microphone: Microphone | None
    oplog: OpLog | None
    panel: Panel


def build_devices(board: BoardProfile, site: SiteConfig) -> Devices:
    clap = board.sim.clap_period_ms if board.sim else 7000
    cam = board.camera
    camera: Camera | None = None
    if cam.backend == "sim":
        from dualrec.sim.camera import SimCamera

        camera = SimCamera(width=cam.width, height=cam.height, fps=cam.fps, gop=cam.gop,
                           bitrate=cam.bitrate, clap_period_ms=clap)
    elif cam.backend != "none":
        raise DeviceError(f"camera backend {cam.backend!r} is not available in this build")

    mic = board.microphone
    microphone: Microphone | None = None
    if mic.backend == "sim":
        from dualrec.sim.microphone import SimMicrophone

        microphone = SimMicrophone(rate=mic.rate, channels=mic.channels,
                                   block_frames=mic.block_frames, clap_period_ms=clap)
    elif mic.backend != "none":
        raise DeviceError(f"microphone backend {mic.backend!r} is not available in this build")

    oplog: OpLog | None = None
    if board.oplog.backend == "serial":
        from dualrec.devices.serial_oplog import SerialOpLog
        from dualrec.oplog_framer import LineFramer

        port = site.oplog.port or board.oplog.port
        if not port:
            raise DeviceError("operation log: no serial port set (site [oplog] port)")
        framer = LineFramer(site.oplog.encoding, site.oplog.line_end.encode(),
                            site.oplog.max_line)
        oplog = SerialOpLog(port, site.oplog.baud, framer)
    elif board.oplog.backend != "none":
        raise DeviceError(f"oplog backend {board.oplog.backend!r} is not available in this build")

    if board.panel.backend == "sim":
        from dualrec.sim.panel import SimPanel

        panel: Panel = SimPanel()
    else:
        raise DeviceError(f"panel backend {board.panel.backend!r} is not available in this build")
    return Devices(camera, microphone, oplog, panel)
