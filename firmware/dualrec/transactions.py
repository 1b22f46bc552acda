"""Which transaction a session is, and whether it did what regulation requires.

Labels come from the operation log by regular expressions with named groups (`txn`, `teller`,
`business`), first from the start line, then from later lines for labels still missing; a value
that is a customer number (dualrec.numbers) never becomes a label. Completeness: per business
type (or `*` for all), the required steps as patterns; a session is complete when a line of the
session matched each. Both go on record as events in the session (docs/config.md,
docs/FORMAT.md §5.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dualrec.numbers import is_customer_number

LABELS = ("txn", "teller", "business")


@dataclass(frozen=True)
class TransactionRules:
    label_patterns: tuple[re.Pattern[str], ...]
    required: dict[str, dict[str, re.Pattern[str]]]  # business type or "*" -> step -> pattern

    @classmethod
    def build(cls, labels: list[str], required: dict[str, dict[str, str]]) -> TransactionRules:
        return cls(tuple(re.compile(p) for p in labels),
                   {b: {step: re.compile(p) for step, p in steps.items()}
                    for b, steps in required.items()})

    def labels_in(self, text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for pattern in self.label_patterns:
            m = pattern.search(text)
            if not m:
                continue
            for name, value in m.groupdict().items():
                if name in LABELS and value and name not in out and not is_customer_number(value):
                    out[name] = value[:64]
        return out

    def steps_for(self, business: str | None) -> dict[str, re.Pattern[str]]:
        steps = dict(self.required.get("*", {}))
        if business:
            steps.update(self.required.get(business, {}))
        return steps


@dataclass
class Transaction:
    """One session's view of its transaction, fed every log line of the session."""

    rules: TransactionRules
    labels: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # kept to check steps once the type is known

    def feed(self, text: str) -> dict[str, str]:
        """Take a line; return the labels it added (empty if none)."""
        self.lines.append(text)
        if len(self.lines) > 5000:  # a session is minutes of lines; keep memory bounded
            del self.lines[:1000]
        new = {k: v for k, v in self.rules.labels_in(text).items() if k not in self.labels}
        self.labels.update(new)
        return new

    def completeness(self) -> dict[str, object]:
        business = self.labels.get("business", "")
        steps = self.rules.steps_for(business)
        missing = sorted(name for name, p in steps.items()
                         if not any(p.search(line) for line in self.lines))
        return {"business": business, "required": sorted(steps), "missing": missing,
                "complete": not missing}
