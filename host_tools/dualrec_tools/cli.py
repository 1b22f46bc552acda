"""`dualrec-tool`: the technician's and branch's command line.

keys (device signing keys, branch age identities), provision (a box's bundle), revoke (a
device's certificate, through the receiver's admin API), verify (is a directory of segments complete
and untouched), export (a session to a playable MKV with the operation log as subtitles, plus its
records), sessions (what a spool holds). The work is done in verify.py and export.py; this module
parses arguments, prints and sets the exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
import httpx

from dualrec_tools.export import ExportError, export_session, load_identities
from dualrec_tools.flash import flash_command
from dualrec_tools.image import image
from dualrec_tools.keys import (
    BRANCH_FILES,
    DEFAULT_RECEIVER_NAMES,
    KeyExists,
    write_branch,
    write_device_key,
)
from dualrec_tools.tap import tap
from dualrec_tools.verify import (
    DeviceKey,
    DirectoryError,
    KeyFileError,
    Report,
    load_device_key,
    read_headers,
    sessions_of,
    shown,
    verify_dir,
)

DIRECTORY = click.Path(file_okay=False, path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def main() -> None:
    """dualrec host tools: keys, verify, export and list sealed sessions."""


# --- keys ------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Make key material: a device's signing key, a branch's age identity."""


@keys.command("device")
@click.argument("directory", type=DIRECTORY)
@click.option("--id", "device_id", required=True, help="The device id headers will carry.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
def keys_device(directory: Path, device_id: str, force: bool) -> None:
    """Write DIRECTORY/device.key (Ed25519, PKCS#8 PEM, 0600) and DIRECTORY/device.pub."""
    try:
        pub_path = write_device_key(directory, device_id, force)
    except KeyExists as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--id") from None
    click.echo(f"wrote {directory / 'device.key'} and {pub_path} for device {device_id}")


@keys.command("branch")
@click.argument("directory", type=DIRECTORY)
@click.option("--name", default="branch", show_default=True, help="The branch's name.")
@click.option("--receiver-host", "hosts", multiple=True,
              help="A name or IP the receiver is reached at (repeatable; default: loopback).")
@click.option("--force", is_flag=True, help="Replace existing key material.")
def keys_branch(directory: Path, name: str, hosts: tuple[str, ...], force: bool) -> None:
    """Write a branch's keys: CA, receiver TLS certificate, receipt key, age identity."""
    try:
        recipient = write_branch(directory, name, hosts or DEFAULT_RECEIVER_NAMES, force)
    except KeyExists as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {', '.join(BRANCH_FILES)} to {directory}/; age recipient {recipient}")
    click.echo("the receiver needs ca.crt, receiver.crt, receiver.key, receipt.key; "
               "keep ca.key and branch.agekey offline")


# --- provision -------------------------------------------------------------------------------


ADMIN_URL = click.option("--admin-url", default=None, envvar="DUALREC_ADMIN_URL",
                         help="The receiver's admin API, e.g. http://127.0.0.1:8444 (through "
                              "an SSH tunnel: it listens on loopback).")
ADMIN_TOKEN = click.option("--admin-token-file", type=EXISTING_FILE, default=None,
                           envvar="DUALREC_ADMIN_TOKEN_FILE",
                           help="A file holding an admin token (dualrec-receiver admin-token).")


def _admin_token(path: Path | None) -> str:
    if path is None:
        raise click.UsageError("--admin-token-file (or DUALREC_ADMIN_TOKEN_FILE) is needed")
    return path.read_text().strip()


@main.command()
@click.option("--branch", "branch", type=EXISTING_DIR, required=True,
              help="The branch's public files: ca.crt, receipt.pub, branch.recipient (ca.key "
                   "is not needed here; it stays on the receiver host).")
@click.option("--id", "device_id", required=True, help="The new device's id.")
@click.option("--receiver-url", required=True, help="https://HOST:PORT of the receiver.")
@click.option("--enroll-url", default=None,
              help="https://HOST:PORT of its enrollment API [default: the receiver's host, "
                   "port 8445].")
@click.option("--out", type=DIRECTORY, required=True, help="Where the bundle goes.")
@click.option("--oplog-port", default="", help="The teller terminal's serial port.")
@click.option("--state-dir", default="/var/lib/dualrec", show_default=True,
              help="The box's spool, chain state and keys (the service's StateDirectory); an "
                   "empty value keeps them next to site.toml.")
@ADMIN_URL
@ADMIN_TOKEN
@click.option("--token-file", type=EXISTING_FILE, default=None,
              help="An enrollment token made on the receiver host (dualrec-receiver "
                   "enroll-token --out), instead of asking the admin API.")
@click.option("--replace", is_flag=True,
              help="The box replaces an enrolled device of that id (admin API only).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def provision(branch: Path, device_id: str, receiver_url: str, enroll_url: str | None,
              out: Path, oplog_port: str, state_dir: str, admin_url: str | None,
              admin_token_file: Path | None, token_file: Path | None, replace: bool,
              force: bool) -> None:
    """Make a box's provisioning bundle: site config, branch CA, receipt key and a
    single-use enrollment token for this device. No key is made here: the box makes its own
    on its first boot (`dualrec enroll`)."""
    import json

    from dualrec_tools import provision as prov

    try:
        prov.check_out(out, force)
        if token_file is not None:
            token = json.loads(token_file.read_text())
        elif admin_url:
            token = prov.request_token(admin_url, _admin_token(admin_token_file), device_id,
                                       replace=replace)
        else:
            raise click.UsageError("a token is needed: --admin-url with --admin-token-file, "
                                   "or --token-file")
        done = prov.make_bundle(branch, device_id, receiver_url, out, token,
                                enroll_url=enroll_url, oplog_port=oplog_port,
                                state_dir=state_dir, force=force)
    except KeyExists as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError, prov.ProvisionError, httpx.HTTPError) as exc:
        raise click.ClickException(f"provisioning failed: {exc}") from None
    click.echo(f"bundle for {device_id} in {out}/: {', '.join(prov.BUNDLE_FILES)} (site "
               f"config {done.site}); the box enrolls on its first boot")


