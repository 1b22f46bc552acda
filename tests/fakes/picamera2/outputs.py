"""picamera2.outputs: where encoders put encoded frames (Output, FileOutput), as in the real one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


class Output:
    """Base class: an encoder calls outputframe(frame, keyframe, timestamp) per encoded frame,
    from the encoder's own thread, between start() and stop()."""

    def __init__(self, pts: Any = None) -> None:
        self.recording = False
        self.ptsoutput = pts
        self.needs_pacing = False
        self.needs_add_stream = False

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        """Receive one encoded frame; timestamp is in microseconds from the first frame."""

    def outputtimestamp(self, timestamp: int | None) -> None:
        if self.ptsoutput is not None and timestamp is not None:
            print(f"{timestamp // 1000}.{timestamp % 1000:03}", file=self.ptsoutput, flush=True)

    def _add_stream(self, encoder_stream: Any, *args: Any, **kwargs: Any) -> None:
        pass


class FileOutput(Output):
    """Writes the frames to a file or a binary stream, from the first keyframe on."""

    def __init__(self, file: Any = None, pts: Any = None, split: int | None = None) -> None:
        super().__init__(pts=pts)
        self._needs_close = False
        self._firstframe = True
        if file is None:
            self._fileoutput: Any = None
        elif isinstance(file, str | Path):
            self._fileoutput = open(file, "wb")  # noqa: SIM115 - closed in stop(), as the real one
            self._needs_close = True
        elif isinstance(file, io.BufferedIOBase):
            self._fileoutput = file
        else:
            raise RuntimeError("Must pass io.BufferedIOBase")

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None,
                    packet: Any = None, audio: bool = False) -> None:
        if audio:
            raise RuntimeError("Fileoutput does not support audio")
        if self._fileoutput is not None and self.recording:
            if self._firstframe:
                if not keyframe:
                    return
                self._firstframe = False
            self._fileoutput.write(frame)
            self._fileoutput.flush()
            self.outputtimestamp(timestamp)

    def stop(self) -> None:
        super().stop()
        if self._needs_close:
            self._fileoutput.close()
