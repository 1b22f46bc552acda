"""A generator of teller-terminal operation logs, with the ground truth of what they hold.

Made here, from the style of line the simulated bank terminal writes (dualrec.sim.terminal):
`[柜员T0012] 交易开始 TXN=000123 类型=理财购买`, the customer's identity and card lines, the
steps regulation requires (风险评估, 风险揭示, 冷静期告知, 客户签名; 风险提示 for a large
transfer) and `交易结束 TXN=...`. Nothing is copied from a real terminal. Seeded: the same
(variant, seed) always gives the same bytes and the same schedule.

A corpus is

- ``script``: a timed byte script, ``[(offset_ns, bytes), ...]``, each entry one write on the
  line (so one read for the box when it keeps up): what the terminal sends and when;
- ``lines``: every line as the terminal wrote it, with its byte position in the stream, the
  transaction it belongs to (None: chatter outside every transaction) and its role;
- ``transactions``: per transaction its txn id, teller, business type, the required steps, the
  ones it leaves out, its start and end line bytes and positions, and whether it must become a
  session (a transaction whose start line is damaged must not, but its end line must be on
  record as ``transaction_end_without_start`` and all its bytes must be kept);
- ``site_oplog`` / ``site_transactions``: the settings a new user of such a terminal would put
  into the site config (nothing for GB18030 and UTF-8: the defaults, encoding ``auto`` and line
  end ``any``, read them; Big5 needs ``encoding = "big5"`` and, being a traditional-Chinese
  terminal, its own start/stop patterns, labels and steps).

What the variants exercise: GB18030, UTF-8 and Big5 text; CR, LF and CRLF mixed from line to
line; ESC/POS control runs (ESC @, ESC a 1, GS V 0) from a receipt printer on the same line;
NUL bytes; invalid byte runs; truncated lines (no terminator, then a pause longer than the
framer's idle timeout); a damaged start line; an end line followed within 0.5 s by the next
start line; an end line and the next start line in one write; transactions 0.5 s, 1 s, 3 s and
10 s apart (``full`` only); a 1 MiB line without a newline (``long_line_corpus``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from dualrec.sim.terminal import make_card_number, make_id_number

NS = 1_000_000_000
CRLF, LF, CR = b"\r\n", b"\n", b"\r"
# ESC/POS, as a terminal printing its log through a receipt printer sends it.
ESC_INIT = b"\x1b@"  # ESC @: initialise the printer
ESC_CENTER = b"\x1ba\x01"  # ESC a 1: centre
GS_CUT = b"\x1dV\x00"  # GS V 0: full cut (the 0 as a byte)
GS_CUT_ASCII = b"\x1dV0"  # GS V 0 with the 0 as ASCII '0', as some drivers send it
# Line noise: bytes that are invalid in every one of the encodings (0x80 and 0xFF start no
# character in GB18030, Big5 or UTF-8).
INVALID_RUNS = (b"\x80\xff\xfe\x81\x20\xa1", b"\xff\xff\x80", b"\x80\x80\xff")
DAMAGE = b"\x80\xff"  # inserted into a start pattern: the line no longer matches
TRUNCATED_PAUSE_S = 1.0  # after a line left without a terminator: well over the idle timeout
VARIANTS = ("gb18030", "utf-8", "big5")
MiB = 1 << 20


@dataclass(frozen=True)
class Language:
    """What a terminal writes, in simplified (mainland) or traditional (Taiwan) Chinese."""

    templates: dict[str, str]
    chatter: tuple[str, ...]
    businesses: dict[str, tuple[str, ...]]  # business type -> roles of its lines, in order
    steps: dict[str, str]  # required step name -> role of the line that does it
    required: dict[str, tuple[str, ...]]  # business type -> required step names
    products: tuple[tuple[str, str, str], ...]
    customers: tuple[tuple[str, int], ...]
    levels: tuple[str, ...]
    tellers: tuple[tuple[str, str], ...]
    start_word: str
    end_word: str


SIMPLIFIED = Language(
    templates={
        "start": "[柜员{teller}] 交易开始 TXN={txn} 类型={business}",
        "end": "[柜员{teller}] 交易结束 TXN={txn} 结果=成功",
        "id": "[柜员{teller}] 客户身份识别 姓名={name} 证件类型=居民身份证 证件号={idno}",
        "check": "[柜员{teller}] 联网核查 公民身份信息 结果=一致 照片比对=通过",
        "card": "[柜员{teller}] 读卡 卡号={card} 介质=IC芯片",
        "assess": "[柜员{teller}] 风险评估 等级={level} 有效期内",
        "product": "[柜员{teller}] 产品 代码={code} 名称={pname} 风险等级={risk}",
        "amount": "[柜员{teller}] 金额 CNY {amount:,.2f}",
        "disclose": "[柜员{teller}] 风险揭示 已宣读 产品说明书已交付 客户确认=是",
        "cooling": "[柜员{teller}] 冷静期告知 已告知 客户确认=是",
        "payee": "[柜员{teller}] 收款人 户名=上海某某贸易有限公司 卡号={card}",
        "warn": "[柜员{teller}] 风险提示 已告知防范电信网络诈骗 客户确认=是",
        "sign": "[柜员{teller}] 客户签名 电子签名板 完成",
        "print": "[柜员{teller}] 打印凭条 第{n}联 共2联",
        "receipt": "回单打印 TXN={txn} 客户留存联",
        "banner": "[系统] 柜面业务系统 V3.2.1 终端号=TRM-0107 网点=0321 串口日志开启",
        "signin": "[系统] 柜员签到 工号={teller} 姓名={tname}",
        "signout": "[系统] 柜员签退 工号={teller}",
        "dump": "[柜员{teller}] 流水明细 ",
        "dump_row": "2026-12-03 转账支出 CNY 1,000.00 余额 88,000.00 摘要=代发工资; ",
        "idle_dump": "[系统] 日志转储 ",
    },
    chatter=("[打印机] 状态=就绪", "[系统] 心跳 终端号=TRM-0107", "[排队机] 叫号 A{n:03d}",
             "[打印机] 出纸完成", "[系统] 日终批处理检查 第{n}批"),
    businesses={
        "理财购买": ("id", "check", "card", "assess", "product", "amount", "disclose", "cooling",
                 "sign"),
        "保险代销": ("id", "check", "card", "assess", "product", "amount", "disclose", "cooling",
                 "sign"),
        "大额转账": ("id", "check", "card", "payee", "amount", "warn", "sign"),
    },
    steps={"风险评估": "assess", "风险揭示": "disclose", "冷静期告知": "cooling",
           "客户签名": "sign", "风险提示": "warn"},
    required={"理财购买": ("风险评估", "风险揭示", "冷静期告知", "客户签名"),
              "保险代销": ("风险评估", "风险揭示", "冷静期告知", "客户签名"),
              "大额转账": ("风险提示", "客户签名")},
    products=(("JX2026-118", "稳盈增利180天", "R2"), ("JX2026-317", "睿进混合3号", "R3"),
              ("BX-88061", "金福年年两全保险(分红型)", "R2"),
              ("BX-88102", "康宁终身重大疾病保险", "R1")),
    customers=(("王建国", 1), ("刘芳", 0), ("赵德胜", 1), ("孙丽娟", 0), ("周海涛", 1),
               ("吴雅婷", 0)),
    levels=("C2 谨慎型", "C3 稳健型", "C4 积极型"),
    tellers=(("T0012", "张敏"), ("T0047", "李志强"), ("T0105", "陈晓燕")),
    start_word="交易开始",
    end_word="交易结束",
)

TRADITIONAL = Language(
    templates={
        "start": "[櫃員{teller}] 交易開始 TXN={txn} 類型={business}",
        "end": "[櫃員{teller}] 交易結束 TXN={txn} 結果=成功",
        "id": "[櫃員{teller}] 客戶身份識別 姓名={name} 證件類型=身分證 證件號={idno}",
        "check": "[櫃員{teller}] 聯網核查 結果=一致 照片比對=通過",
        "card": "[櫃員{teller}] 讀卡 卡號={card} 介質=IC晶片",
        "assess": "[櫃員{teller}] 風險評估 等級={level} 有效期內",
        "product": "[櫃員{teller}] 產品 代碼={code} 名稱={pname} 風險等級={risk}",
        "amount": "[櫃員{teller}] 金額 TWD {amount:,.2f}",
        "disclose": "[櫃員{teller}] 風險揭示 已宣讀 產品說明書已交付 客戶確認=是",
        "cooling": "[櫃員{teller}] 冷靜期告知 已告知 客戶確認=是",
        "payee": "[櫃員{teller}] 收款人 戶名=台北某某貿易有限公司 帳號={card}",
        "warn": "[櫃員{teller}] 風險提示 已告知防範詐騙 客戶確認=是",
        "sign": "[櫃員{teller}] 客戶簽名 電子簽名板 完成",
        "print": "[櫃員{teller}] 列印憑條 第{n}聯 共2聯",
        "receipt": "回單列印 TXN={txn} 客戶留存聯",
        "banner": "[系統] 櫃面業務系統 V3.2.1 終端號=TRM-0107 網點=0321 串列埠日誌開啟",
        "signin": "[系統] 櫃員簽到 工號={teller} 姓名={tname}",
        "signout": "[系統] 櫃員簽退 工號={teller}",
        "dump": "[櫃員{teller}] 流水明細 ",
        "dump_row": "2026-12-03 轉帳支出 TWD 1,000.00 餘額 88,000.00 摘要=薪資; ",
        "idle_dump": "[系統] 日誌轉儲 ",
    },
    chatter=("[印表機] 狀態=就緒", "[系統] 心跳 終端號=TRM-0107", "[排隊機] 叫號 A{n:03d}",
             "[印表機] 出紙完成", "[系統] 日終批次檢查 第{n}批"),
    businesses={
        "理財購買": ("id", "check", "card", "assess", "product", "amount", "disclose", "cooling",
                 "sign"),
        "保險代銷": ("id", "check", "card", "assess", "product", "amount", "disclose", "cooling",
                 "sign"),
        "大額轉帳": ("id", "check", "card", "payee", "amount", "warn", "sign"),
    },
    steps={"風險評估": "assess", "風險揭示": "disclose", "冷靜期告知": "cooling",
           "客戶簽名": "sign", "風險提示": "warn"},
    required={"理財購買": ("風險評估", "風險揭示", "冷靜期告知", "客戶簽名"),
              "保險代銷": ("風險評估", "風險揭示", "冷靜期告知", "客戶簽名"),
              "大額轉帳": ("風險提示", "客戶簽名")},
    products=(("JX2026-118", "穩盈增利180天", "R2"), ("JX2026-317", "睿進混合3號", "R3"),
              ("BX-88061", "金福年年兩全保險(分紅型)", "R2"),
              ("BX-88102", "康寧終身重大疾病保險", "R1")),
    customers=(("王建國", 1), ("劉芳", 0), ("趙德勝", 1), ("孫麗娟", 0), ("周海濤", 1),
               ("吳雅婷", 0)),
    levels=("C2 謹慎型", "C3 穩健型", "C4 積極型"),
    tellers=(("T0012", "張敏"), ("T0047", "李志強"), ("T0105", "陳曉燕")),
    start_word="交易開始",
    end_word="交易結束",
)


@dataclass(frozen=True)
class Line:
    """One line as the terminal wrote it (terminator included; none for a truncated line)."""

    pos: int  # byte offset in the stream
    data: bytes
    owner: int | None  # index into Corpus.transactions; None: outside every transaction
    role: str

    @property
    def end(self) -> int:
        return self.pos + len(self.data)


@dataclass
class Transaction:
    txn: str
    teller: str
    business: str
    required: tuple[str, ...]
    missing: tuple[str, ...]  # required steps this transaction leaves out
    start_line: bytes = b""
    end_line: bytes = b""
    start_pos: int = 0  # offset of the start line's first byte
    end_pos: int = 0  # offset just past the end line
    damaged_start: bool = False  # its start pattern is broken: no session, an orphan end

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def expect_session(self) -> bool:
        return not self.damaged_start

    @property
    def labels(self) -> dict[str, str]:
        return {"txn": self.txn, "teller": self.teller, "business": self.business}


@dataclass
class Corpus:
    name: str
    encoding: str  # what the terminal writes in
    language: Language
    script: list[tuple[int, bytes]] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    site_oplog: dict[str, object] = field(default_factory=dict)
    site_transactions: dict[str, object] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.script)

    @property
    def duration_s(self) -> float:
        return self.script[-1][0] / NS if self.script else 0.0

    @property
    def sessions(self) -> list[Transaction]:
        """The transactions that must each become one session, in order."""
        return [t for t in self.transactions if t.expect_session]

    def lines_of(self, index: int) -> list[Line]:
        return [ln for ln in self.lines if ln.owner == index]

    def summary(self) -> str:
        ends = {"CRLF": 0, "LF": 0, "CR": 0, "none": 0}
        for ln in self.lines:
            ends["CRLF" if ln.data.endswith(CRLF) else "CR" if ln.data.endswith(CR)
                 else "LF" if ln.data.endswith(LF) else "none"] += 1
        return (f"{self.name}: {len(self.data)} bytes, {len(self.lines)} lines {ends}, "
                f"{len(self.transactions)} transactions over {self.duration_s:.1f} s")


@dataclass(frozen=True)
class Spec:
    """One transaction of a layout."""

    business: int  # index into the language's business types: 0 理财购买, 1 保险代销, 2 大额转账
    gap_s: float = 2.0  # from the previous transaction's end line to this start line
    omit: tuple[int, ...] = ()  # indices into the business's required steps to leave out
    damaged: bool = False
    same_write: bool = False  # the start line goes out in one write with the previous end line
    esc_start: bool = False  # the start line begins with ESC @ (receipt printer reset)
    truncated_step: bool = False  # a line inside it is truncated, then a pause
    noise: bool = False  # NULs, an invalid byte run, an ESC/POS receipt line
    teller: int = 0  # index into the language's tellers
    after: tuple[float, ...] = ()  # chatter lines this long after its end line (seconds)


def _layout(kind: str) -> list[Spec]:
    if kind == "full":
        return [
            Spec(0, gap_s=0.0, noise=True, after=(0.8,)),
            Spec(1, gap_s=3.0, omit=(1,)),  # 3 s apart; no risk disclosure
            Spec(2, gap_s=0.3),  # its start within 0.5 s of the previous end
            Spec(0, same_write=True, esc_start=True, truncated_step=True),
            Spec(0, gap_s=0.5, omit=(2, 3), noise=True),  # 0.5 s apart
            Spec(2, gap_s=1.0, omit=(0,)),  # 1 s apart; no risk warning
            Spec(1, gap_s=10.0, teller=1, after=(0.6,)),  # 10 s apart, after a shift change
            Spec(0, gap_s=4.0, damaged=True, teller=1),
            Spec(1, gap_s=3.0, teller=1, noise=True, after=(0.5, 1.2)),
        ]
    if kind == "short":
        return [
            Spec(0, gap_s=0.0, noise=True),
            Spec(2, gap_s=0.3, omit=(0,)),
            Spec(1, same_write=True, esc_start=True, truncated_step=True, after=(0.7,)),
            Spec(0, gap_s=3.5, damaged=True),
            Spec(1, gap_s=1.0, omit=(2,), noise=True),
            Spec(0, gap_s=0.5, after=(0.5, 1.2)),
        ]
    raise ValueError(kind)


class _Builder:
    def __init__(self, corpus: Corpus, rng: random.Random) -> None:
        self.c = corpus
        self.rng = rng
        self.t = 0.0  # seconds: when the next write is due
        self.pos = 0
        self.n = 0  # counter for chatter numbering

    def encode(self, text: str) -> bytes:
        return text.encode(self.c.encoding)

    def term(self) -> bytes:
        return self.rng.choice((CRLF, CRLF, CRLF, LF, CR))

    def emit(self, data: bytes, owner: int | None, role: str, *, join: bool = False) -> Line:
        """Send data as a new write at self.t, or appended to the previous write (join)."""
        if join:
            off, prev = self.c.script[-1]
            self.c.script[-1] = (off, prev + data)
        else:
            self.c.script.append((int(self.t * NS), data))
        line = Line(self.pos, data, owner, role)
        self.c.lines.append(line)
        self.pos += len(data)
        return line

    def chatter(self, index: int | None = None, *, prefix: bytes = b"", suffix: bytes = b"",
                term: bytes | None = None) -> Line:
        self.n += 1
        chat = self.c.language.chatter
        text = chat[self.rng.randrange(len(chat)) if index is None else index]
        return self.emit(prefix + self.encode(text.format(n=self.n)) + suffix
                         + (self.term() if term is None else term), None, "chatter")

    def step(self) -> None:
        self.t += self.rng.uniform(0.12, 0.35)


def _fill(lang: Language, role: str, teller: str, txn: str, business: str,
          rng: random.Random, n: int = 1) -> str:
    code, pname, risk = rng.choice(lang.products)
    name, male = rng.choice(lang.customers)
    idno = make_id_number(rng, bool(male))
    if lang is TRADITIONAL:  # a Taiwan ID: a letter, the sex digit, 8 digits
        idno = (rng.choice("ABCDEFGHJKLMNPQRSTUVXYWZIO") + ("1" if male else "2")
                + "".join(str(rng.randrange(10)) for _ in range(8)))
    return lang.templates[role].format(
        teller=teller, txn=txn, business=business, name=name, idno=idno,
        card=make_card_number(rng), level=rng.choice(lang.levels), code=code, pname=pname,
        risk=risk, amount=rng.randrange(5, 500) * 1000, n=n)


def make_corpus(variant: str, seed: int = 0, kind: str = "short") -> Corpus:
    """A teller's log in one encoding: kind "short" (6 transactions, about 20 s) or "full"
    (9 transactions, about 45 s, with the 3 s and 10 s gaps and a shift change)."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    lang = TRADITIONAL if variant == "big5" else SIMPLIFIED
    corpus = Corpus(f"{variant}-{kind}-{seed}", variant, lang)
    if variant == "big5":
        corpus.site_oplog, corpus.site_transactions = big5_site(lang)
    rng = random.Random(f"{variant}/{kind}/{seed}")
    b = _Builder(corpus, rng)
    specs = _layout(kind)
    teller0 = lang.tellers[specs[0].teller]
    # Before the first transaction: the system's banner and the teller's sign-in, a printer
    # line padded with NULs, and a line cut short (no terminator) followed by a pause.
    b.emit(b.encode(lang.templates["banner"]) + CRLF, None, "chatter")
    b.t += 0.25
    b.emit(b.encode(lang.templates["signin"].format(teller=teller0[0], tname=teller0[1])) + CR,
           None, "chatter")
    b.t += 0.25
    b.chatter(0, prefix=b"\x00\x00", suffix=b"\x00", term=LF)
    b.t += 0.2
    b.emit(CRLF, None, "blank")
    b.t += 0.3
    b.chatter(4, term=b"")  # truncated: no terminator
    b.t += TRUNCATED_PAUSE_S
    txn_base = rng.randrange(100, 800)
    for i, spec in enumerate(specs):
        following = specs[i + 1] if i + 1 < len(specs) else None
        _transaction(b, i, spec, txn_base + i, next_same_write=bool(
            following and following.same_write))
    # The terminal stops in the middle of a line: it ends by the idle timeout (or the stop).
    b.t = corpus.script[-1][0] / NS + 0.4
    b.chatter(4, term=b"")
    _check(corpus)
    return corpus


