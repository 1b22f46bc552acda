"""The age worker (Debian's age binary over pipes, one process per segment and a warm one
waiting): encrypts what pyrage decrypts, survives its process's death, and never outlives the
gateway (the orphans a kill -9 used to leave: the worker and multiprocessing's resource
tracker)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pyrage
import pytest

from dualrec.age_worker import PARENT_ENV, AgeWorker, AgeWorkerError
from dualrec_tools.simcounter import Counter
from helpers import ROOT, small_board, wait_for


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks since boot: tells a reused pid from the original
    cmdline: str


def proc_table() -> dict[int, Proc]:
    """Every process in /proc now (those that vanish while we read are skipped)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()  # comm may hold spaces and parentheses
        table[int(entry)] = Proc(int(entry), int(rest[1]), rest[0], int(rest[19]),
                                 cmd.replace(b"\0", b" ").decode(errors="replace").strip())
    return table


def descendants(root: int, table: dict[int, Proc]) -> list[Proc]:
    out, todo = [], [root]
    while todo:
        parent = todo.pop()
        for p in table.values():
            if p.ppid == parent:
                out.append(p)
                todo.append(p.pid)
    return out


def still_running(procs: list[Proc]) -> list[Proc]:
    """Those of `procs` still running: same pid and start time, not a zombie (exited; its
    reaper is whoever inherited it, which the test does not control)."""
    now = proc_table()
    return [p for p in procs
            if p.pid in now and now[p.pid].start == p.start and now[p.pid].state not in "ZX"]


def started_by(pid: int) -> int | None:
    """The gateway an age process was started by (its environment names it), else None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    mark = f"{PARENT_ENV}=".encode()
    return next((int(e[len(mark):]) for e in env if e.startswith(mark)), None)


def is_age(p: Proc) -> bool:
    return p.cmdline.split(" ", 1)[0].endswith("/age") or " age " in f" {p.cmdline} "


def workers_of(parent: int) -> list[Proc]:
    """Age processes started by `parent`, wherever they are now (reparented or not)."""
    return [p for p in proc_table().values()
            if p.state not in "ZX" and started_by(p.pid) == parent]


def leftovers(before: list[Proc], gateway: int, timeout: float = 20) -> list[Proc]:
    """Wait (bounded) for the killed gateway's processes to go; return those that stay."""
    deadline = time.monotonic() + timeout
    while True:
        left = still_running(before) + [p for p in workers_of(gateway) if p not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_encrypts_and_reports_errors(age_identity) -> None:
    """A 5 MB plaintext (a segment's size) round-trips through pyrage.decrypt; a bad recipient
    comes back as AgeWorkerError and the worker goes on serving; close() leaves no process."""
    worker = AgeWorker()
    try:
        plain = os.urandom(1 << 20) * 5
        ct = worker.encrypt(plain, [str(age_identity.to_public())])
        assert pyrage.decrypt(ct, [age_identity]) == plain
        with pytest.raises(AgeWorkerError, match="age1nonsense"):
            worker.encrypt(b"x", ["age1nonsense"])
        ct = worker.encrypt(b"after", [str(age_identity.to_public())])
        assert pyrage.decrypt(ct, [age_identity]) == b"after"
        pid = worker.pid  # the warm process waiting for the next request
    finally:
        worker.close()
    assert worker.pid is None and still_running([p for p in proc_table().values()
                                                 if p.pid == pid]) == []


def test_dead_worker_is_replaced(age_identity) -> None:
    """Killed (as the OOM killer would), the worker is replaced at the next request, which
    succeeds; the dead one is reaped."""
    worker = AgeWorker()
    try:
        worker.encrypt(b"one", [str(age_identity.to_public())])
        first = worker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        ct = worker.encrypt(b"two", [str(age_identity.to_public())])
        assert pyrage.decrypt(ct, [age_identity]) == b"two"
        assert worker.pid not in (None, first)
    finally:
        worker.close()


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {firmware!r})
    from dualrec.age_worker import AgeWorker
    w = AgeWorker()
    w.encrypt(b"x", [{recipient!r}])
    print(w.pid, flush=True)
    time.sleep(600)
""")


def test_worker_dies_with_a_killed_parent(tmp_path: Path, age_identity) -> None:
    """A process holding a worker is killed -9: the worker is gone too (parent-death signal,
    and EOF on its pipe)."""
    code = PARENT.format(firmware=str(ROOT / "firmware"), recipient=str(age_identity.to_public()))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        worker = [p for p in proc_table().values() if p.pid == worker_pid]
        assert worker and worker[0].ppid == parent.pid
    finally:
        parent.kill()
        parent.wait(10)
    wait_for(lambda: not still_running(worker), 10, "the worker to die with its parent")


def test_worker_leaves_on_eof_without_a_reader(age_identity) -> None:
    """Without the kernel's help (a gateway that died before the parent-death signal was set):
    its stdin reaches EOF and nobody reads its stdout, and age exits by itself."""
    worker = AgeWorker()
    try:
        worker.encrypt(b"x", [str(age_identity.to_public())])
        warm = worker._warm
        assert warm is not None and warm.stdin is not None and warm.stdout is not None
        warm.stdout.close()  # what the gateway's death does to both pipes
        warm.stdin.close()
        warm.wait(30)  # it leaves (how, EPIPE or SIGPIPE, is age's business)
    finally:
        worker.close()


def test_disk_error_while_streaming_is_raised_and_age_stopped(age_identity) -> None:
    """The output descriptor fails mid-stream (a full disk): the OSError is raised as the disk
    said it, and the process that was encrypting is not left behind."""
    worker = AgeWorker()
    r, w = os.pipe()
    os.close(r)  # writes to w fail with EPIPE, like a write to a full disk fails
    try:
        with pytest.raises(OSError):
            worker.encrypt_to([os.urandom(1 << 20) * 4], [str(age_identity.to_public())], w)
        assert worker.encrypt(b"still", [str(age_identity.to_public())])
    finally:
        os.close(w)
        worker.close()


@pytest.mark.timeout(300)
def test_kill9_of_the_gateway_leaves_no_process(tmp_path: Path) -> None:
    """Tried: a real `dualrec run` on the sim board (continuous recording, 1 s segments, so the
    age process is busy), killed -9 four times at random moments after its first age process
    started. Asserted: after each kill, every process that descended from the gateway is gone,
    no age process started by it is left, and none of them was a multiprocessing helper."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    counter = Counter(tmp_path / "run", small_board(tmp_path),
                      site_extra='[recording]\nmode = "continuous"\nsegment_ms = 1000\n')
    counter.prepare()
    kills = []
    try:
        counter.start_terminal(600, transactions=0, seed=1)
        for cycle in range(4):
            gateway = counter.start_gateway()
            wait_for(lambda gw=gateway: workers_of(gw.pid) or gw.poll() is not None, 90,
                     f"the gateway's age worker (cycle {cycle})")
            assert gateway.poll() is None, (counter.workdir / "gateway.log").read_text()[-2000:]
            time.sleep(rng.uniform(0, 2.0))  # a random moment: recording, encrypting, writing
            before = descendants(gateway.pid, proc_table())
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(30)
            kills.append(before)
            assert any(is_age(p) for p in before), before
            assert not [p for p in before if "multiprocessing" in p.cmdline], before
            left = leftovers(before, gateway.pid)
            assert left == [], f"cycle {cycle}: still running after the kill: {left}"
    finally:
        counter.cleanup()
    assert len(kills) == 4
