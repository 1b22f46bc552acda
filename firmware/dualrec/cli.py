"""`dualrec`: the gateway's command line (run, check-config, diag, chrony-conf,
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