def _transaction(b: _Builder, index: int, spec: Spec, number: int, *,
                 next_same_write: bool = False) -> None:
    c, rng, lang = b.c, b.rng, b.c.language
    business = list(lang.businesses)[spec.business]
    teller, tname = lang.tellers[spec.teller]
    if index and not spec.same_write:
        prev_teller = c.transactions[-1].teller
        if teller != prev_teller:  # a shift change in the gap, while the box is idle
            gap = spec.gap_s
            b.t += gap * 0.3
            b.emit(b.encode(lang.templates["signout"].format(teller=prev_teller)) + CRLF,
                   None, "chatter")
            b.t += gap * 0.2
            b.chatter(1)
            b.t += gap * 0.2
            b.emit(b.encode(lang.templates["signin"].format(teller=teller, tname=tname))
                   + b.term(), None, "chatter")
            b.t += gap * 0.3
        else:
            b.t += spec.gap_s
    required = lang.required[business]
    missing = tuple(required[k] for k in spec.omit)
    tr = Transaction(txn=f"{number:06d}", teller=teller, business=business, required=required,
                     missing=missing, damaged_start=spec.damaged)
    c.transactions.append(tr)
    start = b.encode(lang.templates["start"].format(teller=teller, txn=tr.txn,
                                                     business=business))
    if spec.damaged:
        word = b.encode(lang.start_word)
        half = len(word) // 2  # between the second and third character: 交易|开始
        start = start.replace(word, word[:half] + DAMAGE + word[half:])
    if spec.esc_start:
        start = ESC_INIT + start
    line = b.emit(start + b.term(), index, "start", join=spec.same_write)
    tr.start_line, tr.start_pos = line.data, line.pos
    roles = [r for r in lang.businesses[business]
             if r not in {lang.steps[s] for s in missing}]
    truncate_at = rng.randrange(2, len(roles) - 1) if spec.truncated_step else -1
    for k, role in enumerate(roles):
        b.step()
        text = b.encode(_fill(lang, role, teller, tr.txn, business, rng))
        if spec.noise and role == "check":
            text = b"\x00" + text + b"\x00\x00"  # NULs around a line
        if spec.noise and role == "card":
            text = text + b" " + rng.choice(INVALID_RUNS)  # line noise at its end
        if k == truncate_at:
            b.emit(b.encode(_fill(lang, "print", teller, tr.txn, business, rng, n=1)), index,
                   "truncated")
            b.t += TRUNCATED_PAUSE_S
        b.emit(text + b.term(), index, role)
    if spec.noise:  # the receipt, printed through ESC/POS, logged on the same line
        b.step()
        receipt = (ESC_INIT + ESC_CENTER
                   + b.encode(lang.templates["receipt"].format(txn=tr.txn))
                   + rng.choice((GS_CUT, GS_CUT_ASCII)))
        b.emit(receipt + b.term(), index, "receipt")
    b.step()
    end = b.encode(lang.templates["end"].format(teller=teller, txn=tr.txn))
    # Before a start line in the same write, a bare CR: the hardest end for the framer (read
    # as content in CRLF-only mode, it would make the two lines one).
    line = b.emit(end + (CR if next_same_write else b.term()), index, "end")
    tr.end_line, tr.end_pos = line.data, line.end
    end_t = b.t
    for after in spec.after:
        b.t = end_t + after
        b.chatter(3 if after < 1 else None,
                  suffix=(b" " + rng.choice(INVALID_RUNS)) if spec.noise else b"")
    b.t = end_t


