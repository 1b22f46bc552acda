"""A faithful stand-in for the RPi package, so the real GPIO backend runs in tests on any machine.

Only ``RPi.GPIO`` is provided. Put ``tests/fakes`` first on ``sys.path`` to use it.
"""
