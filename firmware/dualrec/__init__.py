"""dualrec gateway: records camera, microphone and teller operation log, seals them into
signed, hash-chained, encrypted segments."""

__version__ = "0.1.0"
