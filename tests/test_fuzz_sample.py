"""A seeded sample of the mutation campaign (tests/fuzz, `make fuzz` runs 20,000): 2,000
mutated copies of a real sealed recording, every class of tests/fuzz/mutations.py alike; the
strict verifier must reject each one (tail removals aside, which a chain cannot show) and
neither it nor `export --force` may raise. The table is printed, and is the assertion's message,
so a failure names each accepted or crashed mutation and how to reproduce it."""

from __future__ import annotations

from fuzz.campaign import format_table, run_campaign
from fuzz.mutations import CLASSES

SAMPLE = 2000
SEED = 8


def test_fuzz_sample() -> None:
    summary = run_campaign(SAMPLE, seed=SEED, workers=2, export_fraction=0.02)
    table = format_table(summary, limit=5)
    print(table)
    assert len(summary.results) == SAMPLE
    counts = summary.counts()
    assert all(sum(c.values()) >= SAMPLE // len(CLASSES) for c in counts.values()), table
    # tail removals are tried both ways: the last session left open, and whole sessions gone
    assert counts["tail_removal"]["undetectable"] > 0, table
    assert counts["tail_removal"]["rejected"] > 0, table
    assert summary.total("crashed") == 0, table
    assert summary.total("accepted") == 0, table
