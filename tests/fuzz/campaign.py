"""`make fuzz`: a mutation campaign against the strict verifier (issue 8, "Proof").

Run as ``python -m tests.fuzz.campaign [--count 20000] [--seed 1] [--workers 2]``. It seals a
small real recording once (tests/fuzz/base.py), then for each index makes a copy of device A's
directory, damages it with the mutation class ``index mod len(CLASSES)`` driven by
``random.Random(f"{seed}:{index}")`` (tests/fuzz/mutations.py) and runs
``verify_dir(dir, both device keys, identities=branch identity)``. The oracle:

- any exception from verify_dir is **crashed** (as is one from ``export_session(force=True)``
  other than ExportError, run on about 2 % of the directories);
- a directory that differs from the pristine one (any byte, name or file type) must fail
  ``report.passed(strict=True)``: **rejected**; if it passes, **accepted** (a verifier bug);
- except a **tail removal** (the directory is the pristine one minus its newest whole segments,
  FORMAT.md §6.1): when the remaining last session ends final the chain cannot show it
  (**undetectable**, counted apart); when it is left open, strict mode must still fail
  (non-strict passing is expected; failing there too is noted as over-strict, not a bug);
- a mutation that leaves the directory as it was is a **noop** and not judged.

It prints tried / rejected / accepted / crashed / undetectable per class and in total, each
accepted or crashed mutation with the command that reproduces it, and the elapsed time; the
exit status is 1 if anything was accepted or crashed. ``--index N --keep DIR`` redoes one
mutation, keeps its directory and prints the verifier's findings. The base is sealed anew each
run (fresh keys and age ciphertexts), so a reproduction redoes the same mutation on an
equivalent recording.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from dualrec_tools.export import ExportError, export_session
from dualrec_tools.verify import Report, verify_dir

from .base import Base, build_base
from .mutations import CLASSES, Mutator, Skip

OUTCOMES = ("rejected", "accepted", "crashed", "undetectable", "noop")
TIME_LIMIT_S = 60  # a verify_dir or export that takes longer is hung: counted as crashed


class Hang(Exception):
    """verify_dir or export_session ran past TIME_LIMIT_S."""


@dataclass(frozen=True)
class Result:
    index: int
    cls: str
    outcome: str
    description: str
    detail: str = ""  # the exception, for crashed; the verdict, for accepted
    signature: str = ""  # what groups failures: the exception's type and where it came from
    over_strict: bool = False
    exported: bool = False


@dataclass
class Summary:
    seed: int
    count: int
    results: list[Result] = field(default_factory=list)
    elapsed_s: float = 0.0

    def counts(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {name: Counter() for name in CLASSES}
        for r in self.results:
            out[r.cls][r.outcome] += 1
        return out

    def total(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in ("accepted", "crashed")]

    @property
    def ok(self) -> bool:
        return not self.failures


# --- the oracle ---------------------------------------------------------------------------------

Fingerprint = frozenset[tuple[str, str, str]]


def fingerprint(directory: Path) -> Fingerprint:
    """Every entry: name, type, and the SHA-256 of a file's bytes or a symlink's target."""
    out = set()
    for entry in os.scandir(directory):
        mode = entry.stat(follow_symlinks=False).st_mode
        if entry.is_symlink():
            kind, what = "symlink", os.readlink(entry.path)
        elif entry.is_file(follow_symlinks=False):
            kind, what = "file", hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
        elif entry.is_dir(follow_symlinks=False):
            kind, what = "dir", ""
        else:
            kind, what = "special", oct(mode)
        out.add((entry.name, kind, what))
    return frozenset(out)


# FORMAT.md §1: what only a warning concerns when added to a directory: an uncommitted write
# (`.NAME.tmp` or `.NAME.XXXXXXXXXXXX.tmp`), or a payload past the last header (§6.1).
_TEMP = re.compile(r"\.[0-9]{10}\.(hdr\.json|payload\.age)(\.[0-9a-f]{12})?\.tmp", re.ASCII)
_PAYLOAD = re.compile(r"([0-9]{10})\.payload\.age", re.ASCII)


@dataclass(frozen=True)
class Oracle:
    pristine: Fingerprint
    tails: dict[Fingerprint, bool]  # pristine minus its newest k segments -> ends final
    last_seq: int

    def warnings_only(self, fp: Fingerprint) -> bool:
        """fp is the pristine directory plus entries FORMAT.md makes warnings of."""
        if not self.pristine < fp:
            return False
        for name, kind, _ in fp - self.pristine:
            m = _PAYLOAD.fullmatch(name)
            past_last = m is not None and kind == "file" and int(m.group(1)) > self.last_seq
            if not (past_last or _TEMP.fullmatch(name)):
                return False
        return True

    @classmethod
    def of(cls, base: Base) -> Oracle:
        pristine = fingerprint(base.device_dir)
        tails = {}
        for k in range(1, base.n):
            gone = {f"{s:010d}.{suffix}" for s in range(base.n - k, base.n)
                    for suffix in ("hdr.json", "payload.age")}
            tails[frozenset(e for e in pristine if e[0] not in gone)] = \
                base.fields[base.n - k - 1]["final"]
        return cls(pristine, tails, base.n - 1)


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"no verdict within {TIME_LIMIT_S} s")


def _judge(oracle: Oracle, directory: Path, report: Report) -> tuple[str, bool]:
    """(outcome, over_strict) of a verdict on a changed directory."""
    fp = fingerprint(directory)
    strict_ok = report.passed(strict=True)
    if fp in oracle.tails:
        if oracle.tails[fp]:  # the newest remaining session ends final: undetectable
            return ("undetectable" if strict_ok else "rejected"), False
        return ("accepted" if strict_ok else "rejected"), not report.passed(strict=False)
    # strict mode must refuse it all the same; not refusing it without --strict is over-strict
    over_strict = oracle.warnings_only(fp) and not report.passed(strict=False)
    return ("accepted" if strict_ok else "rejected"), over_strict


def mutate(base: Base, seed: int, index: int, directory: Path, stash: Path) -> tuple[str, str]:
    """(class, description) of mutation index, applied to a fresh copy in directory."""
    directory.mkdir(parents=True)
    stash.mkdir(parents=True, exist_ok=True)
    for entry in sorted(os.listdir(base.device_dir)):
        shutil.copyfile(base.device_dir / entry, directory / entry)
    names = list(CLASSES)
    cls = names[index % len(names)]
    m = Mutator(random.Random(f"{seed}:{index}"), base, directory, stash)
    try:
        return cls, CLASSES[cls](m)
    except Skip as exc:
        return cls, f"skipped: {exc}"


def run_one(base: Base, oracle: Oracle, seed: int, index: int, work: Path,
            export_fraction: float) -> Result:
    directory, stash = work / f"m{index}", work / f"stash{index}"
    try:
        cls, description = mutate(base, seed, index, directory, stash)
        if fingerprint(directory) == oracle.pristine:
            return Result(index, cls, "noop", description)
        outcome, over_strict, detail = "rejected", False, ""
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT_S)
        try:
            try:
                report = verify_dir(directory, base.keys, identities=base.identities)
            except BaseException as exc:  # any exception is the finding
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return Result(index, cls, "crashed", description, _exc(exc), _where(exc))
            outcome, over_strict = _judge(oracle, directory, report)
            if outcome == "accepted":
                detail = report.verdict(strict=True)
            exported = random.Random(f"export:{seed}:{index}").random() < export_fraction
            if exported:
                session = base.sessions[index % len(base.sessions)]
                try:
                    export_session(directory, session, work / f"export{index}",
                                   base.identities, base.keys, force=True)
                except ExportError:
                    pass
                except BaseException as exc:
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    return Result(index, cls, "crashed", description,
                                  f"export_session: {_exc(exc)}",
                                  f"export_session: {_where(exc)}", exported=True)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        return Result(index, cls, outcome, description, detail, "", over_strict, exported)
    finally:
        for p in (directory, stash, work / f"export{index}"):
            shutil.rmtree(p, ignore_errors=True)


def _frames(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-4:] if exc.__traceback__ else []
    return " > ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames)


def _exc(exc: BaseException) -> str:
    """The exception and the innermost frames it came through (file:line > ... > file:line)."""
    where = _frames(exc)
    return f"{type(exc).__name__}: {str(exc)[:200]}" + (f" at {where}" if where else "")


def _where(exc: BaseException) -> str:
    return f"{type(exc).__name__} at {_frames(exc)}"


# --- running it ---------------------------------------------------------------------------------

_WORKER: tuple[Base, Oracle, int, Path, float] | None = None  # set before the pool forks


def _run_chunk(indices: Sequence[int]) -> list[Result]:
    assert _WORKER is not None
    base, oracle, seed, work, export_fraction = _WORKER
    own = work / f"w{os.getpid()}"
    own.mkdir(exist_ok=True)
    return [run_one(base, oracle, seed, i, own, export_fraction) for i in indices]


def _scratch() -> Path:
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="dualrec-fuzz-", dir=where))


def run_campaign(count: int, seed: int = 1, workers: int = 2, export_fraction: float = 0.02,
                 start: int = 0, classes: Sequence[str] | None = None) -> Summary:
    """Mutations start..start+count-1 of the seeded campaign (only those of the given classes,
    if any); the table is format_table's."""
    global _WORKER
    t0 = time.monotonic()
    work = _scratch()
    try:
        base = build_base(work / "base")
        oracle = Oracle.of(base)
        _WORKER = (base, oracle, seed, work, export_fraction)
        names = list(CLASSES)
        indices = [i for i in range(start, start + count)
                   if classes is None or names[i % len(names)] in classes]
        chunk = 25
        chunks = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
        summary = Summary(seed, len(indices))
        if workers <= 1:
            for c in chunks:
                summary.results.extend(_run_chunk(c))
        else:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers) as pool:
                for results in pool.imap_unordered(_run_chunk, chunks):
                    summary.results.extend(results)
        summary.results.sort(key=lambda r: r.index)
    finally:
        _WORKER = None
        shutil.rmtree(work, ignore_errors=True)
    summary.elapsed_s = time.monotonic() - t0
    return summary


