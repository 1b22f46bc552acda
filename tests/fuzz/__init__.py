"""Mutation campaign against the strict verifier (issue 8, "Proof"): `make fuzz` runs
``python -m tests.fuzz.campaign``; tests/test_fuzz_sample.py runs a seeded sample of it."""
