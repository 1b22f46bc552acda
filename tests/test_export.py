"""`dualrec-tool export`: a verified session becomes one MKV (video remuxed, audio, the operation
log as subtitles) and its records unchanged; the Debian `age` CLI opens what the box sealed; the
clapper instants line up in the export within a frame."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import av
import pyrage
import pytest
from click.testing import CliRunner, Result

from dualrec import numbers
from dualrec.segment_format import payload_name
from dualrec_tools.cli import main
from dualrec_tools.export import decrypt_payload, load_identities, srt_document
from dualrec_tools.sync import measure_sync
from test_verify import NS, Recording, build_recording, flip

MS = 1_000_000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return build_recording(tmp_path_factory.mktemp("recording"))


def export(rec: Recording, session: str, out: Path, *extra: str,
           device_key: bool = True) -> Result:
    args = ["export", "--identity", str(rec.identity), "--spool", str(rec.spool),
            session, "--out", str(out), *extra]
    if device_key:
        args += ["--device-key", str(rec.pub)]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def exported(built: Recording, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    result = export(built, built.session_a, out)
    assert result.exit_code == 0, result.output
    return out


def decrypted(rec: Recording, seqs: range) -> list[dict[str, bytes]]:
    ids = load_identities(rec.identity)
    return [decrypt_payload((rec.spool / payload_name(s)).read_bytes(), ids) for s in seqs]


def test_mkv_has_video_audio_and_the_log_as_subtitles(built: Recording, exported: Path) -> None:
    mkv = exported / f"{built.session_a}.mkv"
    assert stat.S_IMODE(mkv.stat().st_mode) == 0o600  # plaintext personal data
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(mkv)],
        capture_output=True, check=True, text=True).stdout)
    assert [(s["codec_type"], s["codec_name"]) for s in probe["streams"]] == [
        ("video", "h264"), ("audio", "pcm_s16le"), ("subtitle", "subrip"), ("subtitle", "subrip")]
    assert probe["streams"][2]["disposition"]["default"] == 1
    assert probe["streams"][2]["tags"]["language"] == "chi"
    assert probe["streams"][3]["tags"] == {"title": "time code", "language": "zxx"} | {
        k: v for k, v in probe["streams"][3]["tags"].items() if k not in ("title", "language")}

    with av.open(str(mkv)) as c:
        assert [s.type for s in c.streams] == ["video", "audio", "subtitle", "subtitle"]
        video_ms, samples, cues = [], 0, []
        for packet in c.demux():
            if packet.pts is None or packet.size == 0:
                continue
            if packet.stream.type == "video":
                video_ms.append(packet.pts)
                assert packet.time_base == c.streams.video[0].time_base
            elif packet.stream.type == "audio":
                samples += sum(f.samples for f in packet.decode())
            elif packet.stream.index == 2:
                cues.append((packet.pts, bytes(packet).decode()))
    # the segments' timestamps are kept: one session timeline, 10 fps, three 2 s segments
    assert video_ms == [i * 100 for i in range(60)]
    assert samples == 3 * 2 * 48000
    # every log line at its time since the origin; lines in one millisecond share a cue
    expected: dict[int, list[str]] = {}
    for line in (exported / f"{built.session_a}.oplog.jsonl").open():
        r = json.loads(line)
        expected.setdefault((r["t_mono_ns"] - built.origin_a) // MS, []).append(r["text"])
    assert cues == [(ms, "\n".join(texts)) for ms, texts in expected.items()]
    assert (500, "MARK 1 t=1000500000000") in cues


def test_export_for_the_regulator_read_back_by_ffprobe(built: Recording, exported: Path) -> None:
    """The file's tags (wall-clock start, device, session, completeness), the log track's
    language, every cue shown until the next line and for at most 3 s, the time-code track's
    cues one second apart; beside it a masked transcript and the verification report."""
    mkv = exported / f"{built.session_a}.mkv"
    probe = json.loads(subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_packets", "-of", "json", str(mkv)],
        capture_output=True, check=True, text=True).stdout)
    tags = probe["format"]["tags"]
    assert tags["DEVICE"] == "box-0001" and tags["SESSION"] == built.session_a
    assert tags["DATE_RECORDED"].endswith("Z") and tags["DATE_RECORDED"].startswith("20")
    log_cues = [p for p in probe["packets"] if p["stream_index"] == 2]
    assert log_cues and all(0 < float(p["duration_time"]) <= 3.0 for p in log_cues)
    starts = [float(p["pts_time"]) for p in log_cues]
    for p, nxt in zip(log_cues, starts[1:], strict=False):
        assert float(p["pts_time"]) + float(p["duration_time"]) <= nxt + 1e-6
    clock = [float(p["pts_time"]) for p in probe["packets"] if p["stream_index"] == 3]
    assert len(clock) >= 5 and all(abs(b - a - 1) < 1e-3 for a, b in itertools.pairwise(clock))
    transcript = (exported / f"{built.session_a}.transcript.txt").read_text()
    assert "MARK 1" in transcript and not numbers.find(transcript)
    raw = (exported / f"{built.session_a}.oplog.jsonl").read_text()
    assert numbers.find("".join(json.loads(x)["text"] for x in raw.splitlines()))  # raw kept
    assert (exported / f"{built.session_a}.verify.txt").read_text().splitlines()[-1] == \
        "VERIFIED"


def test_records_are_exported_unchanged(built: Recording, exported: Path) -> None:
    parts = decrypted(built, range(3))
    oplog = (exported / f"{built.session_a}.oplog.jsonl").read_bytes()
    events = (exported / f"{built.session_a}.events.jsonl").read_bytes()
    assert oplog == b"".join(p["oplog.jsonl"] for p in parts)
    assert events == b"".join(p["events.jsonl"] for p in parts)
    kinds = [json.loads(x)["kind"] for x in events.splitlines()]
    assert kinds == ["session_start", "session_stop"]


def test_age_cli_decrypts_what_the_sealer_sealed(built: Recording) -> None:
    """The identity file `keys branch` wrote works with `age -d -i` as it is (comments and all)."""
    payload = built.spool / payload_name(0)
    out = subprocess.run(["age", "-d", "-i", str(built.identity), str(payload)],
                         capture_output=True, check=True).stdout
    assert out == pyrage.decrypt(payload.read_bytes(), load_identities(built.identity))
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        assert tar.getnames() == ["clock.json", "events.jsonl", "oplog.jsonl", "media.mkv"]


def test_sync_is_measured_at_every_clap(built: Recording, exported: Path) -> None:
    records = [json.loads(x) for x in (exported / f"{built.session_a}.oplog.jsonl").open()]
    report = measure_sync(exported / f"{built.session_a}.mkv", records, built.origin_a)
    assert [c.label for c in report.claps] == ["1", "2", "3"]
    assert [c.log_ns for c in report.claps] == list(built.claps_a)
    assert all(c.complete for c in report.claps)
    assert not report.unmatched_video and not report.unmatched_audio
    worst = report.max_abs_offset_us
    assert worst is not None and worst <= 33_000
    stored = report.to_json()
    assert json.loads(json.dumps(stored)) == stored
    assert all(isinstance(v, int) for c in stored["claps"] for v in c["offsets_us"].values())


def test_tampered_session_is_refused_unless_forced(built: Recording, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    shutil.copytree(built.spool, spool)
    rec = Recording(spool, built.keys, built.device_key, built.session_a, built.session_b,
                    built.origin_a, built.claps_a)
    flip(spool / payload_name(1), 1000)
    refused = export(rec, rec.session_a, tmp_path / "out")
    assert refused.exit_code != 0
    assert "seq 1: payload sha256 mismatch" in refused.output
    assert not (tmp_path / "out" / f"{rec.session_a}.mkv").exists()
    # the other session does not depend on the damaged segment
    assert export(rec, rec.session_b, tmp_path / "out").exit_code == 0
    forced = export(rec, rec.session_a, tmp_path / "forced", "--force")
    assert forced.exit_code == 0, forced.output
    assert "exported 2 segments" in forced.output
    assert "seq 1: cannot decrypt" in forced.output


def test_refusals_name_the_reason(built: Recording, tmp_path: Path) -> None:
    missing = export(built, "20990101T000000Z-ffffff", tmp_path)
    assert missing.exit_code != 0 and "no segments of session" in missing.output
    wrong = tmp_path / "other.agekey"
    wrong.write_text(f"# another branch\n{pyrage.x25519.Identity.generate()}\n")
    result = CliRunner().invoke(main, ["export", "--identity", str(wrong), "--spool",
                                       str(built.spool), built.session_b, "--out", str(tmp_path)])
    assert result.exit_code != 0 and "seq 3: payload does not decrypt" in result.output
    unchecked = export(built, built.session_b, tmp_path / "out", device_key=False)
    assert unchecked.exit_code == 0
    assert "signatures not checked" in unchecked.output


def test_sessions_lists_the_spool(built: Recording) -> None:
    result = CliRunner().invoke(main, ["sessions", "--spool", str(built.spool)])
    assert result.exit_code == 0
    rows = result.output.splitlines()[1:]
    assert [r.split()[:3] for r in rows] == [[built.session_a, "3", "0..2"],
                                             [built.session_b, "2", "3..4"]]
    assert [r.split()[-2:] for r in rows] == [["0:00:06", "complete"], ["0:00:02", "complete"]]


def test_subtitle_cues_hold_three_seconds_or_until_the_next_line() -> None:
    t0 = 5 * NS
    records = [{"t_mono_ns": t0 + 100 * MS, "text": "a"},
               {"t_mono_ns": t0 + 100 * MS + 10, "text": "b\x1b[0m"},  # same ms: one cue
               {"t_mono_ns": t0 + 1_000 * MS, "text": "   "},  # blank: no cue
               {"t_mono_ns": t0 + 2_000 * MS, "text": "c"},
               {"t_mono_ns": t0 + 9_000 * MS, "text": "d"}]
    srt, cues = srt_document(records, t0, end_ns=10_500 * MS)
    assert cues == 3
    assert srt.decode() == ("1\n00:00:00,100 --> 00:00:02,000\na\nb\u241b[0m\n\n"
                            "2\n00:00:02,000 --> 00:00:05,000\nc\n\n"
                            "3\n00:00:09,000 --> 00:00:10,500\nd\n")


def test_export_files_are_private(exported: Path) -> None:
    for f in exported.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_an_overlong_line_is_one_cue_of_bounded_text() -> None:
    """A 1 MiB line arrives as overlong pieces (the framer cuts at max_line) stamped over
    a minute and a half: one cue, not hundreds shown for under a millisecond each, and its
    text capped for the screen (the whole line stays in oplog.jsonl and the transcript)."""
    from dualrec_tools.export import CUE_MAX_CHARS, srt_document

    pieces = [{"t_mono_ns": k * 300 * MS, "text": "x" * 4096,
               "flags": ["overlong"] + (["continued"] if k else [])} for k in range(256)]
    pieces.append({"t_mono_ns": 256 * 300 * MS, "text": "next line", "flags": []})
    doc, cues = srt_document(pieces, 0)
    assert cues == 2
    first = doc.decode().split("\n\n")[0].splitlines()
    assert len("".join(first[2:])) <= CUE_MAX_CHARS + 1
