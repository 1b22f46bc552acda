"""Entry point on the Pico (copied to the root of its filesystem as main.py); the package and
tapframe are installed under /lib by mip (package.json) or frozen (manifest.py)."""

from dualrec_tap import app

app.main()
