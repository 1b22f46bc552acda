"""A gateway running in this test process on the small sim board, with real devices swapped in
(a serial port on a pty, the ALSA test microphone, the picamera2 fake), and what it sealed read
back as an auditor would: headers parsed and checked, payloads decrypted."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage

from dualrec.config import load_board, load_site
from dualrec.devices.factory import build_devices
from dualrec.gateway import Gateway
from dualrec.segment_format import parse_header
from dualrec_tools.export import load_identities
from dualrec_tools.verify import DeviceKey, verify_dir
from helpers import small_board, write_site

CONTINUOUS = """min_free_mb = 0

[recording]
mode = "continuous"
segment_ms = 2000
"""


@dataclass
class Sealed:
    header: dict[str, Any]
    events: list[dict[str, Any]]
    lines: list[dict[str, Any]]

    @property
    def frames(self) -> int:
        return int(self.header["streams"]["video"]["frames"])

    @property
    def samples(self) -> int:
        return int(self.header["streams"]["audio"]["samples"])

    def kinds(self, device: str | None = None) -> list[str]:
        return [e["kind"] for e in self.events
                if device is None or e["detail"].get("device") == device]


class Box:
    """Gateway.run on a thread, continuous recording in 2 s segments; stop() ends it."""

    def __init__(self, tmp_path: Path, key_files: dict[str, Any], *, port: str = "loop://",
                 **devices: Any) -> None:
        self.tmp = tmp_path
        self.key_files = key_files
        board = load_board(small_board(tmp_path))
        site = load_site(write_site(tmp_path / "site.toml", key_files, port=port,
                                    extra=CONTINUOUS))
        built = build_devices(board, site)
        for name, dev in devices.items():
            setattr(built, name, dev)
        self.gw = Gateway(board, site, built)
        self.spool = site.spool.dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-gateway", daemon=True)
        self.error: BaseException | None = None
        self.started_ns = 0

    def _run(self) -> None:
        try:
            self.gw.run(self._stop)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> Box:
        self.started_ns = time.monotonic_ns()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive(), "the gateway did not stop"
        assert self.error is None, repr(self.error)

    def running(self) -> bool:
        return self._thread.is_alive()

    def sealed(self) -> list[Sealed]:
        """Every sealed segment so far, oldest first (a payload still being written is left
        for the next call: its header, the commit point, is not there yet)."""
        ids = load_identities(self.key_files["identity"])
        out = []
        for hdr in sorted(self.spool.glob("*.hdr.json")):
            header = parse_header(hdr.read_bytes())
            blob = (self.spool / f"{header['seq']:010d}.payload.age").read_bytes()
            with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(blob, ids))) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            out.append(Sealed(header, _jsonl(members["events.jsonl"]),
                              _jsonl(members["oplog.jsonl"])))
        return out

    def verify(self) -> None:
        """The chain verifies with the device's public key."""
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(self.key_files["device_pub"].read_bytes())
        report = verify_dir(self.spool, [DeviceKey(key, None, "device.pub")])
        assert not report.errors, [str(p) for p in report.errors]


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def wait_until(predicate: Any, timeout: float, what: str, box: Box | None = None) -> Any:
    """Poll predicate until it returns something true; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        if box is not None and not box.running():
            raise AssertionError(f"the gateway ended while waiting for {what}: {box.error!r}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
