"""Benchmarks run as `hpcai bench <name>` (or `python -m hpcai.bench.<name>`)."""
