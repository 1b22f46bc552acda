"""The number shield against a generated corpus of valid customer numbers and near misses:
every valid resident ID (18-character with check character, 15-digit), bank card (13-19 digits,
Luhn, plain or grouped) and mobile number is masked, wherever it sits in a line; near misses
(wrong check character, impossible dates, failed Luhn) are counted and printed, and ordinary
figures (transaction ids, amounts, dates, times) are left alone."""

from __future__ import annotations

import logging
import random
import re

from dualrec import numbers, shield
from dualrec.sim.terminal import make_card_number, make_id_number


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if numbers.luhn_ok(body + d):
            return body + d
    raise AssertionError


def corpus(seed: int = 7, n: int = 300) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    valid, near = [], []
    for _ in range(n):
        valid.append(make_id_number(rng, rng.random() < 0.5))
        valid.append(make_card_number(rng))
        length = rng.randrange(13, 20)
        valid.append(_luhn_complete("".join(str(rng.randrange(10)) for _ in range(length - 1))))
        valid.append(f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}")
        valid.append(f"{rng.choice(['110105', '310115'])}{rng.randrange(50, 99)}"  # 15 digits
                     f"{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
                     f"{rng.randrange(1000):03d}")
        good_id = make_id_number(rng, True)
        wrong = "0" if good_id[-1] != "0" else "1"
        near.append(good_id[:-1] + wrong)  # wrong check character
        near.append(good_id[:10] + "13" + good_id[12:])  # month 13 (check no longer fits either)
        card = make_card_number(rng)
        near.append(card[:-1] + str((int(card[-1]) + 1) % 10))  # fails Luhn
    return valid, near


def test_every_valid_number_is_masked_in_any_context() -> None:
    valid, near = corpus()
    contexts = ["{}", "证件号={}", "卡号:{} 介质=IC", "[柜员T0012] 手机 {} 结果=一致", "({})"]
    leaked = []
    for k, number in enumerate(valid):
        line = contexts[k % len(contexts)].format(number)
        if number in numbers.mask(line):
            leaked.append(line)
        grouped = " ".join(re.findall(".{1,4}", number)) if numbers.is_card_number(number) \
            else None
        if grouped and grouped in numbers.mask(f"卡号 {grouped} 完成"):
            leaked.append(grouped)
    assert not leaked, leaked[:5]
    masked_near = sum(1 for x in near if x not in numbers.mask(f"号码={x}"))
    print(f"\nnumber shield: {len(valid)} valid numbers masked, {len(near)} near misses, "
          f"{masked_near} of them masked anyway (a near miss is not a customer number)")
    assert masked_near < len(near) // 10  # near misses are recognised as such


def test_ordinary_figures_are_left_alone() -> None:
    line = ("[柜员T0012] 交易开始 TXN=000123 类型=理财购买 金额 CNY 12,345.00 "
            "2026-12-03 19:38:21 产品 代码=JX2026-118 终端号=TRM-0107")
    assert numbers.mask(line) == line


def test_masked_forms() -> None:
    rng = random.Random(3)
    card, ident = make_card_number(rng), make_id_number(rng, False)
    assert numbers.mask(card) == f"{card[:4]} **** **** {card[-4:]}"
    assert numbers.mask(ident) == ident[:3] + "*" * 11 + ident[-4:]
    assert numbers.mask("13812345678") == "138****5678"


def test_site_patterns_and_the_log_filter(caplog) -> None:
    """Tried: a log record whose arguments hold a card number and a site-specific member
    number. Asserted: the handler's output holds neither."""
    rng = random.Random(5)
    card = make_card_number(rng)
    shield.configure([r"M\d{8}"])
    try:
        handler = logging.StreamHandler(stream := __import__("io").StringIO())
        handler.addFilter(shield.MaskingFilter())
        log = logging.getLogger("test.shield")
        log.addHandler(handler)
        log.warning("line %s member %s", f"卡号={card}", "M12345678")
        log.removeHandler(handler)
    finally:
        shield.configure([])
    out = stream.getvalue()
    assert card not in out and "M12345678" not in out and "********" in out
