"""`dualrec-receiver` commands for the receiver host itself (they work while it serves):

- `admin-token --name NAME`: a new admin token for the admin API, printed once (only its
  SHA-256 is kept);
- `enroll-token --device-id ID`: a single-use enrollment token for one box, as the JSON that
  `dualrec-tool provision --token-file` takes (for sites where the technician's PC cannot reach
  the admin API);
- `revoke --device-id ID`: the receiver refuses the device's current certificate from the next
  request on.

Each is written to the audit log (audit.jsonl in the data directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from dualrec_tools.receiver.enrollment import (
    DEFAULT_TOKEN_TTL_S,
    EnrollmentBook,
    EnrollRefused,
    Issuer,
)
from dualrec_tools.receiver.store import DEVICE_ID, ReceiverStore

KEYS = click.option("--keys", "keys_dir", required=True,
                    type=click.Path(exists=True, file_okay=False, path_type=Path),
                    help="The receiver's keys directory (its ca.crt names the branch).")


def register(main: click.Group, data: Callable, user: Callable[[], str]) -> None:
    """Add the commands to `dualrec-receiver` (DATA is its --data option)."""

    @main.command("admin-token")
    @data
    @click.option("--name", required=True, help="Whose token (shown in the audit log).")
    def admin_token(data_dir: Path, name: str) -> None:
        """Make an admin token and print it (once: only its hash is kept)."""
        with EnrollmentBook(data_dir) as book:
            token = book.add_admin_token(name, by=f"cli:{user()}")
        click.echo(token)

    @main.command("enroll-token")
    @data
    @KEYS
    @click.option("--device-id", required=True)
    @click.option("--ttl-hours", default=DEFAULT_TOKEN_TTL_S // 3600, show_default=True,
                  type=click.IntRange(min=1, max=90 * 24))
    @click.option("--replace", is_flag=True,
                  help="The box replaces an enrolled device of that id (a new box, a new card).")
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Write the token JSON here (0600) [default: print it].")
    def enroll_token(data_dir: Path, keys_dir: Path, device_id: str, ttl_hours: int,
                     replace: bool, out: Path | None) -> None:
        """Mint a single-use enrollment token for one box (for `dualrec-tool provision
        --token-file`)."""
        if not DEVICE_ID.match(device_id):
            raise click.BadParameter("not a device id", param_hint="--device-id")
        branch = Issuer.from_keys_dir(keys_dir).branch
        with ReceiverStore(data_dir) as store:
            enrolled = store.device(device_id) is not None
        if enrolled and not replace:
            raise click.ClickException(f"{device_id} is enrolled; --replace mints a token that "
                                       "replaces it")
        with EnrollmentBook(data_dir) as book:
            try:
                token, expires = book.mint(device_id, branch, ttl_s=ttl_hours * 3600,
                                           replace_ok=replace, by=f"cli:{user()}")
            except EnrollRefused as exc:
                raise click.ClickException(str(exc)) from None
        text = json.dumps({"device": device_id, "branch": branch, "token": token,
                           "expires_utc_ns": expires}) + "\n"
        if out is None:
            click.echo(text, nl=False)
            return
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        click.echo(f"wrote the enrollment token of {device_id} to {out}")

    @main.command()
    @data
    @click.option("--device-id", required=True)
    @click.option("--reason", default="", help="Why (kept in the audit log).")
    def revoke(data_dir: Path, device_id: str, reason: str) -> None:
        """Refuse the device's current certificate from now on."""
        with ReceiverStore(data_dir) as store:
            device = store.device(device_id)
        if device is None:
            raise click.ClickException(f"{device_id} is not enrolled")
        with EnrollmentBook(data_dir) as book:
            book.revoke(device.cert_sha256, device_id, f"cli:{user()}", reason)
        click.echo(f"revoked {device_id} (certificate sha256 {device.cert_sha256})")
