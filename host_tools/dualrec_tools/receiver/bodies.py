"""Request bodies read at a guaranteed pace: a body must bring min_body_rate_bps on average over
each window of body_rate_window_s, or it is cut (TooSlow, answered 408 `too_slow` and the
connection closed). Without it one slowly trickling upload held a payload worker for minutes."""

from __future__ import annotations

import asyncio
import time

from aiohttp import StreamReader

from dualrec_tools.receiver.limits import Limits


class TooSlow(Exception):
    """The body came slower than the minimum rate."""


class TooLarge(Exception):
    """The body is longer than the limit for it."""


class RateCheck:
    def __init__(self, limits: Limits) -> None:
        self.window = limits.body_rate_window_s
        self.need = limits.min_body_rate_bps * self.window
        self.rate = limits.min_body_rate_bps
        self._end = time.monotonic() + self.window
        self._got = 0

    async def next(self, content: StreamReader) -> bytes:
        """The next piece of the body (b"" at its end), or TooSlow."""
        while True:
            left = self._end - time.monotonic()
            if left <= 0:
                self._roll()
                continue
            try:
                chunk = await asyncio.wait_for(content.readany(), left)
            except TimeoutError:
                self._roll()
                continue
            self._got += len(chunk)
            return chunk

    def _roll(self) -> None:
        if self._got < self.need:
            raise TooSlow(f"body slower than {self.rate} bytes/s over {self.window:g} s "
                          f"({self._got} bytes)")
        self._end, self._got = time.monotonic() + self.window, 0


async def read_body(content: StreamReader, max_bytes: int, limits: Limits) -> bytes:
    """The whole (small) body: headers, admin JSON. TooLarge past max_bytes."""
    check = RateCheck(limits)
    out = bytearray()
    while chunk := await check.next(content):
        out += chunk
        if len(out) > max_bytes:
            raise TooLarge(f"body larger than {max_bytes} bytes")
    return bytes(out)
