"""`dualrec`: the gateway's command line (run, check-config, enroll, diag, chrony-conf,
config-doc)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from dualrec.config import ConfigError, load_board, load_site
from dualrec.devices.base import DeviceError
from dualrec.shield import shield

BOARD = click.option("--board", "board_path", type=click.Path(path_type=Path), required=True,
                     help="Board profile TOML (boards/<name>.toml).")
SITE = click.option("--site", "site_path", type=click.Path(path_type=Path), required=True,
                    help="Site config TOML written at provisioning.")


@click.group()
def main() -> None:
    """dualrec gateway: record, seal and spool the counter's sessions."""


@main.command("check-config")
@BOARD
@SITE
def check_config(board_path: Path, site_path: Path) -> None:
    """Check everything `run` needs: both files, the device key, the uplink's certificates and
    keys, the spool and state directories and free space. One line per problem; exit 78
    (EX_CONFIG) for a configuration or key problem, 1 for one of the box's disk only.

    Run it as the service user (sudo -u dualrec ...): root may write where the service cannot.
    """
    from dualrec.preflight import EX_CONFIG, check_site, exit_status

    errors: list[str] = []  # both files are read, so one run shows every problem
    board = site = None
    try:
        board = load_board(board_path)
    except ConfigError as exc:
        errors += str(exc).splitlines()
    try:
        site = load_site(site_path)
    except ConfigError as exc:
        errors += str(exc).splitlines()
    problems = [] if site is None else check_site(site)
    for line in errors + [p.line(site_path) for p in problems]:
        click.echo(line, err=True)
    if board is not None:
        click.echo(f"{board_path}: ok (board {board.board.name})")
    if site is not None and not problems:
        click.echo(f"{site_path}: ok (device {site.device.id}, spool {site.spool.dir})")
    status = EX_CONFIG if errors else exit_status(problems)
    if status:
        raise SystemExit(status)


@main.command("chrony-conf")
@BOARD
@click.option("--server", default="", help="The branch NTP server (name or address); "
              "without it the server line is a placeholder to fill in.")
def chrony_conf(board_path: Path, server: str) -> None:
    """Print the board's chrony fragment (for /etc/chrony/conf.d/dualrec.conf): the PPS
    refclock only where the profile declares a PPS line."""
    from dualrec.chronyconf import render
    from dualrec.preflight import EX_CONFIG

    try:
        text = render(load_board(board_path), server)
    except (ConfigError, ValueError) as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EX_CONFIG) from None
    click.echo(text, nl=False)


@main.command("config-doc")
def config_doc() -> None:
    """Print the configuration reference (docs/config.md), generated from the config models:
    every key of the board profile and the site config with type, default, range, example."""
    from dualrec.config_doc import render

    click.echo(render(), nl=False)


@main.command()
@SITE
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path), default=None,
              help="The provisioning bundle's enroll.json [default: beside --site].")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=600.0,
              show_default=True,
              help="Seconds to keep trying while the receiver cannot be reached.")
def enroll(site_path: Path, bundle_path: Path | None, wait_s: float) -> None:
    """First boot: make this box's signing and TLS keys here (0600), send a certificate request
    with the bundle's one-time token to the receiver, write the certificate it issues.

    Run it as the service user (runuser -u dualrec --), so the keys are the service's. Exit
    status: 0 enrolled (or already), 1 refused by the receiver (a new bundle is needed), 75
    receiver unreachable within --wait (try again later), 78 configuration or bundle problem.
    """
    from dualrec.enroll import (
        BUNDLE_FILE,
        EX_UNREACHABLE,
        Bundle,
        EnrollFailed,
        Unreachable,
    )
    from dualrec.enroll import enroll as enroll_box
    from dualrec.preflight import EX_CONFIG

    try:
        site = load_site(site_path)
        bundle = Bundle.load(bundle_path or site_path.parent / BUNDLE_FILE)
    except (ConfigError, EnrollFailed) as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EX_CONFIG) from None
    try:
        done = enroll_box(site, bundle, wait_s=wait_s)
    except Unreachable as exc:
        click.echo(f"receiver unreachable: {exc}", err=True)
        raise SystemExit(EX_UNREACHABLE) from None
    except EnrollFailed as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EX_CONFIG if not exc.word else 1) from None
    except OSError as exc:
        click.echo(f"cannot write the keys: {exc}", err=True)
        raise SystemExit(EX_CONFIG) from None
    state = "already enrolled" if done.already else "enrolled"
    click.echo(f"{site.device.id}: {state}; certificate {done.cert} valid until "
               f"{done.not_after:%Y-%m-%d}")


@main.command()
@BOARD
@SITE
def diag(board_path: Path, site_path: Path) -> None:
    """Check every device of the box: PASS or FAIL with the reason."""
    from dualrec.diag import run_all

    try:
        board, site = load_board(board_path), load_site(site_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    checks = run_all(board, site)
    for c in checks:
        click.echo(shield(c.line()))
    failed = [c.name for c in checks if not c.ok]
    click.echo(f"{len(checks) - len(failed)} passed, {len(failed)} failed"
               + (f": {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


@main.command()
@BOARD
@SITE
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("-v", "--verbose", is_flag=True)
def run(board_path: Path, site_path: Path, duration: float | None, verbose: bool) -> None:
    """Run the gateway until SIGTERM/SIGINT (or --duration)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    from dualrec import shield as number_shield

    number_shield.install()  # no customer number in the journal
    # Handlers first: a stop asked for while the gateway is still importing is honoured.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from dualrec.preflight import EX_CONFIG, check_device_key

    # A config error or a missing or wrong device key: restarting cannot mend it. One line
    # each, exit 78, and the unit's RestartPreventExitStatus=78 stops the restart loop.
    try:
        board, site = load_board(board_path), load_site(site_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EX_CONFIG) from None
    number_shield.configure(site.shield.patterns)
    key_problems = check_device_key(site)
    if key_problems:
        for p in key_problems:
            click.echo(p.line(site_path), err=True)
        raise SystemExit(EX_CONFIG)
    from dualrec.gateway import Gateway

    try:
        gw = Gateway(board, site)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        stats = gw.run(stop, duration)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sealed {stats.sealed_total} segments")
    if gw.fatal:
        # A part could not recover: a non-zero exit, so systemd restarts the whole process.
        from dualrec.gateway import EXIT_FATAL

        click.echo(f"error: {gw.fatal}", err=True)
        raise SystemExit(EXIT_FATAL)


if __name__ == "__main__":
    main()
