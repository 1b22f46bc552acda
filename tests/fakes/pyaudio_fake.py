"""A faithful stand-in for pyaudio 0.2.14 on PortAudio 19.6 (ALSA host API), with fault injection.

Not a ``pyaudio`` package on purpose: the real pyaudio runs in the same test process (on an ALSA
device), so the fake is handed to the backend as a module object::

    world = FakeAudioWorld()
    mic = PyAudioMicrophone(profile, pyaudio_module=world.module, realtime_ns=world.realtime_ns)

What it reproduces of the real thing (checked against pyaudio 0.2.14 and libportaudio2 19.6.0):

- Constants with the real values (paInt16 = 8, paContinue = 0, paInputOverflow = 2, error codes).
- ``PyAudio()`` enumerates the devices once, like Pa_Initialize: a device plugged in later is
  not listed until the next ``PyAudio()``; one unplugged since cannot be opened.
- ``get_device_info_by_index`` returns the real dict (keys, float latencies and rate) and raises
  ``OSError(-9996, 'Invalid device info')`` past the end; ``get_default_input_device_info``
  raises ``OSError('No Default Input Device Available')`` when there is none.
- ``is_format_supported`` returns True or raises ``ValueError(text, code)``, e.g.
  ``('Invalid sample rate', -9997)``, ``('Invalid number of channels', -9998)``; ``open`` raises
  ``OSError(code, text)`` for the same reasons, e.g. ``[Errno -9997] Invalid sample rate``.
- ``open(...)`` takes the real keyword arguments and starts the stream unless ``start=False``;
  ``start_stream``/``stop_stream`` are no-ops when already in that state; ``stop_stream`` waits
  for a running callback to return, and after it the callback is not called again.
- The callback runs on the stream's own thread as ``callback(in_data, frame_count, time_info,
  status_flags)`` with ``in_data`` a fresh ``bytes`` and ``time_info`` the real dict of float
  seconds. ``input_buffer_adc_time`` is the capture time of the block's first frame in the
  device's timestamp clock: CLOCK_REALTIME (``adc_clock="realtime"``: ALSA null/ioplug PCMs
  under PortAudio 19.6), CLOCK_MONOTONIC (``"monotonic"``: hw devices) or 0.0 (``"none"``).
  ``current_time`` is "now" in the same clock. The callback is called ``latency_ns`` after the
  block's last frame was captured.
- An exception in the callback prints its traceback and aborts the stream (pyaudio returns
  paAbort for it); returning paComplete or paAbort ends the stream. Either way ``is_active()``
  becomes False.

Fault injection on the world (all thread-safe):

- ``overflow(skip_frames)``: the device loses that many frames; the next callback carries
  paInputOverflow and its ADC time is that of its own first frame, after the hole.
- ``unplug(name)`` / ``plug(device)``: a running stream on it ends as on an ALSA error (the
  callback thread exits, ``is_active()`` False); new ``PyAudio()`` instances do not list it.
- ``stall(True)``: callbacks stop while the stream stays active (a wedged driver).
- ``hang_stop(True)``: ``stop_stream`` blocks until ``hang_stop(False)`` (PortAudio joining a
  callback thread stuck in the driver).
- A device's ``rate_error_ppm`` makes its sample clock run fast or slow against
  CLOCK_MONOTONIC, as a real crystal does.

Ground truth for assertions: each stream's ``log`` holds (first frame number, capture time in
CLOCK_MONOTONIC ns) of every block it delivered. The default signal is a ramp (frame number
modulo 2**16, the same on every channel), so lost or repeated frames are visible in the PCM.
"""

from __future__ import annotations

import threading
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NS = 1_000_000_000

