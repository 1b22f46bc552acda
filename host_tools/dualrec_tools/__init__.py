"""Technician and branch side of dualrec: `dualrec-tool` (keys, verify, export, sessions) and the
checks and converters behind it. The segment format itself is imported from the firmware package
(dualrec.segment_format), so it lives in one place."""
