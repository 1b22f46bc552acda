"""docs/config.md is generated from the config models and current; its examples and those of
docs/oplog-terminals.md load; the receipt-printer example reads as that page says."""

from __future__ import annotations

import re
import tomllib

import pytest
from click.testing import CliRunner

from dualrec.cli import main
from dualrec.config import BoardProfile, OpLogSection, SiteConfig
from dualrec.config_doc import DocError, _section, example_toml, render
from dualrec.devices.factory import build_framer
from helpers import ROOT

DOCS = ROOT / "docs"


def test_docs_config_md_is_current() -> None:
    """If this fails, run `.venv/bin/dualrec config-doc > docs/config.md` and commit it."""
    assert (DOCS / "config.md").read_text(encoding="utf-8") == render()


def test_cli_prints_the_same() -> None:
    out = CliRunner().invoke(main, ["config-doc"])
    assert out.exit_code == 0 and out.output == render()


def test_every_key_of_both_files_is_documented() -> None:
    text = render()
    for model in (BoardProfile, SiteConfig):
        for section, field in model.model_fields.items():
            assert f"### `[{section}]`" in text
            sub = field.annotation
            sub = next((a for a in getattr(sub, "__args__", ()) if a is not type(None)), sub)
            for key, f in sub.model_fields.items():
                assert f.description, f"[{section}] {key} has no description"
                assert f"| `{key}` |" in text


def test_a_key_without_description_is_refused() -> None:
    from pydantic import BaseModel

    class Bare(BaseModel):
        x: int = 1

    class Holder(BaseModel):
        bare: Bare = Bare()

    with pytest.raises(DocError, match=r"\[bare\] x: no Field\(description"):
        _section("bare", Holder.model_fields["bare"])


@pytest.mark.parametrize("model", [BoardProfile, SiteConfig])
def test_examples_load(model) -> None:
    model.model_validate(tomllib.loads(example_toml(model)))


def test_generated_doc_states_the_oplog_defaults_and_big5_under_auto() -> None:
    text = render()
    row = next(line for line in text.splitlines() if line.startswith("| `encoding` |"))
    assert '`"auto"`' in row and "Big5 as GB18030 without a decode error" in row
    row = next(line for line in text.splitlines() if line.startswith("| `line_end` |"))
    assert '`"any"`' in row
    assert "| `idle_ms` | integer | `200` | 20 … 5000 |" in text
    assert "[oplog-terminals.md](oplog-terminals.md)" in text


def _toml_blocks(name: str) -> list[dict]:
    text = (DOCS / name).read_text(encoding="utf-8")
    return [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", text, re.S)]


def test_worked_examples_load_and_are_linked() -> None:
    blocks = _toml_blocks("oplog-terminals.md")
    assert len(blocks) == 3
    sections = [OpLogSection.model_validate(b["oplog"]) for b in blocks]
    assert [s.encoding for s in sections] == ["gb18030", "utf-8", "gb18030"]
    for doc in ("README.md", "docs/technician.md"):
        assert "config.md" in (ROOT / doc).read_text(encoding="utf-8"), doc


def test_receipt_printer_example_reads_as_documented() -> None:
    oplog = OpLogSection.model_validate(_toml_blocks("oplog-terminals.md")[2]["oplog"])
    framer = build_framer(oplog)
    gb = "gb18030"
    data = (b"\x1b@\x1ba\x01" + "交易凭条".encode(gb) + b"\n\x1ba\x00"
            + "交易开始 TXN=000123 金额 1,000.00".encode(gb) + b"\n"
            + "交易结束 TXN=000123".encode(gb) + b"\n\x1bd\x03\x1dV\x00")
    lines = framer.feed(data, 1)
    assert framer.poll(1 + oplog.idle_ms * 1_000_000 - 1) == []
    lines += framer.poll(1 + oplog.idle_ms * 1_000_000)
    assert b"".join(line.raw for line in lines) == data
    assert [(line.text, line.flags) for line in lines] == [
        ("\x1b@\x1ba\x01交易凭条", ("control",)),
        ("\x1ba交易开始 TXN=000123 金额 1,000.00", ("control", "nul")),
        ("交易结束 TXN=000123", ()),
        ("\x1bd\x03\x1dV", ("control", "nul", "unterminated")),
    ]
    starts = [re.compile(p) for p in oplog.start_patterns]
    assert [any(p.search(line.text) for p in starts) for line in lines] == [
        False, True, False, False]