CONSTANTS: dict[str, int] = {
    "paFloat32": 1, "paInt32": 2, "paInt24": 4, "paInt16": 8, "paInt8": 16, "paUInt8": 32,
    "paCustomFormat": 65536,
    "paContinue": 0, "paComplete": 1, "paAbort": 2,
    "paInputUnderflow": 1, "paInputOverflow": 2, "paOutputUnderflow": 4, "paOutputOverflow": 8,
    "paPrimingOutput": 16,
    "paFramesPerBufferUnspecified": 0,
    "paALSA": 8, "paJACK": 12, "paOSS": 7,
    "paNoError": 0, "paNotInitialized": -10000, "paUnanticipatedHostError": -9999,
    "paInvalidChannelCount": -9998, "paInvalidSampleRate": -9997, "paInvalidDevice": -9996,
    "paInvalidFlag": -9995, "paSampleFormatNotSupported": -9994,
    "paBadIODeviceCombination": -9993, "paInsufficientMemory": -9992, "paBufferTooBig": -9991,
    "paBufferTooSmall": -9990, "paNullCallback": -9989, "paBadStreamPtr": -9988,
    "paTimedOut": -9987, "paInternalError": -9986, "paDeviceUnavailable": -9985,
    "paStreamIsStopped": -9983, "paStreamIsNotStopped": -9982, "paInputOverflowed": -9981,
    "paOutputUnderflowed": -9980, "paCanNotReadFromACallbackStream": -9977,
}
_SAMPLE_SIZE = {1: 4, 2: 4, 4: 3, 8: 2, 16: 1, 32: 1}
_ERROR_TEXT = {
    -9999: "Unanticipated host error", -9998: "Invalid number of channels",
    -9997: "Invalid sample rate", -9996: "Invalid device", -9994: "Sample format not supported",
    -9985: "Device unavailable",
}

Signal = Callable[[int, int, int], bytes]


def ramp(first: int, frames: int, channels: int) -> bytes:
    """Frame number modulo 2**16 as s16le, on every channel."""
    n = (np.arange(first, first + frames, dtype=np.int64) & 0xFFFF).astype("<u2")
    return np.repeat(n, channels).tobytes()


@dataclass
class FakeDevice:
    """One PortAudio device as the ALSA host API would list it."""

    name: str
    max_input_channels: int = 2
    max_output_channels: int = 0
    rates: tuple[int, ...] = (16000, 32000, 44100, 48000)
    default_rate: float = 48000.0
    formats: tuple[int, ...] = (8, 2, 1)  # paInt16, paInt32, paFloat32
    adc_clock: str = "realtime"  # "realtime" | "monotonic" | "none"
    latency_ns: int = 5_000_000
    rate_error_ppm: float = 0.0
    signal: Signal = field(default=ramp)

    def info(self, index: int) -> dict[str, Any]:
        low, high = 512 / 44100, 2048 / 44100  # what PortAudio's ALSA API reports for plugins
        return {
            "index": index, "structVersion": 2, "name": self.name, "hostApi": 0,
            "maxInputChannels": self.max_input_channels,
            "maxOutputChannels": self.max_output_channels,
            "defaultLowInputLatency": low if self.max_input_channels else -1.0,
            "defaultLowOutputLatency": low if self.max_output_channels else -1.0,
            "defaultHighInputLatency": high if self.max_input_channels else -1.0,
            "defaultHighOutputLatency": high if self.max_output_channels else -1.0,
            "defaultSampleRate": self.default_rate,
        }


def default_devices() -> list[FakeDevice]:
    """A Pi with its headphone jack (output only), a USB microphone and ALSA's default PCM."""
    return [
        FakeDevice("bcm2835 Headphones: - (hw:0,0)", max_input_channels=0, max_output_channels=8,
                   adc_clock="monotonic"),
        FakeDevice("USB PnP Sound Device: Audio (hw:1,0)", max_input_channels=1,
                   rates=(44100, 48000), adc_clock="monotonic"),
        FakeDevice("default", max_input_channels=32, max_output_channels=32),
    ]


