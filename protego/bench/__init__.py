"""Benchmarks (micro-benchmarks of the data path; the tunnel benchmark comes later)."""
