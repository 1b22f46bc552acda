"""`dualrec-sim`: the simulated counter, end to end (what `make run` runs).

Makes a device identity and a branch age identity, writes a site config, starts the simulated
teller terminal (a separate process behind a pseudo-terminal) and the gateway (a separate
process, `dualrec run`, on the sim board), lets the teller work through a few transactions,
stops the gateway cleanly, then verifies the chain, exports every session and measures the
audio/video/log sync at the clapper instants. `Counter` is also the harness the end-to-end
tests drive (kill -9, restart).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from dualrec.config import load_board
from dualrec_tools.keys import write_branch_identity, write_device_key
from dualrec_tools.export import ExportError, export_session, load_identities
from dualrec_tools.sync import SyncReport, measure_sync
from dualrec_tools.verify import Report, load_device_key, verify_dir

DEVICE_ID = "sim-0001"


@dataclass
class Counter:
    workdir: Path
    board: Path
    site_extra: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def keys(self) -> Path:
        return self.workdir / "keys"

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def site(self) -> Path:
        return self.workdir / "site.toml"

    @property
    def link(self) -> Path:
        return self.workdir / "ttySIM"

    @property
    def clap_period_ms(self) -> int:
        sim = load_board(self.board).sim
        return sim.clap_period_ms if sim else 7000

    def prepare(self) -> None:
        """A fresh device: new keys, empty spool and chain state."""
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        write_device_key(self.keys, DEVICE_ID, force=False)
        recipient = write_branch_identity(self.keys, force=False)
        self.site.write_text(f"""# written by dualrec-sim
[device]
id = "{DEVICE_ID}"
key = "keys/device.key"

[oplog]
port = "{self.link}"
encoding = "gb18030"

[seal]
recipients = ["{recipient}"]

[spool]
dir = "spool"
state = "state/state.db"
{self.site_extra}
""")

    def start_terminal(self, duration_s: float, transactions: int = 3,
                       seed: int | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "dualrec.sim.terminal", "--link", str(self.link),
               "--duration-s", str(duration_s), "--clap-period-ms", str(self.clap_period_ms),
               "--transactions", str(transactions), "--wait-reader-s", "30", "--hold"]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if not ready.startswith("READY"):
            proc.kill()
            raise RuntimeError(f"terminal did not start: {ready!r} {proc.stderr.read()}")
        return proc

    def start_gateway(self, echo: bool = False) -> subprocess.Popen:
        log = (self.workdir / "gateway.log").open("a")
        cmd = [sys.executable, "-m", "dualrec.cli", "run", "--board", str(self.board),
               "--site", str(self.site), "-v"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE if echo else log,
                                text=True)
        self.procs.append(proc)
        if echo:
            threading.Thread(target=_echo, args=(proc, log), daemon=True).start()
        return proc

    def wait_terminal_done(self, proc: subprocess.Popen, timeout: float) -> None:
        """Wait for the terminal's script to end (it prints DONE and holds its line open)."""
        assert proc.stdout is not None
        done = threading.Event()

        def read() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                if line.startswith("DONE"):
                    done.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout):
            raise RuntimeError(f"terminal script did not finish within {timeout:.0f} s")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
             timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)

    def verify(self) -> Report:
        return verify_dir(self.spool, [load_device_key(self.keys / "device.pub")])

    def export(self, session: str) -> tuple[Path, SyncReport]:
        out = export_session(self.spool, session, self.workdir / "export",
                             load_identities(self.keys / "branch.agekey"),
                             [load_device_key(self.keys / "device.pub")])
        records = [json.loads(line) for line in out.oplog.read_text().splitlines() if line]
        return out.mkv, measure_sync(out.mkv, records, out.origin_ns)


def _echo(proc: subprocess.Popen, log) -> None:
    """Copy the gateway's log to the file, and its 'sealed' lines to the screen."""
    assert proc.stderr is not None
    for line in proc.stderr:
        log.write(line)
        log.flush()
        if " sealed seq " in line or "ERROR" in line or "WARNING" in line:
            click.echo("  gateway: " + line.split(" ", 3)[-1].rstrip())