class FakeAudioWorld:
    """The machine behind the fake: its devices, its realtime clock and the faults to inject."""

    def __init__(self, devices: list[FakeDevice] | None = None,
                 realtime_offset_ns: int | None = None) -> None:
        self._lock = threading.Lock()
        self.devices: list[FakeDevice] = default_devices() if devices is None else list(devices)
        # CLOCK_REALTIME - CLOCK_MONOTONIC of this fake machine; by default the real one
        self.realtime_offset_ns = (time.time_ns() - time.monotonic_ns()
                                   if realtime_offset_ns is None else realtime_offset_ns)
        self.streams: list[FakeStream] = []  # open ones
        self.history: list[FakeStream] = []  # every stream ever opened, for assertions
        self.instances = 0  # PyAudio() objects not yet terminated
        self._stalled = False
        self._release = threading.Event()
        self._release.set()
        self.module = self._make_module()

    def realtime_ns(self) -> int:
        return time.monotonic_ns() + self.realtime_offset_ns

    def _make_module(self) -> types.ModuleType:
        mod = types.ModuleType("pyaudio")
        world = self

        class PyAudio(FakePyAudio):
            _world = world

        mod.__dict__.update(CONSTANTS, __version__="0.2.14", PyAudio=PyAudio,
                            get_sample_size=get_sample_size,
                            get_portaudio_version_text=lambda: "PortAudio V19.6.0-devel (fake)")
        return mod

    # --- fault injection -------------------------------------------------------------------

    def device(self, name: str) -> FakeDevice:
        with self._lock:
            for d in self.devices:
                if d.name == name:
                    return d
        raise KeyError(name)

    def unplug(self, name: str) -> FakeDevice:
        with self._lock:
            dev = next(d for d in self.devices if d.name == name)
            self.devices.remove(dev)
            streams = [s for s in self.streams if s.device is dev]
        for s in streams:
            s._vanish.set()
        return dev

    def plug(self, device: FakeDevice) -> None:
        with self._lock:
            self.devices.append(device)

    def overflow(self, skip_frames: int) -> None:
        with self._lock:
            streams = [s for s in self.streams if s.is_active()]
        for s in streams:
            s._skip(skip_frames)

    def stall(self, on: bool) -> None:
        self._stalled = on

    def hang_stop(self, on: bool) -> None:
        if on:
            self._release.clear()
        else:
            self._release.set()

    def plugged(self, dev: FakeDevice) -> bool:
        with self._lock:
            return dev in self.devices


def get_sample_size(fmt: int) -> int:
    try:
        return _SAMPLE_SIZE[fmt]
    except KeyError:
        raise ValueError("Invalid sample format", CONSTANTS["paSampleFormatNotSupported"]) from None


