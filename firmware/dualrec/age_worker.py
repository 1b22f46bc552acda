"""Age encryption in a separate process.

pyrage holds the GIL for the whole of an encryption (tens of milliseconds for a 10 s segment on a
PC, several times that on a Pi), which stalls the capture threads and drops frames. A one-process
pool takes the work off the interpreter that records. Only the plaintext crosses the pipe, in
memory: nothing touches the disk. The module imports nothing heavy, so the worker starts light.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyrage


def encrypt(plaintext: bytes, recipients: list[str]) -> bytes:
    return pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(r) for r in recipients])


class AgeWorker:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def encrypt(self, plaintext: bytes, recipients: list[str]) -> bytes:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(encrypt, plaintext, recipients).result()
        except BrokenProcessPool:
            self._pool = None  # the worker died (OOM kill?): a new one next time
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
