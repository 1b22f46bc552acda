"""The conformance vectors (docs/FORMAT.md §9) against the project's verifier, through the same
command line a third party would drive: every case's verdict, exit status and set of finding
kinds must be the ones written by hand from FORMAT.md in dualrec_tools/vectors.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrec_tools.cli import main
from dualrec_tools.export import load_identities
from dualrec_tools.verify import FINDINGS, load_device_key, verify_dir


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    result = CliRunner().invoke(main, ["vectors", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_every_vector_gets_its_verdict_and_kinds(vectors: Path) -> None:
    expected = json.loads((vectors / "expected.json").read_text())
    keys = [load_device_key(vectors / "keys" / "device.pub")]
    identities = load_identities(vectors / "keys" / "branch.agekey")
    wrong = {}
    for name, exp in expected.items():
        args = exp["args"]
        report = verify_dir(vectors / "cases" / name, keys,
                            from_seq=None if "--partial" in args else 0,
                            identities=identities if "--identity" in args else None)
        verdict = "VERIFIED" if report.passed(strict="--strict" in args) else "FAILED"
        kinds = sorted({p.kind for p in report.problems})
        if (verdict, kinds) != (exp["verdict"], exp["kinds"]):
            wrong[name] = (verdict, kinds, [str(p) for p in report.problems])
    assert not wrong, wrong
    assert len(expected) >= 50


def test_vectors_cover_every_finding_kind(vectors: Path) -> None:
    """Each kind FORMAT.md §6.2 lists is produced by at least one vector (unreadable needs a
    file the verifier may not read, which a root test run cannot make; deletion_log needs a
    receiver's log: both are tested apart)."""
    expected = json.loads((vectors / "expected.json").read_text())
    produced = {k for exp in expected.values() for k in exp["kinds"]}
    assert set(FINDINGS) - produced == {"unreadable", "deletion_log"}


@pytest.mark.parametrize("name", ["good-content", "content-keyframe", "empty", "dir-named-header"])
def test_cli_exit_status(vectors: Path, name: str) -> None:
    """Exit 0 verified, 1 findings; the last line is the verdict."""
    exp = json.loads((vectors / "expected.json").read_text())[name]
    args = ["verify", str(vectors / "cases" / name), "--device-key",
            str(vectors / "keys" / "device.pub")]
    for a in exp["args"]:
        args += [a, str(vectors / "keys" / "branch.agekey")] if a == "--identity" else [a]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == (0 if exp["verdict"] == "VERIFIED" else 1), result.output
    assert result.output.splitlines()[-1].startswith(exp["verdict"])


def test_cli_usage_and_io_errors_exit_2(vectors: Path, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    result = CliRunner().invoke(main, ["verify", str(vectors / "cases" / "good"),
                                       "--device-key", str(bad_key)])
    assert result.exit_code == 2 and "not a PEM public key" in result.output


def test_format_lists_every_finding_kind() -> None:
    """docs/FORMAT.md §6.2 and the verifier's FINDINGS name the same kinds."""
    doc = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    table = doc.split("### 6.2 Findings")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", table, re.M))
    assert documented == set(FINDINGS)


def test_a_deletion_log_explains_what_retention_deleted(vectors: Path, tmp_path: Path) -> None:
    """Tried: session A (seq 0..1) deleted from the intact chain, with and without the
    receiver's signed deletion-log entry for it, and with the log's line altered. Asserted:
    unexplained, the missing range fails; explained by a valid log, the chain verifies and the
    explanation is printed; an altered log is itself a finding."""
    import shutil

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from dualrec.segment_format import header_hash, header_name, payload_name
    from dualrec_tools.deletion_log import append_entry

    d = tmp_path / "dev"
    shutil.copytree(vectors / "cases" / "good", d)
    hashes = [header_hash((d / header_name(s)).read_bytes()) for s in (0, 1)]
    for s in (0, 1):
        (d / header_name(s)).unlink()
        (d / payload_name(s)).unlink()
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "receipt.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    log = tmp_path / "deletion-log.jsonl"
    append_entry(log, key, device="vec-0001", first_seq=0, header_sha256=hashes,
                 session=None, reason="retention: 90 days after the session", utc_ns=1,
                 receiver="branch")
    base = ["verify", str(d), "--device-key", str(vectors / "keys" / "device.pub")]
    bare = CliRunner().invoke(main, base)
    assert bare.exit_code == 1 and "chain should start at seq 0" in bare.output
    ok = CliRunner().invoke(main, [*base, "--deletion-log", str(log), "--receipt-key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert "explained:" in ok.output and "deleted by retention" in ok.output
    log.write_bytes(log.read_bytes().replace(b"retention", b"RETENTION"))
    bad = CliRunner().invoke(main, [*base, "--deletion-log", str(log), "--receipt-key", str(pub)])
    assert bad.exit_code == 1 and "deletion-log.jsonl" in bad.output


def test_a_receivers_upload_in_progress_is_a_temp_file(vectors: Path, tmp_path: Path) -> None:
    """The receiver streams a payload to .NAME.XXXXXXXXXXXX.tmp (FORMAT.md §1): a warning,
    not an unknown entry (found by the mutation campaign)."""
    import shutil

    d = tmp_path / "dev"
    shutil.copytree(vectors / "cases" / "good", d)
    (d / ".0000000004.payload.age.eda2b11c4012.tmp").write_bytes(b"partial")
    report = verify_dir(d, [load_device_key(vectors / "keys" / "device.pub")])
    assert report.passed() and [p.kind for p in report.problems] == ["temp_file"]
