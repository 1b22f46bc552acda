"""Age encryption in a separate process that dies with the gateway.

pyrage holds the GIL for the whole of an encryption (tens of milliseconds for a 10 s segment on a
PC, several times that on a Pi), which stalls the capture threads and drops frames, so the work
runs in a child process: `python -m dualrec.age_worker --parent PID`, a plain subprocess
speaking length-prefixed frames over its stdin and stdout. Only the plaintext crosses the pipe,
in memory: nothing touches the disk.

Why not a multiprocessing pool: a kill -9 of the gateway left the spawned worker and the
multiprocessing resource tracker running (247 kills left 388 processes). This child has two
lifelines and no helper process: on Linux the kernel sends it SIGKILL when the gateway dies
(PR_SET_PDEATHSIG), and everywhere it exits when its stdin reaches EOF, which happens when the
gateway's end of the pipe is closed, by close() or by the gateway's death. A worker that dies
(OOM kill, or its spawning thread ended, see below) is replaced at the next request.

Protocol (all lengths unsigned 64-bit big-endian):
  request:  len, recipients (ASCII, one per line); len, plaintext
  response: one status byte (0 ok, 1 error); len, ciphertext or UTF-8 error message
The module imports nothing heavy at the top, so the worker starts light.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import IO

_LEN = struct.Struct(">Q")
_OK, _ERR = b"\x00", b"\x01"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WORKER_MODULE = "dualrec.age_worker"


class AgeWorkerError(RuntimeError):
    """The encryption failed: refused by pyrage, or the worker process died."""


def encrypt(plaintext: bytes, recipients: list[str]) -> bytes:
    import pyrage

    return pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(r) for r in recipients])


# --- the gateway's side ----------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Close the lifeline and reap the worker; kill it if it does not leave."""
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            # a broken pipe on the final flush: the worker is gone anyway
            with contextlib.suppress(OSError):
                f.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class AgeWorker:
    """Encrypts in the worker process, one request at a time; starts it at the first request.

    The parent-death signal fires when the *thread* that started the worker ends (prctl(2)),
    not only the process. A worker killed that way, or by anything else, is replaced and the
    request retried once on the new worker: encryption commits nothing, so a retry is safe.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The worker's pid, while one runs (for tests and diagnostics)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        # The worker runs the same code as the gateway, wherever it was imported from.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # Only the gateway talks to systemd (NotifyAccess=main); don't hand the socket on.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"):
            env.pop(name, None)
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, "--parent", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        # A worker dropped without close() (a Sealer garbage-collected in tests) is reaped too.
        self._finalizer = weakref.finalize(self, _stop, proc)
        return proc

    def _request(self, proc: subprocess.Popen[bytes], plaintext: bytes, names: bytes) -> bytes:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_LEN.pack(len(names)) + names + _LEN.pack(len(plaintext)))
        proc.stdin.write(plaintext)
        proc.stdin.flush()
        status = proc.stdout.read(1)
        body = _read_frame(proc.stdout)
        if status == _OK:
            return body
        if status == _ERR:
            raise AgeWorkerError(body.decode("utf-8", "replace"))
        raise EOFError(f"bad status byte {status!r}")

    def encrypt(self, plaintext: bytes, recipients: list[str]) -> bytes:
        try:
            names = "\n".join(recipients).encode("ascii")
        except UnicodeEncodeError:
            raise AgeWorkerError(f"{recipients!r}: an age recipient is ASCII") from None
        with self._lock:
            for attempt in (1, 2):
                if self._proc is None or self._proc.poll() is not None:
                    self._discard()
                    self._proc = self._start()
                try:
                    return self._request(self._proc, plaintext, names)
                except (OSError, EOFError, ValueError) as exc:
                    # the worker died before or during the request (BrokenPipe, EOF, closed)
                    code = self._proc.poll()
                    self._discard()
                    if attempt == 2:
                        raise AgeWorkerError(f"age worker died (exit status {code}): "
                                             f"{type(exc).__name__}: {exc}") from None
            raise AssertionError("unreachable")

    def _discard(self) -> None:
        if self._proc is not None:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self._proc.poll() is None:
                self._proc.kill()  # out of step with its pipe: never reuse it
            _stop(self._proc)
            self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                if self._finalizer is not None:
                    self._finalizer.detach()
                    self._finalizer = None
                _stop(self._proc)  # EOF first: the worker finishes nothing and leaves
                self._proc = None


# --- the worker's side -----------------------------------------------------------------------


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise EOFError
    return data


def _read_frame(f: IO[bytes]) -> bytes:
    (n,) = _LEN.unpack(_read_exact(f, _LEN.size))
    return _read_exact(f, n) if n else b""


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the gateway dies; leave now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            # no kernel lifeline: stdin EOF remains
            print(f"age worker: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    # The gateway may have died before prctl took effect: we'd have been reparented already.
    if os.getppid() != parent:
        sys.exit(0)


def serve(parent: int) -> None:
    die_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group; the gateway handles it by sealing
    # what it holds, which needs this worker alive. SIGTERM still ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp = sys.stdin.buffer
    # Keep the protocol's stream to ourselves: a stray print() from a library goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    import pyrage  # after the lifeline: a gateway killed during this import leaves no worker

    while True:
        try:
            recipients = _read_frame(inp).decode("ascii").split("\n")
            plaintext = _read_frame(inp)
        except EOFError:
            return  # the gateway closed the pipe or died: the lifeline
        try:
            parsed = [pyrage.x25519.Recipient.from_str(r) for r in recipients]
            status, body = _OK, pyrage.encrypt(plaintext, parsed)
        except Exception as exc:  # reported to the gateway, which owns the decision
            status, body = _ERR, f"{type(exc).__name__}: {exc}".encode()
        del plaintext
        out.write(status + _LEN.pack(len(body)))
        out.write(body)  # apart: no copy of a segment-sized buffer
        out.flush()
        del body


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "--parent" or not argv[1].isdigit():
        sys.exit("usage: python -m dualrec.age_worker --parent PID")
    with contextlib.suppress(BrokenPipeError):  # the gateway went away mid-reply
        serve(int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