class FakePyAudio:
    """pyaudio.PyAudio: one PortAudio session with the device list taken at its start."""

    _world: FakeAudioWorld

    def __init__(self) -> None:
        with self._world._lock:
            self._devices = list(self._world.devices)
            self._world.instances += 1
        self._streams: set[FakeStream] = set()
        self._terminated = False

    def terminate(self) -> None:
        for s in list(self._streams):
            s.close()
        self._streams = set()
        if not self._terminated:
            self._terminated = True
            with self._world._lock:
                self._world.instances -= 1

    def get_sample_size(self, fmt: int) -> int:
        return get_sample_size(fmt)

    def get_host_api_count(self) -> int:
        return 1

    def get_default_host_api_info(self) -> dict[str, Any]:
        inputs = [i for i, d in enumerate(self._devices) if d.max_input_channels]
        outputs = [i for i, d in enumerate(self._devices) if d.max_output_channels]
        return {"index": 0, "structVersion": 1, "type": CONSTANTS["paALSA"], "name": "ALSA",
                "deviceCount": len(self._devices),
                "defaultInputDevice": inputs[0] if inputs else -1,
                "defaultOutputDevice": outputs[0] if outputs else -1}

    def get_device_count(self) -> int:
        return len(self._devices)

    def get_device_info_by_index(self, device_index: int) -> dict[str, Any]:
        if not 0 <= device_index < len(self._devices):
            raise OSError(CONSTANTS["paInvalidDevice"], "Invalid device info")
        return self._devices[device_index].info(device_index)

    def get_default_input_device_info(self) -> dict[str, Any]:
        # PortAudio's ALSA API makes the "default" PCM the default when it has one
        named = [i for i, d in enumerate(self._devices) if d.name == "default"
                 and d.max_input_channels]
        inputs = named or [i for i, d in enumerate(self._devices) if d.max_input_channels]
        if not inputs:
            raise OSError("No Default Input Device Available")
        return self.get_device_info_by_index(inputs[0])

    def _check(self, rate: float, index: int | None, channels: int | None,
               fmt: int | None) -> int | None:
        """The PortAudio error code for this input configuration, or None when it is fine."""
        if index is None or not 0 <= index < len(self._devices):
            return CONSTANTS["paInvalidDevice"]
        dev = self._devices[index]
        if channels is None or channels < 1 or channels > dev.max_input_channels:
            return CONSTANTS["paInvalidChannelCount"]
        if fmt not in dev.formats:
            return CONSTANTS["paSampleFormatNotSupported"]
        if int(rate) != rate or int(rate) not in dev.rates:
            return CONSTANTS["paInvalidSampleRate"]
        return None

    def is_format_supported(self, rate: float, input_device: int | None = None,
                            input_channels: int | None = None, input_format: int | None = None,
                            output_device: int | None = None, output_channels: int | None = None,
                            output_format: int | None = None) -> bool:
        if input_device is None and output_device is None:
            raise ValueError("Must specify stream format for input, output, or both",
                             CONSTANTS["paInvalidDevice"])
        if input_device is None:
            raise NotImplementedError("the fake does output-only streams not at all")
        code = self._check(rate, input_device, input_channels, input_format)
        if code is not None:
            raise ValueError(_ERROR_TEXT[code], code)
        return True

    def open(self, *args: Any, **kwargs: Any) -> FakeStream:
        stream = FakeStream(self, *args, **kwargs)
        self._streams.add(stream)
        return stream

    def close(self, stream: FakeStream) -> None:
        if stream not in self._streams:
            raise ValueError(f"Stream {stream} not found")
        stream.close()

    def _remove_stream(self, stream: FakeStream) -> None:
        self._streams.discard(stream)