@main.command()
@click.argument("device")
@ADMIN_URL
@ADMIN_TOKEN
@click.option("--reason", default="", help="Why (kept in the receiver's audit log).")
def revoke(device: str, admin_url: str | None, admin_token_file: Path | None,
           reason: str) -> None:
    """Make the receiver refuse DEVICE's current certificate (a stolen or retired box)."""
    from dualrec_tools import provision as prov

    if not admin_url:
        raise click.UsageError("--admin-url (or DUALREC_ADMIN_URL) is needed")
    try:
        sha = prov.revoke(admin_url, _admin_token(admin_token_file), device, reason)
    except (prov.ProvisionError, httpx.HTTPError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {device} (certificate sha256 {sha})")


# --- verify, export, sessions ----------------------------------------------------------------


class UsageFailure(click.ClickException):
    """A usage or I/O error: exit status 2, like click's own usage errors."""

    exit_code = 2


def _load_keys(paths: Sequence[Path]) -> list[DeviceKey]:
    try:
        return [load_device_key(p) for p in paths]
    except KeyFileError as exc:
        raise UsageFailure(str(exc)) from None


@main.command()
@click.argument("directory", type=EXISTING_DIR)
@click.option("--device-key", "key_paths", type=EXISTING_FILE, multiple=True, required=True,
              help="A device public key (PEM); repeat for several.")
@click.option("--identity", "identity_path", type=EXISTING_FILE, default=None,
              help="The branch's age identity: also check every payload's content.")
@click.option("--deletion-log", "deletion_log", type=EXISTING_FILE, default=None,
              help="The receiver's deletion log: missing ranges it explains (retention) are "
                   "not findings. Needs --receipt-key.")
@click.option("--receipt-key", "receipt_key", type=EXISTING_FILE, default=None,
              help="The receiver's receipt public key (PEM), which signs the deletion log.")
@click.option("--from-seq", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seq the chain must start at (0: also with the genesis prev).")
@click.option("--partial", is_flag=True,
              help="The directory may start anywhere (a spool after uploads were deleted).")
@click.option("--strict", is_flag=True, help="Warnings (an unfinished session) fail too.")
def verify(directory: Path, key_paths: tuple[Path, ...], identity_path: Path | None,
           deletion_log: Path | None, receipt_key: Path | None, from_seq: int, partial: bool,
           strict: bool) -> None:
    """Check that the segments in DIRECTORY form a complete, untouched chain.

    Prints one line per finding and a verdict. Exit status: 0 verified, 1 findings, 2 usage
    or I/O error (a key or identity file that cannot be used, a directory that cannot be
    listed); docs/FORMAT.md §6."""
    keys_ = _load_keys(key_paths)
    identities = None
    if identity_path is not None:
        try:
            identities = load_identities(identity_path)
        except ExportError as exc:
            raise UsageFailure(str(exc)) from None
    try:
        report = verify_dir(directory, keys_, from_seq=None if partial else from_seq,
                            identities=identities)
    except DirectoryError as exc:
        raise UsageFailure(str(exc)) from None
    if deletion_log is not None:
        for line in _apply_deletion_log(report, deletion_log, receipt_key):
            click.echo(line)
    for p in report.problems:
        click.echo(f"warning: {p}" if p.warning else str(p))
    click.echo(report.verdict(strict))
    if not report.passed(strict):
        click.get_current_context().exit(1)


def _apply_deletion_log(report: Report, path: Path, receipt_key: Path | None) -> list[str]:
    """Take the missing ranges the receiver's signed deletion log explains out of the findings
    (FORMAT.md §6.1); say which. A log that does not verify is itself a finding."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from dualrec_tools.deletion_log import DeletionLogError, explain, read_log
    from dualrec_tools.verify import finding

    if receipt_key is None:
        raise UsageFailure("--deletion-log needs --receipt-key (the key that signs it)")
    try:
        key = load_pem_public_key(receipt_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageFailure(f"{receipt_key}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageFailure(f"{receipt_key}: not an Ed25519 public key")
    try:
        log = read_log(path, key)
    except DeletionLogError as exc:
        report.problems.append(finding("deletion_log", None, f"{path}: {exc}"))
        return []
    except OSError as exc:
        raise UsageFailure(f"{path}: {exc.strerror or exc}") from None
    out = []
    for e in explain(report, log):
        report.problems.remove(e.problem)
        out.append(f"explained: {e.problem.reason}: {e}")
    return out


@main.command()
@click.argument("session")
@click.option("--identity", "identity_path", type=EXISTING_FILE, required=True,
              help="The branch's age identity file.")
@click.option("--spool", type=EXISTING_DIR, required=True, help="Directory of segments.")
@click.option("--device-key", "key_paths", type=EXISTING_FILE, multiple=True,
              help="Device public key(s); without one, signatures are not checked.")
@click.option("--out", "out_dir", type=DIRECTORY, required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Export even if verification finds problems.")
@click.option("--tz", "tz_name", default=None,
              help="The branch's time zone for local times (IANA name, e.g. Asia/Shanghai); "
                   "default: this computer's.")
@click.option("--counter", default=None, help="The counter's name, for the file's tags.")
@click.option("--language", default="chi", show_default=True,
              help="ISO 639-2 language of the operation log's subtitle track.")
@click.option("--no-timecode", is_flag=True, help="Leave out the time-code subtitle track.")
def export(session: str, identity_path: Path, spool: Path, key_paths: tuple[Path, ...],
           out_dir: Path, force: bool, tz_name: str | None, counter: str | None,
           language: str, no_timecode: bool) -> None:
    """Write SESSION.mkv (video, audio, the operation log and a time code as subtitles, tags
    with the wall-clock start, device, counter and transaction), and beside it the raw
    SESSION.oplog.jsonl and SESSION.events.jsonl, a masked SESSION.transcript.txt and the
    verification report SESSION.verify.txt, to --out."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    keys_ = _load_keys(key_paths) if key_paths else None
    try:
        tz = ZoneInfo(tz_name) if tz_name else None
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageFailure(f"--tz {tz_name!r} is not a time zone name") from None
    if not (len(language) == 3 and language.isascii() and language.isalpha()):
        raise UsageFailure("--language takes a three-letter ISO 639-2 code (chi, eng ...)")
    try:
        with click.progressbar(length=1, label="segments", file=sys.stderr,
                               show_pos=True) as bar:
            def step(n: int) -> None:
                if bar.pos + n > bar.length:
                    bar.length = bar.pos + n
                bar.update(n)

            done = export_session(spool, session, out_dir, load_identities(identity_path),
                                  keys_, force=force, tz=tz, counter=counter,
                                  language=language.lower(), timecode=not no_timecode,
                                  progress=step)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    for note in done.notes:
        click.echo(note, err=True)
    click.echo(f"exported {len(done.seqs)} segments (seq {done.seqs[0]}..{done.seqs[-1]}), "
               f"{done.lines} log lines:")
    for path in (done.mkv, done.oplog, done.events, done.transcript, done.report):
        click.echo(f"  {path}")


def _duration(ns: int) -> str:
    s = ns // 1_000_000_000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@main.command()
@click.option("--spool", type=EXISTING_DIR, required=True, help="Directory of segments.")
@click.option("--identity", "identity_path", type=EXISTING_FILE, default=None,
              help="The branch's age identity: also show labels and completeness.")
@click.option("--txn", default=None, help="Only the session of this transaction id.")
@click.option("--teller", default=None, help="Only this teller's sessions.")
@click.option("--business", default=None, help="Only sessions of this business type.")
@click.option("--incomplete", is_flag=True, help="Only sessions missing a required step.")
def sessions(spool: Path, identity_path: Path | None, txn: str | None, teller: str | None,
             business: str | None, incomplete: bool) -> None:
    """List the sessions the headers in --spool name (headers are parsed, not verified); with
    --identity, their transaction labels and completeness, and filters on them."""
    from dualrec_tools.session_labels import read_transaction

    wanted = {k: v for k, v in (("txn", txn), ("teller", teller), ("business", business)) if v}
    if (wanted or incomplete) and identity_path is None:
        raise UsageFailure("filtering by labels or completeness needs --identity")
    try:
        headers, _ = read_headers(spool)
        identities = load_identities(identity_path) if identity_path else None
    except DirectoryError as exc:
        raise UsageFailure(str(exc)) from None
    except ExportError as exc:
        raise UsageFailure(str(exc)) from None
    chain = {h.seq: h for h in headers if h.header is not None and h.seq == h.file_seq}
    rows = []
    for s in sessions_of(headers):
        extra = ""
        if identities is not None:
            t = read_transaction(s, chain, identities)
            if any(t.labels.get(k) != v for k, v in wanted.items()):
                continue
            if incomplete and t.complete is not False:
                continue
            extra = (f" {t.labels.get('txn', '-'):<10} {t.labels.get('teller', '-'):<8} "
                     f"{t.labels.get('business', '-'):<10} {t.completeness}")
        rows.append((s, extra))
    if not rows:
        click.echo("no sessions")
        return
    click.echo(f"{'SESSION':<28} {'SEGS':>4} {'SEQ':>13} {'START (UTC)':<20} {'DURATION':>9} "
               "STATUS" + (f"      {'TXN':<10} {'TELLER':<8} {'BUSINESS':<10} COMPLETENESS"
                           if identities is not None else ""))
    for s, extra in rows:
        start = datetime.fromtimestamp(s.start_utc_ns // 1_000_000_000, UTC)
        click.echo(f"{s.session:<28} {len(s.segments):>4} "
                   f"{f'{s.seqs[0]}..{s.seqs[-1]}':>13} {start:%Y-%m-%d %H:%M:%S}  "
                   f"{_duration(s.duration_ns):>9} {s.status:<11}{extra}")
    unreadable = [shown(h.path.name) for h in headers if h.header is None]
    if unreadable:
        click.echo(f"unreadable headers: {', '.join(unreadable)}", err=True)


@main.command()
@click.argument("out", type=DIRECTORY)
def vectors(out: Path) -> None:
    """Write the conformance vectors of docs/FORMAT.md §9 to OUT: cases/NAME (device
    directories), keys/ (device.pub, other.pub, branch.agekey) and expected.json."""
    from dualrec_tools.vectors import generate

    expected = generate(out)
    click.echo(f"wrote {len(expected)} vectors to {out}/cases with {out}/expected.json")


# --- tap (the Pico serial tap: flash, verify, fetch-deps, monitor; dualrec_tools/tap.py) -------

main.add_command(tap)

# --- the box's card: image (dualrec_tools/image.py) and flash (dualrec_tools/flash.py) --------

main.add_command(image)
main.add_command(flash_command)


if __name__ == "__main__":
    main()