def long_line_corpus(seed: int = 0, size: int = MiB) -> Corpus:
    """A GB18030 log with two lines of `size` bytes and no newline: one while idle (a log dump)
    and one inside a transaction (a statement printed as one line), each followed by a pause
    longer than the idle timeout; the transaction around it is complete."""
    lang = SIMPLIFIED
    corpus = Corpus(f"gb18030-longline-{seed}", "gb18030", lang)
    rng = random.Random(f"longline/{seed}")
    b = _Builder(corpus, rng)
    teller, tname = lang.tellers[0]

    def big(head: str) -> bytes:
        row = b.encode(lang.templates["dump_row"])
        return _whole(b.encode(head.format(teller=teller)) + row * math.ceil(size / len(row)),
                      size)

    b.emit(b.encode(lang.templates["banner"]) + CRLF, None, "chatter")
    b.t += 0.3
    b.emit(b.encode(lang.templates["signin"].format(teller=teller, tname=tname)) + CRLF, None,
           "chatter")
    b.t += 0.3
    b.emit(big(lang.templates["idle_dump"]), None, "overlong")
    b.t += TRUNCATED_PAUSE_S + 0.5
    tr = Transaction(txn=f"{rng.randrange(100, 900):06d}", teller=teller, business="理财购买",
                     required=lang.required["理财购买"], missing=())
    corpus.transactions.append(tr)
    line = b.emit(b.encode(lang.templates["start"].format(teller=teller, txn=tr.txn,
                                                          business=tr.business)) + CRLF, 0,
                  "start")
    tr.start_line, tr.start_pos = line.data, line.pos
    roles = lang.businesses[tr.business]
    for k, role in enumerate(roles):
        b.step()
        b.emit(b.encode(_fill(lang, role, teller, tr.txn, tr.business, rng)) + b.term(), 0, role)
        if k == 3:
            b.step()
            b.emit(big(lang.templates["dump"]), 0, "overlong")
            b.t += TRUNCATED_PAUSE_S
    b.step()
    line = b.emit(b.encode(lang.templates["end"].format(teller=teller, txn=tr.txn)) + CRLF, 0,
                  "end")
    tr.end_line, tr.end_pos = line.data, line.end
    b.t += 0.5
    b.chatter(3)
    _check(corpus, need_all_ends=False)
    return corpus


