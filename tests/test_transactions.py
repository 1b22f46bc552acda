"""Transaction labels and completeness (dualrec.transactions) with the default rules of the
site config: labels from the start line and later lines, customer numbers never labels, the
required steps of each business type, and the recorder putting both on record."""

from __future__ import annotations

import random

from dualrec.config import TransactionsSection
from dualrec.sim.terminal import make_card_number, make_id_number
from dualrec.transactions import Transaction, TransactionRules

RULES = TransactionRules.build(TransactionsSection().labels, TransactionsSection().required_steps)


def test_labels_from_the_start_line_then_later_lines() -> None:
    t = Transaction(RULES)
    assert t.feed("[柜员T0012] 交易开始 TXN=000123") == {"teller": "T0012", "txn": "000123"}
    assert t.feed("[柜员T0012] 业务 类型=理财购买") == {"business": "理财购买"}
    assert t.feed("[柜员T0047] 类型=大额转账 TXN=999") == {}  # the first value of each stays
    assert t.labels == {"teller": "T0012", "txn": "000123", "business": "理财购买"}


def test_a_customer_number_never_becomes_a_label() -> None:
    """Tried: label patterns whose groups capture a resident ID, a bank card and a mobile
    number. Asserted: none of them is taken as a label."""
    rng = random.Random(2)
    rules = TransactionRules.build([r"TXN=(?P<txn>\w+)", r"柜员=(?P<teller>\w+)"], {})
    for number in (make_id_number(rng, True), make_card_number(rng), "13912345678"):
        assert rules.labels_in(f"TXN={number} 柜员={number}") == {}
    assert rules.labels_in("TXN=000123") == {"txn": "000123"}


def test_completeness_per_business_type() -> None:
    full = ["交易开始 TXN=1 类型=理财购买", "风险评估 等级=C3", "风险揭示 已宣读",
            "冷静期告知 已告知", "客户签名 完成", "交易结束 TXN=1"]
    t = Transaction(RULES)
    for line in full:
        t.feed(line)
    assert t.completeness() == {"business": "理财购买", "required": sorted(
        ["风险评估", "风险揭示", "冷静期告知", "客户签名"]), "missing": [], "complete": True}
    t = Transaction(RULES)
    for line in full:
        if "风险揭示" not in line:
            t.feed(line)
    c = t.completeness()
    assert c["complete"] is False and c["missing"] == ["风险揭示"]
    unknown = Transaction(RULES)
    unknown.feed("交易开始 TXN=2 类型=开户")  # a type with no rules: nothing required
    assert unknown.completeness()["complete"] is True
