"""Soak runs (`make soak`): the box killed and starved of disk, over and over, and what survived.

Not collected by pytest (no test_*.py names); tests/test_soak_short.py runs a short version.
"""