def _whole(data: bytes, size: int) -> bytes:
    """data cut to exactly size bytes without splitting a GB18030 character (dots fill)."""
    cut = data[:size]
    for _ in range(4):  # a GB18030 character is at most 4 bytes
        try:
            cut.decode("gb18030")
            break
        except UnicodeDecodeError:
            cut = cut[:-1]
    return cut + b"." * (size - len(cut))


def big5_site(lang: Language) -> tuple[dict[str, object], dict[str, object]]:
    """What a new user sets up for a Big5 terminal writing traditional Chinese."""
    oplog = {"encoding": "big5", "start_patterns": [lang.start_word],
             "stop_patterns": [lang.end_word]}
    transactions = {
        "labels": [r"TXN=(?P<txn>[0-9A-Za-z_-]{1,40})",
                   r"\[櫃員(?P<teller>[0-9A-Za-z_-]{1,20})\]",
                   r"類型=(?P<business>[^\s=,;]{1,20})"],
        "required_steps": {business: {step: step for step in steps}
                           for business, steps in lang.required.items()},
    }
    return oplog, transactions


def read_as(raw: bytes, encoding: str) -> str:
    """A line's text as the site's encoding reads it (auto: UTF-8 if valid, else GB18030);
    for the generator's own checks, independent of the framer under test."""
    content = raw.rstrip(b"\r\n").replace(b"\x00", b"")
    if encoding == "auto":
        try:
            return content.decode("utf-8")
        except UnicodeDecodeError:
            encoding = "gb18030"
    return content.decode(encoding, errors="replace")


