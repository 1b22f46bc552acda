"""Writes that are either complete on disk or absent: write, flush, fsync, check, rename, fsync
the directory. A full disk or an I/O error raises; no half-written file is ever left behind under
the final name, and the temporary file is removed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


class WriteError(OSError):
    """A durable write failed; the destination was not created or changed."""


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, *, expected_size: int | None = None,
                  mode: int = 0o600) -> None:
    """Atomically create or replace path with data (file mode `mode`, under the umask).

    expected_size, when given, is the length the file format implies; a mismatch (a writer that
    lost bytes silently, as pyrage's buffered writer does on ENOSPC) is an error, not a file.
    """
    if expected_size is not None and expected_size != len(data):
        raise WriteError(f"{path.name}: {len(data)} bytes to write, format implies {expected_size}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        on_disk = tmp.stat().st_size
        if on_disk != len(data):
            raise WriteError(f"{path.name}: {on_disk} bytes on disk, expected {len(data)}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        # On a filesystem gone read-only the cleanup fails too; the write's error is the one
        # to report (recover() removes stray temp files at the next start).
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(exc.errno, f"writing {path}: {exc.strerror or exc}") from exc


def write_durable_from(path: Path, fill: Callable[[int], tuple[int, int]]) -> int:
    """Atomically create or replace path with what fill(fd) writes to a new temporary file.

    For content too large to hold whole in memory (a segment's ciphertext, streamed out of the
    encryptor). fill returns (bytes it wrote, length the format implies): a mismatch is an
    error before anything is made durable, and the size on disk is checked against it after
    the fsync, as write_durable does. Any exception from fill removes the temporary file and is
    raised as it is (an OSError as WriteError). Returns the file's size."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written, expected = fill(fd)
            if written != expected:
                raise WriteError(f"{path.name}: {written} bytes written, format implies "
                                 f"{expected}")
            os.fsync(fd)
        finally:
            os.close(fd)
        on_disk = tmp.stat().st_size
        if on_disk != written:
            raise WriteError(f"{path.name}: {on_disk} bytes on disk, expected {written}")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return written
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"writing {path}: {exc.strerror or exc}") from exc
        raise
