"""`dualrec`: the gateway's command line (run, check-config)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from dualrec.config import ConfigError, load_board, load_site
from dualrec.devices.base import DeviceError

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
    """Validate the board profile and site config; exit non-zero with the reason if invalid."""
    try:
        board = load_board(board_path)
        site = load_site(site_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{board_path}: ok (board {board.board.name})")
    click.echo(f"{site_path}: ok (device {site.device.id}, spool {site.spool.dir})")


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
        click.echo(c.line())
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
    # Handlers first: a stop asked for while the gateway is still importing is honoured.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from dualrec.gateway import Gateway

    try:
        gw = Gateway(load_board(board_path), load_site(site_path))
    except (ConfigError, DeviceError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        stats = gw.run(stop, duration)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sealed {stats.sealed_total} segments")


if __name__ == "__main__":
    main()
