"""`dualrec-receiver`: run the branch receiver, enroll a device, print what it holds; make
admin and enrollment tokens and revoke a device's certificate on the receiver host
(enroll_cli.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any

import click

from dualrec_tools.receiver.alerts import AlertConfig
from dualrec_tools.receiver.limits import LimitError, Limits
from dualrec_tools.receiver.retention import RetentionPolicy
from dualrec_tools.receiver.runtime import ReceiverConfig, serve
from dualrec_tools.receiver.store import EnrollError, ReceiverStore
from dualrec_tools.verify import KeyFileError, load_device_key

DATA = click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
                    help="The receiver's data directory (receiver.db and devices/).")


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group()
def main() -> None:
    """The dualrec branch receiver (docs/UPLOAD.md)."""


@main.command("serve")
@DATA
@click.option("--keys", "keys_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Holds ca.crt, receiver.crt, receiver.key, receipt.key.")
@click.option("--listen", default="127.0.0.1:8443", show_default=True,
              help="HOST:PORT of the mutual-TLS upload API (port 0: any free port).")
@click.option("--admin-listen", default="127.0.0.1:8444", show_default=True,
              help="HOST:PORT of the plain-HTTP admin API; keep it on loopback.")
@click.option("--max-payload-mb", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--receiver-id", default=None, help="Name in receipts [default: receiver.crt CN].")
@click.option("--limit", "limit_args", multiple=True, metavar="NAME=VALUE",
              help="Override a limit (docs/UPLOAD.md, Limits), e.g. max_connections=2000.")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="A listener of its own for /metrics (it is on the admin listener anyway).")
@click.option("--log-file", default=None, type=click.Path(path_type=Path),
              help="Also log to this file (0640, rotated at 10 MB, 5 kept) [default: stderr].")
@click.option("--keep-days", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Retention: delete verified segments this many days after their session "
                   "(legal holds excepted; every deletion in deletion-log.jsonl) [default: "
                   "keep everything].")
@click.option("--webhook", default=None, metavar="URL",
              help="POST alert transitions as JSON to URL (sites without Prometheus).")
@click.option("--enroll-listen", default="127.0.0.1:8445", show_default=True,
              help="HOST:PORT of the enrollment API (TLS, no client certificate; on only when "
                   "--keys holds ca.key). Boxes reach it on their first boot.")
def serve_cmd(data_dir: Path, keys_dir: Path, listen: str, admin_listen: str,
              max_payload_mb: int, receiver_id: str | None, limit_args: tuple[str, ...],
              metrics_listen: str | None, log_file: Path | None, keep_days: float | None,
              webhook: str | None, enroll_listen: str) -> None:
    """Serve until SIGTERM; print LISTENING https://HOST:PORT admin http://HOST:PORT, then
    ENROLL https://HOST:PORT."""
    os.umask(0o027)  # segments, receiver.db, logs: never world-readable
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:  # bounded on disk whatever arrives
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=10 << 20,
                                                             backupCount=5))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dualrec import shield

    shield.install()  # nothing a client sends puts a customer number into the log
    host, port = _hostport(listen)
    admin_host, admin_port = _hostport(admin_listen)
    metrics_host, metrics_port = _hostport(metrics_listen) if metrics_listen else (None, 0)
    enroll_host, enroll_port = _hostport(enroll_listen)
    config = ReceiverConfig(data_dir=data_dir, keys_dir=keys_dir, host=host, port=port,
                            admin_host=admin_host, admin_port=admin_port,
                            max_payload=max_payload_mb * 1024 * 1024, receiver_id=receiver_id,
                            limits=parse_limits(limit_args), metrics_host=metrics_host,
                            metrics_port=metrics_port,
                            alerts=AlertConfig(webhook) if webhook else None,
                            retention=RetentionPolicy(keep_days) if keep_days else None,
                            enroll_host=enroll_host, enroll_port=enroll_port)
    try:
        serve(config)
    except LimitError as exc:
        raise click.ClickException(str(exc)) from None


def parse_limits(args: tuple[str, ...]) -> Limits:
    """NAME=VALUE pairs over the defaults of limits.Limits."""
    kinds = {f.name: f.type for f in dataclasses.fields(Limits)}
    changes: dict[str, float | int] = {}
    for arg in args:
        name, _, value = arg.partition("=")
        if name not in kinds:
            raise click.BadParameter(f"unknown limit {name!r} (one of {', '.join(kinds)})")
        try:
            changes[name] = float(value) if kinds[name] in (float, "float") else int(value)
        except ValueError:
            raise click.BadParameter(f"{arg!r}: not a number") from None
        if changes[name] <= 0:
            raise click.BadParameter(f"{arg!r}: must be positive")
    return dataclasses.replace(Limits(), **changes)