def format_table(summary: Summary, limit: int = 3) -> str:
    cols = ("tried", "rejected", "accepted", "crashed", "undetectable", "noop")
    width = max(len(n) for n in CLASSES) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{c:>13}" for c in cols)]
    counts = summary.counts()
    for name, c in counts.items():
        if not c:
            continue  # a class left out by --classes
        tried = sum(c[o] for o in OUTCOMES if o != "noop")
        lines.append(f"{name:<{width}}{tried:>13}" + "".join(f"{c[o]:>13}" for o in cols[1:]))
    tried = sum(1 for r in summary.results if r.outcome != "noop")
    lines.append(f"{'TOTAL':<{width}}{tried:>13}"
                 + "".join(f"{summary.total(o):>13}" for o in cols[1:]))
    exports = sum(1 for r in summary.results if r.exported)
    over = sum(1 for r in summary.results if r.over_strict)
    lines.append(f"seed {summary.seed}, {len(summary.results)} mutations, {exports} also "
                 f"exported with --force, {summary.elapsed_s:.1f} s")
    lines.append(f"over-strict (warnings-only changes, or a tail left open, failing without "
                 f"--strict; FORMAT.md §6.1 says they pass): {over}")
    for r in [r for r in summary.results if r.over_strict][:limit]:
        lines.append(f"    #{r.index} {r.cls}: {r.description}")
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in summary.failures:
        groups.setdefault((r.outcome, r.cls, r.signature), []).append(r)
    for (outcome, cls, signature), rs in sorted(groups.items()):
        lines.append(f"{outcome.upper()} {cls}{': ' + signature if signature else ''}: "
                     f"{len(rs)} mutations")
        for r in rs[:limit]:
            lines.append(f"    #{r.index}: {r.description}\n        {r.detail}\n        "
                         f"reproduce: python -m tests.fuzz.campaign --seed {summary.seed} "
                         f"--index {r.index} --keep /tmp/fuzz-{r.index}")
    return "\n".join(lines)


