"""`dualrec-web`: serve the branch's pages; manage their local accounts."""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import os
import socket
import ssl
import sys
from datetime import UTC, tzinfo
from pathlib import Path

import click
from aiohttp import web

from dualrec import shield
from dualrec_tools.export import ExportError, load_identities
from dualrec_tools.web.accounts import ROLES, AccountError, Accounts
from dualrec_tools.web.app import WebConfig, make_app
from dualrec_tools.web.archive import ArchiveError

STATE = click.option("--state", "state_dir", required=True, type=click.Path(path_type=Path),
                     help="The service's own directory: accounts (web.db), audit.log, cache/.")


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "0.0.0.0"  # unknown: warn as for any non-loopback address


def _tz(name: str | None) -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not name:
        from datetime import datetime

        return datetime.now().astimezone().tzinfo or UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"{name!r} is not a time zone name") from None


def _logging(log_file: Path | None) -> None:
    handler: logging.Handler = (logging.handlers.WatchedFileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    shield.install(root)  # every record masked before it is written


@click.group()
def main() -> None:
    """The dualrec branch web pages: dashboard and review (docs/review.md)."""


@main.command("serve")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="The receiver's data directory (read only).")
@STATE
@click.option("--identity", required=True, type=click.Path(path_type=Path),
              help="The branch age identity (decrypts the segments).")
@click.option("--listen", default="127.0.0.1:8445", show_default=True)
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path), default=None)
@click.option("--tz", "tz_name", default=None, help="The branch's time zone (default: local).")
@click.option("--alert-after", default=300.0, show_default=True,
              help="Seconds of silence after which a box is shown red.")
@click.option("--refresh", default=5.0, show_default=True, help="Dashboard refresh, seconds.")
@click.option("--unmask-minutes", default=10.0, show_default=True)
@click.option("--counter", "counters", multiple=True, metavar="DEVICE=NAME",
              help="A counter's name for a device (repeatable).")
@click.option("--log-file", type=click.Path(path_type=Path), default=None)
def serve(data_dir: Path, state_dir: Path, identity: Path, listen: str, tls_cert: Path | None,
          tls_key: Path | None, tz_name: str | None, alert_after: float, refresh: float,
          unmask_minutes: float, counters: tuple[str, ...], log_file: Path | None) -> None:
    """Serve the pages until interrupted."""
    os.umask(0o077)  # everything this service writes is its own: accounts, audit, decrypted media
    _logging(log_file)
    host, port = _hostport(listen)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    ssl_ctx = None
    if tls_cert and tls_key:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_ctx.load_cert_chain(tls_cert, tls_key)
    names = {}
    for c in counters:
        dev, sep, name = c.partition("=")
        if not sep:
            raise click.BadParameter(f"{c!r} is not DEVICE=NAME")
        names[dev] = name
    try:
        ids = load_identities(identity)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    config = WebConfig(data_dir=data_dir, state_dir=state_dir, identities=ids, tz=_tz(tz_name),
                       tls=ssl_ctx is not None, alert_after_s=alert_after, refresh_s=refresh,
                       unmask_s=unmask_minutes * 60, counters=names)
    try:
        app = make_app(config)
    except ArchiveError as exc:
        raise click.ClickException(str(exc)) from None
    log = logging.getLogger("dualrec.web")
    if identity.stat().st_mode & 0o077:
        log.warning("%s is readable by others than its owner: it decrypts every recording "
                    "(chmod 600)", identity)
    if ssl_ctx is None and not ipaddress.ip_address(_resolve(host)).is_loopback:
        log.warning("serving plain HTTP on %s: passwords and session cookies cross the LAN "
                    "in clear and cookies cannot be Secure; give --tls-cert/--tls-key", host)
    log.info("serving on %s:%d (%s)", host, port, "https" if ssl_ctx else "http")
    web.run_app(app, host=host, port=port, ssl_context=ssl_ctx, print=None,
                access_log_format='%a "%r" %s %b')


@main.group()
def user() -> None:
    """Local accounts."""


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--can-unmask", is_flag=True, help="May unmask customer numbers (with a reason).")
@click.option("--replace", is_flag=True, help="Change an existing account.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@STATE
def user_add(name: str, role: str, can_unmask: bool, replace: bool, password_stdin: bool,
             state_dir: Path) -> None:
    """Add an account (the password is asked for, or read from standard input)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        acc = Accounts(state_dir / "web.db").add(name, role, password, can_unmask=can_unmask,
                                                  replace=replace)
    except AccountError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{acc.name}: {acc.role}{', can unmask' if acc.can_unmask else ''}")


@user.command("remove")
@click.argument("name")
@STATE
def user_remove(name: str, state_dir: Path) -> None:
    """Remove an account (its open login sessions end at the service's restart)."""
    if not Accounts(state_dir / "web.db").remove(name):
        raise click.ClickException(f"no account {name}")


@user.command("list")
@STATE
def user_list(state_dir: Path) -> None:
    for acc in Accounts(state_dir / "web.db").list():
        click.echo(f"{acc.name}\t{acc.role}\t{'can-unmask' if acc.can_unmask else ''}")


if __name__ == "__main__":
    main()
