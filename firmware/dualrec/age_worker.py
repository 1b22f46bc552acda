"""Age encryption by Debian's `age` binary, fed over a pipe, in a process that dies with the
gateway.

Why a separate process at all: an encryption in the gateway's interpreter (pyrage) holds the GIL
for tens of milliseconds per 10 s segment on a PC, several times that on a Pi, which stalls the
capture threads and drops frames. Why `age` and not a Python worker running pyrage (the design
before issue 14): a second interpreter with pyrage cost ~26 MiB resident at rest and, holding a
segment's plaintext and its ciphertext at once, ~47 MiB at its peak; the Go reference
implementation runs in ~10 MiB and streams (64 KiB chunks), so it holds no segment. The box's
package depends on Debian's `age` (the reference decrypter, already installed for the tests by
scripts/setup-system.sh).

One `age -e -r R...` process per segment, read from and written to over pipes: the plaintext
goes in as the sealer produces it (the tar, in pieces: see Segment.pack_chunks) and the
ciphertext comes out to a file descriptor the sealer gives (the payload's temporary file), hashed
on the way. Plaintext only ever crosses the pipe, in memory: nothing touches the disk. The next
process is started as soon as one has its whole input ("warm"), so a seal does not wait for a
fork and exec, and there is always one to show in the process table.

Lifelines, as the Python worker had (a kill -9 of the gateway must leave no process):
  - the kernel sends SIGKILL to age when the gateway dies: `setpriv --pdeathsig KILL` (util-linux)
    sets PR_SET_PDEATHSIG and execs age, no preexec_fn in a threaded process. The signal fires
    when the *thread* that started the process ends, not only the process: a warm process killed
    that way, or by anything else, is replaced at the next request, and a request whose process
    dies under it is retried once on a new one (encryption commits nothing, the output file is
    truncated);
  - EOF: the gateway's end of the stdin pipe closes when it dies; age then encrypts what it has
    to a stdout nobody reads and exits on the broken pipe. This also covers a gateway that died
    between the fork and the prctl.
  - its own session (setsid): Ctrl-C in a terminal reaches the whole foreground process group;
    the gateway handles it by sealing what it holds, which needs age alive. SIGTERM to the unit's
    cgroup still ends it (and the gateway's last seal retries on a new one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

# Set in the age process's environment: which gateway started it (tests and diagnostics find
# a gateway's encryption processes by it, also after the gateway is gone).
PARENT_ENV = "DUALREC_AGE_PARENT"
F_SETPIPE_SZ = 1031  # <linux/fcntl.h>
PIPE_SIZE = 1 << 20  # the default pipe-max-size: fewer wake-ups per segment than 64 KiB
READ_SIZE = 1 << 20
HEADER_LIMIT = 1 << 16  # an age header longer than this is not one (a few stanzas of ~100 B)


class AgeWorkerError(RuntimeError):
    """The encryption failed: refused by age (a bad recipient), or the process died."""


@dataclass(frozen=True)
class Encrypted:
    """What came out of age for one plaintext: written to the caller's descriptor."""

    plaintext_size: int
    size: int  # ciphertext bytes written
    header_size: int  # the age header, up to and including its MAC line
    sha256: str


def age_binary() -> str:
    path = shutil.which("age")
    if path is None:
        raise AgeWorkerError("the age binary is not installed (Debian package 'age')")
    return path


def _command(recipients: Sequence[str]) -> list[str]:
    cmd = [age_binary(), "--encrypt"]
    for r in recipients:
        cmd += ["-r", r]
    setpriv = shutil.which("setpriv")
    # Without setpriv (not Linux, or no util-linux) the EOF lifeline is left.
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _header_size(prefix: bytes) -> int | None:
    """The age header's length if prefix holds all of it, else None (more is needed)."""
    end = prefix.find(b"\n--- ")
    if end < 0:
        return None
    eol = prefix.find(b"\n", end + 1)
    return eol + 1 if eol >= 0 else None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process that holds nothing of value (an idle warm one, or a failed request)."""
    if proc.poll() is None:
        proc.kill()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    proc.wait()


class _Drain:
    """Reads age's stdout to the end on its own thread: hashes it and writes it to out_fd."""

    def __init__(self, proc: subprocess.Popen[bytes], out_fd: int) -> None:
        self.proc = proc
        self.out_fd = out_fd
        self.sha = hashlib.sha256()
        self.size = 0
        self.header_size: int | None = None
        self.error: BaseException | None = None
        self.stderr = b""
        self._thread = threading.Thread(target=self._run, name="age-out", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        fd = self.proc.stdout.fileno()
        prefix = b""
        try:
            while True:
                chunk = os.read(fd, READ_SIZE)  # hashlib and os.write release the GIL
                if not chunk:
                    break
                if self.header_size is None:
                    prefix += chunk[:HEADER_LIMIT]
                    self.header_size = _header_size(prefix)
                    if self.header_size is None and len(prefix) >= HEADER_LIMIT:
                        raise AgeWorkerError("age wrote no header")
                self.sha.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.out_fd, view):]
                self.size += len(chunk)
        except BaseException as exc:  # reported by join(); age is stopped by the caller
            self.error = exc
            with contextlib.suppress(OSError):
                self.proc.kill()  # it would block on a full pipe nobody reads
        with contextlib.suppress(OSError):
            self.stderr = self.proc.stderr.read()

    def join(self) -> None:
        self._thread.join()


