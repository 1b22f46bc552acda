"""`dualrec-sim`: the simulated counter, end to end (what `make run` runs).

Makes the branch's keys, starts the branch receiver on loopback (a separate process), makes the
device's provisioning bundle with a token from the receiver's admin API and enrolls it the way a
box does on its first boot (`dualrec enroll`, a separate process), starts the simulated teller
terminal (a separate process behind a pseudo-terminal) and the gateway (a separate process,
`dualrec run`, on the sim board), lets the teller work through a few transactions while segments
flow to the receiver, stops everything cleanly, then verifies what the receiver holds, exports
every session and measures the audio/video/log sync at the clapper instants. `Counter` is also
the harness the end-to-end tests drive (kill -9, restart, receiver faults).
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
from dualrec_tools.export import ExportError, export_session, load_identities
from dualrec_tools.keys import DEFAULT_RECEIVER_NAMES, write_branch
from dualrec_tools.localbox import provision
from dualrec_tools.provision import admin_headers, make_bundle, request_token
from dualrec_tools.receiver.enrollment import EnrollmentBook
from dualrec_tools.sync import SyncReport, measure_sync
from dualrec_tools.verify import Report, load_device_key, verify_dir

DEVICE_ID = "sim-0001"


@dataclass
class Counter:
    workdir: Path
    board: Path
    site_extra: str = ""
    with_receiver: bool = False
    bandwidth_bps: int | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    receiver_url: str = ""
    admin_url: str = ""
    enroll_url: str = ""
    admin_token: str = ""

    @property
    def branch(self) -> Path:
        return self.workdir / "branch"

    @property
    def keys(self) -> Path:
        """The device's directory: its keys, certificates and site config."""
        return self.workdir / "device"

    @property
    def identity(self) -> Path:
        return self.branch / "branch.agekey"

    @property
    def spool(self) -> Path:
        return self.keys / "spool"

    @property
    def received(self) -> Path:
        return self.workdir / "receiver" / "devices" / DEVICE_ID

    @property
    def site(self) -> Path:
        return self.keys / "site.toml"

    @property
    def link(self) -> Path:
        return self.workdir / "ttySIM"

    @property
    def clap_period_ms(self) -> int:
        sim = load_board(self.board).sim
        return sim.clap_period_ms if sim else 7000

    def prepare(self) -> None:
        """A fresh branch and device: new keys, empty spool, chain state and receiver."""
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        write_branch(self.branch, "sim-branch", DEFAULT_RECEIVER_NAMES, force=False)
        if self.with_receiver:
            self.start_receiver()
            # The branch IT side: an admin token on the receiver host, a bundle with a
            # single-use token; then the box's own first boot makes its keys and enrolls.
            with EnrollmentBook(self.workdir / "receiver") as book:
                self.admin_token = book.add_admin_token("dualrec-sim")
            token = request_token(self.admin_url, self.admin_token, DEVICE_ID)
            make_bundle(self.branch, DEVICE_ID, self.receiver_url, self.keys, token,
                        enroll_url=self.enroll_url, oplog_port=str(self.link),
                        bandwidth_bps=self.bandwidth_bps, site_extra=self.site_extra)
            done = subprocess.run([sys.executable, "-m", "dualrec.cli", "enroll", "--site",
                                   str(self.site), "--wait", "30"], capture_output=True,
                                  text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"dualrec enroll failed ({done.returncode}): "
                                   f"{done.stderr.strip()}")
            click.echo(f"  box: {done.stdout.strip()}")
        else:  # a box with no branch server: keys made offline, no [uplink] section at all
            provision(self.branch, DEVICE_ID, "https://127.0.0.1:1", self.keys,
                      oplog_port=str(self.link), site_extra=self.site_extra)
            text = self.site.read_text()
            self.site.write_text(text[:text.index("[uplink]")] + self.site_extra)

    def start_receiver(self, port: int = 0) -> subprocess.Popen:
        """The branch receiver as its own process; blocks until it listens. Pass the port of
        the previous receiver to restart it where the box expects it."""
        listen = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "dualrec_tools.receiver.cli", "serve",
               "--data", str(self.workdir / "receiver"), "--keys", str(self.branch),
               "--listen", listen, "--admin-listen", "127.0.0.1:0",
               "--enroll-listen", "127.0.0.1:0"]
        log = (self.workdir / "receiver.log").open("a")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING"):
            proc.kill()
            raise RuntimeError(f"receiver did not start: {line!r}; see receiver.log")
        _, self.receiver_url, _, self.admin_url = line.split()
        self.enroll_url = proc.stdout.readline().split()[1]  # ENROLL https://HOST:PORT
        self.receiver_proc = proc
        return proc

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

    def store(self) -> Path:
        """Where the sealed segments are now: the receiver's copy, or the box's spool."""
        return self.received if self.with_receiver else self.spool

    def verify(self, directory: Path | None = None) -> Report:
        # with the branch identity: every payload's content is checked against its header too
        return verify_dir(directory or self.store(), [load_device_key(self.keys / "device.pub")],
                          identities=load_identities(self.identity))

    def wait_spool_drained(self, timeout: float) -> bool:
        """Wait until the box holds no sealed segment (all acknowledged by receipts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not list(self.spool.glob("*.hdr.json")):
                return True
            time.sleep(0.2)
        return False

    def export(self, session: str) -> tuple[Path, SyncReport]:
        out = export_session(self.store(), session, self.workdir / "export",
                             load_identities(self.identity),
                             [load_device_key(self.keys / "device.pub")])
        records = [json.loads(line) for line in out.oplog.read_text().splitlines() if line]
        return out.mkv, measure_sync(out.mkv, records, out.origin_ns)


def _echo(proc: subprocess.Popen, log) -> None:
    """Copy the gateway's log to the file, and its 'sealed' lines to the screen."""
    assert proc.stderr is not None
    for line in proc.stderr:
        log.write(line)
        log.flush()
        if any(w in line for w in (" sealed seq ", "acknowledged", "ERROR", "WARNING")):
            click.echo("  gateway: " + line.split(" ", 3)[-1].rstrip())