def summarize(counter: Counter, report: Report, syncs: dict[str, SyncReport],
              exports: dict[str, Path]) -> list[str]:
    headers = [hf.header for hf in report.chain.values() if hf.header is not None]
    frames = sum(h["streams"]["video"]["frames"] for h in headers)
    drops = sum(h["streams"]["video"]["drops"] for h in headers)
    samples = sum(h["streams"]["audio"]["samples"] for h in headers)
    rate = max((h["streams"]["audio"]["rate"] for h in headers), default=0)
    lines = sum(h["streams"]["oplog"]["lines"] for h in headers)
    flagged = sum(h["streams"]["oplog"]["flagged"] for h in headers)
    complete = sum(1 for s in report.sessions if s.status == "complete")
    out = [
        f"sessions        {len(report.sessions)} ({complete} complete)",
        f"segments        {report.segments} sealed, seq {report.first_seq}..{report.last_seq}",
        f"video frames    {frames} ({drops} dropped)",
        f"audio           {samples / rate if rate else 0:.1f} s at {rate} Hz",
        f"log lines       {lines} ({flagged} flagged: garbage kept raw)",
    ]
    worst = [s.max_abs_offset_us for s in syncs.values() if s.max_abs_offset_us is not None]
    claps = sum(len(s.claps) for s in syncs.values())
    out.append(f"sync            {claps} claps, worst offset "
               + (f"{max(worst) / 1000:.1f} ms" if worst else "n/a")
               + " (limit: one frame, 33 ms)")
    for session, sync in syncs.items():
        out.append(f"  {session}:")
        out.extend(f"    {line}" for line in sync.lines())
    out.append(f"sealed segments {counter.spool}/")
    out.extend(f"exported        {p}" for p in exports.values())
    out.append(f"verify          {report.verdict()}")
    out.extend(f"  {p}" for p in report.problems)
    return out


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("run"), show_default=True)
@click.option("--board", type=click.Path(exists=True, path_type=Path),
              default=Path("boards/sim.toml"), show_default=True)
@click.option("--duration", type=float, default=30, show_default=True,
              help="How long the teller works, in seconds.")
@click.option("--transactions", type=int, default=3, show_default=True)
def main(workdir: Path, board: Path, duration: float, transactions: int) -> None:
    """Run the box on the simulated counter and report what it recorded."""
    counter = Counter(workdir.resolve(), board.resolve())
    click.echo(f"dualrec simulated counter: board {board}, {duration:.0f} s, "
               f"{transactions} transactions, work dir {workdir}/")
    counter.prepare()
    click.echo(f"  provisioned device {DEVICE_ID}: keys in {counter.keys}/")
    try:
        terminal = counter.start_terminal(duration, transactions)
        click.echo(f"  teller terminal on {counter.link} (a pseudo-terminal)")
        gateway = counter.start_gateway(echo=True)
        click.echo(f"  gateway running (pid {gateway.pid}); log in {workdir}/gateway.log")
        counter.wait_terminal_done(terminal, duration + 40)
        time.sleep(0.5)  # let the last post-roll run out before the orderly stop
        code = counter.stop(gateway)
        counter.stop(terminal)
        if code != 0:
            raise click.ClickException(f"gateway exited with {code}; see {workdir}/gateway.log")
    finally:
        counter.cleanup()
    report = counter.verify()
    syncs: dict[str, SyncReport] = {}
    exports: dict[str, Path] = {}
    for s in report.sessions:
        try:
            exports[s.session], syncs[s.session] = counter.export(s.session)
        except ExportError as exc:
            click.echo(f"  export of {s.session} refused: {exc}", err=True)
    click.echo("")
    for line in summarize(counter, report, syncs, exports):
        click.echo(line)
    if not report.passed():
        sys.exit(1)


if __name__ == "__main__":
    main()
