"""Simulated microphone: real-time s16le PCM of a quiet room with a beep at every clapper instant.

A daemon thread hands out fixed-size blocks as soon as their last sample's time has passed,
stamped with the CLOCK_MONOTONIC time of their first sample. Each beep (BEEP_HZ for BEEP_MS at
half full scale) starts exactly on the sample nearest its clapper instant, across block
boundaries, so audio/video/log sync can be measured to the sample from a recording. Unlike the
camera, the simulated microphone never drops: if its thread is late it catches up.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt

from dualrec.devices.base import AudioFormat, AudioSink, DeviceError, EventSink
from dualrec.samples import AudioBlock, Event
from dualrec.sim.clapper import BEEP_HZ, BEEP_MS, claps_between, grid_start

NS = 1_000_000_000
STOP_TIMEOUT_S = 1.0
FULL_SCALE = 32767
BEEP_AMPLITUDE = 0.5  # of full scale: loud and clear, far from clipping with the noise on top


class SimMicrophone:
    """Microphone protocol implementation producing real-time PCM with clapper beeps."""

    def __init__(
        self,
        rate: int = 48000,
        channels: int = 1,
        block_frames: int = 960,
        clap_period_ms: int = 7000,
        noise_level: float = 0.002,
        seed: int = 0,
    ) -> None:
        if rate <= 0 or channels <= 0 or block_frames <= 0 or clap_period_ms <= 0:
            raise ValueError("microphone: rate, channels, block size and period must be positive")
        if not 0.0 <= noise_level < 0.5:
            raise ValueError("microphone: noise_level is a fraction of full scale below 0.5")
        self.format = AudioFormat(rate=rate, channels=channels)
        self.block_frames = block_frames
        self.clap_period_ns = clap_period_ms * 1_000_000
        self.noise_level = noise_level  # RMS, as a fraction of full scale (0.002 ≈ -54 dBFS)
        self.seed = seed
        self.beep_frames = BEEP_MS * rate // 1000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0

    def start(self, sink: AudioSink, events: EventSink) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise DeviceError("microphone: already started")
        rate = self.format.rate
        # Start on the grid where t0 + n*NS/rate is an integer for every n (125 µs at 48 kHz):
        # sample times are then exact integers and whole-ms clapper instants fall on samples.
        self._t0 = grid_start(rate)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(sink, events), name="sim-microphone", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_TIMEOUT_S)

    def _sample_time(self, n: int) -> int:
        return self._t0 + n * NS // self.format.rate

    def _nearest_sample(self, t_ns: int) -> int:
        # round half up of (t - t0) * rate / NS, in integers
        return (2 * (t_ns - self._t0) * self.format.rate + NS) // (2 * NS)

    def _beeps(self, first: int, count: int) -> npt.NDArray[np.float64]:
        """Beep signal (full-scale units) for samples [first, first + count)."""
        out = np.zeros(count)
        # Any beep overlapping the block starts in (first - beep, first + count); the time
        # window below is a superset of that, and the exact test is done on sample numbers.
        lo = self._sample_time(first - self.beep_frames) - 1
        hi = self._sample_time(first + count) + 1
        for clap in claps_between(lo, hi, self.clap_period_ns):
            onset = self._nearest_sample(clap)
            a = max(onset, first)
            b = min(onset + self.beep_frames, first + count)
            if a < b:
                # Phase counted from the onset sample, so every beep is the same waveform
                # starting at a zero crossing and rising.
                m = np.arange(a - onset, b - onset)
                out[a - first : b - first] = np.sin(2 * np.pi * BEEP_HZ * m / self.format.rate)
        return out * (BEEP_AMPLITUDE * FULL_SCALE)

    def _has_beep(self, first: int, count: int) -> bool:
        lo = self._sample_time(first - self.beep_frames) - 1
        hi = self._sample_time(first + count) + 1
        for clap in claps_between(lo, hi, self.clap_period_ns):
            onset = self._nearest_sample(clap)
            if max(onset, first) < min(onset + self.beep_frames, first + count):
                return True
        return False

    def _run(self, sink: AudioSink, events: EventSink) -> None:
        rng = np.random.default_rng(self.seed)
        n_block = self.block_frames
        channels = self.format.channels
        # The noise is drawn for BATCH blocks at once (the same values, in the same order, as
        # block by block) and a block without a beep is a slice of it, already rounded: per
        # block numpy calls were most of this thread's CPU, work a real microphone does not
        # put on the gateway.
        batch = max(1, self.format.rate // n_block)
        noise = quiet = np.empty(0)
        k = 0
        try:
            while not self._stop.is_set():
                first = k * n_block
                delay = self._sample_time(first + n_block) - time.monotonic_ns()
                if delay > 0 and self._stop.wait(delay / NS):
                    break
                i = k % batch
                if i == 0:
                    noise = rng.normal(0.0, self.noise_level * FULL_SCALE,
                                       (batch * n_block, channels))
                    quiet = np.clip(np.rint(noise), -32768, FULL_SCALE).astype("<i2")
                rows = slice(i * n_block, (i + 1) * n_block)
                if self._has_beep(first, n_block):
                    signal = noise[rows] + self._beeps(first, n_block)[:, None]
                    pcm = np.clip(np.rint(signal), -32768, FULL_SCALE).astype("<i2").tobytes()
                else:
                    pcm = quiet[rows].tobytes()
                sink(AudioBlock(t_mono_ns=self._sample_time(first), pcm=pcm, frames=n_block))
                k += 1
        except Exception as e:  # a dead microphone thread must be on record, whatever killed it
            events(
                Event(
                    t_mono_ns=time.monotonic_ns(),
                    kind="fault",
                    detail={"device": "microphone", "reason": f"{type(e).__name__}: {e}"},
                )
            )