def receiver_status(counter: Counter) -> dict:
    import httpx

    r = httpx.get(f"{counter.admin_url}/admin/status", headers=admin_headers(counter.admin_token),
                  timeout=10)
    r.raise_for_status()
    return r.json()


def summarize(counter: Counter, report: Report, syncs: dict[str, SyncReport],
              exports: dict[str, Path], status: dict | None = None) -> list[str]:
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
    left = len(list(counter.spool.glob("*.hdr.json")))
    out.append(f"box spool       {counter.spool}/: {left} segments waiting for a receipt")
    if status is not None:
        out.append(f"receiver        {counter.receiver_url}: holds {counter.received}/")
        dev = status.get("devices", {}).get(DEVICE_ID, {})
        out.append(f"                {dev.get('headers', 0)} headers, {dev.get('payloads', 0)} "
                   f"payloads, highest seq {dev.get('highest_seq')}, waiting for payload "
                   f"{len(dev.get('waiting', []))}, gaps {dev.get('gaps') or 'none'}, "
                   f"problems {len(dev.get('problems', []))}")
    out.extend(f"exported        {p}" for p in exports.values())
    out.append(f"verify          {report.verdict()} (dualrec-tool verify {counter.store()})")
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
    counter = Counter(workdir.resolve(), board.resolve(), with_receiver=True)
    click.echo(f"dualrec simulated counter: board {board}, {duration:.0f} s, "
               f"{transactions} transactions, work dir {workdir}/")
    counter.prepare()
    click.echo(f"  branch keys in {counter.branch}/; receiver on {counter.receiver_url}")
    click.echo(f"  provisioned and enrolled device {DEVICE_ID}: {counter.keys}/")
    try:
        terminal = counter.start_terminal(duration, transactions)
        click.echo(f"  teller terminal on {counter.link} (a pseudo-terminal)")
        gateway = counter.start_gateway(echo=True)
        click.echo(f"  gateway running (pid {gateway.pid}); log in {workdir}/gateway.log")
        counter.wait_terminal_done(terminal, duration + 40)
        time.sleep(3)  # the last post-roll and its seal
        if not counter.wait_spool_drained(60):
            click.echo("  the spool did not drain within 60 s: segments stay on the box")
        code = counter.stop(gateway)
        counter.stop(terminal)
        status = receiver_status(counter)
        counter.stop(counter.receiver_proc)
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
    for line in summarize(counter, report, syncs, exports, status):
        click.echo(line)
    if not report.passed():
        sys.exit(1)


if __name__ == "__main__":
    main()
