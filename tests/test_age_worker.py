"""The age worker: encrypts what pyrage would, survives its own death, and never outlives the
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

from dualrec.age_worker import WORKER_MODULE, AgeWorker, AgeWorkerError
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


def workers_of(parent: int) -> list[Proc]:
    """Age workers started by `parent` (their command line names it), wherever they are now."""
    return [p for p in proc_table().values()
            if WORKER_MODULE in p.cmdline and f"--parent {parent}" in p.cmdline
            and p.state not in "ZX"]


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
    comes back as AgeWorkerError and the same worker goes on serving."""
    worker = AgeWorker()
    try:
        plain = os.urandom(1 << 20) * 5
        ct = worker.encrypt(plain, [str(age_identity.to_public())])
        assert pyrage.decrypt(ct, [age_identity]) == plain
        pid = worker.pid
        with pytest.raises(AgeWorkerError, match="RecipientError"):
            worker.encrypt(b"x", ["age1nonsense"])
        ct = worker.encrypt(b"after", [str(age_identity.to_public())])
        assert pyrage.decrypt(ct, [age_identity]) == b"after" and worker.pid == pid
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


def test_worker_leaves_on_eof_and_on_a_wrong_parent(tmp_path: Path) -> None:
    """Without the kernel's help: the worker exits when its stdin reaches EOF, and at once when
    the parent it was started for is not its parent (it died before prctl took effect)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "firmware")}
    w = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--parent", str(os.getpid())],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert w.stdin is not None
    w.stdin.close()
    assert w.wait(30) == 0
    orphan = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--parent", "1"],
                            stdin=subprocess.PIPE, env=env, timeout=30)
    assert orphan.returncode == 0


@pytest.mark.timeout(300)
def test_kill9_of_the_gateway_leaves_no_process(tmp_path: Path) -> None:
    """Tried: a real `dualrec run` on the sim board (continuous recording, 1 s segments, so the
    age worker is busy), killed -9 four times at random moments after its worker started.
    Asserted: after each kill, every process that descended from the gateway is gone, no age
    worker started by it is left, and none of them was a multiprocessing helper."""
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
            assert any(WORKER_MODULE in p.cmdline for p in before), before
            assert not [p for p in before if "multiprocessing" in p.cmdline], before
            left = leftovers(before, gateway.pid)
            assert left == [], f"cycle {cycle}: still running after the kill: {left}"
    finally:
        counter.cleanup()
    assert len(kills) == 4
