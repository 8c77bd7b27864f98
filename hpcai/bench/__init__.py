"""Benchmarks: `hpcai bench NAME`, each against the real peer measured in the same run."""