def site_encoding(corpus: Corpus) -> str:
    return str(corpus.site_oplog.get("encoding", "auto"))


def _check(corpus: Corpus, need_all_ends: bool = True) -> None:
    """The corpus says what it claims: bytes add up, every start/end/step line reads as the
    site reads it, no other line reads as a start, end or step, the damaged start does not."""
    lang, enc = corpus.language, site_encoding(corpus)
    data = corpus.data
    assert b"".join(ln.data for ln in corpus.lines) == data
    offsets = [off for off, _ in corpus.script]
    assert offsets == sorted(offsets), "the script goes back in time"
    assert all(data[ln.pos:ln.end] == ln.data for ln in corpus.lines)
    for i, tr in enumerate(corpus.transactions):
        text = read_as(tr.start_line, enc)
        assert (lang.start_word in text) != tr.damaged_start, (corpus.name, text)
        assert lang.end_word in read_as(tr.end_line, enc)
        owned = " ".join(read_as(ln.data, enc) for ln in corpus.lines_of(i))
        for step in tr.required:
            assert (step in owned) != (step in tr.missing), (corpus.name, tr.txn, step)
        assert corpus.lines_of(i)[0].data == tr.start_line
        assert corpus.lines_of(i)[-1].data == tr.end_line
    for ln in corpus.lines:
        if ln.owner is None:
            text = read_as(ln.data, enc)
            assert lang.start_word not in text and lang.end_word not in text, text
            assert "TXN=" not in text
    if need_all_ends:
        ends = {e: sum(1 for ln in corpus.lines if ln.data.endswith(e) and
                       not (e == LF and ln.data.endswith(CRLF))) for e in (CRLF, LF, CR)}
        assert all(n >= 2 for n in ends.values()), ends
        assert any(ln.role == "truncated" for ln in corpus.lines)
        assert sum(not ln.data.endswith((CR, LF)) for ln in corpus.lines) >= 3
    # A line ended by a bare CR and followed by one starting with LF would read as CRLF: the
    # generator never writes a line that starts with LF.
    assert not any(ln.data.startswith(LF) for ln in corpus.lines)


if __name__ == "__main__":  # print a corpus, for a person to look at
    import sys

    variant = sys.argv[1] if len(sys.argv) > 1 else "gb18030"
    kind = sys.argv[2] if len(sys.argv) > 2 else "short"
    c = make_corpus(variant, kind=kind)
    print(c.summary())
    for off, chunk in c.script:
        print(f"{off / NS:7.3f} {chunk!r}"[:160])