class AgeWorker:
    """Encrypts with the age binary, one request at a time, a process per request.

    encrypt_to() streams plaintext pieces in and the ciphertext out to a descriptor; encrypt()
    is the in-memory form (tests, tools). Any failure raises AgeWorkerError (an OSError from
    writing the output is raised as it is: the disk, not age)."""

    def __init__(self) -> None:
        self._warm: subprocess.Popen[bytes] | None = None
        self._warm_for: tuple[str, ...] = ()
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The warm process's pid, while one waits (for tests and diagnostics)."""
        w = self._warm
        return w.pid if w is not None and w.poll() is None else None

    def _spawn(self, recipients: tuple[str, ...]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env[PARENT_ENV] = str(os.getpid())
        # Only the gateway talks to systemd (NotifyAccess=main); don't hand the socket on.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"):
            env.pop(name, None)
        try:
            proc = subprocess.Popen(_command(recipients), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            raise AgeWorkerError(f"cannot start age: {exc}") from exc
        assert proc.stdin is not None and proc.stdout is not None
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                fcntl.fcntl(f.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        return proc

    def _take(self, recipients: tuple[str, ...]) -> subprocess.Popen[bytes]:
        """The warm process if it is alive and for these recipients, else a new one."""
        warm, self._warm = self._warm, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if warm is not None:
            if warm.poll() is None and self._warm_for == recipients:
                return warm
            _stop(warm)
        return self._spawn(recipients)

    def _prewarm(self, recipients: tuple[str, ...]) -> None:
        try:
            self._warm, self._warm_for = self._spawn(recipients), recipients
        except AgeWorkerError:
            return  # the next request starts one (and reports why it cannot)
        # A worker dropped without close() (a Sealer garbage-collected in tests) is reaped too.
        self._finalizer = weakref.finalize(self, _stop, self._warm)

    def encrypt_to(self, pieces: Sequence[bytes | memoryview], recipients: Sequence[str],
                   out_fd: int) -> Encrypted:
        """Encrypt the concatenation of pieces to recipients, writing the ciphertext to out_fd
        (a regular file at offset 0: a retry truncates it)."""
        names = tuple(recipients)
        if not names:
            raise AgeWorkerError("no recipient")
        plain_size = sum(len(p) for p in pieces)
        with self._lock:
            for attempt in (1, 2):
                proc = self._take(names)
                try:
                    return self._request(proc, pieces, plain_size, out_fd, names)
                except _Died as exc:
                    if attempt == 2:
                        raise AgeWorkerError(str(exc)) from None
                    os.ftruncate(out_fd, 0)
                    os.lseek(out_fd, 0, os.SEEK_SET)
            raise AssertionError("unreachable")

    def _request(self, proc: subprocess.Popen[bytes], pieces: Sequence[bytes | memoryview],
                 plain_size: int, out_fd: int, names: tuple[str, ...]) -> Encrypted:
        assert proc.stdin is not None
        drain = _Drain(proc, out_fd)
        broken: OSError | None = None
        try:
            fd = proc.stdin.fileno()
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:
                    view = view[os.write(fd, view):]
        except OSError as exc:  # BrokenPipe: age died (killed, or refused its arguments)
            broken = exc
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if broken is None:
            self._prewarm(names)  # starts while this one finishes: off the next seal's path
        drain.join()
        code = proc.wait()
        with contextlib.suppress(OSError):
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
        if drain.error is not None:
            if isinstance(drain.error, OSError):
                raise drain.error  # writing the output: the disk's error, as the disk said it
            raise AgeWorkerError(f"{type(drain.error).__name__}: {drain.error}")
        message = drain.stderr.decode("utf-8", "replace").strip()
        if code != 0 or broken is not None:
            if message and code > 0:  # age said why (a bad recipient): not worth a retry
                raise AgeWorkerError(f"age exited with {code}: {message}")
            # Killed (the OOM killer, the parent-death signal of a thread that ended): a warm
            # process has already written its header by then, so the output is no guide;
            # encryption commits nothing and the caller's file is truncated: retried once.
            raise _Died(f"age died (exit status {code}): {broken or message}")
        if drain.header_size is None:
            raise AgeWorkerError("age wrote no header")
        return Encrypted(plain_size, drain.size, drain.header_size, drain.sha.hexdigest())

    def encrypt(self, plaintext: bytes, recipients: Sequence[str]) -> bytes:
        """The ciphertext of plaintext, in memory (through an anonymous file, never named)."""
        fd = os.memfd_create("age-out") if hasattr(os, "memfd_create") else None
        if fd is None:
            raise AgeWorkerError("memfd_create is not available")
        try:
            enc = self.encrypt_to([plaintext], recipients, fd)
            return os.pread(fd, enc.size, 0)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            warm, self._warm = self._warm, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if warm is not None:
                _stop(warm)  # idle: it holds nothing


class _Died(Exception):
    """The process died without saying why (a signal): safe to retry on a new one."""

