"""Benchmarks (`make bench`): the gateway's CPU, memory and sealing throughput against plain tools.

Nothing here is collected by pytest (no test_*.py names) and nothing asserts on time: the figures
are printed and written to run/bench.json for people to read and compare.
"""
