"""The sealer: commits payload then header atomically, links the chain, survives a full disk
and a crash between its steps without a gap, a fork or a corrupt file."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pyrage
import pytest

from dualrec.chain import ChainState
from dualrec.sealer import Sealer, SealError
from dualrec.segment_format import (
    GENESIS_PREV,
    header_hash,
    header_name,
    parse_header,
    payload_name,
    verify_signature,
)
from dualrec.timebase import Timebase
from segments import BOOT_A, make_segment


def make_sealer(spool: Path, state: Path, device_key, age_identity) -> Sealer:
    return Sealer(device_id="test-0001", key=device_key,
                  recipients=[str(age_identity.to_public())], spool_dir=spool,
                  chain=ChainState(state), timebase=Timebase(), boot_id=BOOT_A)


def test_seal_links_chain_and_decrypts(tmp_path, device_key, age_identity):
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", device_key, age_identity)
    first = sealer.seal(make_segment(index=0))
    second = sealer.seal(make_segment(index=1, final=True))
    h0 = first.header_path.read_bytes()
    h1 = parse_header(second.header_path.read_bytes())
    assert parse_header(h0)["prev"] == GENESIS_PREV and h1["prev"] == header_hash(h0)
    assert (first.seq, second.seq) == (0, 1)
    assert verify_signature(h1, device_key.public_key())
    blob = second.payload_path.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == h1["payload"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(blob, [age_identity]))) as tar:
        names = tar.getnames()
    assert names == ["clock.json", "events.jsonl", "oplog.jsonl", "media.mkv"]


def test_age_cli_decrypts_what_the_box_sealed(tmp_path, device_key, age_identity):
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", device_key, age_identity)
    sealed = sealer.seal(make_segment())
    ident = tmp_path / "id.txt"
    ident.write_text(f"{age_identity}\n")
    out = subprocess.run(["age", "-d", "-i", str(ident), str(sealed.payload_path)],
                         capture_output=True, check=True).stdout
    assert out == pyrage.decrypt(sealed.payload_path.read_bytes(), [age_identity])
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert tar.getmember("media.mkv").size > 1000


def test_no_plaintext_on_disk(tmp_path, device_key, age_identity):
    """What sealing leaves on disk is ciphertext and headers only: no log text, no media."""
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", device_key, age_identity)
    sealer.seal(make_segment())
    needles = ["交易开始".encode("gb18030"), b"TXN=1", b"matroska", b"\x00\x00\x00\x01\x67"]
    for root, _, files in os.walk(tmp_path):
        for f in files:
            data = (Path(root) / f).read_bytes()
            assert not any(n in data for n in needles), f


def test_full_disk_is_an_error_never_a_corrupt_segment(tmp_path, small_tmpfs, device_key,
                                                      age_identity):
    """Tried: sealing ~190 KiB segments onto a 600 KiB disk until it is full.
    Asserted: the failing seal raises SealError, leaves no file for its seq and no temp file,
    the chain head does not move, every committed segment is intact, and after space returns
    the same segment seals under the same seq."""
    spool = small_tmpfs / "spool"
    sealer = make_sealer(spool, tmp_path / "state.db", device_key, age_identity)
    seg = make_segment(seconds=2)
    committed = []
    with pytest.raises(SealError) as err:
        for i in range(20):
            seg.index = i
            committed.append(sealer.seal(seg))
    assert "No space left" in str(err.value)
    failed_seq = len(committed)
    assert not (spool / header_name(failed_seq)).exists()
    assert not (spool / payload_name(failed_seq)).exists()
    assert not list(spool.glob(".*.tmp"))
    chain = ChainState(tmp_path / "state.db")
    assert chain.head().next_seq == failed_seq
    for s in committed:
        blob = s.payload_path.read_bytes()
        assert hashlib.sha256(blob).hexdigest() == s.header["payload"]["sha256"]
        pyrage.decrypt(blob, [age_identity])
    committed[0].payload_path.unlink()  # space returns (uplink acknowledged the oldest)
    committed[0].header_path.unlink()
    again = sealer.seal(seg)
    assert again.seq == failed_seq
    assert parse_header(again.header_path.read_bytes())["prev"] == header_hash(
        committed[-1].header_path.read_bytes())


def test_crash_between_steps_neither_forks_nor_gaps(tmp_path, device_key, age_identity):
    """Tried: a crash after the payload was written (no header), and a crash after the header
    was written but before the chain state moved. Asserted: on recovery the orphan payload is
    removed and its seq reused; the committed header is adopted and its seq not reused."""
    spool, state = tmp_path / "spool", tmp_path / "state.db"
    sealer = make_sealer(spool, state, device_key, age_identity)
    s0 = sealer.seal(make_segment(index=0))
    (spool / payload_name(1)).write_bytes(b"age-encryption.org/v1\n partial")
    sealer = make_sealer(spool, state, device_key, age_identity)
    adopted, removed = sealer.recover()
    assert adopted == [] and removed == [spool / payload_name(1)]
    s1 = sealer.seal(make_segment(index=1))
    assert s1.seq == 1
    # header 2 committed, then "killed" before the chain state update: roll the state back
    s2 = sealer.seal(make_segment(index=2))
    db = ChainState(state)
    db._db.execute("UPDATE chain SET next_seq = 2, prev = ?",
                   (header_hash(s1.header_path.read_bytes()),))
    sealer = make_sealer(spool, state, device_key, age_identity)
    adopted, removed = sealer.recover()
    assert adopted == [2] and removed == []
    s3 = sealer.seal(make_segment(index=3))
    assert s3.seq == 3 and s3.header["prev"] == header_hash(s2.header_path.read_bytes())
    assert s0.seq == 0


def test_sealer_refuses_to_sign_a_header_the_format_forbids(tmp_path, device_key, age_identity):
    """A segment whose header would break the schema (a session id of the wrong form, a final
    segment cut for `duration`) is refused with SealError before anything is written, and the
    chain does not move: the next valid segment takes the seq."""
    sealer = make_sealer(tmp_path / "spool", tmp_path / "state.db", device_key, age_identity)
    bad_id = make_segment(session="S1")
    bad_final = make_segment(final=True)
    bad_final.reason = "duration"
    for seg in (bad_id, bad_final):
        with pytest.raises(SealError, match="refusing to sign an invalid header"):
            sealer.seal(seg)
    assert list((tmp_path / "spool").iterdir()) == []
    assert sealer.seal(make_segment()).seq == 0


def test_receipt_with_a_bool_for_format_is_refused(device_key):
    """The box's receipt check uses the schema: `"format": true` equals 1 in Python, and was
    once accepted."""
    import base64

    from dualrec.canonical import canonical_bytes
    from dualrec.receipt import ReceiptError, sign_receipt, verify_receipt

    args = dict(device="test-0001", seq=3, header_sha256="a" * 64, payload_sha256="b" * 64)
    good = sign_receipt(**args, payload_size=10, received_utc_ns=1, receiver="branch",
                        key=device_key)
    assert verify_receipt(good, device_key.public_key(), **args)["seq"] == 3
    fields = {k: v for k, v in __import__("json").loads(good).items() if k != "sig"}
    fields["format"] = True
    sig = base64.b64encode(device_key.sign(canonical_bytes(fields))).decode()
    forged = canonical_bytes({**fields, "sig": sig})
    with pytest.raises(ReceiptError, match="schema"):
        verify_receipt(forged, device_key.public_key(), **args)