def reproduce(seed: int, index: int, keep: Path) -> int:
    """Redo one mutation; keep the base and the damaged directory; print the findings."""
    keep.mkdir(parents=True, exist_ok=False)
    base = build_base(keep / "base")
    directory = keep / "device"
    cls, description = mutate(base, seed, index, directory, keep / "stash")
    print(f"{cls} #{index}: {description}\ndirectory: {directory}\nkeys: "
          f"{', '.join(k.source for k in base.keys)}\nidentity: {keep / 'base/keys-a'}")
    try:
        report = verify_dir(directory, base.keys, identities=base.identities)
    except Exception:
        traceback.print_exc()
        return 1
    for p in report.problems:
        print(f"  {p.kind}: {'warning: ' if p.warning else ''}{p}")
    print(report.verdict(strict=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--export-fraction", type=float, default=0.02)
    ap.add_argument("--index", type=int, help="redo this one mutation (with --keep)")
    ap.add_argument("--keep", type=Path, help="where --index keeps its directories")
    ap.add_argument("--classes", help="comma-separated: only these mutation classes "
                    f"({', '.join(CLASSES)})")
    args = ap.parse_args(argv)
    if args.index is not None:
        keep = args.keep or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.index}-"))
        return reproduce(args.seed, args.index, keep)
    classes = args.classes.split(",") if args.classes else None
    unknown = set(classes or ()) - set(CLASSES)
    if unknown:
        ap.error(f"unknown classes: {', '.join(sorted(unknown))}")
    summary = run_campaign(args.count, args.seed, args.workers, args.export_fraction,
                           classes=classes)
    print(format_table(summary))
    print(f"elapsed: {summary.elapsed_s:.1f} s")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
