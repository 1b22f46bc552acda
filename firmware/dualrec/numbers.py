"""Customer numbers: recognising the ones the box must never show or label.

Chinese resident ID numbers (GB 11643: 18 characters with the ISO 7064 MOD 11-2 check
character, or the old 15-digit form with a valid birth date), bank card numbers (13 to 19 digits
passing Luhn) and mainland mobile numbers (11 digits, 1[3-9]…). `find` returns where they are in
a text, `is_customer_number` says whether one value is one. Masking for display builds on this;
sealed evidence always keeps the raw bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# Runs of digits (and a final X for ID numbers) not inside a longer run, optionally grouped by
# single spaces or hyphens as cards are often written (6222 0202 0011 2233 445).
_CANDIDATE = re.compile(r"(?<![0-9A-Za-z])(?:[0-9][ -]?){12,18}[0-9Xx](?![0-9A-Za-z])"
                        r"|(?<![0-9A-Za-z])[0-9]{11}(?![0-9A-Za-z])")


@dataclass(frozen=True)
class Found:
    kind: str  # "id", "card", "mobile"
    start: int
    end: int


def _valid_date(yyyymmdd: str) -> bool:
    try:
        d = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))
    except ValueError:
        return False
    return 1900 <= d.year <= 2100


def is_id_number(s: str) -> bool:
    """A resident ID number: 18 characters with a valid date and check character, or the
    15-digit form (1984–1999) with a valid date."""
    if len(s) == 18 and s[:17].isascii() and s[:17].isdigit():
        check = _ID_CHECK[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True)) % 11]
        return s[17].upper() == check and _valid_date(s[6:14])
    if len(s) == 15 and s.isascii() and s.isdigit():
        return _valid_date("19" + s[6:12])
    return False


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = int(c)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def is_card_number(s: str) -> bool:
    return 13 <= len(s) <= 19 and s.isascii() and s.isdigit() and luhn_ok(s)


def is_mobile_number(s: str) -> bool:
    return len(s) == 11 and s.isascii() and s.isdigit() and s[0] == "1" and s[1] in "3456789"


def classify(value: str) -> str | None:
    """"id", "card" or "mobile" when value (separators removed) is such a number, else None."""
    s = value.replace(" ", "").replace("-", "")
    if is_id_number(s):
        return "id"
    if is_card_number(s):
        return "card"
    if is_mobile_number(s):
        return "mobile"
    return None


def find(text: str) -> list[Found]:
    """Every customer number in text, in order."""
    out = []
    for m in _CANDIDATE.finditer(text):
        kind = classify(m.group())
        if kind is not None:
            out.append(Found(kind, m.start(), m.end()))
    return out


def is_customer_number(value: str) -> bool:
    return classify(value) is not None or bool(find(value))


def _mask_one(kind: str, value: str) -> str:
    digits = value.replace(" ", "").replace("-", "")
    if kind == "card":
        return f"{digits[:4]} **** **** {digits[-4:]}"
    if kind == "id":
        return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]
    return digits[:3] + "****" + digits[-4:]  # mobile


def mask(text: str, extra: tuple[re.Pattern[str], ...] = ()) -> str:
    """text with every customer number masked (`6222 **** **** 1234`, `110***********457X`,
    `138****5678`) and every match of the site's extra patterns replaced by asterisks."""
    found = find(text)
    if found:
        parts, pos = [], 0
        for f in found:
            parts += [text[pos:f.start], _mask_one(f.kind, text[f.start:f.end])]
            pos = f.end
        text = "".join(parts) + text[pos:]
    for pattern in extra:
        text = pattern.sub(lambda m: "*" * len(m.group()), text)
    return text