@main.command()
@DATA
@click.option("--device-id", required=True)
@click.option("--signing-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="The device's Ed25519 public key (device.pub).")
@click.option("--cert", required=True, type=click.Path(exists=True, path_type=Path),
              help="The device's TLS client certificate (CN = device id).")
@click.option("--keys", "keys_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The receiver's keys (ca.crt): the certificate must be one its CA issued.")
@click.option("--replace", is_flag=True, help="Replace the keys of an enrolled device.")
def enroll(data_dir: Path, device_id: str, signing_key: Path, cert: Path, keys_dir: Path,
           replace: bool) -> None:
    """Enroll a device by hand (works while the receiver runs); boxes normally enroll
    themselves with a token (`enroll-token`, then `dualrec enroll` on the box)."""
    from dualrec_tools.receiver.enrollment import EnrollmentBook, EnrollRefused, Issuer

    try:
        key = load_device_key(signing_key)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if key.device is not None and key.device != device_id:
        raise click.ClickException(f"{signing_key} is the key of {key.device}, not {device_id}")
    with ReceiverStore(data_dir) as store, EnrollmentBook(data_dir) as book:
        try:
            checked = Issuer.from_keys_dir(keys_dir).check_client_cert(cert.read_bytes(),
                                                                       device_id)
            old = store.device(device_id)
            device = store.enroll(device_id, signing_key.read_bytes(), cert.read_bytes(),
                                  replace=replace)
        except (EnrollError, EnrollRefused) as exc:
            raise click.ClickException(str(exc)) from None
        if old is None or old.cert_sha256 != device.cert_sha256 or \
                old.signing_key_pem != device.signing_key_pem:
            book.audit.write(f"cli:{_user()}", "enroll" if old is None else "replace",
                             device_id, device.cert_sha256,
                             f"by hand, certificate until {checked.not_valid_after_utc:%Y-%m-%d}")
    click.echo(f"enrolled {device.id} (certificate sha256 {device.cert_sha256})")


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@main.command()
@DATA
@click.option("--device-id", required=True)
@click.option("--session", default=None, help="One session only [default: the whole device].")
@click.option("--release", is_flag=True, help="Lift the hold instead of setting it.")
@click.option("--note", default="", help="Why (a case number; no customer data).")
def hold(data_dir: Path, device_id: str, session: str | None, release: bool, note: str) -> None:
    """Set or lift a legal hold: retention deletes nothing held (works while serving)."""
    with ReceiverStore(data_dir) as store:
        store.set_hold(device_id, session, not release, note)
        for h in store.holds():
            click.echo(f"held: {h['device']} {h['session'] or '(all sessions)'} {h['note']}")


def _utc(ns: int | None) -> str:
    if ns is None:
        return "never"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ranges(gaps: list[list[int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in gaps) or "none"


def _describe(st: dict[str, Any]) -> list[str]:
    lines = [f"{st['device']}: {'enrolled' if st['enrolled'] else 'NOT ENROLLED'}, "
             f"highest seq {st['highest_seq']}, {st['headers']} headers, "
             f"{st['payloads']} payloads, last contact {_utc(st['last_contact_utc_ns'])}"]
    waiting = ", ".join(f"{w['seq']} ({w['waited_s']} s)" for w in st["waiting"]) or "none"
    lines.append(f"  waiting for payload: {waiting}")
    lines.append(f"  gaps: {_ranges(st['gaps'])}")
    for p in st["problems"]:
        lines.append(f"  PROBLEM seq {p['seq']}: {p['kind']}: {p['detail']} "
                     f"(x{p['count']}, last {_utc(p['last_utc_ns'])})")
    return lines


@main.command()
@DATA
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's JSON.")
def status(data_dir: Path, as_json: bool) -> None:
    """Per device: highest seq, headers awaiting payload, gaps, problems, last contact."""
    if not (data_dir / "receiver.db").exists():
        raise click.ClickException(f"{data_dir} holds no receiver data (receiver.db)")
    with ReceiverStore(data_dir) as store:
        everything = store.status_all()
    if as_json:
        click.echo(json.dumps(everything, indent=2, sort_keys=True))
        return
    for st in everything["devices"].values():
        for line in _describe(st):
            click.echo(line)


from dualrec_tools.receiver.enroll_cli import register  # noqa: E402  (needs main above)

register(main, DATA, _user)

if __name__ == "__main__":
    main()
