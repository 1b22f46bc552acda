"""The reference branch receiver (docs/UPLOAD.md): takes sealed segments from enrolled boxes over
mutual TLS, checks signatures, hashes and the chain, stores them and answers with signed receipts.

`storage` is the interface the rest talks to and `store` its embedded implementation (SQLite
index plus files); `server` speaks HTTP(S) with aiohttp, `runtime` runs it, behind `guard`
(connections), `bodies` (body pace), `limits` and `ratelog`; `metrics`, `alerts` (webhook) and
`retention` run beside it (`extras`); `cli` is the `dualrec-receiver` command."""
