"""`dualrec-tool`: the technician's and branch's command line.

keys (device signing keys, branch age identities), verify (is a directory of segments complete
and untouched), export (a session to a playable MKV with the operation log as subtitles, plus its
records), sessions (what a spool holds). The work is done in verify.py and export.py; this module
parses arguments, prints and sets the exit code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from dualrec_tools.export import ExportError, export_session, load_identities
from dualrec_tools.verify import (
    DeviceKey,
    KeyFileError,
    device_pub_pem,
    load_device_key,
    read_headers,
    sessions_of,
    verify_dir,
)

# The same rule as the site config's device.id (dualrec.config.DeviceSection).
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644

DIRECTORY = click.Path(file_okay=False, path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def main() -> None:
    """dualrec host tools: keys, verify, export and list sealed sessions."""


# --- keys ------------------------------------------------------------------------------------


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    # Checked for every file before any is written, so a refusal leaves the set as it was.
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(existing)} already exist(s); a new key would orphan everything sealed "
            "or provisioned with the old one (--force replaces it)")


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with exactly `mode` (fchmod, since the umask may not allow it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@main.group()
def keys() -> None:
    """Make key material: a device's signing key, a branch's age identity."""


def write_device_key(directory: Path, device_id: str, force: bool) -> Path:
    """Write directory/device.key (Ed25519, PKCS#8 PEM, 0600) and directory/device.pub (the
    public key labelled with the device id); return the public key's path."""
    if not DEVICE_ID.match(device_id):
        raise click.BadParameter("letters, digits, '_', '.', '-'; at most 64; starting with a "
                                 "letter or digit", param_hint="--id")
    key_path, pub_path = directory / "device.key", directory / "device.pub"
    _refuse_existing([key_path, pub_path], force)
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    _write_file(key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
                SECRET_MODE)
    _write_file(pub_path, device_pub_pem(key.public_key(), device_id), PUBLIC_MODE)
    return pub_path


@keys.command("device")
@click.argument("directory", type=DIRECTORY)
@click.option("--id", "device_id", required=True, help="The device id headers will carry.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
def keys_device(directory: Path, device_id: str, force: bool) -> None:
    """Write DIRECTORY/device.key (Ed25519, PKCS#8 PEM, 0600) and DIRECTORY/device.pub."""
    pub_path = write_device_key(directory, device_id, force)
    click.echo(f"wrote {directory / 'device.key'} and {pub_path} for device {device_id}")


def write_branch_identity(directory: Path, force: bool) -> str:
    """Write an age X25519 identity (branch.agekey, in age-keygen's format) and its recipient
    (branch.recipient); return the recipient."""
    key_path, rcpt_path = directory / "branch.agekey", directory / "branch.recipient"
    _refuse_existing([key_path, rcpt_path], force)
    directory.mkdir(parents=True, exist_ok=True)
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    created = datetime.now(UTC).astimezone().isoformat(timespec="seconds")
    _write_file(key_path, (f"# created: {created}\n# public key: {recipient}\n"
                           f"{identity}\n").encode(), SECRET_MODE)
    _write_file(rcpt_path, f"{recipient}\n".encode(), PUBLIC_MODE)
    return recipient


@keys.command("branch")
@click.argument("directory", type=DIRECTORY)
@click.option("--force", is_flag=True, help="Replace an existing identity.")
def keys_branch(directory: Path, force: bool) -> None:
    """Write DIRECTORY/branch.agekey (age identity, 0600) and DIRECTORY/branch.recipient."""
    recipient = write_branch_identity(directory, force)
    click.echo(f"wrote {directory / 'branch.agekey'}; recipient {recipient}")


# --- verify, export, sessions ----------------------------------------------------------------


def _load_keys(paths: Sequence[Path]) -> list[DeviceKey]:
    try:
        return [load_device_key(p) for p in paths]
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("directory", type=EXISTING_DIR)
@click.option("--device-key", "key_paths", type=EXISTING_FILE, multiple=True, required=True,
              help="A device public key (PEM); repeat for several.")
@click.option("--from-seq", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seq the chain must start at (0: also with the genesis prev).")
@click.option("--partial", is_flag=True,
              help="The directory may start anywhere (a spool after uploads were deleted).")
@click.option("--strict", is_flag=True, help="Warnings (an unfinished session) fail too.")
def verify(directory: Path, key_paths: tuple[Path, ...], from_seq: int, partial: bool,
           strict: bool) -> None:
    """Check that the segments in DIRECTORY form a complete, untouched chain.

    Prints one line per problem and a verdict; exits 0 only if nothing failed."""
    report = verify_dir(directory, _load_keys(key_paths), from_seq=None if partial else from_seq)
    for p in report.problems:
        click.echo(f"warning: {p}" if p.warning else str(p))
    click.echo(report.verdict(strict))
    if not report.passed(strict):
        click.get_current_context().exit(1)


@main.command()
@click.argument("session")
@click.option("--identity", "identity_path", type=EXISTING_FILE, required=True,
              help="The branch's age identity file.")
@click.option("--spool", type=EXISTING_DIR, required=True, help="Directory of segments.")
@click.option("--device-key", "key_paths", type=EXISTING_FILE, multiple=True,
              help="Device public key(s); without one, signatures are not checked.")
@click.option("--out", "out_dir", type=DIRECTORY, required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Export even if verification finds problems.")
def export(session: str, identity_path: Path, spool: Path, key_paths: tuple[Path, ...],
           out_dir: Path, force: bool) -> None:
    """Write SESSION.mkv (video, audio, operation log as subtitles), SESSION.oplog.jsonl and
    SESSION.events.jsonl to --out."""
    keys_ = _load_keys(key_paths) if key_paths else None
    try:
        done = export_session(spool, session, out_dir, load_identities(identity_path), keys_,
                              force=force)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    for note in done.notes:
        click.echo(note, err=True)
    click.echo(f"exported {len(done.seqs)} segments (seq {done.seqs[0]}..{done.seqs[-1]}), "
               f"{done.lines} log lines:")
    for path in (done.mkv, done.oplog, done.events):
        click.echo(f"  {path}")


def _duration(ns: int) -> str:
    s = ns // 1_000_000_000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@main.command()
@click.option("--spool", type=EXISTING_DIR, required=True, help="Directory of segments.")
def sessions(spool: Path) -> None:
    """List the sessions the headers in --spool name (headers are parsed, not verified)."""
    headers, _ = read_headers(spool)
    found = sessions_of(headers)
    if not found:
        click.echo("no sessions")
        return
    click.echo(f"{'SESSION':<28} {'SEGS':>4} {'SEQ':>13} {'START (UTC)':<20} {'DURATION':>9} "
               "STATUS")
    for s in found:
        start = datetime.fromtimestamp(s.start_utc_ns // 1_000_000_000, UTC)
        click.echo(f"{s.session:<28} {len(s.segments):>4} "
                   f"{f'{s.seqs[0]}..{s.seqs[-1]}':>13} {start:%Y-%m-%d %H:%M:%S}  "
                   f"{_duration(s.duration_ns):>9} {s.status}")
    unreadable = [h.path.name for h in headers if h.header is None]
    if unreadable:
        click.echo(f"unreadable headers: {', '.join(unreadable)}", err=True)


if __name__ == "__main__":
    main()
