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
    file the verifier may not read, which a root test run cannot make: it is tested apart)."""
    expected = json.loads((vectors / "expected.json").read_text())
    produced = {k for exp in expected.values() for k in exp["kinds"]}
    assert set(FINDINGS) - produced == {"unreadable"}


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
