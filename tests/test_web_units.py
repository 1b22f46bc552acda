"""dualrec-web's parts without a browser: argon2id accounts and the `user add` command, the
hash-chained audit log (an edited or removed line is found; reasons pass the number shield), the
login rate limit's window, gaps from the index, the private media cache and its sweep."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrec import numbers
from dualrec_tools.web.accounts import AccountError, Accounts
from dualrec_tools.web.archive import Archive
from dualrec_tools.web.audit import AuditLog, verify_log
from dualrec_tools.web.auth import LoginLimiter
from dualrec_tools.web.cli import main
from dualrec_tools.web.media import MediaCache


def test_accounts_hash_with_argon2id_and_check(tmp_path: Path) -> None:
    acc = Accounts(tmp_path / "state" / "web.db")
    acc.add("ada", "auditor", "a long password", can_unmask=True)
    assert (tmp_path / "state" / "web.db").stat().st_mode & 0o077 == 0
    stored = sqlite3.connect(tmp_path / "state" / "web.db").execute(
        "SELECT hash FROM accounts").fetchone()[0]
    assert stored.startswith("$argon2id$") and "a long password" not in stored
    got = acc.check("ada", "a long password")
    assert got is not None and got.role == "auditor" and got.can_unmask
    assert acc.check("ada", "a long passwort") is None
    assert acc.check("nobody", "a long password") is None
    with pytest.raises(AccountError, match="exists"):
        acc.add("ada", "it", "another long one")
    with pytest.raises(AccountError, match="at least"):
        acc.add("bob", "it", "short")
    with pytest.raises(AccountError, match="role"):
        acc.add("bob", "admin", "a long password")
    with pytest.raises(AccountError, match="name"):
        acc.add("bob smith", "it", "a long password")


def test_user_add_command(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["user", "add", "ian", "--role", "it", "--password-stdin",
                             "--state", str(tmp_path)], input="it's a long password\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["user", "add", "ada", "--role", "auditor", "--can-unmask",
                             "--state", str(tmp_path)],
                      input="a long password\na long password\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["user", "list", "--state", str(tmp_path)])
    assert r.output.splitlines() == ["ada\tauditor\tcan-unmask", "ian\tit\t"]
    assert Accounts(tmp_path / "web.db").check("ian", "it's a long password") is not None


def test_audit_log_is_a_chain_and_masks_reasons(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("ada", "unmask", device="box-1", session="s", reason="card 6217008792174210")
    log.append("ada", "view", device="box-1", session="s", unmasked=True)
    log.append("bob", "view", device="box-1", session="t", unmasked=False)
    text = (tmp_path / "audit.log").read_text()
    assert not numbers.find(text) and "6217 **** **** 4210" in text
    assert verify_log(tmp_path / "audit.log") == []
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600
    lines = text.splitlines()
    edited = json.loads(lines[1]) | {"user": "eve"}
    (tmp_path / "audit.log").write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    assert verify_log(tmp_path / "audit.log") == [3]  # the line after the edited one
    (tmp_path / "audit.log").write_text("\n".join([lines[0], lines[2]]) + "\n")
    assert verify_log(tmp_path / "audit.log") == [2]  # a line removed


def test_login_limit_per_name_and_address_with_a_sliding_window() -> None:
    lim = LoginLimiter(per_name=3, per_address=5, window_s=0.3)
    for _ in range(3):
        assert not lim.blocked("ada", "10.0.0.1")
        lim.failed("ada", "10.0.0.1")
    assert lim.blocked("ada", "10.0.0.2")  # the name, from anywhere
    assert not lim.blocked("bob", "10.0.0.2")
    lim.failed("bob", "10.0.0.1")
    lim.failed("carol", "10.0.0.1")
    assert lim.blocked("dave", "10.0.0.1")  # the address, whatever name
    time.sleep(0.35)
    assert not lim.blocked("ada", "10.0.0.1")


def test_gaps_from_the_index(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "receiver.db")
    db.execute("CREATE TABLE segments (device TEXT, seq INTEGER)")
    db.executemany("INSERT INTO segments VALUES (?, ?)",
                   [("a", s) for s in (2, 3, 5, 9)] + [("b", 0), ("b", 1)])
    db.commit()
    db.close()
    archive = Archive(tmp_path, [])
    assert archive.gaps("a") == [(0, 1), (4, 4), (6, 8)]
    assert archive.gaps("b") == [] and archive.gaps("c") == []
    archive.close()


def test_media_cache_is_private_and_swept(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", max_age_s=60)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    old = cache.path("box-1", "20250301T090000Z-aaaaaa", "ada")
    old.write_bytes(b"decrypted")
    fresh = cache.path("box-1", "20250301T090000Z-aaaaaa", "bob")
    fresh.write_bytes(b"decrypted")
    os.utime(old, (time.time() - 61, time.time() - 61))
    assert "ada" not in old.name  # no viewer name in a file name
    assert cache.sweep() == 1 and not old.exists() and fresh.exists()
    assert cache.fresh(fresh) and not cache.fresh(old)