class FakeStream:
    """pyaudio.PyAudio.Stream, input and callback mode (what PyAudioMicrophone uses)."""

    def __init__(self, PA_manager: FakePyAudio, rate: int, channels: int, format: int,
                 input: bool = False, output: bool = False,
                 input_device_index: int | None = None, output_device_index: int | None = None,
                 frames_per_buffer: int = 0, start: bool = True,
                 input_host_api_specific_stream_info: Any = None,
                 output_host_api_specific_stream_info: Any = None,
                 stream_callback: Callable[..., Any] | None = None) -> None:
        if not (input or output):
            raise ValueError("Must specify an input or output stream.")
        if output or stream_callback is None:
            raise NotImplementedError("the fake does input streams in callback mode only")
        pa = PA_manager
        index = input_device_index
        if index is None:
            index = int(pa.get_default_input_device_info()["index"])
        code = pa._check(rate, index, channels, format)
        if code is not None:
            raise OSError(code, _ERROR_TEXT[code])
        self.device = pa._devices[index]
        world = pa._world
        if not world.plugged(self.device):
            # snd_pcm_open on a vanished card
            raise OSError(CONSTANTS["paUnanticipatedHostError"], "Unanticipated host error")
        self._parent = pa
        self._world = world
        self.rate = int(rate)
        self.channels = channels
        self.frames_per_buffer = frames_per_buffer or 1024
        self._callback = stream_callback
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._vanish = threading.Event()
        self._thread: threading.Thread | None = None
        self._skip_frames = 0
        self._closed = False
        self._is_running = False
        self.log: list[tuple[int, int]] = []
        self.callbacks = 0
        with world._lock:
            world.streams.append(self)
            world.history.append(self)
        if start:
            self.start_stream()

    # --- lifecycle ---------------------------------------------------------------------------

    def start_stream(self) -> None:
        if self._is_running:
            return
        if self._closed:
            raise OSError(CONSTANTS["paBadStreamPtr"], "Invalid stream pointer")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fake-portaudio", daemon=True)
        self._thread.start()
        self._is_running = True

    def stop_stream(self) -> None:
        if not self._is_running:
            return
        self._stop.set()
        self._world._release.wait()  # hang_stop(True): PortAudio stuck joining its thread
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._is_running = False

    def close(self) -> None:
        self.stop_stream()
        self._closed = True
        self._parent._remove_stream(self)
        with self._world._lock:
            if self in self._world.streams:
                self._world.streams.remove(self)

    def is_active(self) -> bool:
        thread = self._thread
        return bool(self._is_running and thread is not None and thread.is_alive())

    def is_stopped(self) -> bool:
        return not self._is_running

    def get_input_latency(self) -> float:
        return self.frames_per_buffer / self.rate

    def get_output_latency(self) -> float:
        return 0.0

    def get_time(self) -> float:
        return self._now_s(time.monotonic_ns())

    def get_cpu_load(self) -> float:
        return 0.0

    def read(self, num_frames: int, exception_on_overflow: bool = True) -> bytes:
        raise OSError(CONSTANTS["paCanNotReadFromACallbackStream"],
                      "Can not read from a callback stream")

    # --- the device --------------------------------------------------------------------------

    def _skip(self, frames: int) -> None:
        with self._state_lock:
            self._skip_frames += frames

    def _now_s(self, mono_ns: int) -> float:
        clock = self.device.adc_clock
        if clock == "realtime":
            return (mono_ns + self._world.realtime_offset_ns) / NS
        if clock == "monotonic":
            return mono_ns / NS
        return 0.0

    def _run(self) -> None:
        dev = self.device
        fpb = self.frames_per_buffer
        # true length of one frame on CLOCK_MONOTONIC: a fast crystal makes frames shorter
        frame_ns = NS / (self.rate * (1 + dev.rate_error_ppm * 1e-6))
        t0 = time.monotonic_ns()
        n = 0
        flags = 0
        while True:
            with self._state_lock:
                skip, self._skip_frames = self._skip_frames, 0
            if skip:
                n += skip
                flags |= CONSTANTS["paInputOverflow"]
            due = t0 + round((n + fpb) * frame_ns) + dev.latency_ns
            while True:
                wait = (due - time.monotonic_ns()) / NS
                if self._stop.is_set() or self._vanish.is_set():
                    return
                if wait <= 0 and not self._world._stalled:
                    break
                self._stop.wait(max(0.0, min(wait, 0.01)) if wait > 0 else 0.01)
            capture_ns = t0 + round(n * frame_ns)
            now = time.monotonic_ns()
            adc = self._now_s(capture_ns)
            time_info = {"input_buffer_adc_time": adc, "current_time": self._now_s(now),
                         "output_buffer_dac_time": 0.0}
            data = dev.signal(n, fpb, self.channels)
            try:
                result = self._callback(data, fpb, time_info, flags)
            except Exception:
                traceback.print_exc()  # what pyaudio does, then paAbort
                return
            self.callbacks += 1
            self.log.append((n, capture_ns))
            flags = 0
            n += fpb
            flag = result[1] if isinstance(result, tuple) and len(result) == 2 else \
                CONSTANTS["paAbort"]
            if flag != CONSTANTS["paContinue"]:
                return
