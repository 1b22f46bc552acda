"""The player's file: a session's segments remuxed (export.mux_session) and transcoded by
Debian's ffmpeg to MP4 (H.264 + AAC, faststart), with the viewer's name and the time of viewing
burned into the picture by ffmpeg's drawtext.

Why Debian's ffmpeg and not PyAV: PyAV's wheel carries an ffmpeg built without libfreetype, so
it has no drawtext; the distribution's ffmpeg (already a dependency) has it. Burned in, the
watermark is in every frame a screen recording captures and cannot be hidden with dev tools.
Why H.264 again rather than VP8/WebM: burning in means re-encoding, and libx264 (superfast) is
about four times as fast as libvpx's realtime mode here (30 s of 720p: 6.4 s against 57 s on a
loaded 2-core machine); Debian's Chromium plays H.264 + AAC in MP4 (canPlayType "probably"), as
Chrome and Edge do. PCM is what it does not play in MP4, hence AAC.

The first request streams the file as ffmpeg writes it (fragmented MP4, which a browser plays
as it grows but cannot seek in); once whole, it is remuxed into a plain MP4 with its index first,
which the page switches to and seeks in. Files are cached per (device, session, viewer) under
the service's cache directory, 0600 in a 0700 directory: they are decrypted evidence. A cached
file is reused for at most max_age seconds, so the burned-in time is never older than that, and
removed after it by sweep().
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dualrec_tools.export import mux_session

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # Debian: fonts-dejavu-core
FFMPEG_TIMEOUT_S = 600


class MediaError(RuntimeError):
    """The session's media cannot be made playable."""


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def watermark_text(viewer: str, when_ns: int) -> str:
    when = datetime.fromtimestamp(when_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{viewer}  {when}"


def _drawtext(textfile: Path, height: int) -> str:
    size = max(10, height // 22)
    common = (f"textfile='{textfile}':fontfile='{FONT}':fontsize={size}:fontcolor=white@0.75"
              ":box=1:boxcolor=black@0.35:boxborderw=3")
    # Twice (top left and bottom right), so cropping one corner does not remove it.
    return (f"drawtext={common}:x=6:y=6,"
            f"drawtext={common}:x=w-tw-6:y=h-th-6")


@dataclass
class Job:
    """One transcode: `partial` grows as ffmpeg writes it (fragmented MP4, playable as it
    grows); `streamed` once it is whole; `ready` once the cached file is in place or the job
    failed (`error`)."""

    partial: Path
    started: threading.Event = field(default_factory=threading.Event)
    streamed: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class MediaCache:
    def __init__(self, cache_dir: Path, max_age_s: float = 900.0) -> None:
        self.dir = _private_dir(cache_dir)
        self.max_age_s = max_age_s
        self._jobs: dict[str, Job] = {}
        self._guard = threading.Lock()

    def path(self, device: str, session: str, viewer: str) -> Path:
        who = hashlib.sha256(viewer.encode()).hexdigest()[:16]  # no name in a file name
        return self.dir / f"{device}.{session}.{who}.mp4"

    def fresh(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime < self.max_age_s
        except FileNotFoundError:
            return False

    def sweep(self) -> int:
        """Remove cached files past max_age (and work left by a crash): decrypted evidence is
        kept no longer than it is needed."""
        removed = 0
        now = time.time()
        for p in self.dir.iterdir():
            try:
                old = now - p.stat().st_mtime >= self.max_age_s
                if p.is_file() and p.suffix == ".mp4" and old:
                    p.unlink()
                    removed += 1
                elif p.is_dir() and p.name.startswith(".work-") and old:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                continue
        return removed

    def job(self, device: str, session: str, viewer: str,
            loader: Callable[[], tuple[list[tuple[int, bytes]], int]]) -> Job:
        """The running transcode for (device, session, viewer), started now if there is none.
        loader gives the media and the picture height; it runs in the job's thread."""
        out = self.path(device, session, viewer)
        with self._guard:
            job = self._jobs.get(out.name)
            if job is not None and not job.ready.is_set():
                return job
            self.sweep()
            work = Path(tempfile.mkdtemp(dir=self.dir, prefix=".work-"))
            job = Job(work / "stream.mp4")
            self._jobs[out.name] = job
        threading.Thread(target=self._run, args=(job, work, out, viewer, loader),
                         name=f"transcode {session}", daemon=True).start()
        return job

    def get(self, device: str, session: str, viewer: str,
            loader: Callable[[], tuple[list[tuple[int, bytes]], int]]) -> Path:
        """The finished file, made now unless a fresh one is cached (waits)."""
        out = self.path(device, session, viewer)
        if self.fresh(out):
            return out
        job = self.job(device, session, viewer, loader)
        job.ready.wait(FFMPEG_TIMEOUT_S * 2)
        if job.error:
            raise MediaError(job.error)
        return out

    def _run(self, job: Job, work: Path, out: Path, viewer: str,
             loader: Callable[[], tuple[list[tuple[int, bytes]], int]]) -> None:
        try:
            media, height = loader()
            if not media:
                raise MediaError("the session has no media")
            self._make(job, work, out, media, watermark_text(viewer, time.time_ns()),
                       height or 360)
        except Exception as exc:  # any failure ends the job with its reason, never the service
            job.error = str(exc) if isinstance(exc, MediaError) else f"{type(exc).__name__}"
        finally:
            job.started.set()
            job.streamed.set()
            job.ready.set()
            # readers still streaming hold their file open: removing the names is safe
            shutil.rmtree(work, ignore_errors=True)

    def _make(self, job: Job, w: Path, out: Path, media: list[tuple[int, bytes]], text: str,
              height: int) -> None:
        mkv, textfile = w / "in.mkv", w / "watermark.txt"
        fd = os.open(mkv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            mux_session(media, b"", f)
        textfile.write_text(text)
        os.close(os.open(job.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        job.started.set()
        # Fragmented (a moof per keyframe) so the browser plays what is written while ffmpeg
        # goes on. -copyts and no shifting: the file's times stay the session's media times (an
        # audio encoder's priming would otherwise move everything by some milliseconds), so a
        # log line's stamp is the player's currentTime.
        _ffmpeg(["-copyts", "-i", str(mkv), "-avoid_negative_ts", "disabled",
                 "-vf", _drawtext(textfile, height),
                 # keyframe every second: seeking to a log line decodes at most a second
                 "-c:v", "libx264", "-preset", "superfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 # no B-frames: a fragmented MP4 has no edit list to take back their delay
                 "-bf", "0",
                 "-force_key_frames", "expr:gte(t,n_forced*1)",
                 "-c:a", "aac", "-b:a", "96k",
                 "-movflags", "frag_keyframe+empty_moov+default_base_moof", "-f", "mp4",
                 "-y", str(job.partial)])
        job.streamed.set()
        # The cached file is a plain MP4 with its index first: a browser seeks in it by range
        # requests (in the growing fragmented one it cannot seek at all).
        tmp = w / "out.mp4"
        _ffmpeg(["-i", str(job.partial), "-c", "copy", "-avoid_negative_ts", "disabled",
                 "-movflags", "+faststart", "-f", "mp4", str(tmp)])
        os.chmod(tmp, 0o600)
        os.replace(tmp, out)


def _ffmpeg(args: list[str]) -> None:
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *args]
    try:
        run = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MediaError(f"ffmpeg: {exc}") from None
    if run.returncode != 0:
        raise MediaError("ffmpeg failed: " + run.stderr.decode(errors="replace")[-300:].strip())
