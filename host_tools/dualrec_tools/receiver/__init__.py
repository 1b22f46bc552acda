"""The reference branch receiver (docs/UPLOAD.md): takes sealed segments from enrolled boxes over
mutual TLS, checks signatures, hashes and the chain, stores them and answers with signed receipts.

`store` keeps the evidence and the bookkeeping (SQLite index plus files), `server` speaks HTTP(S)
with aiohttp, `cli` is the `dualrec-receiver` command."""
